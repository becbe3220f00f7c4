"""STATUS: could an ADD be served now? A leader answers, and every pool parses and has room.

Runtimes poll it, so in the helper it costs one small request per pool while nothing changed:
a read of the pool key (served through the leader, so it proves one is there) whose
ModifyIndex matches the watched copy's ranges, and the watched copy for the rest (its watcher
follows every write with a blocking query). Anything else is a fresh read of the pool, and so
is "full" or "below min_free": like ADD, "no room" is only ever said after a fresh listing.
Any failure but a wrong call (env, JSON, config) is "not ready" (50).
"""

from __future__ import annotations

from loguru import logger

from ...allocator.errors import PoolFull
from ...allocator.pool import Pool
from .. import config
from ..errors import INPUT_CODES, CNIError, Code
from .base import PoolCommand


class Status(PoolCommand):
    name = "STATUS"
    needs_1_1 = True

    @classmethod
    def as_error(cls, error: CNIError) -> CNIError:
        if error.code in INPUT_CODES:
            return error
        return CNIError(Code.NOT_READY, f"not ready to serve ADD: {error.msg}")

    def at_parsed(self) -> str:
        if not self.todo:
            # No pool to read (behind ipam-delegated): the leader check is the whole answer,
            # so a server the helper remembers does not spare it.
            self.store.select()
        return super().at_parsed()

    def load(self, request: config.PoolRequest) -> None:
        self.pool = self.watched(request.name) or self.allocator.load(request.name)

    def watched(self, name: str) -> Pool | None:
        """The helper's watched copy, if its ranges are still Consul's (one read of the key)."""
        pool = self.cached_pool(name)
        if pool is None:
            return None
        entry = self.store.kv.get(self.allocator.layout.pool_key(name))
        if entry is None or entry.modify_index != pool.ranges_index:
            return None  # gone or rewritten: the fresh read says what it is now
        return pool

    def at_pool_loaded(self) -> str:
        """The pool parses, has a free address, and at least `min_free` of them."""
        try:
            self.assess(self.pool)
        except PoolFull:
            if not self.pool.cached:
                raise
            logger.debug("pool {!r}: the watched copy has no room, reading it", self.pool.name)
            self.pool = self.allocator.load(self.pool.name)
            self.assess(self.pool)
        return "assess"

    def assess(self, pool: Pool) -> None:
        # A watched copy is shared with the helper's concurrent ADDs and DELs, which change its
        # index of taken addresses in place under this lock.
        with pool.lock:
            pool.next_free()
            free = pool.free() if self.conf.min_free else 0
        if self.conf.min_free and free < self.conf.min_free:
            raise PoolFull(
                f"pool {pool.name!r} has {free} free address(es), fewer than "
                f"ipam.min_free ({self.conf.min_free})"
            )
