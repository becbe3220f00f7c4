"""The alert rules (deploy/prometheus/ipam-da-consul.rules.yml) as Debian's promtool reads
them: they load, every alert fires in its unit tests (ipam-da-consul.rules.test.yml) and keeps
quiet where it must, and they query only what ipam-da-consul exports (the metrics catalog).
The same rules in a real Prometheus, scraping a real helper: tests/e2e/test_prometheus.py."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.support.promql import (
    RULE_TESTS,
    RULES,
    known_series,
    load_yaml,
    metric_names,
    recorded,
    rules,
)

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="needs Debian's promtool (apt-get install prometheus)"
)


@needs_promtool
def test_promtool_checks_the_rules() -> None:
    done = subprocess.run([str(PROMTOOL), "check", "rules", str(RULES)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


@needs_promtool
def test_the_rules_unit_tests_pass() -> None:
    done = subprocess.run([str(PROMTOOL), "test", "rules", RULE_TESTS.name],
                          capture_output=True, text=True, timeout=120, cwd=RULE_TESTS.parent)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_is_tested_firing_and_quiet() -> None:
    tested = [t for case in load_yaml(RULE_TESTS)["tests"]
              for t in case.get("alert_rule_test", [])]
    fired = {t["alertname"] for t in tested if t.get("exp_alerts")}
    quiet = {t["alertname"] for t in tested if not t.get("exp_alerts")}
    alerts = {r["alert"] for r in rules() if "alert" in r}
    assert fired == alerts
    # Each one with a `for:` is shown pending (quiet) before it fires; the others next to a
    # case they must not page for.
    assert quiet == alerts


def test_every_recording_rule_is_tested() -> None:
    """The alerts stand on the recording rules: each one's values are checked on their own,
    so a wrong aggregation shows there rather than as an alert that happens to fire."""
    exprs = {t["expr"].strip() for case in load_yaml(RULE_TESTS)["tests"]
             for t in case.get("promql_expr_test", [])}
    assert recorded() <= exprs


def test_every_alert_says_how_bad_and_what_to_do() -> None:
    for rule in rules():
        if "alert" in rule:
            assert rule["alert"].startswith("IpamDaConsul"), rule
            assert rule["labels"]["severity"] in ("warning", "critical"), rule
            assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule


def test_the_rules_query_only_what_is_exported() -> None:
    allowed = known_series()
    for rule in rules():
        used = metric_names(rule["expr"])
        assert used, rule
        assert used <= allowed, (rule.get("alert") or rule.get("record"), used - allowed)


@pytest.mark.parametrize(("expr", "names"), [
    ('sum by (a, b) (rate(x_total{code!="0"}[5m])) / on (a) group_left y', {"x_total", "y"}),
    ("histogram_quantile(0.99, sum by (le) (rate(h_bucket[$__rate_interval])))", {"h_bucket"}),
    ("predict_linear(r:free:min[6h], 4 * 3600) <= 0 and on (p) r:ratio < 1e-3", {"r:free:min",
                                                                               "r:ratio"}),
    ('time() - max(ts_seconds offset 1h) > 900 or absent(m)', {"ts_seconds", "m"}),
    ('label_replace(up, "a", "$1", "b", "(.*)")', {"up"}),
])
def test_metric_names_finds_the_selectors(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names
