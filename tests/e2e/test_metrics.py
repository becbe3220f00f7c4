"""The helper's metrics after real calls, and the metrics kept off unless asked for."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.support.agent import ConsulAgent
from tests.support.plugin import run_plugin
from tests.support.util_procs import Helper, consul_requests

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    text = requests.get(url, timeout=10).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum over the series of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


@pytest.fixture
def helper(tmp_path: Path):
    # A long refresh interval: after its first refresh the watcher sleeps, so a write made
    # behind the helper's back stays unseen and the next ADD loses a compare-and-set to it.
    h = Helper(
        tmp_path, refresh_interval=60, stderr=tmp_path / "helper.err",
        args=["--metrics-address", "127.0.0.1:0"],
    )
    yield h
    h.close()


def metrics_url(helper: Helper) -> str:
    found = re.search(r"metrics on (http://\S+)", helper.wait_stderr("metrics on "))
    assert found, helper.stderr_text()
    return found.group(1)


def test_counts_after_real_calls(
    helper: Helper, consul: ConsulAgent, make_pool, conf_for, tmp_path: Path
) -> None:
    url = metrics_url(helper)
    pool = make_pool()  # 10.0.21.100-10.0.21.150, gateway outside the range: 51 addresses
    conf = conf_for(pool)
    logs: list[Path] = []

    def call(command: str, container: str):
        log = tmp_path / f"{command}-{container}.log"
        logs.append(log)
        out = run_plugin(command, conf, container=container, verbose=True,
                         env={**helper.env, "IPAM_DA_CONSUL_LOG_FILE": str(log)})
        assert out.rc == 0, out
        return out

    assert call("ADD", "m1").json["ips"][0]["address"] == "10.0.21.100/23"
    # The watcher's first blocking query returns with m1's write: one refresh, then it sleeps.
    end = time.monotonic() + 20
    while value(scrape(url), "ipam_da_consul_cache_refreshes_total") < 1:
        assert time.monotonic() < end, "the pool watcher never refreshed"
        time.sleep(0.1)
    # Another host takes .101; the cached copy does not know.
    consul.put(f"ipam/{pool}/10.0.21.101", {"target": "elsewhere"})
    assert call("ADD", "m2").json["ips"][0]["address"] == "10.0.21.102/23"
    assert call("ADD", "m3").json["ips"][0]["address"] == "10.0.21.103/23"
    call("DEL", "m1")

    s = scrape(url)
    assert value(s, "ipam_da_consul_calls_total", command="ADD", code="0") == 3
    assert value(s, "ipam_da_consul_calls_total", command="DEL", code="0") == 1
    assert total(s, "ipam_da_consul_calls_total") == 4
    assert value(s, "ipam_da_consul_call_duration_seconds_count", command="ADD", code="0") == 3
    assert value(s, "ipam_da_consul_call_duration_seconds_count", command="DEL", code="0") == 1
    assert value(s, "ipam_da_consul_cas_conflicts_total", command="ADD") == 1
    assert value(s, "ipam_da_consul_cache_refreshes_total") == 1

    # Every Consul request the calls logged, and only those, counted as the calls' own.
    sent = sum(consul_requests(log) for log in logs)
    assert sent >= 5  # at least each call's write, plus m2's lost write and its re-read
    assert total(s, "ipam_da_consul_consul_requests_total", source="call") == sent
    assert total(s, "ipam_da_consul_consul_request_duration_seconds_count", source="call") == sent
    # The CAS writes that won: m1, m2, m3 (the transaction endpoint answers 200)...
    assert total(s, "ipam_da_consul_consul_requests_total", source="call", status="200") >= 3
    # ... and the watcher's blocking queries are background.
    assert total(s, "ipam_da_consul_consul_requests_total", source="background") >= 1

    row = {"consul": consul.url, "prefix": "ipam/", "pool": pool}
    # m2, m3 and the other host's .101; m1's address left the cache with its DEL.
    assert value(s, "ipam_da_consul_pool_allocated", **row) == 3
    assert value(s, "ipam_da_consul_pool_capacity", **row) == 51
    assert value(s, "ipam_da_consul_helper_requests_total", outcome="served") == 4
    assert value(s, "ipam_da_consul_helper_cached_pools") == 1
    assert value(s, "process_resident_memory_bytes") > 0


def test_failed_calls_are_counted_by_code(helper: Helper, conf_for) -> None:
    url = metrics_url(helper)
    out = run_plugin("ADD", conf_for("no-such-pool-anywhere"), container="f1", env=helper.env)
    assert out.rc == 114, out
    s = scrape(url)
    assert value(s, "ipam_da_consul_calls_total", command="ADD", code="114") == 1
    assert value(s, "ipam_da_consul_calls_total", command="ADD", code="0") == 0


def test_metrics_are_off_by_default_and_never_imported_by_the_client(tmp_path: Path) -> None:
    h = Helper(tmp_path, stderr=tmp_path / "helper.err")
    try:
        assert "metrics on" not in h.wait_stderr("listening on")
    finally:
        h.close()
    # The thin client and a helper without --metrics-address never load prometheus_client.
    probe = (
        "import sys\n"
        "import ipam_da_consul.cni.main, ipam_da_consul.cni.helper.client\n"
        "assert 'prometheus_client' not in sys.modules\n"
        "import ipam_da_consul.cni.helper.cli, ipam_da_consul.cni.helper.server\n"
        "assert 'prometheus_client' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", probe], check=True)
