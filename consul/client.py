"""HTTP transport to a list of Consul servers, with failover inside a time budget.

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

import ipaddress
import random
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import requests
from loguru import logger
from urllib3.exceptions import (
    ConnectTimeoutError,
    DecodeError,
    NameResolutionError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
)
from urllib3.exceptions import SSLError as Urllib3SSLError

from .errors import ConsulError, ConsulUnavailable
from .urls import shown_url

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
# A server that just did not answer its leader check is asked again only this often while
# other servers answer: each try costs a check timeout.
_QUIET_RECHECK = 2.0
_BACKOFF_CAP = 1.0
# Problems that waiting does not heal (a wrong CA, a missing client certificate, a server that
# answers with a redirect): once every server has one, the call gives up at once.
_LASTING = ("TLS error", "answered with a redirect")


class Deadline:
    """A monotonic time budget shared by everything one invocation does."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def remaining(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def expired(self) -> bool:
        return self.remaining() <= 0.0

    def sleep(self, seconds: float) -> None:
        time.sleep(max(0.0, min(seconds, self.remaining())))

    def extend(self, seconds: float) -> None:
        """Make sure at least `seconds` remain (used to finish a rollback after a failure)."""
        self.end = max(self.end, time.monotonic() + seconds)


@dataclass(frozen=True)
class TLSConfig:
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


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
    ) -> None:
        if not servers:
            raise ValueError("at least one Consul server URL is needed")
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
        # Servers that answered a request with a redirect, and that problem: whatever answers
        # so is not Consul (or not only Consul), so it gets no further request from this client.
        self._redirecting: dict[str, str] = {}
        self.session = requests.Session()
        self.session.trust_env = (
            False  # a proxy from the environment must not sit between us and Consul
        )
        # Servers on this host answer uncompressed. Consul gzips a 60,000-key pool listing
        # (8 MB) in ~150 ms of its own CPU, twice what sending it plain over loopback takes,
        # and the call spends ~30 ms more inflating it; every ADD in-process lists its pool.
        # Across a network the bytes count more, and requests asks for gzip as before.
        self._plain = {s: _on_this_host(s) for s in self.servers}
        if token:
            self.session.headers["X-Consul-Token"] = token
        tls = tls or TLSConfig()
        if tls.ca_file:
            self.session.verify = tls.ca_file
        if tls.cert_file:
            self.session.cert = (tls.cert_file, tls.key_file) if tls.key_file else tls.cert_file

    def close(self) -> None:
        self.session.close()

    # -- server choice -------------------------------------------------------------------
    def select(self, after: str | None = None) -> str:
        """Use the first server, in list order (starting after `after`), that has a leader
        (and, while a leader is suspected, whose leader is a new one or answers a probe).

        Rounds over the servers repeat with backoff until the deadline, except when no server
        accepted a connection for `unreachable_grace` seconds, or every one failed TLS."""
        start = self.servers.index(after) + 1 if after in self.servers else 0
        order = self.servers[start:] + self.servers[:start]
        problems: dict[str, str] = {}
        attempt = probes = 0
        check_timeout = min(self.read_timeout, _CHECK_TIMEOUT)
        unreached_since: float | None = None
        while True:
            round_started = time.monotonic()
            answered = reached = False
            naming_suspect: list[str] = []
            for server in order:
                if server in self._redirecting:
                    problems[server] = self._redirecting[server]
                    continue
                went_quiet = self._quiet.get(server)
                if (
                    answered
                    and went_quiet is not None
                    and round_started - went_quiet < _QUIET_RECHECK
                ):
                    continue
                check = self._check(server, check_timeout)
                reached = reached or check.reached
                answered = answered or (check.reached and not check.quiet)
                if check.quiet:
                    self._quiet[server] = time.monotonic()
                else:
                    self._quiet.pop(server, None)
                if check.problem is None:
                    return self._use(server)
                if check.suspected:
                    naming_suspect.append(server)
                problems[server] = _telling(problems.get(server), check.problem)
                logger.debug("skipping Consul server {}: {}", self.shown[server], check.problem)
            if naming_suspect:
                # Only after every server was asked: a new leader, when there is one, is
                # cheaper to find than a probe of the old one is to time out.
                server = naming_suspect[0]
                timeout = min(self.read_timeout, _PROBE_TIMEOUT * 2 ** (probes // 2))
                probes += 1
                problem = self._probe(server, timeout)
                if problem is None:
                    return self._use(server)
                problems[server] = problem
                logger.debug("skipping Consul server {}: {}", self.shown[server], problem)
            attempt += 1
            if not answered:
                check_timeout = min(self.read_timeout, check_timeout * 2)
            if self.deadline.remaining() < 0.2 or all(
                p.startswith(_LASTING) for p in problems.values()
            ):
                break
            pause = min(_BACKOFF_CAP, 0.1 * 2**attempt) * random.uniform(0.5, 1.0)
            if not reached:
                # Nothing even accepted a connection: retry quickly, but only within the grace.
                unreached_since = round_started if unreached_since is None else unreached_since
                left = unreached_since + self.unreachable_grace - time.monotonic()
                if left <= 0.05:
                    self.current = None
                    raise ConsulUnavailable(
                        f"no Consul server could be reached (none accepted a connection for "
                        f"{self.unreachable_grace:g} s): " + self._listing(problems)
                    )
                pause = min(pause, left)
            else:
                unreached_since = None
            self.deadline.sleep(pause)
            # Servers that answered their last check first: they will tell when there is a
            # leader again, while one that is hung costs a check timeout each time.
            order = sorted(self.servers, key=lambda s: s in self._quiet)
        self.current = None
        raise ConsulUnavailable("no Consul server could be reached: " + self._listing(problems))

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
        except requests.RequestException as exc:
            return _Check(
                _describe_transport(exc),
                reached=_connected(exc),
                quiet=isinstance(exc, requests.ReadTimeout),
            )
        if _is_redirect(resp.status):
            return _Check(self._redirected(server, resp))
        if resp.status != 200:
            problem = f"HTTP {resp.status} {_snippet(resp.body)}"
            if self.datacenter and b"No path to datacenter" in resp.body:
                raise self._no_path(problem, resp.status, False)
            return _Check(problem)
        try:
            leader = resp.json()
        except ValueError:
            return _Check("answered /v1/status/leader with something that is not JSON")
        if not leader:
            return _Check("has no raft leader")
        leader = str(leader)
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
        except requests.RequestException as exc:
            problem = _describe_transport(exc)
        else:
            if _is_redirect(answer.status):
                return self._redirected(server, answer)
            if answer.status not in _RETRYABLE_STATUS:
                logger.debug("Consul leader {} serves requests", leader)
                self._suspect = None
                return None
            problem = f"HTTP {answer.status} {_snippet(answer.body)}"
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
        self._redirecting[server] = problem
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
        write = method.upper() in _WRITES
        if write and self.deadline.expired():
            raise ConsulUnavailable(
                f"Consul request {method} {path} not sent: the time budget is spent"
            )
        if self.current is None:
            self.select()
        params = dict(params or {})
        if self.datacenter:
            params["dc"] = self.datacenter
        # Blocking queries bring their own timeout (their wait plus a margin); everything else
        # starts with a short one that grows with each try that times out.
        try_timeout = min(self.read_timeout, self.attempt_timeout)
        doubtful = False
        failures = 0
        while True:
            server = self.current
            assert server is not None
            if write and self.deadline.expired():
                # A call that has given up must not change anything behind its caller's back.
                raise ConsulUnavailable(
                    f"Consul request {method} {path} not sent: the time budget is spent",
                    doubtful=doubtful,
                )
            leader_trouble = answered = False
            try:
                resp = self._send(
                    server, method, path, params, body, try_timeout if timeout is None else timeout
                )
            except requests.RequestException as exc:
                problem = _describe_transport(exc)
                doubtful = doubtful or (write and _may_have_arrived(exc))
                if isinstance(exc, requests.ReadTimeout):
                    # The server took the request and said nothing: it, or the leader it
                    # forwards to, is hung.
                    leader_trouble = True
                    try_timeout = min(self.read_timeout, try_timeout * 2)
            else:
                if _is_redirect(resp.status):
                    # Not doubtful: whatever redirects did not serve the request itself. The
                    # server is skipped from now on, so this is no retry to the same place.
                    problem = self._redirected(server, resp)
                elif resp.status not in _RETRYABLE_STATUS:
                    resp.doubtful = doubtful
                    return resp
                else:
                    problem = f"HTTP {resp.status} {_snippet(resp.body)}"
                    if self.datacenter and b"No path to datacenter" in resp.body:
                        raise self._no_path(problem, resp.status, doubtful)
                    doubtful = doubtful or (write and _NO_LEADER not in resp.body)
                    leader_trouble = answered = True
            failures += 1
            logger.warning(
                "Consul server {} failed {} {}: {}; failing over",
                self.shown[server],
                method,
                path,
                problem,
            )
            if self.deadline.expired():
                raise ConsulUnavailable(
                    f"Consul request {method} {path} failed: {problem}", doubtful=doubtful
                )
            if leader_trouble:
                self._suspect_leader_of(server)
                if answered:
                    # A 5xx comes back at once; without a pause, a cluster between leaders
                    # would be asked as fast as it can answer.
                    self.deadline.sleep(
                        min(_BACKOFF_CAP, 0.05 * 2**failures) * random.uniform(0.5, 1.0)
                    )
            try:
                self.select(after=server)
            except ConsulError as exc:
                exc.doubtful = exc.doubtful or doubtful
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
        started = time.monotonic()
        self.requests_sent += 1
        try:
            r = self.session.request(
                method,
                server + path,
                params=params,
                data=body,
                timeout=(connect, read),
                headers=_IDENTITY if self._plain.get(server) else None,
                stream=True,
                # Never: the token and the body would follow to wherever the answer points.
                allow_redirects=False,
            )
            body = _read_body(r)
        except requests.RequestException as exc:
            logger.debug(
                "{} {}{} failed after {:.1f} ms: {}",
                method,
                self.shown[server],
                path,
                (time.monotonic() - started) * 1000,
                _describe_transport(exc),
            )
            raise
        logger.debug(
            "{} {}{} -> {} in {:.1f} ms",
            method,
            self.shown[server],
            path,
            r.status_code,
            (time.monotonic() - started) * 1000,
        )
        return Response(r.status_code, body, dict(r.headers))


def _read_body(r: requests.Response) -> bytes:
    """The whole body in one read, failing as `Response.content` does. `.content` passes a
    chunked body through three layers 10 kB at a time: a quarter of the time it takes to read
    a 60,000-key listing (8 MB) from a server on this host. Once the body is read, urllib3
    has given the connection back to the pool for the next request."""
    try:
        return r.raw.read(decode_content=True) or b""
    except BaseException as exc:
        # urllib3 drops a connection it failed on; this covers what it does not catch.
        r.close()
        # requests' own mapping (models.Response.iter_content).
        if isinstance(exc, ProtocolError):
            raise requests.exceptions.ChunkedEncodingError(exc) from exc
        if isinstance(exc, DecodeError):
            raise requests.exceptions.ContentDecodingError(exc) from exc
        if isinstance(exc, ReadTimeoutError):
            raise requests.ConnectionError(exc) from exc
        if isinstance(exc, Urllib3SSLError):
            raise requests.exceptions.SSLError(exc) from exc
        raise


_IDENTITY = {"Accept-Encoding": "identity"}


def _on_this_host(url: str) -> bool:
    """A loopback address, or localhost, in a server URL."""
    host = urlsplit(url).hostname or ""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_TIMEOUTS = frozenset({"connect timed out", "no answer before the read timeout"})


def _telling(before: str | None, now: str) -> str:
    # The last tries are squeezed by the deadline and often just time out: a TLS failure, a
    # refused connection or an HTTP status seen before says more about what to fix.
    if before is not None and now in _TIMEOUTS and before not in _TIMEOUTS:
        return before
    return now


def _is_redirect(status: int) -> bool:
    return 300 <= status < 400


def _connected(exc: requests.RequestException) -> bool:
    """False when no connection was made (refused, no route, no such host, connect timeout):
    then not a byte of the request left this host."""
    if isinstance(exc, requests.ConnectTimeout):
        return False
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        cause = todo.pop()
        if id(cause) in seen:
            continue
        seen.add(id(cause))
        if isinstance(cause, NewConnectionError | ConnectTimeoutError | NameResolutionError):
            return False
        todo += [a for a in cause.args if isinstance(a, BaseException)]
        for linked in (getattr(cause, "reason", None), cause.__cause__, cause.__context__):
            if isinstance(linked, BaseException):
                todo.append(linked)
    return True


def _may_have_arrived(exc: requests.RequestException) -> bool:
    """Whether the request may have reached a server: everything but a failed connection or
    a failed TLS handshake (a read timeout, a connection reset or closed after sending)."""
    return _connected(exc) and not isinstance(exc, requests.exceptions.SSLError)


def _describe_transport(exc: requests.RequestException) -> str:
    if isinstance(exc, requests.ConnectTimeout):
        return "connect timed out"
    if isinstance(exc, requests.ReadTimeout):
        return "no answer before the read timeout"
    if isinstance(exc, requests.exceptions.SSLError):
        return f"TLS error ({exc})"
    if isinstance(exc, requests.ConnectionError):
        if _connected(exc):
            return "connection dropped before an answer came"
        return "connection failed (refused or unreachable)"
    return f"request failed ({type(exc).__name__})"


def _snippet(body: bytes) -> str:
    text = body.decode("utf-8", "replace").strip()
    return f"({text[:200]})" if text else ""


def check_status(resp: Response, what: str) -> None:
    if resp.status >= 400:
        hint = " (check the ACL token's KV permissions)" if resp.status == 403 else ""
        raise ConsulError(
            f"{what}: Consul answered HTTP {resp.status} {_snippet(resp.body)}{hint}", resp.status
        )
