"""A scripted transport for ConsulClient (consul/transport.py) and the fake clock it runs on:
the client's failover, leader suspicion, doubt and time limits tested in the test process,
without sockets or real waiting.

Each server answers like a healthy Consul agent unless told otherwise: `/v1/status/leader`
names its `leader` (None: no leader), the leader probe and KV reads find nothing (404), writes
succeed (`true`). Rules added with `FakeServer.on` come first, in the order added, each used up
after its `times`; a rule's outcome is an answer (`reply`), a fault (`refused`, `connect_timeout`,
`read_timeout`, `dropped`, `tls_error`) or a function of the request giving one. Every request
the client sends is recorded in `FakeTransport.sent`. Time passes only on the fake clock: an
answer takes `latency`, a timeout the time the client allowed for it, a sleep its length.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ipam_da_consul.consul.client import Deadline
from ipam_da_consul.consul.transport import (
    Answer,
    ConnectFailed,
    ConnectTimedOut,
    Dropped,
    ReadTimedOut,
    TLSFailed,
    TransportError,
)

LEADER_PATH = "/v1/status/leader"
PROBE_PATH = "/v1/kv/ipam-da-consul/leader-probe"
WRITES = frozenset({"PUT", "DELETE", "POST", "PATCH"})


class FakeClock:
    """Monotonic time that moves only when something takes time or sleeps."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        # What the code under test slept, not the time requests took.
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.advance(seconds)

    def advance(self, seconds: float) -> None:
        self.now += max(0.0, seconds)

    def deadline(self, seconds: float) -> Deadline:
        return Deadline(seconds, self)


@dataclass(frozen=True)
class Sent:
    server: str
    method: str
    path: str
    params: dict[str, str]
    body: bytes | None
    connect_timeout: float
    read_timeout: float
    # The fake clock when it was sent.
    at: float


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    # Seconds the answer takes; None: the transport's latency.
    takes: float | None = None


@dataclass(frozen=True)
class Fault:
    kind: type[TransportError]
    # Seconds it takes; None: the timeout it is (connect or read), else the latency.
    takes: float | None = None
    detail: str | None = None


Outcome = Reply | Fault
Script = Outcome | Callable[[Sent], Outcome]


def reply(
    status: int = 200, body: bytes = b"", headers: Mapping[str, str] | None = None,
    takes: float | None = None,
) -> Reply:
    return Reply(status, body, headers or {}, takes)


def leader_is(leader: str | None, takes: float | None = None) -> Reply:
    """The answer of /v1/status/leader naming `leader` (None: no leader)."""
    return Reply(200, json.dumps(leader or "").encode(), {}, takes)


def refused() -> Fault:
    return Fault(ConnectFailed)


def connect_timeout() -> Fault:
    return Fault(ConnectTimedOut)


def read_timeout(takes: float | None = None) -> Fault:
    return Fault(ReadTimedOut, takes)


def dropped() -> Fault:
    """The request was sent, the connection closed before the answer."""
    return Fault(Dropped)


def tls_error() -> Fault:
    return Fault(TLSFailed, detail="certificate verify failed")


@dataclass
class _Rule:
    method: str | None
    path: str | None
    script: Script
    # Requests it still answers; None: every one.
    times: int | None

    def matches(self, method: str, path: str) -> bool:
        return (
            (self.times is None or self.times > 0)
            and self.method in (None, method)
            and self.path in (None, path)
        )


@dataclass
class FakeServer:
    url: str
    leader: str | None = "10.0.0.1:8300"
    rules: list[_Rule] = field(default_factory=list)

    def on(
        self, method: str | None, path: str | None, *scripts: Script, times: int | None = 1
    ) -> FakeServer:
        """Requests of `method` (None: any) to `path` (None: any) get each of `scripts` in
        turn, each for `times` requests (None: for good, so only the last one is reached)."""
        self.rules += [_Rule(method, path, script, times) for script in scripts]
        return self

    def down(self, fault: Fault | None = None) -> FakeServer:
        """From now on, every request not matched by an earlier rule gets `fault` (refused)."""
        return self.on(None, None, fault or refused(), times=None)

    def outcome(self, sent: Sent) -> Outcome:
        for rule in self.rules:
            if rule.matches(sent.method, sent.path):
                if rule.times is not None:
                    rule.times -= 1
                return rule.script(sent) if callable(rule.script) else rule.script
        return self.healthy(sent)

    def healthy(self, sent: Sent) -> Reply:
        if sent.path == LEADER_PATH:
            return leader_is(self.leader)
        if sent.method in WRITES:
            return reply(200, b"true")
        return reply(404)


class FakeTransport:
    def __init__(self, clock: FakeClock | None = None, latency: float = 0.001) -> None:
        self.clock = clock or FakeClock()
        self.latency = latency
        self.servers: dict[str, FakeServer] = {}
        self.sent: list[Sent] = []
        self.closed = False

    def server(self, url: str, leader: str | None = "10.0.0.1:8300") -> FakeServer:
        self.servers[url] = FakeServer(url, leader)
        return self.servers[url]

    def send(
        self,
        server: str,
        method: str,
        path: str,
        params: Mapping[str, str] | None,
        body: bytes | None,
        *,
        connect_timeout: float,
        read_timeout: float,
    ) -> Answer:
        assert not self.closed, "a request on a closed transport"
        sent = Sent(
            server, method, path, dict(params or {}), body, connect_timeout, read_timeout,
            self.clock.now,
        )
        self.sent.append(sent)
        outcome = self.servers[server].outcome(sent)
        if isinstance(outcome, Reply):
            self.clock.advance(self.latency if outcome.takes is None else outcome.takes)
            return Answer(outcome.status, outcome.body, dict(outcome.headers))
        self.clock.advance(self._cost(outcome, sent))
        raise outcome.kind(outcome.detail)

    def _cost(self, fault: Fault, sent: Sent) -> float:
        if fault.takes is not None:
            return fault.takes
        if fault.kind is ConnectTimedOut:
            return sent.connect_timeout
        if fault.kind is ReadTimedOut:
            return sent.read_timeout
        return self.latency

    def close(self) -> None:
        self.closed = True

    # -- what was sent -----------------------------------------------------------------------
    def requests(
        self, server: str | None = None, method: str | None = None, path: str | None = None
    ) -> list[Sent]:
        return [
            s for s in self.sent
            if server in (None, s.server) and method in (None, s.method) and path in (None, s.path)
        ]

    def trail(self) -> list[tuple[str, str, str]]:
        """(server, method, path) of every request, in order."""
        return [(s.server, s.method, s.path) for s in self.sent]
