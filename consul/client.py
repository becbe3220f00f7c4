"""Requests to a list of Consul servers, with failover inside a time budget. The sending is
a transport's (transport.py; requests_transport.py by default): this module decides from the
kinds of trouble it reports, and from Consul's answers, which server to use and what to tell.

A server is usable when `/v1/status/leader` names a leader: an agent that answers but has no
raft leader would fail every KV call, so it is skipped like a dead one.

Three kinds of trouble get three kinds of patience:

- nothing can even be connected to (refused, no route, connect timeout): a few quick retries
  within `unreachable_grace`, then ConsulUnavailable, so a caller is not held for its whole
  budget by a Consul that is not there;
- servers answer but there is no leader (an election): retry with backoff until the deadline;
- the leader is lost but followers still name it (they do until an election ends), so requests
  forwarded to it hang or fail: that leader is suspected, and a server naming it is used again
  only once a cheap forwarded probe gets an answer through it, or once it names a new leader.
  A request therefore waits for the election, not for a read timeout per server.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from loguru import logger

from .errors import ConsulError, ConsulUnavailable, NotConsul
from .requests_transport import RequestsTransport, TLSConfig
from .transport import ConnectTimedOut, ReadTimedOut, TLSFailed, Transport, TransportError
from .urls import shown_url

__all__ = ["Clock", "ConsulClient", "Deadline", "Response", "Sent", "TLSConfig", "check_status"]

# 5xx from Consul means this server cannot serve now (no leader, rpc failure): try another.
_RETRYABLE_STATUS = frozenset({500, 502, 503, 504})
_WRITES = frozenset({"PUT", "DELETE", "POST", "PATCH"})
# /v1/status/leader is answered from the server's memory: a server that takes longer than this
# is skipped for one that answers. The bound doubles on a round where no server answered, so a
# slow link still gets through.
_CHECK_TIMEOUT = 1.0
# A read of a key nobody writes: Consul forwards it to the leader, so an answer (404, or 403
# without read rights) shows that the leader named by the server serves requests.
_PROBE_PATH = "/v1/kv/ipam-da-consul/leader-probe"
_PROBE_TIMEOUT = 0.5
# Consul's answer when the forwarded RPC found no leader: nothing was applied.
_NO_LEADER = b"No cluster leader"
_NO_PATH = b"No path to datacenter"
# A server that just did not answer its leader check is asked again only this often while
# other servers answer: each try costs a check timeout.
_QUIET_RECHECK = 2.0
_BACKOFF_CAP = 1.0
# What a server that answers, but not as Consul does, is called: whatever is listening there
# (a web server, another service on the port) will not turn into Consul by waiting.
_NOT_CONSUL = "is not a Consul server"
# Problems that waiting does not heal (a wrong CA, a missing client certificate, a server that
# answers with a redirect, or not as Consul): once every server has one, the call gives up at
# once.
_LASTING = (TLSFailed.what, "answered with a redirect", _NOT_CONSUL)
# Statuses a Consul agent, or a proxy in front of it, may give /v1/status/leader besides its
# answer: 5xx (no path to the datacenter, a proxy whose Consul is restarting), 429 (rate
# limits), and 401, 403, 407 (credentials a proxy asks for: something guards a Consul there).
_PASSING_STATUS = frozenset({401, 403, 407, 429})
# How much of an answer that is not Consul's a message quotes: enough to recognise it.
_EXCERPT = 80


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    monotonic = staticmethod(time.monotonic)
    sleep = staticmethod(time.sleep)


_SYSTEM_CLOCK = SystemClock()


class Deadline:
    """A monotonic time budget shared by everything one invocation does. Its clock is the one
    the client that holds it reads and sleeps by; tests give a fake one."""

    def __init__(self, seconds: float, clock: Clock = _SYSTEM_CLOCK) -> None:
        self.clock = clock
        self.end = clock.monotonic() + seconds

    def remaining(self) -> float:
        return max(0.0, self.end - self.clock.monotonic())

    def expired(self) -> bool:
        return self.remaining() <= 0.0

    def sleep(self, seconds: float) -> None:
        self.clock.sleep(max(0.0, min(seconds, self.remaining())))

    def extend(self, seconds: float) -> None:
        """Make sure at least `seconds` remain (used to finish a rollback after a failure)."""
        self.end = max(self.end, self.clock.monotonic() + seconds)


@dataclass
class Response:
    status: int
    body: bytes
    headers: dict[str, str]
    # True when this is a write and an earlier attempt of it may have been applied by Consul
    # although its answer was lost (see ConsulError.doubtful): e.g. a CAS create answering
    # "false" may then be this very request's own earlier write.
    doubtful: bool = False

    def json(self) -> Any:
        import json

        return json.loads(self.body)


@dataclass(frozen=True)
class Sent:
    """One request sent to one server, as an `on_request` observer hears of it: the helper's
    metrics and the verbose JSON log count these, so rewording a log line changes neither.
    Nothing secret: the server as shown (no user-info), the path without its query."""

    method: str
    server: str
    path: str
    # The HTTP status; None when no whole answer came, and then `error` is the kind of
    # trouble (transport.py: the kind's wording, without detail).
    status: int | None
    error: str | None
    seconds: float


@dataclass
class _Suspect:
    """A leader that did not serve a forwarded request; `leader` None: not known which one."""

    leader: str | None


@dataclass
class _Check:
    problem: str | None
    # The server was connected to (it answered, or at least accepted the connection).
    reached: bool = True
    # The leader check itself got no answer in time.
    quiet: bool = False
    # It names the leader under suspicion: a probe must show that leader serves requests.
    suspected: bool = False


@dataclass
class _Search:
    """One select(): the rounds over the servers until one is usable."""

    order: list[str]
    check_timeout: float
    problems: dict[str, str] = field(default_factory=dict)
    rounds: int = 0
    probes: int = 0
    # When the rounds in which no server accepted a connection began (None: one did).
    unreached_since: float | None = None
    # Of the round under way: when it began, whether any server answered its check, whether
    # any accepted a connection, and which ones name the suspected leader.
    started: float = 0.0
    answered: bool = False
    reached: bool = False
    naming_suspect: list[str] = field(default_factory=list)


@dataclass
class _Failure:
    """Why one try of a request got no usable answer."""

    problem: str
    # Hints that the leader the server forwards to cannot serve: a timeout or a 5xx.
    leader_trouble: bool = False
    # The server answered (a 5xx) at once: the next try is paced.
    answered: bool = False


@dataclass
class _Request:
    """One request() across its tries."""

    method: str
    path: str
    write: bool
    # The first try waits this long; each try that times out waits twice as long.
    try_timeout: float
    doubtful: bool = False
    failures: int = 0


class ConsulClient:
    def __init__(
        self,
        servers: list[str],
        *,
        connect_timeout: float = 2.0,
        read_timeout: float = 5.0,
        deadline: Deadline | None = None,
        token: str | None = None,
        tls: TLSConfig | None = None,
        datacenter: str | None = None,
        known_good: str | None = None,
        unreachable_grace: float = 2.0,
        attempt_timeout: float = 2.0,
        transport: Transport | None = None,
        on_request: Callable[[Sent], None] | None = None,
    ) -> None:
        """`token` and `tls` configure the default transport (requests); a `transport` given
        brings its own, and then they must not be given. `on_request` hears of every request
        sent, leader checks and probes included, once it has an answer or failed."""
        if not servers:
            raise ValueError("at least one Consul server URL is needed")
        if transport is not None and (token or tls):
            raise ValueError("a transport given brings its own token and TLS settings")
        self.servers = [s.rstrip("/") for s in servers]
        # What logs and messages show of each server: never the user-info (see urls.py).
        self.shown = {s: shown_url(s) for s in self.servers}
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        # How long every server may refuse connections before the call gives up: a Consul that
        # is not there at all should not cost the caller its whole budget.
        self.unreachable_grace = unreachable_grace
        # The first try of a request without its own timeout waits this long (at most
        # read_timeout); each further try of it that times out waits twice as long. A forwarded
        # request to a leader that hangs is noticed without waiting a full read timeout, and a
        # request that is just slow still gets its time on a later try.
        self.attempt_timeout = attempt_timeout
        self.deadline = deadline or Deadline(30.0)
        self.datacenter = datacenter
        # A long-lived caller may vouch for a server it saw with a leader moments ago; a request
        # that fails there still fails over through the full leader check.
        self.current: str | None = known_good if known_good in self.servers else None
        self.requests_sent = 0
        # The raft leader each server named at its last check.
        self.leaders: dict[str, str] = {}
        self._suspect: _Suspect | None = None
        self._quiet: dict[str, float] = {}
        # Servers that answered with a redirect, or not as Consul answers, and that problem:
        # whatever answers so is not Consul (or not only Consul), so it gets no further request
        # from this client.
        self._unusable: dict[str, str] = {}
        self.transport: Transport = transport or RequestsTransport(token, tls)
        self.on_request = on_request

    def close(self) -> None:
        self.transport.close()

    def _now(self) -> float:
        return self.deadline.clock.monotonic()

    # -- server choice -------------------------------------------------------------------
    def select(self, after: str | None = None) -> str:
        """Use the first server, in list order (starting after `after`), that has a leader
        (and, while a leader is suspected, whose leader is a new one or answers a probe).

        Rounds over the servers repeat with backoff until the deadline, except when no server
        accepted a connection for `unreachable_grace` seconds, or every one failed TLS."""
        start = self.servers.index(after) + 1 if after in self.servers else 0
        search = _Search(
            self.servers[start:] + self.servers[:start], min(self.read_timeout, _CHECK_TIMEOUT)
        )
        while True:
            server = self._round(search) or self._probe_suspected(search)
            if server is not None:
                return self._use(server)
            search.rounds += 1
            if not search.answered:
                search.check_timeout = min(self.read_timeout, search.check_timeout * 2)
            if self.deadline.remaining() < 0.2 or all(
                p.startswith(_LASTING) for p in search.problems.values()
            ):
                break
            self._pause(search)
            # Servers that answered their last check first: they will tell when there is a
            # leader again, while one that is hung costs a check timeout each time.
            search.order = sorted(self.servers, key=lambda s: s in self._quiet)
        self.current = None
        if search.problems and all(
            p.startswith(_NOT_CONSUL) for p in search.problems.values()
        ):
            # An answer, from something else: a setting to fix, not a Consul to wait for.
            raise NotConsul(
                "no listed server is a Consul server (give the URL of a Consul agent's HTTP "
                "API, such as http://127.0.0.1:8500): "
                + "; ".join(f"{self.shown[s]} {p}" for s, p in search.problems.items())
            )
        raise ConsulUnavailable(
            "no Consul server could be reached: " + self._listing(search.problems)
        )

    def _round(self, search: _Search) -> str | None:
        """The first server of one round over them all whose check passes."""
        search.started = self._now()
        search.answered = search.reached = False
        search.naming_suspect = []
        for server in search.order:
            if server in self._unusable:
                search.problems[server] = self._unusable[server]
                continue
            if search.answered and self._quiet_lately(server, search.started):
                continue
            check = self._check(server, search.check_timeout)
            search.reached = search.reached or check.reached
            search.answered = search.answered or (check.reached and not check.quiet)
            if check.quiet:
                self._quiet[server] = self._now()
            else:
                self._quiet.pop(server, None)
            if check.problem is None:
                return server
            if check.suspected:
                search.naming_suspect.append(server)
            search.problems[server] = _telling(search.problems.get(server), check.problem)
            logger.debug("skipping Consul server {}: {}", self.shown[server], check.problem)
        return None

    def _quiet_lately(self, server: str, now: float) -> bool:
        went_quiet = self._quiet.get(server)
        return went_quiet is not None and now - went_quiet < _QUIET_RECHECK

    def _probe_suspected(self, search: _Search) -> str | None:
        """The first server of the round naming the suspected leader, if a probe through it
        gets an answer. Only after every server was asked: a new leader, when there is one, is
        cheaper to find than a probe of the old one is to time out."""
        if not search.naming_suspect:
            return None
        server = search.naming_suspect[0]
        timeout = min(self.read_timeout, _PROBE_TIMEOUT * 2 ** (search.probes // 2))
        search.probes += 1
        problem = self._probe(server, timeout)
        if problem is None:
            return server
        search.problems[server] = problem
        logger.debug("skipping Consul server {}: {}", self.shown[server], problem)
        return None

    def _pause(self, search: _Search) -> None:
        """Wait before the next round; when nothing even accepted a connection, retry quickly,
        but give up once that has lasted `unreachable_grace`."""
        pause = min(_BACKOFF_CAP, 0.1 * 2**search.rounds) * random.uniform(0.5, 1.0)
        if search.reached:
            search.unreached_since = None
        else:
            if search.unreached_since is None:
                search.unreached_since = search.started
            left = search.unreached_since + self.unreachable_grace - self._now()
            if left <= 0.05:
                self.current = None
                raise ConsulUnavailable(
                    f"no Consul server could be reached (none accepted a connection for "
                    f"{self.unreachable_grace:g} s): " + self._listing(search.problems)
                )
            pause = min(pause, left)
        self.deadline.sleep(pause)

    def _use(self, server: str) -> str:
        if server != self.current:
            logger.debug("using Consul server {}", self.shown[server])
        self.current = server
        return server

    def _check(self, server: str, timeout: float) -> _Check:
        """Whether `server` names a leader that can serve requests (as far as is known)."""
        params = {"dc": self.datacenter} if self.datacenter else None
        try:
            resp = self._send(server, "GET", "/v1/status/leader", params, None, timeout)
        except TransportError as exc:
            return _Check(
                exc.problem, reached=exc.connected, quiet=isinstance(exc, ReadTimedOut)
            )
        if _is_redirect(resp.status):
            return _Check(self._redirected(server, resp))
        if resp.status in _RETRYABLE_STATUS or resp.status in _PASSING_STATUS:
            problem = _http_problem(resp.status, resp.body)
            if self.datacenter and _NO_PATH in resp.body:
                raise self._no_path(problem, resp.status, False)
            return _Check(problem)
        # Consul always serves this path, and answers it with a JSON string (the leader's
        # address, or "" during an election).
        try:
            leader = resp.json() if resp.status == 200 else None
        except ValueError:
            leader = None
        if not isinstance(leader, str):
            return _Check(self._not_consul(server, resp))
        if not leader:
            return _Check("has no raft leader")
        return self._named(server, leader)

    def _named(self, server: str, leader: str) -> _Check:
        """The check of a server that names `leader`, given what is suspected."""
        self.leaders[server] = leader
        suspect = self._suspect
        if suspect is None:
            return _Check(None)
        if suspect.leader is not None and suspect.leader != leader:
            logger.info("Consul server {} names a new leader {}", self.shown[server], leader)
            self._suspect = None
            return _Check(None)
        return _Check(f"its leader {leader} did not serve a request in time", suspected=True)

    def _probe(self, server: str, timeout: float) -> str | None:
        """None when a request forwarded through `server` to its leader gets an answer."""
        params = {"dc": self.datacenter} if self.datacenter else None
        leader = self.leaders.get(server)
        try:
            answer = self._send(server, "GET", _PROBE_PATH, params, None, timeout)
        except TransportError as exc:
            problem = exc.problem
        else:
            if _is_redirect(answer.status):
                return self._redirected(server, answer)
            if answer.status not in _RETRYABLE_STATUS:
                logger.debug("Consul leader {} serves requests", leader)
                self._suspect = None
                return None
            problem = _http_problem(answer.status, answer.body)
        if self._suspect is not None:
            # It is this leader that fails now, whichever was suspected before.
            self._suspect.leader = leader
        return f"its leader {leader} does not serve requests ({problem}); awaiting a new one"

    def _redirected(self, server: str, resp: Response) -> str:
        """The problem of a server that answered with a redirect, which is never followed:
        the token and the body would go wherever the answer says, TLS or not. The server gets
        no further request from this client."""
        location = next((v for k, v in resp.headers.items() if k.lower() == "location"), None)
        where = f"to {shown_url(location)[:200]!r}" if location else "without a Location"
        problem = f"answered with a redirect (HTTP {resp.status} {where}), which is never followed"
        self._unusable[server] = problem
        return problem

    def _not_consul(self, server: str, resp: Response) -> str:
        """The problem of a server whose leader check was answered, but not as Consul answers
        it (an HTML page, a 404, JSON of another shape): what answered, in a few words, never
        the page. Like a redirect, it gets no further request from this client."""
        ctype = next((v for k, v in resp.headers.items() if k.lower() == "content-type"), "")
        problem = (
            f"{_NOT_CONSUL}: GET /v1/status/leader answered HTTP {resp.status}"
            f"{f' ({ctype[:60]})' if ctype else ''}, {_what_came(resp.body, ctype)}"
        )
        self._unusable[server] = problem
        return problem

    def _listing(self, problems: dict[str, str]) -> str:
        return "; ".join(f"{self.shown[server]}: {problem}" for server, problem in problems.items())

    def _suspect_leader_of(self, server: str) -> None:
        leader = self.leaders.get(server)
        if self._suspect is None or self._suspect.leader != leader:
            self._suspect = _Suspect(leader)

    def _no_path(self, problem: str, status: int, doubtful: bool) -> ConsulError:
        # The servers of one datacenter share one WAN view: failing over to another cannot help,
        # and a typo in the config must not look like "try again".
        return ConsulError(
            f"Consul has no path to datacenter {self.datacenter!r} (unknown, or all "
            f"its servers are down; check the datacenter setting): {problem}",
            status,
            doubtful=doubtful,
        )

    # -- requests --------------------------------------------------------------------------
    def request(
        self,
        method: str,
        path: str,
        params: dict[str, str] | None = None,
        body: bytes | None = None,
        timeout: float | None = None,
    ) -> Response:
        """Send to the current server, failing over to the next usable one on transport errors
        and 5xx answers until the deadline. Other statuses are returned to the caller.

        A write is never sent once the deadline has passed. A write that had to be resent
        carries `doubtful` (on the Response, or on the error raised) when an earlier attempt
        may have been applied."""
        # Blocking queries bring their own timeout (their wait plus a margin); everything else
        # starts with a short one that grows with each try that times out.
        req = _Request(
            method, path, method.upper() in _WRITES, min(self.read_timeout, self.attempt_timeout)
        )
        self._refuse_late_write(req)
        if self.current is None:
            self.select()
        params = dict(params or {})
        if self.datacenter:
            params["dc"] = self.datacenter
        while True:
            server = self.current
            assert server is not None
            # A call that has given up must not change anything behind its caller's back.
            self._refuse_late_write(req)
            try:
                wait = req.try_timeout if timeout is None else timeout
                resp = self._send(server, method, path, params, body, wait)
            except TransportError as exc:
                failure = self._lost(req, exc)
            else:
                if not _is_redirect(resp.status) and resp.status not in _RETRYABLE_STATUS:
                    resp.doubtful = req.doubtful
                    return resp
                failure = self._refused(server, req, resp)
            self._fail_over(server, req, failure)

    def _refuse_late_write(self, req: _Request) -> None:
        if req.write and self.deadline.expired():
            raise ConsulUnavailable(
                f"Consul request {req.method} {req.path} not sent: the time budget is spent",
                doubtful=req.doubtful,
            )

    def _lost(self, req: _Request, exc: TransportError) -> _Failure:
        """A try that got no answer: the write may have arrived unless it surely did not."""
        req.doubtful = req.doubtful or (req.write and exc.may_have_arrived)
        if isinstance(exc, ReadTimedOut):
            # The server took the request and said nothing: it, or the leader it forwards to,
            # is hung.
            req.try_timeout = min(self.read_timeout, req.try_timeout * 2)
            return _Failure(exc.problem, leader_trouble=True)
        return _Failure(exc.problem)

    def _refused(self, server: str, req: _Request, resp: Response) -> _Failure:
        """A try answered with a redirect or a 5xx."""
        if _is_redirect(resp.status):
            # Not doubtful: whatever redirects did not serve the request itself. The server is
            # skipped from now on, so this is no retry to the same place.
            return _Failure(self._redirected(server, resp))
        problem = _http_problem(resp.status, resp.body)
        if self.datacenter and _NO_PATH in resp.body:
            raise self._no_path(problem, resp.status, req.doubtful)
        req.doubtful = req.doubtful or (req.write and _NO_LEADER not in resp.body)
        return _Failure(problem, leader_trouble=True, answered=True)

    def _fail_over(self, server: str, req: _Request, failure: _Failure) -> None:
        """After a failed try on `server`: move `current` to the next usable server, or raise
        (carrying the request's doubt) when the deadline has passed or none is usable."""
        req.failures += 1
        logger.warning(
            "Consul server {} failed {} {}: {}; failing over",
            self.shown[server],
            req.method,
            req.path,
            failure.problem,
        )
        if self.deadline.expired():
            raise ConsulUnavailable(
                f"Consul request {req.method} {req.path} failed: {failure.problem}",
                doubtful=req.doubtful,
            )
        if failure.leader_trouble:
            self._suspect_leader_of(server)
            if failure.answered:
                # A 5xx comes back at once; without a pause, a cluster between leaders would be
                # asked as fast as it can answer.
                self.deadline.sleep(
                    min(_BACKOFF_CAP, 0.05 * 2**req.failures) * random.uniform(0.5, 1.0)
                )
        try:
            self.select(after=server)
        except ConsulError as exc:
            exc.doubtful = exc.doubtful or req.doubtful
            raise

    def _send(
        self,
        server: str,
        method: str,
        path: str,
        params: dict[str, str] | None,
        body: bytes | None,
        timeout: float | None = None,
    ) -> Response:
        read = max(0.05, min(timeout or self.read_timeout, self.deadline.remaining()))
        connect = max(0.05, min(self.connect_timeout, read))
        started = self._now()
        self.requests_sent += 1
        try:
            answer = self.transport.send(
                server, method, path, params, body, connect_timeout=connect, read_timeout=read
            )
        except TransportError as exc:
            took = self._now() - started
            logger.debug(
                "{} {}{} failed after {:.1f} ms: {}",
                method,
                self.shown[server],
                path,
                took * 1000,
                exc.problem,
            )
            self._heard(Sent(method, self.shown[server], path, None, exc.what, took))
            raise
        took = self._now() - started
        logger.debug(
            "{} {}{} -> {} in {:.1f} ms",
            method,
            self.shown[server],
            path,
            answer.status,
            took * 1000,
        )
        self._heard(Sent(method, self.shown[server], path, answer.status, None, took))
        return Response(answer.status, answer.body, dict(answer.headers))

    def _heard(self, sent: Sent) -> None:
        if self.on_request is None:
            return
        try:
            self.on_request(sent)
        except Exception as exc:  # counting a request must never fail it
            logger.warning("an observer of Consul requests failed: {!r}", exc)


_TIMEOUTS = frozenset({ConnectTimedOut.what, ReadTimedOut.what})


def _telling(before: str | None, now: str) -> str:
    # The last tries are squeezed by the deadline and often just time out: a TLS failure, a
    # refused connection or an HTTP status seen before says more about what to fix.
    if before is not None and now in _TIMEOUTS and before not in _TIMEOUTS:
        return before
    return now


def _is_redirect(status: int) -> bool:
    return 300 <= status < 400


def _excerpt(body: bytes, limit: int = _EXCERPT) -> str:
    """The start of `body` on one line: white space runs made one space, cut at `limit`."""
    text = " ".join(body[: limit * 4].decode("utf-8", "replace").split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _snippet(body: bytes) -> str:
    text = _excerpt(body, 200)
    return f"({text})" if text else ""


def _http_problem(status: int, body: bytes) -> str:
    snippet = _snippet(body)
    return f"HTTP {status} {snippet}" if snippet else f"HTTP {status}"


_TITLE = re.compile(rb"<title[^>]*>(.*?)</title", re.IGNORECASE | re.DOTALL)


def _what_came(body: bytes, ctype: str) -> str:
    """A few words on an answer that is not Consul's: an HTML page by its title, anything else
    by its first characters."""
    if not body.strip():
        return "with an empty body"
    if "html" in ctype.lower() or body.lstrip()[:1] == b"<":
        title = _TITLE.search(body[:65536])
        if title and title.group(1).strip():
            return f"an HTML page titled {_excerpt(title.group(1))!r}"
        return f"an HTML page beginning {_excerpt(body)!r}"
    return f"beginning {_excerpt(body)!r}"


def check_status(resp: Response, what: str) -> None:
    if resp.status >= 400:
        hint = " (check the ACL token's KV permissions)" if resp.status == 403 else ""
        raise ConsulError(
            f"{what}: Consul answered {_http_problem(resp.status, resp.body)}{hint}", resp.status
        )
