"""Allocator operations over a `KV` store: read pools, claim, take over and release addresses.

Every write is a compare-and-set, so two writers can never both believe they hold a key.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from loguru import logger

from .cache import PoolCache
from .errors import InvalidPool, NotInPool
from .layout import Layout
from .pool import Held, Pool, parse_held, parse_pool
from .ranges import IPAddress, IPRange
from .schemas import dump_allocation
from .store import KV, KVEntry


@dataclass(frozen=True)
class Claim:
    """A write this call made, with what the key held before (None: it was absent)."""

    key: str
    ip: IPAddress
    previous: bytes | None


class Allocator:
    def __init__(
        self,
        kv: KV,
        layout: Layout | None = None,
        host: str | None = None,
        cache: PoolCache | None = None,
    ) -> None:
        self.kv = kv
        self.layout = layout or Layout()
        self.host = host
        self.cache = cache

    def load(self, name: str, fresh: bool = False) -> Pool:
        """Ranges and allocations in one listing of the pool key's prefix (or the helper's
        cached copy of it, unless `fresh`)."""
        if self.cache is not None and not fresh:
            return self.cache.get(name, lambda: self._listing(name))
        entries, _ = self._listing(name)
        return parse_pool(self.layout, name, entries)

    def _listing(self, name: str) -> tuple[list[KVEntry], int]:
        key = self.layout.pool_key(name)
        kv: Any = self.kv
        entries, index = kv.list_after(key) if hasattr(kv, "list_after") else (kv.list(key), 0)
        if not entries:
            self._probe(key)
        return entries, index

    def load_ranges(self, name: str) -> Pool:
        """The pool's ranges alone (one small read), for calls that look up single keys."""
        entry = self.kv.get(self.layout.pool_key(name))
        return parse_pool(self.layout, name, [entry] if entry is not None else [])

    def recheck(self, pool: Pool, ip: IPAddress) -> None:
        """Re-read one allocation key after a lost race and fold it into `pool`."""
        held = self.lookup(pool.name, ip)
        if held is None:
            pool.discard(ip)
        else:
            pool.put(held)

    def still_ours(self, pool: Pool, held: Held, target: str, ifname: str | None) -> bool:
        """A freshly listed pool is the truth; a cached one is confirmed key by key."""
        if self.cache is None:
            return True
        self.recheck(pool, held.ip)
        current = pool.held.get(held.ip)
        return current is not None and current.owned_by(target, ifname)

    def _probe(self, key: str) -> None:
        # Consul drops keys the ACL token may not read from a listing and answers an empty one
        # with 404, so "no such pool" and "no permission" look alike. A read of the key itself
        # answers 403 instead, which the KV layer raises as a permission error.
        self.kv.get(key)

    def value(self, target: str, ifname: str | None) -> bytes:
        return dump_allocation(target, ifname, self.host)

    def ours_to_be(self, pool: Pool, ip: IPAddress, target: str, ifname: str | None) -> Held:
        """The allocation we are about to write. ModifyIndex 0 is unknown: a CAS delete with it
        fails and re-reads the key."""
        key = self.layout.allocation_key(pool.name, ip)
        return Held(ip, target, key, 0, ifname, self.host, self.value(target, ifname))

    def claim(self, pool: Pool, ip: IPAddress, target: str, ifname: str | None) -> Claim | None:
        """Create the allocation key if absent; None when someone else got there first."""
        held = self.ours_to_be(pool, ip, target, ifname)
        if self.kv.create(held.key, held.value):
            pool.put(held)
            return Claim(held.key, ip, None)
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
        entries = self.kv.list(folder)
        if not entries:
            self._probe(folder)
        out = []
        for entry in entries:
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
