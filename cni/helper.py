"""ipam-da-consul-helper: a long-lived local process that serves plugin calls.

Why it exists: a CNI plugin is a new process per call, and importing requests, marshmallow,
transitions and loguru alone costs ~200 ms, some 15x a bare interpreter start. The helper keeps
them imported, keeps pools in memory (refreshed from Consul in the background), and answers the
plugin's thin client over a unix socket that only root (or the helper's own user) can use.
Without a helper the plugin does the same work in-process; results are identical.
"""

from __future__ import annotations

import argparse
import io
import marshal
import os
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

from loguru import logger

from .. import __version__
from ..allocator.cache import PoolCache
from ..allocator.layout import Layout
from ..consul import ConsulKV
from . import logs
from .config import ConsulSettings
from .fastpath import DEFAULT_SOCKET, frame, read_frame
from .machine import consul_client
from .main import execute

# The time budget of each blocking query a watcher sends: its 30 s wait plus Consul's jitter.
_WATCH_BUDGET = 120.0


class PoolCaches:
    """What the helper keeps warm per way of reaching Consul (servers, token, TLS, datacenter,
    prefix): a PoolCache, and the server that last answered with a leader."""

    def __init__(self, refresh_interval: float, server_memory: float = 2.0) -> None:
        self.refresh_interval = refresh_interval
        self.server_memory = server_memory
        self.lock = threading.Lock()
        self.caches: dict[Any, PoolCache] = {}
        self.servers: dict[Any, tuple[str, float]] = {}

    def recent_server(self, settings: ConsulSettings) -> str | None:
        """The server a call used successfully within `server_memory` seconds, if any: it skips
        one leader check per call; a failure there still goes through the full server choice."""
        seen = self.servers.get(_hashable(settings))
        if seen is None or time.monotonic() - seen[1] > self.server_memory:
            return None
        return seen[0]

    def remember_server(self, settings: ConsulSettings, server: str) -> None:
        self.servers[_hashable(settings)] = (server, time.monotonic())

    def get(self, settings: ConsulSettings, layout: Layout) -> PoolCache:
        key = _hashable(settings)
        with self.lock:
            cache = self.caches.get(key)
            if cache is None:
                cache = PoolCache(
                    lambda: ConsulKV(consul_client(settings, _WATCH_BUDGET)),
                    layout,
                    self.refresh_interval,
                )
                self.caches[key] = cache
            return cache


def _hashable(settings: ConsulSettings) -> Any:
    return (
        tuple(settings.servers),
        settings.token,
        settings.ca_file,
        settings.cert_file,
        settings.key_file,
        settings.datacenter,
        settings.kv_prefix,
    )


class Handler(socketserver.StreamRequestHandler):
    server: HelperServer

    def handle(self) -> None:
        if not self.peer_allowed():
            return
        try:
            answer = self.serve(marshal.loads(read_frame(self.request.recv)))
        except (ValueError, EOFError, KeyError, TypeError) as exc:
            logger.warning("helper: malformed request: {}", exc)
            return  # the client falls back to doing the call itself
        self.request.sendall(frame(answer))

    def peer_allowed(self) -> bool:
        creds = self.request.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")
        )
        _, uid, _ = struct.unpack("3i", creds)
        if uid in (0, os.geteuid()):
            return True
        logger.warning("helper: refused a connection from uid {}", uid)
        return False

    def serve(self, request: dict[str, Any]) -> dict[str, Any]:
        stdin = request["stdin"]
        if not isinstance(stdin, bytes):
            raise TypeError("stdin must be bytes")
        env = {str(k): str(v) for k, v in dict(request["env"]).items()}
        verbose = bool(request.get("verbose"))
        err = io.StringIO()
        log_file = env.get("IPAM_DA_CONSUL_LOG_FILE") or logs.DEFAULT_LOG_FILE
        with logger.contextualize(call=logs.CallLog(err, log_file if verbose else None)):
            out, code = execute(stdin, env, self.server.caches)
        return {"stdout": out, "stderr": err.getvalue(), "code": code}


class HelperServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    # A node starting hundreds of containers connects all at once; a refused connection
    # would push those calls onto the slow in-process path.
    request_queue_size = 1024

    def __init__(self, path: str, caches: PoolCaches) -> None:
        self.caches = caches
        self.path = path
        folder = Path(path).parent
        folder.mkdir(parents=True, exist_ok=True)
        os.chmod(folder, 0o700)
        if Path(path).exists():
            Path(path).unlink()  # a socket left by a helper that died
        old_umask = os.umask(0o177)
        try:
            super().__init__(path, Handler)
        finally:
            os.umask(old_umask)

    def server_close(self) -> None:
        super().server_close()
        Path(self.path).unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="ipam-da-consul-helper", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--socket",
        default=os.environ.get("IPAM_DA_CONSUL_SOCKET") or DEFAULT_SOCKET,
        help=f"unix socket to listen on (default {DEFAULT_SOCKET})",
    )
    parser.add_argument(
        "--refresh-interval",
        type=float,
        default=1.0,
        help="least seconds between background refreshes of one pool",
    )
    args = parser.parse_args(argv)
    logs.configure_helper()
    server = HelperServer(args.socket, PoolCaches(args.refresh_interval))
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    sys.stderr.write(f"ipam-da-consul-helper {__version__} listening on {args.socket}\n")
    sys.stderr.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
