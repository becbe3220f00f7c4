"""`check`: find what in a pool's keys would make the plugin fail or hand out an address twice.

Pure logic over KV entries already read; no HTTP here.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from ..allocator.errors import InvalidPool
from ..allocator.layout import Layout
from ..allocator.pool import Held, parse_held
from ..allocator.ranges import IPRange
from ..allocator.schemas import load_ranges
from ..allocator.store import KVEntry
from ..allocator.usage import overlapping, reserved_by

# Every kind `check` reports, in the order a report lists them.
KINDS = (
    "missing-pool",  # allocations under a folder whose pool key is gone
    "invalid-ranges",  # the pool key does not hold IP ranges the plugin accepts
    "overlapping-ranges",  # two ranges share addresses: capacity counts them twice
    "overlapping-pools",  # another pool hands out some of the same addresses
    "missing-folder",  # no `<pool>/` key: the seed requires it and older readers fail without
    "invalid-key",  # a key in the folder not named after an IP in canonical form
    "invalid-value",  # a value that is not an Allocation object
    "outside-ranges",  # an allocation in no range of the pool
    "reserved-address",  # an allocation on a network, broadcast or gateway address
    "duplicate-target",  # one target+ifname holding more than one address
    "orphaned-allocation",  # this host's allocation of a container the runtime no longer has
)


@dataclass(frozen=True)
class Problem:
    pool: str
    kind: str
    keys: tuple[str, ...]
    message: str

    def to_json(self) -> dict[str, object]:
        return {"kind": self.kind, "keys": list(self.keys), "message": self.message}


@dataclass
class Report:
    pool: str
    allocations: int = 0  # valid allocation keys seen
    problems: list[Problem] = field(default_factory=list)

    def add(self, kind: str, keys: Sequence[str], message: str) -> None:
        self.problems.append(Problem(self.pool, kind, tuple(keys), message))

    def to_json(self) -> dict[str, object]:
        return {
            "pool": self.pool,
            "allocations": self.allocations,
            "problems": [p.to_json() for p in self.problems],
        }


def audit_pool(
    layout: Layout,
    name: str,
    pool_entry: KVEntry | None,
    folder_entries: Sequence[KVEntry],
    tick: Callable[[int, int], None] = lambda done, total: None,
) -> Report:
    report = Report(name)
    pool_key, folder = layout.pool_key(name), layout.folder(name)
    inside = [e for e in folder_entries if e.key.startswith(folder) and e.key != folder]
    ranges = _check_ranges(report, pool_key, pool_entry, len(inside))
    if pool_entry is not None and not any(e.key == folder for e in folder_entries):
        report.add(
            "missing-folder",
            [folder],
            f"folder key {folder!r} is missing; create it (an empty value) as the seed's KV "
            "setup requires, or `create --force` the pool",
        )
    held = []
    for i, entry in enumerate(inside, 1):
        tick(i, len(inside))
        h = _check_key(report, folder, entry)
        if h is not None:
            held.append(h)
    report.allocations = len(held)
    if ranges is not None:
        for h in held:
            _check_place(report, ranges, h)
    _check_duplicates(report, held)
    return report


def _check_ranges(
    report: Report, pool_key: str, entry: KVEntry | None, keys_inside: int
) -> list[IPRange] | None:
    if entry is None:
        report.add(
            "missing-pool",
            [pool_key],
            f"pool key {pool_key!r} is missing but its folder holds {keys_inside} key(s): "
            "the plugin cannot serve or release them; recreate the pool with `create`",
        )
        return None
    try:
        ranges = load_ranges(entry.value)
    except ValueError as exc:
        report.add(
            "invalid-ranges",
            [pool_key],
            f"{pool_key!r} does not hold valid IP ranges ({exc}); fix it with `create --force`",
        )
        return None
    for i, j in overlapping(ranges):
        report.add(
            "overlapping-ranges",
            [pool_key],
            f"ranges {i + 1} ({_span(ranges[i])}) and {j + 1} ({_span(ranges[j])}) overlap: "
            "capacity counts the shared addresses twice",
        )
    return ranges


def _check_key(report: Report, folder: str, entry: KVEntry) -> Held | None:
    name = entry.key[len(folder) :]
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        report.add("invalid-key", [entry.key], f"{entry.key!r} is not named after an IP address")
        return None
    if str(ip) != name:
        # The plugin looks addresses up by their canonical text: this key would not be found
        # and the same address could be allocated a second time.
        report.add(
            "invalid-key",
            [entry.key],
            f"{entry.key!r} names {ip} but not in its canonical form {str(ip)!r}",
        )
        return None
    try:
        return parse_held(entry, folder)
    except InvalidPool as exc:
        report.add("invalid-value", [entry.key], str(exc))
        return None


def _check_place(report: Report, ranges: Sequence[IPRange], held: Held) -> None:
    # Same order as `pool_usage`, so `usage` and `check` agree on every address.
    rng = next((r for r in ranges if r.contains(held.ip)), None)
    if rng is not None and rng.allocatable(held.ip):
        return
    reserved = reserved_by(ranges, held.ip)
    if reserved is not None:
        rng, role = reserved
        report.add(
            "reserved-address",
            [held.key],
            f"{held.ip} (target {held.target!r}) is the {role} address of {rng.subnet}",
        )
    else:
        report.add(
            "outside-ranges",
            [held.key],
            f"{held.ip} (target {held.target!r}) is outside every range of the pool",
        )


def _check_duplicates(report: Report, held: Sequence[Held]) -> None:
    by_target: dict[str, list[Held]] = defaultdict(list)
    for h in held:
        by_target[h.target].append(h)
    for target in sorted(by_target):
        group = by_target[target]
        if len(group) < 2:
            continue
        by_ifname: dict[str | None, list[Held]] = defaultdict(list)
        for h in group:
            by_ifname[h.ifname].append(h)
        if None in by_ifname:
            # An allocation without ifname belongs to the whole container (Held.owned_by), so
            # it clashes with every other allocation of that target.
            clashes: list[tuple[str | None, list[Held]]] = [(None, group)]
        else:
            clashes = [(i, g) for i, g in sorted(by_ifname.items()) if len(g) > 1]
        for ifname, g in clashes:
            who = f"target {target!r}" + (f" ifname {ifname!r}" if ifname else "")
            ips = ", ".join(str(h.ip) for h in g)
            report.add(
                "duplicate-target",
                [h.key for h in g],
                f"{who} holds {len(g)} addresses ({ips}); release all but one with `release`",
            )


def _span(rng: IPRange) -> str:
    return f"{rng.start}-{rng.end}"


@dataclass(frozen=True)
class Overlap:
    """Two pools that can hand out the same addresses: range `index` of `pool` and range
    `other_index` of `other` share `count` allocatable addresses, the lowest `first`."""

    pool: str
    index: int
    rng: IPRange
    other: str
    other_index: int
    other_rng: IPRange
    first: int
    count: int

    def describe(self) -> str:
        """As seen from `pool`."""
        make = ipaddress.ip_address
        return (
            f"range {self.index + 1} ({_span(self.rng)}) shares {self.count} address(es), from "
            f"{make(self.first)}, with pool {self.other!r} (its range {self.other_index + 1}, "
            f"{_span(self.other_rng)})"
        )

    def turned(self) -> Overlap:
        return Overlap(
            self.other, self.other_index, self.other_rng, self.pool, self.index, self.rng,
            self.first, self.count,
        )


def _allocatable_spans(rng: IPRange) -> list[tuple[int, int]]:
    """start..end without excluded and reserved addresses, as sorted inclusive int spans: two
    pools that split a subnet with `exclude` share none."""
    lo, hi = int(rng.start), int(rng.end)
    blocked = sorted([*rng.excluded, *((r, r) for r in rng.reserved() if lo <= r <= hi)])
    out, at = [], lo
    for a, b in blocked:
        if b < at:
            continue
        if a > hi:
            break
        if a > at:
            out.append((at, a - 1))
        at = b + 1
    if at <= hi:
        out.append((at, hi))
    return out


def _shared(a: IPRange, b: IPRange) -> tuple[int, int] | None:
    """The lowest address both hand out, and how many they share; None when none."""
    xs, ys = _allocatable_spans(a), _allocatable_spans(b)
    i = j = count = 0
    first: int | None = None
    while i < len(xs) and j < len(ys):
        lo, hi = max(xs[i][0], ys[j][0]), min(xs[i][1], ys[j][1])
        if lo <= hi:
            first = lo if first is None else first
            count += hi - lo + 1
        if xs[i][1] < ys[j][1]:
            i += 1
        else:
            j += 1
    return None if first is None else (first, count)


def overlapping_pools(pools: Mapping[str, Sequence[IPRange]]) -> list[Overlap]:
    """Every pair of ranges of two different pools that share an allocatable address. A sweep
    over the ranges by start address: pools of thousands of ranges compare only neighbours."""
    items = sorted(
        ((r.version, int(r.start), int(r.end), name, i, r)
         for name, ranges in pools.items() for i, r in enumerate(ranges)),
        key=lambda t: t[:3],
    )
    out: list[Overlap] = []
    active: list[tuple[int, int, int, str, int, IPRange]] = []
    for item in items:
        version, start = item[0], item[1]
        active = [a for a in active if a[0] == version and a[2] >= start]
        for a in active:
            if a[3] == item[3]:
                continue  # within one pool: `overlapping-ranges`
            shared = _shared(a[5], item[5])
            if shared is not None:
                first, pool_a, pool_b = shared[0], (a[3], a[4], a[5]), (item[3], item[4], item[5])
                if pool_a[0] > pool_b[0]:
                    pool_a, pool_b = pool_b, pool_a
                out.append(Overlap(*pool_a, *pool_b, first, shared[1]))
        active.append(item)
    return sorted(out, key=lambda o: (o.pool, o.index, o.other, o.other_index))


def report_overlaps(report: Report, overlaps: Sequence[Overlap], layout: Layout) -> None:
    """Add to `report` the overlaps that involve its pool, seen from it."""
    for o in overlaps:
        seen = o if o.pool == report.pool else o.turned() if o.other == report.pool else None
        if seen is not None:
            report.add(
                "overlapping-pools",
                [layout.pool_key(seen.pool), layout.pool_key(seen.other)],
                f"{seen.describe()}: on one network segment both would hand out one address",
            )
