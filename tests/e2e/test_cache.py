"""The helper's pool cache against a real agent: what a background refresh picks up."""

from __future__ import annotations

import ipaddress
import json
import time

from ipam_da_consul.allocator.layout import Layout
from ipam_da_consul.allocator.pool import parse_pool
from ipam_da_consul.cni.helper.cache import PoolCache, refreshed
from ipam_da_consul.consul import ConsulClient, ConsulKV, Deadline

RANGES = [{"subnet": "10.9.0.0/24", "rangeStart": "10.9.0.10", "rangeEnd": "10.9.0.20"}]


def kv_for(consul) -> ConsulKV:
    return ConsulKV(ConsulClient([consul.url], deadline=Deadline(60)))


def test_refresh_follows_keys_and_ranges(consul, make_pool):
    pool = make_pool(RANGES)
    for ip, target in (("10.9.0.10", "a"), ("10.9.0.11", "b")):
        consul.put(f"ipam/{pool}/{ip}", {"target": target})
    kv, layout = kv_for(consul), Layout()
    entries, _ = kv.list_after(layout.pool_key(pool))
    old = parse_pool(layout, pool, entries)
    consul._req("DELETE", f"ipam/{pool}/10.9.0.10").raise_for_status()
    consul.put(f"ipam/{pool}/10.9.0.12", {"target": "c", "ifname": "eth1"})
    consul.put(f"ipam/{pool}", [{**RANGES[0], "rangeStart": "10.9.0.11"}])
    keys, _ = kv.keys_after(layout.pool_key(pool))
    new = refreshed(layout, old, keys, kv)
    assert {str(ip): h.target for ip, h in new.held.items()} == {"10.9.0.11": "b", "10.9.0.12": "c"}
    kept = ipaddress.ip_address("10.9.0.11")
    assert new.held[kept] is old.held[kept]  # parsed once, reused
    assert str(new.ranges[0].start) == "10.9.0.11"
    assert str(new.next_free()[0]) == "10.9.0.13"


def test_watcher_brings_changes_in_the_background(consul, make_pool):
    pool = make_pool(RANGES)
    layout = Layout()
    cache = PoolCache(lambda: kv_for(consul), layout, refresh_interval=0.05)
    kv = kv_for(consul)
    first = cache.get(pool, lambda: kv.list_after(layout.pool_key(pool)))
    assert first.held == {}
    consul.put(f"ipam/{pool}/10.9.0.10", json.dumps({"target": "elsewhere"}))
    end = time.monotonic() + 10
    while time.monotonic() < end:
        current = cache.get(pool, lambda: kv.list_after(layout.pool_key(pool)))
        if current.held:
            break
        time.sleep(0.05)
    assert {str(ip): h.target for ip, h in current.held.items()} == {"10.9.0.10": "elsewhere"}
    assert str(current.next_free()[0]) == "10.9.0.11"
    cache.close()


def test_broken_key_stops_the_watcher_so_the_next_call_reports_it(consul, make_pool):
    pool = make_pool(RANGES)
    layout = Layout()
    cache = PoolCache(lambda: kv_for(consul), layout, refresh_interval=0.05)
    kv = kv_for(consul)
    cache.get(pool, lambda: kv.list_after(layout.pool_key(pool)))
    consul.put(f"ipam/{pool}/10.9.0.15", "not json")
    end = time.monotonic() + 10
    while cache.peek(pool) is not None and time.monotonic() < end:
        time.sleep(0.05)
    assert cache.peek(pool) is None and (pool, "") not in cache.pools


def test_a_value_rewritten_in_place_reaches_the_watched_copy(consul, make_pool, conf_for, tmp_path):
    """A take-over rewrites a key under the same name: the helper's watcher, which follows key
    names, must still see the new holder, or the new holder's next ADD through the helper finds
    nothing of its own there and takes a second address."""
    from tests.support.plugin import run_plugin
    from tests.support.util_procs import Helper

    pool = make_pool(RANGES)
    helper = Helper(tmp_path)
    try:
        env = {**helper.env, "IPAM_DA_CONSUL_HELPER_ACK_TIMEOUT": "30"}
        first = run_plugin("ADD", conf_for(pool), container="holder", env=env)
        assert first.rc == 0, first
        ip = first.json["ips"][0]["address"].split("/")[0]
        taken = run_plugin(
            "ADD", conf_for({"name": pool, "requested_ip": ip}), container="taker",
            env=helper.host_env,
        )
        assert taken.rc == 0, taken  # in-process: the helper hears of it only from Consul
        time.sleep(2.5)  # refreshes of the watched copy
        again = run_plugin("ADD", conf_for(pool), container="taker", env=env)
        assert again.rc == 0, again
        assert again.json["ips"][0]["address"].split("/")[0] == ip
        assert list(consul.allocations(pool).values()) == ["taker"]
    finally:
        helper.close()
