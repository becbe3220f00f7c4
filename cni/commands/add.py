"""ADD: in each pool, pick an address for the attachment and claim it with a fenced CAS write.

pool_loaded picks (a requested address, one we already hold, or the next free one), ip_picked
writes; a lost compare-and-set goes back to pool_loaded to pick again. Every write is a claim in
the attachment's ledger before it is sent (allocator/ledger.py), so a failure (or a write whose
outcome stayed unknown) is undone, now or, when Consul cannot be reached, later from the
ledger (cni/state.py).
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Callable
from dataclasses import dataclass

from loguru import logger

from ...allocator.errors import AddressInUse, NotInPool, PoolFull, WriteConflict
from ...allocator.layout import Layout
from ...allocator.ledger import Claim
from ...allocator.pool import Held, Pool, ip_of_key, spread_key
from ...allocator.ranges import IPAddress, IPRange
from ...allocator.stripes import Stripe, stripe_of
from .. import config, result
from ..errors import CNIError, Code
from ..stores import Caches, PoolCache
from .base import PoolCommand, Session


@dataclass(frozen=True)
class Pick:
    """The address pool_loaded chose: its range, who holds it now (None: nobody), and the
    cooled-down release it still holds, which the write replaces."""

    ip: IPAddress
    range: IPRange
    held: Held | None


class Add(PoolCommand):
    name = "ADD"
    keeps_ledger = True
    pick: Pick  # set by pool_loaded, read by ip_picked

    @classmethod
    def pool_cache(
        cls, caches: Caches, settings: config.ConsulSettings, layout: Layout
    ) -> PoolCache | None:
        return caches.get(settings, layout)

    def __init__(self, session: Session) -> None:
        super().__init__(session)
        self.conflicts = 0
        self.assigned: list[result.Assigned] = []

    def at_parsed(self) -> str:
        entry, inputs = self.session.entry, self.session.inputs
        if entry is not None:
            if entry.deleting is not None:
                self.finish_journaled_del()
            # How to reach Consul again, should this call leave a write in doubt.
            entry.remember(inputs.stdin, inputs.environ)
        return super().at_parsed()

    def finish_journaled_del(self) -> None:
        """A DEL of this attachment was accepted while Consul was away (the runtime was told it
        is done) and is not finished yet: it is, before the attachment is added again, so that
        it can never release what this ADD writes."""
        entry, inputs = self.session.entry, self.session.inputs
        assert entry is not None and entry.deleting is not None and inputs.nested is not None
        code, msg = inputs.nested(entry.deleting.stdin, entry.deleting.env, entry)
        if code != 0:
            raise CNIError(
                Code.TRY_AGAIN_LATER,
                "a DEL of this attachment, accepted while Consul could not be reached, is not "
                f"finished yet (code {code}: {msg})",
            )
        # The DEL emptied the ledger; this ADD starts afresh.
        self.allocator.claims = entry.claims()

    # -- next_pool: the view to pick from -------------------------------------------------------
    def load(self, request: config.PoolRequest) -> None:
        """The whole pool (`pick` lowest or spread), or this host's first stripe of it (`pick`
        stripe, allocator/stripes.py): the stripes after it are read only if it has no room."""
        allocator = self.allocator
        self.widened = ""
        self.walk: list[Stripe] = []
        self.home: Stripe | None = None
        self.hint: Stripe | None = None
        if self.conf.pick != "stripe":
            self.pool = allocator.load(request.name)
            return
        host, name = allocator.host or "", request.name
        stripes, pool_key = allocator.stripes(name)
        self.home = stripes.at(stripes.home(host, name))
        self.hint = self.stripe_hint(name)
        self.walk = stripes.walk(host, name, self.hint)
        self.pool = allocator.load(name, view=self.walk.pop(0), pool_key=pool_key)

    def stripe_hint(self, pool: str) -> Stripe | None:
        hints = self.allocator.hints
        address = hints.hint(pool) if hints is not None else None
        if address is None:
            return None
        try:
            return stripe_of(ipaddress.ip_address(address))
        except ValueError:
            return None

    def found_room(self, ip: IPAddress) -> None:
        """An address of this host's choosing was won: remember its stripe when it is not the
        host's home (and forget a hint once home has room again)."""
        hints, name = self.allocator.hints, self.current.name
        if hints is None or self.conf.pick != "stripe":
            return
        stripe = stripe_of(ip)
        if stripe != self.home:
            if stripe != self.hint:
                hints.remember_hint(name, str(ip))
        elif self.hint is not None:
            hints.remember_hint(name, None)

    # -- pool_loaded: choose the address ------------------------------------------------------
    def at_pool_loaded(self) -> str:
        pool, allocator = self.pool, self.allocator
        wanted, may_take = self.requested()
        if wanted is not None:
            rng = allocator.requested_range(pool, wanted)
            if not pool.seen(wanted) or (pool.cached and wanted in pool.held):
                # Outside this call's stripe, or the helper's copy can be behind a release (a
                # DEL elsewhere, a restart with a fixed address): only a fresh read of the key
                # may say it is taken.
                allocator.recheck(pool, wanted)
            held = pool.held.get(wanted)
            if held is not None and not may_take and not allocator.owns(held):
                cooling = " (released, cooling down)" if held.cooling else ""
                raise AddressInUse(
                    f"requested IP {wanted} in pool {pool.name!r} is allocated to container "
                    f"{held.target!r}{cooling}; only a Pool's own requested-ip re-allocates an "
                    "address"
                )
            self.pick = Pick(wanted, rng, held)
            return "pick_ip"
        mine = self.held_already(pool)
        if mine is not None:
            in_range = pool.range_for(mine.ip)
            assert in_range is not None
            self.pick = Pick(mine.ip, in_range, mine)  # idempotent ADD: what we hold
            return "pick_ip"
        try:
            ip, rng = pool.reserve_next_free(
                lambda ip: allocator.ours_to_be(pool, ip), self.spread(pool)
            )
        except PoolFull:
            return self.widen(pool)
        self.pick = Pick(ip, rng, None)
        return "pick_ip"

    def held_already(self, pool: Pool) -> Held | None:
        """A key this attachment holds in the pool: in the view read, or one its ledger names
        that the view does not show as its own (outside this call's stripe, or a value the
        helper's copy has not caught up with: a take-over made in-process on this host)."""
        allocator, a = self.allocator, self.session.attachment
        for held in pool.ours(a.target, a.ifname, a.recorded_network):
            if pool.range_for(held.ip) is not None:
                return held
        folder = allocator.layout.folder(pool.name)
        for claim in list(allocator.claims):
            ip = ip_of_key(claim.key[len(folder) :]) if claim.key.startswith(folder) else None
            if claim.state != "held" or ip is None:
                continue
            if pool.seen(ip) and not pool.cached:
                continue  # just read: not ours any more (taken over, released by GC)
            found = allocator.lookup_key(claim.key)
            if found is not None and allocator.owns(found) and pool.range_for(found.ip):
                pool.put(found)
                return found
        return None

    def spread(self, pool: Pool) -> int | None:
        """The number `spread` and `stripe` pick by (allocator/pool.py next_free)."""
        if self.conf.pick == "lowest":
            return None
        a = self.session.attachment
        return spread_key(self.allocator.host or "", a.network, a.target, a.ifname, pool.name)

    def widen(self, pool: Pool) -> str:
        """No free address where this call looked: look wider, and say "full" only after a fresh
        read of the whole pool. A copy the helper keeps lags releases made elsewhere by up to
        its refresh: read afresh. Then this host's next stripes; then the pool's key names
        alone (one listing) show a stripe with room; then every value of the pool."""
        allocator, name = self.allocator, pool.name
        if pool.cached:
            self.pool = allocator.load(name, fresh=True, view=pool.view)
        elif self.walk:
            self.pool = allocator.load(name, view=self.walk.pop(0))
        elif pool.view is not None and not self.widened:
            self.widened = "sketch"
            try:
                ip, _ = allocator.sketch(pool).next_free(self.spread(pool))
            except PoolFull:
                self.widened = "whole"
                self.pool = allocator.load(name, fresh=True)
            else:
                self.pool = allocator.load(name, fresh=True, view=stripe_of(ip))
        elif self.widened != "whole" and pool.view is not None:
            self.widened = "whole"
            self.pool = allocator.load(name, fresh=True)
        else:
            # Every key of the whole pool, just read: it really is full.
            raise PoolFull(
                f"pool {name!r} is full: all {pool.capacity()} addresses are allocated"
            )
        logger.debug("pool {!r}: no room there; reading {}", name, _describe(self.pool))
        return "widen"

    def requested(self) -> tuple[IPAddress | None, bool]:
        """This pool's static address, and whether it may be taken from another container:
        the Pool's own requested IP may (the seed's re-allocation); a conventional one (CNI_ARGS,
        runtimeConfig, args) may not, as host-local refuses an address in use."""
        if self.current.requested_ip is not None:
            return self.current.requested_ip, True
        fits = (ip for ip in self.conf.requested_ips if self.pool.range_for(ip))
        return next(fits, None), False

    # -- ip_picked: claim it ------------------------------------------------------------------
    def at_ip_picked(self) -> str:
        ip, rng, held = self.pick.ip, self.pick.range, self.pick.held
        allocator, pool = self.allocator, self.pool
        target = self.env.container_id
        if held is not None and allocator.owns(held):
            # Already ours: a repeated ADD, or our own write whose reply was lost.
            if not allocator.still_ours(pool, held):
                return self.lost_race(ip)
            allocator.adopt(pool.held.get(ip) or held)
        elif held is not None:
            if not self.write(lambda: allocator.take_over(pool, held)):
                return self.lost_race(ip)
            logger.warning(
                "re-allocated requested IP {} in pool {!r} from container {!r} to {!r}",
                ip,
                pool.name,
                held.target,
                target,
            )
        elif not self.write(lambda: allocator.claim(pool, ip)):
            return self.lost_race(ip)
        else:
            self.found_room(ip)
        self.assigned.append(result.Assigned(pool.name, ip, rng))
        logger.debug("pool {!r}: {} for container {!r}", pool.name, ip, target)
        return "write"

    def write(self, attempt: Callable[[], Claim]) -> bool:
        """One fenced CAS write (the allocator records it in the ledger first); True when it
        holds."""
        return attempt().won

    def lost_race(self, ip: IPAddress) -> str:
        """Another writer changed the key first: re-read that key and pick again."""
        self.conflicts += 1
        deadline = self.store.deadline
        if deadline.expired():
            raise WriteConflict(
                f"could not write an allocation in pool {self.current.name!r}: lost "
                f"{self.conflicts} compare-and-set races to other writers "
                "before the time budget ran out"
            )
        if self.pool.cached:
            logger.debug(
                "{} in pool {!r} was taken: the helper's cached copy was behind; picking again",
                ip,
                self.current.name,
            )
        else:
            logger.debug("lost the race for {} in pool {!r}; retrying", ip, self.current.name)
        deadline.sleep(random.uniform(0, 0.005 * min(self.conflicts, 20)))
        return "conflict"

    # -- emit, or fail ------------------------------------------------------------------------
    def finish(self) -> None:
        unsure = self.allocator.unsettled()
        if unsure:
            # Writes whose outcome stayed unknown (a reply lost before a failover, or an earlier
            # call's): one may still apply and hand this attachment a second address. Voided
            # on the rollback's reserve; what cannot be voided now stays in the ledger.
            self.store.deadline.end = self.session.call_end
            self.void(unsure, "in-doubt write", must=self.session.entry is None)
        served = {a.ip for a in self.assigned}
        unused = [str(ip) for ip in self.conf.requested_ips if ip not in served]
        if unused:
            # Each pool gives one address: a second one for the same pool is not served either.
            raise NotInPool(
                f"requested IP(s) {', '.join(unused)} could not be served: no range of the "
                "pools holds them, or their pool already gives this attachment another address"
            )
        self.output = result.build(self.session.cni_version, self.conf.prev_result, self.assigned)

    def writing(self, state: str) -> bool:
        return state == "ip_picked"

    def failed(self, error: CNIError) -> None:
        mine = self.allocator.mine()
        if mine:
            self.store.deadline.end = self.session.call_end  # the reserve is the rollback's
            self.void(mine, "rollback", must=False)

    def void(self, claims: list[Claim], reason: str, must: bool) -> None:
        """Undo these writes now (allocator.void). What cannot be undone stays in the ledger as
        in doubt: the helper, the attachment's next call or its DEL voids it once Consul
        answers. Without a ledger that outlives this process, `must` makes that a failure."""
        try:
            self.allocator.void(claims, reason)
        except Exception as exc:
            left = [c for c in self.allocator.claims if c in claims]
            self.allocator.suspect(left)
            where = (
                "kept in this host's state folder; voided once Consul answers"
                if self.session.entry is not None
                else "the runtime's DEL for this container voids and releases them"
            )
            logger.error(
                "could not undo {} ({}): {}; {}", ", ".join(c.key for c in left), reason, exc, where
            )
            if must:
                raise


def _describe(pool: Pool) -> str:
    return "the whole pool" if pool.view is None else f"stripe {pool.view.prefix}*"
