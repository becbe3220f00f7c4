"""Pools kept in memory between calls, for the long-lived helper only.

A pool of 60,000 allocations takes a second to list and parse; a helper that keeps it and
refreshes it in the background makes an ADD cost the same at any pool size. The refresh is a
blocking query on the key names (a tenth of the bytes of a full listing) and reads only the
values of new keys; when the folder changed but no key came or went, a value was rewritten in
place (a take-over, a release cooling down), and the whole folder is read again.

A stale copy can never cause a duplicate: every write is still a compare-and-set on the
allocation key, a lost race re-reads that one key, and "pool full" is only said after a fresh
listing. It can only make an ADD pick a higher address than the lowest free one until the next
refresh lands (within `refresh_interval` plus Consul's answer time).

Memory is bounded: a pool leaves the cache when its watcher ends (idle, or an error), a cache
holds at most `max_pools` pools (least recently used evicted first), and the helper bounds the
number of caches and of pools across them (caches.py).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from loguru import logger

from ...allocator.layout import Layout
from ...allocator.pool import Held, Pool, key_ip, list_pool, parse_held, parse_pool
from ...allocator.ranges import IPAddress, IPRange
from ...allocator.store import KVEntry, WatchableKV
from ...allocator.stripes import MemoryHints, Stripe

# A kept copy: a pool, or one stripe of it (its key-name prefix inside the folder).
Key = tuple[str, str]

# How long each blocking query waits for a change (Consul adds up to 1/16 of jitter).
_WAIT = 30.0
# How long a watcher keeps one client (connection, chosen server) before making a new one.
_RENEW_KV_AFTER = 300.0
# Past this many new keys in one refresh, one full listing is cheaper than a read per key.
_READ_ONE_BY_ONE = 200


class PoolCache(MemoryHints):
    def __init__(
        self,
        make_kv: Callable[[], WatchableKV],
        layout: Layout,
        refresh_interval: float = 1.0,
        idle_after: float = 600.0,
        max_pools: int = 64,
        on_load: Callable[[], None] | None = None,
    ) -> None:
        self.make_kv = make_kv
        self.layout = layout
        self.refresh_interval = refresh_interval
        self.idle_after = idle_after
        self.max_pools = max_pools
        # Told after a pool was added, outside this cache's lock, so the owner can bound the
        # pools of all its caches together.
        self.on_load = on_load
        super().__init__()  # stripe hints, for this way of reaching Consul
        self.lock = threading.Lock()
        # Least recently used first.
        self.pools: OrderedDict[Key, _Watched] = OrderedDict()
        self.closed = False

    def get(
        self,
        name: str,
        load: Callable[[], tuple[Sequence[KVEntry], int]],
        view: Stripe | None = None,
    ) -> Pool:
        """The cached pool (or stripe of it: `view`); the first call for it loads it with
        `load` and starts a watcher."""
        key = (name, view.prefix if view is not None else "")
        with self.lock:
            watched = self.pools.get(key)
            if watched is not None and watched.alive():
                watched.used = time.monotonic()
                self.pools.move_to_end(key)
                return watched.pool
        entries, index = load()
        # Raises if missing or broken.
        pool = parse_pool(self.layout, name, entries, view=view).cache_copy()
        evicted: list[_Watched] = []
        with self.lock:
            if self.closed:
                # Evicted while this call was loading: serve it, but start nothing nobody
                # would ever stop or count.
                return pool
            watched = self.pools.get(key)
            added = watched is None or not watched.alive()
            if added:
                watched = _Watched(self, key, pool, index)
                self.pools[key] = watched
                self.pools.move_to_end(key)
                watched.start()
                while len(self.pools) > self.max_pools:
                    evicted.append(self.pools.popitem(last=False)[1])
            assert watched is not None
        for old in evicted:
            old.stopped.set()
        if added and self.on_load is not None:
            self.on_load()
        return watched.pool

    def peek(self, name: str, ip: IPAddress | None = None) -> Pool | None:
        """The cached copy of the whole pool, or (with `ip`) the copy that knows who holds
        `ip` (the pool's, or its stripe's), if watched and alive; never loads, and does not
        count as a use."""
        with self.lock:
            found = [w for (n, _), w in self.pools.items() if n == name and w.alive()]
        for watched in found:
            if (ip is None and watched.pool.view is None) or (
                ip is not None and watched.pool.seen(ip)
            ):
                return watched.pool
        return None

    def ranges(self, name: str) -> list[IPRange] | None:
        """The pool's ranges as a watched copy has them (each watcher follows the pool key)."""
        with self.lock:
            found = [w for (n, _), w in self.pools.items() if n == name and w.alive()]
        return found[0].pool.ranges if found else None

    def close(self) -> None:
        """Stop every watcher and hold nothing more: this cache was evicted."""
        with self.lock:
            self.closed = True
            gone = list(self.pools.values())
            self.pools.clear()
        for watched in gone:
            watched.stopped.set()

    def oldest_use(self) -> float | None:
        """When the least recently used pool was last used (None when empty)."""
        with self.lock:
            first = next(iter(self.pools.values()), None)
            return None if first is None else first.used

    def evict_oldest(self) -> None:
        with self.lock:
            if not self.pools:
                return
            _, watched = self.pools.popitem(last=False)
        watched.stopped.set()

    def __len__(self) -> int:
        return len(self.pools)

    def _ended(self, watched: _Watched) -> None:
        # Only this watcher's own entry: a newer watcher may already serve the key.
        with self.lock:
            if self.pools.get(watched.key) is watched:
                del self.pools[watched.key]


class _Watched(threading.Thread):
    def __init__(self, cache: PoolCache, key: Key, pool: Pool, index: int) -> None:
        super().__init__(name=f"watch-{key[0]}{'/' + key[1] if key[1] else ''}", daemon=True)
        self.cache = cache
        self.key = key
        self.pool_name, self.within = key
        self.pool = pool
        self.index = index
        self.used = time.monotonic()
        self.stopped = threading.Event()

    def alive(self) -> bool:
        return self.is_alive() and not self.stopped.is_set()

    def run(self) -> None:
        try:
            self.watch()
        finally:
            self.stopped.set()
            # A pool nobody refreshes must not stay in memory: the next call reloads it.
            self.cache._ended(self)

    def watch(self) -> None:
        layout = self.cache.layout
        # The folder, not the prefix `<prefix><pool>`: churn in `blue-v6` must not wake `blue`;
        # and of a stripe, only its keys: writes elsewhere in the pool wake nobody here.
        folder = layout.folder(self.pool_name) + self.within
        # One KV for many rounds: one kept-alive connection, and the server found with a leader
        # once, not one client (a TCP connect and a leader check) per round. Renewed every few
        # minutes, so a watcher that failed over goes back to the first-listed server (the
        # local agent) once it is back, and the leader is checked again.
        kv: WatchableKV | None = None
        born = 0.0
        backoff = 0.0
        try:
            while not self.stopped.is_set():
                if time.monotonic() - self.used > self.cache.idle_after:
                    return
                try:
                    if kv is None or time.monotonic() - born > _RENEW_KV_AFTER:
                        if kv is not None:
                            kv.close()
                        kv, born = self.cache.make_kv(), time.monotonic()
                    keys, index = kv.keys_after(folder, self.index, _WAIT)
                    started = time.monotonic()
                    self.index = self.refresh(kv, folder, keys, index)
                except Exception as exc:  # the next call reloads the pool itself, and says why
                    logger.warning("stopped watching pool {!r}: {}", self.pool_name, exc)
                    return
                if index > 0:
                    backoff = 0.0
                else:
                    # No X-Consul-Index (0 or absent): nothing to block on, so every query
                    # would return at once. Consul's docs call it a bug; poll ever less often,
                    # up to the blocking wait, until an index comes back.
                    if not backoff:
                        logger.warning(
                            "Consul sent no X-Consul-Index for pool {!r}: polling, backing off",
                            self.pool_name,
                        )
                    backoff = min(_WAIT, max(self.cache.refresh_interval, 2 * backoff))
                # Under churn every write wakes the query: keep refreshing a large pool from
                # eating the CPU that calls need, at most a fifth of the time.
                spent = time.monotonic() - started
                self.stopped.wait(max(self.cache.refresh_interval, 4 * spent, backoff))
        finally:
            if kv is not None:
                kv.close()

    def refresh(self, kv: WatchableKV, folder: str, keys: list[str], index: int) -> int:
        """The copy brought up to date with a round's answer (the folder's key names at Consul's
        `index`); the index to watch from next."""
        layout = self.cache.layout
        if 0 < index < self.index:
            # Consul's index went backwards (a restored snapshot, a new cluster): its
            # blocking-query docs say to start over from 0; the refresh re-reads all.
            keys, index = kv.keys_after(folder)
            self.pool = refreshed(layout, self.pool, keys, kv, forget=True)
        elif index != self.index or index == 0:
            # (Without an index, only the key names can tell what changed.)
            self.pool = refreshed(layout, self.pool, keys, kv, moved=index != 0)
        else:
            # A quiet folder: the ranges alone may have changed (`admin create --force`); one
            # small read per wait notices it.
            entry = kv.get(layout.pool_key(self.pool_name))
            if entry is None or entry.modify_index != self.pool.ranges_index:
                self.pool = refreshed(layout, self.pool, keys, kv, moved=False)
        return index


def refreshed(
    layout: Layout, old: Pool, keys: list[str], kv: WatchableKV, forget: bool = False,
    moved: bool = True,
) -> Pool:
    """A new Pool from the key names in the pool's folder: known allocations are kept (unless
    `forget`), new keys are read one by one (or all at once when there are many), the ranges
    are re-read. `moved`: the folder's index changed. When no key came or went, a value was
    then rewritten in place (a take-over, a release cooling down, a key deleted and made again):
    names cannot tell which, so every value is read again."""
    within = old.view.prefix if old.view is not None else ""
    folder = layout.folder(old.name)
    names = {k for k in keys if k.startswith(folder + within) and k != folder}
    before = old.snapshot()
    known = {} if forget else {h.key: h for h in before if h.key in names}
    new = sorted(names - known.keys())
    # Unless a call of this helper changed the copy meanwhile: then the names agreeing with the
    # copy is what its own write (or a key it re-read) explains, and reading every value of
    # the folder after each of this host's writes would cost more than the wake itself.
    in_place = moved and not new and len(known) == len(before) and not old.touched
    # A name is judged before it is read by: `<pool>/../../secret/x` is a GET of `secret/x`
    # once the URL is cleaned. Such a key fails the pool (InvalidPool, as a listing of it does
    # in-process): the watcher stops, and the next call reloads the pool and says why.
    for key in new:
        key_ip(key, folder)
    if len(new) > _READ_ONE_BY_ONE or in_place:
        entries, _ = list_pool(kv, layout, old.name, within)
        return parse_pool(layout, old.name, entries, known=known, view=old.view).cache_copy()
    return _with_new_keys(layout, old, kv, new, known)


def _with_new_keys(
    layout: Layout, old: Pool, kv: WatchableKV, new: list[str], known: dict[str, Held]
) -> Pool:
    """The pool's ranges read again, the `known` allocations kept, the `new` keys read one by
    one."""
    folder = layout.folder(old.name)
    ranges = kv.get(layout.pool_key(old.name))
    # Raises for missing or broken ranges.
    pool = parse_pool(layout, old.name, [ranges] if ranges else [], view=old.view)
    for key in new:
        entry = kv.get(key)
        if entry is not None:
            # Judged as soon as it is read, so no more than one value too large to keep is
            # ever held (allocator/schemas.py MAX_ALLOCATION_BYTES).
            pool.put(parse_held(entry, folder))
    for held in known.values():
        pool.held.setdefault(held.ip, held)
    pool.touched = False  # what the watcher itself read
    return pool.cache_copy()
