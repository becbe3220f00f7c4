"""One CNI invocation as an explicit state machine.

The table below is the whole control flow. Each state has one handler (`at_<state>`) that does
the work that state calls for and returns the trigger to fire next; any exception fires `fail`.
"""

from __future__ import annotations

import json
import random
import socket
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from loguru import logger
from transitions import EventData, Machine

from .. import __version__
from ..allocator.allocate import Allocator, Claim
from ..allocator.errors import (
    AddressInUse,
    AllocationMissing,
    AllocatorError,
    InvalidPool,
    NotInPool,
    PoolFull,
    PoolMissing,
    WriteConflict,
)
from ..allocator.layout import Layout
from ..allocator.pool import Held, Pool
from ..allocator.ranges import IPAddress, IPRange
from ..consul import ConsulClient, ConsulError, ConsulKV, ConsulUnavailable, Deadline, TLSConfig
from . import config, result
from .env import Environment, read_env
from .errors import CNIError, Code
from .schemas import SUPPORTED_VERSIONS, VersionSchema

if TYPE_CHECKING:
    from .helper import PoolCaches

STATES = ["start", "parsed", "connected", "pool_loaded", "ip_picked", "pool_done", "done", "failed"]

# fmt: off
TRANSITIONS = [
    # trigger      source                       dest            what happened
    ["parse",     "start",                     "parsed"],      # env and stdin are valid
    ["report",    "parsed",                    "done"],        # VERSION answered
    ["connect",   "parsed",                    "connected"],   # a Consul server with a leader
    ["next_pool", ["connected", "pool_done"],  "pool_loaded"], # the next pool was read from KV
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

# Enough to undo this call's writes after a failure that used up the time budget.
ROLLBACK_GRACE = 5.0
_NEEDS_1_1 = ("GC", "STATUS")
_ERROR_CODES: list[tuple[type[Exception], Code]] = [
    (PoolMissing, Code.MISSING_RESOURCE),
    (AllocationMissing, Code.MISSING_RESOURCE),
    (InvalidPool, Code.INVALID_RESOURCE),
    (PoolFull, Code.POOL_FULL),
    (NotInPool, Code.NOT_IN_POOL),
    (AddressInUse, Code.ADDRESS_IN_USE),
    (WriteConflict, Code.KV_WRITE_FAILED),
    (ConsulUnavailable, Code.TRY_AGAIN_LATER),
]
_INPUT_CODES = (
    Code.INCOMPATIBLE_VERSION,
    Code.INVALID_ENV,
    Code.DECODE_FAILURE,
    Code.INVALID_CONFIG,
)


def consul_client(
    settings: config.ConsulSettings, budget: float | None = None, known_good: str | None = None
) -> ConsulClient:
    return ConsulClient(
        settings.servers,
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        deadline=Deadline(settings.timeout if budget is None else budget),
        token=settings.token,
        tls=TLSConfig(settings.ca_file, settings.cert_file, settings.key_file),
        datacenter=settings.datacenter,
        known_good=known_good,
    )


class Invocation:
    """The model the machine drives: everything one call knows, and the handler per state."""

    state: str

    def __init__(
        self, stdin: bytes, environ: Mapping[str, str], caches: PoolCaches | None = None
    ) -> None:
        self.stdin = stdin
        self.environ = environ
        self.caches = caches
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
        self.client = consul_client(settings, known_good=known_good)
        host = self.conf.host or socket.gethostname()
        self.allocator = Allocator(ConsulKV(self.client), layout, host, cache)
        if self.client.current is None:
            self.client.select()
        return "connect"

    def at_connected(self) -> str:
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
        target, ifname = self.attachment()
        if held is not None and held.owned_by(target, ifname):
            # Already ours: a repeated ADD, or our own write whose reply was lost.
            if not self.allocator.still_ours(self.pool, held, target, ifname):
                return self.lost_race(ip)
        elif held is not None:
            if not self.write(lambda: self.allocator.take_over(held, target, ifname), held.key):
                return self.lost_race(ip)
            logger.warning(
                "re-allocated requested IP {} in pool {!r} from container {!r} to {!r}",
                ip,
                self.pool.name,
                held.target,
                target,
            )
        else:
            key = self.allocator.layout.allocation_key(self.pool.name, ip)
            if not self.write(lambda: self.allocator.claim(self.pool, ip, target, ifname), key):
                return self.lost_race(ip)
        self.assigned.append(result.Assigned(self.pool.name, ip, rng))
        logger.debug("pool {!r}: {} for container {!r}", self.pool.name, ip, target)
        return "write"

    def on_enter_failed(self, event: EventData) -> None:
        assert self.error is not None
        if self.claims and self.allocator is not None and self.client is not None:
            self.client.deadline.extend(ROLLBACK_GRACE)
            for claim in reversed(self.claims):
                try:
                    self.allocator.undo(claim, self.attachment()[0])
                except Exception as exc:
                    logger.error(
                        "could not roll back {}: {}; DEL or GC will release it", claim.key, exc
                    )
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
        assert self.conf is not None
        if self.env.command == "ADD":
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
        assert self.pool is not None and self.allocator is not None
        wanted, may_take = self.requested()
        if wanted is not None:
            rng = self.allocator.requested_range(self.pool, wanted)
            held = self.pool.held.get(wanted)
            if held is not None and not may_take and not held.owned_by(*self.attachment()):
                raise AddressInUse(
                    f"requested IP {wanted} in pool {self.pool.name!r} is allocated to container "
                    f"{held.target!r}; only a Pool's own requested-ip re-allocates an address"
                )
            self.pick = (wanted, rng, held)
            return "pick_ip"
        for held in self.pool.ours(*self.attachment()):
            rng = self.pool.range_for(held.ip)
            if rng is not None:
                self.pick = (held.ip, rng, held)  # idempotent ADD: hand back what we hold
                return "pick_ip"
        target, ifname = self.attachment()
        pool, allocator = self.pool, self.allocator
        try:
            ip, rng = pool.reserve_next_free(
                lambda ip: allocator.ours_to_be(pool, ip, target, ifname)
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

    def write(self, attempt: Callable[[], Claim | None], key: str) -> bool:
        """Run one CAS write; recorded for rollback before it is sent, since a reply can be lost
        after Consul applied it."""
        assert self.pick is not None
        ip, _, held = self.pick
        pending = Claim(key, ip, None if held is None else held.value)
        self.claims.append(pending)
        claim = attempt()
        if claim is None:
            # Keep the pending record: a "lost" CAS can be our own write whose reply was lost
            # and whose resend (after failover) then found the key taken, by us. The re-pick
            # hands that key back as ours without writing, so without this record a later
            # failure would not roll it back. Undo only touches a key that holds our container.
            return False
        self.claims.pop()
        self.claims.append(claim)
        return True

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
        logger.debug("lost the race for {} in pool {!r}; retrying", ip, self.current.name)
        self.client.deadline.sleep(random.uniform(0, 0.005 * min(self.conflicts, 20)))
        assert self.allocator is not None and self.pool is not None
        self.allocator.recheck(self.pool, ip)
        return "conflict"

    def our_keys(self, pool: str) -> list[Held]:
        """DEL: the keys of ours; straight to prevResult's addresses when it names them."""
        assert self.allocator is not None and self.conf is not None
        found = []
        for iface in self.conf.prev_ips:
            try:
                held = self.allocator.lookup(pool, iface.ip)
            except InvalidPool as exc:
                logger.warning("DEL skips an unreadable key: {}", exc)
                continue
            if held is not None:
                found.append(held)
        if not found:
            found = self.allocator.scan(pool, lambda why: logger.warning("DEL skips: {}", why))
        return [h for h in found if h.owned_by(*self.attachment())]

    def release_ours(self) -> str:
        assert self.allocator is not None and self.current is not None
        for held in self.held:
            if not self.allocator.release(held, *self.attachment()):
                raise WriteConflict(f"could not release {held.key}: it kept changing under us")
            logger.debug("released {}", held.key)
        if not self.held:
            logger.debug("pool {!r}: nothing of ours to release", self.current.name)
        return "release"

    def verify_ours(self) -> str:
        """CHECK: each prevResult address inside this pool's ranges is still our key."""
        assert self.pool is not None and self.conf is not None and self.allocator is not None
        if self.conf.prev_result is None:
            raise CNIError(Code.INVALID_CONFIG, "CHECK needs the prevResult of the ADD")
        target, ifname = self.attachment()
        mine = [i.ip for i in self.conf.prev_ips if self.pool.range_for(i.ip) is not None]
        if not mine:
            raise AllocationMissing(f"prevResult holds no address from pool {self.pool.name!r}")
        for ip in mine:
            held = self.allocator.lookup(self.pool.name, ip)
            if held is None:
                raise AllocationMissing(f"{ip} is no longer allocated in pool {self.pool.name!r}")
            if not held.owned_by(target, ifname):
                raise AllocationMissing(
                    f"{ip} in pool {self.pool.name!r} is now allocated to container {held.target!r}"
                )
        return "verify"

    def collect_stale(self) -> str:
        """GC: release this host's allocations whose attachment the runtime no longer has."""
        assert self.allocator is not None and self.conf is not None
        valid = set(self.conf.valid_attachments or [])
        containers = {cid for cid, _ in valid}
        for held in self.held:
            if held.host != self.allocator.host:
                continue  # another host's, or written by a tool that records no host
            if (held.target, held.ifname) in valid or (
                held.ifname is None and held.target in containers
            ):
                continue
            try:
                if self.allocator.release(held, held.target, held.ifname):
                    logger.debug("GC released {} (container {!r})", held.key, held.target)
                else:
                    self.problems.append(f"{held.key} kept changing; not released")
            except ConsulUnavailable:
                raise
            except ConsulError as exc:
                self.problems.append(f"{held.key}: {exc}")
        return "collect"

    def assess_room(self) -> str:
        """STATUS: the pool parses and still has a free address."""
        assert self.pool is not None
        self.pool.next_free()
        return "assess"

    def as_cni_error(self, exc: Exception) -> CNIError:
        error = self.classify(exc)
        if self.env.command == "STATUS" and error.code not in _INPUT_CODES:
            return CNIError(Code.NOT_READY, f"not ready to serve ADD: {error.msg}")
        return error

    def classify(self, exc: Exception) -> CNIError:
        if isinstance(exc, CNIError):
            return exc
        for kind, code in _ERROR_CODES:
            if isinstance(exc, kind):
                return CNIError(code, str(exc))
        if isinstance(exc, ConsulError):
            writing = self.state == "ip_picked" or (self.state == "pool_loaded" and self.held)
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
