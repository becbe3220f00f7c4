"""No duplicate, no leak: the write rules of the allocator against a real Consul, through the
installed executables where a runtime would see the difference.

- A write still in flight when the runtime's DEL runs (a reply lost, a request a follower
  forwards once a leader exists) can never apply afterwards: DEL raises the attachment's fence.
- `timeout` caps the whole call, rollback included.
- A scoped IPv6 address (zone ID) is refused everywhere, and a scoped key never breaks picking.
- A restart that reuses the container ID is served behind the fence its DEL raised.
- A write sent twice stays in doubt: its rollback raises the fence first.
- Undoing a take-over gives the key back only while its previous holder was not deleted since.
- The reads a DEL decides on are linearizable.
"""

from __future__ import annotations

import os
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from ipam_da_consul.allocator.allocate import Allocator, Attachment
from ipam_da_consul.allocator.layout import Layout
from ipam_da_consul.allocator.pool import parse_pool
from ipam_da_consul.consul import ConsulClient, ConsulKV, ConsulUnavailable

from tests.support.memkv import HeldBack
from tests.support.plugin import run_plugin
from tests.support.plugin_helpers import assert_cni_error
from tests.support.util_procs import Helper, LossyProxy, Unresponsive


def stuck_add(consul, pool: str, container: str) -> HeldBack:
    """An ADD's allocation write for `container`/eth0 on network testnet, sent but not applied."""
    client = ConsulClient([consul.url])
    stuck = HeldBack(ConsulKV(client), ConsulUnavailable("no answer before the read timeout"))
    allocator = Allocator(
        stuck, Layout(), "host-a", attachment=Attachment("testnet", container, "eth0"), call="x"
    )
    pool_obj = parse_pool(Layout(), pool, stuck.list(f"ipam/{pool}"))
    with pytest.raises(ConsulUnavailable):
        allocator.claim(pool_obj, pool_obj.next_free()[0])
    return stuck


def test_the_runtimes_del_voids_a_write_still_in_flight(consul, make_pool, conf_for):
    pool = make_pool()
    stuck = stuck_add(consul, pool, "late")
    out = run_plugin("DEL", conf_for(pool), container="late")  # finds nothing, raises the fence
    assert (out.rc, out.stdout) == (0, ""), out
    assert stuck.release().failed == 0  # the late write fails on the fence
    assert consul.allocations(pool) == {}


def test_without_a_del_the_late_write_would_land(consul, make_pool):
    # The hazard itself, so the test above can fail: nothing else stops a late write.
    pool = make_pool()
    stuck = stuck_add(consul, pool, "late-2")
    assert stuck.release().ok
    assert consul.allocations(pool) == {"10.0.21.100": "late-2"}


def test_a_restart_reusing_the_container_id_is_served(consul, make_pool, conf_for):
    pool = make_pool()
    for _ in range(2):
        out = run_plugin("ADD", conf_for(pool), container="restarted")
        assert out.rc == 0, out
        assert consul.allocations(pool) == {"10.0.21.100": "restarted"}
        out = run_plugin("DEL", conf_for(pool), container="restarted")
        assert out.rc == 0, out
        assert consul.allocations(pool) == {}


def call_seconds(log: Path) -> float:
    """From the call's first log line to its last: the call itself, without the interpreter's
    start, which a loaded machine can stretch without bound."""
    stamps = [
        datetime.fromisoformat(line.split(" ", 1)[0])
        for line in log.read_text().splitlines()
        if line[:4].isdigit()
    ]
    return (stamps[-1] - stamps[0]).total_seconds()


def test_timeout_caps_a_call_against_a_hung_server(conf_for, make_pool, tmp_path):
    hung = Unresponsive()
    log = tmp_path / "call.log"
    try:
        conf = conf_for("p", timeout=2.0, consul_connect_timeout=1.0, consul_read_timeout=5.0)
        conf["ipam"]["consul_servers"] = [hung.url]
        out = run_plugin("ADD", conf, container="capped", verbose=True,
                         env={"IPAM_DA_CONSUL_LOG_FILE": str(log)})
    finally:
        hung.close()
    assert_cni_error(out, 11, "1.0.0", hung.url)
    assert call_seconds(log) <= 2.0 + 0.2, log.read_text()


def test_timeout_caps_a_call_whose_rollback_is_needed(consul, make_pool, conf_for, tmp_path):
    """Pool a is written, the write in pool b hangs (Consul applies it, the reply never comes):
    the call fails by its deadline and its rollback, within the same `timeout`, removes both
    writes, the hung one behind a fence."""
    a, b = make_pool(), make_pool([{"subnet": "10.9.0.0/24"}])
    before = {k: v for k, v in consul.tree("ipam/").items() if ".fences" not in k}
    writes = iter(range(100))
    proxy = LossyProxy(
        consul.url, lambda m, p: m == "PUT" and p.startswith("/v1/txn") and next(writes) == 1,
        hang=True,
    )
    try:
        # The rollback gets min(3 s, timeout / 4): 1.5 s here, room for a loaded machine.
        # A first try that waits past the deadline: no resend resolves the doubt here.
        conf = conf_for(a, b, timeout=6.0, consul_read_timeout=10.0, consul_attempt_timeout=10.0)
        conf["ipam"]["consul_servers"] = [proxy.url]
        log = tmp_path / "call.log"
        out = run_plugin("ADD", conf, container="hung-b", verbose=True,
                         env={"IPAM_DA_CONSUL_LOG_FILE": str(log)})
    finally:
        proxy.close()
    assert len(proxy.dropped) == 1
    assert out.rc == 11, out
    assert call_seconds(log) <= 6.0 + 0.2, log.read_text()
    after = {k: v for k, v in consul.tree("ipam/").items() if ".fences" not in k}
    assert after == before
    assert consul.get("ipam/.fences/testnet/hung-b/eth0") is not None


@pytest.mark.parametrize(
    ("where", "code"),
    [("pool", 7), ("cni_args", 4), ("runtime_config", 7), ("args", 7)],
)
def test_a_zone_id_is_never_an_address(consul, make_pool, conf_for, where, code):
    pool = make_pool([{"subnet": "fd00:9::/64"}])
    scoped = "fd00:9::10%x"
    conf = conf_for({"name": pool, "requested-ip": scoped} if where == "pool" else pool)
    env = {}
    if where == "cni_args":
        env["CNI_ARGS"] = f"IP={scoped}"
    elif where == "runtime_config":
        conf["runtimeConfig"] = {"ips": [scoped]}
    elif where == "args":
        conf["args"] = {"cni": {"ips": [scoped]}}
    before = consul.kv_index()
    out = run_plugin("ADD", conf, container="zoned", env=env)
    assert_cni_error(out, code, "1.0.0", scoped, "zone ID")
    assert consul.kv_index() == before


def test_a_scoped_key_is_an_invalid_allocation_not_a_second_holder(consul, make_pool, conf_for):
    pool = make_pool([{"subnet": "fd00:9::/64"}])
    consul.put(f"ipam/{pool}/fd00:9::1%x", {"target": "planted"})
    out = run_plugin("ADD", conf_for(pool), container="after-scoped")
    assert_cni_error(out, 117, "1.0.0", f"ipam/{pool}/fd00:9::1%x", "plain IP address")


def test_a_token_file_that_is_not_text_is_a_config_error(consul, make_pool, conf_for, tmp_path):
    token = tmp_path / "token"
    token.write_bytes(b"\xff\xfe\x00binary")
    pool = make_pool()
    before = consul.kv_index()
    out = run_plugin("ADD", conf_for(pool, consul_token_file=str(token)))
    assert_cni_error(out, 7, "1.0.0", str(token), "UTF-8")
    assert consul.kv_index() == before


def test_a_resent_write_is_fenced_before_its_rollback(consul, make_pool, conf_for):
    """The first send of pool a's write is held by a follower; the resend wins. Pool b is
    missing, so the call rolls back: it must raise the fence before deleting the key, or the
    first send, arriving late, re-creates it after the call failed (it did)."""
    a = make_pool([{"subnet": "10.9.1.0/24"}])
    txns = iter(range(100))
    relay = LossyProxy(
        consul.url, lambda m, p: False,
        hold=lambda m, p: m == "PUT" and p.startswith("/v1/txn") and next(txns) == 0,
    )
    try:
        conf = conf_for(a, f"missing-{a}", consul_attempt_timeout=1.0)
        conf["ipam"]["consul_servers"] = [relay.url]
        out = run_plugin("ADD", conf, container="resent")
        assert out.rc == 114, out
        assert relay.held == [("PUT", "/v1/txn")]
        assert consul.allocations(a) == {}
        relay.let_go()  # the first send arrives, late
        time.sleep(1.0)
    finally:
        relay.close()
    assert consul.allocations(a) == {}


def test_undoing_a_take_over_never_resurrects_a_deleted_holder(consul, make_pool, conf_for):
    """A Pool's own requested IP takes an address over from a container being stopped. That
    container's DEL returns 0 (the key is no longer its own); the taking ADD then fails on a
    later pool. Its rollback must not give the key back to a container that no longer exists
    (it did: the address stayed held for nobody)."""
    a = make_pool([{"subnet": "10.9.2.0/24"}])
    held = run_plugin("ADD", conf_for(a), container="stopping")
    assert held.rc == 0, held
    ip = held.json["ips"][0]["address"].split("/")[0]
    missing = f"missing-{a}"
    relay = LossyProxy(
        consul.url, lambda m, p: False, hold=lambda m, p: m == "GET" and p.endswith(f"/{missing}")
    )
    try:
        conf = conf_for({"name": a, "requested_ip": ip}, missing)
        conf["ipam"]["consul_servers"] = [relay.url]
        taker: list[Any] = []
        thread = threading.Thread(
            target=lambda: taker.append(run_plugin("ADD", conf, container="taker"))
        )
        thread.start()
        deadline = time.monotonic() + 20
        while not relay.held and time.monotonic() < deadline:
            time.sleep(0.05)
        assert relay.held, "the taker never reached pool b"
        assert consul.allocations(a) == {ip: "taker"}  # taken over
        gone = run_plugin("DEL", conf_for(a), container="stopping")
        assert (gone.rc, gone.stdout) == (0, ""), gone
        relay.let_go()
        thread.join(30)
    finally:
        relay.close()
    assert taker[0].rc == 114, taker[0]
    assert consul.allocations(a) == {}


def test_a_take_over_undone_while_its_holder_lives_gives_the_address_back(
    consul, make_pool, conf_for
):
    a = make_pool([{"subnet": "10.9.3.0/24"}])
    held = run_plugin("ADD", conf_for(a), container="living")
    ip = held.json["ips"][0]["address"].split("/")[0]
    out = run_plugin("ADD", conf_for({"name": a, "requested_ip": ip}, f"missing-{a}"),
                     container="taker-2")
    assert out.rc == 114, out
    assert consul.allocations(a) == {ip: "living"}


@pytest.mark.parametrize("route", ["in-process", "helper"])
def test_timeout_caps_the_call_from_process_start_to_exit(
    consul, make_pool, conf_for, tmp_path, route
):
    """`timeout` is a hard cap on the call as the runtime sees it: from the process's start to
    its exit, the interpreter's start and the thin client's waits included. Every write is
    held back here, so the call spends its whole budget, its rollback's reserve too; the
    plugin's interpreter takes a second to start, as on a loaded host (a sitecustomize that
    sleeps)."""
    relay = LossyProxy(
        consul.url, lambda m, p: False, hold=lambda m, p: m == "PUT" and p.startswith("/v1/txn")
    )
    helper = Helper(tmp_path) if route == "helper" else None
    slow = tmp_path / "slow-start"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text("import time\ntime.sleep(1.0)\n")
    try:
        conf = conf_for(make_pool(), timeout=3.0)
        conf["ipam"]["consul_servers"] = [relay.url]
        env = {**helper.env, "IPAM_DA_CONSUL_HELPER_ACK_TIMEOUT": "30"} if helper else {}
        path = [str(slow), *filter(None, [os.environ.get("PYTHONPATH")])]
        env["PYTHONPATH"] = os.pathsep.join(path)
        began = time.monotonic()
        out = run_plugin("ADD", conf, container=f"capped-{route}", env=env)
        took = time.monotonic() - began
    finally:
        relay.close()
        if helper:
            helper.close()
    assert out.rc == 11, out
    assert took <= 3.0 + 0.5, took


def test_the_reads_a_del_decides_on_are_linearizable(consul, make_pool, conf_for):
    """A deposed leader that has not noticed a newer leader yet may answer a default read from
    its stale state: DEL's reads after its fence would then miss a key the new leader applied.
    Every read DEL decides on asks for `consistent`."""
    a = make_pool()
    assert run_plugin("ADD", conf_for(a), container="lin").rc == 0
    relay = LossyProxy(consul.url, lambda m, p: False)
    try:
        conf = conf_for(a)
        conf["ipam"]["consul_servers"] = [relay.url]
        out = run_plugin("DEL", conf, container="lin")
    finally:
        relay.close()
    assert (out.rc, out.stdout) == (0, ""), out
    fence = next(i for i, (m, p) in enumerate(relay.seen) if m == "PUT" and p == "/v1/txn")
    reads = [p for m, p in relay.seen[fence + 1:] if m == "GET" and f"/{a}/" in p]
    assert reads and all("consistent" in p for p in reads), relay.seen
    assert consul.allocations(a) == {}
