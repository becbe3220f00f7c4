"""What the helper keeps between calls, per way of reaching Consul: a pool cache (cache.py),
the server that last answered, and the state folder with its replay thread (journal.py). The
state machine reads it through the calls it makes (recent_server, remember_server, get, peek,
takes_over_dels); nothing here imports the machine, nor the Consul client: the KV a watcher
reads with is made by `make_kv` (cni/compose.py watch_kv, from cli.py).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from ...consul.urls import shown_url

if TYPE_CHECKING:
    from ...allocator.layout import Layout
    from ...allocator.store import WatchableKV
    from ..config import ConsulSettings
    from ..state import StateDir
    from .cache import PoolCache
    from .journal import Replayer


class PoolCaches:
    """What the helper keeps warm per way of reaching Consul (servers, token, TLS, datacenter,
    prefix): a PoolCache, and the server that last answered with a leader.

    Bounded, because the settings include the ACL token and every token gets its own copy of
    the pools it reads (sharing one would show a token what only another may read): at most
    `max_settings` caches and `max_pools` pools across them, least recently used evicted first
    (their watchers stopped)."""

    def __init__(
        self,
        refresh_interval: float,
        server_memory: float = 2.0,
        max_settings: int = 8,
        max_pools: int = 64,
        *,
        make_kv: Callable[[ConsulSettings], WatchableKV],
    ) -> None:
        self.refresh_interval = refresh_interval
        # The helper's reads Consul (cni/compose.py watch_kv); tests give a stand-in.
        self.make_kv = make_kv
        self.server_memory = server_memory
        self.max_settings = max_settings
        self.max_pools = max_pools
        self.lock = threading.Lock()
        self.bounding = threading.Lock()
        # Least recently used first, both.
        self.caches: OrderedDict[Any, PoolCache] = OrderedDict()
        self.servers: OrderedDict[Any, tuple[str, float]] = OrderedDict()
        # The host's state folder (cni/state.py), shared with in-process calls; None: calls
        # keep their writes in memory only.
        self.state: StateDir | None = None
        # Whether a DEL that cannot reach Consul is kept in its entry and answered done.
        self.takes_over_dels = False
        # Finishes what entries still owe (journal.py).
        self.replayer: Replayer | None = None

    def recent_server(self, settings: ConsulSettings) -> str | None:
        """The server a call used successfully within `server_memory` seconds, if any: it skips
        one leader check per call; a failure there still goes through the full server choice."""
        with self.lock:
            seen = self.servers.get(_hashable(settings))
        if seen is None or time.monotonic() - seen[1] > self.server_memory:
            return None
        return seen[0]

    def remember_server(self, settings: ConsulSettings, server: str) -> None:
        key, now = _hashable(settings), time.monotonic()
        with self.lock:
            self.servers[key] = (server, now)
            self.servers.move_to_end(key)
            # Calls that use no cache (DEL, CHECK) remember servers too: expired entries are
            # useless, and dropping them keeps one entry per recently used token at most.
            while self.servers:
                _, at = next(iter(self.servers.values()))
                if now - at <= self.server_memory and len(self.servers) <= 4 * self.max_settings:
                    break
                self.servers.popitem(last=False)

    def get(self, settings: ConsulSettings, layout: Layout) -> PoolCache:
        from .cache import PoolCache

        key = _hashable(settings)
        evicted: list[PoolCache] = []
        with self.lock:
            cache = self.caches.get(key)
            if cache is not None:
                self.caches.move_to_end(key)
                return cache
            cache = PoolCache(
                lambda: self.make_kv(settings),
                layout,
                self.refresh_interval,
                max_pools=self.max_pools,
                on_load=self.bound_pools,
            )
            self.caches[key] = cache
            while len(self.caches) > self.max_settings:
                old_key, old = self.caches.popitem(last=False)
                self.servers.pop(old_key, None)
                evicted.append(old)
        for old in evicted:
            old.close()
        return cache

    def peek(self, settings: ConsulSettings) -> PoolCache | None:
        """The cache for these settings if there is one; never creates it."""
        with self.lock:
            return self.caches.get(_hashable(settings))

    def bound_pools(self) -> None:
        """Evict the least recently used pools of all caches until at most `max_pools` remain."""
        with self.bounding:
            with self.lock:
                caches = list(self.caches.values())
            while sum(len(c) for c in caches) > self.max_pools:
                used = [(c.oldest_use(), c) for c in caches]
                candidates = [(t, c) for t, c in used if t is not None]
                if not candidates:
                    return
                min(candidates, key=lambda tc: tc[0])[1].evict_oldest()

    def pool_sizes(self) -> Iterator[tuple[str, str, str, int, int]]:
        """(servers, KV prefix, pool, allocations, capacity) of each live cached pool, least
        recently used cache first: what the metrics scrape shows. No token and no URL's password:
        never a label."""
        with self.lock:
            caches = list(self.caches.items())
        for key, cache in caches:
            servers, prefix = ",".join(map(shown_url, key[0])), key[6]
            with cache.lock:
                # Whole pools only: a stripe's copy (pick: stripe) knows a part of its pool,
                # whose totals `ipam-da-consul-admin usage --prometheus` gives.
                names = [name for name, within in cache.pools if not within]
            for name in names:
                pool = cache.peek(name)
                if pool is not None:
                    yield servers, prefix, name, len(pool.held), pool.capacity()

    def counts(self) -> dict[str, int]:
        """Cache sizes, and what the journal did (journal.py): `journal_taken_over` DELs kept
        to finish later, `journal_replayed` of them finished by the replay thread,
        `journal_voided` writes in doubt voided, `journal_expired` entries given up on (kept
        for `ipam-da-consul-admin journal`), `journal_pending` entries with work left now.
        Counters start at 0 with the helper; none without a state folder."""
        with self.lock:
            caches = list(self.caches.values())
            servers = len(self.servers)
        counts = {"caches": len(caches), "pools": sum(len(c) for c in caches), "servers": servers}
        if self.state is not None:
            counts["journal_taken_over"] = self.state.taken_over
            # A scrape must not fail over the folder: the gauge is left out then.
            with contextlib.suppress(OSError):
                counts["journal_pending"] = len(self.state.pending())
        if self.replayer is not None:
            counts.update(self.replayer.counts())
        return counts


def _hashable(settings: ConsulSettings) -> Any:
    return (
        tuple(settings.servers),
        settings.token,
        settings.ca_file,
        settings.cert_file,
        settings.key_file,
        settings.datacenter,
        settings.kv_prefix,
    )
