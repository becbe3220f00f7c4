"""DEL: raise the attachment's fence, then release every key of it in each pool.

The fence goes up first (connected -> fenced), so a write of this attachment still in flight
(a failed ADD's, whose reply was lost) can no longer apply; the listings after it see any that
did. A DEL that cannot reach Consul is journaled by the helper and redone later.
"""

from __future__ import annotations

import random

from loguru import logger

from ...allocator.errors import WriteConflict
from ...allocator.pool import Held
from .. import config
from ..env import REPLAY_BEFORE
from ..errors import CNIError, Code
from .base import PoolCommand

# A DEL also sweeps its network's expired fences about once in this many calls, so hosts whose
# runtime never calls GC (Podman) still keep the fence folder bounded.
SWEEP_EVERY = 32


class Del(PoolCommand):
    name = "DEL"
    held: list[Held]  # this pool's keys of ours, set by next_pool

    def at_connected(self) -> str:
        self.allocator.raise_fence("DEL")
        return "fence"

    def at_fenced(self) -> str:
        return self.next_pool_or_emit()

    def load(self, request: config.PoolRequest) -> None:
        self.held = self.our_keys(request.name)

    def our_keys(self, pool: str) -> list[Held]:
        """Every key of this attachment in the pool, from one listing read after the fence
        went up: prevResult's addresses, and any other (a leak, an older version's)."""
        found = self.allocator.scan(pool, lambda why: logger.warning("DEL skips: {}", why))
        ours = [h for h in found if self.allocator.owns(h)]
        before = self.session.inputs.environ.get(REPLAY_BEFORE)
        if before:
            # A DEL the helper journaled during an outage, redone now: a key its attachment
            # wrote after that DEL (a new ADD) is not the one the runtime deleted.
            newer = [h for h in ours if h.at is not None and h.at > float(before)]
            for h in newer:
                logger.warning("journaled DEL spares {}: written after that DEL", h.key)
            ours = [h for h in ours if h not in newer]
        return ours

    def at_pool_loaded(self) -> str:
        cached = self.cached_pool(self.current.name)
        cooldown = self.conf.reuse_after
        for held in self.held:
            if not self.allocator.release(held, reuse_after=cooldown):
                raise WriteConflict(f"could not release {held.key}: it kept changing under us")
            if cached is not None and cached.held.get(held.ip) is not None and not cooldown:
                cached.discard(held.ip)  # so this host's next ADD may have it at once
            logger.debug("released {}", held.key)
        if not self.held:
            logger.debug("pool {!r}: nothing of ours to release", self.current.name)
        return "release"

    def finish(self) -> None:
        if random.random() < 1 / SWEEP_EVERY:
            self.sweep_fences()

    def writing(self, state: str) -> bool:
        # The fence, and the releases once our keys are known.
        return state == "connected" or (state == "pool_loaded" and bool(self.held))

    def failed(self, error: CNIError) -> None:
        caches = self.session.inputs.caches
        journal = caches.journal if caches is not None else None
        inputs = self.session.inputs
        if (
            journal is not None
            and error.code == Code.TRY_AGAIN_LATER
            and journal.record(inputs.stdin, inputs.environ)
        ):
            # Still 11: a runtime that retries is welcome to; the helper redoes it either way.
            error.msg += "; the helper journaled this DEL and redoes it once Consul answers"
