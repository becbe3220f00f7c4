"""The verbose log as operations keep and ship it: the JSON format (one object per line, one
record per call with what a log shipper indexes, secrets as redacted as in the text format),
through the installed executables in-process and through the helper; and the Debian package's
logrotate rule (deploy/debian/ipam-da-consul.logrotate) run by Debian's logrotate while calls
append, losing no line and cutting none."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.support.agent import ConsulAgent
from tests.support.plugin import Outcome, run_plugin
from tests.support.util_procs import Helper

ROOT = Path(__file__).resolve().parents[2]
RULE = ROOT / "deploy" / "debian" / "ipam-da-consul.logrotate"
TOKEN = "5e3a1f0c-log-ops-secret-token"
JSON_LOG = {"IPAM_DA_CONSUL_LOG_FORMAT": "json"}


@pytest.fixture
def helper(tmp_path: Path) -> Iterator[Helper]:
    h = Helper(tmp_path / "host", stderr=tmp_path / "helper.err")
    yield h
    h.close()


def records(*files: Path) -> list[dict[str, Any]]:
    """Every line of the files as a JSON object: a line that is not one fails the test."""
    out = []
    for path in files:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        for n, line in enumerate(raw.decode().splitlines(), 1):
            try:
                out.append(json.loads(line))
            except ValueError:
                raise AssertionError(f"{path.name}:{n} is not one JSON object: {line!r}") from None
    return out


def secret_conf(conf_for, pool: str, consul: ConsulAgent) -> dict[str, Any]:
    conf = conf_for(pool, consul_token=TOKEN)
    # A proxy's basic auth in the URL (Consul ignores it): never shown.
    conf["ipam"]["consul_servers"] = [consul.url.replace("://", "://ops:hunter2@")]
    return conf


@pytest.mark.parametrize("via", ["in-process", "helper"])
def test_json_log_has_one_record_per_call(
    via: str, request, consul: ConsulAgent, make_pool, conf_for, tmp_path: Path
) -> None:
    # The token must be one the dev agent accepts: anonymous with ACLs off, any token works.
    pool = make_pool()
    conf = secret_conf(conf_for, pool, consul)
    log = tmp_path / "ipam.jsonl"
    env = {"IPAM_DA_CONSUL_LOG_FILE": str(log), **JSON_LOG}
    if via == "helper":
        env |= request.getfixturevalue("helper").env
    add = run_plugin("ADD", conf, container="jc1", verbose=True, env=env)
    assert add.rc == 0, add
    address = add.json["ips"][0]["address"].split("/")[0]
    conf["prevResult"] = {**conf["prevResult"], **add.json}
    assert run_plugin("DEL", conf, container="jc1", verbose=True, env=env).rc == 0
    assert run_plugin("ADD", conf_for(f"{pool}-absent"), container="jc2", verbose=True,
                      env=env).rc == 114

    text = log.read_text()
    assert TOKEN not in text and "hunter2" not in text
    lines = records(log)
    calls = [r for r in lines if r["event"] == "call"]
    assert [(c["command"], c["container"], c["code"]) for c in calls] == [
        ("ADD", "jc1", 0), ("DEL", "jc1", 0), ("ADD", "jc2", 114)]
    added, deleted, failed = calls
    assert added["network"] == "testnet" and added["pools"] == [pool]
    assert added["addresses"] == [{"pool": pool, "ip": address}]
    assert deleted["addresses"] == [{"pool": None, "ip": address}]
    assert f"{pool}-absent" in failed["error"] and failed["addresses"] == []
    for c in calls:
        shown = consul.url.replace("://", "://***@") if c["container"] == "jc1" else consul.url
        assert c["ifname"] == "eth0" and c["duration_ms"] > 0 and c["elapsed_ms"] >= 0
        assert c["states"][0] == "start" and c["states"][-1] in ("done", "failed")
        assert c["consul_requests"], c
        for r in c["consul_requests"]:
            assert r["server"] == shown and r["method"] in ("GET", "PUT", "DELETE"), r
            assert r["path"].startswith("/v1/") and r["ms"] >= 0
            assert isinstance(r["status"], int) and r["error"] is None
    assert any(r["path"] == "/v1/txn" and r["method"] == "PUT"
               for r in added["consul_requests"])
    # Every message is a record too, under its call's ID; the record ends the call's lines.
    for c in calls:
        own = [r for r in lines if r.get("call") == c["call"]]
        assert own[-1] is c and all(r["event"] == "log" for r in own[:-1])
        assert {r["pid"] for r in own} == {c["pid"]}
        assert any("state start -> parsed" in r["msg"] for r in own[:-1]), own
    assert all({"time", "pid", "level"} <= set(r) for r in lines)


def test_text_stays_the_default(consul: ConsulAgent, make_pool, conf_for, tmp_path: Path) -> None:
    log = tmp_path / "ipam.log"
    out = run_plugin("ADD", conf_for(make_pool()), container="tx", verbose=True,
                     env={"IPAM_DA_CONSUL_LOG_FILE": str(log)})
    assert out.rc == 0, out
    first = log.read_text().splitlines()[0]
    assert not first.startswith("{") and " DEBUG " in first


# -- logrotate ---------------------------------------------------------------------------------
LOGROTATE = shutil.which("logrotate") or "/usr/sbin/logrotate"


@pytest.mark.skipif(not os.path.exists(LOGROTATE),
                    reason="needs Debian's logrotate (apt-get install logrotate)")
@pytest.mark.skipif(os.geteuid() != 0, reason="logrotate keeps root's files as root's")
def test_rotation_while_calls_append_loses_and_cuts_no_line(
    helper: Helper, consul: ConsulAgent, make_pool, conf_for, tmp_path: Path
) -> None:
    """Waves of calls, half through the helper (one process, a descriptor per call), half
    in-process (a process per call), all appending to one log; the package's rule rotates it
    while each wave runs. A wave starts only once the last one ended, as in production, where
    the next rotation (and with it the compression of this one's file) comes a day later."""
    folder = tmp_path / "cni"
    folder.mkdir(mode=0o755)
    log = folder / "ipam-da-consul.log"
    rule = tmp_path / "rule"
    text = RULE.read_text()
    directives = [line.split()[0] for line in text.splitlines() if line.startswith("\t")]
    assert "/var/log/cni/ipam-da-consul.log {" in text and "copytruncate" not in directives
    rule.write_text(text.replace("/var/log/cni/ipam-da-consul.log", str(log)))
    pool = make_pool([{"subnet": "10.0.40.0/24", "rangeStart": "10.0.40.10",
                       "rangeEnd": "10.0.40.250"}])
    conf = conf_for(pool)
    base = {"IPAM_DA_CONSUL_LOG_FILE": str(log), **JSON_LOG}

    def call(n: int) -> list[Outcome]:
        env = base | (helper.env if n % 2 else {})
        cid = f"rot{n}"
        add = run_plugin("ADD", conf, container=cid, verbose=True, env=env)
        done = {**conf, "prevResult": {**conf["prevResult"], **(add.json if add.rc == 0 else {})}}
        return [add, run_plugin("DEL", done, container=cid, verbose=True, env=env)]

    waves, per_wave = 4, 4
    rotated = mid_wave = 0
    last_rotation = 0.0
    outcomes: list[Outcome] = []
    with ThreadPoolExecutor(per_wave) as pool_of:
        for wave in range(waves):
            # dateext names the rotated file by the second: a new one for each rotation.
            time.sleep(max(0.0, last_rotation + 1.1 - time.monotonic()))
            futures = [pool_of.submit(call, wave * per_wave + i) for i in range(per_wave)]
            # Mid-wave: as soon as the calls are appending.
            while not (log.exists() and log.stat().st_size):
                time.sleep(0.01)
            mid_wave += not all(f.done() for f in futures)
            done = subprocess.run(
                [LOGROTATE, "-f", "-s", str(tmp_path / "state"), str(rule)],
                capture_output=True, text=True, timeout=60,
            )
            assert done.returncode == 0, done.stderr
            last_rotation = time.monotonic()
            rotated += 1
            for f in futures:
                outcomes += f.result()
    assert all(o.rc == 0 for o in outcomes), [o for o in outcomes if o.rc][:2]
    # A wave can end before logrotate gets the CPU on a loaded machine; most must not.
    assert mid_wave >= waves // 2, f"only {mid_wave} of {waves} rotations while calls appended"

    files = sorted(folder.iterdir())
    old = [p for p in files if p != log]
    assert len(old) == rotated, files
    # The rule compresses a file at the next rotation (delaycompress): all but the newest.
    assert sum(p.suffix == ".gz" for p in old) == rotated - 1
    assert all((p.stat().st_mode & 0o777) == 0o600 for p in files)
    lines = records(*files)  # every line whole: none cut, none interleaved
    calls = [r for r in lines if r["event"] == "call"]
    assert len(calls) == len(outcomes) == waves * per_wave * 2
    assert Counter((c["command"], c["container"]) for c in calls) == Counter(
        {(cmd, f"rot{n}"): 1 for n in range(waves * per_wave) for cmd in ("ADD", "DEL")})
    # Nothing of any call lost: each call's lines are all there, ending with its record.
    by_call = Counter(r["call"] for r in lines)
    for c in calls:
        assert by_call[c["call"]] >= len(c["states"]), c


def test_the_rule_is_valid_for_logrotate(tmp_path: Path) -> None:
    if not os.path.exists(LOGROTATE):
        pytest.skip("needs Debian's logrotate (apt-get install logrotate)")
    done = subprocess.run([LOGROTATE, "-d", "-s", str(tmp_path / "state"), str(RULE)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and "error" not in done.stderr.lower(), done.stderr

