"""The `spread` pick (ipam.pick): which address a call gets, that a small pool still fills
completely, and that a mixed fleet (lowest and spread, several hosts) stays duplicate-free.

Unit tier on MemKV first, then real Consul with real plugin processes."""

from __future__ import annotations

import ipaddress
import json
import time
from collections import Counter
from typing import Any

import pytest
from ipam_da_consul.allocator.allocate import Allocator, Attachment
from ipam_da_consul.allocator.cache import PoolCache, list_pool, refreshed
from ipam_da_consul.allocator.errors import PoolFull
from ipam_da_consul.allocator.layout import Layout
from ipam_da_consul.allocator.pool import Held, Pool, parse_pool, spread_key
from ipam_da_consul.allocator.ranges import IPRange, sorted_ints
from ipam_da_consul.allocator.schemas import load_ranges
from ipam_da_consul.allocator.store import KVEntry
from ipam_da_consul.consul import ConsulClient, ConsulKV, Deadline

from tests.memkv import MemKV
from tests.util_procs import Call, run_many

V4 = [
    {
        "subnet": "10.1.0.0/24",
        "rangeStart": "10.1.0.10",
        "rangeEnd": "10.1.0.40",
        "gateway": "10.1.0.20",
        "exclude": ["10.1.0.24/30", "10.1.0.33"],
    }
]


def brute_free(rng: IPRange, taken: set[int]) -> list[int]:
    return [
        i
        for i in range(int(rng.start), int(rng.end) + 1)
        if i not in taken and rng.allocatable(ipaddress.ip_address(i))
    ]


def held(ip: str) -> Held:
    return Held(ipaddress.ip_address(ip), "x", f"ipam/p/{ip}", 1)


@pytest.mark.parametrize("seed", range(12))
def test_nth_free_numbers_the_free_addresses_in_order(seed):
    import random

    r = random.Random(seed)
    rng = load_ranges(json.dumps(V4).encode())[0]
    # Keys anywhere, including on the gateway, exclusions and outside the range.
    base = int(ipaddress.ip_address("10.1.0.0"))
    taken = {base + r.randrange(0, 60) for _ in range(r.randrange(0, 40))}
    ints = sorted(taken)
    free = brute_free(rng, taken)
    assert rng.free_count(ints) == len(free)
    for n, want in enumerate(free):
        assert int(rng.nth_free(ints, n)) == want
    assert rng.nth_free(ints, len(free)) is None


def test_nth_free_in_a_v6_64_is_cheap():
    net, gw = ipaddress.ip_network("fd00:20::/64"), ipaddress.ip_address("fd00:20::1")
    rng = IPRange.build(net, gateway=gw)
    taken = sorted_ints([ipaddress.ip_address(f"fd00:20::{i:x}") for i in range(2, 5000)], 6)
    assert rng.free_count(taken) == 2**64 - 1 - 1 - len(taken)
    assert str(rng.nth_free(taken, 0)) == "fd00:20::1388"
    assert str(rng.nth_free(taken, 2**64 - 5000 - 1)) == "fd00:20::ffff:ffff:ffff:ffff"


def test_spread_takes_free_number_key_mod_free_across_ranges():
    ranges = load_ranges(
        json.dumps(
            [
                {"subnet": "10.2.0.0/29"},  # .1 .. .6
                {"subnet": "10.3.0.0/29"},
            ]
        ).encode()
    )
    pool = Pool("p", ranges, {h.ip: h for h in map(held, ["10.2.0.1", "10.2.0.3", "10.3.0.2"])})
    free = [
        "10.2.0.2",
        "10.2.0.4",
        "10.2.0.5",
        "10.2.0.6",
        "10.3.0.1",
        "10.3.0.3",
        "10.3.0.4",
        "10.3.0.5",
        "10.3.0.6",
    ]
    for key in range(30):
        assert str(pool.next_free(key)[0]) == free[key % len(free)]
    assert str(pool.next_free()[0]) == "10.2.0.2"  # lowest, the default


def test_spread_key_is_a_pure_function_of_the_call():
    k = spread_key("node-1", "net", "c1", "eth0", "blue")
    assert k == spread_key("node-1", "net", "c1", "eth0", "blue")
    assert k != spread_key("node-2", "net", "c1", "eth0", "blue")
    assert 0 <= k < 2**64


def allocator(kv: MemKV, host: str, cid: str) -> Allocator:
    return Allocator(kv, Layout(), host, attachment=Attachment("net", cid, "eth0"), call=cid)


def setup_pool(kv: MemKV, ranges: list[dict[str, object]]) -> None:
    kv.put("ipam/p", json.dumps(ranges).encode())
    kv.put("ipam/p/", b"")


def claim_next(a: Allocator, pool: Pool, key: int | None) -> str | None:
    ip, _, over = pool.reserve_next_free(lambda ip: a.ours_to_be(pool, ip), key)
    return str(ip) if a.claim(pool, ip, over).won else None


def add(kv: MemKV, host: str, cid: str, spread: bool) -> str:
    a = allocator(kv, host, cid)
    for _ in range(200):
        key = spread_key(host, "net", cid, "eth0", "p") if spread else None
        got = claim_next(a, a.load("p"), key)
        if got is not None:
            return got
    raise AssertionError("never won")


def test_small_pool_fills_completely_with_spread():
    kv = MemKV()
    setup_pool(kv, V4)
    rng = load_ranges(json.dumps(V4).encode())[0]
    capacity = rng.size()
    got = [add(kv, f"h{i % 3}", f"c{i}", spread=True) for i in range(capacity)]
    assert len(set(got)) == capacity
    assert {int(ipaddress.ip_address(g)) for g in got} == set(brute_free(rng, set()))
    with pytest.raises(PoolFull):
        add(kv, "h0", "one-too-many", spread=True)


def test_stale_views_lose_at_most_one_write_each_and_never_duplicate():
    """Eight hosts pick from one listing each (a burst), in spread mode and in lowest mode:
    writes per successful ADD are what the Raft index would count."""
    results = {}
    for spread in (False, True):
        kv = MemKV()
        setup_pool(kv, [{"subnet": "10.5.0.0/24"}])
        views = {f"h{i}": allocator(kv, f"h{i}", "x").load("p") for i in range(8)}
        start = kv.writes
        won: list[str] = []
        for round_ in range(6):
            for host, pool in views.items():
                cid = f"{host}-{round_}"
                a = allocator(kv, host, cid)
                key = spread_key(host, "net", cid, "eth0", "p") if spread else None
                while (got := claim_next(a, pool, key)) is None:
                    pass
                won.append(got)
        assert len(set(won)) == len(won) == 48
        results[spread] = (kv.writes - start) / len(won)
    assert results[True] <= 1.3 < results[False], results


def test_mixed_fleet_in_memory_is_duplicate_free():
    kv = MemKV()
    setup_pool(kv, [{"subnet": "10.6.0.0/28"}])  # 14 addresses
    got = [add(kv, f"h{i % 2}", f"m{i}", spread=bool(i % 2)) for i in range(14)]
    assert len(set(got)) == 14
    with pytest.raises(PoolFull):
        add(kv, "h0", "m-full", spread=False)


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
        watched = cache.pools[blue]
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


class StubWatchKV(MemKV):
    """MemKV with Consul's blocking-query shape: a scripted index per keys_after call."""

    def __init__(self, indexes: list[int]) -> None:
        super().__init__()
        self.indexes = indexes
        self.calls: list[tuple[str, int]] = []
        self.on_call: Any = None

    def keys_after(
        self, prefix: str, index: int = 0, wait_seconds: float = 0.0
    ) -> tuple[list[str], int]:
        self.calls.append((prefix, index))
        if self.on_call is not None:
            self.on_call()
        return [k for k in self.data if k.startswith(prefix)], self.indexes.pop(0)

    def list_after(
        self, prefix: str, index: int = 0, wait_seconds: float = 0.0
    ) -> tuple[list[KVEntry], int]:
        return self.list(prefix), 0


def test_watcher_starts_over_when_consuls_index_goes_backwards():
    kv = StubWatchKV([5, 7, 7])
    setup_pool(kv, [{"subnet": "10.6.1.0/24"}])
    kv.put("ipam/p/10.6.1.9", json.dumps({"target": "t"}).encode())
    layout = Layout()
    cache = PoolCache(lambda: kv, layout, refresh_interval=0.01)
    cache.get("p", lambda: (list_pool(kv, layout, "p")[0], 100))
    watched = cache.pools["p"]
    kv.on_call = lambda: len(kv.calls) >= 3 and watched.stopped.set()
    watched.join(10)
    # Blocking on the folder from 100; the answer 5 is lower: a fresh read from 0, then
    # blocking from the new index.
    assert kv.calls == [("ipam/p/", 100), ("ipam/p/", 0), ("ipam/p/", 7)]
    assert [str(ip) for ip in watched.pool.held] == ["10.6.1.9"]
