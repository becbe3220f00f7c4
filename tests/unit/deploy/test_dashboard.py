"""The Grafana dashboard (deploy/grafana/ipam-da-consul.json): every query parses as PromQL
(promtool reads each one as a recording rule), selects only what ipam-da-consul exports (the
metrics catalog), and the panels cover what an operator watches. The real Prometheus of
tests/e2e/test_prometheus.py runs every query too."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support.promql import (
    dashboard,
    dashboard_exprs,
    grafana_substitute,
    known_series,
    metric_names,
)

PROMTOOL = shutil.which("promtool")
P = "ipam_da_consul"


def test_the_dashboard_is_importable() -> None:
    d = dashboard()
    assert d["uid"] == "ipam-da-consul" and d["title"] == "ipam-da-consul"
    panels = [p for p in d["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in d["panels"]}) == len(d["panels"])
    for p in panels:
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"] and all(t["refId"] for t in p["targets"]), p["title"]
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
    # No two panels on the same cells.
    cells = [(p["gridPos"]["x"] + i, p["gridPos"]["y"] + j) for p in d["panels"]
             for i in range(p["gridPos"]["w"]) for j in range(p["gridPos"]["h"])]
    assert len(cells) == len(set(cells))
    names = {v["name"] for v in d["templating"]["list"]}
    assert names == {"datasource", "consul", "prefix", "pool", "instance"}


@pytest.mark.skipif(PROMTOOL is None, reason="needs Debian's promtool (apt-get install prometheus)")
def test_every_query_parses(tmp_path: Path) -> None:
    exprs = dashboard_exprs()
    rules = [{"record": f"dashboard:query_{i}", "expr": grafana_substitute(expr)}
             for i, (_, expr) in enumerate(exprs)]
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run([str(PROMTOOL), "check", "rules", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules)} rules found" in done.stdout


def test_every_query_selects_only_what_is_exported() -> None:
    allowed = known_series()
    for where, expr in dashboard_exprs():
        used = metric_names(grafana_substitute(expr))
        assert used, where
        assert used <= allowed, (where, used - allowed)


def test_the_panels_cover_what_operators_watch() -> None:
    used = {name for _, expr in dashboard_exprs() for name in metric_names(expr)}
    assert {
        f"{P}_pool_free", f"{P}_pool_capacity",  # per-pool usage and time to full
        f"{P}_calls_total", f"{P}_call_duration_seconds_bucket",  # calls by command and code
        f"{P}_consul_request_duration_seconds_bucket", f"{P}_consul_requests_total",
        f"{P}_cas_conflicts_total",
        f"{P}_helper_cached_pools", f"{P}_helper_caches", f"{P}_helper_connections_active",
        f"{P}_usage_timestamp_seconds",
    } <= used
    exprs = " ".join(e for _, e in dashboard_exprs())
    assert "deriv(" in exprs  # time to full
    assert "sum by (command, code, le)" in exprs  # latency percentiles by command and code
