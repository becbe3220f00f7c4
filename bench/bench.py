"""Benchmark ipam-da-consul as a runtime runs it: whole processes against a real Consul.

    .venv/bin/python bench/bench.py [--quick] [--runs N] [--json PATH] [--profile]
                                    [--only all|multihost|sizes] [--hosts 1,2,4,8]
                                    [--burst-inproc N]

Starts its own Consul dev agent (tests/support/agent.py) and its own `ipam-da-consul-helper`, then
measures the interpreter floor, our ADD, CHECK and DEL (in-process, and through the helper),
the Go `host-local` peer, ADD in pools holding 0 to 60,000 allocations and in an IPv6 /64,
50 concurrent ADDs, many simulated hosts (distinct `ipam.host`, one helper each, or
in-process) bursting into one pool with `ipam.pick` lowest and spread, counting Raft log
entries per successful ADD from Consul's /v1/agent/self, Consul requests per call and peak
memory; prints a table and writes JSON
(plus a Markdown copy of the table next to it).

Method, so the numbers can be trusted and compared:
- every figure is a whole process started with posix_spawn, stdin a pipe holding the network
  config and the environment a runtime gives (ours minus CNI_*/CONSUL_*/IPAM_DA_CONSUL_*/
  PYTHON* variables); wall time runs from spawn to reap, so floor and plugins pay the same
  spawn cost. The one addition is IPAM_DA_CONSUL_SOCKET, which pins each call to its mode: a
  path nothing listens on (in-process) or our helper's socket, so a helper already running on
  this machine cannot change the figures;
- in-process and helper figures use separate pools, so the helper's background refreshes
  never react to the in-process calls; its CPU time is read from /proc and reported;
- the sequential figures are interleaved in a shuffled order each round, after warm-up runs,
  so drift (page cache, Consul's growing raft log, other load) hits them all alike;
- p95 is nearest-rank: with 8 runs it is the slowest run;
- peak memory comes from /usr/bin/time -f %M: rusage read by this process would report the
  benchmark's own RSS, because a vfork'd child inherits its parent's high-water mark at exec.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import functools
import ipaddress
import json
import math
import os
import platform
import random
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.agent import ConsulAgent, consul_binary  # noqa: E402

BIN_DIR = Path(sys.executable).parent
PLUGIN = BIN_DIR / "ipam-da-consul"
PLUGIN_VERBOSE = BIN_DIR / "ipam-da-consul-verbose"
HELPER = BIN_DIR / "ipam-da-consul-helper"
HOST_LOCAL = Path("/usr/lib/cni/host-local")
TIME_BIN = Path("/usr/bin/time")
CNI_VERSION = "1.0.0"
RUN_TIMEOUT = 60.0  # one process; a hung plugin is killed and counted as an error
TXN_OPS = 64  # Consul 1.8 refuses a /v1/txn with more operations
FILL_SIZES = (0, 1_000, 10_000, 60_000)
CONCURRENCY = 50
SEQ_BUDGET_S = 150.0  # timed seconds for all sequential figures (--quick: 40%); see sequential()
MODES = {"inproc": "in-process", "helper": "via helper"}
# Multi-host bursts: simulated hosts (distinct `ipam.host`, one helper each) x concurrent ADDs
# per host, the same total for every host count so the rows compare; both `ipam.pick` modes.
HOST_COUNTS = (1, 2, 4, 8)
BURST_TOTAL = 48
PICKS = ("lowest", "spread")

# consul/client.py logs every request as "<METHOD> <url> -> <status> in <ms> ms" or
# "<METHOD> <url> failed after <ms> ms: ..."; the file format puts the pid second.
LOG_LINE = re.compile(r"^\S+ (?P<pid>\d+) +\S+ +(?P<msg>.*)$")
REQUEST = re.compile(
    r"^(?P<method>[A-Z]+) (?P<url>\S+?)(?: -> (?P<status>\d+) in| failed after) (?P<ms>[\d.]+) ms"
)
IMPORT_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)\s*$")

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


class Helper:
    """Our own ipam-da-consul-helper on a socket in our temp dir."""

    def __init__(self, tmp: Path, name: str = "helper") -> None:
        self.socket = tmp / name / "helper.sock"
        self.log = tmp / f"{name}.stderr"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [str(HELPER), "--socket", str(self.socket)],
                stdout=log,
                stderr=log,
                env=base_env(),
            )
        end = time.monotonic() + timeout
        while not self.socket.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"the helper exited: {self.log.read_text()[-1000:]}")
            if time.monotonic() > end:
                raise TimeoutError(f"the helper made no socket in {timeout} s")
            time.sleep(0.05)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def cpu_ms(self) -> float:
        return (proc_cpu_ms(self.pid) or 0.0) if self.pid else 0.0

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


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


# -- Consul fixtures -------------------------------------------------------------------------
def fill_pool(agent: ConsulAgent, pool: str, first: ipaddress.IPv4Address, n: int) -> float:
    """Write n allocation keys (the lowest n addresses from `first`) with 64-op transactions."""
    ops = [
        {
            "KV": {
                "Verb": "set",
                "Key": f"ipam/{pool}/{first + i}",
                "Value": base64.b64encode(json.dumps({"target": f"fill-{i}"}).encode()).decode(),
            }
        }
        for i in range(n)
    ]
    chunks = [ops[i : i + TXN_OPS] for i in range(0, len(ops), TXN_OPS)]
    local = threading.local()

    def put(chunk: list[dict[str, Any]]) -> None:
        import requests

        if not hasattr(local, "s"):
            local.s = requests.Session()
            local.s.trust_env = False
        resp = local.s.put(agent.url + "/v1/txn", json=chunk, timeout=30)
        if resp.status_code != 200:
            raise RuntimeError(f"txn fill of {pool} failed: HTTP {resp.status_code} {resp.text}")

    started = time.perf_counter()
    with ThreadPoolExecutor(4) as ex:
        list(ex.map(put, chunks))
    keys = agent.http.get(
        f"{agent.url}/v1/kv/ipam/{pool}/", params={"keys": "true"}, timeout=30
    ).json()
    held = [k for k in keys if k != f"ipam/{pool}/"]
    if len(held) != n:
        raise RuntimeError(f"pool {pool} holds {len(held)} allocations after filling {n}")
    return time.perf_counter() - started


def netconf(
    url: str, pool: str, prev: dict[str, Any] | None = None, ipam: dict[str, Any] | None = None
) -> bytes:
    """The config ipam-delegated hands its delegate: the whole network config, pools in
    prevResult, and (for CHECK and DEL) the addresses of the ADD. `ipam`: extra keys (a
    simulated host's `host`, the `pick` mode)."""
    prev_result = dict(prev or {"cniVersion": CNI_VERSION, "ips": []})
    prev_result["pools"] = [{"name": pool}]
    conf = {
        "cniVersion": CNI_VERSION,
        "name": "benchnet",
        "type": "ipam-delegated",
        "ipam": {
            "type": "ipam-delegated",
            "delegates": ["ipam-da-consul"],
            "consul_servers": [url],
            **(ipam or {}),
        },
        "prevResult": prev_result,
    }
    return json.dumps(conf).encode()


def host_local_conf(data_dir: str) -> bytes:
    return json.dumps(
        {
            "cniVersion": CNI_VERSION,
            "name": "benchnet",
            "type": "bridge",
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": "10.250.0.0/16", "gateway": "10.250.0.1"}]],
                "dataDir": data_dir,
            },
        }
    ).encode()


def netconf_with_prev(stdin: bytes, prev: dict[str, Any]) -> bytes:
    """The same config with the ADD's addresses in prevResult, for its DEL."""
    conf = json.loads(stdin)
    conf["prevResult"] = {**prev, "pools": conf["prevResult"]["pools"]}
    return json.dumps(conf).encode()


def prev_of(r: Run) -> dict[str, Any]:
    """What a runtime hands DEL: the ADD's addresses (none when the ADD failed)."""
    return {"cniVersion": CNI_VERSION, "ips": _ips(r) or []}


# -- the benchmark ----------------------------------------------------------------------------
class Bench:
    def __init__(
        self, args: argparse.Namespace, agent: ConsulAgent, helper: Helper | None, tmp: Path
    ) -> None:
        self.args = args
        self.agent = agent
        self.helper = helper
        self.tmp = tmp
        self.url = agent.url
        self.tag = f"b{os.getpid()}"
        self.python = interpreter_of(PLUGIN)
        self.modes = [m for m in MODES if m == "inproc" or helper is not None]
        self.series: dict[str, Series] = {}
        self.notes: list[str] = []
        self.result: dict[str, Any] = {}
        self.counter = 0
        self.pools: dict[str, str] = {}
        self.helper_calls = 0

    def log(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    def cid(self, what: str) -> str:
        self.counter += 1
        return f"{self.tag}-{what}-{self.counter}"

    def s(self, key: str, label: str) -> Series:
        return self.series.setdefault(key, Series(key, label))

    def socket_env(self, mode: str) -> dict[str, str]:
        if mode == "helper":
            assert self.helper is not None
            return {"IPAM_DA_CONSUL_SOCKET": str(self.helper.socket)}
        return {"IPAM_DA_CONSUL_SOCKET": str(self.tmp / "no-helper.sock")}

    # -- setup ---------------------------------------------------------------------------
    def make_pools(self) -> None:
        """Per mode: a /24, a /24 for CHECK, an IPv6 /64, and /16s filled to each size."""
        a = self.agent
        for j, mode in enumerate(self.modes):

            def pool(key: str, subnet: str, gateway: str, mode: str = mode) -> str:
                name = a.create_pool(
                    f"{self.tag}-{mode}-{key}", [{"subnet": subnet, "gateway": gateway}]
                )
                self.pools[f"{mode}:{key}"] = name
                return name

            pool("v4", f"10.{j}.1.0/24", f"10.{j}.1.1")
            pool("check", f"10.{j}.2.0/24", f"10.{j}.2.1")
            pool("v6", f"fd00:be:{j}::/64", f"fd00:be:{j}::1")
            for i, size in enumerate(FILL_SIZES):
                net = ipaddress.IPv4Network(f"10.{10 + 10 * j + i}.0.0/16")
                name = pool(f"fill{size}", str(net), str(net[1]))
                if size:
                    took = fill_pool(a, name, net[2], size)  # .0 is the network, .1 the gateway
                    self.log(f"filled {name} with {size:,} allocations in {took:.1f} s")

    # -- one plugin call ------------------------------------------------------------------
    def plugin(
        self,
        mode: str,
        command: str,
        pool: str,
        container: str,
        prev: dict[str, Any] | None = None,
        verbose: bool = False,
        extra_env: dict[str, str] | None = None,
    ) -> Run:
        env = {**cni_env(command, container), **self.socket_env(mode), **(extra_env or {})}
        exe = PLUGIN_VERBOSE if verbose else PLUGIN
        if mode == "helper":
            self.helper_calls += 1
        return run([str(exe)], env, netconf(self.url, self.pools[pool], prev))

    def add_del(
        self,
        mode: str,
        pool: str,
        add: Series | None,
        dele: Series | None,
        what: str,
        verbose: bool = False,
        extra_env: dict[str, str] | None = None,
    ) -> tuple[Run, Run]:
        """ADD then DEL with a fresh container id, so the pool keeps its size."""
        cid = self.cid(what)
        r_add = self.plugin(mode, "ADD", pool, cid, verbose=verbose, extra_env=extra_env)
        if add is not None:
            add.add(r_add, r_add.ok and _ips(r_add) is not None)
        r_del = self.plugin(
            mode, "DEL", pool, cid, prev_of(r_add), verbose=verbose, extra_env=extra_env
        )
        if dele is not None:
            dele.add(r_del, r_del.ok and not r_del.stdout.strip())
        elif not r_del.ok:
            self.notes.append(f"DEL after an ADD in {pool} failed: {r_del.problem()}")
        return r_add, r_del

    # -- sequential figures ------------------------------------------------------------------
    def sequential(self) -> None:
        a = self.args
        floor = self.s("floor", "python -c pass (floor)")
        bare = self.s("bare", "python -S -c pass (no site: bare interpreter)")
        jobs: list[tuple[list[Series], Callable[[], object]]] = [
            ([floor], lambda: floor.add(run([self.python, "-c", "pass"], base_env()))),
            ([bare], lambda: bare.add(run([self.python, "-S", "-c", "pass"], base_env()))),
        ]
        standing: list[tuple[str, str, dict[str, Any]]] = []
        for mode in self.modes:
            jobs += self.mode_jobs(mode, standing)
        hl = self.s("host_local", "host-local ADD (Go peer)")
        hl_del = self.s("host_local_del", "host-local DEL (Go peer)")
        if HOST_LOCAL.exists():
            conf = host_local_conf(str(self.tmp / "host-local"))

            def do_hl() -> None:
                cid = self.cid("hl")
                hl.add(run([str(HOST_LOCAL)], cni_env("ADD", cid), conf))
                hl_del.add(run([str(HOST_LOCAL)], cni_env("DEL", cid), conf))

            jobs.append(([hl, hl_del], do_hl))
        else:
            hl.note = f"skipped: {HOST_LOCAL} is absent (apt install containernetworking-plugins)"
            self.notes.append(hl.note)

        # Warm-up: byte-compiles, fills the page cache and the helper's pool cache, and times
        # each job so that slow figures cannot blow the time budget.
        warm = 1 if a.quick else 2
        cost: dict[int, float] = {}
        for i, (series, job) in enumerate(jobs):
            started = time.perf_counter()
            for _ in range(warm):
                job()
            cost[i] = (time.perf_counter() - started) / warm
            for s in series:
                s.wall.clear()
                s.cpu.clear()
                s.errors.clear()
            self.log(f"warm-up {series[0].key}: {cost[i] * 1000:.0f} ms per run")
        # Share the budget out, cheapest job first: what a cheap job leaves goes to the rest.
        budget = SEQ_BUDGET_S * (0.4 if a.quick else 1.0)
        left = len(jobs)
        for i in sorted(cost, key=cost.__getitem__):
            share = budget / left
            runs = a.runs if cost[i] * a.runs <= share else max(5, int(share / cost[i]))
            budget -= runs * cost[i]
            left -= 1
            for s in jobs[i][0]:
                s.target_runs = runs
                if runs < a.runs:
                    s.note = f"runs capped at {runs} by the time budget ({cost[i]:.1f} s per run)"

        rng = random.Random(4)
        most = max(j[0][0].target_runs for j in jobs)
        helper_cpu0, calls0 = (self.helper.cpu_ms() if self.helper else 0.0), self.helper_calls
        for i in range(most):
            order = [j for j in jobs if j[0][0].target_runs > i]
            rng.shuffle(order)
            for _, job in order:
                job()
            if (i + 1) % 5 == 0 or i + 1 == most:
                self.log(f"round {i + 1}/{most}")
        if self.helper:
            calls = self.helper_calls - calls0
            used = self.helper.cpu_ms() - helper_cpu0
            self.result["helper_cpu"] = {
                "sequential_calls": calls,
                "cpu_ms_total": _r(used),
                "cpu_ms_per_call": _r(used / calls, 2) if calls else None,
                "note": "the helper's own CPU (serving calls plus background pool refreshes) "
                "while the sequential figures ran; a plugin's cpu ms column counts "
                "only the client process",
            }

        for mode, cid, prev in standing:
            r = self.plugin(mode, "DEL", f"{mode}:check", cid, prev)
            if not r.ok:
                self.notes.append(f"final DEL of the CHECK allocation failed: {r.problem()}")

    def mode_jobs(
        self, mode: str, standing: list[tuple[str, str, dict[str, Any]]]
    ) -> list[tuple[list[Series], Callable[[], object]]]:
        tag = MODES[mode]
        add = self.s(f"{mode}:add", f"ADD, IPv4 /24, empty ({tag})")
        check = self.s(f"{mode}:check", f"CHECK ({tag})")
        dele = self.s(f"{mode}:del", f"DEL ({tag})")
        fills = {
            n: self.s(f"{mode}:add_{n}", f"ADD, /16 holding {n:,} ({tag})") for n in FILL_SIZES
        }
        v6 = self.s(f"{mode}:add_v6", f"ADD, IPv6 /64, empty ({tag})")

        # CHECK needs an ADD it can check; it stands for the whole run.
        check_cid = self.cid("check")
        r = self.plugin(mode, "ADD", f"{mode}:check", check_cid)
        if not r.ok:
            raise RuntimeError(f"setup ADD for CHECK failed: {r.problem()}")
        check_prev = json.loads(r.stdout)
        standing.append((mode, check_cid, check_prev))

        def do_check() -> None:
            r = self.plugin(mode, "CHECK", f"{mode}:check", check_cid, check_prev)
            check.add(r, r.ok and not r.stdout.strip())

        def do_fill(n: int) -> Callable[[], object]:
            return lambda: self.add_del(mode, f"{mode}:fill{n}", fills[n], None, f"f{n}")

        return [
            ([add, dele], lambda: self.add_del(mode, f"{mode}:v4", add, dele, "add")),
            ([check], do_check),
            *[([fills[n]], do_fill(n)) for n in FILL_SIZES],
            ([v6], lambda: self.add_del(mode, f"{mode}:v6", v6, None, "v6")),
        ]

    # -- Consul requests per call -------------------------------------------------------------
    def requests_uncontended(self) -> None:
        """Each verbose call's own lines, found by the log's size before and after it: this
        works whether the lines come from the plugin process or from the helper."""
        log = self.tmp / "verbose-uncontended.log"
        env = {"IPAM_DA_CONSUL_LOG_FILE": str(log)}
        n = 3 if self.args.quick else 5
        counts: dict[str, list[int]] = defaultdict(list)
        consul_ms: dict[str, list[float]] = defaultdict(list)
        latency: dict[str, list[float]] = defaultdict(list)

        def counted(
            label: str,
            mode: str,
            command: str,
            pool: str,
            cid: str,
            prev: dict[str, Any] | None = None,
        ) -> Run:
            before = log.stat().st_size if log.exists() else 0
            r = self.plugin(mode, command, f"{mode}:{pool}", cid, prev, verbose=True, extra_env=env)
            reqs = parse_requests(log, before)
            counts[label].append(len(reqs))
            consul_ms[label].append(sum(ms for _, ms in reqs))
            for kind, ms in reqs:
                latency[f"{label}: {kind}"].append(ms)
            return r

        for mode in self.modes:
            tag = MODES[mode]
            cid = self.cid("vcheck")
            r = self.plugin(mode, "ADD", f"{mode}:check", cid)
            check_prev = json.loads(r.stdout) if r.ok else None
            for _ in range(n):
                for what, pool in (("/24", "v4"), ("@60k", "fill60000"), ("v6", "v6")):
                    c = self.cid("v")
                    r_add = counted(f"ADD {what} ({tag})", mode, "ADD", pool, c)
                    counted(f"DEL {what} ({tag})", mode, "DEL", pool, c, prev_of(r_add))
                if check_prev is not None:
                    counted(f"CHECK ({tag})", mode, "CHECK", "check", cid, check_prev)
            self.plugin(mode, "DEL", f"{mode}:check", cid, check_prev)
        self.result["requests_uncontended"] = {
            label: {
                "requests_median": statistics.median(v),
                "requests_max": max(v),
                "consul_ms_median": _r(statistics.median(consul_ms[label])),
            }
            for label, v in counts.items()
        }
        self.result["consul_latency_ms"] = {
            k: {"n": len(v), "median": _r(statistics.median(v), 2), "p95": _r(p95(v), 2)}
            for k, v in sorted(latency.items())
        }
        if not any(x for v in counts.values() for x in v):
            self.notes.append(
                "no request lines found in the verbose log: has its format "
                "changed? (expected '<METHOD> <url> -> <status> in <ms> ms')"
            )

    # -- concurrency --------------------------------------------------------------------------
    def concurrent_round(self, mode: str, verbose: bool, log: Path | None = None) -> dict[str, Any]:
        key = f"{mode}:conc{self.cid('p')}"
        j = self.modes.index(mode)
        self.pools[key] = self.agent.create_pool(
            f"{self.tag}-{key.replace(':', '-')}",
            [{"subnet": f"10.{j}.3.0/24", "gateway": f"10.{j}.3.1"}],
        )
        # One call first, as on a node that has served this pool before (the helper knows it).
        self.add_del(mode, key, None, None, "cw")
        extra = {**self.socket_env(mode), **({"IPAM_DA_CONSUL_LOG_FILE": str(log)} if log else {})}
        exe = str(PLUGIN_VERBOSE if verbose else PLUGIN)
        cids = [self.cid("c") for _ in range(CONCURRENCY)]
        stdin = netconf(self.url, self.pools[key])
        envs = [{**cni_env("ADD", c), **extra} for c in cids]
        log_before = log.stat().st_size if log and log.exists() else 0
        cpu0 = self.helper.cpu_ms() if self.helper and mode == "helper" else None
        children = [spawn([exe], env, stdin) for env in envs]
        runs = reap_all(children)
        first = min(c.started for c in children)
        last = max(c.started + r.wall_ms / 1000 for r, c in zip(runs, children, strict=True))
        wall = (last - first) * 1000
        helper_cpu = self.helper.cpu_ms() - cpu0 if self.helper and cpu0 is not None else None
        reqs = parse_requests(log, log_before, by_pid=True) if log else None
        ips = [_ip_of(r) for r in runs]
        failed = [r.problem() for r, ip in zip(runs, ips, strict=True) if ip is None]
        got = [ip for ip in ips if ip]
        dupes = sorted(ip for ip, k in Counter(got).items() if k > 1)
        in_kv = self.agent.allocations(self.pools[key])
        kv_ok = sorted(in_kv.values()) == sorted(
            c for c, ip in zip(cids, ips, strict=True) if ip
        ) and len(set(in_kv)) == len(got)
        # DEL all, concurrently too, with the addresses a runtime would pass back.
        dels = [
            spawn(
                [exe],
                {**cni_env("DEL", c), **extra},
                netconf(self.url, self.pools[key], prev_of(r)),
            )
            for c, r in zip(cids, runs, strict=True)
        ]
        del_runs = reap_all(dels)
        del_first = min(c.started for c in dels)
        del_last = max(c.started + r.wall_ms / 1000 for r, c in zip(del_runs, dels, strict=True))
        out = {
            "pool": self.pools[key],
            "wall_ms": _r(wall),
            "allocations_per_s": _r(len(got) / (wall / 1000)) if wall else None,
            "per_process_median_ms": _r(statistics.median(r.wall_ms for r in runs)),
            "per_process_p95_ms": _r(p95([r.wall_ms for r in runs])),
            "per_process_max_ms": _r(max(r.wall_ms for r in runs)),
            "helper_cpu_ms": _r(helper_cpu),
            "failures": len(failed),
            "first_failures": failed[:3],
            "duplicate_ips": dupes,
            "kv_matches_results": kv_ok,
            "del_wall_ms": _r((del_last - del_first) * 1000),
            "del_failures": sum(not r.ok for r in del_runs),
            "left_after_del": len(self.agent.allocations(self.pools[key])),
        }
        if reqs is not None:
            counts = [len(reqs.get(r.pid, [])) for r in runs]
            total = sum(len(v) for v in reqs.values())
            out["requests_total"] = total
            out["requests_per_add_mean"] = _r(total / len(runs), 2)
            if mode == "inproc":  # the helper logs every call under its own pid
                out["requests_per_add_median"] = statistics.median(counts)
                out["requests_per_add_max"] = max(counts)
        return out

    def concurrency(self) -> None:
        out: dict[str, Any] = {"processes": CONCURRENCY}
        for mode in self.modes:
            # In-process rounds cost ~15 s each on 2 cores; the verbose round adds one more.
            rounds = 1 if self.args.quick or mode == "inproc" else 3
            timed = []
            for i in range(rounds):
                res = self.concurrent_round(mode, verbose=False)
                timed.append(res)
                self.log(
                    f"concurrent {MODES[mode]} round {i + 1}/{rounds}: {res['wall_ms']} ms,"
                    f" {res['failures']} failures"
                )
            counted = self.concurrent_round(
                mode, verbose=True, log=self.tmp / f"verbose-concurrent-{mode}.log"
            )
            walls = [r["wall_ms"] for r in timed if r["wall_ms"]]
            rates = [r["allocations_per_s"] for r in timed if r["allocations_per_s"]]
            out[mode] = {
                "rounds": timed,
                "wall_ms_median": _r(statistics.median(walls)) if walls else None,
                "allocations_per_s_median": _r(statistics.median(rates)) if rates else None,
                "per_process_median_ms": _r(
                    statistics.median(r["per_process_median_ms"] for r in timed)
                ),
                "verbose_round": counted,
            }
            for r in [*timed, counted]:
                if (
                    r["failures"]
                    or r["duplicate_ips"]
                    or not r["kv_matches_results"]
                    or r["del_failures"]
                    or r["left_after_del"]
                ):
                    self.notes.append(
                        f"concurrent round on {r['pool']}: {r['failures']} ADD failures, "
                        f"duplicates {r['duplicate_ips']}, KV matches results: "
                        f"{r['kv_matches_results']}, {r['del_failures']} DEL failures, "
                        f"{r['left_after_del']} left after DEL; first: {r['first_failures'][:1]}"
                    )
        self.result["concurrent"] = out

    # -- many hosts bursting into one pool ---------------------------------------------------
    def raft_index(self) -> int:
        """Consul's last Raft log index: every write attempt, won or lost, is one entry."""
        resp = self.agent.http.get(f"{self.url}/v1/agent/self", timeout=10)
        resp.raise_for_status()
        return int(resp.json()["Stats"]["raft"]["last_log_index"])

    def multihost_round(
        self, mode: str, pick: str, hosts: int, per_host: int, helpers: list[Helper]
    ) -> dict[str, Any]:
        key = f"mh:{mode}:{pick}:{hosts}:{self.cid('m')}"
        self.pools[key] = self.agent.create_pool(
            f"{self.tag}-mh-{self.counter}", [{"subnet": "10.77.0.0/24", "gateway": "10.77.0.1"}]
        )
        stdin = [
            # A generous budget: the figure is the writes a burst costs, not whether a loaded
            # machine starts 48 interpreters within the default 15 s.
            netconf(
                self.url,
                self.pools[key],
                ipam={"host": f"sim-{h}", "pick": pick, "timeout": 120},
            )
            for h in range(hosts)
        ]

        def env(command: str, cid: str, h: int) -> dict[str, str]:
            sock = (
                {"IPAM_DA_CONSUL_SOCKET": str(helpers[h].socket)}
                if mode == "helper"
                else self.socket_env("inproc")
            )
            return {**cni_env(command, cid), **sock}

        # One call per host first, as on nodes that have served this pool before (each helper
        # caches it); then a pause so every helper's copy has caught up with the others'.
        for h in range(hosts):
            cid = self.cid("mw")
            r = run([str(PLUGIN)], env("ADD", cid, h), stdin[h])
            run([str(PLUGIN)], env("DEL", cid, h), netconf_with_prev(stdin[h], prev_of(r)))
        time.sleep(1.5)
        calls = [(h, self.cid("mh")) for h in range(hosts) for _ in range(per_host)]
        random.Random(hosts).shuffle(calls)  # hosts start interleaved, as a rollout would
        index0 = self.raft_index()
        children = [spawn([str(PLUGIN)], env("ADD", cid, h), stdin[h]) for h, cid in calls]
        runs = reap_all(children)
        index1 = self.raft_index()
        first = min(c.started for c in children)
        last = max(c.started + r.wall_ms / 1000 for r, c in zip(runs, children, strict=True))
        wall = last - first
        ips = [_ip_of(r) for r in runs]
        got = [ip for ip in ips if ip]
        dupes = sorted(ip for ip, k in Counter(got).items() if k > 1)
        failed = [r.problem() for r, ip in zip(runs, ips, strict=True) if ip is None]
        dels = [
            spawn([str(PLUGIN)], env("DEL", cid, h), netconf_with_prev(stdin[h], prev_of(r)))
            for (h, cid), r in zip(calls, runs, strict=True)
        ]
        del_runs = reap_all(dels)
        left = len(self.agent.allocations(self.pools[key]))
        return {
            "mode": mode,
            "pick": pick,
            "hosts": hosts,
            "per_host": per_host,
            "allocated": len(got),
            "failures": len(failed),
            "first_failures": failed[:2],
            "duplicate_ips": dupes,
            "raft_entries": index1 - index0,
            "raft_per_add": _r((index1 - index0) / len(got), 2) if got else None,
            "wall_ms": _r(wall * 1000),
            "allocations_per_s": _r(len(got) / wall, 1) if wall else None,
            "del_failures": sum(not r.ok for r in del_runs),
            "left_after_del": left,
        }

    def multihost(self) -> None:
        counts = [int(x) for x in self.args.hosts.split(",")]
        helpers: list[Helper] = []
        rows: list[dict[str, Any]] = []
        try:
            if "helper" in self.modes:
                for h in range(max(counts)):
                    hp = Helper(self.tmp, f"host{h}")
                    hp.start()
                    helpers.append(hp)
            wanted = self.args.multihost_modes.split(",")
            modes = [m for m in self.modes if m in wanted]
            for mode in sorted(modes, key=lambda m: m != "helper"):  # the quick ones first
                for pick in PICKS:
                    for hosts in counts:
                        total = self.args.burst_inproc if mode == "inproc" else BURST_TOTAL
                        row = self.multihost_round(
                            mode, pick, hosts, max(1, total // hosts), helpers
                        )
                        rows.append(row)
                        self.log(
                            f"multi-host {MODES[mode]} pick={pick} {hosts} x {row['per_host']}: "
                            f"{row['raft_per_add']} Raft entries/ADD, "
                            f"{row['allocations_per_s']} allocations/s, {row['failures']} failed"
                        )
                        if row["duplicate_ips"] or row["failures"] or row["left_after_del"]:
                            self.notes.append(
                                f"multi-host round {mode}/{pick}/{hosts}: {row['failures']} "
                                f"failed, duplicates {row['duplicate_ips']}, "
                                f"{row['left_after_del']} left after DEL; "
                                f"first: {row['first_failures'][:1]}"
                            )
        finally:
            for hp in helpers:
                hp.stop()
        self.result["multihost"] = {
            "burst_total": BURST_TOTAL,
            "burst_total_inproc": self.args.burst_inproc,
            "pool": "IPv4 /24 (253 addresses), one per round",
            "rows": rows,
        }

    # -- memory ------------------------------------------------------------------------------
    def memory(self) -> None:
        """Peak RSS through /usr/bin/time, whose fork leaves no trace of our own RSS."""
        if not TIME_BIN.exists():
            self.notes.append(f"peak memory skipped: {TIME_BIN} is absent (apt install time)")
            return
        n = 3 if self.args.quick else 5
        report = self.tmp / "time.out"

        def timed(argv: list[str], env: dict[str, str], stdin: bytes = b"") -> tuple[Run, int]:
            r = run([str(TIME_BIN), "-f", "%M", "-o", str(report), *argv], env, stdin)
            return r, int(report.read_text().split()[-1]) if r.ok else 0

        def floor() -> int:
            return timed([self.python, "-c", "pass"], base_env())[1]

        def add(mode: str, pool: str) -> int:
            cid = self.cid("mem")
            env = {**cni_env("ADD", cid), **self.socket_env(mode)}
            r, kb = timed([str(PLUGIN)], env, netconf(self.url, self.pools[f"{mode}:{pool}"]))
            self.plugin(mode, "DEL", f"{mode}:{pool}", cid, prev_of(r))
            if not r.ok:
                self.notes.append(f"memory ADD failed: {r.problem()}")
            return kb

        def host_local() -> int:
            cid = self.cid("hlmem")
            conf = host_local_conf(str(self.tmp / "host-local"))
            r, kb = timed([str(HOST_LOCAL)], cni_env("ADD", cid), conf)
            run([str(HOST_LOCAL)], cni_env("DEL", cid), conf)
            if not r.ok:
                self.notes.append(f"memory host-local ADD failed: {r.problem()}")
            return kb

        cases: list[tuple[str, Callable[[], int]]] = [("floor", floor)]
        for mode in self.modes:
            cases += [
                (f"{mode}:add", functools.partial(add, mode, "v4")),
                (f"{mode}:add_60000", functools.partial(add, mode, "fill60000")),
            ]
        if HOST_LOCAL.exists():
            cases.append(("host_local", host_local))
        out: dict[str, Any] = {}
        for key, fn in cases:
            values = [v for v in (fn() for _ in range(n)) if v]
            out[key] = {
                "max_rss_kb_median": int(statistics.median(values)) if values else None,
                "max_rss_kb_max": max(values) if values else None,
                "n": len(values),
            }
        if self.helper and self.helper.pid:
            out["helper_process"] = {
                "max_rss_kb_median": proc_status_kb(self.helper.pid, "VmHWM"),
                "rss_kb_now": proc_status_kb(self.helper.pid, "VmRSS"),
                "note": "the helper's own high-water mark (VmHWM) over the whole benchmark, "
                "holding every pool it served",
            }
        self.result["memory"] = out

    # -- where the time goes -----------------------------------------------------------------
    def imports(self) -> None:
        """-X importtime of real ADD processes (not a synthetic import list), and of the floor."""
        n = 3 if self.args.quick else 5
        runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for _ in range(n):
            env = {**base_env(), "PYTHONPROFILEIMPORTTIME": "1"}
            runs["floor"].append(parse_importtime(run([self.python, "-c", "pass"], env).stderr))
            for mode in self.modes:
                r_add, _ = self.add_del(
                    mode,
                    f"{mode}:v4",
                    None,
                    None,
                    "imp",
                    extra_env={"PYTHONPROFILEIMPORTTIME": "1"},
                )
                if r_add.ok:
                    runs[mode].append(parse_importtime(r_add.stderr))

        def med(rs: list[dict[str, Any]], part: str) -> dict[str, float]:
            keys = {k for r in rs for k in r[part]}
            return {k: statistics.median(r[part].get(k, 0.0) for r in rs) for k in keys}

        def top(d: dict[str, float], k: int = 12) -> dict[str, float | None]:
            return {
                name: _r(v, 1) for name, v in sorted(d.items(), key=lambda x: -x[1])[:k] if v >= 0.1
            }

        out: dict[str, Any] = {
            "note": "self_ms_by_package sums each package's own module bodies (it adds up to "
            "the total); cumulative_ms_of_package is the first import of each "
            "package's top module, including what it pulled in. Profiling inflates "
            "both by some 10-20%."
        }
        for key, rs in runs.items():
            if not rs:
                self.notes.append(f"import profile of {key} skipped: its runs failed")
                continue
            out[key] = {
                "total_ms": _r(statistics.median(r["total"] for r in rs)),
                "modules": int(statistics.median(r["modules"] for r in rs)),
                "self_ms_by_package": top(med(rs, "self_by_root")),
                "cumulative_ms_of_package": top(med(rs, "cumulative_root")),
            }
        self.result["imports"] = out
        hook = next(
            (
                v
                for k, v in out.get("floor", {}).get("cumulative_ms_of_package", {}).items()
                if k.startswith("__editable__")
            ),
            None,
        )
        if hook:
            self.notes.append(
                f"the venv holds an editable install, whose import hook (.pth) costs {hook} ms "
                "of every interpreter start, the floor's included; with `pip install .` the "
                "floor and every figure would be about that much lower, and ratios higher"
            )

    def helper_log(self) -> None:
        """What the helper said on its stderr (its background work reports nowhere else)."""
        if self.helper is None or not self.helper.log.exists():
            return
        lines = self.helper.log.read_text(errors="replace").splitlines()
        warnings = [ln for ln in lines if "WARNING" in ln or "ERROR" in ln]
        examples: dict[str, str] = {}
        kinds: Counter[str] = Counter()
        for line in warnings:
            shape = re.sub(r"'[^']*'|/v1/kv/\S+|\d+(\.\d+)?", "_", line)  # any pool alike
            kinds[shape] += 1
            examples.setdefault(shape, line)
        self.result["helper_log"] = {
            "warnings": len(warnings),
            "kinds": [{"count": n, "example": examples[k]} for k, n in kinds.most_common(8)],
        }
        if warnings:
            self.notes.append(
                f"the helper logged {len(warnings)} warnings/errors, e.g. "
                f"{warnings[0][:200]!r} (see helper_log in the JSON)"
            )

    def profile(self) -> None:
        """cProfile of one in-process ADD (imports done first: the work alone), in the empty
        /24 and in the pool holding 60,000."""
        for pool_key in ("v4", "fill60000"):
            cid = self.cid("prof")
            out = self.tmp / "profile.txt"
            code = (
                "import cProfile, io, pstats, sys\n"
                "import ipam_da_consul.cni.main as m\n"
                "import ipam_da_consul.cni.machine, ipam_da_consul.cni.logs\n"
                "p = cProfile.Profile()\n"
                "code = p.runcall(m.run, False)\n"
                "s = io.StringIO()\n"
                "pstats.Stats(p, stream=s).sort_stats('cumulative').print_stats(25)\n"
                f"open({str(out)!r}, 'w').write(s.getvalue())\n"
                "sys.exit(code)\n"
            )
            pool = f"inproc:{pool_key}"
            env = {**cni_env("ADD", cid), **self.socket_env("inproc")}
            r = run([self.python, "-c", code], env, netconf(self.url, self.pools[pool]))
            self.plugin("inproc", "DEL", pool, cid, prev_of(r))
            if not r.ok or not out.exists():
                self.notes.append(f"in-process profile failed: {r.problem()}")
                continue
            text = out.read_text()
            out.unlink()
            self.result[f"profile_inproc_add_{pool_key}"] = text.splitlines()
            print(f"\ncProfile, one in-process ADD in pool {pool_key}, imports excluded:")
            print(text, flush=True)


def _ips(r: Run) -> list[dict[str, Any]] | None:
    if not r.ok:
        return None
    try:
        ips = json.loads(r.stdout)["ips"]
    except (ValueError, KeyError, TypeError):
        return None
    return ips if isinstance(ips, list) and ips else None


def _ip_of(r: Run) -> str | None:
    ips = _ips(r)
    return str(ips[-1].get("address", "")).split("/")[0] or None if ips else None


def parse_requests(path: Path, offset: int = 0, by_pid: bool = False) -> Any:
    """Request lines of the verbose log from `offset` on: [(kind, ms)], or pid -> [(kind, ms)]."""
    found: dict[int, list[tuple[str, float]]] = defaultdict(list)
    if path.exists():
        with open(path, "rb") as fh:
            fh.seek(offset)
            text = fh.read().decode(errors="replace")
        for line in text.splitlines():
            m = LOG_LINE.match(line)
            req = REQUEST.match(m["msg"]) if m else None
            if m and req:
                found[int(m["pid"])].append(
                    (request_kind(req["method"], req["url"]), float(req["ms"]))
                )
    if by_pid:
        return found
    return [x for v in found.values() for x in v]


def request_kind(method: str, url: str) -> str:
    path = re.sub(r"^[a-z]+://[^/]+", "", url).split("?")[0]
    if path.startswith("/v1/kv/"):
        key = path[len("/v1/kv/") :]
        parts = key.rstrip("/").split("/")
        if len(parts) >= 3:
            shape = "<pool>/<ip>"
        elif key.endswith("/"):
            shape = "<pool>/"
        else:
            shape = "<pool>"
        return f"{method} /v1/kv/{parts[0]}/{shape}"
    return f"{method} {path}"


def parse_importtime(stderr: bytes) -> dict[str, Any]:
    total = 0.0
    modules = 0
    self_by_root: dict[str, float] = defaultdict(float)
    cumulative_root: dict[str, float] = {}
    for line in stderr.decode(errors="replace").splitlines():
        m = IMPORT_LINE.match(line)
        if not m:
            continue
        own, cum, indent, name = int(m[1]) / 1000, int(m[2]) / 1000, len(m[3]), m[4]
        modules += 1
        self_by_root[name.split(".")[0]] += own
        if indent <= 1:  # importtime indents nested imports by two more spaces per level
            total += cum
        if "." not in name:
            cumulative_root.setdefault(name, cum)
    return {
        "total": total,
        "modules": modules,
        "self_by_root": dict(self_by_root),
        "cumulative_root": cumulative_root,
    }


# -- report --------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    consul = "unknown"
    with contextlib.suppress(Exception):
        out = subprocess.run(
            [consul_binary(), "version"], capture_output=True, text=True, timeout=10
        )
        consul = out.stdout.splitlines()[0].strip()
    commit = None
    with contextlib.suppress(Exception):
        env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # read-only: never touch the index
        commit = (
            subprocess.run(
                ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                timeout=10,
                env=env,
            ).stdout.strip()
            or None
        )
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            env=env,
        ).stdout.strip()
        if commit and dirty:
            commit += "+dirty"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "python_executable": interpreter_of(PLUGIN),
        "consul": consul,
        "commit": commit,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
    }


def build_report(b: Bench, started: float, load_at_start: float) -> dict[str, Any]:
    floor_s = b.series.get("floor")
    floor = floor_s.median if floor_s else None
    floor_cpu = statistics.median(floor_s.cpu) if floor_s and floor_s.cpu else None
    med = {k: s.median for k, s in b.series.items()}
    ratios: dict[str, float | None] = {}
    targets: dict[str, Any] = {}
    limit_60k = {"inproc": 2.0, "helper": 1.5}
    for mode in b.modes:

        def m(key: str, mode: str = mode) -> float | None:
            return med.get(f"{mode}:{key}")

        ratios |= {
            f"{mode}: ADD / floor": ratio(m("add"), floor),
            f"{mode}: ADD / bare interpreter": ratio(m("add"), med.get("bare")),
            f"{mode}: ADD@60k / ADD@0": ratio(m("add_60000"), m("add_0")),
            f"{mode}: ADD@10k / ADD@0": ratio(m("add_10000"), m("add_0")),
            f"{mode}: ADD@1k / ADD@0": ratio(m("add_1000"), m("add_0")),
            f"{mode}: ADD v6 /64 / ADD v4 /24": ratio(m("add_v6"), m("add")),
            f"{mode}: ADD / host-local ADD": ratio(m("add"), med.get("host_local")),
        }
        if mode == "inproc":
            # The process's own CPU time holds steady when the machine is busy. (Through the
            # helper, the work happens in the helper, so the client's CPU says little.)
            def c(key: str) -> float | None:
                s = b.series.get(key)
                return statistics.median(s.cpu) if s and s.cpu else None

            ratios |= {
                "inproc: ADD / floor, CPU time": ratio(c("inproc:add"), c("floor")),
                "inproc: ADD@60k / ADD@0, CPU time": ratio(
                    c("inproc:add_60000"), c("inproc:add_0")
                ),
                "inproc: ADD v6 / v4, CPU time": ratio(c("inproc:add_v6"), c("inproc:add")),
            }
        req = b.result.get("requests_uncontended", {}).get(f"ADD /24 ({MODES[mode]})", {})
        targets |= {
            f"{mode}: ADD <= 3x floor": _verdict(ratios[f"{mode}: ADD / floor"], 3.0),
            # Issue 10: in-process 60k <= 2x empty (it downloads the pool); helper <= 1.5x.
            f"{mode}: ADD@60k <= {limit_60k[mode]}x ADD@0": _verdict(
                ratios[f"{mode}: ADD@60k / ADD@0"], limit_60k[mode]
            ),
            f"{mode}: v6 no slower than v4 (5% noise allowance)": _verdict(
                ratios[f"{mode}: ADD v6 /64 / ADD v4 /24"], 1.05
            ),
            f"{mode}: Consul requests per uncontended ADD": req.get("requests_median"),
        }
    targets |= multihost_targets(b.result.get("multihost", {}).get("rows", []))
    mach = machine()
    mach["loadavg_1m_at_start"] = load_at_start
    return {
        "machine": mach,
        "settings": {
            "runs": b.args.runs,
            "quick": b.args.quick,
            "duration_s": round(time.perf_counter() - started, 1),
        },
        "figures": {k: s.summary(floor, floor_cpu) for k, s in b.series.items()},
        "ratios": ratios,
        "targets": targets,
        **b.result,
        "notes": b.notes,
    }


def multihost_targets(rows: list[dict[str, Any]]) -> dict[str, str]:
    """Issue 10's multi-host targets, for each pick mode and each way of running."""
    out: dict[str, str] = {}

    def row(mode: str, pick: str, hosts: int) -> dict[str, Any] | None:
        return next(
            (r for r in rows if (r["mode"], r["pick"], r["hosts"]) == (mode, pick, hosts)), None
        )

    for mode in MODES:
        for pick in PICKS:
            most = max((r["hosts"] for r in rows if r["mode"] == mode), default=0)
            top, one = row(mode, pick, most), row(mode, pick, 1)
            if top is None:
                continue
            out[f"multi-host {mode} pick={pick}: Raft entries per ADD <= 1.3 with {most} hosts"] = (
                _verdict(top["raft_per_add"], 1.3)
            )
            if one is not None and one["allocations_per_s"] and top["allocations_per_s"]:
                fast = top["allocations_per_s"] >= one["allocations_per_s"]
                out[f"multi-host {mode} pick={pick}: allocations/s with {most} hosts >= 1 host"] = (
                    f"{'met' if fast else 'MISSED'} ({top['allocations_per_s']} vs "
                    f"{one['allocations_per_s']})"
                )
            if mode == "inproc" and one is not None:
                n = one["per_host"]
                label = f"in-process pick={pick}: writes per ADD, {n} concurrent on one host <= 2"
                out[label] = _verdict(one["raft_per_add"], 2.0)
    return out


def multihost_table(rep: dict[str, Any]) -> list[str]:
    rows = rep.get("multihost", {}).get("rows", [])
    if not rows:
        return []
    out = [
        "| mode | pick | hosts x concurrent ADDs | Raft entries per successful ADD | "
        "allocations/s | failed |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {MODES[r['mode']]} | {r['pick']} | {r['hosts']} x {r['per_host']} | "
            f"{r['raft_per_add']} | {r['allocations_per_s']} | {r['failures']} |"
        )
    return out


def _verdict(value: float | None, limit: float) -> str:
    if value is None:
        return "not measured"
    return f"{'met' if value <= limit else 'MISSED'} ({value} vs <= {limit})"


def _fmt(v: float | None, suffix: str = "") -> str:
    return "-" if v is None else f"{v:.1f}{suffix}"


def _mib(kb: int | None) -> str:
    return "-" if not kb else f"{kb / 1024:.1f} MiB"


def render(rep: dict[str, Any]) -> list[str]:
    rows = [("figure", "median ms", "p95 ms", "x floor", "cpu ms", "cpu x floor", "n")]
    for f in rep["figures"].values():
        rows.append(
            (
                f["label"] + (f" [{f['errors']} errors]" if f["errors"] else ""),
                _fmt(f["median_ms"]),
                _fmt(f["p95_ms"]),
                _fmt(f["ratio_to_floor"], "x"),
                _fmt(f["cpu_median_ms"]),
                _fmt(f["cpu_ratio_to_floor"], "x"),
                str(f["n"]),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += ["", "ratios:"] + [f"  {k}: {v}" for k, v in rep["ratios"].items() if v is not None]
    c = rep.get("concurrent", {})
    for mode, tag in MODES.items():
        if mode not in c:
            continue
        x, v = c[mode], c[mode]["verbose_round"]
        lines.append(
            f"{c['processes']} concurrent ADDs {tag}: wall {x['wall_ms_median']} ms (median of "
            f"{len(x['rounds'])}), {x['allocations_per_s_median']} allocations/s, per process "
            f"median {x['per_process_median_ms']} ms; Consul requests per ADD mean "
            f"{v.get('requests_per_add_mean')}"
            + (
                f", median {v['requests_per_add_median']}, max {v['requests_per_add_max']}"
                if "requests_per_add_max" in v
                else ""
            )
            + (
                f"; helper CPU {x['rounds'][0]['helper_cpu_ms']} ms"
                if x["rounds"][0].get("helper_cpu_ms") is not None
                else ""
            )
        )
    ru = rep.get("requests_uncontended")
    if ru:
        lines.append("Consul requests per uncontended call (ms spent waiting on Consul):")
        lines += [
            f"  {k}: {v['requests_median']} ({v['consul_ms_median']} ms)" for k, v in ru.items()
        ]
    hc = rep.get("helper_cpu")
    if hc:
        lines.append(
            f"helper CPU during the sequential figures: {hc['cpu_ms_total']} ms for "
            f"{hc['sequential_calls']} calls ({hc['cpu_ms_per_call']} ms per call)"
        )
    mem = rep.get("memory")
    if mem:
        lines.append(
            "peak RSS (median): "
            + ", ".join(f"{k} {_mib(v['max_rss_kb_median'])}" for k, v in mem.items())
        )
    imp = rep.get("imports")
    if imp:
        for key in ("floor", *MODES):
            if key not in imp:
                continue
            x = imp[key]
            lines.append(
                f"imports, {key}: {x['total_ms']} ms, {x['modules']} modules; own time "
                "by package: "
                + ", ".join(f"{k} {v}" for k, v in list(x["self_ms_by_package"].items())[:8])
            )
            if key != "floor":
                lines.append(
                    "  cumulative first import: "
                    + ", ".join(
                        f"{k} {v}" for k, v in list(x["cumulative_ms_of_package"].items())[:8]
                    )
                )
    lat = rep.get("consul_latency_ms")
    if lat:
        lines.append("Consul request latency seen by the plugin (median / p95 ms):")
        lines += [f"  {k}: {v['median']} / {v['p95']} (n {v['n']})" for k, v in lat.items()]
    mh = multihost_table(rep)
    if mh:
        lines += [
            "",
            "many hosts bursting into one /24 (Raft entries from /v1/agent/self):",
            *mh,
            "",
        ]
    lines.append("targets:")
    lines += [f"  {k}: {v}" for k, v in rep["targets"].items()]
    lines += [f"note: {n}" for n in rep["notes"]]
    m = rep["machine"]
    lines.append(
        f"machine: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}, Python "
        f"{m['python']}, {m['consul']}, commit {m['commit']}, {m['date']}, load "
        f"average {m['loadavg_1m_at_start']} at start, {m['loadavg_1m_at_end']} at "
        f"end, {rep['settings']['duration_s']} s"
    )
    return lines


def markdown(rep: dict[str, Any]) -> str:
    m = rep["machine"]
    out = [
        f"Measured {m['date']} on {m['cpu']} ({m['cores']} cores), Linux {m['kernel']}, "
        f"Python {m['python']}, {m['consul']} dev agent on loopback, commit {m['commit']}, "
        f"load average {m['loadavg_1m_at_start']} at start and {m['loadavg_1m_at_end']} at "
        f"end; median and p95 over up to "
        f"{rep['settings']['runs']} runs{' (--quick)' if rep['settings']['quick'] else ''}, "
        f"{rep['settings']['duration_s']:.0f} s in all.",
        "",
        "| figure | median ms | p95 ms | x floor | CPU x floor | n |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for f in rep["figures"].values():
        out.append(
            f"| {f['label']} | {_fmt(f['median_ms'])} | {_fmt(f['p95_ms'])} | "
            f"{_fmt(f['ratio_to_floor'], 'x')} | {_fmt(f['cpu_ratio_to_floor'], 'x')} | "
            f"{f['n']} |"
        )
    out += ["", "| ratio | value |", "|---|---:|"]
    out += [f"| {k} | {v} |" for k, v in rep["ratios"].items() if v is not None]
    out.append("")
    c = rep.get("concurrent", {})
    for mode, tag in MODES.items():
        if mode in c:
            x, v = c[mode], c[mode]["verbose_round"]
            out.append(
                f"- {c['processes']} concurrent ADDs on one pool, {tag}: "
                f"{x['wall_ms_median']} ms wall, {x['allocations_per_s_median']} "
                f"allocations/s, Consul requests per ADD {v.get('requests_per_add_mean')}"
                + (f" (max {v['requests_per_add_max']})" if "requests_per_add_max" in v else "")
            )
    ru = rep.get("requests_uncontended", {})
    if ru:
        out.append(
            "- Consul requests per uncontended call: "
            + ", ".join(f"{k} {v['requests_median']}" for k, v in ru.items())
        )
    mem = rep.get("memory")
    if mem:
        out.append(
            "- peak RSS: "
            + ", ".join(f"{k} {_mib(v['max_rss_kb_median'])}" for k, v in mem.items())
        )
    mh = multihost_table(rep)
    if mh:
        out += [
            "",
            f"Many hosts bursting into one IPv4 /24, {rep['multihost']['burst_total']} ADDs "
            f"per helper row and {rep['multihost'].get('burst_total_inproc')} per in-process "
            "row (one helper per simulated host, or in-process); Raft entries counted from "
            "Consul's `/v1/agent/self` `last_log_index` before and after the burst:",
            "",
            *mh,
            "",
        ]
    out += [f"- target {k}: {v}" for k, v in rep["targets"].items()]
    out += [f"- note: {n}" for n in rep["notes"]]
    return "\n".join(out) + "\n"


# -- main ----------------------------------------------------------------------------------
@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """SIGTERM behaves like Ctrl-C, so the finally blocks clean up either way."""

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="about 8 runs per figure")
    ap.add_argument("--runs", type=int, help="runs per sequential figure (default 30, quick 8)")
    ap.add_argument("--json", type=Path, default=ROOT / "bench/results/latest.json")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="also cProfile in-process ADDs (empty /24 and 60,000 pools)",
    )
    ap.add_argument("--no-helper", action="store_true", help="measure the in-process path only")
    ap.add_argument(
        "--hosts",
        default=",".join(map(str, HOST_COUNTS)),
        help="simulated host counts for the multi-host bursts (default 1,2,4,8; e.g. 1,8,16)",
    )
    ap.add_argument(
        "--burst-inproc",
        type=int,
        default=BURST_TOTAL,
        help=f"ADDs per in-process multi-host burst (default {BURST_TOTAL}; each one is a whole "
        "interpreter, so a loaded machine may want fewer)",
    )
    ap.add_argument(
        "--multihost-modes",
        default="helper,inproc",
        help="which ways of running the multi-host bursts use (default helper,inproc)",
    )
    ap.add_argument(
        "--only",
        choices=("all", "multihost", "sizes"),
        default="all",
        help="run one part: the multi-host bursts, or the sequential figures (pool sizes)",
    )
    args = ap.parse_args()
    args.runs = max(3, args.runs or (8 if args.quick else 30))
    for exe in (PLUGIN, PLUGIN_VERBOSE):
        if not exe.exists():
            print(
                f"{exe} is not installed: run this with the venv's python after `pip install -e .`",
                file=sys.stderr,
            )
            return 2
    if not hasattr(os, "pidfd_open"):
        print("needs Linux >= 5.3 and Python >= 3.9 (os.pidfd_open)", file=sys.stderr)
        return 2

    started = time.perf_counter()
    load_at_start = round(os.getloadavg()[0], 2)
    if load_at_start > (os.cpu_count() or 1):
        print(
            f"warning: load average {load_at_start} exceeds the {os.cpu_count()} cores; "
            "absolute times will be inflated (ratios less so: runs are interleaved)",
            file=sys.stderr,
        )
    tmp = Path(tempfile.mkdtemp(prefix="ipam-bench-"))
    agent: ConsulAgent | None = None
    helper: Helper | None = None
    try:
        with interruptible():
            agent = ConsulAgent("bench").start()
            if not args.no_helper and HELPER.exists():
                helper = Helper(tmp)
                helper.start()
            b = Bench(args, agent, helper, tmp)
            if helper is None:
                b.notes.append(
                    "helper figures skipped: "
                    + ("--no-helper" if args.no_helper else f"{HELPER} is not installed")
                )
            b.log(
                f"Consul dev agent at {agent.url}; plugin {PLUGIN}; runs {args.runs}; "
                f"modes {', '.join(b.modes)}"
            )
            if args.only in ("all", "sizes"):
                b.make_pools()
                b.sequential()
            if args.only == "all":
                b.log("Consul requests per call (verbose flavour)")
                b.requests_uncontended()
                b.log("concurrency")
                b.concurrency()
            if args.only in ("all", "multihost"):
                b.log("many hosts bursting into one pool")
                b.multihost()
            if args.only == "all":
                b.log("memory and imports")
                b.memory()
                b.imports()
            if args.profile:
                b.profile()
            b.helper_log()
            rep = build_report(b, started, load_at_start)
    except KeyboardInterrupt:
        print("interrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        kill_live()
        if helper is not None:
            helper.stop()
        if agent is not None:
            agent.close()
        shutil.rmtree(tmp, ignore_errors=True)

    print("\n".join(render(rep)), flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rep, indent=2) + "\n")
    args.json.with_suffix(".md").write_text(markdown(rep))
    print(f"\nwrote {args.json} and {args.json.with_suffix('.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
