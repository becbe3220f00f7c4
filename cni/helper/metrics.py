"""Prometheus metrics of the helper, served on an opt-in HTTP listener.

Only the helper imports this module (and with it prometheus_client), and only when asked to
serve metrics: the thin client and the in-process plugin never pay for it.

What is counted comes from outside the state machine, so the machine stays the same whoever
runs it: calls and their latency from the helper's handler; Consul requests, their latency,
and compare-and-set conflicts from the debug lines the machine and the Consul client already
log (every call's lines reach a loguru sink here, tagged with the call's command); cache
refreshes from the KV the helper hands its pool watchers; the pools' sizes from the cache itself,
read when scraped.
"""

from __future__ import annotations

import builtins
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import prometheus_client
from loguru import logger
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from ...allocator.store import KVEntry, Op, TxnResult, WatchableKV

PREFIX = "ipam_da_consul"



@dataclass(frozen=True)
class Sources:
    """What the scrape reads from the helper, as plain callables so this module knows nothing
    of the server: its request counters and pool/cache counts (HelperServer.stats), the
    connections it is handling, and one row per cached pool (PoolCaches.pool_sizes)."""

    stats: Callable[[], Mapping[str, int]]
    active: Callable[[], int]
    pools: Callable[[], Iterable[tuple[str, str, str, int, int]]]


# consul/client.py: "<METHOD> <server><path> -> <status> in <ms> ms" or
# "<METHOD> <server><path> failed after <ms> ms: <why>".
_REQUEST = re.compile(
    r"^(?P<method>[A-Z]+) \S+ (?:-> (?P<status>\d{3}) in|failed after) (?P<ms>[\d.]+) ms"
)
# cni/machine.py, one line per compare-and-set another writer won: "lost the race for <ip> in
# pool ..." (the pool was read for this call) or "<ip> in pool ... was taken: the helper's cached
# copy was behind; ..." (the cached copy had not seen the other write yet).
_CONFLICT = re.compile(r"^lost the race for |^\S+ in pool .* was taken: ")

# A call through the helper is milliseconds, a cold pool load or a CAS storm seconds, and the
# default `ipam.timeout` is 15 s.
CALL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 30)
# Background watchers' blocking queries wait up to 30 s by design; they get their own label.
CONSUL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 35)


class Metrics:
    def __init__(self) -> None:
        # One process, one exposition: no `_created` series doubling every counter.
        prometheus_client.disable_created_metrics()
        self.registry = CollectorRegistry()
        r = self.registry
        self.calls = Counter(
            f"{PREFIX}_calls", "Calls the helper ran, by CNI command and exit code",
            ["command", "code"], registry=r,
        )
        self.call_seconds = Histogram(
            f"{PREFIX}_call_duration_seconds",
            "Time the helper spent running a call (after the client's go)",
            ["command"], buckets=CALL_BUCKETS, registry=r,
        )
        self.conflicts = Counter(
            f"{PREFIX}_cas_conflicts",
            "Allocation writes that lost a compare-and-set to another writer, by CNI command",
            ["command"], registry=r,
        )
        self.consul_requests = Counter(
            f"{PREFIX}_consul_requests",
            "HTTP requests sent to Consul; source is call or background (pool watchers); "
            "status is the HTTP status or error (no answer)",
            ["source", "method", "status"], registry=r,
        )
        self.consul_seconds = Histogram(
            f"{PREFIX}_consul_request_duration_seconds",
            "Latency of HTTP requests to Consul (background ones include the blocking wait)",
            ["source", "method"], buckets=CONSUL_BUCKETS, registry=r,
        )
        self.refreshes = Counter(
            f"{PREFIX}_cache_refreshes",
            "Background refreshes of a cached pool after Consul reported a change",
            registry=r,
        )
        prometheus_client.ProcessCollector(registry=r)
        self.state = _StateCollector()
        r.register(self.state)
        self.httpd: Any = None
        self.sink_id = logger.add(self._sink, level="DEBUG", format="{message}", catch=True)

    def observe_call(self, command: str, code: int, seconds: float) -> None:
        command = command if command in _COMMANDS else "other"  # bounded label values
        self.calls.labels(command, str(code)).inc()
        self.call_seconds.labels(command).observe(seconds)

    def watch_kv(self, kv: WatchableKV) -> WatchableKV:
        return _CountingKV(kv, self.refreshes)

    def serve(self, address: tuple[str, int], sources: Sources) -> str:
        """Start the HTTP listener (a daemon thread); returns its URL."""
        self.state.sources = sources
        host, port = address
        self.httpd, _ = start_http_server(port, host, registry=self.registry)
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{self.httpd.server_port}/metrics"

    def close(self) -> None:
        logger.remove(self.sink_id)
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()

    def _sink(self, message: Any) -> None:
        record = message.record
        text: str = record["message"]
        extra = record["extra"]
        found = _REQUEST.match(text)
        if found:
            source = "call" if extra.get("call") is not None else "background"
            method = found["method"]
            self.consul_requests.labels(source, method, found["status"] or "error").inc()
            self.consul_seconds.labels(source, method).observe(float(found["ms"]) / 1000)
        elif _CONFLICT.match(text):
            command = extra.get("command")
            self.conflicts.labels(command if command in _COMMANDS else "other").inc()


_COMMANDS = frozenset({"ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION"})


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
        labels = ["consul", "prefix", "pool"]
        allocated = GaugeMetricFamily(
            f"{PREFIX}_pool_allocated",
            "Keys in a cached pool's folder (allocations, as the helper's copy has them)",
            labels=labels,
        )
        capacity = GaugeMetricFamily(
            f"{PREFIX}_pool_capacity",
            "Addresses a cached pool's ranges can hand out (no network, broadcast, gateway, "
            "excluded addresses)",
            labels=labels,
        )
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

        requests = CounterMetricFamily(
            f"{PREFIX}_helper_requests",
            "Requests on the helper's socket by outcome: served, refused (wire version), "
            "dropped_late, dropped_hung_up (the client did the call itself)",
            labels=["outcome"],
        )
        counts = sources.stats()
        for outcome in ("served", "refused", "dropped_late", "dropped_hung_up"):
            requests.add_metric([outcome], counts.get(outcome, 0))
        yield requests
        for name, help_text, value in (
            ("helper_connections_active", "Connections being handled now", sources.active()),
            ("helper_cached_pools", "Pools in memory", counts.get("pools", 0)),
            ("helper_caches", "Ways of reaching Consul kept warm", counts.get("caches", 0)),
        ):
            yield GaugeMetricFamily(f"{PREFIX}_{name}", help_text, value=value)
