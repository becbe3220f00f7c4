"""The subcommands: each takes the parsed arguments and returns the exit status.

Reads go through `Reader`, writes are `ConsulKV` compare-and-set calls, so an operator never
overwrites a change made by the plugin or another operator between read and write.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from ..allocator.errors import InvalidPool
from ..allocator.layout import check_pool_name
from ..allocator.pool import Held, parse_held
from ..allocator.ranges import IPAddress, IPRange
from ..allocator.schemas import load_allocation
from ..allocator.store import KVEntry
from ..allocator.usage import PoolUsage, pool_usage
from ..cni.helper import catalog
from ..consul import ConsulClient, ConsulKV
from ..consul.urls import shown_url
from . import rangespec
from . import reconcile as rec
from .audit import Report, audit_pool, overlapping_pools, report_overlaps
from .errors import OK, PROBLEMS, StateError, UsageError
from .ids import resolve_target
from .kvread import PoolRead, Reader
from .output import Progress, note, print_json, prometheus_text, write_check_line, write_table
from .settings import Settings, connect


@dataclass
class Context:
    settings: Settings
    progress: Progress

    @cached_property
    def _conn(self) -> tuple[ConsulClient, ConsulKV]:
        # Connect lazily: input errors are reported before any network traffic.
        return connect(self.settings)

    @property
    def kv(self) -> ConsulKV:
        return self._conn[1]

    @cached_property
    def reader(self) -> Reader:
        client, kv = self._conn
        return Reader(client, kv, self.settings.layout, self.progress)

    def close(self) -> None:
        if "_conn" in self.__dict__:
            self._conn[0].close()


def pool_name(name: str) -> str:
    problem = check_pool_name(name)
    if problem:
        raise UsageError(problem)
    return name


# -- create ------------------------------------------------------------------------------------
def create(ctx: Context, args: argparse.Namespace) -> int:
    name = pool_name(args.pool)
    wire = (
        [rangespec.parse_spec(s) for s in args.range]
        if args.range
        else rangespec.read_json(args.ranges_json)
    )
    value, ranges = rangespec.encode(wire)
    if args.dry_run:
        sys.stdout.write(value.decode() + "\n")
        return OK
    layout, kv = ctx.settings.layout, ctx.kv
    key = layout.pool_key(name)
    existing = kv.get(key)
    if existing is not None and not args.force:
        raise StateError(
            f"pool {name!r} already exists (KV key {key!r}); nothing written. Add --force "
            "to replace its ranges (allocations are kept)"
        )
    _refuse_overlaps(ctx, name, ranges, args.allow_overlap)
    if existing is None:
        if not kv.create(key, value):
            raise StateError(
                f"pool {name!r} was created by someone else while this ran; look at it with "
                "`list`, and add --force to replace its ranges"
            )
        verb = "created pool"
    else:
        if not kv.replace(key, value, existing.modify_index):
            raise StateError(f"pool {name!r} changed while this ran; nothing written, run again")
        verb = "replaced ranges of pool"
    # Folder keys as the seed's KV setup has them; cas=0 leaves existing ones untouched.
    kv.create(layout.folder(name), b"")
    if layout.prefix:
        kv.create(layout.prefix, b"")
    capacity = sum(r.size() for r in ranges)
    print(f"{verb} {name}: {len(ranges)} range(s), {capacity} allocatable addresses")
    if existing is not None:
        _warn_misfits(ctx, name, ranges)
    return OK


def _refuse_overlaps(ctx: Context, name: str, ranges: list[IPRange], allowed: bool) -> None:
    """Two pools handing out the same addresses on one segment is a duplicate waiting to
    happen: refused unless the operator says the pools never share a segment."""
    others = {
        r.name: r.ranges for r in ctx.reader.pools() if r.ranges is not None and r.name != name
    }
    found = [
        o if o.pool == name else o.turned()
        for o in overlapping_pools({**others, name: ranges})
        if name in (o.pool, o.other)
    ]
    if not found:
        return
    what = "; ".join(o.describe() for o in found[:3]) + (
        f"; and {len(found) - 3} more" if len(found) > 3 else ""
    )
    if allowed:
        note(f"warning: pool {name!r}: {what} (--allow-overlap)")
        return
    raise StateError(
        f"pool {name!r} would hand out addresses another pool hands out, and on one network "
        f"segment that is one address given twice: {what}. Nothing written; add "
        "--allow-overlap if these pools never serve the same segment, or leave the shared "
        "addresses out (another range, or `exclude`)"
    )


def _warn_misfits(ctx: Context, name: str, ranges: list[IPRange]) -> None:
    ips, _ = _folder_ips(ctx.reader.folder(name), ctx.settings.layout.folder(name))
    usage = pool_usage(ranges, ips)
    misfits = len(usage.outside) + len(usage.reserved)
    if misfits:
        note(
            f"warning: {misfits} allocation(s) of pool {name!r} are outside the new ranges or "
            f"on reserved addresses; see `check {name}`"
        )


# -- list --------------------------------------------------------------------------------------
def list_pools(ctx: Context, args: argparse.Namespace) -> int:
    pools = _valid_pools(ctx, ctx.reader.pools())
    if args.json:
        print_json(
            [
                {
                    "pool": p.name,
                    "ranges": [r.to_wire() for r in p.ranges or []],
                    "capacity": sum(r.size() for r in p.ranges or []),
                }
                for p in pools
            ]
        )
        return OK
    if not pools:
        note(f"no pools under prefix {ctx.settings.layout.prefix!r}")
        return OK
    rows = [
        [
            p.name,
            len(p.ranges or []),
            sum(r.size() for r in p.ranges or []),
            ", ".join(str(r.subnet) for r in p.ranges or []),
        ]
        for p in pools
    ]
    write_table(["POOL", "RANGES", "CAPACITY", "SUBNETS"], rows, {1, 2})
    return OK


def _valid_pools(ctx: Context, reads: Sequence[PoolRead]) -> list[PoolRead]:
    for r in reads:
        if r.ranges is None:
            key = ctx.settings.layout.pool_key(r.name)
            note(f"skipping {key!r}: not a pool ({r.error}); `check {r.name}` tells more")
    return [r for r in reads if r.ranges is not None]


# -- usage -------------------------------------------------------------------------------------
def usage(ctx: Context, args: argparse.Namespace) -> int:
    reads = (
        [ctx.reader.usable_pool(pool_name(n)) for n in args.pools]
        if args.pools
        else _valid_pools(ctx, ctx.reader.pools())
    )
    results = []
    for read in reads:
        folder = ctx.settings.layout.folder(read.name)
        ips, invalid = _folder_ips(ctx.reader.folder(read.name), folder, ctx.progress)
        u = pool_usage(read.ranges or [], ips)
        results.append((read.name, u, invalid))
        odd = len(u.outside) + len(u.reserved) + invalid
        if odd:
            note(
                f"pool {read.name!r}: {odd} key(s) in {folder!r} are not counted (outside "
                f"the ranges, on reserved addresses or not named after an IP); see "
                f"`check {read.name}`"
            )
    over = [
        (name, u.percent) for name, u, _ in results
        if args.warn_at is not None and u.percent > args.warn_at
    ]
    for name, percent in over:
        note(f"pool {name!r} is {percent:.1f}% used, above --warn-at {args.warn_at:g}%")
    status = PROBLEMS if over else OK
    if args.json:
        print_json([_usage_json(name, u, invalid) for name, u, invalid in results])
        return status
    if args.prometheus:
        # Even with no pool: HELP and TYPE alone, so a textfile collector's file stays valid.
        sys.stdout.write(_usage_prometheus(ctx.settings, results))
        return status
    if not results:
        note(f"no pools under prefix {ctx.settings.layout.prefix!r}")
        return OK
    rows: list[list[Any]] = []
    fills: list[tuple[int, int] | None] = []
    totals: list[int] = []
    for name, u, _ in results:
        for r in u.ranges:
            span = f"{r.range.subnet} {r.range.start}-{r.range.end}"
            gw = r.range.gateway or "-"
            rows.append([name, span, gw, r.size, r.allocated, r.free, f"{r.percent:.1f}%"])
            fills.append((r.allocated, r.size))
        if len(u.ranges) > 1:
            totals.append(len(rows))
            rows.append([name, "total", "", u.capacity, u.allocated, u.free, f"{u.percent:.1f}%"])
            fills.append((u.allocated, u.capacity))
    headers = ["POOL", "RANGE", "GATEWAY", "SIZE", "ALLOCATED", "FREE", "USED"]
    write_table(headers, rows, {3, 4, 5, 6}, fills=fills, bold_rows=totals)
    return status


def _usage_prometheus(settings: Settings, results: Sequence[tuple[str, PoolUsage, int]]) -> str:
    """The helper's pool gauges and labels, so one query covers both, plus free addresses and
    when they were read; names, types and help are the metrics catalog's (cni/helper/catalog.py).
    Counts are `usage`'s: keys named after an allocatable address."""
    consul, prefix = ",".join(map(shown_url, settings.servers)), settings.layout.prefix

    def family(name: str, samples: list[tuple[dict[str, str], float]]) -> Family:
        m = catalog.metric(f"{catalog.PREFIX}_{name}")
        return m.name, m.help, m.kind, samples

    def pools(value: str) -> Family:
        return family(f"pool_{value}", [
            ({"consul": consul, "prefix": prefix, "pool": name}, getattr(u, value))
            for name, u, _ in results
        ])

    # Even with no pool: the file says when it was made, so a stale one shows as stale.
    read_at = family("usage_timestamp_seconds", [({"consul": consul, "prefix": prefix},
                                                  round(time.time(), 3))])
    return prometheus_text([pools("allocated"), pools("capacity"), pools("free"), read_at])


Family = tuple[str, str, str, list[tuple[dict[str, str], float]]]


def _usage_json(name: str, u: PoolUsage, invalid: int) -> dict[str, Any]:
    return {
        "pool": name,
        "capacity": u.capacity,
        "allocated": u.allocated,
        "free": u.free,
        "percent": u.percent,
        "outside": [str(ip) for ip in u.outside],
        "reserved": [str(ip) for ip in u.reserved],
        "invalidKeys": invalid,
        "ranges": [
            {
                **r.range.to_wire(),
                "size": r.size,
                "allocated": r.allocated,
                "free": r.free,
                "percent": r.percent,
            }
            for r in u.ranges
        ],
    }


def _folder_ips(
    entries: Sequence[KVEntry], folder: str, progress: Progress | None = None
) -> tuple[list[IPAddress], int]:
    """Addresses named by the folder's keys, and how many keys name none.

    Usage counts a key by its name alone: the address is taken whatever the value holds
    (the plugin's create-if-absent on it fails), and values are `check`'s business.
    """
    ips, invalid = [], 0
    inside = [e for e in entries if e.key.startswith(folder) and e.key != folder]
    for i, entry in enumerate(inside, 1):
        if progress is not None:
            progress.count(f"counting {folder}", i, len(inside))
        try:
            ips.append(ipaddress.ip_address(entry.key[len(folder) :]))
        except ValueError:
            invalid += 1
    if progress is not None:
        progress.clear()
    return ips, invalid


# -- allocations -------------------------------------------------------------------------------
def allocations(ctx: Context, args: argparse.Namespace) -> int:
    name = pool_name(args.pool)
    layout = ctx.settings.layout
    folder = layout.folder(name)
    read = ctx.reader.pool(name)
    entries = [e for e in ctx.reader.folder(name) if e.key != folder]
    if read.entry is None:
        if not entries:
            raise StateError(
                f"pool {name!r} does not exist (no KV key {layout.pool_key(name)!r}); see `list`"
            )
        note(f"pool key {layout.pool_key(name)!r} is missing; listing its folder anyway")
    held: list[Held] = []
    invalid = 0
    for i, entry in enumerate(entries, 1):
        ctx.progress.count(f"reading {folder}", i, len(entries))
        try:
            held.append(parse_held(entry, folder))
        except InvalidPool:
            invalid += 1
    ctx.progress.clear()
    if invalid:
        note(f"{invalid} key(s) in {folder!r} are not valid allocations; see `check {name}`")
    if args.target:
        # A unique prefix names its target, as runtimes show IDs shortened.
        target = resolve_target(args.target, (h.target for h in held))
        held = [h for h in held if h.target == target]
    held.sort(key=lambda h: (h.ip.version, int(h.ip)))
    if args.json:
        print_json([_allocation_json(h) for h in held])
        return OK
    _allocation_table(held)
    return OK


def _allocation_table(held: Sequence[Held], pools: Sequence[str] | None = None) -> None:
    rows = [
        [h.ip, h.target, h.ifname or "-", h.network or "-", h.host or "-", runtime_name(h)]
        for h in held
    ]
    headers = ["IP", "TARGET", "IFNAME", "NETWORK", "HOST", "NAME"]
    if pools is not None:
        rows = [[pool, *row] for pool, row in zip(pools, rows, strict=True)]
        headers = ["POOL", *headers]
    write_table(headers, rows, set())


def runtime_name(h: Held) -> str:
    """The runtime's own name for the holder: a pod's namespace/name, a Nomad job/group, a
    Podman container's name (Podman's CNI backend passes it as K8S_POD_NAME, no namespace)."""
    r = h.runtime or {}
    if r.get("K8S_POD_NAME"):
        namespace = r.get("K8S_POD_NAMESPACE")
        return f"{namespace}/{r['K8S_POD_NAME']}" if namespace else r["K8S_POD_NAME"]
    if r.get("NOMAD_JOB_ID"):
        return f"{r['NOMAD_JOB_ID']}/{r.get('NOMAD_GROUP_NAME', '-')}"
    return "-"


def _names(h: Held) -> set[str]:
    """What `ip-of` finds a holder by besides its ID: its runtime name, a Nomad allocation
    ID, and for a name without a namespace also `-/NAME` (how older versions showed it)."""
    names = {runtime_name(h)} - {"-"}
    r = h.runtime or {}
    if r.get("K8S_POD_NAME") and not r.get("K8S_POD_NAMESPACE"):
        names.add(f"-/{r['K8S_POD_NAME']}")
    if r.get("NOMAD_ALLOC_ID"):
        names.add(r["NOMAD_ALLOC_ID"])
    return names


def _allocation_json(h: Held) -> dict[str, Any]:
    return {
        "ip": str(h.ip),
        "target": h.target,
        "ifname": h.ifname,
        "host": h.host,
        "network": h.network,
        "runtime": h.runtime,
        **({"freeAfter": h.free_after} if h.free_after is not None else {}),
    }


# -- who-has / ip-of ---------------------------------------------------------------------------
def who_has(ctx: Context, args: argparse.Namespace) -> int:
    """Which attachment holds IP, in every pool whose ranges contain it (or in --pool)."""
    try:
        ip = ipaddress.ip_address(args.ip)
    except ValueError:
        raise UsageError(f"{args.ip!r} is not an IP address") from None
    layout = ctx.settings.layout
    names = [pool_name(p) for p in args.pool] or [
        r.name for r in _valid_pools(ctx, ctx.reader.pools())
        if any(rng.contains(ip) for rng in r.ranges or [])
    ]
    found: list[tuple[str, Held]] = []
    for name in names:
        entry = ctx.kv.get(layout.allocation_key(name, ip))
        if entry is not None:
            found.append((name, parse_held(entry, layout.folder(name))))
    return _report_holders(args, found, f"nobody holds {ip} (pools searched: {len(names)})")


def ip_of(ctx: Context, args: argparse.Namespace) -> int:
    """The addresses of a container: by container ID (or unique prefix), Nomad allocation ID,
    pod `namespace/name`, or Nomad `job/group`."""
    pools = [pool_name(p) for p in args.pool] or [
        r.name for r in _valid_pools(ctx, ctx.reader.pools())
    ]
    held: list[tuple[str, Held]] = []
    for name in pools:
        folder = ctx.settings.layout.folder(name)
        for entry in ctx.reader.folder(name):
            if entry.key == folder:
                continue
            try:
                held.append((name, parse_held(entry, folder)))
            except InvalidPool:
                continue  # `check` reports it
    wanted = args.name
    by_name = [(p, h) for p, h in held if wanted in _names(h)]
    if by_name:
        found = by_name
    else:
        target = resolve_target(wanted, (h.target for _, h in held), option="ID")
        found = [(p, h) for p, h in held if h.target == target]
    return _report_holders(args, found, f"no allocation names {wanted!r}")


def _report_holders(args: argparse.Namespace, found: list[tuple[str, Held]], none: str) -> int:
    found.sort(key=lambda ph: (ph[0], ph[1].ip.version, int(ph[1].ip)))
    if args.json:
        print_json([{"pool": p, **_allocation_json(h)} for p, h in found])
    elif found:
        _allocation_table([h for _, h in found], [p for p, _ in found])
    if not found:
        raise StateError(none)
    return OK


# -- release -----------------------------------------------------------------------------------
def release(ctx: Context, args: argparse.Namespace) -> int:
    name = pool_name(args.pool)
    try:
        ip = ipaddress.ip_address(args.ip.strip())
    except ValueError:
        raise UsageError(f"{args.ip!r} is not an IP address") from None
    kv = ctx.kv
    layout = ctx.settings.layout
    key = layout.allocation_key(name, ip)
    entry = kv.get(key)
    if entry is None:
        raise StateError(
            f"{ip} is not allocated in pool {name!r} (no KV key {key!r}); nothing released"
        )
    try:
        held: Held | None = parse_held(entry, layout.folder(name))
    except InvalidPool:
        held = None
    holder = held.target if held is not None else None
    target = args.target
    if target is not None and target != holder:
        # A prefix must name one target of the pool, or the check it stands for is a guess.
        targets = _targets(ctx.reader.folder(name), layout.folder(name))
        target = resolve_target(target, targets) or target
    if target is not None and holder is None:
        raise StateError(
            f"{key!r} does not hold a valid allocation, so it cannot match --target "
            f"{args.target!r}; nothing released (without --target it is deleted whatever it holds)"
        )
    if target is not None and holder != target:
        raise StateError(
            f"{ip} in pool {name!r} is held by {holder!r}, not by {target!r}; nothing released"
        )
    live = held is not None and not held.cooling
    if live and target is None and not args.force:
        # Freed under a running container, the address goes to the next one on the same
        # segment while the first still uses it: `check` cannot tell, only the runtime can.
        assert held is not None
        raise StateError(
            f"{ip} in pool {name!r} is held by container {held.target!r} ({_attachment(held)}); "
            "nothing released. If that container is gone, release it with "
            f"--target {held.target[:12]} (only while that container still holds it), or "
            "--force to release it whatever holds it"
        )
    if not kv.delete(key, entry.modify_index):
        now = kv.get(key)
        state = "is gone" if now is None else f"is now held by {_holder(now.value)!r}"
        raise StateError(
            f"{key!r} changed while releasing it and {state}; nothing released. Look again "
            f"with `allocations {name}`"
        )
    if held is None:
        was = "not a valid allocation"
    elif held.cooling:
        was = f"cooling down after {holder!r} released it"
    elif target is None:
        was = f"held by {holder!r}; --force: released without checking that it is gone"
    else:
        was = f"held by {holder!r}"
    print(f"released {ip} from pool {name} (was {was})")
    return OK


def _attachment(h: Held) -> str:
    parts = [f"interface {h.ifname}" if h.ifname else "every interface"]
    if h.network:
        parts.append(f"network {h.network}")
    if h.host:
        parts.append(f"host {h.host}")
    name = runtime_name(h)
    if name != "-":
        parts.append(f"name {name}")
    return ", ".join(parts)


def _targets(entries: Sequence[KVEntry], folder: str) -> set[str]:
    found = set()
    for entry in entries:
        if entry.key != folder:
            holder = _holder(entry.value)
            if holder is not None:
                found.add(holder)
    return found


def _holder(value: bytes) -> str | None:
    try:
        return load_allocation(value)["target"]
    except ValueError:
        return None


# -- check -------------------------------------------------------------------------------------
def check(ctx: Context, args: argparse.Namespace) -> int:
    layout = ctx.settings.layout
    if args.pools:
        names = [pool_name(n) for n in args.pools]
    # Before the pools are read: allocations written after that are not judged by the list.
    found = rec.check_survey(ctx, args)
    if not args.pools:
        listing = ctx.reader.listing()
        # Folders without a pool key hold orphaned allocations: check those too.
        names = sorted(set(listing.keys) | set(listing.folders))
    reports: list[Report] = []
    ranges_of: dict[str, list[IPRange]] = {}
    if not args.pools:
        for key, problem in listing.odd:
            odd = Report(key.removeprefix(layout.prefix))
            odd.add("invalid-key", [key], f"{key!r} is not a pool: {problem}; delete it")
            reports.append(odd)
    for name in names:
        read = ctx.reader.pool(name)
        entries = ctx.reader.folder(name)
        if read.entry is None and args.pools and all(e.key == layout.folder(name) for e in entries):
            raise StateError(f"pool {name!r} does not exist (no KV key {layout.pool_key(name)!r})")

        def tick(done: int, total: int, name: str = name) -> None:
            ctx.progress.count(f"checking {name}", done, total)

        report = audit_pool(layout, name, read.entry, entries, tick)
        if found is not None:
            rec.report_orphans(report, found, name, layout.folder(name), entries)
        reports.append(report)
        if read.ranges is not None:
            ranges_of[name] = read.ranges
        ctx.progress.clear()
    if args.pools:
        # The pools named are compared with every pool under the prefix.
        for other in ctx.reader.pools():
            if other.ranges is not None:
                ranges_of.setdefault(other.name, other.ranges)
    overlaps = overlapping_pools(ranges_of)
    for report in reports:
        report_overlaps(report, overlaps, layout)
    total = sum(len(r.problems) for r in reports)
    if args.json:
        print_json({"problems": total, "pools": [r.to_json() for r in reports]})
    else:
        if not reports:
            note(f"no pools under prefix {layout.prefix!r}")
        for r in reports:
            for p in r.problems:
                write_check_line(r.pool, p.kind, p.message)
            if r.problems:
                n, valid = len(r.problems), r.allocations
                write_check_line(r.pool, None, f"{n} problem(s), {valid} valid allocation(s)")
            else:
                write_check_line(r.pool, None, f"ok, {r.allocations} allocation(s)")
    return PROBLEMS if total else OK
