"""Allocator operations over a `KV` store: read pools, claim, take over and release addresses.

Every write is a compare-and-set, so two writers can never both believe they hold a key.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from loguru import logger

from .errors import InvalidPool, NotInPool
from .layout import Layout
from .pool import Held, Pool, parse_held, parse_pool
from .ranges import IPAddress, IPRange
from .schemas import dump_allocation
from .store import KV


@dataclass(frozen=True)
class Claim:
    """A write this call made, with what the key held before (None: it was absent)."""

    key: str
    ip: IPAddress
    previous: bytes | None


class Allocator:
    def __init__(self, kv: KV, layout: Layout | None = None, host: str | None = None) -> None:
        self.kv = kv
        self.layout = layout or Layout()
        self.host = host

    def load(self, name: str) -> Pool:
        """Ranges and allocations in one listing of the pool key's prefix."""
        return parse_pool(self.layout, name, self.kv.list(self.layout.pool_key(name)))

    def value(self, target: str, ifname: str | None) -> bytes:
        return dump_allocation(target, ifname, self.host)

    def claim(self, pool: Pool, ip: IPAddress, target: str, ifname: str | None) -> Claim | None:
        """Create the allocation key if absent; None when someone else got there first."""
        key = self.layout.allocation_key(pool.name, ip)
        if self.kv.create(key, self.value(target, ifname)):
            return Claim(key, ip, None)
        return None

    def take_over(self, held: Held, target: str, ifname: str | None) -> Claim | None:
        """Re-allocate a held address to `target` (static request); None if it changed meanwhile."""
        if self.kv.replace(held.key, self.value(target, ifname), held.index):
            return Claim(held.key, held.ip, held.value)
        return None

    def requested_range(self, pool: Pool, ip: IPAddress) -> IPRange:
        rng = pool.range_for(ip)
        if rng is None:
            raise NotInPool(f"requested IP {ip} is not in any range of pool {pool.name!r}")
        if not rng.allocatable(ip):
            raise NotInPool(
                f"requested IP {ip} is the network, broadcast or gateway address of {rng.subnet}"
            )
        return rng

    def lookup(self, pool: str, ip: IPAddress) -> Held | None:
        entry = self.kv.get(self.layout.allocation_key(pool, ip))
        return None if entry is None else parse_held(entry, self.layout.folder(pool))

    def scan(self, pool: str, on_invalid: Callable[[str], None]) -> list[Held]:
        """Every valid allocation in the pool folder; unreadable keys go to `on_invalid`."""
        folder = self.layout.folder(pool)
        out = []
        for entry in self.kv.list(folder):
            if entry.key == folder:
                continue
            try:
                out.append(parse_held(entry, folder))
            except InvalidPool as exc:
                on_invalid(str(exc))
        return out

    def release(self, held: Held, target: str, ifname: str | None, attempts: int = 5) -> bool:
        """CAS-delete one key of ours; True when it is gone or no longer ours."""
        for _ in range(attempts):
            if self.kv.delete(held.key, held.index):
                return True
            current = self.lookup_key(held)
            if current is None or not current.owned_by(target, ifname):
                return True
            held = current
        return False

    def lookup_key(self, held: Held) -> Held | None:
        entry = self.kv.get(held.key)
        if entry is None:
            return None
        return parse_held(entry, _folder_of(entry.key))

    def undo(self, claim: Claim, target: str) -> None:
        """Roll back a write of this call: delete it, or restore what it replaced."""
        entry = self.kv.get(claim.key)
        if entry is None:
            return
        try:
            held = parse_held(entry, _folder_of(entry.key))
        except InvalidPool:
            return
        if held.target != target:
            return
        if claim.previous is None:
            self.kv.delete(claim.key, entry.modify_index)
        else:
            self.kv.replace(claim.key, claim.previous, entry.modify_index)
        logger.debug("rolled back {}", claim.key)


def _folder_of(key: str) -> str:
    return key.rpartition("/")[0] + "/"
