"""`reconcile`: release this host's allocations whose containers the runtime no longer has.

Runtimes that never call CNI GC (Podman's CNI backend, Nomad) leave an address allocated for
every container removed while Consul was unreachable: their DEL failed, they removed the
container anyway and never retry. The
runtime's own list of containers is the truth: every allocation this host wrote for a
container not in it is an orphan.

Safety, in the order it is applied:
- only allocations that record this host (`host`); ones recording none are never touched;
- only allocations written before the live list was taken, judged by Consul's index, not by a
  clock: with --live-cmd, the index read just before the runtime is asked; with --live-ids (a
  list this process cannot date: `podman ps | reconcile` runs the listing before this process
  has even started), the index an earlier run of reconcile recorded in this host's state
  folder at least --settle seconds before (this host's monotonic clock): a container that
  started since may hold an address and not be in the list. The first run records it, and
  judges nothing;
- each release goes through the allocator as the plugin's own do: the attachment's fence first
  (a late write of it can never land after it), then a compare-and-set delete of the version
  read after the fence (a key re-allocated meanwhile stays), or, with --reuse-after, a release
  cooling down that Consul ends.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

from ..allocator.allocate import FENCE_LIFETIME, Allocator, Attachment
from ..allocator.errors import InvalidPool
from ..allocator.layout import check_pool_name
from ..allocator.pool import Held, parse_held
from ..allocator.store import KVEntry
from ..cni.state import SESSION_PERIOD, MemorySessions, open_state, state_dir_path
from ..cni.state import StateError as FolderError
from .errors import OK, STATE, StateError, UsageError
from .ids import LiveIDs, parse_live_ids, read_live_ids
from .output import note, print_json

if TYPE_CHECKING:
    from ..consul import ConsulKV
    from .audit import Report
    from .kvread import Reader
    from .output import Progress
    from .settings import Settings


class Context(Protocol):
    """What reconcile reads of the CLI's context (commands.Context), which imports this
    module: a protocol here keeps the imports one way."""

    @property
    def settings(self) -> Settings: ...
    @property
    def progress(self) -> Progress: ...
    @property
    def kv(self) -> ConsulKV: ...
    @property
    def reader(self) -> Reader: ...

# A runtime's listing that takes longer than this is stuck (its daemon is down).
LIVE_CMD_TIMEOUT = 120.0


# What became of an orphan: "recent" ones are not judged this run, "changed" ones were
# re-allocated between the read and the release, "gone" ones released by someone else.
Action = Literal["would-release", "released", "gone", "changed", "recent", "failed"]


@dataclass
class Orphan:
    pool: str
    held: Held
    action: Action = "would-release"
    reason: str = ""

    def to_json(self) -> dict[str, object]:
        h = self.held
        return {
            "pool": self.pool,
            "ip": str(h.ip),
            "key": h.key,
            "target": h.target,
            "ifname": h.ifname,
            "network": h.network,
            "action": self.action,
            **({"reason": self.reason} if self.reason else {}),
        }

    def describe(self) -> str:
        h = self.held
        parts = [f"target {h.target}"]
        if h.ifname:
            parts.append(f"ifname {h.ifname}")
        if h.network:
            parts.append(f"network {h.network}")
        return f"{self.pool} {h.ip} ({', '.join(parts)})"


@dataclass
class Survey:
    """This host's allocations split by whether their containers are alive."""

    host: str
    live: LiveIDs
    pools: list[str]
    watermark: int
    orphans: list[Orphan] = field(default_factory=list)
    kept: int = 0  # this host's allocations of live containers
    foreign: int = 0  # allocations of other hosts, or recording no host
    filtered: int = 0  # this host's allocations on other networks than --network
    invalid: int = 0  # keys that are not valid allocations (see `check`)


def this_host(args: argparse.Namespace) -> str:
    given = getattr(args, "host", None)
    if given is not None:
        if not given.strip():
            # An empty identity would match allocations that record no host: never ours.
            raise UsageError("--host cannot be empty: give the plugin's ipam.host, or omit it")
        return str(given)
    # The identity the plugin records when `ipam.host` is not set: same function, same answer.
    from ..cni.config import default_host

    return default_host()


def live_and_watermark(ctx: Context, args: argparse.Namespace) -> tuple[LiveIDs, int]:
    """The live list and the KV index up to which allocations are judged by it.

    An allocation is judged only if it was written before the list was taken, so its
    container, if alive, is in the list:
    - --live-cmd: the index first, then (after --settle seconds, for runtimes that list a
      sandbox only once its network is up, as containerd's CRI does) the command: exact;
    - --live-ids (a file, or stdin): the list was taken before this process can tell (a
      pipeline runs `podman ps` while this one starts up), so the index is the one an earlier
      run recorded at least --settle seconds ago; the first run records one and judges nothing.
    """
    reader = ctx.reader
    if args.live_cmd is not None:
        index = reader.listing().index
        if args.settle > 0:
            time.sleep(args.settle)
        live = run_live_cmd(args.live_cmd)
        require_live(live, args.allow_empty)
        return live, index
    live = read_live_ids(args.live_ids)  # first: a bad list fails before any Consul traffic
    require_live(live, args.allow_empty)
    now = reader.listing().index
    return live, earlier_index(ctx, args, now)


def earlier_index(ctx: Context, args: argparse.Namespace, now: int) -> int:
    """The index an earlier run recorded at least --settle seconds ago (0: none), and this
    run's recorded for the next."""
    key = "\0".join(
        ["reconcile", this_host(args), *ctx.settings.servers, ctx.settings.layout.prefix]
    )
    try:
        state = open_state(getattr(args, "state_dir", None) or state_dir_path(os.environ))
    except FolderError as exc:
        note(f"{exc}: --live-ids judges no allocation without it (use --live-cmd)")
        return 0
    try:
        seen = state.observed(key)
        if seen is None or seen[1] < args.settle:
            note(
                "no earlier run recorded Consul's state at least "
                f"{args.settle:g} s ago: allocations are judged from the next run on "
                "(--live-cmd judges at once)"
            )
            if seen is None or seen[0] > now:
                state.observe(key, now)
            return 0
        state.observe(key, now)
        return min(seen[0], now)
    finally:
        state.close()


def run_live_cmd(command: str) -> LiveIDs:
    """Run the runtime's listing command; a failure is never an empty list."""
    try:
        done = subprocess.run(
            ["/bin/sh", "-c", command],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=LIVE_CMD_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        raise UsageError(
            f"--live-cmd {command!r} did not finish within {LIVE_CMD_TIMEOUT:g} s; nothing done"
        ) from None
    if done.returncode != 0:
        said = done.stderr.decode(errors="replace").strip().splitlines()
        why = f": {said[-1][:200]}" if said else ""
        raise UsageError(
            f"--live-cmd {command!r} failed (exit status {done.returncode}){why}; nothing done"
        )
    return parse_live_ids(done.stdout.decode(errors="replace"), f"--live-cmd {command!r}")


def fresh_budget(ctx: Context) -> None:
    """--timeout bounds the Consul work; waiting for the runtime's listing and the settle time
    are not Consul's, and each release gets the whole budget again, so a long list of orphans
    is not cut short halfway."""
    ctx.reader.client.deadline.extend(ctx.settings.timeout)


def require_live(live: LiveIDs, allow_empty: bool) -> None:
    if not live.ids and not allow_empty:
        raise UsageError(
            f"the live list ({live.source}) names no container: taken as the truth it would "
            "release every allocation of this host. If the host really runs no container, "
            "add --allow-empty; otherwise check the command that lists them"
        )


def survey_pool(
    survey: Survey,
    name: str,
    folder: str,
    entries: Sequence[KVEntry],
    networks: Sequence[str] | None = None,
) -> None:
    """Sort one pool's allocations into the survey."""
    for entry in entries:
        if entry.key == folder or not entry.key.startswith(folder):
            continue
        try:
            held = parse_held(entry, folder)
        except InvalidPool:
            survey.invalid += 1
            continue
        if held.host is None or held.host != survey.host:
            survey.foreign += 1
            continue
        if networks and held.network not in networks:
            survey.filtered += 1
            continue
        if survey.live.keeps(held.target):
            survey.kept += 1
            continue
        orphan = Orphan(name, held)
        if held.index > survey.watermark:
            orphan.action = "recent"
            orphan.reason = "written after the live list may have been taken: its container "
            orphan.reason += "may be newer than the list; a later run judges it"
        survey.orphans.append(orphan)


def pools_to_scan(ctx: Context, names: Sequence[str] | None) -> list[str]:
    if names:
        for n in names:
            problem = check_pool_name(n)
            if problem:
                raise UsageError(problem)
        return list(dict.fromkeys(names))
    listing = ctx.reader.listing()
    # Folders without a pool key still hold allocations that count.
    return sorted(set(listing.keys) | set(listing.folders))


def survey(ctx: Context, args: argparse.Namespace) -> Survey:
    live, watermark = live_and_watermark(ctx, args)
    fresh_budget(ctx)
    names = pools_to_scan(ctx, args.pool)
    result = Survey(this_host(args), live, names, watermark)
    layout = ctx.settings.layout
    reader = ctx.reader
    for name in names:
        folder = layout.folder(name)
        entries = reader.folder(name)
        if args.pool and not entries and reader.pool(name).entry is None:
            raise StateError(
                f"pool {name!r} does not exist (no KV key {layout.pool_key(name)!r}); see `list`"
            )
        survey_pool(result, name, folder, entries, args.network)
    return result


def check_survey(ctx: Context, args: argparse.Namespace) -> Survey | None:
    """`check --live-ids`: the live list, read as reconcile reads it; None without one."""
    if args.live_ids is None and args.live_cmd is None:
        return None
    live, watermark = live_and_watermark(ctx, args)
    fresh_budget(ctx)
    return Survey(this_host(args), live, [], watermark)


def report_orphans(
    report: Report, base: Survey, name: str, folder: str, entries: Sequence[KVEntry]
) -> None:
    """Add this pool's orphans to its `check` report (allocations newer than the live list
    are not judged)."""
    found = Survey(base.host, base.live, [name], base.watermark)
    survey_pool(found, name, folder, entries)
    for o in found.orphans:
        if o.action == "recent":
            continue
        report.add(
            "orphaned-allocation",
            [o.held.key],
            f"{o.held.ip} is held by {o.held.target!r} (ifname {o.held.ifname or '-'}, host "
            f"{base.host}), which is not in the live list ({base.live.source}); release it "
            "with `reconcile --live-ids ... --apply`",
        )


def release(ctx: Context, host: str, orphan: Orphan, reuse_after: float = 0.0) -> None:
    """As the plugin releases (allocator/allocate.py): the attachment's fence first, then the
    version read after it, compare-and-set (or, `reuse_after`, a release cooling down)."""
    h = orphan.held
    allocator = Allocator(
        ctx.kv, ctx.settings.layout, host=host,
        sessions=MemorySessions("ipam-da-consul fences (reconcile)",
                                FENCE_LIFETIME + SESSION_PERIOD),
        cooling=MemorySessions(f"ipam-da-consul releases (reconcile), {reuse_after:g} s",
                               max(10.0, reuse_after + max(10.0, reuse_after / 10)))
        if reuse_after > 0 else None,
    )
    allocator.raise_fence("reconcile", Attachment(h.network or "", h.target, h.ifname))
    # Behind the fence nothing of that attachment can land any more: the version read now
    # is its last (a late write may have landed before the fence).
    try:
        now = allocator.lookup_key(h.key, consistent=True)
    except InvalidPool:
        now = None
        orphan.reason = "now holds an invalid value; left alone"
    if now is None and not orphan.reason:
        orphan.action = "gone"
        orphan.reason = "released by someone else meanwhile"
        return
    same = now is not None and (now.target, now.ifname, now.network, now.host) == (
        h.target, h.ifname, h.network, h.host)
    if now is None or not same or now.cooling:
        # Re-allocated meanwhile (a new container, another host): not ours to judge now.
        orphan.action = "changed"
        holder = "an invalid value" if now is None else f"target {now.target!r}"
        orphan.reason = orphan.reason or f"changed meanwhile and now holds {holder}; left alone"
        return
    if allocator.release(now, cool=reuse_after > 0):
        orphan.action = "released"
        return
    orphan.action = "failed"
    orphan.reason = "the key changed under the compare-and-set delete"


def reconcile(ctx: Context, args: argparse.Namespace) -> int:
    found = survey(ctx, args)
    todo = [o for o in found.orphans if o.action == "would-release"]
    if args.apply:
        for i, orphan in enumerate(todo, 1):
            ctx.progress.count("releasing", i, len(todo))
            fresh_budget(ctx)
            release(ctx, found.host, orphan, args.reuse_after)
        ctx.progress.clear()
    failed = [o for o in found.orphans if o.action == "failed"]
    if args.json:
        print_json(_json(found, args.apply))
    else:
        _text(found, args.apply)
    return STATE if failed else OK


def _json(found: Survey, applied: bool) -> dict[str, object]:
    counts: dict[str, int] = {}
    for o in found.orphans:
        counts[o.action] = counts.get(o.action, 0) + 1
    return {
        "host": found.host,
        "applied": applied,
        "pools": found.pools,
        "liveIds": len(found.live.ids),
        "kept": found.kept,
        "otherHosts": found.foreign,
        "otherNetworks": found.filtered,
        "invalidKeys": found.invalid,
        "counts": counts,
        "orphans": [o.to_json() for o in found.orphans],
    }


_VERBS: dict[Action, str] = {
    "would-release": "would release",
    "released": "released",
    "gone": "already gone",
    "changed": "left",
    "recent": "skipped",
    "failed": "FAILED to release",
}


_COUNTED: dict[Action, str] = {
    "would-release": "to release",
    "released": "released",
    "gone": "already gone",
    "changed": "left (changed meanwhile)",
    "recent": "skipped (newer than this run)",
    "failed": "failed",
}


def _text(found: Survey, applied: bool) -> None:
    for o in found.orphans:
        line = f"{_VERBS[o.action]} {o.describe()}"
        print(f"{line}: {o.reason}" if o.reason else line)
    if found.invalid:
        note(f"{found.invalid} key(s) are not valid allocations and were not judged; see `check`")
    counts: dict[Action, int] = {}
    for o in found.orphans:
        counts[o.action] = counts.get(o.action, 0) + 1
    done = ", ".join(f"{n} {_COUNTED[a]}" for a, n in counts.items()) or "nothing to release"
    where = f"host {found.host}, {len(found.pools)} pool(s)"
    summary = f"{done}; {found.kept} kept (container live) [{where}]"
    if not applied and counts.get("would-release"):
        summary = f"dry run: {summary}; add --apply to release"
    print(summary)
