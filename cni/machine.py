"""One CNI invocation as an explicit state machine.

The table below is the whole control flow. Each state has one handler (`at_<state>`) that does
the work that state calls for and returns the trigger to fire next; any exception fires `fail`.
Parsing is done here; from `parsed` on, the handlers are the command's (cni/commands/: one
module per command, the shared ones in `base`). The call's store is the caller's to give
(`store_factory`: Consul's is built in cni/compose.py, the unit tier's over an in-memory KV):
nothing here knows Consul.

Each call keeps its own account (`Invocation.record`, cni/events.py): the transitions fired,
every Consul request its stores sent, and at the end what it was about and how it ended. The
helper's metrics and the verbose JSON log are made from it, and tests pin walks with it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from loguru import logger
from transitions import EventData, Machine

from .. import __version__
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
from ..allocator.layout import key_name
from ..allocator.store import StoreError, StoreUnavailable, UnsafeKey
from . import config
from .commands import KINDS, Command, Inputs, PoolCommand
from .commands.add import Add
from .env import read_env
from .errors import CNIError, Code
from .events import Address, CallRecord, Observer, Step
from .schemas import SUPPORTED_VERSIONS
from .state import Entry, StateDir
from .stdin import cni_version, decode, peek
from .stores import Caches, StoreFactory

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
    ["widen",     "pool_loaded",               "pool_loaded"], # ADD: no room seen; a wider read
    ["release",   "pool_loaded",               "pool_done"],   # DEL: our keys here are gone
    ["verify",    "pool_loaded",               "pool_done"],   # CHECK: our addresses still ours
    ["collect",   "pool_loaded",               "pool_done"],   # GC: stale keys of this host gone
    ["assess",    "pool_loaded",               "pool_done"],   # STATUS: pool parses, has room
    ["emit",      ["connected", "pool_done"],  "done"],        # every pool served
    ["defer",     ["parsed", "connected", "fenced", "pool_loaded", "pool_done"], "done"],
                                                               # DEL: no Consul; helper finishes it
    ["fail",      "*",                         "failed"],      # error; this call's writes undone
]
# fmt: on

_ERROR_CODES: list[tuple[type[Exception], Code]] = [
    (PoolMissing, Code.MISSING_RESOURCE),
    (AllocationMissing, Code.MISSING_RESOURCE),
    (InvalidPool, Code.INVALID_RESOURCE),
    # A key no request may be built from (allocator/store.py key_problem) came from KV: an
    # invalid resource.
    (UnsafeKey, Code.INVALID_RESOURCE),
    (PoolFull, Code.POOL_FULL),
    (NotInPool, Code.NOT_IN_POOL),
    (AddressInUse, Code.ADDRESS_IN_USE),
    (WriteConflict, Code.KV_WRITE_FAILED),
    (CallAbandoned, Code.TRY_AGAIN_LATER),
    (StoreUnavailable, Code.TRY_AGAIN_LATER),
]


class Invocation:
    """The model the machine drives: what the call was given, the command it turned out to be,
    the handler per state, and the call's account of itself (`record`, cni/events.py).
    `observer` hears of that account once the call has ended."""

    state: str
    trigger: Callable[..., bool]  # added by the Machine, as `state` is

    def __init__(
        self,
        stdin: bytes,
        environ: Mapping[str, str],
        caches: Caches | None = None,
        started: float | None = None,
        abandoned: Callable[[], bool] | None = None,
        *,
        store_factory: StoreFactory,
        state: StateDir | None = None,
        entry: Entry | None = None,
        until: float | None = None,
        observer: Observer | None = None,
    ) -> None:
        call_id = os.urandom(6).hex()
        self.record = CallRecord(
            call_id,
            command=environ.get("CNI_COMMAND", ""),
            container=environ.get("CNI_CONTAINERID", ""),
            ifname=environ.get("CNI_IFNAME", ""),
        )
        self.observer = observer
        self.inputs = Inputs(
            stdin,
            environ,
            caches,
            time.monotonic() if started is None else started,
            abandoned,
            call_id,
            store_factory,
            state,
            self.nested,
            entry,
            until,
            on_request=self.record.request,
        )
        self.cni_version = SUPPORTED_VERSIONS[-1]
        # Known once the environment is read; until then the base, whose hooks do nothing.
        self.kind: type[Command] = Command
        # Built once stdin is read; the states after `start` are its handlers.
        self.command = Command()
        self.output: dict[str, Any] | None = None
        self.error: CNIError | None = None
        self.machine = Machine(
            model=self,
            states=STATES,
            transitions=TRANSITIONS,
            initial="start",
            send_event=True,
            after_state_change="record_transition",
            auto_transitions=False,
        )

    # -- driver ------------------------------------------------------------------------------
    def run(self) -> int:
        began = time.monotonic()
        # The call's ID on each of its lines, for the JSON log (cni/logs.py).
        with logger.contextualize(call_id=self.inputs.call_id):
            while self.state not in ("done", "failed"):
                try:
                    trigger = getattr(self, f"at_{self.state}")()
                except Exception as exc:  # every failure ends in the error state, never a traceback
                    error = self.as_cni_error(exc)
                    instead = self.command.recover(error)
                    if instead is not None:
                        self.trigger(instead)
                    else:
                        self.trigger("fail", error=error)
                    continue
                self.trigger(trigger)
            self.command.close()
            if self.error is None:
                self.output = self.command.output
                code = 0
            else:
                code = int(self.error.code)
            self.close_record(code, began)
        return code

    def close_record(self, code: int, began: float) -> None:
        """Complete the call's account, log it, and tell the observer."""
        record, command = self.record, self.command
        record.code = code
        record.error = self.error.msg if self.error is not None else ""
        now = time.monotonic()
        record.seconds, record.elapsed = now - began, now - self.inputs.started
        if isinstance(command, PoolCommand):
            record.network = command.conf.name
            record.pools = [pool.name for pool in command.conf.pools]
            if isinstance(command, Add):
                record.conflicts = command.conflicts
                record.addresses = [Address(a.pool, key_name(a.ip)) for a in command.assigned]
            else:
                record.addresses = [Address(None, str(i.ip)) for i in command.conf.prev_ips]
        # The structured account rides along as `call_record` for the JSON log; the text is the
        # text log's.
        logger.bind(call_record=record).debug(
            "{} ended with code {} in {:.1f} ms: {} Consul requests, {} lost compare-and-set",
            record.command or "call",
            code,
            record.seconds * 1000,
            len(record.requests),
            record.conflicts,
        )
        if self.observer is not None:
            try:
                self.observer(record)
            except Exception as exc:  # metrics must never cost a call its answer
                logger.warning("the call's observer failed: {!r}", exc)

    @property
    def call_end(self) -> float | None:
        """When this call, rollback included, is over (monotonic); None for a call that ended
        before its settings were read, or that reads none (VERSION)."""
        return self.command.call_end

    def nested(self, stdin: bytes, environ: Mapping[str, str], entry: Entry) -> tuple[int, str]:
        """Run another call of this attachment (a DEL its entry still owes) within this one,
        under this call's lock on the entry and within its deadline."""
        from .commands.delete import REPLAY_MARK

        inputs = self.inputs
        call = Invocation(
            stdin,
            {**environ, REPLAY_MARK: "1"},
            inputs.caches,
            started=inputs.started,
            abandoned=inputs.abandoned,
            store_factory=inputs.store_factory,
            state=inputs.state,
            entry=entry,
            # Its own settings may give it longer than this call has left: it runs within
            # this call, whose answer waits for it.
            until=inputs.until if self.call_end is None else self.call_end,
        )
        call.record.within = inputs.call_id
        code = call.run()
        # Its requests are this call's too (the helper counts them under this call).
        self.record.requests += call.record.requests
        msg = call.error.msg if call.error is not None else ""
        return code, msg

    def record_transition(self, event: EventData) -> None:
        t = event.transition
        if t is not None:  # always, after a state change
            # The call's walk (`record.steps`) for whoever needs it (metrics, the JSON log,
            # tests pinning exact walks), never rebuilt from the log line below.
            self.record.steps.append(Step(t.source, t.dest or t.source, event.event.name))
            logger.debug("state {} -> {} ({})", t.source, t.dest, event.event.name)

    # -- handlers, one per state ------------------------------------------------------------
    def at_start(self) -> str:
        """Read the environment and stdin, and build the command they ask for."""
        stdin, environ = self.inputs.stdin, self.inputs.environ
        try:
            env = read_env(environ)
        except CNIError:
            # The error must still echo the input's cniVersion, read before stdin is checked.
            self.cni_version = cni_version(peek(stdin)) or self.cni_version
            raise
        self.kind = KINDS[env.command]
        logger.debug(
            "ipam-da-consul {} {} container={!r} ifname={!r}",
            __version__,
            env.command,
            env.container_id,
            env.ifname,
        )
        empty = self.kind.stdin_optional and not stdin.strip()
        data = {} if empty else decode(stdin)
        self.cni_version = cni_version(data) or self.cni_version
        logger.debug("config: {}", config.redact(data))
        self.command = self.kind.build(self.inputs, env, data, self.cni_version)
        return "parse"

    def at_parsed(self) -> str:
        """VERSION answers; the others select a Consul server (cni/commands/base.py)."""
        return self.command.at_parsed()

    def at_connected(self) -> str:
        """DEL raises its fence; the others load their first pool."""
        return self.command.at_connected()

    def at_fenced(self) -> str:
        return self.command.at_fenced()

    def at_pool_loaded(self) -> str:
        """The command's work on one pool (pick, release, verify, collect, assess)."""
        return self.command.at_pool_loaded()

    def at_ip_picked(self) -> str:
        return self.command.at_ip_picked()

    def at_pool_done(self) -> str:
        return self.command.at_pool_done()

    def on_enter_failed(self, event: EventData) -> None:
        error: CNIError = event.kwargs["error"]
        self.error = error
        self.command.failed(error)  # ADD rolls its writes back, DEL may be journaled
        name = self.kind.name or "call"
        logger.error("{} failed (code {}): {}", name, int(error.code), error.msg)
        self.output = error.to_wire(self.cni_version)

    # -- errors ------------------------------------------------------------------------------
    def as_cni_error(self, exc: Exception) -> CNIError:
        return self.kind.as_error(self.classify(exc))

    def classify(self, exc: Exception) -> CNIError:
        if isinstance(exc, CNIError):
            return exc
        for exc_type, code in _ERROR_CODES:
            if isinstance(exc, exc_type):
                return CNIError(code, str(exc))
        if isinstance(exc, StoreError):
            writing = self.command.writing(self.state)
            return CNIError(Code.KV_WRITE_FAILED if writing else Code.HTTP, str(exc))
        if isinstance(exc, AllocatorError):
            return CNIError(Code.INVALID_RESOURCE, str(exc))
        logger.opt(exception=exc).error("internal error")
        return CNIError(
            Code.INTERNAL,
            f"internal error: {type(exc).__name__}: {exc}",
            "this is a bug in ipam-da-consul; the verbose log has the traceback",
        )

