"""Whole processes as a runtime starts them, timed from spawn to reap, the helper they may go
through, and the statistics over their runs. The helper launcher and the plugin's location are
the tests' own (tests/support)."""

from __future__ import annotations

import contextlib
import math
import os
import select
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tests.support import util_procs
from tests.support.plugin import BIN_DIR

ROOT = Path(__file__).resolve().parent.parent

PLUGIN = BIN_DIR / "ipam-da-consul"
PLUGIN_VERBOSE = BIN_DIR / "ipam-da-consul-verbose"
HELPER = BIN_DIR / "ipam-da-consul-helper"
HOST_LOCAL = Path("/usr/lib/cni/host-local")
TIME_BIN = Path("/usr/bin/time")
CNI_VERSION = "1.0.0"
RUN_TIMEOUT = 60.0  # one process; a hung plugin is killed and counted as an error

LIVE: set[int] = set()  # children not yet reaped; killed (by pid) if we are interrupted


# -- processes -----------------------------------------------------------------------------
@dataclass
class Run:
    pid: int
    wall_ms: float
    rc: int
    stdout: bytes
    stderr: bytes
    cpu_ms: float

    @property
    def ok(self) -> bool:
        return self.rc == 0

    def problem(self) -> str:
        text = (self.stdout or self.stderr).decode(errors="replace").strip()
        return f"exit {self.rc}: {text[:300]}"


def base_env() -> dict[str, str]:
    """The environment a runtime passes on: its own, which carries none of our variables."""
    drop = ("CNI_", "CONSUL_", "IPAM_DA_CONSUL_", "PYTHON")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


def cni_env(command: str, container: str, ifname: str = "eth0") -> dict[str, str]:
    env = base_env()
    env.update(
        CNI_COMMAND=command,
        CNI_CONTAINERID=container,
        CNI_NETNS="/var/run/netns/bench",
        CNI_IFNAME=ifname,
        CNI_ARGS="IgnoreUnknown=1",
        CNI_PATH=f"{BIN_DIR}:/usr/lib/cni",
    )
    return env


@dataclass
class Child:
    pid: int
    started: float
    out: IO[bytes]
    err: IO[bytes]


def spawn(argv: list[str], env: dict[str, str], stdin: bytes = b"") -> Child:
    if len(stdin) > 60_000:
        raise ValueError("stdin must fit the pipe buffer")  # our configs are < 1 kB
    # Files, not pipes, for the output: no reader threads, and they are closed in finish().
    out = tempfile.TemporaryFile()  # noqa: SIM115
    err = tempfile.TemporaryFile()  # noqa: SIM115
    r, w = os.pipe()  # written whole now (it fits the buffer), read by the child at its pace
    try:
        os.write(w, stdin)
    finally:
        os.close(w)
    actions = [
        (os.POSIX_SPAWN_DUP2, r, 0),
        (os.POSIX_SPAWN_DUP2, out.fileno(), 1),
        (os.POSIX_SPAWN_DUP2, err.fileno(), 2),
    ]
    try:
        started = time.perf_counter()
        pid = os.posix_spawn(argv[0], argv, env, file_actions=actions)
    finally:
        os.close(r)
    LIVE.add(pid)
    return Child(pid, started, out, err)


def finish(child: Child, ended: float, status: int, usage: Any) -> Run:
    LIVE.discard(child.pid)
    child.out.seek(0)
    child.err.seek(0)
    stdout, stderr = child.out.read(), child.err.read()
    child.out.close()
    child.err.close()
    return Run(
        child.pid,
        (ended - child.started) * 1000,
        os.waitstatus_to_exitcode(status),
        stdout,
        stderr,
        (usage.ru_utime + usage.ru_stime) * 1000,
    )


def reap_all(children: list[Child], timeout: float = RUN_TIMEOUT) -> list[Run]:
    """Wait for every child, noting when each one ends (pidfd poll: no sleep granularity)."""
    fds = {os.pidfd_open(c.pid): c for c in children}
    runs: dict[int, Run] = {}
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    deadline = time.monotonic() + timeout
    killed = False
    try:
        while len(runs) < len(children):
            left = deadline - time.monotonic()
            ready = poller.poll(int(left * 1000) + 1) if left > 0 else []
            if not ready and time.monotonic() >= deadline:
                if killed:
                    raise RuntimeError("children survived SIGKILL for 10 s")
                for c in children:
                    if c.pid not in runs:
                        os.kill(c.pid, signal.SIGKILL)  # our own child, past its time
                killed, deadline = True, time.monotonic() + 10
            for fd, _ in ready:
                ended = time.perf_counter()
                c = fds[fd]
                _, status, usage = os.wait4(c.pid, 0)
                poller.unregister(fd)
                runs[c.pid] = finish(c, ended, status, usage)
    finally:
        for fd in fds:
            os.close(fd)
    return [runs[c.pid] for c in children]


def run(argv: list[str], env: dict[str, str], stdin: bytes = b"") -> Run:
    return reap_all([spawn(argv, env, stdin)])[0]


def kill_live() -> None:
    for pid in list(LIVE):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.waitpid(pid, 0)
        LIVE.discard(pid)


def interpreter_of(script: Path) -> str:
    """The interpreter the installed plugin really runs on: its shebang, else ours."""
    with contextlib.suppress(OSError, UnicodeDecodeError), open(script, "rb") as fh:
        first = fh.readline().decode().strip()
        if first.startswith("#!"):
            exe = first[2:].split()[0]
            if os.access(exe, os.X_OK):
                return exe
    return sys.executable


def proc_cpu_ms(pid: int) -> float | None:
    """utime + stime of a live process, from /proc (10 ms ticks)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


def proc_status_kb(pid: int, key: str) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


class Helper(util_procs.Helper):
    """Our own ipam-da-consul-helper, started by the tests' launcher on a socket in our temp
    dir: at its default refresh interval, in the environment a runtime passes on, its stderr in
    `log`. Stopped with close()."""

    def __init__(self, tmp: Path, name: str = "helper") -> None:
        self.log = tmp / f"{name}.stderr"
        super().__init__(tmp / name, refresh_interval=None, stderr=self.log, env=base_env())

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_ms(self) -> float:
        return proc_cpu_ms(self.pid) or 0.0


# -- statistics ------------------------------------------------------------------------------
def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


@dataclass
class Series:
    key: str
    label: str
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    target_runs: int = 0
    note: str = ""

    def add(self, r: Run, ok: bool | None = None) -> None:
        if r.ok if ok is None else ok:
            self.wall.append(r.wall_ms)
            self.cpu.append(r.cpu_ms)
        else:
            self.errors.append(r.problem())

    @property
    def median(self) -> float | None:
        return statistics.median(self.wall) if self.wall else None

    def summary(self, floor: float | None, floor_cpu: float | None) -> dict[str, Any]:
        med = self.median
        cpu = statistics.median(self.cpu) if self.cpu else None
        return {
            "label": self.label,
            "n": len(self.wall),
            "median_ms": _r(med),
            "p95_ms": _r(p95(self.wall)) if self.wall else None,
            "min_ms": _r(min(self.wall)) if self.wall else None,
            "cpu_median_ms": _r(cpu),
            "ratio_to_floor": _r(med / floor, 2) if med and floor else None,
            # CPU time of the process itself: steadier than wall time when the machine is busy
            "cpu_ratio_to_floor": _r(cpu / floor_cpu, 2) if cpu and floor_cpu else None,
            "errors": len(self.errors),
            "first_errors": self.errors[:3],
            "note": self.note or None,
        }


def _r(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None
