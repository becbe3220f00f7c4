"""pick=spread against a real Consul: listing by folder, the ranges index, a mixed fleet of
processes."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from ipam_da_consul.allocator.layout import Layout
from ipam_da_consul.allocator.pool import list_pool, parse_pool
from ipam_da_consul.cni.helper.cache import PoolCache, refreshed
from ipam_da_consul.consul import ConsulClient, ConsulKV, Deadline

from tests.support.util_procs import Call, run_many


# -- real Consul -------------------------------------------------------------------------------
def consul_kv(consul: Any) -> ConsulKV:
    return ConsulKV(ConsulClient([consul.url], deadline=Deadline(60)))


def test_a_pool_never_lists_another_that_shares_its_name_as_a_prefix(consul, make_pool):
    blue = make_pool([{"subnet": "10.7.0.0/24"}])
    other = make_pool([{"subnet": "10.8.0.0/24"}], name=f"{blue}-v6")
    for i in range(2, 42):
        consul.put(f"ipam/{other}/10.8.0.{i}", {"target": f"o{i}"})
    consul.put(f"ipam/{blue}/10.7.0.5", {"target": "b"})
    layout = Layout()
    entries, index = list_pool(consul_kv(consul), layout, blue)
    assert sorted(e.key for e in entries) == [
        f"ipam/{blue}",
        f"ipam/{blue}/",
        f"ipam/{blue}/10.7.0.5",
    ]
    assert index > 0
    assert list_pool(consul_kv(consul), layout, f"{blue}-missing") == ([], 0)
    # The helper's watcher blocks on the folder: churn in the other pool does not wake it.
    cache = PoolCache(lambda: consul_kv(consul), layout, refresh_interval=0.05)
    try:
        pool = cache.get(blue, lambda: list_pool(consul_kv(consul), layout, blue))
        watched = cache.pools[(blue, "")]
        before = watched.index
        for i in range(42, 52):
            consul.put(f"ipam/{other}/10.8.0.{i}", {"target": f"o{i}"})
        time.sleep(0.5)
        assert watched.index == before and cache.peek(blue) is pool
        consul.put(f"ipam/{blue}/10.7.0.6", {"target": "c"})
        end = time.monotonic() + 10
        while watched.index == before and time.monotonic() < end:
            time.sleep(0.05)
        current = cache.peek(blue)
        assert current is not None
        assert sorted(str(ip) for ip in current.held) == ["10.7.0.5", "10.7.0.6"]
    finally:
        cache.close()


def test_ranges_index_tells_the_watcher_the_ranges_changed(consul, make_pool):
    name = make_pool([{"subnet": "10.9.1.0/24"}])
    layout = Layout()
    kv = consul_kv(consul)
    pool = parse_pool(layout, name, list_pool(kv, layout, name)[0])
    keys, _ = kv.keys_after(layout.folder(name))
    consul.put(f"ipam/{name}", [{"subnet": "10.9.1.0/24", "rangeStart": "10.9.1.100"}])
    entry = kv.get(layout.pool_key(name))
    assert entry is not None and entry.modify_index != pool.ranges_index
    new = refreshed(layout, pool, keys, kv)
    assert str(new.next_free()[0]) == "10.9.1.100" and new.ranges_index == entry.modify_index


def test_mixed_fleet_of_processes_fills_a_small_pool_once(consul, make_pool, conf_for):
    """Old-style lowest pickers and spread pickers on two hosts, all at once, more callers than
    addresses: every address goes to exactly one container and the rest hear "full"."""
    pool = make_pool(
        [{"subnet": "10.9.2.0/24", "rangeStart": "10.9.2.10", "rangeEnd": "10.9.2.17"}]
    )
    calls = [
        Call(
            "ADD",
            f"mix-{i}",
            conf_for(pool, timeout=120, host=f"h{i % 2}", pick="spread" if i % 3 else "lowest"),
        )
        for i in range(12)
    ]
    done = run_many(calls)
    won = [d for d in done if d.rc == 0]
    assert len(won) == 8, [d.stdout for d in done]
    assert all(d.rc == 122 for d in done if d.rc != 0), [d.stdout for d in done]
    held = consul.allocations(pool)
    assert sorted(held) == [f"10.9.2.{i}" for i in range(10, 18)]
    assert {target: ip for ip, target in held.items()} == {d.call.container: d.address for d in won}
    assert Counter(held.values()).most_common(1)[0][1] == 1
