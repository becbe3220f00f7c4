"""The runtimes' own CNI_ARGS keys (Nomad's NOMAD_*, Kubernetes runtimes' K8S_POD_*) never fail
a call, with or without IgnoreUnknown, and ADD records them in the allocation so an operator can
find who holds an address by the names they know."""

from __future__ import annotations

import pytest

from tests.support.plugin import run_plugin
from tests.support.plugin_helpers import assert_cni_error

ALLOC_ID = "5f1b2c3d-4e5f-6a7b-8c9d-0e1f2a3b4c5d"
# Exactly what each runtime sends (Nomad documents no IgnoreUnknown; containerd adds it).
NOMAD = {
    "NOMAD_REGION": "global",
    "NOMAD_NAMESPACE": "default",
    "NOMAD_JOB_ID": "web",
    "NOMAD_GROUP_NAME": "frontend",
    "NOMAD_ALLOC_ID": ALLOC_ID,
}
CONTAINERD = {
    "IgnoreUnknown": "1",
    "K8S_POD_NAMESPACE": "prod",
    "K8S_POD_NAME": "web-0",
    "K8S_POD_INFRA_CONTAINER_ID": "a" * 64,
    "K8S_POD_UID": "0c7d2f1e-1111-2222-3333-444455556666",
}


def cni_args(pairs: dict[str, str]) -> str:
    return ";".join(f"{k}={v}" for k, v in pairs.items())


@pytest.mark.parametrize("runtime", [NOMAD, CONTAINERD], ids=["nomad", "containerd"])
def test_runtime_keys_never_fail_and_are_recorded(consul, make_pool, conf_for, runtime):
    pool = make_pool()
    container = runtime.get("NOMAD_ALLOC_ID") or runtime["K8S_POD_INFRA_CONTAINER_ID"]
    env = {"CNI_ARGS": cni_args(runtime)}
    out = run_plugin("ADD", conf_for(pool), container=container, env=env)
    assert out.rc == 0, out
    value = consul.get_json(f"ipam/{pool}/10.0.21.100")
    assert value["target"] == container
    assert value["runtime"] == {k: v for k, v in runtime.items() if k != "IgnoreUnknown"}
    out = run_plugin("DEL", conf_for(pool), container=container, env=env)
    assert (out.rc, out.stdout) == (0, ""), out
    assert consul.allocations(pool) == {}


def test_other_unknown_keys_still_need_ignore_unknown(consul, make_pool, conf_for):
    pool = make_pool()
    before = consul.kv_index()
    env = {"CNI_ARGS": cni_args(NOMAD | {"SOMETHING_ELSE": "x"})}
    out = run_plugin("ADD", conf_for(pool), container="c-unknown", env=env)
    assert_cni_error(out, 4, "1.0.0", "SOMETHING_ELSE", "IgnoreUnknown")
    assert consul.kv_index() == before
