"""DEL through the installed executable against a real Consul dev agent, plus the per-key CAS
release driven in-process through the allocator over real Consul."""

from __future__ import annotations

import pytest
from ipam_da_consul.allocator.allocate import Allocator
from ipam_da_consul.consul import ConsulClient, ConsulKV

from tests.support.plugin import run_plugin
from tests.support.plugin_helpers import VERSIONS, alloc, put_alloc


@pytest.mark.parametrize("version", VERSIONS)
def test_del_releases_only_ours_and_repeats_quietly(consul, make_pool, conf_for, version):
    pool = make_pool()
    out = run_plugin("ADD", conf_for(pool, version=version), container="leaving")
    assert out.rc == 0, out
    put_alloc(consul, pool, "10.0.21.101", "staying")
    put_alloc(consul, pool, "10.0.21.102", "leaving")  # upstream-style value, still ours
    out = run_plugin("DEL", conf_for(pool, version=version), container="leaving")
    assert (out.rc, out.stdout, out.stderr) == (0, "", ""), out
    assert consul.allocations(pool) == {"10.0.21.101": "staying"}
    assert consul.get(f"ipam/{pool}") is not None  # the pool itself stays
    fence = consul.modify_index("ipam/.fences/testnet/leaving/eth0")
    assert fence is not None  # raised first: a late write of this attachment can never land
    out = run_plugin("DEL", conf_for(pool, version=version), container="leaving")
    assert (out.rc, out.stdout) == (0, ""), out
    assert consul.allocations(pool) == {"10.0.21.101": "staying"}
    assert consul.modify_index("ipam/.fences/testnet/leaving/eth0") > fence  # raised again


@pytest.mark.parametrize("version", VERSIONS)
def test_del_when_pool_missing_succeeds(consul, conf_for, version):
    before = consul.tree("ipam/")
    gone = f"gone-{version}"
    out = run_plugin("DEL", conf_for("no-such-pool-for-del", version=version), container=gone)
    assert (out.rc, out.stdout) == (0, ""), out
    after = consul.tree("ipam/")
    # Only the attachment's fence was written: nothing of any pool.
    assert set(after) - set(before) == {f"ipam/.fences/testnet/{gone}/eth0"}
    assert {k: v for k, v in after.items() if k in before} == before


def test_del_with_prev_ips_also_releases_the_attachments_other_keys(
    consul, make_pool, conf_for, tmp_path
):
    """prevResult names one key; a second key of the same attachment (a leak, an older
    version's) goes too, from one listing read after the fence. An unreadable key is skipped
    with a warning and left alone."""
    pool = make_pool()
    added = run_plugin("ADD", conf_for(pool), container="direct")
    assert added.rc == 0, added
    consul.put(f"ipam/{pool}/10.0.21.130", {"target": "direct", "ifname": "eth0"})
    consul.put(f"ipam/{pool}/10.0.21.131", {"target": "direct", "ifname": "eth1"})  # a sibling
    consul.put(f"ipam/{pool}/10.0.21.140", "not an allocation")
    log = tmp_path / "del.log"
    out = run_plugin("DEL", conf_for(pool, ips=added.json["ips"]), container="direct",
                     verbose=True, env={"IPAM_DA_CONSUL_LOG_FILE": str(log)})
    assert (out.rc, out.stdout) == (0, ""), out
    assert "10.0.21.140" in out.stderr and "WARNING" in out.stderr
    assert sorted(consul.tree(f"ipam/{pool}/")) == [
        f"ipam/{pool}/", f"ipam/{pool}/10.0.21.131", f"ipam/{pool}/10.0.21.140"]
    assert consul.get(f"ipam/{pool}/10.0.21.140") == b"not an allocation"
    text = log.read_text()
    assert text.count(f"GET {consul.url}/v1/kv/ipam/{pool}/ -> 200") == 1, text  # one listing


def test_del_via_prev_ips_leaves_a_reallocated_key(consul, make_pool, conf_for):
    pool = make_pool()
    put_alloc(consul, pool, "10.0.21.100", "mine")
    put_alloc(consul, pool, "10.0.21.101", "thief")  # was ours, re-allocated by a static request
    put_alloc(consul, pool, "10.0.21.102", "mine")
    ips = [{"address": f"10.0.21.{i}/23", "gateway": "10.0.20.1"} for i in (100, 101, 102)]
    out = run_plugin("DEL", conf_for(pool, ips=ips), container="mine")
    assert (out.rc, out.stdout) == (0, ""), out
    assert consul.allocations(pool) == {"10.0.21.101": "thief"}


def test_del_with_only_foreign_prev_ips_still_finds_ours(consul, make_pool, conf_for):
    pool = make_pool()
    put_alloc(consul, pool, "10.0.21.110", "mine")
    ips = [{"address": "192.168.5.5/24", "gateway": "192.168.5.1"}]  # another delegate's address
    out = run_plugin("DEL", conf_for(pool, ips=ips), container="mine")
    assert (out.rc, out.stdout) == (0, ""), out
    assert consul.allocations(pool) == {}


def test_del_every_pool(consul, make_pool, conf_for):
    p1, p2 = make_pool(), make_pool([{"subnet": "fd00:3::/64"}])
    out = run_plugin("ADD", conf_for(p1, p2), container="both")
    assert out.rc == 0, out
    put_alloc(consul, p2, "fd00:3::9", "neighbour")
    out = run_plugin("DEL", conf_for(p1, p2), container="both")
    assert (out.rc, out.stdout) == (0, ""), out
    assert consul.allocations(p1) == {}
    assert consul.allocations(p2) == {"fd00:3::9": "neighbour"}


def test_release_is_one_cas_per_key(consul, make_pool):
    """A key re-allocated between the read and the delete is left alone; the others still go.

    The upstream plugin deleted all keys in one transaction, so one changed key leaked them all.
    Driven in-process to place the re-allocation exactly between read and delete; the KV is the
    real dev agent.
    """
    pool = make_pool()
    for last in (100, 101, 102):
        put_alloc(consul, pool, f"10.0.21.{last}", "victim")
    client = ConsulClient([consul.url])
    try:
        allocator = Allocator(ConsulKV(client))
        held = [h for h in allocator.scan(pool, lambda why: None) if h.owned_by("victim")]
        assert sorted(str(h.ip) for h in held) == ["10.0.21.100", "10.0.21.101", "10.0.21.102"]
        put_alloc(consul, pool, "10.0.21.101", "thief")  # re-allocated after our read
        assert [allocator.release(h) for h in held] == [True, True, True]
    finally:
        client.close()
    assert consul.allocations(pool) == {"10.0.21.101": "thief"}
    assert alloc(consul, pool, "10.0.21.101") == {"target": "thief"}
