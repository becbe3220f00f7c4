"""HTTP transport to a list of Consul servers, with failover inside a time budget.

A server is usable when `/v1/status/leader` names a leader: an agent that answers but has no
raft leader would fail every KV call, so it is skipped like a dead one.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any

import requests
from loguru import logger

from .errors import ConsulError, ConsulUnavailable

# 5xx from Consul means this server cannot serve now (no leader, rpc failure): try another.
_RETRYABLE_STATUS = frozenset({500, 502, 503, 504})


class Deadline:
    """A monotonic time budget shared by everything one invocation does."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def remaining(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def expired(self) -> bool:
        return self.remaining() <= 0.0

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.remaining()))

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

    def json(self) -> Any:
        import json

        return json.loads(self.body)


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
    ) -> None:
        if not servers:
            raise ValueError("at least one Consul server URL is needed")
        self.servers = [s.rstrip("/") for s in servers]
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.deadline = deadline or Deadline(30.0)
        self.datacenter = datacenter
        # A long-lived caller may vouch for a server it saw with a leader moments ago; a request
        # that fails there still fails over through the full leader check.
        self.current: str | None = known_good if known_good in self.servers else None
        self.requests_sent = 0
        self.session = requests.Session()
        self.session.trust_env = (
            False  # a proxy from the environment must not sit between us and Consul
        )
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
        """Use the first server, in list order (starting after `after`), that has a leader."""
        start = self.servers.index(after) + 1 if after in self.servers else 0
        order = self.servers[start:] + self.servers[:start]
        problems: dict[str, str] = {}
        attempt = 0
        while True:
            for server in order:
                problem = self._leader_problem(server)
                if problem is None:
                    if server != self.current:
                        logger.debug("using Consul server {}", server)
                    self.current = server
                    return server
                problems[server] = _telling(problems.get(server), problem)
                logger.debug("skipping Consul server {}: {}", server, problem)
            attempt += 1
            # A TLS failure (bad CA, missing client certificate) will not heal by waiting.
            if self.deadline.remaining() < 0.2 or all(
                p.startswith("TLS error") for p in problems.values()
            ):
                break
            self.deadline.sleep(min(2.0, 0.1 * 2**attempt) * random.uniform(0.5, 1.0))
            order = self.servers
        self.current = None
        raise ConsulUnavailable(
            "no Consul server could be reached: "
            + "; ".join(f"{server}: {problem}" for server, problem in problems.items())
        )

    def _leader_problem(self, server: str) -> str | None:
        try:
            resp = self._send(server, "GET", "/v1/status/leader", None, None)
        except requests.RequestException as exc:
            return _describe_transport(exc)
        if resp.status != 200:
            return f"HTTP {resp.status} {_snippet(resp.body)}"
        try:
            leader = resp.json()
        except ValueError:
            return "answered /v1/status/leader with something that is not JSON"
        return None if leader else "has no raft leader"

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
        and 5xx answers until the deadline. Other statuses are returned to the caller."""
        if self.current is None:
            self.select()
        params = dict(params or {})
        if self.datacenter:
            params["dc"] = self.datacenter
        while True:
            server = self.current
            assert server is not None
            try:
                resp = self._send(server, method, path, params, body, timeout)
            except requests.RequestException as exc:
                problem = _describe_transport(exc)
            else:
                if resp.status not in _RETRYABLE_STATUS:
                    return resp
                problem = f"HTTP {resp.status} {_snippet(resp.body)}"
                if self.datacenter and b"No path to datacenter" in resp.body:
                    # The servers of one datacenter share one WAN view: failing over to another
                    # cannot help, and a typo in the config must not look like "try again".
                    raise ConsulError(
                        f"Consul has no path to datacenter {self.datacenter!r} (unknown, or all "
                        f"its servers are down; check the datacenter setting): {problem}",
                        resp.status,
                    )
            logger.warning(
                "Consul server {} failed {} {}: {}; failing over", server, method, path, problem
            )
            if self.deadline.expired():
                raise ConsulUnavailable(f"Consul request {method} {path} failed: {problem}")
            self.select(after=server)

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
                method, server + path, params=params, data=body, timeout=(connect, read)
            )
        except requests.RequestException as exc:
            logger.debug(
                "{} {}{} failed after {:.1f} ms: {}",
                method,
                server,
                path,
                (time.monotonic() - started) * 1000,
                _describe_transport(exc),
            )
            raise
        logger.debug(
            "{} {}{} -> {} in {:.1f} ms",
            method,
            server,
            path,
            r.status_code,
            (time.monotonic() - started) * 1000,
        )
        return Response(r.status_code, r.content, dict(r.headers))


_TIMEOUTS = frozenset({"connect timed out", "no answer before the read timeout"})


def _telling(before: str | None, now: str) -> str:
    # The last tries are squeezed by the deadline and often just time out: a TLS failure, a
    # refused connection or an HTTP status seen before says more about what to fix.
    if before is not None and now in _TIMEOUTS and before not in _TIMEOUTS:
        return before
    return now


def _describe_transport(exc: requests.RequestException) -> str:
    if isinstance(exc, requests.ConnectTimeout):
        return "connect timed out"
    if isinstance(exc, requests.ReadTimeout):
        return "no answer before the read timeout"
    if isinstance(exc, requests.exceptions.SSLError):
        return f"TLS error ({exc})"
    if isinstance(exc, requests.ConnectionError):
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
