"""The helper's memory stays bounded: pools leave the cache when nobody refreshes them, and
the number of caches (one per Consul settings, token included) and of pools is capped, least
recently used evicted first. Unit level with a stand-in KV; the real helper process is in
tests/e2e/test_helper_memory.py."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable

from ipam_da_consul.allocator.layout import Layout
from ipam_da_consul.allocator.store import KVEntry
from ipam_da_consul.cni.config import ConsulSettings
from ipam_da_consul.cni.helper.cache import PoolCache
from ipam_da_consul.cni.helper.caches import PoolCaches

from tests.support.memkv import MemKV

RANGES = json.dumps([{"subnet": "10.1.0.0/24"}]).encode()


class FakeKV(MemKV):
    """Pools named in `pools` exist, each with its ranges only; a blocking query waits a little
    and reports no change. `broken` makes every query fail (the watcher's error path). The
    writes (never used) are MemKV's, which makes it a whole WatchableKV."""

    def __init__(self, pools: set[str] | None = None) -> None:
        super().__init__()
        self.pools = pools
        self.broken = threading.Event()
        self.loads: list[str] = []
        self.closed = 0

    def entries(self, name: str) -> list[KVEntry]:
        return [KVEntry(f"ipam/{name}", RANGES, 1), KVEntry(f"ipam/{name}/", b"", 1)]

    def load(self, name: str) -> Callable[[], tuple[list[KVEntry], int]]:
        def load() -> tuple[list[KVEntry], int]:
            self.loads.append(name)
            return self.entries(name), 1

        return load

    def get(self, key: str, consistent: bool = False) -> KVEntry | None:
        return KVEntry(key, RANGES, 1)

    def list_after(
        self, prefix: str, index: int = 0, wait_seconds: float = 0.0
    ) -> tuple[list[KVEntry], int]:
        return self.entries(prefix.removeprefix("ipam/")), 1

    def keys_after(
        self, prefix: str, index: int = 0, wait_seconds: float = 0.0
    ) -> tuple[list[str], int]:
        if self.broken.wait(0.02):
            raise RuntimeError("Consul went away")
        return [prefix, prefix + "/"], 1

    def close(self) -> None:
        self.closed += 1


def settings(token: str) -> ConsulSettings:
    return ConsulSettings(["http://127.0.0.1:1"], 1.0, 1.0, 5.0, token=token)


def gone(cache: PoolCache, name: str, within: float = 5.0) -> bool:
    end = time.monotonic() + within
    while (name, "") in cache.pools and time.monotonic() < end:
        time.sleep(0.01)
    return (name, "") not in cache.pools


def test_peek_never_loads_and_sees_only_live_pools():
    kv = FakeKV()
    cache = PoolCache(lambda: kv, Layout(), refresh_interval=0.01)
    assert cache.peek("a") is None and kv.loads == []
    pool = cache.get("a", kv.load("a"))
    assert cache.peek("a") is pool
    cache.pools[("a", "")].stopped.set()  # its watcher ends (idle, or an error)
    assert cache.peek("a") is None and kv.loads == ["a"]


def test_pool_leaves_the_cache_when_its_watcher_fails():
    kv = FakeKV()
    cache = PoolCache(lambda: kv, Layout(), refresh_interval=0.01)
    cache.get("a", kv.load("a"))
    kv.broken.set()
    assert gone(cache, "a")
    assert cache.peek("a") is None
    kv.broken.clear()
    cache.get("a", kv.load("a"))  # the next call loads it afresh
    assert kv.loads == ["a", "a"]
    cache.close()


def test_pool_leaves_the_cache_when_idle():
    kv = FakeKV()
    cache = PoolCache(lambda: kv, Layout(), refresh_interval=0.01, idle_after=0.2)
    cache.get("a", kv.load("a"))
    assert gone(cache, "a")
    deadline = time.monotonic() + 5
    while not kv.closed and time.monotonic() < deadline:
        time.sleep(0.01)
    assert kv.closed == 1  # the watcher let its connection go


def test_one_cache_keeps_its_most_recently_used_pools():
    kv = FakeKV()
    cache = PoolCache(lambda: kv, Layout(), refresh_interval=0.01, max_pools=3)
    kept = {n: cache.get(n, kv.load(n)) for n in "abc"}
    cache.get("a", kv.load("a"))  # a hit: "b" is now the least recently used
    watcher_b = cache.pools[("b", "")]
    cache.get("d", kv.load("d"))
    assert [name for name, _ in cache.pools] == ["c", "a", "d"]
    assert watcher_b.stopped.wait(5) and not watcher_b.alive()
    assert cache.peek("a") is kept["a"]
    cache.close()
    assert len(cache) == 0


def test_caches_are_per_token_and_capped():
    kv = FakeKV()
    caches = PoolCaches(0.01, max_settings=2, max_pools=64, make_kv=lambda s: kv)
    layout = Layout()
    first = caches.get(settings("t0"), layout)
    first.get("a", kv.load("a"))
    other = caches.get(settings("t1"), layout)
    assert other is not first
    assert other.peek("a") is None  # never another token's pool data
    caches.remember_server(settings("t0"), "http://s0")
    assert caches.recent_server(settings("t0")) == "http://s0"
    caches.get(settings("t1"), layout)  # t1 most recent: t0 goes next
    third = caches.get(settings("t2"), layout)
    assert caches.counts()["caches"] == 2
    assert caches.peek(settings("t0")) is None
    assert first.closed and len(first) == 0  # its watchers stopped
    assert caches.recent_server(settings("t0")) is None  # its remembered server forgotten
    # A call still holding the evicted cache is served, but nothing new is kept there.
    first.get("b", kv.load("b"))
    assert len(first) == 0
    assert caches.get(settings("t0"), layout) is not first
    third.close()


def test_pools_are_capped_across_caches_least_recently_used_first():
    kv = FakeKV()
    caches = PoolCaches(0.01, max_settings=8, max_pools=4, make_kv=lambda s: kv)
    layout = Layout()
    order = []
    for t in range(3):
        cache = caches.get(settings(f"t{t}"), layout)
        for name in ("a", "b"):
            cache.get(name, kv.load(name))
            order.append((t, name))
            time.sleep(0.002)  # distinct use times
    counts = caches.counts()
    assert counts["pools"] == 4, counts
    # The two oldest, both of t0, were evicted.
    assert len(caches.peek(settings("t0"))) == 0
    assert len(caches.peek(settings("t1"))) == 2 and len(caches.peek(settings("t2"))) == 2
    for t in range(3):
        caches.peek(settings(f"t{t}")).close()


def test_remembered_servers_expire():
    caches = PoolCaches(0.01, server_memory=0.05, make_kv=lambda s: FakeKV())
    for t in range(50):
        caches.remember_server(settings(f"t{t}"), "http://s")
    assert caches.counts()["servers"] <= 4 * caches.max_settings
    time.sleep(0.1)
    caches.remember_server(settings("last"), "http://s")
    assert caches.counts()["servers"] == 1
