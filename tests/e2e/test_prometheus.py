"""A real Prometheus (Debian's) on loopback, scraping a real helper's --metrics-address and the
output of `ipam-da-consul-admin usage --prometheus` (served as node_exporter's textfile
collector would serve the file), with the shipped alert rules: after real calls, failures and
a pool filled up, Prometheus's HTTP API shows the series with their labels, the rules load,
the dashboard's every query runs, and the exhaustion alert fires.

The rules are the shipped file with each `for:` shortened to 0s and evaluated every second:
the test waits seconds, not minutes (the `for:` themselves are tested by promtool,
tests/unit/deploy/test_rules.py)."""

from __future__ import annotations

import functools
import http.server
import ipaddress
import json
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from ipam_da_consul.cni.helper import catalog

from tests.support.agent import ConsulAgent
from tests.support.plugin import executable, run_plugin
from tests.support.promql import RULES, dashboard_exprs, grafana_substitute, rules
from tests.support.util_procs import Helper

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None, reason="needs Debian's prometheus (apt-get install prometheus)"
)
P = catalog.PREFIX


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Textfile:
    """A folder served over HTTP as node_exporter serves its textfile collector's files: the
    scrape gets what the file holds, written by a temporary name and a rename."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        handler = type("Quiet", (http.server.SimpleHTTPRequestHandler,), {
            "log_message": lambda *a: None})
        self.server = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), lambda *a: handler(*a, directory=str(folder)))
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def write(self, text: str) -> None:
        tmp = self.folder / "ipam-da-consul.prom.tmp"
        tmp.write_text(text)
        tmp.rename(self.folder / "ipam-da-consul.prom")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Prometheus:
    def __init__(self, tmp: Path, targets: dict[str, tuple[str, str]]) -> None:
        """targets: job -> (host:port, metrics path)."""
        shortened = re.sub(r"^(\s+for:) \S+$", r"\1 0s", RULES.read_text(), flags=re.M)
        (tmp / "rules.yml").write_text(shortened)
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s",
                       "scrape_timeout": "1s"},
            "rule_files": [str(tmp / "rules.yml")],
            "scrape_configs": [
                {"job_name": job, "metrics_path": path, "static_configs": [{"targets": [at]}]}
                for job, (at, path) in targets.items()
            ],
        }
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = open(tmp / "prometheus.log", "wb")  # noqa: SIM115
        assert PROMETHEUS is not None
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address={self.url[7:]}",
             "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.wait("Prometheus ready", lambda: self._ready())

    def _ready(self) -> bool:
        assert self.proc.poll() is None, "prometheus exited"
        try:
            return requests.get(f"{self.url}/-/ready", timeout=2).status_code == 200
        except requests.ConnectionError:
            return False

    def api(self, path: str, **params: str) -> Any:
        answer = requests.get(f"{self.url}/api/v1/{path}", params=params, timeout=10).json()
        assert answer["status"] == "success", answer
        return answer["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        result: list[dict[str, Any]] = data["result"]
        return result

    @staticmethod
    def wait(what: str, ready: Callable[[], Any], timeout: float = 60) -> Any:
        end = time.monotonic() + timeout
        while True:
            got = ready()
            if got:
                return got
            assert time.monotonic() < end, f"waited {timeout:g} s for {what}"
            time.sleep(0.25)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture
def stack(tmp_path: Path, consul: ConsulAgent) -> Iterator[tuple[Helper, Textfile, Prometheus]]:
    helper = Helper(tmp_path / "host", stderr=tmp_path / "helper.err",
                    args=["--metrics-address", "127.0.0.1:0"])
    textfile = Textfile(tmp_path)
    prom: Prometheus | None = None
    try:
        found = re.search(r"metrics on http://(\S+?)(/\S*)", helper.wait_stderr("metrics on "))
        assert found, helper.stderr_text()
        prom = Prometheus(tmp_path, {
            "ipam-da-consul-helper": (found.group(1), found.group(2)),
            "node": (f"127.0.0.1:{textfile.port}", "/ipam-da-consul.prom"),
        })
        yield helper, textfile, prom
    finally:
        if prom is not None:
            prom.close()
        textfile.close()
        helper.close()


def usage(consul: ConsulAgent) -> str:
    done = subprocess.run([executable("ipam-da-consul-admin"), "--consul", consul.url, "usage",
                           "--prometheus"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_prometheus_scrapes_the_helper_and_the_textfile_and_the_pool_alert_fires(
    stack: tuple[Helper, Textfile, Prometheus], consul: ConsulAgent, make_pool, conf_for,
) -> None:
    helper, textfile, prom = stack
    began = time.monotonic()
    # 20 addresses; 18 taken by other hosts, then this host's calls take the rest.
    pool = make_pool([{"subnet": "10.0.60.0/24", "rangeStart": "10.0.60.10",
                       "rangeEnd": "10.0.60.29"}])
    consul.fill_pool(pool, ipaddress.IPv4Address("10.0.60.10"), 18)
    roomy = make_pool()  # 51 addresses, one used: no alert
    textfile.write(usage(consul))
    conf = conf_for(pool)
    outcomes = [run_plugin("ADD", conf, container=f"pm{i}", env=helper.env).rc for i in range(3)]
    assert outcomes == [0, 0, 122]  # the last one finds the pool full
    assert run_plugin("ADD", conf_for(roomy), container="pm-r", env=helper.env).rc == 0
    assert run_plugin("ADD", conf_for(f"{pool}-absent"), container="pm-x",
                      env=helper.env).rc == 114
    textfile.write(usage(consul))  # as the usage timer would, a minute later
    driven = time.monotonic() - began

    # -- the series, with their labels ------------------------------------------------------
    def series(expr: str) -> list[dict[str, str]]:
        return [r["metric"] for r in prom.query(expr)]

    prom.wait("the calls scraped", lambda: len(series(f"{P}_calls_total")) >= 3)
    calls = {(m["command"], m["code"]) for m in series(f"{P}_calls_total")}
    assert {("ADD", "0"), ("ADD", "122"), ("ADD", "114")} <= calls
    for m in series(f"{P}_calls_total"):
        assert m["job"] == "ipam-da-consul-helper" and set(m) == {
            "__name__", "job", "instance", "command", "code"}
    requests_seen = series(f"{P}_consul_requests_total")
    assert {m["source"] for m in requests_seen} >= {"call", "background"}
    assert {(m["method"], m["status"]) for m in requests_seen if m["source"] == "call"} >= {
        ("PUT", "200")}
    row = {"consul": consul.url, "prefix": "ipam/", "pool": pool}
    prom.wait("the textfile's second write", lambda: prom.query(
        f'{P}_pool_free{{pool="{pool}"}} == 0'))
    for name, jobs in ((f"{P}_pool_free", {"node"}),
                       (f"{P}_pool_capacity", {"node", "ipam-da-consul-helper"}),
                       (f"{P}_pool_allocated", {"node", "ipam-da-consul-helper"})):
        got = series(f'{name}{{pool="{pool}"}}')
        assert {m["job"] for m in got} == jobs, (name, got)
        for m in got:
            assert {k: m[k] for k in row} == row and set(m) == {
                "__name__", "job", "instance", *row}, m
    # The recording rules run a rule evaluation (1 s) after the scrape.
    prom.wait("the recorded ratio",
              lambda: prom.query(f'{P}:pool_free:ratio{{pool="{pool}"}} == 0'))
    assert series(f"{P}_usage_timestamp_seconds") == [{
        "__name__": f"{P}_usage_timestamp_seconds", "job": "node",
        "instance": f"127.0.0.1:{textfile.port}", "consul": consul.url, "prefix": "ipam/"}]
    # Every series of ours is in the catalog, with exactly its labels.
    ours = series(f'{{__name__=~"{P}_.+", __name__!~"{P}:.+"}}')
    for m in ours:
        base = re.sub(r"_(bucket|sum|count)$", "", m["__name__"])
        entry = catalog.BY_NAME.get(m["__name__"]) or catalog.BY_NAME[base]
        extra = {"le"} if m["__name__"].endswith("_bucket") else set()
        assert set(m) - {"__name__", "job", "instance"} == set(entry.labels) | extra, m
        assert not {"container", "ip", "call"} & set(m)

    # -- the rules, and the alert -------------------------------------------------------------
    def loaded() -> list[dict[str, Any]]:
        return [r for g in prom.api("rules")["groups"] for r in g["rules"]]

    # "unknown" until a group's first evaluation; "err" would stay.
    prom.wait("every rule evaluated", lambda: all(r["health"] != "unknown" for r in loaded()))
    assert len(loaded()) == len(rules()) and all(r["health"] == "ok" for r in loaded()), [
        (r["name"], r.get("lastError")) for r in loaded() if r["health"] != "ok"]

    def firing(name: str) -> list[dict[str, Any]]:
        # This test's pools only: the session's agent is shared, and an earlier test may have
        # left a pool of its own full (test_helper's race for the last addresses does).
        return [a for a in prom.api("alerts")["alerts"]
                if a["labels"]["alertname"] == name and a["state"] == "firing"
                and a["labels"].get("pool") in (pool, roomy)]

    alerts = prom.wait("the exhaustion alert", lambda: firing("IpamDaConsulPoolExhausted"))
    fired = time.monotonic() - began
    assert [a["labels"] for a in alerts] == [{
        "alertname": "IpamDaConsulPoolExhausted", "severity": "critical", **row}]
    assert alerts[0]["annotations"]["summary"] == \
        f"Pool {pool} (ipam/) is about to run out of addresses"
    nearly = prom.wait("the nearly-full alert", lambda: firing("IpamDaConsulPoolNearlyFull"))
    assert [a["labels"]["pool"] for a in nearly] == [pool]  # not the roomy one
    print(f"\nGET /api/v1/alerts (IpamDaConsulPoolExhausted):\n"
          f"{json.dumps(alerts, indent=1)}\ncalls driven in {driven:.1f} s, "
          f"alert firing {fired:.1f} s after the start")

    # -- every query of the dashboard and the rules runs here --------------------------------
    for where, expr in [*dashboard_exprs(), *((r.get("alert") or r["record"], r["expr"])
                                              for r in rules())]:
        answer = requests.get(f"{prom.url}/api/v1/query",
                              params={"query": grafana_substitute(expr)}, timeout=10).json()
        assert answer["status"] == "success", (where, answer)
    # Data where there is some: a rate needs two scrapes of a series, which the alert may
    # have fired before (scraped every second), so each panel gets a few seconds.
    for where, expr in dashboard_exprs():
        if "Pool usage" in where or "Calls per second" in where:
            query = grafana_substitute(expr)
            prom.wait(f"data in {where}", functools.partial(prom.query, query), timeout=15)
