"""Allocator operations over a `KV` store: read pools, claim, take over and release addresses.

Every write is a compare-and-set, so two writers can never both believe they hold a key.

Writes of an attachment are fenced. A write whose reply was lost (a timeout, a resend after
failover, a request a follower forwards once a leader is elected) can be applied by Consul
seconds after the call that sent it gave up, after the runtime's cleanup DEL found nothing.
So each attachment (network, container, ifname) has a fence key: every allocation write is a
transaction that also checks the fence is where this call last saw it, and DEL, GC and a
rollback of in-doubt writes raise the fence first. A write sent before the fence was raised
can then never apply, and a read after it sees every write that did.

A fence only needs to outlive the writes sent before it. It is tied to a Consul session with a
TTL (`FenceSessions`): Consul's leader, not any host's clock, decides when it goes, and one
session ending removes a period's fences of a host at once.

Every write is a `Claim` in the attachment's ledger before it is sent (ledger.py); what a call
leaves in doubt is voided by the call, or later from the ledger.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from loguru import logger

from .errors import CallAbandoned, InvalidPool, NotInPool, PoolMissing, WriteConflict
from .layout import Layout
from .ledger import Claim, Ledger, MemoryLedger, State
from .pool import Held, Pool, list_pool, parse_held, parse_pool, sketch_pool
from .ranges import IPAddress, IPRange
from .schemas import dump_allocation, dump_fence, dump_tombstone, fence_reason, load_ranges
from .store import (
    KV,
    Cas,
    Check,
    Delete,
    DeleteCas,
    KVEntry,
    Lock,
    Op,
    Set,
    StoreError,
    TxnResult,
)
from .stripes import Stripe, StripeHints, Stripes

# How long a fence lasts, at least: longer than any write sent before it can still be applied.
# Consul applies a forwarded write within its RPC hold time (7 s) plus a raft apply; a request
# left in a closed socket's send queue is retransmitted by the kernel for up to ~15 minutes.
FENCE_LIFETIME = 3600.0
# Fences raised to remove an attachment (cni/commands/delete.py, gc.py, admin/reconcile.py), as
# opposed to those that void a call's own writes while the attachment lives on.
TEARDOWN_FENCES = frozenset({"DEL", "GC", "reconcile"})
# A take-over's `holder_fence_index` when its holder was already being removed: never given back.
HOLDER_GONE = -1


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


class CachedPools(Protocol):
    """Pools kept between calls (the helper's PoolCache, cni/helper/cache.py)."""

    def get(
        self,
        name: str,
        load: Callable[[], tuple[Sequence[KVEntry], int]],
        view: Stripe | None = None,
    ) -> Pool:
        """The kept copy of the pool (of one stripe of it: `view`); `load` lists it (entries
        and index) the first time."""

    def ranges(self, name: str) -> list[IPRange] | None:
        """The pool's ranges as a kept copy of it has them, if any."""


class FenceSessions(Protocol):
    """Where fences get their session: one per host and period, shared by its calls."""

    def get(self, kv: KV) -> str | None:
        """A live session to lock fences with; None when none can be had (fences then stay)."""

    def failed(self, session: str) -> None:
        """Consul refused `session` (it ended): never hand it out again."""


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
        ledger: Ledger | None = None,
        sessions: FenceSessions | None = None,
        cooling: FenceSessions | None = None,
        hints: StripeHints | None = None,
    ) -> None:
        self.kv = kv
        self.layout = layout or Layout()
        self.host = host
        self.cache = cache
        self.attachment = attachment
        self.call = call or ""
        self.before_write = before_write or (lambda: None)
        self.runtime = runtime
        self.ledger: Ledger = ledger if ledger is not None else MemoryLedger()
        self.sessions = sessions
        # Sessions of `reuse_after` long: a release cooling down goes with its session.
        self.cooling = cooling
        # Where this host last found room outside its home stripe, per pool.
        self.hints = hints
        # What earlier calls of this attachment left: a claim still `sent` was cut short by its
        # process's end, so its fate is as unknown as a lost reply's.
        self.claims = [c.as_("doubt") if c.state == "sent" else c for c in self.ledger.claims()]
        # Where this call last saw the attachment's fence; 0: absent, the common case, so the
        # first write needs no read of it.
        self.fence_index = 0

    # -- reading ----------------------------------------------------------------------------
    def load(
        self,
        name: str,
        fresh: bool = False,
        view: Stripe | None = None,
        pool_key: KVEntry | None = None,
    ) -> Pool:
        """Ranges and allocations (of one stripe: `view`) in a listing of the pool's folder (or
        the helper's cached copy of it, unless `fresh`). `pool_key`: already read."""
        if self.cache is not None and not fresh:
            return self.cache.get(name, lambda: self._listing(name, view, pool_key), view)
        entries, _ = self._listing(name, view, pool_key)
        return parse_pool(self.layout, name, entries, view=view)

    def _listing(
        self, name: str, view: Stripe | None = None, pool_key: KVEntry | None = None
    ) -> tuple[Sequence[KVEntry], int]:
        within = view.prefix if view is not None else ""
        return list_pool(self.kv, self.layout, name, within, pool_key)

    def stripes(self, name: str) -> tuple[Stripes, KVEntry | None]:
        """The pool's stripes, from a kept copy's ranges, or one read of the pool key (then
        returned too, so that the listing of a stripe need not read it again)."""
        kept = self.cache.ranges(name) if self.cache is not None else None
        if kept is not None:
            return Stripes(kept), None
        key = self.layout.pool_key(name)
        entry = self.kv.get(key)
        if entry is None:
            raise PoolMissing(f"pool {name!r} does not exist: KV key {key!r} is missing")
        try:
            return Stripes(load_ranges(entry.value)), entry
        except ValueError as exc:
            raise InvalidPool(f"KV key {key!r} does not hold valid IP Ranges: {exc}") from exc

    def sketch(self, pool: Pool) -> Pool:
        """The whole pool from one listing of its key names: where there is room."""
        folder = self.layout.folder(pool.name)
        return sketch_pool(pool.name, pool.ranges, self.kv.keys(folder), folder)

    def load_ranges(self, name: str) -> Pool:
        """The pool's ranges alone (one small read), for calls that look up single keys."""
        entry = self.kv.get(self.layout.pool_key(name))
        return parse_pool(self.layout, name, [entry] if entry is not None else [])

    def recheck(self, pool: Pool, ip: IPAddress) -> None:
        """Re-read the key `pool` knows for `ip` (in whatever spelling) and fold it in."""
        held = pool.held.get(ip)
        key = held.key if held is not None else self.layout.allocation_key(pool.name, ip)
        self._fold(pool, ip, self.kv.get(key))

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

    def lookup_key(self, key: str, consistent: bool = False) -> Held | None:
        entry = self.kv.get(key, consistent)
        if entry is None:
            return None
        return parse_held(entry, _folder_of(entry.key))

    def scan(
        self,
        pool: str,
        on_invalid: Callable[[str], None],
        consistent: bool = False,
        within: str = "",
    ) -> list[Held]:
        """Every valid allocation in the pool folder (whose name starts with `within`: a
        stripe's); unreadable keys go to `on_invalid`."""
        folder = self.layout.folder(pool)
        entries = self.kv.list(folder + within, consistent)
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
        """This call's allocation value: the same bytes for each of its writes, so a rollback
        and a void recognise exactly them (the call's nonce makes them unique)."""
        a = self._attachment()
        return dump_allocation(
            a.target, a.ifname, self.host, a.recorded_network, self.call or None, self.runtime
        )

    def ours_to_be(self, pool: Pool, ip: IPAddress) -> Held:
        """The allocation we are about to write. ModifyIndex 0 is unknown: a CAS delete with it
        fails and re-reads the key."""
        a = self._attachment()
        key = self.layout.allocation_key(pool.name, ip)
        return Held(
            ip, a.target, key, 0, a.ifname, self.host, self.value(), a.recorded_network, self.call
        )

    def claim(self, pool: Pool, ip: IPAddress) -> Claim:
        """Create the allocation key if absent. The returned claim's `won` says whether we
        hold it."""
        held = self.ours_to_be(pool, ip)
        return self._write(pool, ip, [Cas(held.key, held.value, 0)], None)

    def take_over(self, pool: Pool, held: Held) -> Claim:
        """Re-allocate a held address to us (a Pool's own requested IP), if it did not change
        meanwhile. Undoing it gives the key back only while its holder was not deleted since.
        A release cooling down is a key tied to its cool-down's session: it is deleted and
        made anew (a write over it would go with the session), and undone by deleting it."""
        if held.cooling:
            made: list[Op] = [DeleteCas(held.key, held.index), Cas(held.key, self.value(), 0)]
            return self._write(pool, held.ip, made, None)
        write = Cas(held.key, self.value(), held.index)
        return self._write(pool, held.ip, [write], held.value, held)

    def adopt(self, held: Held) -> None:
        """An ADD hands back a key the attachment already holds: record it as held (a write of
        an earlier call left in doubt is then the attachment's address, not a leak to void)."""
        mine = [c for c in self.claims if c.key == held.key]
        if any(c.value == held.value for c in mine):
            self._keep([c.as_("held") if c.value == held.value else c for c in self.claims])
        elif not mine:
            self._keep([*self.claims, Claim(held.key, held.value, None, held.call or "", "held")])

    def _write(
        self,
        pool: Pool,
        ip: IPAddress,
        ops: list[Op],
        previous: bytes | None,
        holder: Held | None = None,
    ) -> Claim:
        """Send one fenced CAS write (the last of `ops`), recorded in the ledger first: Consul
        may apply it though no answer comes back. The claim returned (and kept) says what
        became of it."""
        op = ops[-1]
        assert isinstance(op, Cas)
        self.before_write()
        fence, fence_index = self._holder_fence(holder)
        sent = Claim(op.key, op.value, previous, self.call, "sent", False, fence, fence_index)
        self._keep([*self.claims, sent])
        others = self.layout.other_spellings(pool.name, ip, op.key)
        try:
            result = self._fenced([*(Check(k, 0) for k in others), *ops])
        except (CallAbandoned, StoreError) as exc:
            # Refused before any send, or a failure that says nothing was applied: forgotten.
            # Otherwise the outcome is unknown, and the claim waits to be voided.
            doubt = isinstance(exc, StoreError) and exc.doubtful
            self._settle(sent, "doubt" if doubt else "lost")
            raise
        if result.ok:
            index = result.indexes.get(op.key, 0)
            pool.put(parse_held(KVEntry(op.key, op.value, index), self.layout.folder(pool.name)))
            return self._settle(sent, "held", result.doubtful)
        return self._lost_compare(pool, ip, sent, op, others, result)

    def _lost_compare(
        self, pool: Pool, ip: IPAddress, sent: Claim, op: Cas, others: list[str], result: TxnResult
    ) -> Claim:
        """The write's compare failed: on the key, or one of its other spellings exists. That
        key is read: it may hold our own write, applied by an earlier send whose reply was
        lost; otherwise the pool learns who holds the address."""
        lost = op.key if result.failed is None or result.failed >= len(others) else None
        # (A DeleteCas before the write fails the same way as the write: the key changed.)
        key = lost or others[result.failed or 0]
        entry = self.kv.get(key, consistent=True)
        self._fold(pool, ip, entry)
        if lost and entry is not None and entry.value == op.value:
            return self._settle(sent, "held", True)
        # A create (cas 0) sent more than once may still apply if the key is deleted later.
        return self._settle(sent, "doubt" if result.doubtful and op.index == 0 else "lost")

    def _holder_fence(self, holder: Held | None) -> tuple[str | None, int]:
        """The fence of the attachment a take-over takes the key from, and where it is now. A
        holder written by a tool that records no network or interface has no fence to check.

        A fence a DEL (or GC) raised after the holder wrote the version taken over means that
        DEL is under way: past its fence it finds the key no longer the holder's and answers 0,
        and the fence never moves again, so checking it at undo time cannot tell. Such a holder
        is gone (HOLDER_GONE): the key is never given back to it."""
        if holder is None or holder.network is None or holder.ifname is None:
            return None, 0
        fence = self.layout.fence_key(holder.network, holder.target, holder.ifname)
        entry = self.kv.get(fence, consistent=True)
        if entry is None:
            return fence, 0
        if entry.modify_index > holder.index and fence_reason(entry.value) in TEARDOWN_FENCES:
            return fence, HOLDER_GONE
        return fence, entry.modify_index

    def _fenced(self, ops: list[Op]) -> TxnResult:
        """Apply `ops` only if the attachment's fence is where this call saw it. The result is
        `doubtful` when any send of it may have applied unheard."""
        a = self._attachment()
        fence = self.layout.fence_key(a.network, a.target, a.ifname or "")
        doubtful = False
        for _ in range(3):
            self.before_write()
            try:
                result = self.kv.txn([Check(fence, self.fence_index), *ops])
            except StoreError as exc:
                exc.doubtful = exc.doubtful or doubtful
                raise
            doubtful = doubtful or result.doubtful
            if result.failed != 0:
                return TxnResult(
                    None if result.failed is None else result.failed - 1,
                    result.indexes,
                    doubtful,
                    result.why,
                )
            # The fence moved: this attachment was deleted (or rolled back) since we looked,
            # e.g. a restart that reuses the container ID. Writes sent before stay void;
            # this one is sent after, so it goes behind the fence as it is now.
            entry = self.kv.get(fence, consistent=True)
            self.fence_index = entry.modify_index if entry is not None else 0
        raise WriteConflict(
            f"the fence of attachment {a.target}/{a.ifname} kept moving: another call is "
            "deleting this attachment while it is being added"
        )

    def raise_fence(self, reason: str, attachment: Attachment | None = None) -> None:
        """Void every write of the attachment sent before now: the fence key is made anew (a
        new ModifyIndex, which no earlier write checked for), locked with a session so that
        Consul deletes it once every such write is long dead."""
        a = attachment or self._attachment()
        key = self.layout.fence_key(a.network, a.target, a.ifname or "")
        value = dump_fence(self.host, reason)
        session = self.sessions.get(self.kv) if self.sessions is not None else None
        while True:
            self.before_write()
            made: Op = Lock(key, value, session) if session else Set(key, value)
            result = self.kv.txn([Delete(key), made])
            if result.ok or session is None:
                break
            # The session ended (or Consul lost it): a fence must never be tied to it.
            logger.debug("fence session {} refused ({}); taking a new one", session, result.why)
            assert self.sessions is not None
            self.sessions.failed(session)
            session = self.sessions.get(self.kv)
        if not result.ok:
            raise WriteConflict(f"could not raise the fence {key}: {result.why or 'refused'}")
        if attachment is None:
            self.fence_index = result.indexes.get(key, 0)

    # -- what a call leaves ------------------------------------------------------------------
    def unsettled(self) -> list[Claim]:
        """Claims that may still apply, or may be a second key: those to void."""
        return [c for c in self.claims if c.state != "held"]

    def mine(self) -> list[Claim]:
        """This call's own claims."""
        return [c for c in self.claims if c.call == self.call]

    def void(self, claims: list[Claim], reason: str) -> None:
        """Undo these writes, and only them: first the attachment's fence, if any of them may
        still be on its way (the fence makes it fail on arrival), then each key goes, or gets
        its previous holder back, only while it holds exactly the bytes written. Claims undone
        leave the ledger; a failure leaves the rest there, to be voided later."""
        if any(not c.settled for c in claims):
            self.raise_fence(reason)
        for claim in reversed(claims):
            self._undo(claim)
            self._keep([c for c in self.claims if c != claim])

    def _undo(self, claim: Claim) -> None:
        for _ in range(3):
            entry = self.kv.get(claim.key, consistent=True)
            if entry is None or entry.value != claim.value:
                return  # never applied, or another writer's since
            if claim.previous is None or claim.holder_fence_index == HOLDER_GONE:
                done = self.kv.delete(claim.key, entry.modify_index)
            elif claim.holder_fence is None:
                done = self.kv.replace(claim.key, claim.previous, entry.modify_index)
            else:
                back = self.kv.txn(
                    [
                        Check(claim.holder_fence, claim.holder_fence_index),
                        Cas(claim.key, claim.previous, entry.modify_index),
                    ]
                )
                if back.failed == 0:
                    # The holder was deleted since we took its address: giving the key back
                    # would hold the address for a container that is gone.
                    done = self.kv.delete(claim.key, entry.modify_index)
                else:
                    done = back.ok
            if done:
                logger.debug("rolled back {}", claim.key)
                return
        raise WriteConflict(f"could not roll back {claim.key}: it kept changing")

    def suspect(self, claims: list[Claim]) -> None:
        """These could not be undone now: they stay, in doubt, for a later void."""
        self._keep([c.as_("doubt") if c in claims else c for c in self.claims])

    def forget(self, keys: set[str] | None = None) -> None:
        """Drop claims from the ledger (all of them: the attachment was deleted)."""
        self._keep([] if keys is None else [c for c in self.claims if c.key not in keys])

    def _settle(self, sent: Claim, state: State, resent: bool = False) -> Claim:
        settled = sent.as_(state, resent)
        rest = [c for c in self.claims if c is not sent]
        self._keep(rest if state == "lost" else [*rest, settled])
        return settled

    def _keep(self, claims: list[Claim]) -> None:
        self.claims = claims
        self.ledger.save(claims)

    # -- releasing --------------------------------------------------------------------------
    def release(self, held: Held, cool: bool = False) -> bool:
        """CAS-delete the version `held` of a key (or, `cool`, turn it into a release cooling
        down, which Consul deletes when the cool-down's session ends: no host's clock decides
        when the address is free again). Only that version: a key rewritten since by the same
        attachment was written after this call raised its fence, by a newer call, and stays.
        True unless the key still holds exactly that version."""
        session = self.cooling.get(self.kv) if cool and self.cooling is not None else None
        if cool and session is None:
            logger.warning(
                "{} released without its cool-down: no Consul session can be had (the ACL "
                "token needs session write)", held.key
            )
        if session is not None:
            done = self._cool(held, session)
        else:
            done = self.kv.delete(held.key, held.index)
        if done:
            return True
        current = self.kv.get(held.key, consistent=True)
        if current is not None and current.modify_index == held.index:
            return False
        if current is not None and self._owned(current, held):
            logger.warning("{} was written again for its attachment since: kept", held.key)
        return True

    def _cool(self, held: Held, session: str) -> bool:
        assert self.cooling is not None
        for _ in range(2):
            self.before_write()
            result = self.kv.txn(
                [Check(held.key, held.index), Lock(held.key, dump_tombstone(held.value), session)]
            )
            if result.failed != 1:
                return result.ok
            self.cooling.failed(session)  # ended: take another
            session = self.cooling.get(self.kv) or session
        return False

    def adopt_release(self, held: Held) -> bool:
        """A release an older version left, cooling down until a time by its writer's clock:
        given a session of this call's cool-down (or, with none configured, deleted)."""
        session = self.cooling.get(self.kv) if self.cooling is not None else None
        if session is None:
            return self.kv.delete(held.key, held.index)
        return self._cool(held, session)

    def _owned(self, entry: KVEntry, held: Held) -> bool:
        try:
            now = parse_held(entry, _folder_of(entry.key))
        except InvalidPool:
            return False
        return now.owned_by(held.target, held.ifname, held.network)

    def _attachment(self) -> Attachment:
        if self.attachment is None:
            raise TypeError("this operation needs the call's attachment")
        return self.attachment


def _folder_of(key: str) -> str:
    return key.rpartition("/")[0] + "/"
