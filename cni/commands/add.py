"""ADD: in each pool, pick an address for the attachment and claim it with a fenced CAS write.

pool_loaded picks (a requested address, one we already hold, or the next free one), ip_picked
writes; a lost compare-and-set goes back to pool_loaded to pick again. Every write is recorded
before it is sent, so a failure (or a write whose outcome stayed unknown) is rolled back.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from loguru import logger

from ...allocator.allocate import Claim
from ...allocator.errors import AddressInUse, CallAbandoned, NotInPool, PoolFull, WriteConflict
from ...allocator.layout import Layout
from ...allocator.pool import Held, spread_key
from ...allocator.ranges import IPAddress, IPRange
from ...consul import ConsulError
from .. import config, result
from ..errors import CNIError
from ..stores import Caches, PoolCache
from .base import PoolCommand, Session


@dataclass(frozen=True)
class Pick:
    """The address pool_loaded chose: its range, who holds it now (None: nobody), and the
    cooled-down release it still holds, which the write replaces."""

    ip: IPAddress
    range: IPRange
    held: Held | None
    over: Held | None = None


class Add(PoolCommand):
    name = "ADD"
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
        self.claims: list[Claim] = []  # writes of this call, undone on failure

    # -- pool_loaded: choose the address ------------------------------------------------------
    def at_pool_loaded(self) -> str:
        pool, allocator = self.pool, self.allocator
        wanted, may_take = self.requested()
        if wanted is not None:
            rng = allocator.requested_range(pool, wanted)
            if pool.cached and wanted in pool.held:
                # The helper's copy can be behind a release (a DEL elsewhere, a restart with a
                # fixed address): only a fresh read of the key may say it is taken.
                allocator.recheck(pool, wanted)
            held, over = pool.held.get(wanted), None
            if held is not None and held.reusable(time.time()):
                held, over = None, held  # a release past its cool-down: free
            if held is not None and not may_take and not allocator.owns(held):
                cooling = "" if held.free_after is None else " (released, cooling down)"
                raise AddressInUse(
                    f"requested IP {wanted} in pool {pool.name!r} is allocated to container "
                    f"{held.target!r}{cooling}; only a Pool's own requested-ip re-allocates an "
                    "address"
                )
            self.pick = Pick(wanted, rng, held, over)
            return "pick_ip"
        for held in pool.ours(*self.attachment(), self.conf.name or None):
            in_range = pool.range_for(held.ip)
            if in_range is not None:
                self.pick = Pick(held.ip, in_range, held)  # idempotent ADD: what we hold
                return "pick_ip"
        spread = None
        if self.conf.pick == "spread":
            target, ifname = self.attachment()
            spread = spread_key(allocator.host or "", self.conf.name, target, ifname, pool.name)
        try:
            ip, rng, over = pool.reserve_next_free(
                lambda ip: allocator.ours_to_be(pool, ip), spread
            )
        except PoolFull:
            if not pool.cached:
                raise
            # The helper's cached pool lags behind releases made elsewhere (another host, a call
            # done in-process) by up to its refresh interval: only a fresh listing may say
            # "full". It also shows an address of ours the cache missed.
            self.pool = allocator.load(pool.name, fresh=True)
            return self.at_pool_loaded()
        self.pick = Pick(ip, rng, None, over)
        return "pick_ip"

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
        ip, rng, held, over = self.pick.ip, self.pick.range, self.pick.held, self.pick.over
        allocator, pool = self.allocator, self.pool
        target = self.env.container_id
        if held is not None and allocator.owns(held):
            # Already ours: a repeated ADD, or our own write whose reply was lost.
            if not allocator.still_ours(pool, held):
                return self.lost_race(ip)
            if held.call != self.session.inputs.call_id and not self.write(
                ip, held.value, lambda: allocator.take_over(pool, held)
            ):
                # Rewritten as this call's (nonce, start time), so a DEL of the attachment
                # journaled before this ADD and redone after it spares the key.
                return self.lost_race(ip)
        elif held is not None:
            if not self.write(ip, held.value, lambda: allocator.take_over(pool, held)):
                return self.lost_race(ip)
            logger.warning(
                "re-allocated requested IP {} in pool {!r} from container {!r} to {!r}",
                ip,
                pool.name,
                held.target,
                target,
            )
        else:
            previous = over.value if over is not None else None
            if not self.write(ip, previous, lambda: allocator.claim(pool, ip, over)):
                return self.lost_race(ip)
        self.assigned.append(result.Assigned(pool.name, ip, rng))
        logger.debug("pool {!r}: {} for container {!r}", pool.name, ip, target)
        return "write"

    def write(self, ip: IPAddress, previous: bytes | None, attempt: Callable[[], Claim]) -> bool:
        """Run one fenced CAS write; True when it holds. It is recorded before it is sent, as
        a claim of unknown outcome, since Consul may apply it though the reply is lost."""
        key = self.allocator.layout.allocation_key(self.pool.name, ip)
        self.session.still_wanted()
        self.claims.append(Claim(key, ip, self.allocator.value(), previous))
        try:
            claim = attempt()
        except CallAbandoned:
            self.claims.pop()  # stopped before sending, or after a send that was refused
            raise
        except ConsulError as exc:
            if not exc.doubtful:
                self.claims.pop()  # certainly not applied (refused, not sent, 4xx)
            raise  # otherwise the record stays: the outcome is unknown
        self.claims.pop()
        if claim.won or claim.doubtful:
            # A compare lost after an earlier send went unanswered may still be followed by
            # that send applying: keep it to fence.
            self.claims.append(claim)
        return claim.won

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
        unsure = [c for c in self.claims if not c.won]
        if unsure:
            # Writes whose outcome stayed unknown, e.g. a reply lost before a failover:
            # one may still apply and hand this attachment a second address.
            self.roll_back(unsure, "in-doubt write")
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
        if self.claims:
            self.store.deadline.end = self.session.hard_end  # the reserve is the rollback's
            self.roll_back(self.claims, "rollback")

    def roll_back(self, claims: list[Claim], reason: str) -> None:
        """Undo these writes of this call. One whose outcome is unknown may still apply, so the
        attachment's fence goes up first (one write), then each key holding exactly our bytes
        goes. If Consul cannot be reached, the runtime's DEL raises the fence and releases."""
        try:
            if any(not c.won for c in claims):
                self.allocator.raise_fence(reason)
            for claim in reversed(claims):
                self.allocator.undo(claim)
        except Exception as exc:
            logger.error(
                "could not roll back {}: {}; the runtime's DEL for this container will void "
                "and release them",
                ", ".join(c.key for c in claims),
                exc,
            )
