"""The operator examples under deploy/examples parse, and their ipam sections are configs the
plugin accepts. The Podman conflist has the shape tests/e2e/test_podman.py runs with a real Podman
(tests/e2e/test_examples.py), and so do the Kubernetes conflist and containerd settings with
tests/e2e/test_containerd.py; the Nomad files and the helper's DaemonSet are examples only (no
Nomad or cluster here)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from ipam_da_consul.cni import config

EXAMPLES = Path(__file__).resolve().parents[3] / "deploy" / "examples"
CONFLISTS = sorted(EXAMPLES.rglob("*.conflist"))


def shape(value: Any) -> Any:
    """Keys and value types, not values: what makes two configs the same kind of config."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(v) for v in value]
    return type(value).__name__


def test_every_conflist_is_one_the_plugin_accepts(tmp_path):
    assert {p.relative_to(EXAMPLES).as_posix() for p in CONFLISTS} >= {
        "10-mynet.conflist",
        "podman/ipam-da-consul.conflist",
        "nomad/ipam-da-consul.conflist",
        "kubernetes/10-consulnet.conflist",
    }
    token = tmp_path / "token"
    token.write_text("00000000-0000-0000-0000-000000000000\n")
    for path in CONFLISTS:
        conflist = json.loads(path.read_text())
        ours = [p for p in conflist["plugins"] if p.get("ipam", {}).get("type") == "ipam-da-consul"]
        assert len(ours) == 1, path
        # What the runtime hands the plugin: its own object with the list's name and version.
        plugin = {**ours[0], "name": conflist["name"], "cniVersion": conflist["cniVersion"]}
        if "consul_token_file" in plugin["ipam"]:
            plugin["ipam"] = {**plugin["ipam"], "consul_token_file": str(token)}
        conf = config.load(plugin, "ADD", env={})
        assert conf.name == conflist["name"] and conf.pools, path


def test_kubernetes_daemonset_parses():
    yaml = pytest.importorskip("yaml")
    [ds] = list(yaml.safe_load_all((EXAMPLES / "kubernetes" / "helper-daemonset.yaml").read_text()))
    assert ds["kind"] == "DaemonSet"
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"]}
    assert paths["socket-dir"] == "/run/ipam-da-consul" and paths["cni-bin"] == "/opt/cni/bin"
    [helper] = pod["containers"]
    assert "/opt/cni/bin/ipam-da-consul-helper" in helper["command"]
    # The host's state folder, shared with the plugin's in-process calls at the same path.
    assert paths["state-dir"] == "/var/lib/ipam-da-consul"
    mounts = {m["name"]: m["mountPath"] for m in helper["volumeMounts"]}
    assert mounts["state-dir"] == paths["state-dir"] and mounts["socket-dir"] == paths["socket-dir"]
    command = helper["command"]
    assert command[command.index("--state-dir") + 1] == paths["state-dir"]
    [init] = pod["initContainers"]  # a kubelet-made hostPath is 0755; the folder must be 0700
    assert {m["mountPath"] for m in init["volumeMounts"]} == {paths["state-dir"]}
    assert ds["spec"]["selector"]["matchLabels"] == ds["spec"]["template"]["metadata"]["labels"]
