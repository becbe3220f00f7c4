"""What the host's state folder finishes later (cni/state.py, cni/replay.py, the helper's replay
thread), against a real, persistent Consul server that is stopped and started again with its
data, real helper processes that are restarted and killed, and a relay that holds chosen
requests back before they reach Consul (a follower holding a request, a packet in a queue).
Nothing is mocked: calls are the installed plugin run as a runtime runs it.

- A DEL that finds no Consul is taken over by the helper: answered done (the runtime tears the
  interface down), kept durably, the addresses reserved until it is finished.
- Every later call of the attachment finishes it first, in the helper or in-process: a replay
  never runs beside a call of its attachment, so it can never delete what a re-ADD wrote.
- A failed ADD's write left in doubt is voided without any DEL from the runtime.
"""

from __future__ import annotations

import json
import os
import re
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.support.agent import ConsulAgent
from tests.support.plugin import Outcome, netconf, run_plugin
from tests.support.util_procs import Helper, LossyProxy, wait_for

NET = "testnet"
TOKEN = "journal-secret-0123456789abcdef"


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


def conf(url: str, *pools: str, **ipam: Any) -> dict[str, Any]:
    # The token travels in stdin: the state folder must keep it (0600) and never log it.
    c = netconf(
        [url], [{"name": p} for p in pools], consul_token=TOKEN, consul_unreachable_grace=1.0,
        **ipam,
    )
    c["name"] = NET
    return c


def make_pool(consul: ConsulAgent, name: str) -> str:
    return consul.create_pool(
        name, [{"subnet": "10.9.0.0/24", "rangeStart": "10.9.0.10", "rangeEnd": "10.9.0.50"}]
    )


def pending(helper: Helper) -> list[Path]:
    return sorted((Path(helper.state_dir) / "pending").iterdir())


def served_by(helper: Helper) -> dict[str, str]:
    """The env that sends a call to `helper`; a loaded machine must not let the call slip to
    in-process (past the default 1 s acknowledgement), which cannot take a DEL over."""
    return {**helper.env, "IPAM_DA_CONSUL_HELPER_ACK_TIMEOUT": "30"}


def address(out: Outcome) -> str:
    return str(out.json["ips"][0]["address"].split("/")[0])


def taken_over_del(
    consul: ConsulAgent, helper: Helper, pool: str, container: str, url: str | None = None
) -> str:
    """ADD through the helper, stop Consul, DEL through the helper: done (0), one entry."""
    c = conf(url or consul.url, pool)
    add = run_plugin("ADD", c, container=container, env=served_by(helper))
    assert add.rc == 0, add
    consul.stop()
    gone = run_plugin("DEL", c, container=container, env=served_by(helper))
    assert (gone.rc, gone.stdout) == (0, ""), gone
    assert "the helper finishes this DEL" in gone.stderr, gone
    [mark] = pending(helper)
    entry = Path(helper.state_dir) / "attachments" / f"{mark.name}.json"
    assert stat.S_IMODE(entry.stat().st_mode) == 0o600
    assert stat.S_IMODE(entry.parent.stat().st_mode) == 0o700
    return address(add)


def journal_metrics(helper: Helper) -> dict[str, float]:
    """The journal's series on the helper's /metrics: pending, and entries by outcome."""
    found = re.search(r"metrics on (http://\S+)", helper.wait_stderr("metrics on "))
    assert found, helper.stderr_text()
    text = requests.get(found.group(1), timeout=10).text
    return {
        s.labels.get("outcome", s.name): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("ipam_da_consul_journal_")
    }


def test_a_del_taken_over_survives_a_helper_restart_and_is_finished(
    up: ConsulAgent, tmp_path: Path
) -> None:
    pool = make_pool(up, f"jr-a-{os.getpid()}")
    log = tmp_path / "helper.log"
    scraped = ["--metrics-address", "127.0.0.1:0"]
    helper = Helper(tmp_path, stderr=log, args=scraped)
    try:
        ip = taken_over_del(up, helper, pool, "ctr-a")
        # The runtime retries while Consul is still away: the same entry, still done.
        again = run_plugin("DEL", conf(up.url, pool), container="ctr-a", env=served_by(helper))
        assert again.rc == 0 and len(pending(helper)) == 1, again
        [entry] = (Path(helper.state_dir) / "attachments").iterdir()
        data = json.loads(entry.read_text())
        assert TOKEN in data["deleting"]["stdin"] and data["deleting"]["env"]["CNI_CONTAINERID"]
        # What the metrics read (HelperServer.stats): one entry taken over, still pending.
        stats = helper.stats()
        assert (stats["journal_taken_over"], stats["journal_pending"]) == (1, 1), stats
        # ... and what Prometheus scrapes of them (IpamDaConsulJournalBacklog reads pending).
        m = journal_metrics(helper)
        assert (m["taken_over"], m["ipam_da_consul_journal_pending"]) == (1, 1), m
        assert (m["replayed"], m["voided"], m["expired"]) == (0, 0, 0), m
    finally:
        helper.close()
    log2 = tmp_path / "helper2.log"
    helper = Helper(tmp_path, stderr=log2, args=scraped)  # the same state folder
    try:
        time.sleep(1.5)  # a pass or two at start-up, against a Consul that is still down
        assert len(pending(helper)) == 1
        up.start()
        took = wait_for("the DEL finished", lambda: not pending(helper))
        assert ip not in up.allocations(pool)
        assert took < 10, took
        stats = helper.stats()
        assert (stats["journal_replayed"], stats["journal_pending"]) == (1, 0), stats
        assert (stats["journal_taken_over"], stats["journal_expired"]) == (0, 0), stats
        m = journal_metrics(helper)
        assert (m["replayed"], m["ipam_da_consul_journal_pending"]) == (1, 0), m
    finally:
        helper.close()
    for path in (log, log2):
        assert TOKEN not in path.read_text()


def test_the_address_stays_reserved_until_the_taken_over_del_is_finished(
    up: ConsulAgent, tmp_path: Path
) -> None:
    """The runtime was told the DEL is done; the address must not go to anyone before the
    helper has actually released it. The replay's fence is held back at the relay: until it
    gets through, another container gets another address."""
    pool = make_pool(up, f"jr-r-{os.getpid()}")
    relay = LossyProxy(up.url, lambda m, p: False, hold=lambda m, p: False)
    helper = Helper(tmp_path, stderr=tmp_path / "helper.log")
    try:
        ip = taken_over_del(up, helper, pool, "ctr-r", url=relay.url)
        relay.hold = lambda m, p: m == "PUT" and p.startswith("/v1/txn")
        up.start()
        wait_for("the replay's fence held back", lambda: bool(relay.held))
        other = run_plugin("ADD", conf(up.url, pool), container="ctr-other")
        assert other.rc == 0 and address(other) != ip, other
        assert up.allocations(pool).get(ip) == "ctr-r"
        relay.let_go()
        wait_for("the DEL finished", lambda: not pending(helper))
        assert ip not in up.allocations(pool)
    finally:
        helper.close()
        relay.close()


@pytest.mark.parametrize("route", ["helper", "in-process"])
def test_a_re_add_finishes_the_taken_over_del_first_and_keeps_its_address(
    up: ConsulAgent, tmp_path: Path, route: str
) -> None:
    """The runtime starts the attachment again (a restart keeps the container ID) while the
    helper is finishing the DEL: its release of the key is held back at the relay. The ADD
    waits for the replay (they share the attachment's entry), and then holds the address: the
    replay can never delete what the ADD wrote (it deleted a re-ADD's key before)."""
    pool = make_pool(up, f"jr-b-{os.getpid()}-{route}")
    relay = LossyProxy(up.url, lambda m, p: False, hold=lambda m, p: False)
    helper = Helper(tmp_path, stderr=tmp_path / "helper.log")
    try:
        ip = taken_over_del(up, helper, pool, "ctr-b", url=relay.url)
        relay.hold = lambda m, p: m == "DELETE" and f"/{pool}/" in p
        up.start()
        wait_for("the replay's release held back", lambda: bool(relay.held))
        env = served_by(helper) if route == "helper" else helper.host_env
        result: list[Outcome] = []
        adder = threading.Thread(
            target=lambda: result.append(
                run_plugin("ADD", conf(relay.url, pool), container="ctr-b", env=env)
            )
        )
        adder.start()
        time.sleep(1.5)
        assert not result  # waiting for the replay, not racing it
        relay.let_go()
        adder.join(30)
        [add] = result
        assert add.rc == 0, add
        wait_for("nothing pending", lambda: not pending(helper))
        time.sleep(1.5)  # replay passes, had anything been left
        held = up.allocations(pool)
        assert held.get(address(add)) == "ctr-b"
        assert list(held.values()).count("ctr-b") == 1
        assert ip in held or address(add) != ip
    finally:
        helper.close()
        relay.close()


def test_an_interrupted_replay_is_redone_without_harm(up: ConsulAgent, tmp_path: Path) -> None:
    pool = make_pool(up, f"jr-c-{os.getpid()}")
    relay = LossyProxy(up.url, lambda m, p: False, hold=lambda m, p: False)
    helper = Helper(tmp_path, stderr=tmp_path / "helper.log")
    try:
        # A neighbour on another interface of the same container, which must stay.
        other = run_plugin(
            "ADD", conf(relay.url, pool), container="ctr-c", ifname="eth1", env=served_by(helper)
        )
        assert other.rc == 0, other
        ip = taken_over_del(up, helper, pool, "ctr-c", url=relay.url)
        # The replay's listing is held back: its fence is up, its release not done. Then the
        # helper dies without finishing.
        relay.hold = lambda m, p: m == "GET" and "recurse" in p
        up.start()
        wait_for("the replay's listing held back", lambda: bool(relay.held))
        helper.proc.kill()
        helper.proc.wait()
    finally:
        helper.close()
    relay.let_go()
    helper = Helper(tmp_path, stderr=tmp_path / "helper2.log")
    try:
        wait_for("the interrupted replay redone", lambda: not pending(helper))
        held = up.allocations(pool)
        assert ip not in held
        assert held.get(address(other)) == "ctr-c"
    finally:
        helper.close()
        relay.close()


@pytest.mark.parametrize("who", ["helper", "in-process"])
def test_a_failed_adds_late_write_is_voided_without_any_del(
    up: ConsulAgent, tmp_path: Path, who: str
) -> None:
    """An ADD's write is held back by a follower until long after the call failed, and its
    rollback could not reach Consul either. No runtime DEL ever comes (dockershim, CRI-O after
    a reboot). Once the write lands, the helper's replay (or, without a helper, the host's next
    in-process call) voids it: the fence first, then that exact write."""
    pool = make_pool(up, f"jr-v-{os.getpid()}-{who}")
    relay = LossyProxy(
        up.url, lambda m, p: False, hold=lambda m, p: m == "PUT" and p.startswith("/v1/txn")
    )
    helper = Helper(tmp_path, stderr=tmp_path / "helper.log")
    try:
        env = served_by(helper) if who == "helper" else helper.host_env
        # Long enough that the write surely leaves even a loaded host before the deadline.
        c = conf(relay.url, pool, timeout=8, consul_attempt_timeout=1)
        if who == "in-process":
            helper.close()  # no helper on this host
        ctr = f"ctr-v-{who}"  # its own fence: the other case's stays up for an hour
        add = run_plugin("ADD", c, container=ctr, env=env)
        assert add.rc != 0, add
        assert pending(helper)  # the write (and the rollback's fence) in doubt, kept
        if who == "helper":
            helper.close()  # a helper that dies does not lose it either
            helper = Helper(tmp_path, stderr=tmp_path / "helper2.log")
        relay.let_go()  # the held sends arrive late, in order: the write applies
        wait_for("the late write applied", lambda: ctr in up.allocations(pool).values())
        if who == "in-process":
            # Another container's call on this host finishes what the failed ADD left.
            other = run_plugin("ADD", conf(up.url, pool), container="ctr-w", env=env)
            assert other.rc == 0, other
        wait_for("the late write voided", lambda: ctr not in up.allocations(pool).values())
        wait_for("nothing pending", lambda: not pending(helper))
    finally:
        helper.close()
        relay.close()


def test_an_operator_lists_retries_and_drops_what_the_journal_owes(
    up: ConsulAgent, tmp_path: Path
) -> None:
    """`ipam-da-consul-admin journal`: the entries, with every name an operator needs; a retry
    does the work at once; a drop forgets it (the keys stay, said so)."""
    from tests.e2e.test_admin import admin

    pool = make_pool(up, f"jr-o-{os.getpid()}")
    helper = Helper(tmp_path, stderr=tmp_path / "helper.log")
    try:
        # Both added while Consul is up, both DELs taken over while it is down, and it stays
        # down until the helper is gone: its replay can finish neither (it would on a poke).
        add = run_plugin("ADD", conf(up.url, pool), container="ctr-o2", env=served_by(helper))
        ip2 = address(add)
        kept = taken_over_del(up, helper, pool, "ctr-o1")
        gone = run_plugin("DEL", conf(up.url, pool), container="ctr-o2", env=served_by(helper))
        assert gone.rc == 0, gone
    finally:
        helper.close()  # nobody finishes them but the operator now
    state = ["--state-dir", helper.state_dir]
    listed = admin(None, "journal", "list", *state, "--json")
    assert listed.rc == 0, listed
    rows = {r["container"]: r for r in json.loads(listed.stdout)}
    assert set(rows) == {"ctr-o1", "ctr-o2"} and rows["ctr-o1"]["owes"] == "DEL"
    assert rows["ctr-o1"]["network"] == NET and rows["ctr-o1"]["ifname"] == "eth0"
    assert TOKEN not in listed.stdout
    up.start()
    retried = admin(None, "journal", "retry", rows["ctr-o1"]["entry"], *state)
    assert retried.rc == 0, retried
    assert kept not in up.allocations(pool)
    dropped = admin(None, "journal", "drop", rows["ctr-o2"]["entry"], *state)
    assert dropped.rc == 0 and "stay allocated" in dropped.stdout, dropped
    assert up.allocations(pool).get(ip2) == "ctr-o2"  # forgotten, not released
    assert admin(None, "journal", "list", *state).stdout.strip() == "nothing pending in the journal"
    wrong = admin(None, "journal", "drop", "0" * 32, *state)
    assert wrong.rc == 2 and "no journal entry" in wrong.stderr, wrong
