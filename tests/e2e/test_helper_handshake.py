"""The ack / go handshake: every call runs in exactly one place, within its deadline.

Real executables, a real helper process and a real Consul dev agent; the helper is frozen with
SIGSTOP (a frozen cgroup, a swapped-out process: the kernel still accepts connections for it).
"""

from __future__ import annotations

import json
import marshal
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.plugin import BIN_DIR, NO_HELPER, Outcome, executable, run_plugin
from tests.support.util_procs import Helper, LossyProxy, Unresponsive, drop_first

ACK = "1"  # seconds, the client's default, set explicitly so the timing asserts read plainly
DROPPED = "dropped a request without running it"


@pytest.fixture
def helper(tmp_path: Path) -> Iterator[Helper]:
    h = Helper(tmp_path, refresh_interval=0.1, stderr=tmp_path / "helper.err")
    yield h
    h.close()


def via(helper: Helper, **env: str) -> dict[str, str]:
    return {**helper.env, "IPAM_DA_CONSUL_HELPER_ACK_TIMEOUT": ACK, **env}


def timed(*args: Any, **kwargs: Any) -> tuple[Outcome, float]:
    began = time.monotonic()
    out = run_plugin(*args, **kwargs)
    return out, time.monotonic() - began


def test_stopped_helper_falls_back_and_never_runs_the_call(consul, make_pool, conf_for, helper):
    pool = make_pool()
    helper.stop()
    # The runtime's view: an ADD that succeeded, then one it cleaned up with DEL.
    kept, elapsed = timed("ADD", conf_for(pool), container="kept", env=via(helper), timeout=40)
    assert kept.rc == 0, kept
    assert 1.0 <= elapsed < 12, elapsed  # the ack timeout, then the in-process call
    cleaned, _ = timed("ADD", conf_for(pool), container="cleaned", env=via(helper), timeout=40)
    assert cleaned.rc == 0, cleaned
    assert run_plugin("DEL", conf_for(pool), container="cleaned").rc == 0  # in-process
    helper.resume()
    helper.wait_stderr(DROPPED, count=2)
    assert "client hung up without go" in helper.stderr_text()
    # Before the handshake the resumed helper re-did "cleaned": a leaked address.
    assert consul.allocations(pool) == {"10.0.21.100": "kept"}
    stats = helper.stats()
    assert stats.get("dropped_hung_up") == 2 and "served" not in stats, stats
    # And it serves the next call as before.
    again = run_plugin("ADD", conf_for(pool), container="kept", env=via(helper))
    assert again.stdout == kept.stdout
    assert helper.stats().get("served") == 1


def test_request_queued_past_its_deadline_is_dropped(consul, make_pool, conf_for, helper):
    pool = make_pool()
    helper.stop()
    # The budget covers the 1 s wait for the ack, then the in-process call: leave it room.
    out, _ = timed("ADD", conf_for(pool, timeout=4), container="late", env=via(helper))
    assert out.rc == 0, out
    time.sleep(4.2)  # the call's deadline passes while the request sits in the backlog
    assert run_plugin("DEL", conf_for(pool), container="late").rc == 0
    helper.resume()
    helper.wait_stderr(DROPPED)
    assert "deadline passed" in helper.stderr_text(), helper.stderr_text()
    assert helper.stats().get("dropped_late") == 1
    assert consul.allocations(pool) == {}


def test_stopped_after_go_is_error_11_by_the_deadline(consul, conf_for, helper):
    hung = Unresponsive()  # keeps the helper's call busy, so it is surely past go
    try:
        conf = conf_for(
            "p",
            consul_servers=[hung.url],
            timeout=2,
            consul_read_timeout=5,
        )
        began = time.monotonic()
        proc = start_plugin("ADD", "after-go", conf, via(helper))
        end = time.monotonic() + 10
        while not hung.held:  # the helper's call is talking to "Consul": go was received
            assert time.monotonic() < end, "the helper never started the call"
            time.sleep(0.01)
        helper.stop()
        out, err = proc.communicate(timeout=30)
        elapsed = time.monotonic() - began
    finally:
        helper.resume()
        hung.close()
    assert proc.returncode == 11, (out, err)
    answer = json.loads(out)
    assert answer["code"] == 11 and answer["cniVersion"] == "1.0.0", answer
    assert (
        f"the helper at {helper.socket} did not answer before the call's deadline"
        in (answer["msg"])
    )
    # The deadline is 2 s after the client's process started; it gives up just before it
    # (`timeout` is a cap on the call, process start to exit). Before the handshake: 300 s.
    assert 1.5 <= elapsed <= 2 + 0.5, elapsed


def test_helper_dying_after_go_falls_back(consul, make_pool, conf_for, helper):
    pool = make_pool()
    # The helper's CAS write reaches Consul, its reply never comes back: the call is stuck
    # after its write, the worst moment to die.
    proxy = LossyProxy(consul.url, drop_first("PUT"), hang=True)
    try:
        conf = conf_for(pool, consul_servers=[proxy.url])
        began = time.monotonic()
        proc = start_plugin("ADD", "dies", conf, via(helper))
        end = time.monotonic() + 15
        while not proxy.dropped:
            assert time.monotonic() < end, "the helper never wrote"
            time.sleep(0.01)
        helper.proc.kill()
        out, err = proc.communicate(timeout=30)
        elapsed = time.monotonic() - began
    finally:
        proxy.close()
    assert proc.returncode == 0, (out, err)
    # In-process, the redone ADD finds the helper's write and hands it back.
    assert json.loads(out)["ips"][0]["address"] == "10.0.21.100/23"
    assert consul.allocations(pool) == {"10.0.21.100": "dies"}
    assert elapsed < 20, elapsed


def raw(helper: Helper, message: dict[str, Any]) -> tuple[dict[str, Any] | None, socket.socket]:
    from ipam_da_consul.cni.helper.wire import frame, read_frame

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(helper.socket)
    sock.sendall(frame(message))
    try:
        return marshal.loads(read_frame(sock.recv)), sock
    except EOFError:
        return None, sock


def add_request(conf: dict[str, Any], started: float, container: str) -> dict[str, Any]:
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": container, "CNI_IFNAME": "eth0"}
    env["CNI_NETNS"] = "/var/run/netns/test"
    return {
        "v": 3,
        "stdin": json.dumps(conf).encode(),
        "env": env,
        "verbose": False,
        "started": started,
    }


def test_past_deadline_and_other_versions_run_nothing(consul, make_pool, conf_for, helper):
    pool = make_pool()
    late = add_request(conf_for(pool), time.monotonic() - 16, "raw-late")  # default 15 s
    answer, sock = raw(helper, late)
    sock.close()
    assert answer is None  # closed without an acknowledgement
    old = {k: v for k, v in add_request(conf_for(pool), time.monotonic(), "raw-old").items()}
    old["v"] = 2
    answer, sock = raw(helper, old)
    sock.close()
    assert answer is not None and "ack" not in answer and answer["v"] == 3, answer
    stats = helper.stats()
    assert stats.get("dropped_late") == 1 and stats.get("refused") == 1, stats
    assert consul.allocations(pool) == {}


def test_raw_handshake_runs_only_after_go(consul, make_pool, conf_for, helper):
    from ipam_da_consul.cni.helper.wire import frame, read_frame

    pool = make_pool()
    started = time.monotonic()
    ack, sock = raw(helper, add_request(conf_for(pool, timeout=7), started, "raw-go"))
    with sock:
        assert ack is not None and ack["ack"] is True, ack
        assert ack["deadline"] == pytest.approx(started + 7)
        assert ack["cniVersion"] == "1.0.0"
        time.sleep(0.3)
        assert consul.allocations(pool) == {}  # acknowledged, not run
        sock.sendall(frame({"go": True}))
        answer = marshal.loads(read_frame(sock.recv))
    assert answer["code"] == 0, answer
    assert consul.allocations(pool) == {"10.0.21.100": "raw-go"}


def start_plugin(
    command: str, container: str, conf: dict[str, Any], extra: dict[str, str]
) -> subprocess.Popen[bytes]:
    """The plugin in the background, stdin already written and closed, as a runtime runs it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CNI_", "CONSUL_", "IPAM_DA_"))}
    env.update(
        IPAM_DA_CONSUL_SOCKET=NO_HELPER,
        CNI_COMMAND=command,
        CNI_CONTAINERID=container,
        CNI_IFNAME="eth0",
        CNI_NETNS="/var/run/netns/test",
        CNI_PATH=str(BIN_DIR),
    )
    env.update(extra)
    proc = subprocess.Popen(
        [executable("ipam-da-consul")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(conf).encode())
    proc.stdin.close()
    proc.stdin = None  # communicate() must not touch it again
    return proc
