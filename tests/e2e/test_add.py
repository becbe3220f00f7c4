"""ADD through the installed executable against a real Consul dev agent."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support.plugin import run_plugin
from tests.support.plugin_helpers import VERSIONS, alloc, assert_cni_error, put_alloc

SEED_RANGE = {"subnet": "10.0.20.0/23", "rangeStart": "10.0.21.100", "rangeEnd": "10.0.21.150",
              "gateway": "10.0.20.1"}


def v4(version: str, entry: dict[str, str]) -> dict[str, str]:
    """The ips[] entry as the version shapes it: 0.4.0 carries "version", 1.0.0 does not."""
    return {"version": "4", **entry} if version == "0.4.0" else entry


@pytest.mark.parametrize("version", VERSIONS)
def test_add_result_and_kv(consul, make_pool, conf_for, version):
    pool = make_pool([SEED_RANGE])
    out = run_plugin("ADD", conf_for(pool, version=version), container="ctr-add")
    assert out.rc == 0, out
    assert out.stderr == ""
    assert out.json == {
        "cniVersion": version,
        "ips": [v4(version, {"address": "10.0.21.100/23", "gateway": "10.0.20.1"})],
        "routes": [{"dst": "0.0.0.0/0", "gw": "10.0.20.1"}],
        "dns": {},
    }
    value = alloc(consul, pool, "10.0.21.100")
    assert value is not None and value["target"] == "ctr-add"
    assert set(value) <= {"target", "ifname", "host", "network", "call", "at"}  # optional extras
    assert consul.allocations(pool) == {"10.0.21.100": "ctr-add"}
    assert consul.get_json(f"ipam/{pool}") == [SEED_RANGE]  # the ranges key is never rewritten


def test_lowest_free_range_by_range_in_pool_order(consul, make_pool, conf_for):
    # The first range is numerically higher: pool order wins over address order.
    pool = make_pool([
        {"subnet": "10.50.0.0/24", "rangeStart": "10.50.0.10", "rangeEnd": "10.50.0.12"},
        {"subnet": "10.5.0.0/24", "rangeStart": "10.5.0.20", "rangeEnd": "10.5.0.21"},
    ])
    put_alloc(consul, pool, "10.50.0.10", "other-1")
    put_alloc(consul, pool, "10.50.0.12", "other-2")
    out = run_plugin("ADD", conf_for(pool), container="a")
    assert out.rc == 0, out
    assert [ip["address"] for ip in out.json["ips"]] == ["10.50.0.11/24"]  # the gap
    out = run_plugin("ADD", conf_for(pool), container="b")
    assert out.rc == 0, out
    assert [ip["address"] for ip in out.json["ips"]] == ["10.5.0.20/24"]  # next range
    assert out.json["routes"] == []
    consul.delete_tree(f"ipam/{pool}/10.50.0.10")  # released by its owner
    out = run_plugin("ADD", conf_for(pool), container="c")
    assert out.rc == 0, out
    assert [ip["address"] for ip in out.json["ips"]] == ["10.50.0.10/24"]  # lowest, not next
    assert consul.allocations(pool) == {"10.50.0.10": "c", "10.50.0.11": "a",
                                        "10.50.0.12": "other-2", "10.5.0.20": "b"}


def test_default_bounds_no_gateway_no_route(consul, make_pool, conf_for):
    version = "0.4.0"
    pool = make_pool([{"subnet": "10.3.0.0/30"}])  # usable: .1 and .2
    got = []
    for ctr in ("a", "b"):
        out = run_plugin("ADD", conf_for(pool, version=version), container=ctr)
        assert out.rc == 0, out
        assert out.json["routes"] == [] and out.json["dns"] == {}
        got += out.json["ips"]
    assert got == [v4(version, {"address": "10.3.0.1/30"}), v4(version, {"address": "10.3.0.2/30"})]
    index = consul.kv_index()
    out = run_plugin("ADD", conf_for(pool, version=version), container="c")
    assert_cni_error(out, 122, version, "full")  # .3 is the broadcast address, never handed out
    assert consul.kv_index() == index
    assert consul.allocations(pool) == {"10.3.0.1": "a", "10.3.0.2": "b"}


def test_never_network_broadcast_or_gateway(consul, make_pool, conf_for):
    # A range that spans the whole /29 including network and broadcast, gateway in the middle.
    pool = make_pool([{"subnet": "10.4.0.0/29", "rangeStart": "10.4.0.0", "rangeEnd": "10.4.0.7",
                       "gateway": "10.4.0.3"}])
    got = []
    for ctr in ("a", "b", "c"):
        out = run_plugin("ADD", conf_for(pool), container=ctr)
        assert out.rc == 0, out
        got.append(out.json["ips"][0]["address"])
    assert got == ["10.4.0.1/29", "10.4.0.2/29", "10.4.0.4/29"]
    put_alloc(consul, pool, "10.4.0.5", "x")
    put_alloc(consul, pool, "10.4.0.6", "y")
    out = run_plugin("ADD", conf_for(pool), container="d")
    assert_cni_error(out, 122, "1.0.0", pool)
    assert sorted(consul.allocations(pool)) == [f"10.4.0.{i}" for i in (1, 2, 4, 5, 6)]


def test_ipv6_pool_last_address_usable(consul, make_pool, conf_for):
    version = "1.0.0"  # the 0.4.0 shape of an IPv6 entry: test_every_pool_served_one_address_each
    pool = make_pool([{"subnet": "fd00:1::/120", "rangeStart": "fd00:1::fe",
                       "gateway": "fd00:1::1"}])
    out = run_plugin("ADD", conf_for(pool, version=version), container="a")
    assert out.rc == 0, out
    assert out.json == {
        "cniVersion": version,
        "ips": [{"address": "fd00:1::fe/120", "gateway": "fd00:1::1"}],
        "routes": [{"dst": "::/0", "gw": "fd00:1::1"}],
        "dns": {},
    }
    out = run_plugin("ADD", conf_for(pool, version=version), container="b")
    assert out.rc == 0, out
    assert out.json["ips"][0]["address"] == "fd00:1::ff/120"
    out = run_plugin("ADD", conf_for(pool, version=version), container="c")
    assert_cni_error(out, 122, version)
    assert consul.allocations(pool) == {"fd00:1::fe": "a", "fd00:1::ff": "b"}


def test_ipv6_slash_64_pool(consul, make_pool, conf_for):
    pool = make_pool([{"subnet": "fd00:64::/64", "gateway": "fd00:64::1"}])
    put_alloc(consul, pool, "fd00:64::2", "other")
    out = run_plugin("ADD", conf_for(pool), container="a", timeout=10)
    assert out.rc == 0, out
    assert out.json["ips"] == [{"address": "fd00:64::3/64", "gateway": "fd00:64::1"}]


@pytest.mark.parametrize("key", ["requested-ip", "requested_ip"])
def test_requested_ip_both_spellings(consul, make_pool, conf_for, key):
    pool = make_pool([SEED_RANGE])
    out = run_plugin("ADD", conf_for({"name": pool, key: "10.0.21.123"}), container="static")
    assert out.rc == 0, out
    assert out.json["ips"] == [{"address": "10.0.21.123/23", "gateway": "10.0.20.1"}]
    assert consul.allocations(pool) == {"10.0.21.123": "static"}


def test_requested_ip_taken_from_another_container(consul, make_pool, conf_for):
    pool = make_pool([SEED_RANGE])
    put_alloc(consul, pool, "10.0.21.123", "old-owner")
    out = run_plugin("ADD", conf_for({"name": pool, "requested-ip": "10.0.21.123"}),
                     container="new-owner")
    assert out.rc == 0, out
    assert out.json["ips"] == [{"address": "10.0.21.123/23", "gateway": "10.0.20.1"}]
    assert consul.allocations(pool) == {"10.0.21.123": "new-owner"}
    warning = [line for line in out.stderr.splitlines() if "10.0.21.123" in line]
    assert warning, out
    assert "old-owner" in warning[0] and "new-owner" in warning[0], out
    assert "WARNING" in warning[0]


@pytest.mark.parametrize(
    "requested",
    ["10.0.22.5",  # outside the subnet
     "10.0.21.99",  # inside the subnet, before rangeStart
     "10.0.21.151",  # after rangeEnd
     "fd00::1"],  # the other family
)
def test_requested_ip_outside_pool(consul, make_pool, conf_for, requested):
    pool = make_pool([SEED_RANGE])
    index = consul.kv_index()
    out = run_plugin("ADD", conf_for({"name": pool, "requested_ip": requested}))
    assert_cni_error(out, 124, "1.0.0", requested, pool)
    assert consul.kv_index() == index
    assert consul.allocations(pool) == {}


@pytest.mark.parametrize("requested", ["10.0.20.1", "10.0.21.255", "10.0.20.0"])
def test_requested_reserved_address_is_refused(consul, make_pool, conf_for, requested):
    # Default bounds and a gateway inside them: gateway, broadcast, network are never handed out.
    pool = make_pool([{"subnet": "10.0.20.0/23", "rangeStart": "10.0.20.0",
                       "rangeEnd": "10.0.21.255", "gateway": "10.0.20.1"}])
    index = consul.kv_index()
    out = run_plugin("ADD", conf_for({"name": pool, "requested-ip": requested}))
    assert_cni_error(out, 124, "1.0.0", requested)
    assert consul.kv_index() == index


@pytest.mark.parametrize("version", VERSIONS)
def test_every_pool_served_one_address_each(consul, make_pool, conf_for, version):
    p4 = make_pool([SEED_RANGE])
    p6 = make_pool([{"subnet": "fd00:2::/64", "gateway": "fd00:2::1"}])
    pnogw = make_pool([{"subnet": "10.3.0.0/30"}])
    out = run_plugin("ADD", conf_for(p4, p6, pnogw, version=version), container="multi")
    assert out.rc == 0, out
    ips = [{"address": "10.0.21.100/23", "gateway": "10.0.20.1"},
           {"address": "fd00:2::2/64", "gateway": "fd00:2::1"},
           {"address": "10.3.0.1/30"}]
    if version == "0.4.0":
        ips = [{"version": "6" if ":" in i["address"] else "4", **i} for i in ips]
    assert out.json == {
        "cniVersion": version,
        "ips": ips,
        # one default route per family, only via a gateway
        "routes": [{"dst": "0.0.0.0/0", "gw": "10.0.20.1"}, {"dst": "::/0", "gw": "fd00:2::1"}],
        "dns": {},
    }
    assert consul.allocations(p4) == {"10.0.21.100": "multi"}
    assert consul.allocations(p6) == {"fd00:2::2": "multi"}
    assert consul.allocations(pnogw) == {"10.3.0.1": "multi"}


@pytest.mark.parametrize("version", VERSIONS)
def test_later_pool_missing_releases_earlier_writes(consul, make_pool, conf_for, version):
    first = make_pool([SEED_RANGE])
    before = consul.tree(f"ipam/{first}")
    out = run_plugin("ADD", conf_for(first, f"{first}-missing", version=version))
    assert_cni_error(out, 114, version, f"{first}-missing")
    assert consul.tree(f"ipam/{first}") == before
    assert consul.allocations(first) == {}


def test_later_pool_full_releases_earlier_writes(consul, make_pool, conf_for):
    first = make_pool([SEED_RANGE])
    full = make_pool([{"subnet": "10.3.0.0/30"}])
    put_alloc(consul, full, "10.3.0.1", "x")
    put_alloc(consul, full, "10.3.0.2", "y")
    before = consul.tree("ipam/" + first) | consul.tree("ipam/" + full)
    out = run_plugin("ADD", conf_for(first, full))
    assert_cni_error(out, 122, "1.0.0", full)
    assert consul.tree("ipam/" + first) | consul.tree("ipam/" + full) == before


def test_failed_call_gives_a_taken_over_address_back(consul, make_pool, conf_for):
    first = make_pool([SEED_RANGE])
    put_alloc(consul, first, "10.0.21.123", "old-owner")
    before = consul.get(f"ipam/{first}/10.0.21.123")
    out = run_plugin("ADD", conf_for({"name": first, "requested-ip": "10.0.21.123"},
                                     f"{first}-missing"), container="new-owner")
    assert_cni_error(out, 114, "1.0.0")
    assert consul.get(f"ipam/{first}/10.0.21.123") == before
    assert consul.allocations(first) == {"10.0.21.123": "old-owner"}


@pytest.mark.parametrize("version", VERSIONS)
def test_result_keeps_prev_result_ips(consul, make_pool, conf_for, version):
    pool = make_pool([SEED_RANGE])
    prev_ip = v4(version, {"address": "192.168.5.5/24", "gateway": "192.168.5.1"})
    out = run_plugin("ADD", conf_for(pool, version=version, ips=[prev_ip]), container="keep")
    assert out.rc == 0, out
    assert out.json["ips"] == [
        prev_ip, v4(version, {"address": "10.0.21.100/23", "gateway": "10.0.20.1"})]
    assert out.json["cniVersion"] == version


def test_repeated_add_returns_the_same_address(consul, make_pool, conf_for):
    pool = make_pool([SEED_RANGE])
    first = run_plugin("ADD", conf_for(pool), container="again")
    second = run_plugin("ADD", conf_for(pool), container="again")
    assert first.rc == second.rc == 0, (first, second)
    assert first.json == second.json
    assert consul.allocations(pool) == {"10.0.21.100": "again"}


def test_concurrent_adds_never_share_an_address(consul, make_pool, conf_for):
    """Racing writers: a CAS loss is retried on the next address, never a duplicate."""
    pool = make_pool([{"subnet": "10.6.0.0/24", "rangeStart": "10.6.0.10",
                       "rangeEnd": "10.6.0.19"}])
    conf = conf_for(pool)
    ctrs = [f"race-{i}" for i in range(6)]
    with ThreadPoolExecutor(len(ctrs)) as ex:
        outs = list(ex.map(lambda c: run_plugin("ADD", conf, container=c), ctrs))
    assert all(o.rc == 0 for o in outs), outs
    got = {c: json.loads(o.stdout)["ips"][0]["address"].split("/")[0]
           for c, o in zip(ctrs, outs, strict=True)}
    assert len(set(got.values())) == len(ctrs)
    assert consul.allocations(pool) == {ip: c for c, ip in got.items()}
    assert sorted(got.values()) == [f"10.6.0.1{i}" for i in range(6)]
