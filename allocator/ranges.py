"""Range arithmetic: one IP range of a pool, in integers so a /64 costs what a /24 does."""

from __future__ import annotations

import ipaddress
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import accumulate

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class IPRange:
    """A host-local style range: allocatable addresses are `first`..`last` minus reserved ones."""

    subnet: IPNetwork
    start: IPAddress
    end: IPAddress
    gateway: IPAddress | None = None
    # Operator reservations inside the range (`exclude`): sorted, merged, inclusive int spans,
    # so a /64's worth of exclusions costs what one address does.
    excluded: tuple[tuple[int, int], ...] = ()
    # Everything in start..end never handed out (exclusions and reserved addresses) as sorted,
    # disjoint spans: their first and last addresses, and how many blocked addresses come
    # before each. Counting the blocked addresses up to any address is then one binary search,
    # which keeps the `spread` pick O(log n) however many exclusions a range has.
    _lows: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _highs: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _before: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        lo, hi = int(self.start), int(self.end)
        spans = [(max(a, lo), min(b, hi)) for a, b in self.excluded if a <= hi and b >= lo]
        spans += [(r, r) for r in self.reserved() if lo <= r <= hi]
        merged: list[list[int]] = []
        for a, b in sorted(spans):
            if merged and a <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        lows = tuple(a for a, _ in merged)
        highs = tuple(b for _, b in merged)
        before = tuple(accumulate((b - a + 1 for a, b in merged), initial=0))
        object.__setattr__(self, "_lows", lows)
        object.__setattr__(self, "_highs", highs)
        object.__setattr__(self, "_before", before)

    @classmethod
    def build(
        cls,
        subnet: IPNetwork,
        start: IPAddress | None = None,
        end: IPAddress | None = None,
        gateway: IPAddress | None = None,
        exclude: Sequence[IPNetwork] = (),
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
        for net in exclude:
            if net.version != subnet.version or not net.subnet_of(subnet):  # type: ignore[arg-type]
                raise ValueError(f"exclude {net} is not inside subnet {subnet}")
        spans = sorted((int(n.network_address), int(n.broadcast_address)) for n in exclude)
        merged: list[tuple[int, int]] = []
        for lo, hi in spans:
            if merged and lo <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
            else:
                merged.append((lo, hi))
        return cls(subnet, start, end, gateway, tuple(merged))

    @property
    def version(self) -> int:
        return self.subnet.version

    def clip(self, first: int, last: int) -> IPRange | None:
        """This range within first..last (ints), None when they do not meet: the same subnet,
        gateway and exclusions, so the same addresses are reserved."""
        lo, hi = max(int(self.start), first), min(int(self.end), last)
        if lo > hi:
            return None
        make = type(self.start)
        return IPRange(self.subnet, make(lo), make(hi), self.gateway, self.excluded)

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
        return self.contains(ip) and int(ip) not in self.reserved() and self.exclusion(ip) is None

    def exclusion(self, ip: IPAddress) -> tuple[int, int] | None:
        """The `exclude` span holding `ip`, if any."""
        if ip.version != self.version:
            return None
        return _span_of(self.excluded, int(ip))

    def size(self) -> int:
        """How many addresses this range can hand out."""
        return int(self.end) - int(self.start) + 1 - self._before[-1]

    def blocks(self, value: int) -> bool:
        """`value` is in start..end but never handed out (excluded or reserved)."""
        i = bisect_right(self._lows, value) - 1
        return i >= 0 and value <= self._highs[i]

    def blocked_taken(self, taken: Sequence[int]) -> list[int]:
        """The values of `taken` (sorted, unique) this range blocks, sorted: keys on excluded or
        reserved addresses (written by hand, or before an `exclude`). `free_count` and
        `nth_free` take them, so they count no capacity twice; a pool keeps them up to date as
        keys come and go (allocator/pool.py), one binary search per key."""
        lows, highs = self._lows, self._highs
        if len(taken) < len(lows):
            return [t for t in taken if self.blocks(t)]
        out: list[int] = []
        for a, b in zip(lows, highs, strict=True):
            out += taken[bisect_left(taken, a) : bisect_right(taken, b)]
        return out

    def _blocked_upto(self, x: int) -> int:
        """Blocked addresses in start..x."""
        i = bisect_right(self._lows, x)
        if i == 0:
            return 0
        return self._before[i - 1] + min(self._highs[i - 1], x) - self._lows[i - 1] + 1

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
            span = _span_of(self.excluded, candidate)
            if span is not None:
                candidate = span[1] + 1  # past the whole exclusion at once
            elif candidate in reserved:
                candidate += 1
            else:
                return type(self.start)(candidate) if candidate <= hi else None
        return None

    def free_count(self, taken: Sequence[int], blocked: Sequence[int] | None = None) -> int:
        """How many addresses of this range are neither taken nor blocked: what `nth_free`
        numbers. `taken` is sorted and unique; `blocked` is `blocked_taken(taken)`, worked out
        here when not given. O(log n) given `blocked`."""
        return self.size() - self._taken_upto(taken, int(self.end), blocked)

    def nth_free(
        self, taken: Sequence[int], n: int, blocked: Sequence[int] | None = None
    ) -> IPAddress | None:
        """The free address numbered `n` (0 is the lowest) in address order, None past the last.

        A binary search over the range for the smallest address with n + 1 free ones up to it,
        each count a few binary searches: O(log(size) * log n), so a /64 costs about what a
        /24 does, and a thousand exclusions what one does.
        """
        lo, hi = int(self.start), int(self.end)
        if n < 0 or lo > hi:
            return None
        if blocked is None:
            blocked = self.blocked_taken(taken)
        if self._free_upto(taken, hi, blocked) <= n:
            return None
        while lo < hi:
            mid = (lo + hi) // 2
            if self._free_upto(taken, mid, blocked) > n:
                hi = mid
            else:
                lo = mid + 1
        return type(self.start)(lo)

    def _free_upto(self, taken: Sequence[int], x: int, blocked: Sequence[int]) -> int:
        """Free addresses in start..x."""
        start = int(self.start)
        if x < start:
            return 0
        x = min(x, int(self.end))
        return x - start + 1 - self._blocked_upto(x) - self._taken_upto(taken, x, blocked)

    def _taken_upto(self, taken: Sequence[int], x: int, blocked: Sequence[int] | None) -> int:
        """Allocatable addresses in start..x that `taken` holds: keys on blocked addresses
        cost no capacity twice."""
        start = int(self.start)
        x = min(x, int(self.end))
        if x < start:
            return 0
        if blocked is None:
            blocked = self.blocked_taken(taken)
        # `blocked` holds only addresses in start..end.
        return bisect_right(taken, x) - bisect_left(taken, start) - bisect_right(blocked, x)

    def to_wire(self) -> dict[str, object]:
        out: dict[str, object] = {
            "subnet": str(self.subnet),
            "rangeStart": str(self.start),
            "rangeEnd": str(self.end),
        }
        if self.gateway is not None:
            out["gateway"] = str(self.gateway)
        if self.excluded:
            out["exclude"] = [str(n) for n in self.exclusions()]
        return out

    def exclusions(self) -> list[IPNetwork]:
        """The excluded spans as CIDRs (a merged span may need several)."""
        make = ipaddress.IPv4Address if self.version == 4 else ipaddress.IPv6Address
        out: list[IPNetwork] = []
        for lo, hi in self.excluded:
            out.extend(ipaddress.summarize_address_range(make(lo), make(hi)))
        return out


def _last_host(subnet: IPNetwork) -> IPAddress:
    # IPv6 has no broadcast address, so its last address is usable.
    return subnet.broadcast_address - 1 if subnet.version == 4 else subnet.broadcast_address


def _span_of(spans: Sequence[tuple[int, int]], value: int) -> tuple[int, int] | None:
    i = bisect_right(spans, (value, _INFINITY)) - 1
    return spans[i] if i >= 0 and spans[i][0] <= value <= spans[i][1] else None


_INFINITY = 1 << 129


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
