"""Prometheus metrics of the helper, served on an opt-in HTTP listener.

Only the helper imports this module (and with it prometheus_client), and only when asked to
serve metrics: the thin client and the in-process plugin never pay for it. What is exported,
with names, types, labels and help, is catalog.py's one list.

What is counted comes from explicit events, never from log text: each call's account of itself
(cni/events.py CallRecord: its command and code, its lost compare-and-sets, every Consul request
its stores sent), handed over by the machine when the call ends (`observe_call`); the requests
of the pool watchers and of the journal's replay from the Consul client's `on_request` hook
(`background_request`); cache refreshes from the KV the helper hands its pool watchers; the
pools' sizes and the helper's counts from the cache and the server, read when scraped.

The listener is this module's own (`Listener`), not prometheus_client's `start_http_server`,
which gave every connection a thread and no timeout: any local user could hold a thousand idle
connections, take every descriptor the helper had, and so keep calls from being accepted on its
unix socket (issue 25). Here one thread serves every connection; each one has a deadline, at
most `MAX_CONNECTIONS` are held at once, and running out of descriptors pauses accepting
instead of spinning.
"""

from __future__ import annotations

import builtins
import contextlib
import gzip
import math
import re
import resource
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

import prometheus_client
from loguru import logger
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.registry import Collector

from . import catalog
from .catalog import DROP_REASONS, OUTCOMES, PREFIX

if TYPE_CHECKING:
    from ...allocator.store import KVEntry, Op, TxnResult, WatchableKV
    from ..events import CallRecord, Request

__all__ = ["DROP_REASONS", "PREFIX", "Metrics", "Sources"]

# What the listener allows a connection. A scraper sends its request at once and reads an
# answer of some kilobytes: seconds are plenty, and a slower client only holds a descriptor.
REQUEST_TIMEOUT = 5.0  # from accept to the end of the request's headers
ANSWER_TIMEOUT = 10.0  # to hand the whole answer to the kernel (a reader that stopped reading)
MAX_REQUEST = 8192  # request line and headers; a scrape's are a few hundred bytes
# Connections held at once (a scraper needs one); more are closed as soon as accepted. The
# descriptors left are the calls': see connection_cap.
MAX_CONNECTIONS = 32


@dataclass(frozen=True)
class Sources:
    """What the scrape reads from the helper, as plain callables so this module knows nothing
    of the server: its request counters and pool/cache counts (HelperServer.stats), the
    connections it is handling, and one row per cached pool (PoolCaches.pool_sizes)."""

    stats: Callable[[], Mapping[str, int]]
    active: Callable[[], int]
    pools: Callable[[], Iterable[tuple[str, str, str, int, int]]]


# A call through the helper is milliseconds, a cold pool load or a CAS storm seconds, and the
# default `ipam.timeout` is 15 s.
CALL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 30)
# Background watchers' blocking queries wait up to 30 s by design; they get their own label.
CONSUL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 35)
_BUCKETS = {
    f"{PREFIX}_call_duration_seconds": CALL_BUCKETS,
    f"{PREFIX}_consul_request_duration_seconds": CONSUL_BUCKETS,
}


def _counter(name: str, registry: CollectorRegistry) -> Counter:
    m = catalog.metric(name)
    return Counter(m.base, m.help, list(m.labels), registry=registry)


def _histogram(name: str, registry: CollectorRegistry) -> Histogram:
    m = catalog.metric(name)
    return Histogram(m.base, m.help, list(m.labels), buckets=_BUCKETS[name], registry=registry)


class Metrics:
    def __init__(self) -> None:
        # One process, one exposition: no `_created` series doubling every counter.
        prometheus_client.disable_created_metrics()
        self.registry = CollectorRegistry()
        r = self.registry
        self.calls = _counter(f"{PREFIX}_calls_total", r)
        self.call_seconds = _histogram(f"{PREFIX}_call_duration_seconds", r)
        self.conflicts = _counter(f"{PREFIX}_cas_conflicts_total", r)
        self.consul_requests = _counter(f"{PREFIX}_consul_requests_total", r)
        self.consul_seconds = _histogram(f"{PREFIX}_consul_request_duration_seconds", r)
        self.refreshes = _counter(f"{PREFIX}_cache_refreshes_total", r)
        self.dropped = _counter(f"{PREFIX}_metrics_connections_dropped_total", r)
        for reason in DROP_REASONS:
            self.dropped.labels(reason)  # shown at 0 from the start: rate() needs a first sample
        prometheus_client.ProcessCollector(registry=r)
        self.state = _StateCollector()
        r.register(self.state)
        self.listener: Listener | None = None

    def observe_call(self, record: CallRecord) -> None:
        """A call the helper served has ended (execute()'s observer)."""
        command, code = _command(record.command), str(record.code)
        self.calls.labels(command, code).inc()
        self.call_seconds.labels(command, code).observe(record.seconds)
        if record.conflicts:
            self.conflicts.labels(command).inc(record.conflicts)
        for sent in record.requests:
            self._request("call", sent)

    def background_request(self, sent: Request) -> None:
        """A request of a pool watcher (the Consul client's on_request)."""
        self._request("background", sent)

    def observe_replay(self, record: CallRecord) -> None:
        """Work the journal's replay did for an entry: its requests are the helper's own."""
        for sent in record.requests:
            self._request("background", sent)

    def _request(self, source: str, sent: Request) -> None:
        status = "error" if sent.status is None else str(sent.status)
        self.consul_requests.labels(source, sent.method, status).inc()
        self.consul_seconds.labels(source, sent.method).observe(sent.seconds)

    def watch_kv(self, kv: WatchableKV) -> WatchableKV:
        return _CountingKV(kv, self.refreshes)

    def serve(
        self,
        address: tuple[str, int],
        sources: Sources,
        *,
        max_connections: int | None = None,
        request_timeout: float = REQUEST_TIMEOUT,
        answer_timeout: float = ANSWER_TIMEOUT,
    ) -> str:
        """Start the HTTP listener (a daemon thread); returns its URL. The keyword arguments
        are for tests; the cap defaults to connection_cap of the soft RLIMIT_NOFILE."""
        self.state.sources = sources
        host, port = address
        sock = bind(host, port)
        if max_connections is None:
            max_connections = connection_cap(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        self.listener = Listener(
            sock, self.respond, self.dropped, max_connections, request_timeout, answer_timeout
        )
        self.listener.start()
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{sock.getsockname()[1]}/metrics"

    def respond(self, target: str, headers: Mapping[str, str]) -> Answer:
        """The answer to a GET of `target`: the exposition at /metrics, negotiated as
        prometheus_client's own server did (text or OpenMetrics by Accept, gzip by
        Accept-Encoding, `name[]` to select families); a line saying so at /."""
        url = urlsplit(target)
        if url.path == "/":
            return 200, [_TEXT], b"ipam-da-consul helper: metrics at /metrics\n"
        if url.path != "/metrics":
            return 404, [_TEXT], b"not found: metrics are at /metrics\n"
        encoder, content_type = choose_encoder(headers.get("accept", ""))
        registry: Collector = self.registry
        names = parse_qs(url.query).get("name[]")
        if names:
            registry = self.registry.restricted_registry(names)
        body = encoder(registry)
        out = [("Content-Type", content_type)]
        if gzip_accepted(headers.get("accept-encoding", "")):
            body = gzip.compress(body)
            out.append(("Content-Encoding", "gzip"))
        return 200, out, body

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()


def _command(command: str) -> str:
    return command if command in _COMMANDS else "other"  # bounded label values


_COMMANDS = frozenset(catalog.COMMANDS) - {"other"}

# (status, headers, body); Content-Length and Connection are the listener's.
Answer = tuple[int, list[tuple[str, str]], bytes]
_TEXT = ("Content-Type", "text/plain; charset=utf-8")


def connection_cap(soft_limit: int) -> int:
    """Connections the listener may hold: MAX_CONNECTIONS, but never more than 1/32 of the
    process's descriptors, so that the unix socket's calls (each holds its client's connection
    and one to Consul) and the pool watchers always have the rest. The helper raises its soft
    limit to the hard one at start (cli.py), and the unit sets 8192; 1024 still gives 32."""
    if soft_limit < 0:  # RLIM_INFINITY
        return MAX_CONNECTIONS
    return max(1, min(MAX_CONNECTIONS, soft_limit // 32))


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port, of the family the host resolves to first (as
    prometheus_client chose it: "::1" or "localhost" work as well as "0.0.0.0")."""
    family, kind, proto, _, sockaddr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart on the same port
        sock.bind(sockaddr)
        # A burst waits in the kernel's queue, costing the helper nothing. A full queue would
        # drop connections (retried by the client's kernel for seconds) or leave clients
        # believing they are connected when the listener never saw them.
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    return sock


class _Connection:
    __slots__ = ("answer", "deadline", "request", "sock")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.request = bytearray()
        self.answer: memoryview | None = None  # what is left to send, once the request is read


# The end of a request's headers: CRLF CRLF, or bare LFs from a hand-typed request.
_HEAD_END = re.compile(rb"\r?\n\r?\n")
# accept() failing for want of memory or descriptors: the pending connection stays queued and
# the socket stays readable, so retrying at once would spin.
_BACKOFF_FIRST, _BACKOFF_MOST = 0.05, 1.0
_TICK = 0.5  # the longest the loop sleeps: how soon close() is noticed


class Listener:
    """An HTTP/1.1 server for GET and HEAD on one thread: a selector over the listening socket
    and the connections it holds, each answered once and closed (`Connection: close`).

    What a client can cost the helper: one descriptor for REQUEST_TIMEOUT, then
    ANSWER_TIMEOUT, at most; at most `max_connections` of them at once (more are closed as soon
    as accepted and counted as over_cap); MAX_REQUEST bytes of buffer. When accept() fails
    (EMFILE, ENFILE, ENOBUFS...) the listener stops accepting for 50 ms, doubling to 1 s while it
    keeps failing, and serves the connections it has meanwhile."""

    def __init__(
        self,
        sock: socket.socket,
        respond: Callable[[str, Mapping[str, str]], Answer],
        dropped: Counter,
        max_connections: int = MAX_CONNECTIONS,
        request_timeout: float = REQUEST_TIMEOUT,
        answer_timeout: float = ANSWER_TIMEOUT,
    ) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.respond = respond
        self.dropped = dropped
        self.max_connections = max_connections
        self.request_timeout = request_timeout
        self.answer_timeout = answer_timeout
        self.connections: set[_Connection] = set()
        self.selector = selectors.DefaultSelector()
        self.selector.register(sock, selectors.EVENT_READ)
        self.backoff = 0.0
        self.paused_until: float | None = None
        self.warned_at = -math.inf
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="metrics", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self.stopping = True
        if self.thread.is_alive():
            # Seen within _TICK, unless a scrape's collection is stuck: then exit regardless.
            self.thread.join(5)
        for conn in list(self.connections):
            self._close(conn)
        self.selector.close()
        self.sock.close()

    def _run(self) -> None:
        while not self.stopping:
            now = time.monotonic()
            if self.paused_until is not None and now >= self.paused_until:
                self.paused_until = None
                self.selector.register(self.sock, selectors.EVENT_READ)
            wake = min(
                [now + _TICK, *(c.deadline for c in self.connections)]
                + ([self.paused_until] if self.paused_until is not None else [])
            )
            for key, _ in self.selector.select(max(wake - now, 0.0)):
                if key.data is None:
                    self._accept()
                else:
                    self._step(key.data)
            now = time.monotonic()
            for conn in [c for c in self.connections if c.deadline <= now]:
                self._drop(conn, "timeout")

    def _accept(self) -> None:
        # A bounded batch: during a flood, the connections already held are still served.
        for _ in range(64):
            try:
                sock, _ = self.sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                self._pause(exc)
                return
            self.backoff = 0.0
            if len(self.connections) >= self.max_connections:
                sock.close()
                self.dropped.labels("over_cap").inc()
                continue
            sock.setblocking(False)
            conn = _Connection(sock, time.monotonic() + self.request_timeout)
            self.connections.add(conn)
            self.selector.register(sock, selectors.EVENT_READ, conn)

    def _pause(self, exc: OSError) -> None:
        self.backoff = min(max(self.backoff * 2, _BACKOFF_FIRST), _BACKOFF_MOST)
        now = time.monotonic()
        self.paused_until = now + self.backoff
        self.selector.unregister(self.sock)
        if now - self.warned_at >= 60:  # while it lasts, once a minute is enough
            self.warned_at = now
            logger.warning(
                "metrics: cannot accept a connection ({}); trying again in {:g} s, up to {:g} s "
                "apart while it lasts", exc.strerror or exc, self.backoff, _BACKOFF_MOST,
            )

    def _step(self, conn: _Connection) -> None:
        if conn not in self.connections:
            return
        try:
            if conn.answer is None:
                self._read(conn)
            else:
                self._write(conn)
        except BlockingIOError:
            return
        except OSError:
            self._close(conn)  # reset by the client, or the like
        except Exception as exc:
            # A bug here must cost one scrape, never the listener thread.
            logger.warning("metrics: a scrape failed: {!r}", exc)
            self._close(conn)

    def _read(self, conn: _Connection) -> None:
        chunk = conn.sock.recv(4096)
        if not chunk:
            self._close(conn)  # the client gave up
            return
        conn.request += chunk
        end = _HEAD_END.search(conn.request)
        if (end is None and len(conn.request) > MAX_REQUEST) or (
            end is not None and end.end() > MAX_REQUEST
        ):
            self.dropped.labels("invalid").inc()
            self._answer(conn, (431, [_TEXT], b"request too large\n"))
        elif end is not None:
            self._answer(conn, *self._dispatch(bytes(conn.request[: end.start()])))

    def _dispatch(self, head: bytes) -> tuple[Answer, bool]:
        """The answer to a request's head, and whether to send its body (not for HEAD)."""
        lines = head.decode("latin-1").lstrip("\r\n").split("\n")
        parts = lines[0].split()
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name.strip():
                parts = []
                break
            headers[name.strip().lower()] = value.strip()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            self.dropped.labels("invalid").inc()
            return (400, [_TEXT], b"bad request\n"), True
        method, target, _ = parts
        if method not in ("GET", "HEAD"):
            return (405, [_TEXT, ("Allow", "GET, HEAD")], b"only GET\n"), True
        try:
            answer = self.respond(target, headers)
        except Exception as exc:
            logger.warning("metrics: collecting failed: {!r}", exc)
            answer = (500, [_TEXT], b"collecting metrics failed\n")
        return answer, method != "HEAD"

    def _answer(self, conn: _Connection, answer: Answer, with_body: bool = True) -> None:
        status, headers, body = answer
        head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}"]
        head += [f"{name}: {value}" for name, value in headers]
        head += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
        conn.answer = memoryview("\r\n".join(head).encode("latin-1") + (body if with_body else b""))
        conn.deadline = time.monotonic() + self.answer_timeout
        self.selector.modify(conn.sock, selectors.EVENT_WRITE, conn)
        self._write(conn)

    def _write(self, conn: _Connection) -> None:
        assert conn.answer is not None
        sent = conn.sock.send(conn.answer)
        conn.answer = conn.answer[sent:]
        if not conn.answer:
            self._close(conn)

    def _drop(self, conn: _Connection, reason: str) -> None:
        self.dropped.labels(reason).inc()
        self._close(conn)

    def _close(self, conn: _Connection) -> None:
        self.connections.discard(conn)
        with contextlib.suppress(KeyError, ValueError):  # not registered yet
            self.selector.unregister(conn.sock)
        conn.sock.close()


class _CountingKV:
    """The KV a pool watcher uses, counting the refreshes it triggers: the watcher refreshes
    exactly when its blocking query returns another index than the one it sent."""

    def __init__(self, kv: WatchableKV, refreshes: Counter) -> None:
        self.kv = kv
        self.refreshes = refreshes

    def get(self, key: str, consistent: bool = False) -> KVEntry | None:
        return self.kv.get(key, consistent)

    def list(self, prefix: str, consistent: bool = False) -> Sequence[KVEntry]:
        return self.kv.list(prefix, consistent)

    def create_session(self, name: str, ttl: float) -> str:
        return self.kv.create_session(name, ttl)

    def keys(self, prefix: str) -> Sequence[str]:
        return self.kv.keys(prefix)

    def create(self, key: str, value: bytes) -> bool:
        return self.kv.create(key, value)

    def replace(self, key: str, value: bytes, index: int) -> bool:
        return self.kv.replace(key, value, index)

    def delete(self, key: str, index: int) -> bool:
        return self.kv.delete(key, index)

    def txn(self, ops: Sequence[Op]) -> TxnResult:
        return self.kv.txn(ops)

    def list_after(
        self, prefix: str, index: int = 0, wait_seconds: float = 0.0
    ) -> tuple[Sequence[KVEntry], int]:
        return self.kv.list_after(prefix, index, wait_seconds)

    def keys_after(
        self, prefix: str, index: int = 0, wait_seconds: float = 0.0
    ) -> tuple[builtins.list[str], int]:
        keys, new = self.kv.keys_after(prefix, index, wait_seconds)
        if new != index:
            self.refreshes.inc()
        return keys, new

    def close(self) -> None:
        close = getattr(self.kv, "close", None)  # the watcher's connection (WatchKV)
        if callable(close):
            close()


class _StateCollector(Collector):
    """Read at scrape time: the cached pools and the helper's own counters."""

    def __init__(self) -> None:
        self.sources: Sources | None = None

    def describe(self) -> Iterable[Metric]:
        return []  # dynamic: nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        sources = self.sources
        if sources is None:
            return
        labels = list(catalog.POOL)
        allocated = _gauge(f"{PREFIX}_pool_allocated", labels)
        capacity = _gauge(f"{PREFIX}_pool_capacity", labels)
        # Caches differ by token too; tokens are never a label, so the same pool read with two
        # tokens is shown once (the most recently used cache, last in LRU order, wins).
        rows: dict[tuple[str, str, str], tuple[int, int]] = {}
        for servers, prefix, name, held, size in sources.pools():
            rows[servers, prefix, name] = (held, size)
        for row, (held, size) in sorted(rows.items()):
            allocated.add_metric(list(row), held)
            capacity.add_metric(list(row), size)
        yield allocated
        yield capacity

        m = catalog.metric(f"{PREFIX}_helper_requests_total")
        requests = CounterMetricFamily(m.base, m.help, labels=list(m.labels))
        counts = sources.stats()
        for outcome in OUTCOMES:
            requests.add_metric([outcome], counts.get(outcome, 0))
        yield requests
        # Counted by the journal since the helper started (PoolCaches.counts), so a counter
        # as prometheus_client's own are: reset by a restart, which rate() copes with.
        m = catalog.metric(f"{PREFIX}_journal_entries_total")
        journal = CounterMetricFamily(m.base, m.help, labels=list(m.labels))
        for outcome in catalog.JOURNAL_OUTCOMES:
            journal.add_metric([outcome], counts.get(f"journal_{outcome}", 0))
        yield journal
        active = catalog.metric(f"{PREFIX}_helper_connections_active")
        yield GaugeMetricFamily(active.name, active.help, value=sources.active())
        # The server's counts the catalog names (room for more: a row with `stat=` is enough).
        for m in catalog.METRICS:
            if m.stat is not None and catalog.HELPER in m.sources:
                yield GaugeMetricFamily(m.name, m.help, value=counts.get(m.stat, 0))


def _gauge(name: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, catalog.metric(name).help, labels=labels)
