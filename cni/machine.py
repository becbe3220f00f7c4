"""One CNI invocation as an explicit state machine.

The table below is the whole control flow. Each state has one handler (`at_<state>`) that does
the work that state calls for and returns the trigger to fire next; any exception fires `fail`.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from loguru import logger
from transitions import EventData, Machine

from .. import __version__
from ..allocator.allocate import Allocator, Attachment, Claim
from ..allocator.errors import (
    AddressInUse,
    AllocationMissing,
    AllocatorError,
    CallAbandoned,
    InvalidPool,
    NotInPool,
    PoolFull,
    PoolMissing,
    WriteConflict,
)
from ..allocator.layout import Layout
from ..allocator.pool import Held, Pool, spread_key
from ..allocator.ranges import IPAddress, IPRange
from ..consul import ConsulClient, ConsulError, ConsulKV, ConsulUnavailable, build_client
from . import config, result
from .env import REPLAY_BEFORE, Environment, read_env
from .errors import INPUT_CODES, CNIError, Code
from .schemas import SUPPORTED_VERSIONS, VersionSchema

if TYPE_CHECKING:
    from .helper.caches import PoolCaches

STATES = [
    "start", "parsed", "connected", "fenced", "pool_loaded", "ip_picked", "pool_done", "done",
    "failed",
]

# fmt: off
TRANSITIONS: list[list[Sequence[str]]] = [
    # trigger      source                       dest            what happened
    ["parse",     "start",                     "parsed"],      # env and stdin are valid
    ["report",    "parsed",                    "done"],        # VERSION answered
    ["connect",   "parsed",                    "connected"],   # a Consul server with a leader
    ["fence",     "connected",                 "fenced"],      # DEL: older writes made void
    ["next_pool", ["connected", "fenced", "pool_done"], "pool_loaded"], # next pool read
    ["pick_ip",   "pool_loaded",               "ip_picked"],   # ADD: an address was chosen
    ["write",     "ip_picked",                 "pool_done"],   # ADD: the CAS write won
    ["conflict",  "ip_picked",                 "pool_loaded"], # ADD: the CAS write lost; re-read
    ["release",   "pool_loaded",               "pool_done"],   # DEL: our keys here are gone
    ["verify",    "pool_loaded",               "pool_done"],   # CHECK: our addresses still ours
    ["collect",   "pool_loaded",               "pool_done"],   # GC: stale keys of this host gone
    ["assess",    "pool_loaded",               "pool_done"],   # STATUS: pool parses, has room
    ["emit",      ["connected", "pool_done"],  "done"],        # every pool served
    ["fail",      "*",                         "failed"],      # error; this call's writes undone
]
# fmt: on

# Kept out of the work's share of `timeout` to undo this call's writes after a failure: the
# whole call, rollback included, ends by `timeout`. At most a quarter of it.
ROLLBACK_RESERVE = 3.0
# A DEL also sweeps its network's expired fences about once in this many calls, so hosts whose
# runtime never calls GC (Podman) still keep the fence folder bounded.
SWEEP_EVERY = 32
_NEEDS_1_1 = ("GC", "STATUS")
_ERROR_CODES: list[tuple[type[Exception], Code]] = [
    (PoolMissing, Code.MISSING_RESOURCE),
    (AllocationMissing, Code.MISSING_RESOURCE),
    (InvalidPool, Code.INVALID_RESOURCE),
    (PoolFull, Code.POOL_FULL),
    (NotInPool, Code.NOT_IN_POOL),
    (AddressInUse, Code.ADDRESS_IN_USE),
    (WriteConflict, Code.KV_WRITE_FAILED),
    (CallAbandoned, Code.TRY_AGAIN_LATER),
    (ConsulUnavailable, Code.TRY_AGAIN_LATER),
]


def consul_client(
    settings: config.ConsulSettings, budget: float | None = None, known_good: str | None = None
) -> ConsulClient:
    return build_client(settings, budget, known_good)  # the one builder: consul/settings.py


class Invocation:
    """The model the machine drives: everything one call knows, and the handler per state."""

    state: str
    trigger: Callable[[str], bool]  # added by the Machine, as `state` is

    def __init__(
        self,
        stdin: bytes,
        environ: Mapping[str, str],
        caches: PoolCaches | None = None,
        started: float | None = None,
        abandoned: Callable[[], bool] | None = None,
    ) -> None:
        self.stdin = stdin
        self.environ = environ
        self.caches = caches
        # When the runtime started the call (time.monotonic, which is system-wide: the helper
        # gets the thin client's), and whether it has stopped waiting for the answer.
        self.started = time.monotonic() if started is None else started
        self.abandoned = abandoned
        self.hard_end = self.started + 15.0
        # Marks this call's writes: a rollback removes exactly them, never a sibling's.
        self.call_id = os.urandom(6).hex()
        self.env = Environment("")
        self.conf: config.NetConf | None = None
        self.cni_version = SUPPORTED_VERSIONS[-1]
        self.client: ConsulClient | None = None
        self.allocator: Allocator | None = None
        self.todo: list[config.PoolRequest] = []
        self.current: config.PoolRequest | None = None
        self.pool: Pool | None = None
        self.held: list[Held] = []
        self.pick: tuple[IPAddress, IPRange, Held | None] | None = None
        self.over: Held | None = None  # a cooled-down release the picked address still holds
        self.conflicts = 0
        self.assigned: list[result.Assigned] = []
        self.claims: list[Claim] = []  # writes of this call, undone on failure
        self.problems: list[str] = []  # GC keeps going and reports them all
        self.output: dict[str, Any] | None = None
        self.error: CNIError | None = None
        self.machine = Machine(
            model=self,
            states=STATES,
            transitions=TRANSITIONS,
            initial="start",
            send_event=True,
            after_state_change="log_transition",
            auto_transitions=False,
        )

    # -- driver ------------------------------------------------------------------------------
    def run(self) -> int:
        while self.state not in ("done", "failed"):
            try:
                trigger = getattr(self, f"at_{self.state}")()
            except Exception as exc:  # every failure ends in the error state, never a traceback
                self.error = self.as_cni_error(exc)
                trigger = "fail"
            self.trigger(trigger)
        if self.client is not None:
            logger.debug("{} Consul requests in this call", self.client.requests_sent)
            if self.caches is not None and self.conf is not None and self.client.current:
                self.caches.remember_server(self.conf.consul, self.client.current)
            self.client.close()
        return 0 if self.error is None else int(self.error.code)

    def log_transition(self, event: EventData) -> None:
        t = event.transition
        assert t is not None  # after a state change, there was a transition
        logger.debug("state {} -> {} ({})", t.source, t.dest, event.event.name)

    # -- handlers, one per state ------------------------------------------------------------
    def at_start(self) -> str:
        try:
            self.env = read_env(self.environ)
        except CNIError:
            # The error must still echo the input's cniVersion, read before stdin is checked.
            self.cni_version = _stdin_version(self.stdin) or self.cni_version
            raise
        logger.debug(
            "ipam-da-consul {} {} container={!r} ifname={!r}",
            __version__,
            self.env.command,
            self.env.container_id,
            self.env.ifname,
        )
        versioning = self.env.command == "VERSION"
        data = {} if versioning and not self.stdin.strip() else config.decode(self.stdin)
        if isinstance(data.get("cniVersion"), str) and data["cniVersion"]:
            self.cni_version = data["cniVersion"]
        logger.debug("config: {}", config.redact(data))
        if versioning:
            return "parse"
        self.conf = config.load(data, self.env.command, self.environ, self.env.args)
        if self.env.command in _NEEDS_1_1 and self.conf.cni_version != "1.1.0":
            raise CNIError(
                Code.INCOMPATIBLE_VERSION,
                f"{self.env.command} needs cniVersion 1.1.0, got {self.conf.cni_version}",
            )
        self.todo = list(self.conf.pools)
        return "parse"

    def at_parsed(self) -> str:
        if self.env.command == "VERSION":
            self.output = VersionSchema().dump(
                {"cniVersion": self.cni_version, "supportedVersions": list(SUPPORTED_VERSIONS)}
            )
            return "report"
        assert self.conf is not None
        settings = self.conf.consul
        layout = Layout(settings.kv_prefix)
        cache, known_good = None, None
        # STATUS must see the real thing: a leader check and a fresh read of every pool.
        if self.caches is not None and self.env.command != "STATUS":
            known_good = self.caches.recent_server(settings)
            if self.env.command == "ADD":
                cache = self.caches.get(settings, layout)
        # `timeout` caps the whole call: the work gets what is left once the rollback's
        # reserve is set aside, and the rollback gets the reserve.
        self.hard_end = self.started + settings.timeout
        reserve = min(ROLLBACK_RESERVE, settings.timeout / 4)
        budget = max(0.0, self.hard_end - reserve - time.monotonic())
        self.client = consul_client(settings, budget, known_good=known_good)
        host = self.conf.host or config.default_host()
        attachment = Attachment(self.conf.name, *self.attachment())
        self.allocator = Allocator(
            ConsulKV(self.client),
            layout,
            host,
            cache,
            attachment=attachment,
            call=self.call_id,
            before_write=self.check_still_wanted,
            runtime=self.conf.runtime,
        )
        if self.client.current is None:
            self.client.select()
        return "connect"

    def at_connected(self) -> str:
        if self.env.command == "DEL":
            # First, so that a write of this attachment still in flight (a failed ADD's, whose
            # reply was lost) can no longer apply; the listings after it see any that did.
            assert self.allocator is not None
            self.allocator.raise_fence("DEL")
            return "fence"
        return self.next_pool_or_emit()

    def at_fenced(self) -> str:
        return self.next_pool_or_emit()

    def at_pool_done(self) -> str:
        return self.next_pool_or_emit()

    def at_pool_loaded(self) -> str:
        steps: dict[str, Callable[[], str]] = {
            "ADD": self.pick_address,
            "DEL": self.release_ours,
            "CHECK": self.verify_ours,
            "GC": self.collect_stale,
            "STATUS": self.assess_room,
        }
        return steps[self.env.command]()

    def at_ip_picked(self) -> str:
        assert self.pick is not None and self.allocator is not None and self.pool is not None
        ip, rng, held = self.pick
        allocator, pool = self.allocator, self.pool
        target = self.env.container_id
        if held is not None and allocator.owns(held):
            # Already ours: a repeated ADD, or our own write whose reply was lost.
            if not allocator.still_ours(pool, held):
                return self.lost_race(ip)
            if held.call != self.call_id and not self.write(
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
            over = self.over
            previous = over.value if over is not None else None
            if not self.write(ip, previous, lambda: allocator.claim(pool, ip, over)):
                return self.lost_race(ip)
        self.assigned.append(result.Assigned(self.pool.name, ip, rng))
        logger.debug("pool {!r}: {} for container {!r}", self.pool.name, ip, target)
        return "write"

    def on_enter_failed(self, event: EventData) -> None:
        assert self.error is not None
        if self.claims and self.client is not None:
            self.client.deadline.end = self.hard_end  # the reserve is the rollback's
            self.roll_back(self.claims, "rollback")
        journal = self.caches.journal if self.caches is not None else None
        if (
            journal is not None
            and self.env.command == "DEL"
            and self.error.code == Code.TRY_AGAIN_LATER
            and journal.record(self.stdin, self.environ)
        ):
            # Still 11: a runtime that retries is welcome to; the helper redoes it either way.
            self.error.msg += "; the helper journaled this DEL and redoes it once Consul answers"
        logger.error(
            "{} failed (code {}): {}",
            self.env.command or "call",
            int(self.error.code),
            self.error.msg,
        )
        self.output = self.error.to_wire(self.cni_version)

    # -- the work ---------------------------------------------------------------------------
    def attachment(self) -> tuple[str, str | None]:
        return self.env.container_id, self.env.ifname or None

    def check_still_wanted(self) -> None:
        """Before every write: a call nobody waits for, or past its budget, writes nothing."""
        if self.abandoned is not None and self.abandoned():
            raise CallAbandoned("the runtime stopped waiting for this call; nothing more written")
        if self.client is not None and self.client.deadline.expired():
            raise CallAbandoned("the call's time budget (ipam.timeout) ran out before a write")

    def roll_back(self, claims: list[Claim], reason: str) -> None:
        """Undo these writes of this call. One whose outcome is unknown may still apply, so the
        attachment's fence goes up first (one write), then each key holding exactly our bytes
        goes. If Consul cannot be reached, the runtime's DEL raises the fence and releases."""
        assert self.allocator is not None
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

    def next_pool_or_emit(self) -> str:
        if not self.todo:
            self.finish()
            return "emit"
        self.current = self.todo.pop(0)
        self.load_current()
        return "next_pool"

    def load_current(self) -> None:
        assert self.allocator is not None and self.current is not None
        if self.env.command == "DEL":
            self.held = self.our_keys(self.current.name)
        elif self.env.command == "GC":
            self.held = self.gc_scan(self.current.name)
        else:
            checking = self.env.command == "CHECK"
            load = self.allocator.load_ranges if checking else self.allocator.load
            self.pool = load(self.current.name)

    def gc_scan(self, name: str) -> list[Held]:
        """GC: the pool's readable allocations. A pool that is missing or cannot be read is a
        problem to report at the end, not a reason to skip the other pools."""
        assert self.allocator is not None
        try:
            held = self.allocator.scan(name, self.problems.append)
            # An empty listing cannot tell "no allocations" from "no such pool"; the pool key can.
            if not held and self.allocator.kv.get(self.allocator.layout.pool_key(name)) is None:
                raise PoolMissing(f"pool {name!r} does not exist")
        except ConsulUnavailable:
            raise  # no server left: the other pools cannot be read either
        except (AllocatorError, ConsulError) as exc:
            self.problems.append(str(exc))
            return []
        return held

    def finish(self) -> None:
        assert self.conf is not None and self.allocator is not None
        if self.env.command in ("DEL", "GC") and (
            self.env.command == "GC" or random.random() < 1 / SWEEP_EVERY
        ):
            try:
                self.allocator.sweep_fences(self.conf.name)
            except Exception as exc:  # housekeeping: never fails the call
                logger.warning("could not sweep expired fences: {}", exc)
        if self.env.command == "ADD":
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
            self.output = result.build(self.cni_version, self.conf.prev_result, self.assigned)
        if self.problems:
            raise CNIError(
                Code.KV_WRITE_FAILED, "GC finished with problems: " + "; ".join(self.problems)
            )

    def requested(self) -> tuple[IPAddress | None, bool]:
        """This pool's static address, and whether it may be taken from another container:
        the Pool's own requested IP may (the seed's re-allocation); a conventional one (CNI_ARGS,
        runtimeConfig, args) may not, as host-local refuses an address in use."""
        assert self.current is not None and self.pool is not None and self.conf is not None
        if self.current.requested_ip is not None:
            return self.current.requested_ip, True
        fits = (ip for ip in self.conf.requested_ips if self.pool.range_for(ip))
        return next(fits, None), False

    def pick_address(self) -> str:
        assert self.pool is not None and self.allocator is not None and self.conf is not None
        wanted, may_take = self.requested()
        self.over = None
        rng: IPRange | None
        if wanted is not None:
            rng = self.allocator.requested_range(self.pool, wanted)
            if self.pool.cached and wanted in self.pool.held:
                # The helper's copy can be behind a release (a DEL elsewhere, a restart with a
                # fixed address): only a fresh read of the key may say it is taken.
                self.allocator.recheck(self.pool, wanted)
            held = self.pool.held.get(wanted)
            if held is not None and held.reusable(time.time()):
                held, self.over = None, held  # a release past its cool-down: free
            if held is not None and not may_take and not self.allocator.owns(held):
                cooling = "" if held.free_after is None else " (released, cooling down)"
                raise AddressInUse(
                    f"requested IP {wanted} in pool {self.pool.name!r} is allocated to container "
                    f"{held.target!r}{cooling}; only a Pool's own requested-ip re-allocates an "
                    "address"
                )
            self.pick = (wanted, rng, held)
            return "pick_ip"
        for held in self.pool.ours(*self.attachment(), self.conf.name or None):
            rng = self.pool.range_for(held.ip)
            if rng is not None:
                self.pick = (held.ip, rng, held)  # idempotent ADD: hand back what we hold
                return "pick_ip"
        pool, allocator = self.pool, self.allocator
        spread = None
        if self.conf.pick == "spread":
            target, ifname = self.attachment()
            host = allocator.host or ""
            spread = spread_key(host, self.conf.name, target, ifname, pool.name)
        try:
            ip, rng, self.over = pool.reserve_next_free(
                lambda ip: allocator.ours_to_be(pool, ip), spread
            )
        except PoolFull:
            if not pool.cached:
                raise
            # The helper's cached pool lags behind releases made elsewhere (another host, a call
            # done in-process) by up to its refresh interval: only a fresh listing may say
            # "full". It also shows an address of ours the cache missed.
            self.pool = allocator.load(pool.name, fresh=True)
            return self.pick_address()
        self.pick = (ip, rng, None)
        return "pick_ip"

    def write(self, ip: IPAddress, previous: bytes | None, attempt: Callable[[], Claim]) -> bool:
        """Run one fenced CAS write; True when it holds. It is recorded before it is sent, as
        a claim of unknown outcome, since Consul may apply it though the reply is lost."""
        assert self.allocator is not None and self.pool is not None
        key = self.allocator.layout.allocation_key(self.pool.name, ip)
        self.check_still_wanted()
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
        assert self.client is not None and self.current is not None
        self.conflicts += 1
        if self.client.deadline.expired():
            raise WriteConflict(
                f"could not write an allocation in pool {self.current.name!r}: lost "
                f"{self.conflicts} compare-and-set races to other writers "
                "before the time budget ran out"
            )
        if self.pool is not None and self.pool.cached:
            logger.debug(
                "{} in pool {!r} was taken: the helper's cached copy was behind; picking again",
                ip,
                self.current.name,
            )
        else:
            logger.debug("lost the race for {} in pool {!r}; retrying", ip, self.current.name)
        self.client.deadline.sleep(random.uniform(0, 0.005 * min(self.conflicts, 20)))
        return "conflict"

    def our_keys(self, pool: str) -> list[Held]:
        """DEL: every key of this attachment in the pool, from one listing read after the
        fence went up: prevResult's addresses, and any other (a leak, an older version's)."""
        assert self.allocator is not None
        found = self.allocator.scan(pool, lambda why: logger.warning("DEL skips: {}", why))
        ours = [h for h in found if self.allocator.owns(h)]
        before = self.environ.get(REPLAY_BEFORE)
        if before:
            # A DEL the helper journaled during an outage, redone now: a key its attachment
            # wrote after that DEL (a new ADD) is not the one the runtime deleted.
            newer = [h for h in ours if h.at is not None and h.at > float(before)]
            for h in newer:
                logger.warning("journaled DEL spares {}: written after that DEL", h.key)
            ours = [h for h in ours if h not in newer]
        return ours

    def release_ours(self) -> str:
        assert self.allocator is not None and self.current is not None
        assert self.conf is not None
        cached = self.cached_pool(self.current.name)
        cooldown = self.conf.reuse_after
        for held in self.held:
            if not self.allocator.release(held, reuse_after=cooldown):
                raise WriteConflict(f"could not release {held.key}: it kept changing under us")
            if cached is not None and cached.held.get(held.ip) is not None and not cooldown:
                cached.discard(held.ip)  # so this host's next ADD may have it at once
            logger.debug("released {}", held.key)
        if not self.held:
            logger.debug("pool {!r}: nothing of ours to release", self.current.name)
        return "release"

    def cached_pool(self, name: str) -> Pool | None:
        """The helper's cached copy of a pool, if it keeps one."""
        if self.caches is None or self.conf is None:
            return None
        cache = self.caches.peek(self.conf.consul)  # never creates one just for a DEL
        return cache.peek(name) if cache is not None else None

    def verify_ours(self) -> str:
        """CHECK: each prevResult address inside this pool's ranges is still our key."""
        assert self.pool is not None and self.conf is not None and self.allocator is not None
        if self.conf.prev_result is None:
            raise CNIError(Code.INVALID_CONFIG, "CHECK needs the prevResult of the ADD")
        mine = [i.ip for i in self.conf.prev_ips if self.pool.range_for(i.ip) is not None]
        if not mine:
            raise AllocationMissing(f"prevResult holds no address from pool {self.pool.name!r}")
        for ip in mine:
            held = self.allocator.lookup(self.pool.name, ip)
            if held is None:
                raise AllocationMissing(f"{ip} is no longer allocated in pool {self.pool.name!r}")
            if not self.allocator.owns(held):
                raise AllocationMissing(
                    f"{ip} in pool {self.pool.name!r} is now allocated to container {held.target!r}"
                )
        return "verify"

    def collect_stale(self) -> str:
        """GC: release this network's allocations on this host whose attachment the runtime
        no longer has. Runtimes call GC once per network with that network's attachments, so
        a key of another network, another host, or with no network recorded is never touched.
        """
        assert self.allocator is not None and self.conf is not None
        valid = set(self.conf.valid_attachments or [])
        containers = {cid for cid, _ in valid}
        now = time.time()
        for held in self.held:
            if held.host != self.allocator.host or not self.conf.name:
                continue  # another host's, or written by a tool that records no host
            if held.network != self.conf.name:
                continue  # another network's (or an older version's, which records none)
            if held.free_after is not None:
                if held.reusable(now) and self.allocator.kv.delete(held.key, held.index):
                    logger.debug("GC removed {}, released and cooled down", held.key)
                continue
            if (held.target, held.ifname) in valid or (
                held.ifname is None and held.target in containers
            ):
                continue
            try:
                gone = Attachment(self.conf.name, held.target, held.ifname)
                self.allocator.raise_fence("GC", gone)
                if self.allocator.release(held, reuse_after=self.conf.reuse_after):
                    logger.debug("GC released {} (container {!r})", held.key, held.target)
                else:
                    self.problems.append(f"{held.key} kept changing; not released")
            except ConsulUnavailable:
                raise
            except ConsulError as exc:
                self.problems.append(f"{held.key}: {exc}")
        return "collect"

    def assess_room(self) -> str:
        """STATUS: the pool parses, has a free address, and at least `min_free` of them."""
        assert self.pool is not None and self.conf is not None
        self.pool.next_free()
        if self.conf.min_free:
            free = self.pool.free()
            if free < self.conf.min_free:
                raise PoolFull(
                    f"pool {self.pool.name!r} has {free} free address(es), fewer than "
                    f"ipam.min_free ({self.conf.min_free})"
                )
        return "assess"

    def as_cni_error(self, exc: Exception) -> CNIError:
        error = self.classify(exc)
        if self.env.command == "STATUS" and error.code not in INPUT_CODES:
            return CNIError(Code.NOT_READY, f"not ready to serve ADD: {error.msg}")
        return error

    def classify(self, exc: Exception) -> CNIError:
        if isinstance(exc, CNIError):
            return exc
        for kind, code in _ERROR_CODES:
            if isinstance(exc, kind):
                return CNIError(code, str(exc))
        if isinstance(exc, ConsulError):
            writing = (
                self.state == "ip_picked"
                or (self.state == "pool_loaded" and self.held)
                or (self.state == "connected" and self.env.command == "DEL")  # the fence
            )
            return CNIError(Code.KV_WRITE_FAILED if writing else Code.HTTP, str(exc))
        if isinstance(exc, AllocatorError):
            return CNIError(Code.INVALID_RESOURCE, str(exc))
        logger.opt(exception=exc).error("internal error")
        return CNIError(
            Code.INTERNAL,
            f"internal error: {type(exc).__name__}: {exc}",
            "this is a bug in ipam-da-consul; the verbose log has the traceback",
        )


def _stdin_version(stdin: bytes) -> str | None:
    """The cniVersion of stdin when it is a JSON object naming one; None otherwise."""
    try:
        data = json.loads(stdin)
    except (ValueError, UnicodeDecodeError):
        return None
    version = data.get("cniVersion") if isinstance(data, dict) else None
    return version if isinstance(version, str) and version else None
