"""The Podman example conflist is the very one tests/e2e/test_podman.py runs with a real
Podman; the Kubernetes one, and the containerd settings, are what tests/e2e/test_containerd.py
runs with a real containerd."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from tests.e2e import test_containerd, test_podman
from tests.support import cri
from tests.unit.cni.test_examples import EXAMPLES, shape


def test_podman_example_has_the_tested_shape(tmp_path):
    class FakeConsul:
        url = "http://127.0.0.1:8500"

    test_podman._write_config(tmp_path, "consulnet", "cni-consul0", FakeConsul(), "blue")
    tested = json.loads((tmp_path / "net.d" / "consulnet.conflist").read_text())
    example = json.loads((EXAMPLES / "podman" / "ipam-da-consul.conflist").read_text())
    assert shape(example) == shape(tested)
    assert example == tested  # same values too: the example is what the test runs


def test_kubernetes_example_is_the_tested_conflist():
    tested = test_containerd.conflist(
        "consulnet",
        "cni-consul0",
        test_containerd.consul_ipam("http://127.0.0.1:8500", "blue"),
        gateway=True,
    )
    example = json.loads((EXAMPLES / "kubernetes" / "10-consulnet.conflist").read_text())
    assert example == tested  # eth0's network; eth1's differs in name, bridge and isGateway


def test_containerd_example_sets_what_the_test_sets():
    example = tomllib.loads((EXAMPLES / "kubernetes" / "containerd-cri.toml").read_text())
    tested = tomllib.loads(cri.Containerd(Path("/nonexistent"), {}).config())
    table = "io.containerd.grpc.v1.cri"
    assert example["version"] == tested["version"] == 2
    assert example["plugins"].keys() == {table}
    assert example["plugins"][table].keys() == {"cni"}
    assert example["plugins"][table]["cni"].keys() == tested["plugins"][table]["cni"].keys()
