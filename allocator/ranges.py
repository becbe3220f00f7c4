"""Range arithmetic: one IP range of a pool, in integers so a /64 costs what a /24 does."""

from __future__ import annotations

import ipaddress
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class IPRange:
    """A host-local style range: allocatable addresses are `first`..`last` minus reserved ones."""

    subnet: IPNetwork
    start: IPAddress
    end: IPAddress
    gateway: IPAddress | None = None

    @classmethod
    def build(
        cls,
        subnet: IPNetwork,
        start: IPAddress | None = None,
        end: IPAddress | None = None,
        gateway: IPAddress | None = None,
    ) -> IPRange:
        """Fill defaults as host-local does and check the pieces agree; ValueError if not."""
        if subnet.num_addresses < 4:
            raise ValueError(f"subnet {subnet} is too small: it must leave at least two hosts")
        start = start if start is not None else subnet.network_address + 1
        end = end if end is not None else _last_host(subnet)
        for label, ip in (("rangeStart", start), ("rangeEnd", end), ("gateway", gateway)):
            if ip is not None and ip not in subnet:
                raise ValueError(f"{label} {ip} is outside subnet {subnet}")
        if int(start) > int(end):
            raise ValueError(f"rangeStart {start} is after rangeEnd {end}")
        return cls(subnet, start, end, gateway)

    @property
    def version(self) -> int:
        return self.subnet.version

    @property
    def prefixlen(self) -> int:
        return self.subnet.prefixlen

    def reserved(self) -> set[int]:
        """Addresses never handed out: network, IPv4 broadcast, gateway."""
        out = {int(self.subnet.network_address)}
        if self.version == 4:
            out.add(int(self.subnet.broadcast_address))
        if self.gateway is not None:
            out.add(int(self.gateway))
        return out

    def contains(self, ip: IPAddress) -> bool:
        """True when `ip` is inside start..end (reserved addresses included)."""
        return ip.version == self.version and int(self.start) <= int(ip) <= int(self.end)

    def allocatable(self, ip: IPAddress) -> bool:
        return self.contains(ip) and int(ip) not in self.reserved()

    def size(self) -> int:
        """How many addresses this range can hand out."""
        lo, hi = int(self.start), int(self.end)
        return hi - lo + 1 - sum(1 for r in self.reserved() if lo <= r <= hi)

    def lowest_free(self, taken: Sequence[int]) -> IPAddress | None:
        """Lowest allocatable address not in `taken` (sorted, unique ints).

        Binary searches for the end of each run of consecutive taken addresses, so the cost is
        O(log n) in the number of allocations and independent of the subnet's size.
        """
        hi = int(self.end)
        reserved = self.reserved()
        candidate = int(self.start)
        while candidate <= hi:
            candidate = first_gap(taken, candidate)
            if candidate not in reserved:
                return type(self.start)(candidate) if candidate <= hi else None
            candidate += 1
        return None

    def to_wire(self) -> dict[str, str]:
        out = {"subnet": str(self.subnet), "rangeStart": str(self.start), "rangeEnd": str(self.end)}
        if self.gateway is not None:
            out["gateway"] = str(self.gateway)
        return out


def _last_host(subnet: IPNetwork) -> IPAddress:
    # IPv6 has no broadcast address, so its last address is usable.
    return subnet.broadcast_address - 1 if subnet.version == 4 else subnet.broadcast_address


def first_gap(taken: Sequence[int], start: int) -> int:
    """Smallest value >= start missing from `taken` (sorted, unique)."""
    i = bisect_left(taken, start)
    if i == len(taken) or taken[i] != start:
        return start
    # taken[i:] holds start, start+1, ... up to the last j with taken[j] - taken[i] == j - i.
    lo, hi = i, len(taken) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if taken[mid] - taken[i] == mid - i:
            lo = mid
        else:
            hi = mid - 1
    return taken[lo] + 1


def sorted_ints(ips: Iterable[IPAddress], version: int) -> list[int]:
    # A set: the run search assumes unique values, whatever spellings the keys had.
    return sorted({int(ip) for ip in ips if ip.version == version})
