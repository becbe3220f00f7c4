"""Pools kept in memory between calls, for the long-lived helper only.

A pool of 60,000 allocations takes a second to list and parse; a helper that keeps it and
refreshes it in the background makes an ADD cost the same at any pool size. A stale copy can
never cause a duplicate: every write is still a compare-and-set on the allocation key, and a lost
race re-reads that one key. It can only make an ADD pick a higher address than the lowest free
one until the next refresh lands (within `refresh_interval` plus Consul's answer time).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol

from loguru import logger

from .layout import Layout
from .pool import Pool, parse_pool
from .store import KVEntry


class WatchableKV(Protocol):
    def list_after(self, prefix: str, index: int, wait_seconds: float) -> tuple[list[KVEntry], int]:
        """A listing that returns once the prefix changes after `index`, or after the wait."""


class PoolCache:
    def __init__(
        self,
        make_kv: Callable[[], WatchableKV],
        layout: Layout,
        refresh_interval: float = 1.0,
        idle_after: float = 600.0,
    ) -> None:
        self.make_kv = make_kv
        self.layout = layout
        self.refresh_interval = refresh_interval
        self.idle_after = idle_after
        self.lock = threading.Lock()
        self.pools: dict[str, _Watched] = {}

    def get(self, name: str, load: Callable[[], tuple[list[KVEntry], int]]) -> Pool:
        """The cached pool; the first call for a pool loads it with `load` and starts a watcher."""
        with self.lock:
            watched = self.pools.get(name)
        if watched is not None and watched.alive():
            watched.used = time.monotonic()
            return watched.pool
        entries, index = load()
        pool = parse_pool(self.layout, name, entries)  # raises for a missing or broken pool
        with self.lock:
            watched = self.pools.get(name)
            if watched is None or not watched.alive():
                watched = _Watched(self, name, pool, index)
                self.pools[name] = watched
                watched.start()
        return watched.pool

    def forget(self, name: str) -> None:
        with self.lock:
            watched = self.pools.pop(name, None)
        if watched is not None:
            watched.stopped.set()


class _Watched(threading.Thread):
    def __init__(self, cache: PoolCache, name: str, pool: Pool, index: int) -> None:
        super().__init__(name=f"watch-{name}", daemon=True)
        self.cache = cache
        self.pool_name = name
        self.pool = pool
        self.index = index
        self.used = time.monotonic()
        self.stopped = threading.Event()

    def alive(self) -> bool:
        return self.is_alive() and not self.stopped.is_set()

    def run(self) -> None:
        kv = self.cache.make_kv()
        prefix = self.cache.layout.pool_key(self.pool_name)
        while not self.stopped.is_set():
            if time.monotonic() - self.used > self.cache.idle_after:
                break
            try:
                entries, index = kv.list_after(prefix, self.index, 30.0)
                if index != self.index:
                    self.pool = refreshed(self.cache.layout, self.pool, entries)
                    self.index = index
            except Exception as exc:  # the next call reloads the pool itself
                logger.warning("stopped watching pool {!r}: {}", self.pool_name, exc)
                break
            self.stopped.wait(self.cache.refresh_interval)  # bound the refresh rate under churn
        self.stopped.set()


def refreshed(layout: Layout, old: Pool, entries: list[KVEntry]) -> Pool:
    """A new Pool from a listing, reusing parsed allocations whose ModifyIndex is unchanged."""
    return parse_pool(layout, old.name, entries, known={h.key: h for h in old.held.values()})
