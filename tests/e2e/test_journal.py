"""The helper's DEL journal (cni/helper/journal.py) against a real, persistent Consul server that is
stopped and started again with its data, and real helper processes that are restarted and
killed. Nothing is mocked: calls are the installed plugin run as a runtime runs it."""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from ipam_da_consul.allocator.allocate import Allocator, Attachment
from ipam_da_consul.allocator.layout import Layout
from ipam_da_consul.cni.helper import journal as jr
from ipam_da_consul.consul import ConsulClient, ConsulKV

from tests.support.agent import ConsulAgent
from tests.support.plugin import netconf, run_plugin
from tests.support.util_procs import Helper
from tests.unit.cni.test_journal import NET, TOKEN


@pytest.fixture(scope="module")
def consul() -> Iterator[ConsulAgent]:
    """A single persistent server: stopped, it refuses connections; started again, it still
    holds the allocations (a dev agent would lose them)."""
    agent = ConsulAgent("journal", dev=False, extra=["-bootstrap-expect", "1"]).start()
    yield agent
    agent.close()


@pytest.fixture
def up(consul: ConsulAgent) -> Iterator[ConsulAgent]:
    """The server, running at the start of the test and again at its end."""
    if consul.proc is None:
        consul.start()
    yield consul
    if consul.proc is None:
        consul.start()


def conf(consul: ConsulAgent, pool: str) -> dict[str, Any]:
    # The token travels in stdin: the journal must keep it (0600) and never log it.
    c = netconf([consul.url], [{"name": pool}], consul_token=TOKEN, consul_unreachable_grace=1.0)
    c["name"] = NET
    return c


def make_pool(consul: ConsulAgent, name: str) -> str:
    return consul.create_pool(
        name, [{"subnet": "10.9.0.0/24", "rangeStart": "10.9.0.10", "rangeEnd": "10.9.0.50"}]
    )


def entries(helper_dir: Path) -> list[Path]:
    return sorted((helper_dir / "run" / "state" / "journal").glob("*.json"))


def wait_for(what: str, cond: Callable[[], bool], timeout: float = 20.0) -> float:
    began = time.monotonic()
    while not cond():
        if time.monotonic() - began > timeout:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.1)
    return time.monotonic() - began


def served_by(helper: Helper) -> dict[str, str]:
    """The env that sends a call to `helper`; a loaded machine must not let the call slip to
    in-process (past the default 1 s acknowledgement), which cannot journal a DEL."""
    return {**helper.env, "IPAM_DA_CONSUL_HELPER_ACK_TIMEOUT": "30"}


def journaled_del(
    consul: ConsulAgent, helper: Helper, pool: str, container: str, tmp_path: Path
) -> str:
    """ADD through the helper, stop Consul, DEL through the helper: 11 and one entry."""
    add = run_plugin("ADD", conf(consul, pool), container=container, env=served_by(helper))
    assert add.rc == 0, add
    ip = add.json["ips"][0]["address"].split("/")[0]
    consul.stop()
    gone = run_plugin("DEL", conf(consul, pool), container=container, env=served_by(helper))
    assert gone.rc == 11, gone
    assert "journaled" in gone.json["msg"], gone
    [entry] = entries(tmp_path)
    assert stat.S_IMODE(entry.stat().st_mode) == 0o600
    assert stat.S_IMODE(entry.parent.stat().st_mode) == 0o700
    return ip


def test_journaled_del_survives_helper_restart_and_is_replayed(
    up: ConsulAgent, tmp_path: Path
) -> None:
    pool = make_pool(up, f"jr-a-{os.getpid()}")
    log = tmp_path / "helper.log"
    helper = Helper(tmp_path, stderr=log)
    try:
        ip = journaled_del(up, helper, pool, "ctr-a", tmp_path)
        # A retried DEL while Consul is still away replaces the entry instead of adding one.
        again = run_plugin("DEL", conf(up, pool), container="ctr-a", env=served_by(helper))
        assert again.rc == 11 and len(entries(tmp_path)) == 1, again
        data = json.loads(entries(tmp_path)[0].read_text())
        assert TOKEN in data["stdin"] and data["env"]["CNI_CONTAINERID"] == "ctr-a"
    finally:
        helper.close()
    log2 = tmp_path / "helper2.log"
    helper = Helper(tmp_path, stderr=log2)  # the same socket, so the same journal
    try:
        time.sleep(1.5)  # a pass or two at start-up, against a Consul that is still down
        assert len(entries(tmp_path)) == 1
        up.start()
        took = wait_for("the journaled DEL replayed", lambda: not entries(tmp_path))
        assert ip not in up.allocations(pool)
        assert took < 10, took
        helper.wait_stderr("journaled DEL of testnet/ctr-a/eth0 redone")
    finally:
        helper.close()
    for path in (log, log2):
        assert TOKEN not in path.read_text()


def test_re_added_attachment_is_not_released(
    up: ConsulAgent, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = make_pool(up, f"jr-b-{os.getpid()}")
    pause = tmp_path / "pause"
    pause.touch()
    monkeypatch.setenv(jr.PAUSE_ENV, str(pause))  # the helper inherits it
    helper = Helper(tmp_path, stderr=tmp_path / "helper.log")
    try:
        ip = journaled_del(up, helper, pool, "ctr-b", tmp_path)
        up.start()
        # The runtime starts the attachment again before the replay got to it: an idempotent
        # ADD hands back the address it still holds, and the entry goes unreplayed.
        add = run_plugin("ADD", conf(up, pool), container="ctr-b", env=served_by(helper))
        assert add.rc == 0, add
        assert add.json["ips"][0]["address"].startswith(ip + "/")
        assert not entries(tmp_path)
        helper.wait_stderr("succeeded after its DEL was journaled")
        pause.unlink()
        time.sleep(3)  # several replay passes, had anything been left
        assert up.allocations(pool).get(ip) == "ctr-b"
    finally:
        helper.close()


def test_re_added_in_process_is_spared_by_the_replay(
    up: ConsulAgent, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ADD that re-adds the attachment runs in-process (the helper missed its ack), so the
    helper never sees it and the entry stays: the replay must still spare the key, which the
    ADD rewrote as its own (nonce and start time after the journaled DEL)."""
    pool = make_pool(up, f"jr-d-{os.getpid()}")
    pause = tmp_path / "pause"
    pause.touch()
    monkeypatch.setenv(jr.PAUSE_ENV, str(pause))
    helper = Helper(tmp_path, stderr=tmp_path / "helper.log")
    try:
        ip = journaled_del(up, helper, pool, "ctr-d", tmp_path)
        up.start()
        add = run_plugin("ADD", conf(up, pool), container="ctr-d")  # in-process
        assert add.rc == 0, add
        assert add.json["ips"][0]["address"].startswith(ip + "/")
        assert entries(tmp_path)  # the helper did not see that ADD
        pause.unlink()
        wait_for("the replay", lambda: not entries(tmp_path))
        helper.wait_stderr("written after that DEL")
        assert up.allocations(pool).get(ip) == "ctr-d"
    finally:
        helper.close()


def test_interrupted_replay_is_redone_without_harm(
    up: ConsulAgent, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = make_pool(up, f"jr-c-{os.getpid()}")
    pause = tmp_path / "pause"
    pause.touch()
    monkeypatch.setenv(jr.PAUSE_ENV, str(pause))
    helper = Helper(tmp_path, stderr=tmp_path / "helper.log")
    try:
        # A neighbour on another interface of the same container, which must stay.
        other = run_plugin(
            "ADD", conf(up, pool), container="ctr-c", ifname="eth1", env=served_by(helper)
        )
        assert other.rc == 0, other
        ip = journaled_del(up, helper, pool, "ctr-c", tmp_path)
        up.start()
        # Where a replay killed midway stops: its first step, the fence, is done; the
        # listing and the release are not. Then the helper dies without removing the entry.
        kv = ConsulKV(ConsulClient([up.url]))
        layout = Layout()
        fence = layout.fence_key(NET, "ctr-c", "eth0")
        Allocator(kv, layout).raise_fence("DEL", Attachment(NET, "ctr-c", "eth0"))
        first_fence = up.modify_index(fence)
        assert first_fence is not None
        helper.proc.kill()
        helper.proc.wait()
    finally:
        helper.close()
    monkeypatch.delenv(jr.PAUSE_ENV)
    helper = Helper(tmp_path, stderr=tmp_path / "helper2.log")
    try:
        wait_for("the interrupted replay redone", lambda: not entries(tmp_path))
        held = up.allocations(pool)
        assert ip not in held
        assert held.get(other.json["ips"][0]["address"].split("/")[0]) == "ctr-c"
        assert (up.modify_index(fence) or 0) > first_fence  # the redo raised the fence again
    finally:
        helper.close()
