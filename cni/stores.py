"""What one call needs from outside itself, as protocols: a store to reach (Consul's is built
in cni/compose.py; the unit tier hands the machine one over an in-memory KV) and, in the
long-lived helper, what it keeps between calls.

A leaf module: cni.machine and cni/commands depend on these shapes, never on the helper or on
Consul (pyproject.toml's layer contracts hold them to it), so either can change without the
machine importing any of it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from ..allocator.allocate import CachedPools
from ..allocator.stripes import StripeHints

if TYPE_CHECKING:
    from ..allocator.layout import Layout
    from ..allocator.pool import Pool
    from ..allocator.ranges import IPAddress
    from ..allocator.store import KV
    from .config import ConsulSettings
    from .events import Request


class Deadline(Protocol):
    """When the call's work must be over (consul.Deadline): `end` (monotonic) is moved to hand
    the rollback its reserve."""

    end: float

    def expired(self) -> bool: ...

    def sleep(self, seconds: float) -> None: ...


class Store(Protocol):
    """Where one call reads and writes: a KV with compare-and-set, and the server it uses."""

    @property
    def kv(self) -> KV: ...

    @property
    def deadline(self) -> Deadline: ...

    @property
    def current(self) -> str | None:
        """The server in use (one with a leader); None until one is selected."""

    @property
    def requests_sent(self) -> int: ...

    def select(self) -> object:
        """Choose a server with a leader (ConsulUnavailable when none answers in time)."""

    def close(self) -> None: ...


class StoreFactory(Protocol):
    """Opens the call's store: the settings, the seconds the work may take (its deadline), a
    server the helper saw with a leader moments ago (None: choose one), and who to tell of each
    request the store sends (None: nobody)."""

    def __call__(
        self,
        settings: ConsulSettings,
        seconds: float,
        known_good: str | None,
        on_request: Callable[[Request], None] | None,
        /,
    ) -> Store: ...


class PoolCache(CachedPools, StripeHints, Protocol):
    """One Consul's pools as the helper keeps them (cni/helper/cache.py), and where this host
    last found room in each."""

    def peek(self, name: str, ip: IPAddress | None = None) -> Pool | None:
        """The kept copy of a pool (with `ip`: the copy, of the pool or of a stripe, that knows
        who holds it), never loading one."""


class Caches(Protocol):
    """What the helper keeps warm between calls (cni/helper/caches.py PoolCaches)."""

    @property
    def takes_over_dels(self) -> bool:
        """Whether a DEL that cannot reach Consul is kept, to finish later, and answered done."""

    def recent_server(self, settings: ConsulSettings) -> str | None: ...

    def remember_server(self, settings: ConsulSettings, server: str) -> None: ...

    def get(self, settings: ConsulSettings, layout: Layout) -> PoolCache: ...

    def peek(self, settings: ConsulSettings) -> PoolCache | None: ...
