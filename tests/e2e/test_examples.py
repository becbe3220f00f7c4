"""The Podman example conflist is the very one tests/e2e/test_podman.py runs with a real
Podman."""

from __future__ import annotations

import json

from tests.e2e import test_podman
from tests.unit.cni.test_examples import EXAMPLES, shape


def test_podman_example_has_the_tested_shape(tmp_path):
    class FakeConsul:
        url = "http://127.0.0.1:8500"

    test_podman._write_config(tmp_path, "consulnet", "cni-consul0", FakeConsul(), "blue")
    tested = json.loads((tmp_path / "net.d" / "consulnet.conflist").read_text())
    example = json.loads((EXAMPLES / "podman" / "ipam-da-consul.conflist").read_text())
    assert shape(example) == shape(tested)
    assert example == tested  # same values too: the example is what the test runs
