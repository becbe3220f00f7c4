"""Allocator operations over a `KV` store: read pools, claim, take over and release addresses.

Every write is a compare-and-set, so two writers can never both believe they hold a key.

Writes of an attachment are fenced. A write whose reply was lost (a timeout, a resend after
failover, a request a follower forwards once a leader is elected) can be applied by Consul
seconds after the call that sent it gave up, after the runtime's cleanup DEL found nothing.
So each attachment (network, container, ifname) has a fence key: every allocation write is a
transaction that also checks the fence is where this call last saw it, and DEL, GC and a
rollback of in-doubt writes raise the fence first. A write sent before the fence was raised
can then never apply, and a listing read after it sees every write that did.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from loguru import logger

from .errors import InvalidPool, NotInPool, WriteConflict
from .layout import Layout
from .pool import Held, Pool, list_pool, parse_held, parse_pool
from .ranges import IPAddress, IPRange
from .schemas import dump_allocation, dump_fence, dump_tombstone, fence_time
from .store import KV, Cas, Check, DeleteCas, KVEntry, Op, Set, TxnResult, key_problem

# A fence must outlive any write sent before it. Consul applies a forwarded write within its
# RPC hold time (7 s) plus a raft apply; an hour leaves a wide margin.
FENCE_TTL = 3600.0
# Consul refuses transactions of more than 64 operations.
_TXN_MAX = 64


@dataclass(frozen=True)
class Attachment:
    """What CNI calls an attachment: one interface of one container on one network."""

    network: str
    target: str
    ifname: str | None

    @property
    def recorded_network(self) -> str | None:
        # A config without a name records none, and GC then never releases its keys.
        return self.network or None


@dataclass(frozen=True)
class Claim:
    """A write this call sent: the exact bytes, and what the key held before (None: absent).

    `won`: Consul said it applied. Otherwise the outcome is unknown (a lost reply, a resend
    after failover): the write may still apply, so the call fences it before it returns.
    """

    key: str
    ip: IPAddress
    value: bytes
    previous: bytes | None
    won: bool = False
    index: int = 0
    doubtful: bool = False


class CachedPools(Protocol):
    """Pools kept between calls (the helper's PoolCache, cni/helper/cache.py)."""

    def get(self, name: str, load: Callable[[], tuple[Sequence[KVEntry], int]]) -> Pool:
        """The kept copy of the pool; `load` lists it (entries and index) the first time."""


class Allocator:
    def __init__(
        self,
        kv: KV,
        layout: Layout | None = None,
        host: str | None = None,
        cache: CachedPools | None = None,
        attachment: Attachment | None = None,
        call: str | None = None,
        before_write: Callable[[], None] | None = None,
        runtime: dict[str, str] | None = None,
    ) -> None:
        self.kv = kv
        self.layout = layout or Layout()
        self.host = host
        self.cache = cache
        self.attachment = attachment
        self.call = call
        self.before_write = before_write or (lambda: None)
        self.runtime = runtime
        # One value per call: a rollback compares bytes, so they must not change within it.
        self.started_at = time.time()
        # Where this call last saw the attachment's fence; 0: absent, the common case, so the
        # first write needs no read of it.
        self.fence_index = 0

    # -- reading ----------------------------------------------------------------------------
    def load(self, name: str, fresh: bool = False) -> Pool:
        """Ranges and allocations in one listing of the pool key's prefix (or the helper's
        cached copy of it, unless `fresh`)."""
        if self.cache is not None and not fresh:
            return self.cache.get(name, lambda: self._listing(name))
        entries, _ = self._listing(name)
        return parse_pool(self.layout, name, entries)

    def _listing(self, name: str) -> tuple[Sequence[KVEntry], int]:
        return list_pool(self.kv, self.layout, name)

    def load_ranges(self, name: str) -> Pool:
        """The pool's ranges alone (one small read), for calls that look up single keys."""
        entry = self.kv.get(self.layout.pool_key(name))
        return parse_pool(self.layout, name, [entry] if entry is not None else [])

    def recheck(self, pool: Pool, ip: IPAddress) -> None:
        """Re-read one allocation key and fold it into `pool`."""
        self._fold(pool, ip, self.kv.get(self.layout.allocation_key(pool.name, ip)))

    def _fold(self, pool: Pool, ip: IPAddress, entry: KVEntry | None) -> None:
        if entry is None:
            pool.discard(ip)
        else:
            pool.put(parse_held(entry, self.layout.folder(pool.name)))

    def still_ours(self, pool: Pool, held: Held) -> bool:
        """A freshly listed pool is the truth; a cached one is confirmed key by key."""
        if not pool.cached:
            return True
        self.recheck(pool, held.ip)
        current = pool.held.get(held.ip)
        return current is not None and self.owns(current)

    def owns(self, held: Held) -> bool:
        a = self.attachment
        return a is not None and held.owned_by(a.target, a.ifname, a.recorded_network)

    def _probe(self, key: str) -> None:
        # Consul drops keys the ACL token may not read from a listing and answers an empty one
        # with 404, so "no such pool" and "no permission" look alike. A read of the key itself
        # answers 403 instead, which the KV layer raises as a permission error.
        self.kv.get(key)

    def lookup(self, pool: str, ip: IPAddress) -> Held | None:
        entry = self.kv.get(self.layout.allocation_key(pool, ip))
        return None if entry is None else parse_held(entry, self.layout.folder(pool))

    def lookup_key(self, held: Held) -> Held | None:
        entry = self.kv.get(held.key)
        if entry is None:
            return None
        return parse_held(entry, _folder_of(entry.key))

    def scan(self, pool: str, on_invalid: Callable[[str], None]) -> list[Held]:
        """Every valid allocation in the pool folder; unreadable keys go to `on_invalid`."""
        folder = self.layout.folder(pool)
        entries = self.kv.list(folder)
        if not entries:
            self._probe(folder)
        out = []
        for entry in entries:
            if entry.key == folder:
                continue
            try:
                out.append(parse_held(entry, folder))
            except InvalidPool as exc:
                on_invalid(str(exc))
        return out

    def requested_range(self, pool: Pool, ip: IPAddress) -> IPRange:
        rng = pool.range_for(ip)
        if rng is None:
            raise NotInPool(f"requested IP {ip} is not in any range of pool {pool.name!r}")
        if rng.exclusion(ip) is not None:
            raise NotInPool(f"requested IP {ip} is excluded from the ranges of pool {pool.name!r}")
        if not rng.allocatable(ip):
            raise NotInPool(
                f"requested IP {ip} is the network, broadcast or gateway address of {rng.subnet}"
            )
        return rng

    # -- allocating -------------------------------------------------------------------------
    def value(self) -> bytes:
        a = self._attachment()
        return dump_allocation(
            a.target,
            a.ifname,
            self.host,
            a.recorded_network,
            self.call,
            self.runtime,
            self.started_at,
        )

    def ours_to_be(self, pool: Pool, ip: IPAddress) -> Held:
        """The allocation we are about to write. ModifyIndex 0 is unknown: a CAS delete with it
        fails and re-reads the key."""
        a = self._attachment()
        key = self.layout.allocation_key(pool.name, ip)
        return Held(
            ip, a.target, key, 0, a.ifname, self.host, self.value(), a.recorded_network, self.call
        )

    def claim(self, pool: Pool, ip: IPAddress, over: Held | None = None) -> Claim:
        """Create the allocation key if absent, or replace `over`, a release whose cool-down
        is over (`won` False when someone else got there first)."""
        held = self.ours_to_be(pool, ip)
        if over is not None and over.free_after is not None:
            return self._write(pool, ip, Cas(held.key, held.value, over.index), over.value)
        return self._write(pool, ip, Cas(held.key, held.value, 0), None)

    def take_over(self, pool: Pool, held: Held) -> Claim:
        """Re-allocate a held address to us (static request), if it did not change meanwhile."""
        return self._write(pool, held.ip, Cas(held.key, self.value(), held.index), held.value)

    def _write(self, pool: Pool, ip: IPAddress, op: Cas, previous: bytes | None) -> Claim:
        result = self._fenced(op)
        if result.ok:
            index = result.indexes.get(op.key, 0)
            pool.put(parse_held(KVEntry(op.key, op.value, index), self.layout.folder(pool.name)))
            return Claim(op.key, ip, op.value, previous, won=True, index=index)
        # Lost the compare. Read the key once: it may hold our own write, applied by an earlier
        # send whose reply was lost; otherwise the pool learns who holds it.
        entry = self.kv.get(op.key)
        self._fold(pool, ip, entry)
        if entry is not None and entry.value == op.value:
            return Claim(op.key, ip, op.value, previous, won=True, index=entry.modify_index)
        return Claim(op.key, ip, op.value, previous, doubtful=result.doubtful)

    def _fenced(self, op: Op) -> TxnResult:
        """One write, applied only if the attachment's fence is where this call saw it."""
        a = self._attachment()
        fence = self.layout.fence_key(a.network, a.target, a.ifname or "")
        for _ in range(3):
            self.before_write()
            result = self.kv.txn([Check(fence, self.fence_index), op])
            if result.failed != 0:
                return result
            # The fence moved: this attachment was deleted (or rolled back) since we looked,
            # e.g. a restart that reuses the container ID. Writes sent before stay void;
            # this one is sent after, so it goes behind the fence as it is now.
            entry = self.kv.get(fence)
            self.fence_index = entry.modify_index if entry is not None else 0
        raise WriteConflict(
            f"the fence of attachment {a.target}/{a.ifname} kept moving: another call is "
            "deleting this attachment while it is being added"
        )

    def raise_fence(self, reason: str, attachment: Attachment | None = None) -> None:
        """Void every write of the attachment sent before now."""
        a = attachment or self._attachment()
        key = self.layout.fence_key(a.network, a.target, a.ifname or "")
        result = self.kv.txn([Set(key, dump_fence(time.time(), self.host, reason))])
        if attachment is None and result.ok:
            self.fence_index = result.indexes.get(key, 0)

    # -- releasing --------------------------------------------------------------------------
    def release(self, held: Held, attempts: int = 5, reuse_after: float = 0.0) -> bool:
        """CAS-delete one key of the attachment that holds it (or, with `reuse_after`, turn it
        into a release that cools down that long); True when it is gone or no longer that
        attachment's."""
        for _ in range(attempts):
            if reuse_after > 0:
                tombstone = dump_tombstone(held.value, time.time() + reuse_after)
                done = self.kv.replace(held.key, tombstone, held.index)
            else:
                done = self.kv.delete(held.key, held.index)
            if done:
                return True
            current = self.lookup_key(held)
            if current is None or not current.owned_by(held.target, held.ifname, held.network):
                return True
            held = current
        return False

    def undo(self, claim: Claim) -> bool:
        """Roll back a write of this call, and only that: a key is deleted (or a take-over's
        previous value restored) only while it holds exactly the bytes this call wrote.
        True when the key held our write."""
        entry = self.kv.get(claim.key)
        if entry is None or entry.value != claim.value:
            return False
        if claim.previous is None:
            done = self.kv.delete(claim.key, entry.modify_index)
        else:
            done = self.kv.replace(claim.key, claim.previous, entry.modify_index)
        if done:
            logger.debug("rolled back {}", claim.key)
        return done

    def sweep_fences(self, network: str | None, now: float | None = None) -> int:
        """Delete fences older than FENCE_TTL (one network's, or all); how many went."""
        now = time.time() if now is None else now
        folder = self.layout.fences(network)
        stale: list[Op] = []
        for entry in self.kv.list(folder):
            if key_problem(entry.key) is not None:
                continue  # no fence of ours (see Layout.fence_key), and no key to delete by URL
            at = fence_time(entry.value)
            if at is not None and now - at > FENCE_TTL:
                stale.append(DeleteCas(entry.key, entry.modify_index))
        gone = 0
        for i in range(0, len(stale), _TXN_MAX):
            chunk = stale[i : i + _TXN_MAX]
            if self.kv.txn(chunk).ok:
                gone += len(chunk)
                continue
            # A fence raised again meanwhile stays; the others go one by one.
            gone += sum(
                self.kv.delete(op.key, op.index) for op in chunk if isinstance(op, DeleteCas)
            )
        return gone

    def _attachment(self) -> Attachment:
        if self.attachment is None:
            raise TypeError("this operation needs the call's attachment")
        return self.attachment


def _folder_of(key: str) -> str:
    return key.rpartition("/")[0] + "/"
