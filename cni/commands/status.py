"""STATUS: could an ADD be served now? A leader answers, and every pool parses and has room.

It must see the real thing: no server the helper remembers, a fresh read of every pool. Any
failure but a wrong call (env, JSON, config) is "not ready" (50).
"""

from __future__ import annotations

from ...allocator.errors import PoolFull
from .. import config
from ..errors import INPUT_CODES, CNIError, Code
from ..stores import Caches
from .base import PoolCommand


class Status(PoolCommand):
    name = "STATUS"
    needs_1_1 = True

    @classmethod
    def as_error(cls, error: CNIError) -> CNIError:
        if error.code in INPUT_CODES:
            return error
        return CNIError(Code.NOT_READY, f"not ready to serve ADD: {error.msg}")

    @classmethod
    def known_server(cls, caches: Caches, settings: config.ConsulSettings) -> str | None:
        return None  # a leader check every time

    def at_pool_loaded(self) -> str:
        """The pool parses, has a free address, and at least `min_free` of them."""
        pool = self.pool
        pool.next_free()
        if self.conf.min_free:
            free = pool.free()
            if free < self.conf.min_free:
                raise PoolFull(
                    f"pool {pool.name!r} has {free} free address(es), fewer than "
                    f"ipam.min_free ({self.conf.min_free})"
                )
        return "assess"
