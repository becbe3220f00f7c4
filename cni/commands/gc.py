"""GC: release this network's allocations on this host whose attachment the runtime no longer
has. Runtimes call GC once per network with that network's attachments, so a key of another
network, another host, or with no network recorded is never touched.

GC keeps going past a pool it cannot read or a key it cannot release, and reports them all.
"""

from __future__ import annotations

from loguru import logger

from ...allocator.allocate import Attachment
from ...allocator.errors import AllocatorError, PoolMissing
from ...allocator.pool import Held
from ...allocator.schemas import COOLING_UNTIL_DELETED
from ...allocator.store import StoreError, StoreUnavailable
from .. import config
from ..errors import CNIError, Code
from .base import PoolCommand, Session


class Gc(PoolCommand):
    name = "GC"
    needs_1_1 = True
    held: list[Held]  # this pool's readable allocations, set by next_pool

    def __init__(self, session: Session) -> None:
        super().__init__(session)
        self.problems: list[str] = []
        # The attachments the runtime still has, and their containers.
        self.valid = set(session.conf.valid_attachments or [])
        self.containers = {cid for cid, _ in self.valid}

    def load(self, request: config.PoolRequest) -> None:
        self.held = self.scan(request.name)

    def scan(self, name: str) -> list[Held]:
        """The pool's readable allocations. A pool that is missing or cannot be read is a
        problem to report at the end, not a reason to skip the other pools."""
        try:
            held = self.allocator.scan(name, self.problems.append, consistent=True)
            # An empty listing cannot tell "no allocations" from "no such pool"; the pool key can.
            if not held and self.allocator.kv.get(self.allocator.layout.pool_key(name)) is None:
                raise PoolMissing(f"pool {name!r} does not exist")
        except StoreUnavailable:
            raise  # no server left: the other pools cannot be read either
        except (AllocatorError, StoreError) as exc:
            self.problems.append(str(exc))
            return []
        return held

    def at_pool_loaded(self) -> str:
        for held in self.held:
            if not self.collects(held):
                continue
            if held.cooling:
                self.hand_over(held)
            elif not self.still_attached(held):
                self.collect(held)
        return "collect"

    def still_attached(self, held: Held) -> bool:
        """Whether the runtime still has `held`'s attachment. A key that records no interface
        (an older version's) cannot name one: it is kept while its container has any."""
        if held.ifname is None:
            return held.target in self.containers
        return (held.target, held.ifname) in self.valid

    def collects(self, held: Held) -> bool:
        """Whether `held` is this GC's to look at: this host's, of this network (a key another
        host wrote, another network's, an older version's or a tool's, which record none, is
        never touched)."""
        return bool(self.conf.name) and held.host == self.allocator.host and (
            held.network == self.conf.name
        )

    def hand_over(self, held: Held) -> None:
        """An older version's release, cooling down until a time by its writer's clock: from
        now on Consul ends it (or, without a cool-down, it goes). The plugin's own releases are
        left to their session."""
        if held.free_after != COOLING_UNTIL_DELETED and self.allocator.adopt_release(held):
            logger.debug("GC handed {} to a cool-down session", held.key)

    def collect(self, held: Held) -> None:
        """Release a key whose attachment the runtime no longer has, its fence raised first; a
        problem is reported at the end, and the other keys are still looked at."""
        allocator, conf = self.allocator, self.conf
        try:
            allocator.raise_fence("GC", Attachment(conf.name, held.target, held.ifname))
            if allocator.release(held, cool=conf.reuse_after > 0):
                logger.debug("GC released {} (container {!r})", held.key, held.target)
            else:
                self.problems.append(f"{held.key} kept changing; not released")
        except StoreUnavailable:
            raise
        except StoreError as exc:
            self.problems.append(f"{held.key}: {exc}")

    def finish(self) -> None:
        if self.problems:
            raise CNIError(
                Code.KV_WRITE_FAILED, "GC finished with problems: " + "; ".join(self.problems)
            )

    def writing(self, state: str) -> bool:
        return state == "pool_loaded" and bool(self.held)
