"""The raft leader of a real 3-server loopback cluster is hung (SIGSTOP, like a leader cut off
by the network) or killed (SIGKILL) while a stream of KV reads and CAS writes runs through
ConsulClient + ConsulKV. The promise: the stream stalls for about the election, not for the
time budget, and a call in flight at the fault still succeeds.

Also a measurement tool (it only uses the API the client had before leader-loss handling, so
the same command measures an older consul/client.py):

    .venv/bin/python -m tests.test_client_leader --fault stop --mode fresh
"""

from __future__ import annotations

import argparse
import itertools
import json
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, TypedDict

import pytest
import requests
from ipam_da_consul.consul import ConsulClient, ConsulError, ConsulKV, Deadline

from tests.support.agent import ConsulAgent, ConsulCluster

pytestmark = pytest.mark.cluster

BUDGET = 15.0  # the plugin's default `timeout`


@dataclass
class Op:
    worker: str
    started: float
    ended: float
    ok: bool
    sent: int  # HTTP requests this operation cost
    error: str = ""


@dataclass
class Outcome:
    fault: str
    mode: str
    order: str
    faulted_at: float
    elected_after: float
    ops: list[Op] = field(default_factory=list)
    writes: int = 0
    refused: int = 0

    def longest_gap(self) -> float:
        """The longest stretch, across the fault, with no request succeeding anywhere."""
        ends = sorted(o.ended for o in self.ops if o.ok)
        before = [t for t in ends if t <= self.faulted_at]
        after = [t for t in ends if t > self.faulted_at]
        if not after:
            return float("inf")
        points = ([before[-1]] if before else [self.faulted_at]) + after
        return max(b - a for a, b in itertools.pairwise(points))

    def in_flight(self) -> list[Op]:
        return [o for o in self.ops if o.started < self.faulted_at < o.ended]

    def summary(self) -> dict[str, Any]:
        failed = [o for o in self.ops if not o.ok]
        flight = self.in_flight()
        return {
            "fault": self.fault,
            "mode": self.mode,
            "order": self.order,
            "election_s": round(self.elected_after, 2),
            "longest_gap_s": round(self.longest_gap(), 2),
            "ops": len(self.ops),
            "cas_writes": self.writes,
            "cas_false": self.refused,
            "failed": len(failed),
            "in_flight": len(flight),
            "in_flight_failed": sum(not o.ok for o in flight),
            "in_flight_longest_s": round(max((o.ended - o.started for o in flight), default=0), 2),
            "longest_op_s": round(max(o.ended - o.started for o in self.ops), 2),
            "most_requests_per_op": max(o.sent for o in self.ops),
            "first_error": failed[0].error[:300] if failed else "",
        }


def survivors_elected(agents: list[ConsulAgent], old: str) -> bool:
    for agent in agents:
        try:
            now = agent.leader()
            if now and now != old and agent._kv_works():
                return True
        except requests.RequestException:
            pass
    return False


class _Timeouts(TypedDict):
    connect_timeout: float
    read_timeout: float


class Stream:
    """Readers (GET one key) and writers (CAS replace of their own key) in a loop. In "fresh"
    mode every request gets a new client, as each plugin process does; in "shared" mode each
    worker keeps one client, as the helper does."""

    def __init__(
        self,
        servers: list[str],
        mode: str,
        readers: int,
        writers: int,
        connect_timeout: float,
        read_timeout: float,
    ) -> None:
        self.servers = servers
        self.mode = mode
        self.timeouts = _Timeouts(connect_timeout=connect_timeout, read_timeout=read_timeout)
        self.ops: list[Op] = []
        self.writes = 0  # CAS writes that answered "true"
        self.refused = 0  # and "false"
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self.read, args=(f"r{i}",), daemon=True) for i in range(readers)
        ]
        self.threads += [
            threading.Thread(target=self.write, args=(f"w{i}",), daemon=True)
            for i in range(writers)
        ]

    def client(self, shared: ConsulClient | None) -> ConsulClient:
        if shared is not None:
            shared.deadline = Deadline(BUDGET)
            return shared
        return ConsulClient(self.servers, deadline=Deadline(BUDGET), **self.timeouts)

    def new_shared(self) -> ConsulClient | None:
        if self.mode != "shared":
            return None
        return ConsulClient(self.servers, deadline=Deadline(BUDGET), **self.timeouts)

    def run(self, worker: str, shared: ConsulClient | None, action) -> None:
        client = self.client(shared)
        sent = client.requests_sent
        started = time.monotonic()
        try:
            action(ConsulKV(client))
            op = Op(worker, started, time.monotonic(), True, client.requests_sent - sent)
        except ConsulError as exc:
            op = Op(worker, started, time.monotonic(), False, client.requests_sent - sent, str(exc))
        finally:
            if shared is None:
                client.close()
        with self.lock:
            self.ops.append(op)

    def read(self, worker: str) -> None:
        shared = self.new_shared()
        while not self.stop.is_set():
            self.run(worker, shared, lambda kv: kv.get("m/read"))

    def write(self, worker: str) -> None:
        shared = self.new_shared()
        key = f"m/{worker}"
        state = {"index": 0, "n": 0}

        def one(kv: ConsulKV) -> None:
            if not state["index"]:
                entry = kv.get(key)
                state["index"] = entry.modify_index if entry else 0
                return
            state["n"] += 1
            # False: our own earlier try of it was applied (its answer lost), or a stale index.
            written = kv.replace(key, str(state["n"]).encode(), state["index"])
            with self.lock:
                self.writes += written
                self.refused += not written
            state["index"] = 0  # the next op re-reads: one request per op

        while not self.stop.is_set():
            self.run(worker, shared, one)

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def finish(self, timeout: float) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout)


def measure(
    fault: str,
    mode: str,
    *,
    after: float,
    connect_timeout: float = 2.0,
    read_timeout: float = 5.0,
    readers: int = 2,
    writers: int = 2,
    order: str = "follower-first",
) -> Outcome:
    """Start a cluster, stream for 2 s, hang or kill the leader, stream for `after` seconds
    more, wait for the requests in flight, and return every request's outcome."""
    sig = {"stop": signal.SIGSTOP, "kill": signal.SIGKILL}[fault]
    cluster = ConsulCluster().start()
    leader = cluster.leader_agent()
    try:
        leader.put("m/read", "x")
        for i in range(writers):
            leader.put(f"m/w{i}", "0")
        # Every host lists the servers in the same order. A follower first: requests are
        # forwarded to the leader, and after a failure the leader is the next one tried.
        others = [a for a in cluster.agents if a is not leader]
        ordered = [leader, *others] if order == "leader-first" else [others[0], leader, others[1]]
        servers = [a.url for a in ordered]
        stream = Stream(servers, mode, readers, writers, connect_timeout, read_timeout)
        stream.start()
        time.sleep(2.0)
        old = leader.leader()
        assert leader.proc is not None
        faulted_at = time.monotonic()
        leader.proc.send_signal(sig)
        end = time.monotonic() + 30
        while not survivors_elected(others, old) and time.monotonic() < end:
            time.sleep(0.05)
        elected = time.monotonic() - faulted_at
        time.sleep(max(0.0, faulted_at + after - time.monotonic()))
        stream.finish(BUDGET + 10)
        return Outcome(
            fault, mode, order, faulted_at, elected, list(stream.ops), stream.writes, stream.refused
        )
    finally:
        if fault == "stop" and leader.proc is not None:
            leader.proc.send_signal(signal.SIGCONT)
        cluster.close()


# -- the tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fault, mode",
    [("stop", "fresh"), ("stop", "shared"), ("kill", "fresh")],
    ids=["SIGSTOP-fresh", "SIGSTOP-shared", "SIGKILL-fresh"],
)
def test_leader_loss_costs_the_election(fault: str, mode: str) -> None:
    outcome = measure(fault, mode, after=6.0)
    s = outcome.summary()
    print(f"\n{json.dumps(s)}")
    # Before, a hung leader stalled the stream for a read timeout per server a request was
    # forwarded through (10 s here), and a killed one had requests resent as fast as the
    # followers could refuse them.
    assert s["failed"] == 0, s
    assert outcome.longest_gap() < outcome.elected_after + 3.0, s
    assert s["most_requests_per_op"] <= 60, s
    assert s["cas_writes"] > 10, s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fault", choices=["stop", "kill"], default="stop")
    parser.add_argument("--mode", choices=["fresh", "shared"], default="fresh")
    parser.add_argument(
        "--order", choices=["follower-first", "leader-first"], default="follower-first"
    )
    parser.add_argument("--after", type=float, default=20.0)
    parser.add_argument("--connect-timeout", type=float, default=2.0)
    parser.add_argument("--read-timeout", type=float, default=5.0)
    args = parser.parse_args()
    outcome = measure(
        args.fault,
        args.mode,
        after=args.after,
        connect_timeout=args.connect_timeout,
        read_timeout=args.read_timeout,
        order=args.order,
    )
    print(json.dumps(outcome.summary()))


if __name__ == "__main__":
    main()
