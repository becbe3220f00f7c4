"""Every metric ipam-da-consul exports, in one list: the helper's `/metrics` (metrics.py builds
its counters and histograms from here) and `ipam-da-consul-admin usage --prometheus` (the
node_exporter textfile: its names, types and help come from here too). The alert rules and the
Grafana dashboard in deploy/ are tested against this list (tests/unit/cni/test_metrics_catalog.py,
tests/e2e/test_prometheus.py), and docs/metrics.md is its table.

Naming follows Prometheus's conventions: one `ipam_da_consul_` prefix, base units in the name
(`_seconds`), `_total` on counters only, and label values from small closed sets (CNI commands
and codes, HTTP methods and statuses, the configured servers, prefixes and pools): never a
container ID, an address or a call ID, each of which would make a series per container.

Standard library only: the admin CLI imports it, and must not pay for prometheus_client.
"""

from __future__ import annotations

from dataclasses import dataclass

PREFIX = "ipam_da_consul"

HELPER = "helper"  # ipam-da-consul-helper --metrics-address
USAGE = "usage"  # ipam-da-consul-admin usage --prometheus (node_exporter's textfile collector)


@dataclass(frozen=True)
class Metric:
    name: str
    kind: str  # counter, gauge or histogram
    labels: tuple[str, ...]
    help: str
    sources: tuple[str, ...] = (HELPER,)
    # A gauge the helper reads from HelperServer.stats() at scrape time: that key.
    stat: str | None = None

    @property
    def base(self) -> str:
        """The name prometheus_client is given: it adds `_total` to a counter itself."""
        return self.name.removesuffix("_total") if self.kind == "counter" else self.name

    @property
    def series(self) -> tuple[str, ...]:
        """The names a query can use: a histogram's buckets, sum and count."""
        if self.kind == "histogram":
            return tuple(f"{self.name}{s}" for s in ("_bucket", "_sum", "_count"))
        return (self.name,)


POOL = ("consul", "prefix", "pool")

METRICS: tuple[Metric, ...] = (
    # -- calls the helper serves ---------------------------------------------------------------
    Metric(
        f"{PREFIX}_calls_total", "counter", ("command", "code"),
        "Calls the helper ran, by CNI command (ADD, DEL, CHECK, GC, STATUS, VERSION, other) and "
        "exit code (0 for success, else the CNI error code)",
    ),
    Metric(
        f"{PREFIX}_call_duration_seconds", "histogram", ("command", "code"),
        "Time the helper spent running a call, from the client's go to the answer, by CNI "
        "command and exit code",
    ),
    Metric(
        f"{PREFIX}_cas_conflicts_total", "counter", ("command",),
        "Allocation writes that lost a compare-and-set to another writer, by CNI command",
    ),
    # -- Consul, from the helper ---------------------------------------------------------------
    Metric(
        f"{PREFIX}_consul_requests_total", "counter", ("source", "method", "status"),
        "HTTP requests sent to Consul; source is call (serving a runtime's call) or background "
        "(pool watchers, the journal's replay); status is the HTTP status, or error when no "
        "answer came (refused, timed out, dropped, TLS)",
    ),
    Metric(
        f"{PREFIX}_consul_request_duration_seconds", "histogram", ("source", "method"),
        "Latency of HTTP requests to Consul (background ones include a blocking query's wait, "
        "up to 30 s)",
    ),
    Metric(
        f"{PREFIX}_cache_refreshes_total", "counter", (),
        "Background refreshes of a cached pool after Consul reported a change",
    ),
    # -- pools ---------------------------------------------------------------------------------
    Metric(
        f"{PREFIX}_pool_allocated", "gauge", POOL,
        "Allocated addresses of a pool: from the helper, keys in its copy of a whole pool "
        "(pools it keeps whole: pick lowest or spread); from usage, keys named after an "
        "allocatable address of the pool's ranges",
        (HELPER, USAGE),
    ),
    Metric(
        f"{PREFIX}_pool_capacity", "gauge", POOL,
        "Addresses a pool's ranges can hand out (no network, broadcast, gateway or excluded "
        "address)",
        (HELPER, USAGE),
    ),
    Metric(
        f"{PREFIX}_pool_free", "gauge", POOL,
        "Addresses of a pool's ranges still free, read from Consul",
        (USAGE,),
    ),
    Metric(
        f"{PREFIX}_usage_timestamp_seconds", "gauge", ("consul", "prefix"),
        "When ipam-da-consul-admin usage read these pools from Consul (Unix time): a textfile "
        "nobody refreshes shows its age here",
        (USAGE,),
    ),
    # -- the helper itself ---------------------------------------------------------------------
    Metric(
        f"{PREFIX}_helper_requests_total", "counter", ("outcome",),
        "Requests on the helper's socket by outcome: served, refused (another wire version), "
        "dropped_late (deadline passed before it ran), dropped_hung_up (the client did the call "
        "itself)",
    ),
    Metric(
        f"{PREFIX}_helper_connections_active", "gauge", (),
        "Connections on the helper's socket being handled now",
    ),
    Metric(
        f"{PREFIX}_helper_cached_pools", "gauge", (),
        "Pools (or stripes of pools) the helper keeps in memory and watches",
        stat="pools",
    ),
    Metric(
        f"{PREFIX}_helper_caches", "gauge", (),
        "Ways of reaching Consul (servers, token, TLS, prefix) the helper keeps warm",
        stat="caches",
    ),
    # -- the journal: what this host still owes Consul (the state folder) ---------------------
    Metric(
        f"{PREFIX}_journal_entries_total", "counter", ("outcome",),
        "What the helper's journal did, by outcome: taken_over (a DEL answered while Consul was "
        "unreachable, its address kept reserved until done), replayed (such a DEL finished in "
        "Consul), voided (writes in doubt undone), expired (given up on: an address may stay "
        "held until an operator acts, ipam-da-consul-admin journal)",
    ),
    Metric(
        f"{PREFIX}_journal_pending", "gauge", (),
        "Entries of the state folder with work left for Consul now",
        stat="journal_pending",
    ),
    Metric(
        f"{PREFIX}_metrics_connections_dropped_total", "counter", ("reason",),
        "Connections to the metrics listener that got no metrics: over_cap (closed at once, the "
        "listener held its most), timeout (request or answer too slow), invalid (malformed or "
        "too large a request)",
    ),
    # -- prometheus_client's process collector (the helper process) ------------------------------
    Metric("process_cpu_seconds_total", "counter", (), "User and system CPU time of the helper"),
    Metric("process_resident_memory_bytes", "gauge", (), "Resident memory of the helper"),
    Metric("process_virtual_memory_bytes", "gauge", (), "Virtual memory of the helper"),
    Metric(
        "process_start_time_seconds", "gauge", (),
        "When the helper started (Unix time): a change is a restart",
    ),
    Metric("process_open_fds", "gauge", (), "Open file descriptors of the helper"),
    Metric("process_max_fds", "gauge", (), "The helper's soft limit of file descriptors"),
)

BY_NAME = {m.name: m for m in METRICS}

# Label values that stay within a small set whatever the calls are (the others are listed with
# their metric): what a test checks scraped series against.
COMMANDS = ("ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION", "other")
SOURCES = ("call", "background")
OUTCOMES = ("served", "refused", "dropped_late", "dropped_hung_up")
DROP_REASONS = ("over_cap", "timeout", "invalid")
# The journal's counts in HelperServer.stats are `journal_<outcome>`.
JOURNAL_OUTCOMES = ("taken_over", "replayed", "voided", "expired")


def series_names(source: str | None = None) -> set[str]:
    """Every series name a query may use (of one source, or of all)."""
    return {s for m in METRICS if source is None or source in m.sources for s in m.series}


def metric(name: str) -> Metric:
    return BY_NAME[name]
