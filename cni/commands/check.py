"""CHECK: each prevResult address inside a pool's ranges is still this attachment's key.

Reads only the pool's ranges and the keys of those addresses, never the whole folder.
"""

from __future__ import annotations

from ...allocator.errors import AllocationMissing
from .. import config
from ..errors import CNIError, Code
from .base import PoolCommand


class Check(PoolCommand):
    name = "CHECK"

    def load(self, request: config.PoolRequest) -> None:
        self.pool = self.allocator.load_ranges(request.name)

    def at_pool_loaded(self) -> str:
        pool = self.pool
        if self.conf.prev_result is None:
            raise CNIError(Code.INVALID_CONFIG, "CHECK needs the prevResult of the ADD")
        mine = [i.ip for i in self.conf.prev_ips if pool.range_for(i.ip) is not None]
        if not mine:
            raise AllocationMissing(f"prevResult holds no address from pool {pool.name!r}")
        for ip in mine:
            held = self.allocator.lookup(pool.name, ip)
            if held is None:
                raise AllocationMissing(f"{ip} is no longer allocated in pool {pool.name!r}")
            if not self.allocator.owns(held):
                raise AllocationMissing(
                    f"{ip} in pool {pool.name!r} is now allocated to container {held.target!r}"
                )
        return "verify"
