"""The composition root: the one place where the plugin's calls and the helper's watchers are
given Consul as their store. Everything else in cni/ works through the protocols of
cni/stores.py and allocator/store.py, and is handed what is built here: the entry points
(cni/main.py `execute`, the helper's cli.py and server.py, the operator CLI's journal retry)
pass `consul_store` to the machine and to cni/replay.py, and `watch_kv` to the helper's
caches. The layer contracts in pyproject.toml hold cni/ to this.

Importing it loads the Consul client (requests): the helper does that off its accepting
thread (server.preload).
"""

from __future__ import annotations

from collections.abc import Callable

from ..allocator.store import KV, WatchableKV
from ..consul import ConsulClient, ConsulKV, Deadline, Sent, build_client
from .config import ConsulSettings
from .stores import Store

# The time budget of each blocking query a pool watcher sends: its 30 s wait plus Consul's
# jitter.
WATCH_SECONDS = 120.0


class ConsulStore:
    """The default store: Consul's KV through one client, with its server choice and deadline."""

    def __init__(self, client: ConsulClient) -> None:
        self.client = client
        self.kv: KV = ConsulKV(client)
        self.deadline: Deadline = client.deadline

    @property
    def current(self) -> str | None:
        return self.client.current

    @property
    def requests_sent(self) -> int:
        return self.client.requests_sent

    def select(self) -> str:
        return self.client.select()

    def close(self) -> None:
        self.client.close()


def consul_store(
    settings: ConsulSettings,
    seconds: float,
    known_good: str | None,
    on_request: Callable[[Sent], None] | None = None,
) -> Store:
    """The store of one call (a cni.stores.StoreFactory); `on_request` hears of each request
    its client sends (the call's record, cni/events.py)."""
    return ConsulStore(build_client(settings, seconds, known_good, on_request))


class WatchKV(ConsulKV):
    """One per pool watcher, for its life. One client: one requests Session, so one kept-alive
    connection for every round, and the server it found with a leader is kept, so the leader
    check runs when the watcher starts or after a failure, never once per round. Each blocking
    query, with the reads of the round it starts, gets a fresh deadline of `seconds`.
    `on_request` hears of each request sent (the helper's metrics)."""

    def __init__(
        self,
        settings: ConsulSettings,
        seconds: float,
        on_request: Callable[[Sent], None] | None = None,
    ) -> None:
        super().__init__(build_client(settings, seconds, on_request=on_request))
        self.seconds = seconds

    def keys_after(
        self, prefix: str, index: int = 0, wait_seconds: float = 0.0
    ) -> tuple[list[str], int]:
        self.client.deadline = Deadline(self.seconds)
        return super().keys_after(prefix, index, wait_seconds)


def watch_kv(
    settings: ConsulSettings, on_request: Callable[[Sent], None] | None = None
) -> WatchableKV:
    """The KV one pool watcher reads with for its whole life (the helper's caches.py make_kv);
    `on_request` hears of each request it sends."""
    return WatchKV(settings, WATCH_SECONDS, on_request)
