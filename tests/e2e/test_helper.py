"""The optional helper: same answers as in-process, a shared cache that never duplicates."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.plugin import executable, run_plugin


@pytest.fixture
def helper(tmp_path):
    sock = tmp_path / "run" / "helper.sock"
    proc = subprocess.Popen(
        [executable("ipam-da-consul-helper"), "--socket", str(sock), "--refresh-interval", "0.1"],
        stderr=subprocess.PIPE,
    )
    end = time.monotonic() + 20
    while not sock.exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < end, "helper did not create its socket"
        time.sleep(0.05)
    yield {"path": str(sock), "proc": proc}
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def via(helper, **env):
    return {"IPAM_DA_CONSUL_SOCKET": helper["path"], **env}


def test_socket_is_private(helper):
    path = Path(helper["path"])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_add_check_del_match_in_process(consul, make_pool, conf_for, helper, tmp_path):
    pool = make_pool()
    log = tmp_path / "helper.log"
    out = run_plugin(
        "ADD",
        conf_for(pool),
        container="h1",
        verbose=True,
        env=via(helper, IPAM_DA_CONSUL_LOG_FILE=str(log)),
    )
    assert out.rc == 0, out
    assert out.json["ips"] == [{"address": "10.0.21.100/23", "gateway": "10.0.20.1"}]
    # The helper, not the client process, did the work: its pid is on the log lines.
    assert f" {helper['proc'].pid} DEBUG" in log.read_text()
    direct = run_plugin("ADD", conf_for(pool), container="h1")
    assert direct.stdout == out.stdout  # idempotent, and byte-identical across both paths
    checked = conf_for(pool, ips=out.json["ips"])
    assert run_plugin("CHECK", checked, container="h1", env=via(helper)).stdout == ""
    gone = run_plugin("DEL", checked, container="h1", env=via(helper))
    assert gone.rc == 0 and gone.stdout == ""
    assert consul.allocations(pool) == {}


def test_errors_and_warnings_reach_the_caller(consul, make_pool, conf_for, helper):
    pool = make_pool()
    bad = run_plugin("ADD", b"{not json", env=via(helper))
    assert bad.rc == 6 and bad.json["code"] == 6
    assert run_plugin("ADD", conf_for(pool), container="owner", env=via(helper)).rc == 0
    taken = conf_for({"name": pool, "requested-ip": "10.0.21.100"})
    out = run_plugin("ADD", taken, container="thief", env=via(helper))
    assert out.rc == 0, out
    assert "'owner'" in out.stderr and "'thief'" in out.stderr  # the take-over warning
    assert consul.allocations(pool) == {"10.0.21.100": "thief"}


def test_token_never_in_helper_output(consul, make_pool, conf_for, helper):
    pool = make_pool()
    out = run_plugin("ADD", conf_for(pool, consul_token="s3cr3t-token-value"), env=via(helper))
    assert out.rc == 0, out
    helper["proc"].send_signal(signal.SIGTERM)
    _, err = helper["proc"].communicate(timeout=10)
    assert b"s3cr3t-token-value" not in err
    assert "s3cr3t-token-value" not in out.stdout + out.stderr


def test_cached_pool_sees_operator_changes(consul, make_pool, conf_for, helper):
    pool = make_pool(
        [{"subnet": "10.7.0.0/24", "rangeStart": "10.7.0.10", "rangeEnd": "10.7.0.20"}]
    )
    for c in ("a", "b", "c"):
        assert run_plugin("ADD", conf_for(pool), container=c, env=via(helper)).rc == 0
    assert consul.allocations(pool) == {"10.7.0.10": "a", "10.7.0.11": "b", "10.7.0.12": "c"}
    # Behind the helper's back: another tool takes the next address, an operator frees .10.
    consul.put(f"ipam/{pool}/10.7.0.13", {"target": "other-tool"})
    out = run_plugin("ADD", conf_for(pool), container="d", env=via(helper))
    assert out.rc == 0, out
    got = out.json["ips"][0]["address"]
    assert got in ("10.7.0.10/24", "10.7.0.14/24")  # never .13: the CAS write protects it
    assert consul.allocations(pool)["10.7.0.13"] == "other-tool"
    run_plugin("DEL", conf_for(pool), container="d")
    consul._req("DELETE", f"ipam/{pool}/10.7.0.10").raise_for_status()
    deadline = time.monotonic() + 10
    while True:  # the background refresh brings the freed lowest address back
        out = run_plugin("ADD", conf_for(pool), container="e", env=via(helper))
        if out.json["ips"][0]["address"] == "10.7.0.10/24" or time.monotonic() > deadline:
            break
        run_plugin("DEL", conf_for(pool), container="e", env=via(helper))
        time.sleep(0.2)
    assert out.json["ips"][0]["address"] == "10.7.0.10/24"


def test_many_processes_through_helper_never_duplicate(consul, make_pool, conf_for, helper):
    pool = make_pool([{"subnet": "10.8.0.0/24", "rangeStart": "10.8.0.1", "rangeEnd": "10.8.0.25"}])
    conf = json.dumps(conf_for(pool)).encode()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CNI_", "IPAM_DA_"))}
    procs = []
    for i in range(40):
        env = {
            **base,
            "CNI_COMMAND": "ADD",
            "CNI_CONTAINERID": f"m{i}",
            "CNI_IFNAME": "eth0",
            "IPAM_DA_CONSUL_SOCKET": helper["path"],
        }
        p = subprocess.Popen(
            [executable("ipam-da-consul")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        procs.append((f"m{i}", p))
    results = {}
    for cid, p in procs:
        out, _ = p.communicate(conf, timeout=120)
        results[cid] = (p.returncode, json.loads(out))
    won = {cid: r["ips"][0]["address"].split("/")[0] for cid, (rc, r) in results.items() if rc == 0}
    lost = [r for rc, r in results.values() if rc != 0]
    assert len(won) == 25 and len(set(won.values())) == 25
    assert all(r["code"] == 122 for r in lost) and len(lost) == 15
    assert consul.allocations(pool) == {ip: cid for cid, ip in won.items()}


def test_dead_helper_falls_back_to_in_process(consul, make_pool, conf_for, helper):
    pool = make_pool()
    helper["proc"].kill()
    helper["proc"].wait(10)
    assert Path(helper["path"]).exists()  # a stale socket nobody listens on
    out = run_plugin("ADD", conf_for(pool), container="after-crash", env=via(helper))
    assert out.rc == 0, out
    assert consul.allocations(pool) == {"10.0.21.100": "after-crash"}
