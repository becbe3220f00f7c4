"""Jepsen-style partition test: a real three-server Consul cluster in three network namespaces
(tests/support/netcluster.py), simulated hosts running the INSTALLED plugin as a runtime does, a
nemesis that partitions, kills and pauses the Raft leader and moves the hosts' wall clocks, and a
checker (tests/support/history.py) over the recorded history and the KV tree read back from a
healthy server after a quiet period.

Workload: HOSTS simulated hosts (`ipam.host`), WORKERS_PER_HOST workers each, every host with its
own state folder (IPAM_DA_CONSUL_STATE_DIR). A worker loops: ADD a fresh container; sometimes
CHECK it; keeps up to HOLD attachments and stops the oldest, X, with DEL (the ADD's result as
prevResult, as a runtime does). A DEL that fails is retried on the next turn.
- Take-overs (TAKE_OVER, the Nomad reschedule pattern): stopping X, the worker starts at the
  same moment, in two threads, X's DEL and the ADD of a new container Y whose Pool object asks
  for X's address (`"requested_ip"`: a Pool's own requested IP re-allocates even a held
  address). In TAKE_OVER_FAILS of them Y's network lists a second, missing pool after it: Y
  takes the address over, then fails (114) and rolls back, which must not resurrect X if X's
  DEL returned 0 meanwhile.
- Skipped cleanups (SKIP_CLEANUP): after a failed ADD the worker runs no DEL for it at all, as
  dockershim, CRI-O after a reboot and kubelet's double ADD do; otherwise it runs the cleanup
  DEL (no prevResult).
When the workload stops, every worker DELs everything it holds; then the hosts settle: the
helpers (or, in-process, each host's next call, a DEL of a container never added) finish what
their state folders still owe, and the run waits for that (SETTLE_SECONDS at most).
Two modes: `inprocess` (no helper: the socket path does not exist) and `helper` (one
`ipam-da-consul-helper` per simulated host).

Clock nemesis (tests/support/clocks.py; as Jepsen's bump and strobe): per host, the plugin's
processes and its helper run under Debian's libfaketime with FAKETIME_DONT_FAKE_MONOTONIC=1
(CLOCK_MONOTONIC and CLOCK_BOOTTIME, which the deadlines and fence sessions use, are left alone:
checked before the run) and a per-host offset file re-read every second. Before the workload:
host0 +2 h, host1 +90 min, host2 45 min behind, host3 on time (bump). During the run, at fault
1, 3, 5, ...: host0 steps back 3 h (+2 h -> -1 h: NTP correcting a boot-time clock), or forward
again; during fault 2, 4, ...: host1 strobes between +90 min and -90 min every 2 s. The report
lists which offsets were applied when. Without libfaketime (or a C compiler for the sleep shim
libfaketime 0.9.10 needs under Python 3.11) the run goes on without clocks and says so.

Schedule, per mode: a short baseline, then for each fault: wait until the cluster is healthy,
apply the fault to the current leader, hold it, heal, stay quiet, next fault. Faults:
  isolate       all traffic in and out of the leader's eth0 dropped
  clients-only  the root namespace (clients) cannot reach the leader's HTTP port; servers can
  asym-in       the leader hears nothing from its peers (it still sends to them)
  asym-out      the leader's packets to its peers are dropped (it still hears them)
  kill          SIGKILL the leader, restart it (same data dir) at heal
  pause-4/15    SIGSTOP the leader for 4 s / 15 s, then SIGCONT
  no-quorum     the leader and one follower isolated: no majority until the heal (calls fail
                at their time budget: exercises the timeout cap, the cleanup path, DELs the
                helper takes over and writes in doubt voided later)

Short (default, CI): faults isolate, pause-15, no-quorum, each held 8 s (pause-15: 15 s) then
10 s quiet; one clock step and one strobe per mode; about 3 min for both modes on 2 busy
cores (cluster start included; ~900 calls through the helpers, ~250 in-process).
Long: IPAM_PARTITION_LONG=1 runs every fault, IPAM_PARTITION_ROUNDS (default 2) times, each
held IPAM_PARTITION_FAULT_SECONDS (default 30) then 15 s quiet: about 11 min per mode (22 min
for both), with 8 clock steps and 7 strobes per mode, ~8,400 calls through the helpers and
~2,400 in-process (with ROUNDS=1 and FAULT_SECONDS=15: about 5 min per mode).
IPAM_PARTITION_FAULTS=a,b,... picks the faults, IPAM_PARTITION_SEED the seed,
IPAM_PARTITION_OVERHEAD (default 0.5) is what a call may take on top of `timeout` (which the
plugin counts from its process's start), IPAM_PARTITION_CLOCKS=0 turns the clock nemesis off.
IPAM_PARTITION_VERBOSE=0 runs the plain executable instead of the verbose flavour (which
writes a debug log per call: its first-to-last line span is the call's own time, printed as
"in-plugin" next to the wall time, which a busy machine stretches with interpreter start-up).
    .venv/bin/python -m pytest -s tests/e2e/test_partition.py          # short
    IPAM_PARTITION_LONG=1 .venv/bin/python -m pytest -s tests/e2e/test_partition.py   # long
or `bash scripts/partition.sh [--long]`.

Checker (after the settle and a quiet period, final KV read from a healthy server):
  1. no address handed out while the runtime's DEL of its previous holder has not yet
     succeeded: an attachment holds its address from its ADD's return until its first DEL
     that returned 0 (a DEL that failed ends nothing; the one that succeeded released the
     address somewhere within its call, so the hold is certain up to that call's start), or
     until an ADD that says it took the address over started; two holds of one address never
     overlap, but for a take-over (Y holding X's address before X's DEL returned 0 is the
     re-allocation Y's Pool asks for); and never two keys with the same target+ifname (final
     tree, and every server's own committed state read twice a second during the run);
  2. a failed ADD whose cleanup DEL returned 0 leaves no key;
  3. a container whose DEL returned 0 has no key (a take-over's rollback resurrecting it
     would leave one);
  4. a failed ADD whose cleanup was skipped leaves no key (NOT VOIDED);
  5. at the very end (everything DELed) the pool folder is empty;
  and every call finished within its `timeout` + 0.5 s, from process start to exit, none hung.
The report: the clock offsets applied and when, an availability table per fault (calls,
failed, longest call, longest gap without a successful call; calls are counted in the window
where they started; take-overs made to fail on the missing pool are not counted as failed),
what the take-overs came to, the writes failed ADDs left in doubt and who voided them, what
the state folders owed over the run and at the end of the workload, the anomalies, the calls
over time (wall, CPU and in-plugin seconds), and for every key left at the end when Consul
applied it (bounds from the raft indexes the snapshots saw). Each mode's history (JSON), the
per-call logs, the helpers' logs and the servers' logs stay under pytest's basetemp (pytest
keeps a user's last three; `--basetemp DIR` keeps a run's for good).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import subprocess
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.clocks import Clocks, Kit, prepare
from tests.support.history import (
    CALL_TIMEOUT,
    HANG,
    OVERHEAD,
    Op,
    Phase,
    availability,
    check_history,
    duplicate_targets,
    overruns,
    parse_tree,
    table,
    take_overs,
)
from tests.support.netcluster import (
    Nemesis,
    NetCluster,
    decode,
    forget_process,
    remember_process,
    unsupported_reason,
)
from tests.support.plugin import executable
from tests.support.util_procs import Call, Helper, environment

LONG = os.environ.get("IPAM_PARTITION_LONG") == "1"
# The verbose flavour, one debug log per call (its first-to-last line span is the call's own
# time, without interpreter start-up that a busy machine stretches; and the requests it sent).
# On by default: IPAM_PARTITION_VERBOSE=0 turns it off.
VERBOSE = os.environ.get("IPAM_PARTITION_VERBOSE", "1") == "1"
CLOCKS = os.environ.get("IPAM_PARTITION_CLOCKS", "1") == "1"
SEED = int(os.environ.get("IPAM_PARTITION_SEED", "7"))
SHORT_FAULTS = ["isolate", "pause-15", "no-quorum"]
FAULTS = [f for f in os.environ.get("IPAM_PARTITION_FAULTS", "").split(",") if f] or (
    list(Nemesis.FAULTS) * int(os.environ.get("IPAM_PARTITION_ROUNDS", "2"))
    if LONG else SHORT_FAULTS)
FAULT_SECONDS = float(os.environ.get("IPAM_PARTITION_FAULT_SECONDS", "30" if LONG else "8"))
QUIET_SECONDS = 15.0 if LONG else 10.0
BASELINE_SECONDS = 4.0
HOSTS = 4
WORKERS_PER_HOST = 2
HOLD = 2  # attachments a worker keeps before DELing its oldest
TAKE_OVER = 0.3  # of the stops: a take-over of the stopped container's address
TAKE_OVER_FAILS = 0.5  # of the take-overs: the taker's network lists a missing pool after it
SKIP_CLEANUP = 0.5  # of the failed ADDs: no DEL at all
MAX_OPS_PER_WORKER = 5000  # a bound; the schedule ends the workload long before
TEARDOWN_SECONDS = 60  # the workers' final DELs (retried) stop starting after this
# The helpers' replay backs off to 60 s per entry: what a fault left must be finished by then.
SETTLE_SECONDS = 90
POOL_RANGES = [{"subnet": "10.77.0.0/24", "rangeStart": "10.77.0.10",
                "rangeEnd": "10.77.0.70", "gateway": "10.77.0.1"}]
PREFIX = "ipam/"
HOUR = 3600.0
# Before the workload (bump): hours ahead, one behind, one on time.
BUMP = {"host0": 2 * HOUR, "host1": 1.5 * HOUR, "host2": -0.75 * HOUR, "host3": 0.0}
STEPPED = -1 * HOUR  # host0's clock after its step back (3 h)
STROBE = (1.5 * HOUR, -1.5 * HOUR, 2.0)  # host1: between these, every that many seconds


# -- running calls ------------------------------------------------------------------------------


def invoke(command: str, container: str, conf: dict[str, Any], env: dict[str, str],
           log: str = "") -> tuple[int, str, str, float, float, float, float, float]:
    """The installed plugin, as a runtime runs it; killed (rc -9) when it hangs. Returns rc,
    stdout, stderr, start, end, the CPU seconds the process used, the seconds it spent
    runnable but waiting for a CPU, and when its stdin was written (to tell a call that waited
    on Consul from one starved of CPU, or fed late, on a busy machine)."""
    proc_env = environment(Call(command, container, conf, env=env, log_file=log or None))
    began = time.monotonic()
    exe = executable("ipam-da-consul-verbose" if log else "ipam-da-consul")
    proc = subprocess.Popen([exe], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=proc_env)
    chunks: dict[str, bytes] = {}

    def drain(name: str, stream: Any) -> None:
        chunks[name] = stream.read()

    readers = [threading.Thread(target=drain, args=(n, s), daemon=True)
               for n, s in (("out", proc.stdout), ("err", proc.stderr))]
    for r in readers:
        r.start()
    with contextlib.suppress(BrokenPipeError):
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(conf).encode())
        proc.stdin.close()
    # The plugin's clock runs from its start, and it reads stdin first: a harness slow to feed
    # it (its own threads starved on a busy machine) spends the call's budget.
    fed = time.monotonic() - began
    rc, cpu, runq, deadline = -9, 0.0, 0.0, began + HANG
    while True:
        # The scheduler's count of the time the child was runnable but not running (the second
        # field of schedstat, in ns), read until it is reaped; at most one poll stale.
        with contextlib.suppress(OSError, ValueError, IndexError), \
                open(f"/proc/{proc.pid}/schedstat") as fh:
            runq = int(fh.read().split()[1]) / 1e9
        # wait4 instead of Popen.wait: the child's own rusage (CPU time) comes with it.
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            ended = time.monotonic()
            rc = os.waitstatus_to_exitcode(status)
            proc.returncode = rc
            cpu = usage.ru_utime + usage.ru_stime
            break
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            ended = time.monotonic()
            break
        time.sleep(0.01)
    for r in readers:
        r.join(10)
    out, err = chunks.get("out", b""), chunks.get("err", b"")
    return (rc, out.decode(errors="replace"), err.decode(errors="replace"), began, ended, cpu,
            runq, fed)


@dataclass
class Attached:
    """A container a worker holds (or still has to DEL): the network's pools as its ADD saw
    them, which its DEL and CHECK are given again, and the ADD's result."""

    container: str
    pools: list[dict[str, Any]]
    prev: dict[str, Any] | None = None
    kind: str = "del"  # del | cleanup: how its DEL is recorded

    @property
    def address(self) -> str | None:
        try:
            return str(self.prev["ips"][0]["address"]).split("/")[0] if self.prev else None
        except (KeyError, IndexError, TypeError):
            return None


class Workload:
    def __init__(self, mode: str, urls: list[str], pool: str,
                 host_env: dict[str, dict[str, str]], log_dir: Path | None = None) -> None:
        self.mode = mode
        self.log_dir = log_dir
        if log_dir:
            log_dir.mkdir(parents=True, exist_ok=True)
        self.urls = urls
        self.pool = pool
        self.host_env = host_env
        self.ops: list[Op] = []
        self.skipped: list[str] = []  # failed ADDs whose cleanup DEL was never run
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def conf(self, h: int, pools: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        servers = self.urls[h % len(self.urls):] + self.urls[:h % len(self.urls)]
        return {"cniVersion": "1.0.0", "name": "partnet", "type": "bridge",
                "ipam": {"type": "ipam-da-consul", "consul_servers": servers,
                         "pools": pools or [{"name": self.pool}], "host": f"host{h}",
                         "timeout": CALL_TIMEOUT, "consul_connect_timeout": 1,
                         "consul_read_timeout": 2}}

    def call(self, worker: str, h: int, kind: str, command: str, container: str,
             prev: dict[str, Any] | None = None, pools: list[dict[str, Any]] | None = None,
             takes_from: str = "", doomed: bool = False) -> Op:
        conf = self.conf(h, pools)
        if prev is not None:
            conf["prevResult"] = prev
        log = ""
        if self.log_dir:
            log = str(self.log_dir / f"{container}-{command}-{time.monotonic_ns()}.log")
        rc, out, err, began, ended, cpu, runq, fed = invoke(
            command, container, conf, self.host_env.get(f"host{h}", {}), log)
        op = Op(worker, f"host{h}", kind, command, container, began, ended, rc, out, err,
                cpu=cpu, runq=runq, fed=fed, log=log, takes_from=takes_from, doomed=doomed)
        with self.lock:
            self.ops.append(op)
        return op

    def work(self, h: int, w: int) -> None:
        rng = random.Random(f"{SEED}-{self.mode}-{h}-{w}")
        name = f"h{h}w{w}"
        holding: deque[Attached] = deque()
        pending: list[Attached] = []  # DELs to retry
        takers = itertools.count()
        time.sleep(rng.uniform(0.0, 1.5))  # not every interpreter starting at the same moment

        def release(a: Attached) -> bool:
            return self.call(name, h, a.kind, "DEL", a.container, a.prev, a.pools).ok

        def failed_add(a: Attached) -> None:
            if rng.random() < SKIP_CLEANUP:
                with self.lock:
                    self.skipped.append(a.container)
                return
            a.kind = "cleanup"
            if not release(a):
                pending.append(a)

        def added(a: Attached, op: Op) -> None:
            if op.ok:
                a.prev = json.loads(op.stdout)
                holding.append(a)
                if rng.random() < 0.3:
                    self.call(name, h, "check", "CHECK", a.container, a.prev, a.pools)
            else:
                failed_add(a)

        for k in range(MAX_OPS_PER_WORKER):
            if self.stop.is_set():
                break
            pending = [p for p in pending if not release(p)]
            fresh = Attached(f"{self.mode}-{name}-{SEED}-{k}", [{"name": self.pool}])
            added(fresh, self.call(name, h, "add", "ADD", fresh.container, pools=fresh.pools))
            while len(holding) > HOLD:
                old = holding.popleft()
                if old.address is None or rng.random() >= TAKE_OVER:
                    if not release(old):
                        pending.append(old)
                    continue
                pools: list[dict[str, Any]] = [{"name": self.pool, "requested_ip": old.address}]
                if rng.random() < TAKE_OVER_FAILS:
                    pools.append({"name": f"missing-{self.pool}"})
                # A turn may stop several (a taker counts as held): every container its own ID.
                taker = Attached(f"{self.mode}-{name}-{SEED}-{k}-takes{next(takers)}", pools)
                stopped, taking = self.take_over(name, h, old, taker)
                if not stopped.ok:
                    pending.append(old)
                added(taker, taking)
            time.sleep(rng.uniform(0.1, 0.5))
        # The runtime tears everything down; a DEL that fails is retried, boundedly (what is
        # still held after that shows up as NOT EMPTY).
        todo = [*holding, *pending]
        give_up = time.monotonic() + TEARDOWN_SECONDS
        while todo and time.monotonic() < give_up:
            todo = [t for t in todo if time.monotonic() > give_up or not release(t)]
            if todo:
                time.sleep(1)

    def take_over(self, worker: str, h: int, old: Attached, taker: Attached) -> tuple[Op, Op]:
        """`old`'s DEL and `taker`'s ADD (whose Pool asks for old's address), started at the same
        moment: a scheduler rescheduling a job with a static address."""
        ops: dict[str, Op] = {}

        def stop() -> None:
            ops["del"] = self.call(worker, h, old.kind, "DEL", old.container, old.prev, old.pools)

        def take() -> None:
            ops["add"] = self.call(worker, h, "takeover", "ADD", taker.container,
                                   pools=taker.pools, takes_from=old.container,
                                   doomed=len(taker.pools) > 1)

        both = [threading.Thread(target=stop), threading.Thread(target=take)]
        for t in both:
            t.start()
        for t in both:
            t.join()
        return ops["del"], ops["add"]

    def start(self) -> None:
        for h in range(HOSTS):
            for w in range(WORKERS_PER_HOST):
                t = threading.Thread(target=self.work, args=(h, w), daemon=True)
                t.start()
                self.threads.append(t)

    def finish(self) -> None:
        self.stop.set()
        # A take-over runs two calls at once; a worker's turn is at most that, its retries of
        # pending DELs, and the teardown.
        deadline = time.monotonic() + 3 * HANG + TEARDOWN_SECONDS + HANG + 10
        for t in self.threads:
            t.join(max(0.1, deadline - time.monotonic()))
        alive = [t for t in self.threads if t.is_alive()]
        assert not alive, f"{len(alive)} workers still running"

    def settle(self, state_dirs: dict[str, Path], helped: bool) -> tuple[dict[str, int], float]:
        """What the hosts' state folders still owe once the workload is over (a DEL taken over,
        a write in doubt of a failed ADD nobody cleaned up), and how long finishing it took:
        the helper does it by itself; without one, the host's next call does (here a DEL of a
        container never added, as runtimes send after a restart)."""
        at_end = {h: len(owed(d)) for h, d in state_dirs.items()}
        began = time.monotonic()
        n = 0
        while time.monotonic() < began + SETTLE_SECONDS:
            left = [h for h, d in state_dirs.items() if owed(d)]
            if not left:
                break
            if not helped:
                for host in left:
                    n += 1
                    self.call("settle", int(host[4:]), "next", "DEL",
                              f"{self.mode}-{host}-next-{n}")
            time.sleep(1)
        return at_end, time.monotonic() - began


def pending_entries(state_dir: Path) -> list[str]:
    """Entries of a host's state folder with work left (cni/state.py), calls in flight
    included (a write is recorded before it is sent)."""
    with contextlib.suppress(OSError):
        return os.listdir(state_dir / "pending")
    return []


def owed(state_dir: Path) -> list[str]:
    """Entries that owe work no call in flight will do: a DEL taken over, a write in doubt.
    Read without the entry's lock (a partial line is skipped), so as not to hold up a call."""
    out = []
    for name in pending_entries(state_dir):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            line = (state_dir / "attachments" / f"{name}.json").read_bytes().split(b"\n", 1)[0]
            entry = json.loads(line)
            if entry.get("deleting") or any(c.get("state") == "doubt"
                                            for c in entry.get("claims") or []):
                out.append(f"{entry.get('container')}{' (DEL)' if entry.get('deleting') else ''}")
    return out


class PendingWatch:
    """What the hosts' state folders owe over the run (a DEL the helper took over, a write in
    doubt of a failed ADD; see `owed`), sampled four times a second: the peak per host and when
    each host last finished its last one."""

    def __init__(self, dirs: dict[str, Path]) -> None:
        self.dirs = dirs
        self.peak = {h: 0 for h in dirs}
        self.cleared: dict[str, float] = {}
        self.now = {h: 0 for h in dirs}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.wait(0.25):
            for h, d in self.dirs.items():
                n = len(owed(d))
                if n == 0 and self.now[h]:
                    self.cleared[h] = time.monotonic()
                self.now[h] = n
                self.peak[h] = max(self.peak[h], n)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)

    def report(self, t0: float) -> str:
        done = ", ".join(f"{h} at {at - t0:.1f}s" for h, at in sorted(self.cleared.items()))
        return f"peak {self.peak}, last finished: {done or 'none was ever pending'}"


def doubts(ops: list[Op], skipped: list[str], state_dirs: dict[str, Path]) -> str:
    """Failed ADDs that could not undo a write (kept in the state folder, voided later), how
    many of them no runtime DEL followed, and who voided what later (a helper, in its log
    next to its state folder, or another call of the host, on its stderr); DELs the helper
    took over."""
    said = "voided the writes in doubt of"
    left = [o for o in ops if o.command == "ADD" and not o.ok and "could not undo" in o.stderr]
    taken = sum(1 for o in ops if o.command == "DEL" and "the helper finishes this DEL" in o.stderr)
    by_calls = sum(o.stderr.count(said) for o in ops)
    by_helpers = 0
    for d in state_dirs.values():
        with contextlib.suppress(OSError):
            by_helpers += (d.parent / "helper.log").read_text(errors="replace").count(said)
    return (f"failed ADDs that left a write in doubt: {len(left)} (cleanup DEL skipped for "
            f"{sum(1 for o in left if o.container in skipped)}); voids done later by helpers "
            f"{by_helpers}, by other calls {by_calls}; DELs taken over by the helper: {taken}")


class Snapshots:
    """Every server's own committed state (stale reads), twice a second, best effort: two keys
    with the same target+ifname in any of them is a duplicate; the (time, raft index) marks
    date the keys left at the end (when their write was applied)."""

    def __init__(self, cluster: NetCluster, folder: str) -> None:
        self.cluster = cluster
        self.folder = folder
        self.taken: list[tuple[float, dict[str, bytes]]] = []
        self.marks: list[tuple[float, int]] = []  # (monotonic, highest raft index seen)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.wait(0.5):
            for s in self.cluster.servers:
                if not s.alive() or s.paused or self.stop.is_set():
                    continue
                with contextlib.suppress(Exception):
                    index, tree = self.cluster.stale_read(s, self.folder)
                    self.marks.append((time.monotonic(), index))
                    if duplicate_targets(parse_tree(tree, self.folder)):
                        self.taken.append((time.monotonic(), tree))

    def landed(self, index: int) -> tuple[float | None, float | None]:
        """Bounds on when raft index `index` was applied: the last read that had not seen it
        (no server yet had it) and the first read that had."""
        after = min((t for t, i in self.marks if i >= index), default=None)
        # A lagging server (e.g. one catching up after a restart) reports an old index late:
        # only the highest index seen so far says "not applied yet".
        before, highest = None, 0
        for t, i in sorted(self.marks):
            highest = max(highest, i)
            if highest < index and (after is None or t < after):
                before = t
        return before, after

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def netcluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetCluster]:
    reason = unsupported_reason()
    if reason:
        pytest.skip(reason)
    cluster = NetCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        # The servers' own logs outlive the cluster, next to the histories.
        cluster.close(keep_logs=tmp_path_factory.mktemp("consul-logs"))


@pytest.fixture(scope="module")
def faketime(tmp_path_factory: pytest.TempPathFactory) -> Kit | str:
    """libfaketime and its sleep shim, checked on this machine; or why there are no clocks."""
    if not CLOCKS:
        return "IPAM_PARTITION_CLOCKS=0"
    return prepare(tmp_path_factory.mktemp("faketime"))


@pytest.fixture
def clocks(faketime: Kit | str, tmp_path: Path) -> Iterator[Clocks]:
    """The hosts' clocks, bumped before any of their processes starts (a host that booted with
    a wrong clock)."""
    c = Clocks(faketime if isinstance(faketime, Kit) else None, tmp_path / "clocks",
               [f"host{h}" for h in range(HOSTS)])
    c.set(BUMP, "bump: hours ahead, one behind, one on time")
    yield c
    c.close()


@dataclass
class Hosts:
    env: dict[str, dict[str, str]]  # per host: what its calls run with
    state_dirs: dict[str, Path]
    helped: bool


@pytest.fixture
def hosts(request: pytest.FixtureRequest, tmp_path: Path, clocks: Clocks) -> Iterator[Hosts]:
    """Each simulated host: its own state folder, its clock, and in `helper` mode its helper
    (which runs under that clock too)."""
    names = [f"host{h}" for h in range(HOSTS)]
    if request.param != "helper":
        dirs = {h: tmp_path / h / "state" for h in names}
        for d in dirs.values():
            d.parent.mkdir()  # the plugin makes the state folder, not the folders above it
        yield Hosts({h: {"IPAM_DA_CONSUL_STATE_DIR": str(dirs[h]), **clocks.env(h)}
                     for h in names}, dirs, False)
        return
    started: dict[str, Helper] = {}
    try:
        for h in names:
            d = tmp_path / h
            d.mkdir()
            helper = Helper(d, stderr=d / "helper.log", env={**os.environ, **clocks.env(h)})
            started[h] = helper
            remember_process(helper.proc.pid)
        yield Hosts({h: {**hp.env, **clocks.env(h)} for h, hp in started.items()},
                    {h: Path(hp.state_dir) for h, hp in started.items()}, True)
    finally:
        for hp in started.values():
            hp.close()
            forget_process(hp.proc.pid)


# -- the tests ----------------------------------------------------------------------------------


def clock_event(clocks: Clocks, i: int, seconds: float) -> None:
    """The clock nemesis's move at the start of fault number i (from 1): odd, host0 steps back
    3 h (or forward again); even, host1 strobes for the fault's length."""
    if i % 2 == 1:
        back = clocks.offsets["host0"] != STEPPED
        clocks.set({"host0": STEPPED if back else BUMP["host0"]},
                   "step back 3h: NTP corrects a boot-time clock" if back else "step forward 3h")
    else:
        a, b, every = STROBE
        clocks.strobe("host1", a, b, every, seconds)


@pytest.mark.cluster
@pytest.mark.parametrize("hosts", ["inprocess", "helper"], indirect=True)
def test_partition(netcluster: NetCluster, hosts: Hosts, clocks: Clocks, faketime: Kit | str,
                   request: pytest.FixtureRequest, tmp_path: Path) -> None:
    mode = request.node.callspec.params["hosts"]
    netcluster.wait_healthy(90)
    pool = netcluster.create_pool(f"part-{mode}-{SEED}-{time.monotonic_ns()}", POOL_RANGES)
    folder = f"{PREFIX}{pool}/"
    nemesis = Nemesis(netcluster)
    work = Workload(mode, netcluster.urls, pool, hosts.env,
                    tmp_path / "logs" if VERBOSE else None)
    snaps = Snapshots(netcluster, folder)
    watch = PendingWatch(hosts.state_dirs)
    phases: list[Phase] = []
    load_before = f"{os.getloadavg()[0]:.1f}"
    t0 = time.monotonic()
    work.start()
    try:
        time.sleep(BASELINE_SECONDS)
        phases.append(Phase("baseline", "-", t0, time.monotonic(), time.monotonic()))
        for i, fault in enumerate(FAULTS):
            netcluster.wait_healthy(90)
            began = time.monotonic()
            target = nemesis.apply(fault)
            held = Nemesis.duration(fault, FAULT_SECONDS)
            if i:
                clock_event(clocks, i, held)
            time.sleep(held)
            during = leaders_seen(netcluster, exclude=target)
            nemesis.heal()
            healed = time.monotonic()
            time.sleep(QUIET_SECONDS)
            phases.append(Phase(fault, target.name, began, healed, time.monotonic(), during))
    finally:
        nemesis.heal()
        work.finish()
    netcluster.wait_healthy(90)
    at_end, settled = work.settle(hosts.state_dirs, hosts.helped)
    left = {h: owed(d) for h, d in hosts.state_dirs.items() if owed(d)}
    snaps.close()
    watch.close()
    time.sleep(2)  # let any write still in flight inside Consul land before the final read
    entries = netcluster.kv_entries(folder)
    final = {e["Key"]: decode(e) for e in entries}
    ops = sorted(work.ops, key=lambda o: o.start)

    anomalies = check_history(ops, final, folder, snaps.taken, t0)
    late = overruns(ops)
    rows = availability(ops, phases)
    counts: dict[str, int] = {}
    for o in ops:
        key = f"{o.kind}:{o.rc}"
        counts[key] = counts.get(key, 0) + 1
    history = tmp_path / f"history-{mode}.json"
    history.write_text(json.dumps({
        "t0": t0, "phases": [vars(p) for p in phases],
        "ops": [vars(o) for o in ops], "skipped_cleanups": work.skipped,
        "clocks": [(at - t0, what) for at, what in clocks.events],
        "final": {k: v.decode(errors="replace") for k, v in final.items()}}, indent=1))
    longest = max(ops, key=lambda o: o.elapsed)
    no_clocks = faketime if isinstance(faketime, str) else None
    report = [f"\n=== partition [{mode}] seed {SEED}, faults {FAULTS}, "
              f"clocks {'OFF: ' + no_clocks if no_clocks else 'on'}, "
              f"{time.monotonic() - t0:.0f}s, {len(ops)} calls {dict(sorted(counts.items()))}, "
              f"load {load_before} -> {os.getloadavg()[0]:.1f}; history {history}",
              *clocks.report(t0, no_clocks),
              table(rows),
              f"take-overs: {take_overs(ops)}",
              f"failed ADDs whose cleanup DEL was skipped: {len(work.skipped)}; "
              + doubts(ops, work.skipped, hosts.state_dirs),
              f"state folders' entries with work left: {watch.report(t0)}; at the end of the "
              f"workload {at_end}, settled in {settled:.1f}s"
              f"{f', still pending {left}' if left else ''}",
              f"longest call {longest.elapsed:.2f}s (gate {CALL_TIMEOUT:g}s + {OVERHEAD:g}s): "
              f"{longest.brief(t0)}",
              f"anomalies ({len(anomalies)}):", *[f"  - {a}" for a in anomalies],
              f"calls over timeout {CALL_TIMEOUT:g}s + {OVERHEAD:g}s ({len(late)}; within it but "
              f"for the time they waited for a CPU: "
              f"{sum(1 for o in late if o.elapsed - o.runq <= o.timeout + OVERHEAD)}):",
              *[f"  - {phase_of(o, phases)}: {o.brief(t0)}" for o in late[:15]]]
    for e in entries:
        if e["Key"] != folder:
            lo, hi = snaps.landed(int(e["CreateIndex"]))
            report.append(f"  key {e['Key'][len(folder):]} (CreateIndex {e['CreateIndex']}) "
                          f"applied between {fmt(lo, t0)} and {fmt(hi, t0)}")
    print("\n".join(report))
    # The test must have tested something: calls in every window, successes overall.
    assert sum(1 for o in ops if o.command == "ADD" and o.ok) >= 10, counts
    assert all(r["calls"] > 0 for r in rows), rows
    problems = anomalies + [f"over timeout: {o.brief(t0)}" for o in late]
    assert not problems, "\n".join(problems[:40])


def leaders_seen(cluster: NetCluster, exclude: Any) -> str:
    """The leader(s) the servers other than the target report, e.g. "s3" or "s1/s3"."""
    names = {s.raft_addr: s.name for s in cluster.servers}
    seen = {cluster.leader_of(s) for s in cluster.servers if s is not exclude}
    return "/".join(sorted(names.get(a, "none") for a in seen))


def fmt(t: float | None, t0: float) -> str:
    return "?" if t is None else f"{t - t0:.2f}s"


def phase_of(op: Op, phases: list[Phase]) -> str:
    return next((p.name for p in phases if p.start <= op.start < p.end), "between")


@pytest.mark.cluster
def test_checker_sees_a_planted_key_in_the_cluster(netcluster: NetCluster) -> None:
    """End to end: real ADD and DEL through the plugin, then a key planted behind the plugin's
    back (as a late write would land) is reported from the real KV read."""
    netcluster.wait_healthy(90)
    pool = netcluster.create_pool(f"plant-{time.monotonic_ns()}", POOL_RANGES)
    folder = f"{PREFIX}{pool}/"
    work = Workload("plant", netcluster.urls, pool, {})
    add = work.call("w", 0, "add", "ADD", "planted-1")
    assert add.ok, add
    assert work.call("w", 0, "del", "DEL", "planted-1", json.loads(add.stdout)).ok
    assert check_history(work.ops, netcluster.kv_tree(folder), folder) == []
    netcluster.put(f"{folder}10.77.0.66", json.dumps({"target": "planted-1", "ifname": "eth0"}))
    found = check_history(work.ops, netcluster.kv_tree(folder), folder)
    assert len(found) == 1 and found[0].startswith("LEAK after DEL: key ['10.77.0.66']"), found
