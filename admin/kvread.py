"""Reading pools for the admin commands: which pools exist under the prefix, a pool's
ranges, its folder. Writes go straight through `ConsulKV`'s CAS calls in the commands."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..allocator.layout import FENCES, Layout, check_pool_name
from ..allocator.ranges import IPRange
from ..allocator.schemas import load_ranges
from ..allocator.store import KVEntry
from ..consul import ConsulClient, ConsulKV
from .errors import StateError
from .output import Progress, note


@dataclass(frozen=True)
class Listing:
    """Names found directly under the prefix."""

    keys: list[str]  # `<prefix><name>` keys: pool candidates
    folders: list[str]  # `<prefix><name>/` folders (with or without a folder key)
    # Consul's index of the prefix when listed: every key under it written before the listing
    # has a ModifyIndex at most this, every key written after a higher one.
    index: int = 0
    # Keys and folders under the prefix whose name no pool may have (`..`, `a%2Fb`, an empty
    # segment), with why: never read by their names (consul/kv.py refuses to), `check` reports
    # them.
    odd: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class PoolRead:
    name: str
    entry: KVEntry | None  # the `<prefix><name>` key
    ranges: list[IPRange] | None = None
    error: str | None = None  # why `entry` holds no usable ranges


class Reader:
    def __init__(
        self, client: ConsulClient, kv: ConsulKV, layout: Layout, progress: Progress
    ) -> None:
        self.client = client
        self.kv = kv
        self.layout = layout
        self.progress = progress

    def listing(self) -> Listing:
        """One `?keys&separator=/` call: names only, never the allocations of every pool."""
        prefix = self.layout.prefix
        listed = self.kv.names(prefix, separator="/")
        found = listed.keys
        if listed.acl_filtered:
            note(f"some keys under {prefix!r} are hidden by ACLs: the token cannot read them")
        if not found and prefix:
            # Consul drops unreadable keys from listings without an error, so a token without
            # read access would see "no pools". Reading the prefix key itself answers 403 then.
            self.kv.get(prefix)
        names = [k[len(prefix) :] for k in found if k.startswith(prefix) and k != prefix]
        # The attachment fences live beside the pools; they are no pool's folder.
        names = [n for n in names if n not in (FENCES, f"{FENCES}/")]
        keys = sorted(n for n in names if n and not n.endswith("/"))
        folders = sorted(n[:-1] for n in names if n.endswith("/") and "/" not in n[:-1])
        odd = [(f"{prefix}{n}", p) for n in names if (p := check_pool_name(n.removesuffix("/")))]
        for key, problem in odd:
            note(f"skipping {key!r}: not a pool ({problem})")
        return Listing(
            [n for n in keys if not check_pool_name(n)],
            [n for n in folders if not check_pool_name(n)],
            listed.index,
            sorted(odd),
        )

    def pool(self, name: str) -> PoolRead:
        entry = self.kv.get(self.layout.pool_key(name))
        read = PoolRead(name, entry)
        if entry is not None:
            try:
                read.ranges = load_ranges(entry.value)
            except ValueError as exc:
                read.error = str(exc)
        return read

    def usable_pool(self, name: str) -> PoolRead:
        """The pool with its ranges, or a StateError saying why it cannot be used."""
        read = self.pool(name)
        key = self.layout.pool_key(name)
        if read.entry is None:
            raise StateError(
                f"pool {name!r} does not exist (no KV key {key!r} under prefix "
                f"{self.layout.prefix!r}); see `list`, or create it with `create`"
            )
        if read.ranges is None:
            raise StateError(
                f"pool {name!r} is unusable: KV key {key!r} does not hold valid IP ranges "
                f"({read.error}); fix it with `create {name} --force ...`"
            )
        return read

    def pools(self) -> list[PoolRead]:
        """Every key directly under the prefix, read; callers decide what to do with non-pools."""
        names = self.listing().keys
        out = []
        for i, name in enumerate(names, 1):
            self.progress.count("reading pools", i, len(names))
            out.append(self.pool(name))
        self.progress.clear()
        return out

    def folder(self, name: str) -> list[KVEntry]:
        """Every key under `<prefix><name>/` (the folder key included), sorted by key."""
        folder = self.layout.folder(name)
        self.progress.status(f"reading {folder} from Consul ...")
        try:
            entries = self.kv.list(folder)
        finally:
            self.progress.clear()
        return sorted(entries, key=lambda e: e.key)
