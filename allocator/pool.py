"""A pool as read from KV: its ranges and the allocations held in its folder."""

from __future__ import annotations

import hashlib
import ipaddress
import socket
import threading
from bisect import bisect_left, insort
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from itertools import compress, repeat
from typing import TypeGuard

from .errors import InvalidPool, PoolFull, PoolMissing
from .fastpath import HeldMap, load_allocation, make_held, parse_folder
from .held import Held
from .layout import Layout
from .ranges import IPAddress, IPRange
from .schemas import load_ranges
from .store import KV, Columns, KVEntry, WatchableKV
from .stripes import Stripe

__all__ = ["Held", "Pool", "ip_of_key", "key_ip", "list_pool", "parse_held", "parse_pool"]


@dataclass
class Pool:
    """Ranges plus held addresses, with indexes kept up to date as addresses come and go, so
    picking an address or finding a container's costs O(log n), not a pass over the pool."""

    name: str
    ranges: list[IPRange]
    held: MutableMapping[IPAddress, Held] = field(default_factory=dict)
    # Served from the helper's cache, so possibly behind KV (see cni/helper/cache.py).
    cached: bool = False
    # ModifyIndex of the pool key the ranges came from: the helper's watcher compares it.
    ranges_index: int = 0
    # A pool read through one stripe (allocator/stripes.py): it holds that stripe's keys only,
    # and picks only there. None: the whole folder.
    view: Stripe | None = None
    _taken: dict[int, list[int]] = field(default_factory=dict, init=False, repr=False)
    # Per range (by position): the taken addresses it blocks (IPRange.blocked_taken), kept up
    # to date with `_taken`, so a `spread` pick never walks a range's exclusions.
    _blocked: dict[int, list[int]] = field(default_factory=dict, init=False, repr=False)
    _by_target: dict[str, list[Held]] | None = field(default=None, init=False, repr=False)
    # The helper shares one Pool between concurrent calls; the indexes must stay consistent.
    _lock: threading.RLock = field(default_factory=threading.RLock, init=False, repr=False)
    _map: HeldMap = field(init=False, repr=False)
    _picking: list[IPRange] | None = field(default=None, init=False, repr=False)
    # Calls changed this copy since it was read (their own writes, or keys they re-read): a
    # watcher then cannot tell a value rewritten in place from a change it was told of.
    touched: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.held, HeldMap):
            self.held = HeldMap(dict(self.held))
        self._map = self.held
        self._map.lock = self._lock

    def range_for(self, ip: IPAddress) -> IPRange | None:
        return next((r for r in self.ranges if r.contains(ip)), None)

    @property
    def picking(self) -> list[IPRange]:
        """The ranges addresses are picked from: all of them, or their part in the view."""
        if self._picking is None:
            self._picking = self.ranges if self.view is None else self.view.clip(self.ranges)
        return self._picking

    def seen(self, ip: IPAddress) -> bool:
        """Whether this copy knows who holds `ip`: every address, or those of its view."""
        return self.view is None or self.view.holds(ip)

    @property
    def lock(self) -> threading.RLock:
        """Held to read a pool that calls may change meanwhile (the helper's copies)."""
        return self._lock

    def snapshot(self) -> list[Held]:
        """The allocations, copied under the lock: calls may be adding to them meanwhile."""
        with self._lock:
            return list(self.held.values())

    def cache_copy(self) -> Pool:
        """Mark this pool as the helper's cached copy, indexes built off the calls' path."""
        self.cached = True
        return self.indexed()

    def indexed(self) -> Pool:
        """Build the lookup indexes now (the helper does it off the calls' path)."""
        with self._lock:
            if self._by_target is None:
                self._map.make_all()
                index: dict[str, list[Held]] = {}
                for h in self.held.values():
                    index.setdefault(h.target, []).append(h)
                self._by_target = index
            for version in (4, 6):
                self.taken(version)
            for i in range(len(self.picking)):
                self.blocked_taken(i)
        return self

    def ours(
        self, target: str, ifname: str | None = None, network: str | None = None
    ) -> list[Held]:
        with self._lock:
            if self._by_target is not None or self.cached:
                mine = self.indexed()._by_target or {}
                candidates: Iterable[Held] = mine.get(target, ())
            else:
                # A pool read for one call is asked once or twice: one pass over it costs a
                # fraction of building the index of every container's addresses.
                candidates = self._map.of_target(target)
        found = [h for h in candidates if h.owned_by(target, ifname, network)]
        return sorted(found, key=lambda h: (h.ip.version, int(h.ip)))

    def taken(self, version: int) -> list[int]:
        if version not in self._taken:
            # A set: the run search assumes unique values, whatever spellings the keys had.
            self._taken[version] = sorted(self._map.live_ints(version))
        return self._taken[version]

    def blocked_taken(self, i: int) -> list[int]:
        """The taken addresses range `i` blocks (see `_blocked`)."""
        with self._lock:
            found = self._blocked.get(i)
            if found is None:
                rng = self.picking[i]
                found = self._blocked[i] = rng.blocked_taken(self.taken(rng.version))
            return found

    def reserve_next_free(
        self, placeholder: Callable[[IPAddress], Held], spread: int | None = None
    ) -> tuple[IPAddress, IPRange]:
        """Pick the next free address (see `next_free`) and mark it held before anyone else can
        pick it: in the helper, concurrent calls share this pool and would otherwise all race
        for one address. The placeholder is replaced by what KV says if the write loses."""
        with self._lock:
            ip, rng = self.next_free(spread)
            self.put(placeholder(ip))
            return ip, rng

    def next_free(self, spread: int | None = None) -> tuple[IPAddress, IPRange]:
        """Without `spread`: the lowest free address, range by range in pool order.

        With `spread` (a call's `spread_key`): number the free addresses in that same order
        from 0 and take number `spread mod free`. Hosts bursting into one pool then pick
        addresses spread uniformly over its free space instead of all the lowest one, so few
        compare-and-set writes lose (each loss costs a Raft entry); any free address can
        still be picked, so a small pool fills completely."""
        ranges = self.picking
        if spread is None:
            for rng in ranges:
                ip = rng.lowest_free(self.taken(rng.version))
                if ip is not None:
                    return ip, rng
        else:
            counts = [
                rng.free_count(self.taken(rng.version), self.blocked_taken(i))
                for i, rng in enumerate(ranges)
            ]
            total = sum(counts)
            if total > 0:
                n = spread % total
                for i, (rng, count) in enumerate(zip(ranges, counts, strict=True)):
                    if n < count:
                        found = rng.nth_free(self.taken(rng.version), n, self.blocked_taken(i))
                        if found is not None:
                            return found, rng
                        break  # cannot happen: counts and search agree
                    n -= count
                # Overlapping ranges count an address twice; the lowest free one still serves.
                return self.next_free()
        if self.view is not None:
            raise PoolFull(f"stripe {self.view.prefix}* of pool {self.name!r} is full")
        raise PoolFull(f"pool {self.name!r} is full: all {self.capacity()} addresses are allocated")

    def capacity(self) -> int:
        return sum(r.size() for r in self.picking)

    def free(self) -> int:
        """Addresses ADD could still hand out (held keys outside the ranges cost none)."""
        with self._lock:
            self._map.make_all()  # every key is looked at: made at once, not one read at a time
            held = [
                ip
                for ip, h in self.held.items()
                if any(r.allocatable(ip) for r in self.picking)
            ]
        return self.capacity() - len(held)

    def put(self, held: Held) -> None:
        """Record an allocation seen or made after the pool was read."""
        with self._lock:
            self.touched = True
            self.discard(held.ip)
            self.held[held.ip] = held
            if held.ip.version in self._taken:
                insort(self._taken[held.ip.version], int(held.ip))
                for i, blocked in self._blocked.items():
                    rng = self.picking[i]
                    if rng.version == held.ip.version and rng.blocks(int(held.ip)):
                        insort(blocked, int(held.ip))
            if self._by_target is not None:
                self._by_target.setdefault(held.target, []).append(held)

    def discard(self, ip: IPAddress) -> None:
        with self._lock:
            self.touched = True
            old = self.held.pop(ip, None)
            if old is None:
                return
            taken = self._taken.get(ip.version)
            if taken is not None:
                i = bisect_left(taken, int(ip))
                if i < len(taken) and taken[i] == int(ip):
                    del taken[i]
                    for blocked in self._blocked.values():
                        j = bisect_left(blocked, int(ip))
                        if j < len(blocked) and blocked[j] == int(ip):
                            del blocked[j]
            if self._by_target is not None and old in self._by_target.get(old.target, []):
                self._by_target[old.target].remove(old)


def spread_key(host: str, network: str, target: str, ifname: str | None, pool: str) -> int:
    """The number a call's `spread` pick is taken modulo the pool's free addresses: the first
    8 bytes (big-endian) of SHA-256 over the host, network, container ID, interface and pool,
    each followed by a NUL byte. A pure function of the call, so the address it gets can be
    worked out from KV; it differs between containers, so concurrent calls rarely meet."""
    parts = (host, network, target, ifname or "", pool)
    digest = hashlib.sha256(b"".join(p.encode() + b"\0" for p in parts)).digest()
    return int.from_bytes(digest[:8], "big")


def parse_pool(
    layout: Layout,
    name: str,
    entries: Sequence[KVEntry],
    known: Mapping[str, Held] | None = None,
    view: Stripe | None = None,
) -> Pool:
    """Build a Pool from a prefix listing; entries of other pools sharing the prefix are ignored.
    `known` holds allocations parsed before: one whose ModifyIndex is unchanged is reused.
    `view`: the listing is of one stripe's keys (allocator/stripes.py)."""
    pool_key, folder = layout.pool_key(name), layout.folder(name)
    listing = Columns.of(entries)
    keys = listing.keys
    rows = _folder_rows(keys, folder)
    if keys.count(folder) == 1:
        rows.remove(keys.index(folder))
    elif folder in keys:  # a hand-made listing (Consul names a key once)
        rows = [i for i in rows if keys[i] != folder]
    held = None if known else parse_folder(listing, rows, folder)
    if held is None:
        held = HeldMap(_held_one_by_one(listing, rows, folder, known))
    if pool_key not in keys:
        raise PoolMissing(f"pool {name!r} does not exist: KV key {pool_key!r} is missing")
    at = len(keys) - 1 - keys[::-1].index(pool_key)  # the last, should a key come twice
    try:
        ranges = load_ranges(listing.values[at])
    except ValueError as exc:
        raise InvalidPool(f"KV key {pool_key!r} does not hold valid IP Ranges: {exc}") from exc
    return Pool(name, ranges, held, ranges_index=listing.indexes[at], view=view)


def ip_of_key(name: str) -> IPAddress | None:
    """The address a key of a pool folder is named after (any spelling), None if none."""
    return _ip_of_key(name)


def sketch_pool(name: str, ranges: list[IPRange], keys: Sequence[str], folder: str) -> Pool:
    """The pool as its key names show it (one cheap listing instead of every value): each
    address named is taken, whoever holds it, a release cooling down included. Enough to find
    where there is room; the write is a compare-and-set anyway."""
    held: dict[IPAddress, Held] = {}
    for key in keys:
        if key.startswith(folder) and key != folder:
            ip = _ip_of_key(key[len(folder) :])
            if ip is not None:
                held[ip] = Held(ip, "?", key, 0)
    return Pool(name, ranges, held)


def _folder_rows(keys: list[str], folder: str) -> list[int]:
    """Where the keys under `folder` are. `list_pool` gives the pool key, then the folder's
    keys: when the least and the greatest of those start with the folder, every key between
    them does (it shares their common prefix), so two C-level passes of comparisons stand in
    for a `startswith` call per key."""
    first = 1 if keys and not keys[0].startswith(folder) else 0
    if len(keys) - first > 1:
        rest = keys[first:]
        if min(rest).startswith(folder) and max(rest).startswith(folder):
            return list(range(first, len(keys)))
    return list(compress(range(len(keys)), map(str.startswith, keys, repeat(folder))))


def _held_one_by_one(
    listing: Columns, rows: list[int], folder: str, known: Mapping[str, Held] | None
) -> dict[IPAddress, Held]:
    """Each key judged on its own: the first invalid one raises, in listing order."""
    held: dict[IPAddress, Held] = {}
    keys, values, indexes = listing.keys, listing.values, listing.indexes
    for i in rows:
        h = known.get(keys[i]) if known else None
        if h is None or h.index != indexes[i]:
            h = parse_held(KVEntry(keys[i], values[i], indexes[i]), folder)
        held[h.ip] = h
    return held


_AF_INET, _AF_INET6 = socket.AF_INET, socket.AF_INET6
_inet_pton, _inet_ntop = socket.inet_pton, socket.inet_ntop
_IPv4, _IPv6 = ipaddress.IPv4Address, ipaddress.IPv6Address


def _ip_of_key(name: str) -> IPAddress | None:
    """The address a key is named after, None when it is not a plain one.

    A pool holds tens of thousands of keys, and ipaddress parses a name in Python. Dotted quads
    go through inet_pton, which takes exactly what ipaddress takes for them (four decimal
    octets up to 255, no leading zeros) at a tenth of the cost. An IPv6 name is taken from
    inet_pton only when inet_ntop spells the result back exactly as the name: that canonical
    form is one ipaddress reads as the same address. Any other spelling (a scope, leading
    zeros, capitals, an embedded IPv4 part) is left to ipaddress, as before."""
    try:
        if ":" not in name:
            return _IPv4(int.from_bytes(_inet_pton(_AF_INET, name)))
        packed = _inet_pton(_AF_INET6, name)
        if _inet_ntop(_AF_INET6, packed) == name:
            return _IPv6(int.from_bytes(packed))
    except (OSError, UnicodeEncodeError, ValueError):
        pass
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def key_ip(key: str, folder: str) -> IPAddress:
    """The address a key of the pool folder is named after; InvalidPool naming the key when it
    is not one plain address. A name holding '/' (a key in a sub-folder, or one that climbs
    out with `..`), '%' (a scope, an encoded slash) or anything else is no address: it is
    judged here, before anything is read by its name."""
    name = key[len(folder) :]
    ip = _ip_of_key(name)
    if ip is None or "%" in name:
        # A scoped name (fd00::10%x) would be a second key for one address.
        raise InvalidPool(
            f"KV key {key!r} in the pool folder is not named after a plain IP address"
        )
    return ip


def parse_held(entry: KVEntry, folder: str) -> Held:
    key = entry.key
    ip = key_ip(key, folder)
    try:
        alloc = load_allocation(entry.value)
    except ValueError as exc:
        raise InvalidPool(f"KV key {key!r} does not hold a valid Allocation: {exc}") from exc
    return make_held(ip, key, entry.modify_index, entry.value, alloc)


def list_pool(
    kv: KV, layout: Layout, name: str, within: str = "", pool_key: KVEntry | None = None
) -> tuple[Columns, int]:
    """The pool key and its folder's keys (those starting with `within`: a stripe's), as
    `parse_pool` takes them, with the listing's X-Consul-Index (0 from a KV that has none). Two
    reads, the key `<prefix>blue` then the folder `<prefix>blue/`, because one listing of the
    prefix `<prefix>blue` would also bring every key of `blue-v6`, `blue2`, ... (60,000 of
    them, for all we know). A missing pool key answers [] without listing; a key the token may
    not read raises (403) on the first read. `pool_key`: the pool key, already read."""
    entry = pool_key or kv.get(layout.pool_key(name))
    if entry is None:
        return Columns([], [], []), 0
    folder = layout.folder(name) + within
    if _watchable(kv):
        entries, index = kv.list_after(folder)
    else:
        entries, index = kv.list(folder), 0
    return Columns.of([entry]) + entries, index


def _watchable(kv: KV) -> TypeGuard[WatchableKV]:
    # ConsulKV can list with the X-Consul-Index the helper's cache watches from; a plain KV
    # (the tests' in-memory one) lists without it.
    return hasattr(kv, "list_after")
