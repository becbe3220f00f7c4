"""How full a pool is, range by range, and which of its ranges overlap.

Pure accounting over ranges and held addresses (no KV, no HTTP), for operator tools. An
address counts against the first range that contains it, as `Pool.range_for` decides.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .ranges import IPAddress, IPRange


def _percent(part: int, whole: int) -> float:
    return round(100.0 * part / whole, 2) if whole else 0.0


@dataclass(frozen=True)
class RangeUsage:
    range: IPRange
    allocated: int

    @property
    def size(self) -> int:
        return self.range.size()

    @property
    def free(self) -> int:
        return max(0, self.size - self.allocated)

    @property
    def percent(self) -> float:
        return _percent(self.allocated, self.size)


@dataclass(frozen=True)
class PoolUsage:
    ranges: tuple[RangeUsage, ...]
    # Held addresses that use no allocatable slot: they are reported, never counted.
    outside: tuple[IPAddress, ...]
    reserved: tuple[IPAddress, ...]

    @property
    def capacity(self) -> int:
        return sum(r.size for r in self.ranges)

    @property
    def allocated(self) -> int:
        return sum(r.allocated for r in self.ranges)

    @property
    def free(self) -> int:
        return sum(r.free for r in self.ranges)

    @property
    def percent(self) -> float:
        return _percent(self.allocated, self.capacity)


def pool_usage(ranges: Sequence[IPRange], held: Iterable[IPAddress]) -> PoolUsage:
    """Count each distinct held address in the first range containing it.

    Addresses on a network, broadcast or gateway address go to `reserved` (a range's size
    excludes them, so counting them would push `free` below what the allocator can really
    hand out); any other address in no range goes to `outside`.
    """
    counts = [0] * len(ranges)
    outside: list[IPAddress] = []
    reserved: list[IPAddress] = []
    for ip in sorted(set(held), key=lambda a: (a.version, int(a))):
        index = next((i for i, r in enumerate(ranges) if r.contains(ip)), None)
        if index is not None and ranges[index].allocatable(ip):
            counts[index] += 1
        elif reserved_by(ranges, ip) is not None:
            reserved.append(ip)
        else:
            outside.append(ip)
    return PoolUsage(
        tuple(RangeUsage(r, n) for r, n in zip(ranges, counts, strict=True)),
        tuple(outside),
        tuple(reserved),
    )


def overlapping(ranges: Sequence[IPRange]) -> list[tuple[int, int]]:
    """Index pairs (i < j) of ranges whose start..end spans share an address.

    Overlaps make capacity double-count addresses the allocator can only hand out once.
    """
    out = []
    for i, a in enumerate(ranges):
        for j in range(i + 1, len(ranges)):
            b = ranges[j]
            if a.version == b.version and int(a.start) <= int(b.end) and int(b.start) <= int(a.end):
                out.append((i, j))
    return out


def reserved_by(ranges: Sequence[IPRange], ip: IPAddress) -> tuple[IPRange, str] | None:
    """The first range whose subnet reserves `ip`, and the role, or None.

    Looks at the whole subnet, not only start..end: a gateway outside the span is still the
    gateway, and an allocation on it is worse than one merely outside the ranges.
    """
    for rng in ranges:
        if ip.version == rng.version and ip in rng.subnet:
            role = reserved_role(rng, ip)
            if role is not None:
                return rng, role
    return None


def reserved_role(rng: IPRange, ip: IPAddress) -> str | None:
    """Why `ip` is never handed out from `rng` ('network', 'broadcast', 'gateway'), or None."""
    if ip == rng.subnet.network_address:
        return "network"
    if rng.version == 4 and ip == rng.subnet.broadcast_address:
        return "broadcast"
    if rng.gateway is not None and ip == rng.gateway:
        return "gateway"
    if rng.exclusion(ip) is not None:
        return "excluded"
    return None
