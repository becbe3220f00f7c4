"""The metrics catalog (cni/helper/catalog.py) is the one list of what is exported: the helper's
exposition and `usage --prometheus` match it family for family, its names follow Prometheus's
conventions, no label can take a value per container, and docs/metrics.md is its table. The
helper's counters are fed by calls' reports and the client's request hook, never by log text."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

from ipam_da_consul.cni.events import CallRecord, Step
from ipam_da_consul.cni.helper import catalog
from ipam_da_consul.cni.helper.metrics import Metrics, Sources
from ipam_da_consul.consul import Sent
from loguru import logger
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[3]
# Labels whose values would grow with the workload: one series per container, address, call.
UNBOUNDED = {"container", "container_id", "target", "ip", "address", "call", "call_id", "id",
             "ifname", "netns", "host", "key", "path", "url", "error"}

POOL_ROW = ("http://***@c:8500", "ipam/", "blue", 3, 51)
SOURCES = Sources(stats=lambda: {"served": 2, "pools": 1, "caches": 1}, active=lambda: 1,
                  pools=lambda: [POOL_ROW])


def exposition(metrics: Metrics) -> dict[str, Any]:
    metrics.state.sources = SOURCES
    status, _, body = metrics.respond("/metrics", {})
    assert status == 200
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def report(**kw: Any) -> CallRecord:
    r = CallRecord("c0ffee", command="ADD", container="abc", ifname="eth0", network="n",
               pools=["blue"], code=0, seconds=0.02)
    for k, v in kw.items():
        setattr(r, k, v)
    return r


def test_names_follow_prometheus_conventions() -> None:
    names = [m.name for m in catalog.METRICS]
    assert len(names) == len(set(names))
    for m in catalog.METRICS:
        assert re.fullmatch(r"[a-z_][a-z0-9_]*", m.name), m.name
        assert m.name.startswith(f"{catalog.PREFIX}_") or m.name.startswith("process_"), m.name
        assert m.kind in ("counter", "gauge", "histogram"), m
        assert m.name.endswith("_total") == (m.kind == "counter"), m.name
        if m.kind == "histogram" or "duration" in m.name or "timestamp" in m.name:
            assert m.name.endswith("_seconds"), m.name  # base unit in the name
        assert not set(m.labels) & UNBOUNDED, m
        assert all(re.fullmatch(r"[a-z_][a-z0-9_]*", label) for label in m.labels), m
        assert m.help and m.sources and set(m.sources) <= {catalog.HELPER, catalog.USAGE}


def test_the_helper_exports_exactly_the_catalogs_helper_families() -> None:
    metrics = Metrics()
    sent = Sent("PUT", "http://***@c:8500", "/v1/txn", 200, None, 0.003)
    metrics.observe_call(report(conflicts=2, requests=[sent]))
    metrics.background_request(Sent("GET", "http://c:8500", "/v1/kv/x", None, "timed out", 30))
    families = exposition(metrics)
    wanted = {m.name.removesuffix("_total"): m for m in catalog.METRICS
              if catalog.HELPER in m.sources}
    assert set(families) == set(wanted)
    for name, family in families.items():
        m = wanted[name]
        assert family.type == m.kind, name
        if name.startswith(catalog.PREFIX):  # process_* help is prometheus_client's
            assert family.documentation == m.help, name
        for sample in family.samples:
            assert set(sample.labels) - {"le"} == set(m.labels), (name, sample)
            assert sample.name in m.series, sample.name


def test_a_calls_report_and_background_requests_are_counted() -> None:
    metrics = Metrics()
    requests = [
        Sent("GET", "http://c:8500", "/v1/status/leader", 200, None, 0.001),
        Sent("PUT", "http://c:8500", "/v1/txn", 200, None, 0.004),
        Sent("PUT", "http://c:8500", "/v1/txn", None, "connection dropped", 0.5),
    ]
    metrics.observe_call(report(conflicts=2, requests=requests))
    metrics.observe_call(report(command="NOPE", code=4))
    metrics.background_request(requests[0])
    metrics.observe_replay(report(command="DEL", requests=[requests[1]]))

    def value(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    p = catalog.PREFIX
    assert value(f"{p}_calls_total", command="ADD", code="0") == 1
    assert value(f"{p}_calls_total", command="other", code="4") == 1  # bounded commands
    assert value(f"{p}_call_duration_seconds_count", command="ADD", code="0") == 1
    assert value(f"{p}_cas_conflicts_total", command="ADD") == 2
    assert value(f"{p}_consul_requests_total", source="call", method="PUT", status="200") == 1
    assert value(f"{p}_consul_requests_total", source="call", method="PUT", status="error") == 1
    assert value(f"{p}_consul_requests_total", source="call", method="GET", status="200") == 1
    assert value(f"{p}_consul_requests_total", source="background", method="GET",
                 status="200") == 1
    assert value(f"{p}_consul_requests_total", source="background", method="PUT",
                 status="200") == 1  # the replay's
    assert value(f"{p}_consul_request_duration_seconds_count", source="call", method="PUT") == 2


def test_no_log_line_reaches_the_metrics() -> None:
    """The old sink counted requests and conflicts from debug lines: such lines now count
    nothing, whatever they say."""
    metrics = Metrics()
    with logger.contextualize(call=None, command="ADD"):
        logger.debug("GET http://c:8500/v1/kv/x -> 200 in 1.0 ms")
        logger.debug("lost the race for 10.0.0.10 in pool 'p'; retrying")
    families = exposition(metrics)
    assert all(not f.samples for n, f in families.items()
               if n.endswith(("consul_requests", "cas_conflicts")))


def test_only_the_log_writer_reads_log_records() -> None:
    """A loguru sink is how code reads what others log: the product's write lines out (the
    router in cni/logs.py to stderr and the log file, the admin CLI's to stderr) and nothing
    else. Metrics and the rest get their events explicitly (cni/events.py)."""
    readers = []
    for path in [*ROOT.glob("cni/**/*.py"), *ROOT.glob("consul/*.py"),
                 *ROOT.glob("allocator/*.py"), *ROOT.glob("admin/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "add" and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "logger"):
                readers.append((path.relative_to(ROOT).as_posix(), ast.unparse(node.args[0])))
    assert ("cni/logs.py", "_route") in readers
    assert {sink for _, sink in readers} <= {"_route", "sys.stderr"}, readers


class _Layout:
    prefix = "ipam/"


class _Settings:
    servers = ("http://user:pw@c:8500",)
    layout = _Layout()


class _Usage:
    allocated, capacity, free = 3, 10, 7


def test_usage_prometheus_families_are_the_catalogs() -> None:
    from ipam_da_consul.admin import commands

    text = commands._usage_prometheus(
        _Settings(), [("blue", _Usage(), 0)]  # type: ignore[arg-type, list-item]
    )
    assert "pw" not in text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    wanted = {m.name: m for m in catalog.METRICS if catalog.USAGE in m.sources}
    assert set(families) == set(wanted)
    for name, family in families.items():
        m = wanted[name]
        assert (family.type, family.documentation) == (m.kind, m.help)
        for sample in family.samples:
            assert tuple(sample.labels) == m.labels


def test_the_metrics_table_in_the_docs_is_the_catalog() -> None:
    doc = (ROOT / "docs" / "metrics.md").read_text()
    rows = re.findall(r"^\| `([a-z_]+)` \| (\w+) \| ([^|]*) \|", doc, re.M)
    listed = {name: (kind, tuple(re.findall(r"`(\w+)`", labels))) for name, kind, labels in rows}
    assert listed == {m.name: (m.kind, m.labels) for m in catalog.METRICS}


def test_step_reports_walks() -> None:
    r = CallRecord("x", steps=[Step("start", "parsed", "parse"), Step("parsed", "done", "report")])
    assert r.walk == ["start", "parsed", "done"]
