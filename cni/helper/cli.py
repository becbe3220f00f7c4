"""ipam-da-consul-helper: a long-lived local process that serves plugin calls.

The command line (the console script's entry point): it sets up the caches (caches.py), the
state folder and its replay thread (cni/state.py, journal.py), the socket (server.py) and the
opt-in metrics listener (metrics.py), then serves until SIGTERM or an idle exit. Why a helper at
all: see server.py.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import resource
import signal
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from ... import __version__
from .. import logs
from ..hardening import harden
from ..state import DEFAULT_STATE_DIR, STATE_DIR_ENV, StateError, open_state
from .caches import PoolCaches
from .journal import Replayer
from .server import HelperServer, SetupError, activated_socket, preload, replay_forever, watch_kv
from .wire import DEFAULT_SOCKET

if TYPE_CHECKING:
    from ...allocator.store import WatchableKV
    from ..config import ConsulSettings
    from .metrics import Metrics


def parse_address(text: str) -> tuple[str, int]:
    """HOST:PORT, [V6]:PORT, or a bare PORT (or :PORT) on 127.0.0.1: metrics are opt-in and
    local unless a host is named."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not HOST:PORT")
    return host, int(port)


def raise_open_files_limit() -> None:
    """Descriptors are what a busy helper runs out of first: each call in flight holds its
    client's connection and one to Consul, each watched pool a long-poll, the metrics listener
    up to its cap. The soft limit is often 1024 under a much higher hard one (systemd's default
    is 1024:524288) so that programs using select(), which breaks above 1023, keep working; the
    helper never uses it (socketserver and urllib3 poll), so it takes the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):  # as is, then
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> None:
    harden()  # the helper holds every caller's token for as long as it runs
    args, metrics_at = parse_args(argv)
    logs.configure_helper()
    raise_open_files_limit()
    metrics: Metrics | None = None
    if metrics_at is not None:
        # Imported only here: prometheus_client costs start-up time a helper without metrics,
        # and the thin client, never pay.
        from .metrics import Metrics

        metrics = Metrics()
    caches = open_caches(args, metrics)
    try:
        activated = activated_socket()
        server = HelperServer(args.socket, caches, activated, metrics)
    except (SetupError, OSError) as exc:
        sys.exit(f"ipam-da-consul-helper: cannot listen on {args.socket}: {exc}")
    where = _listening(server, args.socket, args.socket_named) if activated else args.socket
    if metrics is not None and metrics_at is not None:
        where += f"; metrics on {serve_metrics(metrics, metrics_at, server, caches, args)}"
    serve(server, caches, metrics, args.idle_exit, where)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, tuple[str, int] | None]:
    """The command line, and where to serve metrics (None: nowhere)."""
    parser = argparse.ArgumentParser(
        prog="ipam-da-consul-helper", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--socket",
        default=None,
        help=f"unix socket to listen on (default IPAM_DA_CONSUL_SOCKET, else {DEFAULT_SOCKET}); "
        "under socket activation, the socket passed is used whatever this says",
    )
    parser.add_argument(
        "--refresh-interval",
        type=float,
        default=1.0,
        help="least seconds between background refreshes of one pool",
    )
    parser.add_argument(
        "--max-settings",
        type=int,
        default=8,
        help="most ways of reaching Consul (servers, token, TLS, prefix) kept warm at once",
    )
    parser.add_argument(
        "--max-pools", type=int, default=64, help="most pools kept in memory across them"
    )
    parser.add_argument(
        "--idle-exit",
        type=float,
        default=None,
        metavar="SECONDS",
        help="exit after this long without a call (for socket activation, which starts the "
        "helper again on the next call); background pool refreshes do not count",
    )
    parser.add_argument(
        "--metrics-address",
        default=None,
        metavar="[HOST:]PORT",
        help="serve Prometheus metrics over HTTP here (host 127.0.0.1 when only a port is "
        "given; port 0 picks one); off by default",
    )
    parser.add_argument(
        "--state-dir",
        default=os.environ.get(STATE_DIR_ENV) or None,
        metavar="DIR",
        help=f"the host's state folder, shared with the plugin's in-process calls (which read "
        f"{STATE_DIR_ENV}): each attachment's writes and the DELs the helper finishes "
        f"(default {DEFAULT_STATE_DIR}; it and every folder above it must be writable by "
        "root or this user only)",
    )
    parser.add_argument(
        "--no-journal",
        action="store_true",
        help="never take over a DEL that cannot reach Consul: it returns 11 instead",
    )
    args = parser.parse_args(argv)
    # Where the socket was named, for the start-up line: plugin calls look at the same places.
    args.socket_named = "--socket" if args.socket else (
        "IPAM_DA_CONSUL_SOCKET" if os.environ.get("IPAM_DA_CONSUL_SOCKET") else "the default"
    )
    args.socket = args.socket or os.environ.get("IPAM_DA_CONSUL_SOCKET") or DEFAULT_SOCKET
    if args.max_settings < 1 or args.max_pools < 1:
        parser.error("--max-settings and --max-pools must be at least 1")
    if args.idle_exit is not None and not (0 < args.idle_exit < math.inf):
        parser.error("--idle-exit must be a positive number of seconds")
    metrics_at = None
    if args.metrics_address is not None:
        try:
            metrics_at = parse_address(args.metrics_address)
        except ValueError as exc:
            parser.error(f"--metrics-address: {exc}")
    return args, metrics_at


def open_caches(args: argparse.Namespace, metrics: Metrics | None) -> PoolCaches:
    """What calls share: the pool caches, the state folder and its replay thread."""
    make_kv: Callable[[ConsulSettings], WatchableKV] = watch_kv
    if metrics is not None:

        def counted_kv(settings: ConsulSettings) -> WatchableKV:
            assert metrics is not None
            return metrics.watch_kv(watch_kv(settings, metrics.background_request))

        make_kv = counted_kv

    caches = PoolCaches(
        args.refresh_interval,
        max_settings=args.max_settings,
        max_pools=args.max_pools,
        make_kv=make_kv,
    )
    state_dir = args.state_dir or DEFAULT_STATE_DIR
    try:
        caches.state = open_state(state_dir)
    except StateError as exc:
        if args.state_dir:
            sys.exit(f"ipam-da-consul-helper: cannot use the state folder: {exc}")
        # The default place may be read-only (a unit with ProtectSystem=strict and no
        # StateDirectory=): serving without it beats not serving at all.
        sys.stderr.write(
            f"ipam-da-consul-helper: WARNING: {exc}; calls keep their writes in memory only, "
            "and a DEL that cannot reach Consul returns 11\n"
        )
    caches.takes_over_dels = caches.state is not None and not args.no_journal
    if caches.state is not None:
        caches.replayer = Replayer(caches.state, lambda entry: 1)
    return caches


def serve_metrics(
    metrics: Metrics,
    metrics_at: tuple[str, int],
    server: HelperServer,
    caches: PoolCaches,
    args: argparse.Namespace,
) -> str:
    """Start the metrics listener; its URL."""
    from .metrics import Sources

    try:
        return metrics.serve(
            metrics_at, Sources(server.stats, lambda: server.active, caches.pool_sizes)
        )
    except OSError as exc:
        server.server_close()
        sys.exit(f"ipam-da-consul-helper: cannot serve metrics on {args.metrics_address}: {exc}")


def serve(
    server: HelperServer,
    caches: PoolCaches,
    metrics: Metrics | None,
    idle_exit: float | None,
    where: str,
) -> None:
    """Serve until SIGTERM (or the idle exit), then let the calls in flight finish."""
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    threading.Thread(target=preload, name="preload", daemon=True).start()
    if caches.replayer is not None:
        # Also finishes what a previous helper or an in-process call left: entries outlive them.
        threading.Thread(
            target=replay_forever, args=(caches, metrics), name="replay", daemon=True
        ).start()
    if idle_exit is not None:
        threading.Thread(
            target=_exit_when_idle, args=(server, idle_exit), name="idle-exit", daemon=True
        ).start()
    sys.stderr.write(f"ipam-da-consul-helper {__version__} listening on {where}\n")
    sys.stderr.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        # Calls already accepted finish first; connections still queued stay in the socket
        # (systemd's copy of it, when activated) for the next helper.
        if caches.replayer is not None:
            caches.replayer.stop()
        server.drain()
        server.server_close()
        if metrics is not None:
            metrics.close()


def _listening(server: HelperServer, path: str, named: str) -> str:
    """What the start-up line says of a socket passed by socket activation: its own path,
    which the activator chose (not necessarily the one --socket, IPAM_DA_CONSUL_SOCKET or the
    default names, where plugin calls look); and, on a line of its own, what its mode lets
    other users do. The activator made the socket: systemd's unit makes it 0600 in a 0700
    folder, another activator (systemd-socket-activate) by its umask."""
    bound = server.server_address
    bound = os.fsdecode(bound) if isinstance(bound, bytes | str) and bound else ""
    if not bound or bound.startswith("\0"):
        return f"a socket passed by socket activation, not a path ({path} is not used)"
    where = f"{bound} (socket activation)"
    if os.path.abspath(bound) != os.path.abspath(path):
        what = f"the default {path}" if named == "the default" else f"{path} ({named})"
        where += f", not on {what}: plugin calls need IPAM_DA_CONSUL_SOCKET={bound}"
    try:
        mode = os.stat(bound).st_mode & 0o777
    except OSError:
        return where
    if mode & 0o022:  # connecting to a unix socket takes write permission on it
        sys.stderr.write(
            f"ipam-da-consul-helper: note: the activated socket {bound} is mode {mode:04o}, so "
            f"other local users can connect; only root and uid {os.geteuid()} are served (peer "
            "credentials), the others refused (systemd's unit makes it 0600)\n"
        )
    return where


def _exit_when_idle(server: HelperServer, seconds: float) -> None:
    server.idle_for(seconds)
    sys.stderr.write(f"ipam-da-consul-helper: no call for {seconds:g} s, exiting\n")
    sys.stderr.flush()
    server.shutdown()
