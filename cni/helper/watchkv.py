"""The KV a pool watcher reads Consul with. Imported when the first pool is watched: it needs
the Consul client, which the helper loads off its accepting thread (server.preload).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ...consul import ConsulKV, Deadline
from ..machine import consul_client

if TYPE_CHECKING:
    from ...consul import Sent
    from ..config import ConsulSettings


class WatchKV(ConsulKV):
    """One per pool watcher, for its life. One client: one requests Session, so one kept-alive
    connection for every round, and the server it found with a leader is kept, so the leader
    check runs when the watcher starts or after a failure, never once per round. Each blocking
    query, with the reads of the round it starts, gets a fresh `budget`."""

    def __init__(
        self,
        settings: ConsulSettings,
        budget: float,
        on_request: Callable[[Sent], None] | None = None,
    ) -> None:
        super().__init__(consul_client(settings, budget, on_request=on_request))
        self.budget = budget

    def keys_after(
        self, prefix: str, index: int = 0, wait_seconds: float = 0.0
    ) -> tuple[list[str], int]:
        self.client.deadline = Deadline(self.budget)
        return super().keys_after(prefix, index, wait_seconds)

    def close(self) -> None:
        self.client.close()
