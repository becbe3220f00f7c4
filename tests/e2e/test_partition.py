"""Jepsen-style partition test: a real three-server Consul cluster in three network namespaces
(tests/support/netcluster.py), simulated hosts running the INSTALLED plugin as a runtime does, a
nemesis that partitions, kills and pauses the Raft leader, and a checker (tests/support/history.py)
over the recorded history and the KV tree read back from a healthy server after a quiet period.

Workload: HOSTS simulated hosts (`ipam.host`), WORKERS_PER_HOST workers each. A worker loops:
ADD a fresh container; sometimes CHECK it; keeps up to HOLD attachments and DELs the oldest
(with the ADD's result as prevResult, as a runtime does). When an ADD fails it runs DEL for that
container (cleanup, no prevResult). A DEL that fails is retried on the next turn. When the
workload stops, every worker DELs everything it holds. Two modes: `inprocess` (no helper: the
socket path does not exist) and `helper` (one `ipam-da-consul-helper` per simulated host).

Schedule, per mode: a short baseline, then for each fault: wait until the cluster is healthy,
apply the fault to the current leader, hold it, heal, stay quiet, next fault. Faults:
  isolate       all traffic in and out of the leader's eth0 dropped
  clients-only  the root namespace (clients) cannot reach the leader's HTTP port; servers can
  asym-in       the leader hears nothing from its peers (it still sends to them)
  asym-out      the leader's packets to its peers are dropped (it still hears them)
  kill          SIGKILL the leader, restart it (same data dir) at heal
  pause-4/15    SIGSTOP the leader for 4 s / 15 s, then SIGCONT
  no-quorum     the leader and one follower isolated: no majority until the heal (calls fail
                at their time budget: exercises the timeout cap and the cleanup path)

Short (default, CI): faults isolate, pause-15, no-quorum, each held 8 s (pause-15: 15 s) then
10 s quiet; about 3 min for both modes on 2 cores (cluster start included).
Long: IPAM_PARTITION_LONG=1 runs every fault, IPAM_PARTITION_ROUNDS (default 2) times, each
held IPAM_PARTITION_FAULT_SECONDS (default 30) then 15 s quiet: about 14 min per mode (with
ROUNDS=1 and FAULT_SECONDS=15: about 4.5 min per mode).
IPAM_PARTITION_FAULTS=a,b,... picks the faults, IPAM_PARTITION_SEED the seed,
IPAM_PARTITION_OVERHEAD (default 1) is the process overhead allowed on top of `timeout`.
IPAM_PARTITION_VERBOSE=0 runs the plain executable instead of the verbose flavour (which
writes a debug log per call: its first-to-last line span is the call's own time, printed as
"in-plugin" next to the wall time, which a busy machine stretches with interpreter start-up).
    .venv/bin/python -m pytest -s tests/e2e/test_partition.py          # short
    IPAM_PARTITION_LONG=1 .venv/bin/python -m pytest -s tests/e2e/test_partition.py   # long
or `bash scripts/partition.sh [--long]`.

Checker (after the quiet period, final KV read from a healthy server):
  1. no address held by two attachments at once, as far as the history shows: two successful
     ADDs returning the same address where each ADD returned before the other container's first
     DEL started; and never two keys with the same target+ifname (final tree, and every
     server's own committed state read twice a second during the run);
  2. a failed ADD whose cleanup DEL returned 0 leaves no key;
  3. a container whose DEL returned 0 has no key;
  4. at the very end (everything DELed) the pool folder is empty;
  and every call finished within its `timeout` + 1 s of process overhead, none hung.
The report: an availability table per fault (calls, failed, longest call, longest gap without a
successful call; calls are counted in the window where they started), the anomalies, the calls
over time (wall, CPU and in-plugin seconds), and for every key left at the end when Consul
applied it (bounds from the raft indexes the snapshots saw). Each mode's history (JSON), the
per-call logs and the servers' logs stay under pytest's basetemp.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

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
MAX_OPS_PER_WORKER = 5000  # a bound; the schedule ends the workload long before
TEARDOWN_SECONDS = 60  # the workers' final DELs (retried) stop starting after this
POOL_RANGES = [{"subnet": "10.77.0.0/24", "rangeStart": "10.77.0.10",
                "rangeEnd": "10.77.0.70", "gateway": "10.77.0.1"}]
PREFIX = "ipam/"


# -- running calls ------------------------------------------------------------------------------


def invoke(command: str, container: str, conf: dict[str, Any], env: dict[str, str],
           log: str = "") -> tuple[int, str, str, float, float, float]:
    """The installed plugin, as a runtime runs it; killed (rc -9) when it hangs. Returns rc,
    stdout, stderr, start, end and the CPU seconds the process used (to tell a call that waited
    from one starved of CPU on a busy machine)."""
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
    rc, cpu, deadline = -9, 0.0, began + HANG
    while True:
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
    return rc, out.decode(errors="replace"), err.decode(errors="replace"), began, ended, cpu


class Workload:
    def __init__(self, mode: str, urls: list[str], pool: str,
                 helper_env: dict[str, dict[str, str]], log_dir: Path | None = None) -> None:
        self.mode = mode
        self.log_dir = log_dir
        if log_dir:
            log_dir.mkdir(parents=True, exist_ok=True)
        self.urls = urls
        self.pool = pool
        self.helper_env = helper_env
        self.ops: list[Op] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def conf(self, h: int) -> dict[str, Any]:
        servers = self.urls[h % len(self.urls):] + self.urls[:h % len(self.urls)]
        return {"cniVersion": "1.0.0", "name": "partnet", "type": "bridge",
                "ipam": {"type": "ipam-da-consul", "consul_servers": servers,
                         "pools": [{"name": self.pool}], "host": f"host{h}",
                         "timeout": CALL_TIMEOUT, "consul_connect_timeout": 1,
                         "consul_read_timeout": 2}}

    def call(self, worker: str, h: int, kind: str, command: str, container: str,
             prev: dict[str, Any] | None = None) -> Op:
        conf = self.conf(h)
        if prev is not None:
            conf["prevResult"] = prev
        log = ""
        if self.log_dir:
            log = str(self.log_dir / f"{container}-{command}-{time.monotonic_ns()}.log")
        rc, out, err, began, ended, cpu = invoke(command, container, conf,
                                                 self.helper_env.get(f"host{h}", {}), log)
        op = Op(worker, f"host{h}", kind, command, container, began, ended, rc, out, err,
                cpu=cpu, log=log)
        with self.lock:
            self.ops.append(op)
        return op

    def work(self, h: int, w: int) -> None:
        rng = random.Random(f"{SEED}-{self.mode}-{h}-{w}")
        name = f"h{h}w{w}"
        holding: deque[tuple[str, dict[str, Any]]] = deque()
        pending: list[tuple[str, dict[str, Any] | None, str]] = []  # DELs to retry
        time.sleep(rng.uniform(0.0, 1.5))  # not every interpreter starting at the same moment

        def release(container: str, prev: dict[str, Any] | None, kind: str) -> bool:
            return self.call(name, h, kind, "DEL", container, prev).ok

        for k in range(MAX_OPS_PER_WORKER):
            if self.stop.is_set():
                break
            pending = [p for p in pending if not release(*p)]
            container = f"{self.mode}-{name}-{SEED}-{k}"
            add = self.call(name, h, "add", "ADD", container)
            if add.ok:
                prev = json.loads(add.stdout)
                holding.append((container, prev))
                if rng.random() < 0.3:
                    self.call(name, h, "check", "CHECK", container, prev)
                while len(holding) > HOLD:
                    c, p = holding.popleft()
                    if not release(c, p, "del"):
                        pending.append((c, p, "del"))
            elif not release(container, None, "cleanup"):
                pending.append((container, None, "cleanup"))
            time.sleep(rng.uniform(0.1, 0.5))
        # The runtime tears everything down; a DEL that fails is retried, boundedly (what is
        # still held after that shows up as NOT EMPTY).
        todo = [(c, p, "del") for c, p in holding] + pending
        give_up = time.monotonic() + TEARDOWN_SECONDS
        while todo and time.monotonic() < give_up:
            todo = [t for t in todo if time.monotonic() > give_up or not release(*t)]
            if todo:
                time.sleep(1)

    def start(self) -> None:
        for h in range(HOSTS):
            for w in range(WORKERS_PER_HOST):
                t = threading.Thread(target=self.work, args=(h, w), daemon=True)
                t.start()
                self.threads.append(t)

    def finish(self) -> None:
        self.stop.set()
        deadline = time.monotonic() + HANG + TEARDOWN_SECONDS + HANG + 10
        for t in self.threads:
            t.join(max(0.1, deadline - time.monotonic()))
        alive = [t for t in self.threads if t.is_alive()]
        assert not alive, f"{len(alive)} workers still running"


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


@pytest.fixture
def helpers(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, dict]]:
    if request.param != "helper":
        yield {}
        return
    started: list[Helper] = []
    try:
        for h in range(HOSTS):
            d = tmp_path / f"host{h}"
            d.mkdir()
            helper = Helper(d)
            started.append(helper)
            remember_process(helper.proc.pid)
        yield {f"host{h}": hp.env for h, hp in enumerate(started)}
    finally:
        for hp in started:
            hp.close()
            forget_process(hp.proc.pid)


# -- the tests ----------------------------------------------------------------------------------


@pytest.mark.cluster
@pytest.mark.parametrize("helpers", ["inprocess", "helper"], indirect=True)
def test_partition(netcluster: NetCluster, helpers: dict[str, dict[str, str]],
                   request: pytest.FixtureRequest, tmp_path: Path) -> None:
    mode = request.node.callspec.params["helpers"]
    netcluster.wait_healthy(90)
    pool = netcluster.create_pool(f"part-{mode}-{SEED}-{time.monotonic_ns()}", POOL_RANGES)
    folder = f"{PREFIX}{pool}/"
    nemesis = Nemesis(netcluster)
    work = Workload(mode, netcluster.urls, pool, helpers,
                    tmp_path / "logs" if VERBOSE else None)
    snaps = Snapshots(netcluster, folder)
    phases: list[Phase] = []
    load_before = f"{os.getloadavg()[0]:.1f}"
    t0 = time.monotonic()
    work.start()
    try:
        time.sleep(BASELINE_SECONDS)
        phases.append(Phase("baseline", "-", t0, time.monotonic(), time.monotonic()))
        for fault in FAULTS:
            netcluster.wait_healthy(90)
            began = time.monotonic()
            target = nemesis.apply(fault)
            time.sleep(Nemesis.duration(fault, FAULT_SECONDS))
            during = leaders_seen(netcluster, exclude=target)
            nemesis.heal()
            healed = time.monotonic()
            time.sleep(QUIET_SECONDS)
            phases.append(Phase(fault, target.name, began, healed, time.monotonic(), during))
    finally:
        nemesis.heal()
        work.finish()
        snaps.close()
    netcluster.wait_healthy(90)
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
        "ops": [vars(o) for o in ops],
        "final": {k: v.decode(errors="replace") for k, v in final.items()}}, indent=1))
    report = [f"\n=== partition [{mode}] seed {SEED}, faults {FAULTS}, "
              f"{time.monotonic() - t0:.0f}s, {len(ops)} calls {dict(sorted(counts.items()))}, "
              f"load {load_before} -> {os.getloadavg()[0]:.1f}; history {history}",
              table(rows),
              f"anomalies ({len(anomalies)}):", *[f"  - {a}" for a in anomalies],
              f"calls over timeout {CALL_TIMEOUT:g}s + {OVERHEAD:g}s ({len(late)}):",
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
