"""A pool as read from KV: its ranges and the allocations held in its folder."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

from .errors import InvalidPool, PoolFull, PoolMissing
from .layout import Layout
from .ranges import IPAddress, IPRange, sorted_ints
from .schemas import load_allocation, load_ranges
from .store import KVEntry


@dataclass(frozen=True)
class Held:
    """One allocation key: who holds the address, and the ModifyIndex for CAS."""

    ip: IPAddress
    target: str
    key: str
    index: int
    ifname: str | None = None
    host: str | None = None
    value: bytes = b""  # the raw JSON, to restore it if a take-over is rolled back

    def owned_by(self, target: str, ifname: str | None = None) -> bool:
        # An allocation without ifname (upstream, other tools) belongs to the whole container.
        if self.target != target:
            return False
        return ifname is None or self.ifname is None or self.ifname == ifname


@dataclass
class Pool:
    name: str
    ranges: list[IPRange]
    held: dict[IPAddress, Held] = field(default_factory=dict)

    def range_for(self, ip: IPAddress) -> IPRange | None:
        return next((r for r in self.ranges if r.contains(ip)), None)

    def ours(self, target: str, ifname: str | None = None) -> list[Held]:
        return sorted(
            (h for h in self.held.values() if h.owned_by(target, ifname)),
            key=lambda h: (h.ip.version, int(h.ip)),
        )

    def next_free(self, skip: Iterable[IPAddress] = ()) -> tuple[IPAddress, IPRange]:
        """Lowest free address, range by range in pool order; `skip` adds addresses to avoid."""
        busy = [*self.held, *skip]
        taken = {4: sorted_ints(busy, 4), 6: sorted_ints(busy, 6)}
        for rng in self.ranges:
            ip = rng.lowest_free(taken[rng.version])
            if ip is not None:
                return ip, rng
        raise PoolFull(f"pool {self.name!r} is full: all {self.capacity()} addresses are allocated")

    def capacity(self) -> int:
        return sum(r.size() for r in self.ranges)


def parse_pool(layout: Layout, name: str, entries: Iterable[KVEntry]) -> Pool:
    """Build a Pool from a prefix listing; entries of other pools sharing the prefix are ignored."""
    pool_key, folder = layout.pool_key(name), layout.folder(name)
    ranges_entry = None
    held: dict[IPAddress, Held] = {}
    for entry in entries:
        if entry.key == pool_key:
            ranges_entry = entry
        elif entry.key.startswith(folder) and entry.key != folder:
            h = parse_held(entry, folder)
            held[h.ip] = h
    if ranges_entry is None:
        raise PoolMissing(f"pool {name!r} does not exist: KV key {pool_key!r} is missing")
    try:
        ranges = load_ranges(ranges_entry.value)
    except ValueError as exc:
        raise InvalidPool(f"KV key {pool_key!r} does not hold valid IP Ranges: {exc}") from exc
    return Pool(name, ranges, held)


def parse_held(entry: KVEntry, folder: str) -> Held:
    name = entry.key[len(folder) :]
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        raise InvalidPool(
            f"KV key {entry.key!r} in the pool folder is not named after an IP address"
        ) from None
    try:
        alloc = load_allocation(entry.value)
    except ValueError as exc:
        raise InvalidPool(f"KV key {entry.key!r} does not hold a valid Allocation: {exc}") from exc
    return Held(
        ip,
        alloc["target"],
        entry.key,
        entry.modify_index,
        alloc["ifname"],
        alloc["host"],
        entry.value,
    )
