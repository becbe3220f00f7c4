"""The helper's server: a long-lived local process that serves plugin calls.

Why it exists: a CNI plugin is a new process per call, and importing requests, marshmallow,
transitions and loguru alone costs ~200 ms, some 15x a bare interpreter start. The helper keeps
them imported, keeps pools in memory (refreshed from Consul in the background), and answers the
plugin's thin client over a unix socket that only root (or the helper's own user) can use.
Without a helper the plugin does the same work in-process; results are identical.

The handshake with the client (client.py) makes each call run in exactly one place: the
helper acknowledges a request at once, runs it only after the client's "go", and drops it if
the client hung up instead (it gave up waiting and did the call itself).

Under systemd it can be started on demand: a socket unit holds the listening socket and passes
it (LISTEN_FDS / LISTEN_PID, fd 3), and `--idle-exit` ends the helper after a quiet spell; the
next call's connection waits in the socket's queue until systemd has started it again.

The command line is cli.py; what is kept between calls, caches.py.
"""

from __future__ import annotations

import io
import json
import marshal
import math
import os
import select
import socket
import socketserver
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger

from .. import logs
from .. import stdin as stdin_json
from ..main import execute
from .caches import PoolCaches
from .wire import TRY_AGAIN_LATER, WIRE_VERSION, frame, read_frame

# The heavy modules (requests, marshmallow, transitions: ~0.3 s, seconds on a loaded host) are
# imported in the background once the helper listens, not here: a helper started on demand by
# its first call must acknowledge it within the client's ack timeout (1 s), and the handshake
# needs none of them. A call that arrives before they are loaded waits for them in execute().
if TYPE_CHECKING:
    from ...allocator.store import WatchableKV
    from ..config import ConsulSettings
    from ..events import Request
    from ..state import Entry
    from .metrics import Metrics

# A client sends its request right after connecting; one that does not must not hold a thread.
_REQUEST_WAIT = 10.0
# The answer is small, but a client that stopped reading must not hold a thread either.
_ANSWER_SEND = 10.0
# sd_listen_fds(3): the first socket systemd passes.
_LISTEN_FDS_START = 3


def watch_kv(
    settings: ConsulSettings, on_request: Callable[[Request], None] | None = None
) -> WatchableKV:
    """The KV one pool watcher reads with (cni/compose.py), loaded when the first pool is
    watched: by then preload has imported it, off the accepting thread. `on_request` is told
    of each request it sends (the metrics' background requests)."""
    from ..compose import watch_kv as consul_watch_kv

    return consul_watch_kv(settings, on_request)


def preload() -> None:
    """Import what calls need (see the imports above), off the accepting thread: the frames'
    schemas first, which every request needs."""
    from .. import compose, machine  # noqa: F401  (config, the Consul client, the allocator)
    from . import frames  # noqa: F401


@dataclass(frozen=True)
class Call:
    """One request as received, with what the helper derives from it before the handshake."""

    stdin: bytes
    env: dict[str, str]
    verbose: bool
    started: float
    deadline: float
    cni_version: str | None

    @classmethod
    def from_request(cls, request: dict[str, Any], now: float) -> Call:
        """ValueError for a request that is not a call (frames.py CallRequest)."""
        from . import frames

        call = frames.load_call(request)
        stdin = call["stdin"]
        # A start in the future would stretch the deadline: the client's clock is ours, so
        # that can only be a forged or broken request.
        started = min(call["started"], now)
        # The deadline the client waits for, and the version of the error it may print.
        config = stdin_json.peek(stdin)
        deadline = started + stdin_json.call_timeout(config)
        version = stdin_json.cni_version(config)
        return cls(stdin, call["env"], call["verbose"], started, deadline, version)


def hung_up(sock: socket.socket) -> Callable[[], bool]:
    """A cheap, non-blocking check that the client closed its end (it timed out or died): the
    machine asks before every Consul write, so a call nobody waits for writes nothing."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLRDHUP | select.POLLHUP | select.POLLERR)

    def abandoned() -> bool:
        return bool(poller.poll(0))

    return abandoned


class Handler(socketserver.StreamRequestHandler):
    server: HelperServer

    def handle(self) -> None:
        if not self.peer_allowed():
            return
        from . import frames  # marshmallow: loaded by preload, or by the first request
        sock: socket.socket = self.request
        sock.settimeout(_REQUEST_WAIT)
        try:
            request = marshal.loads(read_frame(sock.recv))
            if not isinstance(request, dict):
                raise TypeError("not a dict")
        except (OSError, ValueError, EOFError, TypeError) as exc:
            logger.warning("helper: malformed request: {}", exc)
            return  # the client falls back to doing the call itself
        # The version by hand: a request of another version has a shape this helper does not know.
        if request.get("v") != WIRE_VERSION:
            self.server.count("refused")
            logger.warning(
                "helper: refused a request of wire version {!r} (this helper speaks {}): "
                "restart the helper after an upgrade",
                request.get("v"),
                WIRE_VERSION,
            )
            self.send(frames.refused("wire version"))
            return
        if request.get("op") == "stats":
            self.send(frames.stats(self.server.stats()))
            return
        now = time.monotonic()
        try:
            call = Call.from_request(request, now)
        except ValueError as exc:
            logger.warning("helper: malformed request: {}", exc)
            return
        if now >= call.deadline:
            # Queued while the helper could not run (stopped, swapping): the client has long
            # done the call itself, or given up.
            late = now - call.deadline
            self.drop("late", f"its deadline passed {late:.1f} s before the helper got to it")
            return
        if not self.handshake(sock, call):
            self.drop("hung_up", "the client hung up without go (it does the call itself)")
            return
        if time.monotonic() >= call.deadline:
            self.drop("late", "its deadline passed before go arrived")
            self.send(_too_late(call))
            return
        self.server.count("served")
        self.send(self.serve(call, hung_up(sock)))

    def handshake(self, sock: socket.socket, call: Call) -> bool:
        """Acknowledge, then wait for the client's go (until the deadline at most)."""
        from . import frames

        ack = frames.ack(call.deadline, call.cni_version or "1.0.0")
        try:
            sock.sendall(frame(ack))
            sock.settimeout(max(call.deadline - time.monotonic(), 0.001))
            go = marshal.loads(read_frame(sock.recv))
        except (OSError, ValueError, EOFError, TypeError):
            return False
        return frames.is_go(go)

    def drop(self, counter: str, why: str) -> None:
        self.server.count(f"dropped_{counter}")
        logger.warning("helper: dropped a request without running it: {}", why)

    def send(self, message: dict[str, Any]) -> None:
        try:
            self.request.settimeout(_ANSWER_SEND)
            self.request.sendall(frame(message))
        except OSError as exc:
            logger.warning("helper: could not answer the client: {}", exc)

    def peer_allowed(self) -> bool:
        creds = self.request.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")
        )
        _, uid, _ = struct.unpack("3i", creds)
        if uid in (0, os.geteuid()):
            return True
        logger.warning("helper: refused a connection from uid {}", uid)
        return False

    def serve(self, call: Call, abandoned: Callable[[], bool]) -> dict[str, Any]:
        from . import frames

        err = io.StringIO()
        log_file = call.env.get("IPAM_DA_CONSUL_LOG_FILE") or logs.DEFAULT_LOG_FILE
        caches, metrics = self.server.caches, self.server.metrics
        log = logs.CallLog(err, log_file if call.verbose else None, logs.log_format(call.env))
        with logger.contextualize(call=log):
            out, code = execute(
                call.stdin,
                call.env,
                caches,
                started=call.started,
                abandoned=abandoned,
                state=caches.state,
                observer=metrics.observe_call if metrics is not None else None,
            )
        if caches.replayer is not None:
            caches.replayer.poke(code)  # a call went through: Consul may be back
        return frames.answer(out, err.getvalue(), code)


def replay_forever(caches: PoolCaches, metrics: Metrics | None = None) -> None:
    """The replay thread (journal.py): each entry's work done as the plugin's calls do it."""
    preload()
    from .. import replay
    from ..compose import consul_store

    state, replayer = caches.state, caches.replayer
    assert state is not None and replayer is not None
    observer = metrics.observe_replay if metrics is not None else None

    def finish(entry: Entry) -> int:
        # Its log lines go to the helper's stderr, where an operator looks for them later.
        with logger.contextualize(call=logs.CallLog(sys.stderr)):
            return replay.finish(entry, state, consul_store, caches, observer=observer)

    replayer.finish = finish
    replayer.run_forever()


def _too_late(call: Call) -> dict[str, Any]:
    from . import frames

    msg = "the call's deadline passed before the helper could start it; nothing was done"
    error = {"cniVersion": call.cni_version or "1.0.0", "code": TRY_AGAIN_LATER, "msg": msg}
    return frames.answer(
        json.dumps(error) + "\n", f"ipam-da-consul: ERROR: {msg}\n", TRY_AGAIN_LATER
    )


class SetupError(Exception):
    """The helper cannot serve safely from this socket path."""


def prepare_folder(folder: Path) -> None:
    """Create the socket's folder 0700 when missing; never change an existing one, only refuse
    it when others could replace the socket in it."""
    old_umask = os.umask(0o077)
    try:
        folder.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    finally:
        os.umask(old_umask)
    st = os.stat(folder)
    if not stat.S_ISDIR(st.st_mode):
        raise SetupError(f"{folder} is not a folder")
    if st.st_uid not in (0, os.geteuid()):
        raise SetupError(
            f"the socket folder {folder} belongs to uid {st.st_uid}, neither root nor this "
            f"helper's uid {os.geteuid()}: its owner could replace the socket"
        )
    if st.st_mode & 0o022:
        # Sticky (/tmp) or not: another user can take the socket's name first (a helper could
        # never start, and calls would run in-process for good), or, owning a folder above,
        # swap it. The client trusts only a root or same-user peer (SO_PEERCRED) whatever the
        # path, but a helper is never set up where it can be kept out.
        raise SetupError(
            f"the socket folder {folder} (mode {stat.S_IMODE(st.st_mode):04o}) is writable by "
            "others: another user could take the socket's name first; use a private folder "
            "(the default /run/ipam-da-consul is created 0700)"
        )


def clear_stale_socket(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SetupError(f"{path} exists and is not a socket; not removing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)  # left by a helper that died
        return
    except OSError:
        pass  # a timeout: a helper is there, busy or stopped
    finally:
        probe.close()
    raise SetupError(f"another helper is listening on {path}")


def activated_socket() -> socket.socket | None:
    """The listening socket systemd (or systemd-socket-activate) passed us, if any.

    LISTEN_PID names the process the sockets are for: a helper started by something that
    merely inherited the variables (a shell, a test runner) must bind its own socket. The
    variables are removed either way so that nothing this process starts inherits them."""
    pid, fds = os.environ.pop("LISTEN_PID", ""), os.environ.pop("LISTEN_FDS", "")
    os.environ.pop("LISTEN_FDNAMES", None)
    if not pid.isdigit() or int(pid) != os.getpid():
        return None
    if not fds.isdigit() or int(fds) < 1:
        raise SetupError(f"LISTEN_FDS={fds!r}: socket activation passed no socket")
    if int(fds) > 1:
        raise SetupError(
            f"socket activation passed {fds} sockets; the helper serves exactly one "
            "(one ListenStream= in the socket unit)"
        )
    sock = socket.socket(fileno=_LISTEN_FDS_START)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        family, kind = sock.family, sock.type
        sock.detach()  # not ours to close: leave the descriptor as systemd gave it
        raise SetupError(f"the activated socket is {family!r}/{kind!r}, not a unix stream")
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.detach()
        raise SetupError("the activated socket is not listening (Accept=yes is not supported)")
    os.set_inheritable(sock.fileno(), False)
    return sock


class HelperServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    # A node starting hundreds of containers connects all at once; a refused connection
    # would push those calls onto the slow in-process path.
    request_queue_size = 1024

    def __init__(
        self,
        path: str,
        caches: PoolCaches,
        activated: socket.socket | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.caches = caches
        self.path = path
        self.metrics = metrics
        self.counters: dict[str, int] = {}
        self.counters_lock = threading.Lock()
        self.accept_backoff, self.accept_warned = 0.0, -math.inf
        # Connections being handled, and when the last one ended: what --idle-exit watches.
        self.activity = threading.Condition()
        self.active = 0
        self.last_active = time.monotonic()
        # Systemd owns an activated socket and its path: never unlink it, nor check the
        # folder it made (DirectoryMode=0700 in the unit).
        self.activated = activated is not None
        if activated is not None:
            super().__init__(path, Handler, bind_and_activate=False)
            self.socket.close()
            self.socket = activated
            self.server_address = activated.getsockname() or path
            return
        prepare_folder(Path(path).parent)
        clear_stale_socket(Path(path))
        old_umask = os.umask(0o177)
        try:
            super().__init__(path, Handler)
        finally:
            os.umask(old_umask)

    def get_request(self) -> tuple[socket.socket, Any]:
        """accept(), pausing when it fails for want of descriptors or memory: the connection
        stays queued and the socket readable, so socketserver would retry at once and spin a
        core, starving the calls in flight of the CPU they need to finish and free some."""
        try:
            got = super().get_request()
        except OSError as exc:
            self.accept_backoff = min(max(self.accept_backoff * 2, 0.05), 1.0)
            now = time.monotonic()
            if now - self.accept_warned >= 60:  # while it lasts, once a minute is enough
                self.accept_warned = now
                logger.warning(
                    "helper: cannot accept a connection ({}); trying again in {:g} s, up to "
                    "1 s apart while it lasts",
                    exc.strerror or exc,
                    self.accept_backoff,
                )
            time.sleep(self.accept_backoff)
            raise
        self.accept_backoff = 0.0
        return got

    def process_request(self, request: Any, client_address: Any) -> None:
        # Counted here, in the accepting thread, so an idle check can never miss a connection
        # accepted but not yet running in its thread.
        with self.activity:
            self.active += 1
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._ended()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._ended()

    def _ended(self) -> None:
        with self.activity:
            self.active -= 1
            self.last_active = time.monotonic()
            self.activity.notify_all()

    def idle_for(self, seconds: float) -> None:
        """Block until no connection has been open for `seconds`."""
        with self.activity:
            while True:
                if self.active == 0:
                    quiet = time.monotonic() - self.last_active
                    if quiet >= seconds:
                        return
                    self.activity.wait(seconds - quiet)
                else:
                    self.activity.wait()

    def drain(self) -> None:
        """Wait for the connections being handled: a call is never cut short by an exit.
        Each one ends by its call's deadline (plus the answer's send timeout) at the latest."""
        with self.activity:
            while self.active:
                self.activity.wait()

    def count(self, name: str) -> None:
        with self.counters_lock:
            self.counters[name] = self.counters.get(name, 0) + 1

    def stats(self) -> dict[str, int]:
        with self.counters_lock:
            counters = dict(self.counters)
        return {**counters, **self.caches.counts()}

    def server_close(self) -> None:
        super().server_close()
        if not self.activated:
            Path(self.path).unlink(missing_ok=True)
