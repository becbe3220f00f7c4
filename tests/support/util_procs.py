"""Many real plugin processes at once, as many runtimes on many hosts run them.

Each call is the INSTALLED executable started with `subprocess.Popen`; a thread per call only
waits for its process so that each call's wall time is measured on its own. Nothing is mocked.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import marshal
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests

from tests.support.plugin import BIN_DIR, base_env, executable


@dataclass
class Call:
    command: str
    container: str
    conf: dict[str, Any] | bytes
    ifname: str = "eth0"
    env: dict[str, str] = field(default_factory=dict)
    # When set, the verbose flavour runs and writes its debug log (one line per Consul request)
    # here, so requests per call can be counted.
    log_file: str | None = None
    timeout: float = 90.0
    # Another build of the plugin (e.g. the single file for another Python) than the venv's.
    exe: str | None = None


@dataclass
class Done:
    call: Call
    rc: int
    stdout: str
    stderr: str
    started: float  # time.monotonic() at launch
    elapsed: float

    @property
    def json(self) -> Any:
        return json.loads(self.stdout)

    @property
    def address(self) -> str:
        """The only address of a successful single-pool ADD, without prefix length."""
        ips = self.json["ips"]
        assert len(ips) == 1, self
        return str(ipaddress.ip_interface(ips[0]["address"]).ip)

    def __repr__(self) -> str:
        return (
            f"Done({self.call.command} {self.call.container}/{self.call.ifname}: rc={self.rc}, "
            f"{self.elapsed:.2f}s, stdout={self.stdout!r}, stderr={self.stderr[-600:]!r})"
        )


def environment(call: Call) -> dict[str, str]:
    # In-process, as run_plugin does, unless the call names a helper's socket itself.
    env = base_env()
    env.update(
        CNI_COMMAND=call.command,
        CNI_CONTAINERID=call.container,
        CNI_IFNAME=call.ifname,
        CNI_NETNS="/var/run/netns/test",
        CNI_PATH=str(BIN_DIR),
    )
    if call.log_file:
        env["IPAM_DA_CONSUL_LOG_FILE"] = call.log_file
    env.update(call.env)
    return env


def run_one(call: Call, start: threading.Event | None = None) -> Done:
    exe = call.exe or executable("ipam-da-consul-verbose" if call.log_file else "ipam-da-consul")
    data = call.conf if isinstance(call.conf, bytes) else json.dumps(call.conf).encode()
    if start is not None:
        start.wait()
    began = time.monotonic()
    proc = subprocess.Popen(
        [exe],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=environment(call),
    )
    try:
        out, err = proc.communicate(data, timeout=call.timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(
            f"{call.command} {call.container} hung for {call.timeout}s: {err.decode()[-800:]}"
        ) from None
    return Done(
        call,
        proc.returncode,
        out.decode(errors="replace"),
        err.decode(errors="replace"),
        began,
        time.monotonic() - began,
    )


def run_many(calls: Iterable[Call]) -> list[Done]:
    """Start every call at the same moment (one process each) and wait for all of them."""
    todo = list(calls)
    start = threading.Event()
    with ThreadPoolExecutor(max_workers=max(1, len(todo))) as pool:
        futures = [pool.submit(run_one, call, start) for call in todo]
        start.set()
        return [f.result() for f in futures]


def consul_requests(log_file: str | Path) -> int:
    """HTTP requests one verbose call sent to Consul: consul/client.py logs each one as
    `<METHOD> <url> -> <status> in ...` or `<METHOD> <url> failed after ...`."""
    path = Path(log_file)
    if not path.exists():
        return 0
    return len(_REQUEST_LINE.findall(path.read_text()))


# `state a -> b (trigger)` lines also hold " -> ", so match the request shape exactly.
_REQUEST_LINE = re.compile(r" (?:GET|PUT|DELETE|POST) https?://\S+ (?:-> \d{3} in|failed after) ")


class BlackHole:
    """A port whose connections never complete: a listening socket with a full backlog that
    nobody accepts from, so the kernel drops further SYNs (as a firewall that drops does)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.fillers: list[socket.socket] = []
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
            self.fillers.append(filler)

    def close(self) -> None:
        for s in [*self.fillers, self.sock]:
            s.close()


class Unresponsive:
    """An endpoint that accepts TCP connections and never answers: a hung server, not a Consul
    stand-in. Every accepted socket is kept open until `close()`."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            self.held.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


class LossyProxy:
    """An HTTP relay in front of a real Consul that, for requests `drop` selects, forwards the
    request (so Consul applies it) and then sends no reply: it closes the connection, or with
    `hang` holds it open until `close()` (a server that stopped answering mid-call). This is
    the "reply lost after send" of a flaky network; every answer that does come back is
    Consul's own."""

    def __init__(
        self,
        upstream: str,
        drop: Callable[[str, str], bool],
        hang: bool = False,
        hold: Callable[[str, str], bool] | None = None,
    ) -> None:
        """`hold` selects requests kept back *before* they reach Consul, until `let_go()`: a
        request a follower holds while there is no leader, or a packet stuck in a queue."""
        self.upstream = upstream
        self.drop = drop
        self.hang = hang
        self.hold = hold
        self.gate = threading.Condition()
        self.opened = False
        self.forwarded = 0  # held requests forwarded so far: they go in the order they came
        self.held: list[tuple[str, str]] = []
        self.released = threading.Event()
        self.seen: list[tuple[str, str]] = []
        self.dropped: list[tuple[str, str]] = []
        relay = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep pytest output clean

            def relay(self) -> None:
                size = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(size) if size else None
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                turn = None
                with relay.gate:
                    if relay.hold is not None and relay.hold(self.command, self.path):
                        turn = len(relay.held)
                        relay.held.append((self.command, self.path))
                        relay.gate.wait_for(
                            lambda: relay.opened and relay.forwarded == turn, timeout=60
                        )
                try:
                    resp = requests.request(
                        self.command, relay.upstream + self.path, data=body, headers=headers,
                        timeout=10,
                    )
                finally:
                    if turn is not None:
                        with relay.gate:
                            relay.forwarded += 1
                            relay.gate.notify_all()
                relay.seen.append((self.command, self.path))
                if relay.drop(self.command, self.path):
                    relay.dropped.append((self.command, self.path))
                    if relay.hang:
                        relay.released.wait(60)
                    self.close_connection = True  # the server closes it: no status line sent
                    return
                self.send_response(resp.status_code)
                for k, v in resp.headers.items():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection",
                                         "content-encoding"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(resp.content)))
                self.end_headers()
                self.wfile.write(resp.content)

            do_GET = do_PUT = do_DELETE = do_POST = relay

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def let_go(self) -> None:
        """Forward what `hold` kept back, one at a time in the order they came, and every
        request from now on."""
        with self.gate:
            self.hold = None
            self.opened = True
            self.gate.notify_all()

    def close(self) -> None:
        self.released.set()
        self.let_go()
        self.server.shutdown()
        self.server.server_close()


def drop_first(method: str) -> Callable[[str, str], bool]:
    """A LossyProxy `drop` rule: only the first KV request (or transaction) with this method."""
    state = {"done": False}

    def drop(m: str, path: str) -> bool:
        if m == method and path.startswith(("/v1/kv/", "/v1/txn")) and not state["done"]:
            state["done"] = True
            return True
        return False

    return drop


def helper_stats(path: str, timeout: float = 10.0) -> dict[str, int]:
    """The counters of the helper listening on `path` (its `stats` op: what the metrics read)."""
    from ipam_da_consul.cni.helper.wire import WIRE_VERSION, frame, read_frame

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(frame({"v": WIRE_VERSION, "op": "stats"}))
        return dict(marshal.loads(read_frame(sock.recv))["stats"])


class Helper:
    """A running `ipam-da-consul-helper` (one per simulated host) on a private socket."""

    def __init__(
        self,
        directory: Path,
        refresh_interval: float | None = 1.0,
        stderr: Path | None = None,
        args: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        """refresh_interval None: the helper's own default. env None: ours."""
        self.socket = str(directory / "run" / "helper.sock")
        # The host's state folder, which its in-process calls share (`host_env`).
        self.state_dir = str(directory / "state")
        # A file, not a pipe: a helper stopped mid-test must not block on a full pipe, and a
        # test can read what it said so far.
        self.stderr_path = stderr
        err = open(stderr, "wb") if stderr else subprocess.DEVNULL  # noqa: SIM115
        refresh = [] if refresh_interval is None else ["--refresh-interval", str(refresh_interval)]
        self.proc = subprocess.Popen(
            [executable("ipam-da-consul-helper"), "--socket", self.socket,
             "--state-dir", self.state_dir, *refresh, *(args or [])],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env,
        )
        if not isinstance(err, int):  # not DEVNULL: a file opened for `stderr`
            err.close()  # the child has its own copy
        end = time.monotonic() + 30
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None or time.monotonic() > end:
                self.close()
                raise RuntimeError("the helper did not create its socket")
            time.sleep(0.05)

    @property
    def env(self) -> dict[str, str]:
        """A call through this helper (its host's state folder, should it run in-process)."""
        return {"IPAM_DA_CONSUL_SOCKET": self.socket, **self.host_env}

    @property
    def host_env(self) -> dict[str, str]:
        """An in-process call on this helper's host."""
        return {"IPAM_DA_CONSUL_STATE_DIR": self.state_dir}

    def stderr_text(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path else ""

    def wait_stderr(self, needle: str, count: int = 1, timeout: float = 20.0) -> str:
        """Wait until the helper has written `needle` `count` times to its stderr file."""
        end = time.monotonic() + timeout
        while self.stderr_text().count(needle) < count:
            if time.monotonic() > end:
                raise AssertionError(f"helper never said {needle!r}: {self.stderr_text()[-2000:]}")
            time.sleep(0.05)
        return self.stderr_text()

    def stats(self, timeout: float = 10.0) -> dict[str, int]:
        """The helper's counters (requests served, dropped, refused) and cache sizes."""
        return helper_stats(self.socket, timeout)

    def stop(self) -> None:
        """SIGSTOP: a frozen cgroup, a swapped-out process; the kernel still queues
        connections for it."""
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a stopped process only dies once resumed
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def drain_pty(main: int) -> bytes:
    """Everything a child writes to the terminal whose main side is `main`, until it closes it
    (or is silent for 30 s)."""
    import select

    got = b""
    while True:
        ready, _, _ = select.select([main], [], [], 30)
        if not ready:
            return got
        try:
            chunk = os.read(main, 65536)
        except OSError:  # EIO: the child closed the terminal
            return got
        if not chunk:
            return got
        got += chunk


def wait_for(what: str, cond: Callable[[], bool], timeout: float = 20.0) -> float:
    """Poll `cond` every 0.1 s until it holds; the seconds it took, or AssertionError naming
    `what` after `timeout`."""
    began = time.monotonic()
    while not cond():
        if time.monotonic() - began > timeout:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.1)
    return time.monotonic() - began
