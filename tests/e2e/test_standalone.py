"""Standalone use: pools from `ipam.pools` (no prevResult, as under bridge/macvlan/ptp) and static
addresses from the CNI conventions (CNI_ARGS IP=, runtimeConfig.ips, args.cni.ips). Every test runs
the installed plugin against the real dev agent and checks KV as an operator would."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.plugin import run_plugin
from tests.support.plugin_helpers import standalone_conf

POOL_B_RANGES = [{"subnet": "10.1.0.0/24", "rangeStart": "10.1.0.10", "rangeEnd": "10.1.0.90"}]
V6_RANGES = [{"subnet": "fd00:5::/64", "rangeStart": "fd00:5::10", "rangeEnd": "fd00:5::20"}]


def standalone(consul: Any, *pools: str, version: str = "1.0.0", **extra: Any) -> dict[str, Any]:
    """A network config with our plugin directly as `ipam` of bridge, as a runtime passes it."""
    conf = standalone_conf([consul.url], list(pools), version)
    conf.update(extra)
    return conf


def assert_error(out: Any, code: int, *words: str) -> None:
    assert out.rc == code, out
    body = out.json
    assert body["code"] == code, out
    for word in words:
        assert word in body["msg"], out
    assert "Traceback" not in out.stdout


# -- ADD / CHECK / DEL without prevResult --------------------------------------------------------


@pytest.mark.parametrize("version", ["0.4.0", "1.0.0", "1.1.0"])
def test_add_check_del(consul, make_pool, version):
    pool = make_pool()
    conf = standalone(consul, pool, version=version)
    out = run_plugin("ADD", conf, container="sa-1")
    assert out.rc == 0, out
    ip: dict[str, Any] = {"address": "10.0.21.100/23", "gateway": "10.0.20.1"}
    if version == "0.4.0":
        ip["version"] = "4"
    assert out.json == {
        "cniVersion": version,
        "ips": [ip],
        "routes": [{"dst": "0.0.0.0/0", "gw": "10.0.20.1"}],
        "dns": {},
    }
    assert consul.allocations(pool) == {"10.0.21.100": "sa-1"}

    # The runtime passes the ADD result back as prevResult for CHECK (and DEL).
    check = run_plugin("CHECK", {**conf, "prevResult": out.json}, container="sa-1")
    assert check.rc == 0 and check.stdout == "", check

    # A repeated ADD of the same attachment hands back the same address, no second key.
    again = run_plugin("ADD", conf, container="sa-1")
    assert again.rc == 0 and again.json == out.json, again
    assert consul.allocations(pool) == {"10.0.21.100": "sa-1"}

    # DEL without prevResult (the runtime may have lost it) finds our key by scanning.
    gone = run_plugin("DEL", conf, container="sa-1")
    assert gone.rc == 0 and gone.stdout == "", gone
    assert consul.allocations(pool) == {}
    assert consul.get(f"ipam/{pool}/") == b""  # the folder key stays


def test_check_fails_after_address_lost(consul, make_pool):
    pool = make_pool()
    conf = standalone(consul, pool)
    out = run_plugin("ADD", conf, container="sa-2")
    assert out.rc == 0, out
    consul.delete_tree(f"ipam/{pool}/10.0.21.100")
    check = run_plugin("CHECK", {**conf, "prevResult": out.json}, container="sa-2")
    assert_error(check, 114, "10.0.21.100")


def test_two_pools_one_address_each(consul, make_pool):
    a, b = make_pool(), make_pool(POOL_B_RANGES)
    out = run_plugin("ADD", standalone(consul, a, b), container="sa-3")
    assert out.rc == 0, out
    assert [i["address"] for i in out.json["ips"]] == ["10.0.21.100/23", "10.1.0.10/24"]
    assert consul.allocations(a) == {"10.0.21.100": "sa-3"}
    assert consul.allocations(b) == {"10.1.0.10": "sa-3"}


def test_no_pools_anywhere_is_invalid_config(consul):
    conf = standalone(consul)
    del conf["ipam"]["pools"]
    out = run_plugin("ADD", conf, container="sa-4")
    assert_error(out, 7, "ipam.pools")


def test_prev_result_pools_win_over_ipam_pools(consul, make_pool):
    # Behind ipam-delegated prevResult.pools is authoritative; ipam.pools is only a fallback.
    a, b = make_pool(), make_pool(POOL_B_RANGES)
    conf = standalone(
        consul, a, prevResult={"cniVersion": "1.0.0", "ips": [], "pools": [{"name": b}]}
    )
    out = run_plugin("ADD", conf, container="sa-5")
    assert out.rc == 0, out
    assert consul.allocations(a) == {}
    assert consul.allocations(b) == {"10.1.0.10": "sa-5"}


# -- static addresses from the CNI conventions ---------------------------------------------------


def test_cni_args_ip(consul, make_pool):
    pool = make_pool()
    out = run_plugin(
        "ADD", standalone(consul, pool), container="st-1", env={"CNI_ARGS": "IP=10.0.21.120"}
    )
    assert out.rc == 0, out
    assert [i["address"] for i in out.json["ips"]] == ["10.0.21.120/23"]
    assert consul.allocations(pool) == {"10.0.21.120": "st-1"}


@pytest.mark.parametrize("ignore", ["1", "True"])
def test_cni_args_unknown_keys_ignored_when_asked(consul, make_pool, ignore):
    pool = make_pool()
    args = f"IgnoreUnknown={ignore};K8S_POD_NAME=web-0;IP=10.0.21.121;K8S_POD_NAMESPACE=default"
    out = run_plugin("ADD", standalone(consul, pool), container="st-2", env={"CNI_ARGS": args})
    assert out.rc == 0, out
    assert consul.allocations(pool) == {"10.0.21.121": "st-2"}


@pytest.mark.parametrize("ignore", [None, "false"])
def test_cni_args_unknown_keys_rejected(consul, make_pool, ignore):
    pool = make_pool()
    # A runtime's documented keys (K8S_POD_NAME) never fail a call; any other still does.
    args = "K8S_POD_NAME=web-0;SOME_TOOL_KEY=x;IP=10.0.21.122"
    if ignore is not None:
        args = f"IgnoreUnknown={ignore};{args}"
    before = consul.kv_index()
    out = run_plugin("ADD", standalone(consul, pool), container="st-3", env={"CNI_ARGS": args})
    assert_error(out, 4, "SOME_TOOL_KEY", "IgnoreUnknown")
    assert "K8S_POD_NAME" not in out.json["msg"]
    assert consul.allocations(pool) == {}
    assert consul.kv_index() == before


def test_runtime_config_ips_cidr_form(consul, make_pool):
    pool = make_pool()
    conf = standalone(consul, pool, runtimeConfig={"ips": ["10.0.21.130/23"]})
    out = run_plugin("ADD", conf, container="st-4")
    assert out.rc == 0, out
    assert [i["address"] for i in out.json["ips"]] == ["10.0.21.130/23"]
    assert consul.allocations(pool) == {"10.0.21.130": "st-4"}


def test_args_cni_ips(consul, make_pool):
    pool = make_pool()
    conf = standalone(consul, pool, args={"cni": {"ips": ["10.0.21.140"]}})
    out = run_plugin("ADD", conf, container="st-5")
    assert out.rc == 0, out
    assert [i["address"] for i in out.json["ips"]] == ["10.0.21.140/23"]
    assert consul.allocations(pool) == {"10.0.21.140": "st-5"}


def test_ipv6_static_in_cidr_form(consul, make_pool):
    pool = make_pool(V6_RANGES)
    conf = standalone(consul, pool, runtimeConfig={"ips": ["fd00:5::15/64"]})
    out = run_plugin("ADD", conf, container="st-6")
    assert out.rc == 0, out
    assert [i["address"] for i in out.json["ips"]] == ["fd00:5::15/64"]
    assert consul.allocations(pool) == {"fd00:5::15": "st-6"}


def test_two_pools_two_ips_each_lands_in_its_pool(consul, make_pool):
    a, b = make_pool(), make_pool(POOL_B_RANGES)
    # Listed in the opposite order of the pools: the ranges decide, not the position.
    env = {"CNI_ARGS": "IP=10.1.0.50,10.0.21.125"}
    out = run_plugin("ADD", standalone(consul, a, b), container="st-7", env=env)
    assert out.rc == 0, out
    assert [i["address"] for i in out.json["ips"]] == ["10.0.21.125/23", "10.1.0.50/24"]
    assert consul.allocations(a) == {"10.0.21.125": "st-7"}
    assert consul.allocations(b) == {"10.1.0.50": "st-7"}


def test_conventions_combine_across_pools(consul, make_pool):
    a, b = make_pool(), make_pool(POOL_B_RANGES)
    conf = standalone(consul, a, b, runtimeConfig={"ips": ["10.1.0.60/24"]})
    env = {"CNI_ARGS": "IP=10.0.21.126"}
    out = run_plugin("ADD", conf, container="st-8", env=env)
    assert out.rc == 0, out
    assert consul.allocations(a) == {"10.0.21.126": "st-8"}
    assert consul.allocations(b) == {"10.1.0.60": "st-8"}


@pytest.mark.parametrize(
    ("where", "code"),
    [("cni_args", 4), ("runtime_config", 7), ("args_cni", 7)],
)
def test_bad_ip_is_an_error_and_writes_nothing(consul, make_pool, where, code):
    pool = make_pool()
    extra: dict[str, Any] = {}
    env = None
    if where == "cni_args":
        env = {"CNI_ARGS": "IP=10.0.21.300"}
    elif where == "runtime_config":
        extra["runtimeConfig"] = {"ips": ["10.0.21.300/23"]}
    else:
        extra["args"] = {"cni": {"ips": ["not-an-ip"]}}
    before = consul.kv_index()
    out = run_plugin("ADD", standalone(consul, pool, **extra), container="st-9", env=env)
    assert_error(out, code, "is not an IP address")
    assert consul.allocations(pool) == {}
    assert consul.kv_index() == before


def test_runtime_config_ips_must_be_a_list(consul, make_pool):
    pool = make_pool()
    conf = standalone(consul, pool, runtimeConfig={"ips": "10.0.21.130"})
    out = run_plugin("ADD", conf, container="st-10")
    assert_error(out, 7)
    assert consul.allocations(pool) == {}


def test_ip_fitting_no_pool_is_124_and_nothing_written(consul, make_pool):
    pool = make_pool()
    env = {"CNI_ARGS": "IP=192.168.77.7"}
    out = run_plugin("ADD", standalone(consul, pool), container="st-11", env=env)
    assert_error(out, 124, "192.168.77.7")
    assert consul.allocations(pool) == {}


def test_one_ip_fitting_no_pool_rolls_back_the_others(consul, make_pool):
    # Pool a is served (its key written) before the unplaced address is noticed: the whole
    # call must be undone, so neither pool keeps a key.
    a, b = make_pool(), make_pool(POOL_B_RANGES)
    env = {"CNI_ARGS": "IP=10.0.21.127,192.168.77.8"}
    out = run_plugin("ADD", standalone(consul, a, b), container="st-12", env=env)
    assert_error(out, 124, "192.168.77.8")
    assert consul.allocations(a) == {}
    assert consul.allocations(b) == {}


def test_two_ips_for_one_pool_is_124_and_nothing_written(consul, make_pool):
    # One address per pool: the second cannot be served, and the first is rolled back.
    pool = make_pool()
    env = {"CNI_ARGS": "IP=10.0.21.120,10.0.21.121"}
    out = run_plugin("ADD", standalone(consul, pool), container="st-15", env=env)
    assert_error(out, 124, "10.0.21.121", "already gives this attachment another address")
    assert consul.allocations(pool) == {}


def test_static_ip_on_gateway_is_refused(consul, make_pool):
    # The range spans the whole subnet, so the gateway is inside it but never allocatable.
    pool = make_pool([{"subnet": "10.2.0.0/24", "gateway": "10.2.0.1"}])
    out = run_plugin(
        "ADD", standalone(consul, pool), container="st-13", env={"CNI_ARGS": "IP=10.2.0.1"}
    )
    assert_error(out, 124, "10.2.0.1", "gateway")
    assert consul.allocations(pool) == {}


def test_static_ip_released_by_del(consul, make_pool):
    pool = make_pool()
    conf = standalone(consul, pool, args={"cni": {"ips": ["10.0.21.141"]}})
    out = run_plugin("ADD", conf, container="st-14")
    assert out.rc == 0, out
    gone = run_plugin("DEL", conf, container="st-14")
    assert gone.rc == 0 and gone.stdout == "", gone
    assert consul.allocations(pool) == {}


def test_conventional_ip_held_by_another_container_is_refused(consul, make_pool):
    pool = make_pool()
    first = run_plugin(
        "ADD", standalone(consul, pool), container="holder", env={"CNI_ARGS": "IP=10.0.21.120"}
    )
    assert first.rc == 0, first
    before = consul.kv_index()
    out = run_plugin(
        "ADD", standalone(consul, pool), container="intruder", env={"CNI_ARGS": "IP=10.0.21.120"}
    )
    assert_error(out, 126, "10.0.21.120", "holder")
    assert consul.kv_index() == before
    assert consul.allocations(pool) == {"10.0.21.120": "holder"}
    again = run_plugin(
        "ADD", standalone(consul, pool), container="holder", env={"CNI_ARGS": "IP=10.0.21.120"}
    )
    assert again.rc == 0 and again.stdout == first.stdout  # the holder's own repeat is fine


def test_del_ignores_static_ip_conventions(consul, make_pool):
    pool = make_pool()
    assert run_plugin("ADD", standalone(consul, pool), container="d-1").rc == 0
    conf = standalone(consul, pool, runtimeConfig={"ips": ["not-an-ip"]})
    out = run_plugin("DEL", conf, container="d-1", env={"CNI_ARGS": "Unknown=1"})
    assert out.rc == 0 and out.stdout == "", out
    assert consul.allocations(pool) == {}
