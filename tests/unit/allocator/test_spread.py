"""The `spread` pick (ipam.pick): which address a call gets, that a small pool still fills
completely, and that a mixed fleet (lowest and spread, several hosts) stays duplicate-free.

Unit tier on MemKV; real Consul with real plugin processes in tests/e2e/test_spread.py."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ipam_da_consul.allocator.allocate import Allocator, Attachment
from ipam_da_consul.allocator.errors import PoolFull
from ipam_da_consul.allocator.layout import Layout
from ipam_da_consul.allocator.pool import Held, Pool, list_pool, spread_key
from ipam_da_consul.allocator.ranges import IPRange, sorted_ints
from ipam_da_consul.allocator.schemas import load_ranges
from ipam_da_consul.allocator.store import KVEntry
from ipam_da_consul.cni.helper.cache import PoolCache

from tests.support.memkv import MemKV
from tests.support.properties import examples

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
    ip, _ = pool.reserve_next_free(lambda ip: a.ours_to_be(pool, ip), key)
    return str(ip) if a.claim(pool, ip).won else None


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

    def close(self) -> None:
        pass  # no connection to let go


def test_watcher_starts_over_when_consuls_index_goes_backwards():
    kv = StubWatchKV([5, 7, 7])
    setup_pool(kv, [{"subnet": "10.6.1.0/24"}])
    kv.put("ipam/p/10.6.1.9", json.dumps({"target": "t"}).encode())
    layout = Layout()
    cache = PoolCache(lambda: kv, layout, refresh_interval=0.01)
    cache.get("p", lambda: (list_pool(kv, layout, "p")[0], 100))
    watched = cache.pools[("p", "")]
    kv.on_call = lambda: len(kv.calls) >= 3 and watched.stopped.set()
    watched.join(10)
    # Blocking on the folder from 100; the answer 5 is lower: a fresh read from 0, then
    # blocking from the new index.
    assert kv.calls == [("ipam/p/", 100), ("ipam/p/", 0), ("ipam/p/", 7)]
    assert [str(ip) for ip in watched.pool.held] == ["10.6.1.9"]


@settings(max_examples=examples(150), deadline=None)
@given(
    st.lists(st.integers(0, 63), max_size=6),
    st.lists(
        st.tuples(st.sampled_from(["put", "discard", "pick"]), st.integers(0, 70)), max_size=40
    ),
)
def test_a_pools_spread_pick_follows_keys_coming_and_going(
    excluded: list[int], ops: list[tuple[str, int]]
) -> None:
    # The pool keeps, per range, the keys its exclusions and reserved addresses hold up to date
    # as keys come and go; every pick must number the free addresses as a fresh count does.
    base = int(ipaddress.ip_address("10.4.0.0"))
    wire = [
        {"subnet": "10.4.0.0/27", "gateway": "10.4.0.1",
         "exclude": [str(ipaddress.ip_address(base + e % 32)) for e in excluded if e < 32]},
        {"subnet": "10.4.0.32/27", "rangeStart": "10.4.0.34",
         "exclude": [str(ipaddress.ip_address(base + e)) for e in excluded if e >= 34]},
    ]
    ranges = load_ranges(json.dumps(wire).encode())
    pool = Pool("p", ranges)
    keys: set[int] = set()
    for op, offset in ops:
        value = base + offset
        if op == "put":
            pool.put(held(str(ipaddress.ip_address(value))))
            keys.add(value)
        elif op == "discard":
            pool.discard(ipaddress.ip_address(value))
            keys.discard(value)
        free = [a for rng in ranges for a in brute_free(rng, keys)]
        for key in (offset, offset * 7919, 2**63 + offset):
            if not free:
                with pytest.raises(PoolFull):
                    pool.next_free(key)
                continue
            assert int(pool.next_free(key)[0]) == free[key % len(free)]
