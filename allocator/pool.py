"""A pool as read from KV: its ranges and the allocations held in its folder."""

from __future__ import annotations

import hashlib
import ipaddress
import socket
import threading
import time
from bisect import bisect_left, insort
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeGuard

from .errors import InvalidPool, PoolFull, PoolMissing
from .layout import Layout
from .ranges import IPAddress, IPRange
from .schemas import load_allocation, load_ranges
from .store import KV, KVEntry, WatchableKV


@dataclass(frozen=True)
class Held:
    """One allocation key: who holds the address, and the ModifyIndex for CAS."""

    ip: IPAddress
    target: str
    key: str
    index: int
    ifname: str | None = None
    host: str | None = None
    value: bytes = b""  # the raw JSON: a rollback compares it, a take-over's restores it
    network: str | None = None
    call: str | None = None
    runtime: dict[str, str] | None = field(default=None, compare=False, hash=False)
    free_after: float | None = None
    at: float | None = None

    def reusable(self, now: float) -> bool:
        """A released address whose cool-down is over: free, though its key remains."""
        return self.free_after is not None and self.free_after <= now

    def owned_by(self, target: str, ifname: str | None = None, network: str | None = None) -> bool:
        # An allocation without ifname or network (upstream, older versions, other tools)
        # belongs to the whole container. A released one (cooling down) belongs to nobody.
        if self.target != target or self.free_after is not None:
            return False
        if network is not None and self.network is not None and self.network != network:
            return False
        return ifname is None or self.ifname is None or self.ifname == ifname


@dataclass
class Pool:
    """Ranges plus held addresses, with indexes kept up to date as addresses come and go, so
    picking an address or finding a container's costs O(log n), not a pass over the pool."""

    name: str
    ranges: list[IPRange]
    held: dict[IPAddress, Held] = field(default_factory=dict)
    # Served from the helper's cache, so possibly behind KV (see cni/helper/cache.py).
    cached: bool = False
    # ModifyIndex of the pool key the ranges came from: the helper's watcher compares it.
    ranges_index: int = 0
    _taken: dict[int, list[int]] = field(default_factory=dict, init=False, repr=False)
    _by_target: dict[str, list[Held]] | None = field(default=None, init=False, repr=False)
    # The helper shares one Pool between concurrent calls; the indexes must stay consistent.
    _lock: threading.RLock = field(default_factory=threading.RLock, init=False, repr=False)

    def range_for(self, ip: IPAddress) -> IPRange | None:
        return next((r for r in self.ranges if r.contains(ip)), None)

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
                index: dict[str, list[Held]] = {}
                for h in self.held.values():
                    index.setdefault(h.target, []).append(h)
                self._by_target = index
            for version in (4, 6):
                self.taken(version)
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
                candidates = [h for h in self.held.values() if h.target == target]
        found = [h for h in candidates if h.owned_by(target, ifname, network)]
        return sorted(found, key=lambda h: (h.ip.version, int(h.ip)))

    def taken(self, version: int) -> list[int]:
        if version not in self._taken:
            now = time.time()
            kind = _IPv4 if version == 4 else _IPv6
            # Held.reusable and sorted_ints inlined: this runs over every key of the pool.
            # A set: the run search assumes unique values, whatever spellings the keys had.
            live = {
                int(ip)
                for ip, h in self.held.items()
                if type(ip) is kind and (h.free_after is None or not h.free_after <= now)
            }
            self._taken[version] = sorted(live)
        return self._taken[version]

    def reserve_next_free(
        self, placeholder: Callable[[IPAddress], Held], spread: int | None = None
    ) -> tuple[IPAddress, IPRange, Held | None]:
        """Pick the next free address (see `next_free`) and mark it held before anyone else can
        pick it: in the helper, concurrent calls share this pool and would otherwise all race
        for one address. The placeholder is replaced by what KV says if the write loses. Also
        returns the cooled-down release the address still holds, if any: the write replaces
        that key."""
        with self._lock:
            ip, rng = self.next_free(spread)
            previous = self.held.get(ip)
            self.put(placeholder(ip))
            return ip, rng, previous

    def next_free(self, spread: int | None = None) -> tuple[IPAddress, IPRange]:
        """Without `spread`: the lowest free address, range by range in pool order.

        With `spread` (a call's `spread_key`): number the free addresses in that same order
        from 0 and take number `spread mod free`. Hosts bursting into one pool then pick
        addresses spread uniformly over its free space instead of all the lowest one, so few
        compare-and-set writes lose (each loss costs a Raft entry); any free address can
        still be picked, so a small pool fills completely."""
        if spread is None:
            for rng in self.ranges:
                ip = rng.lowest_free(self.taken(rng.version))
                if ip is not None:
                    return ip, rng
        else:
            counts = [rng.free_count(self.taken(rng.version)) for rng in self.ranges]
            total = sum(counts)
            if total > 0:
                n = spread % total
                for rng, count in zip(self.ranges, counts, strict=True):
                    if n < count:
                        found = rng.nth_free(self.taken(rng.version), n)
                        if found is not None:
                            return found, rng
                        break  # cannot happen: counts and search agree
                    n -= count
                # Overlapping ranges count an address twice; the lowest free one still serves.
                return self.next_free()
        raise PoolFull(f"pool {self.name!r} is full: all {self.capacity()} addresses are allocated")

    def capacity(self) -> int:
        return sum(r.size() for r in self.ranges)

    def free(self) -> int:
        """Addresses ADD could still hand out (held keys outside the ranges cost none)."""
        now = time.time()
        with self._lock:
            held = [
                ip
                for ip, h in self.held.items()
                if not h.reusable(now) and any(r.allocatable(ip) for r in self.ranges)
            ]
        return self.capacity() - len(held)

    def put(self, held: Held) -> None:
        """Record an allocation seen or made after the pool was read."""
        with self._lock:
            self.discard(held.ip)
            self.held[held.ip] = held
            if held.ip.version in self._taken:
                insort(self._taken[held.ip.version], int(held.ip))
            if self._by_target is not None:
                self._by_target.setdefault(held.target, []).append(held)

    def discard(self, ip: IPAddress) -> None:
        with self._lock:
            old = self.held.pop(ip, None)
            if old is None:
                return
            taken = self._taken.get(ip.version)
            if taken is not None:
                i = bisect_left(taken, int(ip))
                if i < len(taken) and taken[i] == int(ip):
                    del taken[i]
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
    entries: Iterable[KVEntry],
    known: Mapping[str, Held] | None = None,
) -> Pool:
    """Build a Pool from a prefix listing; entries of other pools sharing the prefix are ignored.
    `known` holds allocations parsed before: one whose ModifyIndex is unchanged is reused."""
    pool_key, folder = layout.pool_key(name), layout.folder(name)
    ranges_entry = None
    held: dict[IPAddress, Held] = {}
    for entry in entries:
        key = entry.key
        if key == pool_key:
            ranges_entry = entry
        elif key.startswith(folder) and key != folder:
            h = known.get(key) if known else None
            if h is None or h.index != entry.modify_index:
                h = parse_held(entry, folder)
            held[h.ip] = h
    if ranges_entry is None:
        raise PoolMissing(f"pool {name!r} does not exist: KV key {pool_key!r} is missing")
    try:
        ranges = load_ranges(ranges_entry.value)
    except ValueError as exc:
        raise InvalidPool(f"KV key {pool_key!r} does not hold valid IP Ranges: {exc}") from exc
    return Pool(name, ranges, held, ranges_index=ranges_entry.modify_index)


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


_new_object = object.__new__
_set_attribute = object.__setattr__


def parse_held(entry: KVEntry, folder: str) -> Held:
    key = entry.key
    name = key[len(folder) :]
    ip = _ip_of_key(name)
    if ip is None or "%" in name:
        # A scoped name (fd00::10%x) would be a second key for one address.
        raise InvalidPool(
            f"KV key {key!r} in the pool folder is not named after a plain IP address"
        )
    try:
        alloc = load_allocation(entry.value)
    except ValueError as exc:
        raise InvalidPool(f"KV key {key!r} does not hold a valid Allocation: {exc}") from exc
    # Held(...) of a frozen dataclass sets its twelve fields one object.__setattr__ at a time,
    # the largest single cost of reading a 60,000-key pool; its whole __dict__ at once is a
    # third of that and the same object (tests/unit/allocator/test_folder_validation.py
    # compares them).
    held = _new_object(Held)
    _set_attribute(
        held,
        "__dict__",
        {
            "ip": ip,
            "target": alloc["target"],
            "key": key,
            "index": entry.modify_index,
            "ifname": alloc["ifname"],
            "host": alloc["host"],
            "value": entry.value,
            "network": alloc["network"],
            "call": alloc["call"],
            "runtime": alloc.get("runtime"),
            "free_after": alloc.get("free_after"),
            "at": alloc.get("at"),
        },
    )
    return held


def list_pool(kv: KV, layout: Layout, name: str) -> tuple[list[KVEntry], int]:
    """The pool key and its folder's keys, as `parse_pool` takes them, with the folder's
    X-Consul-Index (0 from a KV that has none). Two reads, the key `<prefix>blue` then the
    folder `<prefix>blue/`, because one listing of the prefix `<prefix>blue` would also bring
    every key of `blue-v6`, `blue2`, ... (60,000 of them, for all we know). A missing pool key
    answers [] without listing; a key the token may not read raises (403) on the first read."""
    entry = kv.get(layout.pool_key(name))
    if entry is None:
        return [], 0
    folder = layout.folder(name)
    if _watchable(kv):
        entries, index = kv.list_after(folder)
    else:
        entries, index = kv.list(folder), 0
    return [entry, *entries], index


def _watchable(kv: KV) -> TypeGuard[WatchableKV]:
    # ConsulKV can list with the X-Consul-Index the helper's cache watches from; a plain KV
    # (the tests' in-memory one) lists without it.
    return hasattr(kv, "list_after")
