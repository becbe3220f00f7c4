"""A real three-server Consul cluster on loopback: the leader dies during a stream of ADDs and
DELs, and servers that are dead, leaderless or hung are listed first.

The promise: every call either succeeded with its key in KV or failed with a clear error and
left nothing behind; after the election the pool invariant holds."""

from __future__ import annotations

import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from tests.support.agent import ConsulAgent, ConsulCluster, free_ports
from tests.support.plugin import netconf, run_plugin
from tests.support.util_procs import (
    Call,
    Done,
    LossyProxy,
    Unresponsive,
    drop_first,
    run_many,
    run_one,
)

pytestmark = pytest.mark.cluster

RANGES = [{"subnet": "10.4.0.0/24", "rangeStart": "10.4.0.10", "rangeEnd": "10.4.0.250",
           "gateway": "10.4.0.1"}]
# Failures a runtime can act on (retry later): no server (11), the time budget spent on
# writes (125), an HTTP-level failure (111).
CLEAR_ERRORS = {11, 111, 125}
WORKERS = 6
_pools = iter(range(10**6))


@pytest.fixture(scope="module")
def cluster() -> Iterator[ConsulCluster]:
    c = ConsulCluster().start()
    try:
        # A restarted server votes again once autopilot deems it stable (10 s by default);
        # 1 s keeps the second leader-stop test from waiting on that.
        agent = live(c)
        r = agent.http.put(
            f"{agent.url}/v1/operator/autopilot/configuration",
            json={"CleanupDeadServers": False, "ServerStabilizationTime": "1s",
                  "LastContactThreshold": "200ms", "MaxTrailingLogs": 250},
            timeout=10,
        )
        r.raise_for_status()
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def leaderless() -> Iterator[ConsulAgent]:
    """A lone `-server -bootstrap-expect 3`: answers HTTP, never gets a leader."""
    agent = ConsulAgent("leaderless", dev=False, extra=["-bootstrap-expect", "3"])
    agent.start(wait_leader=False)
    try:
        yield agent
    finally:
        agent.close()


def live(cluster: ConsulCluster) -> ConsulAgent:
    return next(a for a in cluster.agents if a.proc is not None)


def urls(cluster: ConsulCluster, first: ConsulAgent | None = None) -> list[str]:
    """Every server's URL; `first` (e.g. the leader) at the head of the list."""
    ordered = sorted(cluster.agents, key=lambda a: a is not first)
    return [a.url for a in ordered]


def new_pool(cluster: ConsulCluster) -> str:
    return live(cluster).create_pool(f"cl-{next(_pools)}-{time.monotonic_ns()}", RANGES)


def log_span(log: Path) -> float:
    """Seconds from the first to the last line of a verbose log: the call's own time, without
    the interpreter start-up that a busy machine stretches."""
    stamps = [datetime.fromisoformat(line.split(" ", 1)[0])
              for line in log.read_text().splitlines() if line[:4].isdigit()]
    return (stamps[-1] - stamps[0]).total_seconds()


# -- the leader dies mid-stream -----------------------------------------------------------------


class Stream:
    """Workers doing ADD (and DEL of about half of what they added) on fresh containers."""

    def __init__(self, conf: dict, seed: int) -> None:
        self.conf = conf
        self.seed = seed
        self.calls: list[Done] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def work(self, w: int) -> None:
        rng = random.Random(f"{self.seed}-{w}")
        for k in range(200):  # bounded; `stop` normally ends it long before
            if self.stop.is_set():
                return
            container = f"ls-{self.seed}-{w}-{k}"
            add = run_one(Call("ADD", container, self.conf))
            self.record(add)
            if add.rc == 0 and rng.random() < 0.5:
                self.record(run_one(Call("DEL", container, self.conf)))

    def record(self, done: Done) -> None:
        with self.lock:
            self.calls.append(done)

    def count(self) -> int:
        with self.lock:
            return len(self.calls)


def wait_for(predicate, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def tolerates_a_failure(cluster: ConsulCluster) -> bool:
    """Autopilot's view: healthy, and one server can go (a restarted server is a non-voter
    until it has been stable for a while, and then a second loss would leave no quorum)."""
    try:
        agent = live(cluster)
        r = agent.http.get(f"{agent.url}/v1/operator/autopilot/health", timeout=2)
        health = r.json() if r.status_code == 200 else {}
    except Exception:
        return False
    return bool(health.get("Healthy")) and int(health.get("FailureTolerance", 0)) >= 1


def has_leader(agent: ConsulAgent) -> bool:
    try:
        return bool(agent.leader()) and agent._kv_works()
    except Exception:
        return False


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_leader_stop_during_stream(cluster: ConsulCluster, sig: int):
    # Losing the leader must leave a quorum: all three servers voters and healthy first.
    wait_for(lambda: tolerates_a_failure(cluster), 60, "a cluster that tolerates a failure")
    pool = new_pool(cluster)
    leader = cluster.leader_agent()
    # The leader first in the list: the servers the calls are using is the one that dies.
    conf = netconf(urls(cluster, first=leader), [{"name": pool}],
                   consul_connect_timeout=1, consul_read_timeout=2)
    stream = Stream(conf, seed=int(sig))
    threads = [threading.Thread(target=stream.work, args=(w,)) for w in range(WORKERS)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: stream.count() >= 12, 60, "calls before the stop")
        stopped_at = time.monotonic()
        leader.stop(sig)
        survivors = [a for a in cluster.agents if a.proc is not None]
        wait_for(lambda: any(has_leader(a) for a in survivors), 30, "a new leader")
        elected = time.monotonic() - stopped_at
        after = stream.count()
        wait_for(lambda: stream.count() >= after + 12, 90, "calls after the election")
    finally:
        stream.stop.set()
        for t in threads:
            t.join(120)
    assert not any(t.is_alive() for t in threads), "a stream worker hung"

    calls = stream.calls
    adds = [d for d in calls if d.call.command == "ADD"]
    kinds = Counter((d.call.command, d.rc) for d in calls)
    longest = max(adds, key=lambda d: d.elapsed)
    print(f"\n[cluster {signal.Signals(sig).name}] {len(calls)} calls {dict(kinds)}; new leader "
          f"after {elected:.2f}s; longest ADD {longest.elapsed:.2f}s (rc {longest.rc})")

    # Every call either succeeded or failed with a clear error JSON.
    for d in calls:
        if d.rc != 0:
            assert d.rc in CLEAR_ERRORS, d
            err = d.json
            assert err["code"] == d.rc and isinstance(err["msg"], str) and err["msg"], d
        assert "Traceback" not in d.stdout, d

    # A DEL that failed is retried by the runtime; now that there is a leader, it succeeds.
    added = {d.call.container: d.address for d in adds if d.rc == 0}
    deleted = {d.call.container for d in calls if d.call.command == "DEL" and d.rc == 0}
    retried = run_many(Call("DEL", d.call.container, conf)
                       for d in calls if d.call.command == "DEL" and d.rc != 0)
    assert [d for d in retried if d.rc != 0] == []
    deleted |= {d.call.container for d in retried}

    # Successful ADDs not deleted hold exactly their printed address; failed ADDs left nothing.
    expected = {c: ip for c, ip in added.items() if c not in deleted}
    held = live(cluster).allocations(pool)
    assert [t for t, n in Counter(held.values()).items() if n > 1] == [], held
    assert {target: ip for ip, target in held.items()} == expected

    dels = run_many(Call("DEL", c, conf) for c in expected)
    assert [d for d in dels if d.rc != 0] == []
    assert live(cluster).allocations(pool) == {}

    # Bring the old leader back so the other tests have three servers again.
    leader.start(wait_leader=False)
    wait_for(lambda: all(has_leader(a) for a in cluster.agents), 60, "the cluster to re-form")
    wait_for(lambda: tolerates_a_failure(cluster), 60, "the old leader to vote again")


# -- the first listed server is unusable ----------------------------------------------------------


def add_then_del(servers: list[str], pool: str, container: str, tmp_path: Path,
                 **ipam) -> tuple[Path, float]:
    log = tmp_path / f"{container}.log"
    conf = netconf(servers, [{"name": pool}], **ipam)
    started = time.monotonic()
    out = run_plugin("ADD", conf, container=container, verbose=True,
                     env={"IPAM_DA_CONSUL_LOG_FILE": str(log)})
    took = time.monotonic() - started
    assert out.rc == 0, out
    assert out.json["ips"][0]["address"] == "10.4.0.10/24"
    return log, took


def test_first_server_dead(cluster, tmp_path):
    pool = new_pool(cluster)
    dead = f"http://127.0.0.1:{free_ports(1)[0]}"
    log, _ = add_then_del([dead, *urls(cluster)], pool, "after-dead", tmp_path)
    assert f"skipping Consul server {dead}: connection failed" in log.read_text()
    assert live(cluster).allocations(pool) == {"10.4.0.10": "after-dead"}
    out = run_plugin("DEL", netconf([dead, *urls(cluster)], [{"name": pool}]),
                     container="after-dead")
    assert out.rc == 0, out
    assert live(cluster).allocations(pool) == {}


def test_leaderless_server_skipped(cluster, leaderless, tmp_path):
    assert leaderless.leader() == ""
    pool = new_pool(cluster)
    log, _ = add_then_del([leaderless.url, *urls(cluster)], pool, "no-leader", tmp_path)
    text = log.read_text()
    assert f"skipping Consul server {leaderless.url}: has no raft leader" in text
    # No KV request ever went to the leaderless server.
    assert f"{leaderless.url}/v1/kv/" not in text
    assert live(cluster).allocations(pool) == {"10.4.0.10": "no-leader"}


def test_hung_server_skipped_within_read_timeout(cluster, tmp_path):
    pool = new_pool(cluster)
    hung = Unresponsive()
    try:
        log, _ = add_then_del([hung.url, *urls(cluster)], pool, "after-hung", tmp_path,
                                 consul_read_timeout=1.0, consul_connect_timeout=1.0)
    finally:
        hung.close()
    text = log.read_text()
    assert f"skipping Consul server {hung.url}: no answer before the read timeout" in text
    # The call itself (first to last log line) costs about one read timeout, not the 15 s
    # budget; the margin is for a busy 2-core machine.
    assert 1.0 <= log_span(log) < 1.0 + 3.0, (log_span(log), text)
    assert live(cluster).allocations(pool) == {"10.4.0.10": "after-hung"}


def test_server_stops_answering_mid_call(cluster, tmp_path):
    """The chosen server answers the leader check and the pool read, then hangs on the write
    (after applying it): the write goes to the next server, finds our own key, and the ADD
    succeeds with one key, within a read timeout."""
    pool = new_pool(cluster)
    leader = cluster.leader_agent()
    proxy = LossyProxy(leader.url, drop_first("PUT"), hang=True)
    try:
        log, _ = add_then_del([proxy.url, *urls(cluster)], pool, "mid-call", tmp_path,
                              consul_read_timeout=1.0)
    finally:
        proxy.close()
    assert len(proxy.dropped) == 1
    text = log.read_text()
    assert "no answer before the read timeout; failing over" in text
    assert 1.0 <= log_span(log) < 1.0 + 3.0, text
    assert live(cluster).allocations(pool) == {"10.4.0.10": "mid-call"}
