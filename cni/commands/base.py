"""What the commands share: the call's validated inputs, its store and allocator, and the
walk over its pools (parse, select a server, load each pool). A command module adds the
handlers of the states only it goes through; cni/machine.py's table says which those are.

Handlers return the trigger to fire next. A state reached only after another set something
(the pool after `next_pool`, ADD's pick after `pick_ip`) reads it as a plain attribute: the
table guarantees the order, so nothing here is Optional or asserted.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from loguru import logger

from ...allocator.allocate import FENCE_LIFETIME, Allocator, Attachment, FenceSessions
from ...allocator.errors import CallAbandoned
from ...allocator.layout import Layout
from ...allocator.ledger import Ledger, MemoryLedger
from ...allocator.pool import Pool
from ...allocator.ranges import IPAddress
from ...allocator.stripes import StripeHints
from .. import config
from ..env import Environment
from ..errors import CNIError, Code
from ..events import Request
from ..state import SESSION_PERIOD, Entry, MemorySessions, NoteHints, StateDir, StateError
from ..stores import Caches, PoolCache, Store, StoreFactory

# Kept out of the work's share of `timeout` to undo this call's writes after a failure: the
# whole call, rollback included, ends by `timeout`. At most a quarter of it.
ROLLBACK_RESERVE = 3.0
# Kept out of `timeout` for what follows the work: the answer crossing the helper's socket,
# the process writing it and exiting. `timeout` is a cap on the call as the runtime sees it.
EXIT_MARGIN = 0.3


@dataclass(frozen=True)
class Inputs:
    """What the runtime (or the helper) hands one call."""

    stdin: bytes
    environ: Mapping[str, str]
    caches: Caches | None
    # When the runtime started the call (time.monotonic, which is system-wide: the helper
    # gets the thin client's), and whether it has stopped waiting for the answer.
    started: float
    abandoned: Callable[[], bool] | None
    # Marks this call's writes: a rollback removes exactly them, never a sibling's.
    call_id: str
    store_factory: StoreFactory
    # The host's state folder (cni/state.py): None when there is none to use.
    state: StateDir | None = None
    # Runs another call (a DEL this attachment's entry still owes) under this call's lock on
    # the entry; its exit code and message. Set by the machine.
    nested: Callable[[bytes, Mapping[str, str], Entry], tuple[int, str]] | None = None
    # Given to a nested call: the entry its caller holds locked.
    entry: Entry | None = None
    # When the process running this call must be done with it (monotonic), whatever the
    # call's own `timeout` says: a call run after another's answer in the same process
    # (cni/main.py finish_others) gets only what is left of that one's. None: no such bound.
    until: float | None = None
    # Told of each Consul request the call's store sends (the call's report, cni/events.py).
    on_request: Callable[[Request], None] | None = None


def call_budget(
    started: float, timeout: float, until: float | None, now: float
) -> tuple[float, float]:
    """When a call that started at `started` (monotonic) with `timeout` seconds must be over,
    rollback included, and the seconds its work gets from `now`.

    `timeout` caps the whole call as the runtime sees it: the work gets what is left once the
    rollback's reserve and the exit's margin are set aside. A call bounded by `until` (another
    call's end) ends by then, and its reserve is a share of the time it really has, so a short
    window still leaves the work some of it."""
    call_end = started + timeout - EXIT_MARGIN
    if until is not None:
        call_end = min(call_end, until)
    reserve = min(ROLLBACK_RESERVE, max(0.0, min(timeout, call_end + EXIT_MARGIN - started)) / 4)
    return call_end, max(0.0, call_end - reserve - now)


@dataclass(frozen=True)
class Session:
    """A parsed call of a pool command, with its store open (no request sent yet)."""

    inputs: Inputs
    env: Environment
    conf: config.NetConf
    cni_version: str
    store: Store
    allocator: Allocator
    # What CNI calls the attachment: the network, the container, its interface.
    attachment: Attachment
    # started + `timeout` (monotonic): the call, rollback included, is over by then; the
    # store's deadline, the work's, is earlier by the rollback's reserve.
    call_end: float
    # The attachment's entry in the state folder, locked for this call (ADD and DEL).
    entry: Entry | None = None


def write_guard(store: Store, abandoned: Callable[[], bool] | None) -> Callable[[], None]:
    """The allocator's `before_write`: a call nobody waits for, or past its deadline, writes
    nothing."""

    def before_write() -> None:
        if abandoned is not None and abandoned():
            raise CallAbandoned("the runtime stopped waiting for this call; nothing more written")
        if store.deadline.expired():
            raise CallAbandoned("the call's time budget (ipam.timeout) ran out before a write")

    return before_write


class Command:
    """One CNI command's handlers. This base is also the call before its command is known:
    every handler refuses, and the failure hooks do nothing."""

    name: ClassVar[str] = ""
    # VERSION may come with an empty stdin.
    stdin_optional: ClassVar[bool] = False
    output: dict[str, Any] | None = None
    # When the call, rollback included, is over (Session.call_end); None until it is known.
    call_end: float | None = None

    @classmethod
    def build(
        cls, inputs: Inputs, env: Environment, data: dict[str, Any], cni_version: str
    ) -> Command:
        """The command for a call whose environment and stdin JSON are read."""
        raise NotImplementedError(f"{cls.__name__} cannot be built")

    @classmethod
    def as_error(cls, error: CNIError) -> CNIError:
        """The error this command reports for `error` (STATUS words its own)."""
        return error

    def at_parsed(self) -> str:
        return self._none("parsed")

    def at_connected(self) -> str:
        return self._none("connected")

    def at_fenced(self) -> str:
        return self._none("fenced")

    def at_pool_loaded(self) -> str:
        return self._none("pool_loaded")

    def at_ip_picked(self) -> str:
        return self._none("ip_picked")

    def at_pool_done(self) -> str:
        return self._none("pool_done")

    def writing(self, state: str) -> bool:
        """Whether a Consul error in `state` hit a write (125) rather than a read (111)."""
        return False

    def failed(self, error: CNIError) -> None:
        """The call failed with `error`: undo what must be undone."""

    def recover(self, error: CNIError) -> str | None:
        """A trigger that ends the call some other way than failing (a DEL the helper takes
        over), or None."""
        return None

    def close(self) -> None:
        """The call is over, either way."""

    def _none(self, state: str) -> str:
        raise RuntimeError(f"{type(self).__name__} has no handler for state {state!r}")


class PoolCommand(Command):
    """A command that reads pools (all but VERSION): select a server, then each pool in turn."""

    needs_1_1: ClassVar[bool] = False
    # ADD and DEL: the attachment's writes are kept in its state entry (cni/state.py).
    keeps_ledger: ClassVar[bool] = False
    # Set by `next_pool`, before any pool_loaded.
    current: config.PoolRequest
    pool: Pool

    @classmethod
    def build(
        cls, inputs: Inputs, env: Environment, data: dict[str, Any], cni_version: str
    ) -> Command:
        conf = config.load(data, env.command, inputs.environ, env.args)
        if cls.needs_1_1 and conf.cni_version != "1.1.0":
            raise CNIError(
                Code.INCOMPATIBLE_VERSION,
                f"{env.command} needs cniVersion 1.1.0, got {conf.cni_version}",
            )
        return cls(cls.open(inputs, env, conf, cni_version))

    @classmethod
    def pool_cache(
        cls, caches: Caches, settings: config.ConsulSettings, layout: Layout
    ) -> PoolCache | None:
        """The helper's cached pools this command may read (only ADD does)."""
        return None

    @classmethod
    def open(
        cls, inputs: Inputs, env: Environment, conf: config.NetConf, cni_version: str
    ) -> Session:
        settings = conf.consul
        layout = Layout(settings.kv_prefix)
        caches, cache, known_good = inputs.caches, None, None
        if caches is not None:
            # A server the helper saw with a leader moments ago spares a leader check.
            known_good = caches.recent_server(settings)
            cache = cls.pool_cache(caches, settings, layout)
        call_end, seconds = call_budget(
            inputs.started, settings.timeout, inputs.until, time.monotonic()
        )
        host = conf.host or config.default_host()
        entry = cls.open_entry(inputs, conf, env, call_end)
        ledger: Ledger = entry if entry is not None else MemoryLedger()
        store = inputs.store_factory(settings, seconds, known_good, inputs.on_request)
        attachment = Attachment(conf.name, env.container_id, env.ifname or None)
        allocator = Allocator(
            store.kv,
            layout,
            host,
            cache,
            attachment=attachment,
            call=inputs.call_id,
            before_write=write_guard(store, inputs.abandoned),
            runtime=conf.runtime,
            ledger=ledger,
            sessions=fence_sessions(inputs.state, settings, host),
            cooling=cooling_sessions(inputs.state, settings, host, conf.reuse_after),
            hints=stripe_hints(cache, inputs.state, settings),
        )
        return Session(
            inputs, env, conf, cni_version, store, allocator, attachment, call_end, entry
        )

    @classmethod
    def open_entry(
        cls, inputs: Inputs, conf: config.NetConf, env: Environment, until: float
    ) -> Entry | None:
        """The attachment's entry in the state folder, locked for the call: commands that
        write for one attachment (ADD, DEL) keep their claims there."""
        if not cls.keeps_ledger:
            return None
        if inputs.entry is not None:
            return inputs.entry
        if inputs.state is None:
            return None
        try:
            entry = inputs.state.entry((conf.name, env.container_id, env.ifname), until)
        except StateError as exc:
            raise CNIError(Code.TRY_AGAIN_LATER, str(exc)) from None
        if entry.unreadable:
            logger.error("{}; this call keeps its claims in memory only", entry.unreadable)
            entry.close()
            return None
        return entry

    def __init__(self, session: Session) -> None:
        self.session = session
        self.call_end = session.call_end
        self.env = session.env
        self.conf = session.conf
        self.store = session.store
        self.allocator = session.allocator
        self.todo = list(session.conf.pools)

    # -- the shared states --------------------------------------------------------------------
    def at_parsed(self) -> str:
        """Select a server with a leader (unless the helper just saw one)."""
        if self.store.current is None:
            self.store.select()
        return "connect"

    def at_connected(self) -> str:
        return self.next_pool_or_emit()

    def at_pool_done(self) -> str:
        return self.next_pool_or_emit()

    def next_pool_or_emit(self) -> str:
        if not self.todo:
            self.finish()
            return "emit"
        self.current = self.todo.pop(0)
        self.load(self.current)
        return "next_pool"

    def load(self, request: config.PoolRequest) -> None:
        """Read the pool this command works on next."""
        self.pool = self.allocator.load(request.name)

    def finish(self) -> None:
        """Every pool is served: what remains to do before `emit`."""

    def close(self) -> None:
        store, caches = self.store, self.session.inputs.caches
        logger.debug("{} Consul requests in this call", store.requests_sent)
        # Only a call that reached the server vouches for it: one that sent nothing (a STATUS of
        # no pools) must not keep a server the helper once saw alive remembered for ever.
        if caches is not None and store.current and store.requests_sent:
            caches.remember_server(self.conf.consul, store.current)
        store.close()
        entry = self.session.entry
        if entry is not None and entry is not self.session.inputs.entry:
            entry.close()  # a nested call's entry is its caller's to close

    # -- shared work --------------------------------------------------------------------------
    def cached_pool(self, name: str, ip: IPAddress | None = None) -> Pool | None:
        """The helper's watched copy of a pool (with `ip`: the copy that sees it, the pool's
        or a stripe's), if it keeps one; never starts one."""
        caches = self.session.inputs.caches
        if caches is None:
            return None
        cache = caches.peek(self.conf.consul)
        return cache.peek(name, ip) if cache is not None else None



def fence_sessions(
    state: StateDir | None, settings: config.ConsulSettings, host: str
) -> FenceSessions:
    """Where this call's fences get their session: shared with this host's other calls that
    reach Consul the same way (tokens never share one)."""
    return _sessions(state, settings, f"ipam-da-consul fences of {host}", FENCE_LIFETIME)


def cooling_sessions(
    state: StateDir | None, settings: config.ConsulSettings, host: str, reuse_after: float
) -> FenceSessions | None:
    """Where this call's releases get the session that ends their cool-down (`reuse_after`),
    None without one. A session is used for a tenth of the cool-down (10 s at least), so a
    release cools down between `reuse_after` and about twice that plus the tenth (Consul's
    leader may end a session up to twice its TTL late)."""
    if reuse_after <= 0:
        return None
    name = f"ipam-da-consul releases of {host}, {reuse_after:g} s"
    return _sessions(state, settings, name, reuse_after, max(10.0, reuse_after / 10))


def stripe_hints(
    cache: PoolCache | None, state: StateDir | None, settings: config.ConsulSettings
) -> StripeHints | None:
    """Where this host last found room in a pool outside its home stripe: the helper keeps
    it with its pools; in-process calls note it in the state folder."""
    if cache is not None:
        return cache
    if state is None:
        return None
    scope = "\0".join([*settings.servers, settings.datacenter or "", settings.kv_prefix])
    return NoteHints(state, scope)


def _sessions(
    state: StateDir | None,
    settings: config.ConsulSettings,
    name: str,
    lifetime: float,
    period: float = SESSION_PERIOD,
) -> FenceSessions:
    # Consul ends a session at the earliest its TTL (at least 10 s) after its creation, and
    # it is handed out for `period` after that: what it locks lives at least `lifetime`.
    ttl = max(10.0, lifetime + period)
    if state is None:
        return MemorySessions(name, ttl, period)
    reach = "\0".join([*settings.servers, settings.datacenter or "", settings.token or ""])
    return state.sessions(reach, name, ttl, period)
