"""A call's account of itself (cni/events.py CallRecord), told by the code that did the work: the
transitions the machine fired, the compare-and-sets ADD lost, every request the Consul client
sent (its `on_request` hook), and what the call was about. The helper's metrics and the JSON
log are made from it (tests/unit/cni/test_metrics_events.py, test_logs_json.py); nothing here
reads a log line."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from ipam_da_consul.cni.compose import ConsulStore
from ipam_da_consul.cni.events import Address, CallRecord, Step
from ipam_da_consul.cni.machine import Invocation
from ipam_da_consul.consul import ConsulClient, Sent
from loguru import logger

from tests.support.fake_transport import LEADER_PATH, FakeTransport, dropped, reply
from tests.support.machine import Mem, netconf

KEY10, KEY11 = "ipam/p/10.0.0.10", "ipam/p/10.0.0.11"


def no_store(*args: object) -> Any:
    raise AssertionError("this call opens no store")


def aside(m: Mem, key: str, value: dict[str, Any]) -> None:
    hook, m.kv.before_write = m.kv.before_write, None
    try:
        m.put(key, value)
    finally:
        m.kv.before_write = hook


def test_an_add_that_lost_a_race_reports_its_walk_conflict_and_address() -> None:
    m = Mem()
    m.pool()

    def thief(key: str) -> None:
        if key == KEY10 and m.kv.get(KEY10) is None:
            aside(m, KEY10, {"target": "thief"})

    m.kv.before_write = thief
    seen: list[CallRecord] = []
    inv = Invocation(
        json.dumps(netconf()).encode(),
        {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_IFNAME": "eth0"},
        store_factory=m.factory,
        observer=seen.append,
    )
    assert inv.run() == 0
    assert seen == [inv.record]
    record = inv.record
    assert record.steps[3:6] == [
        Step("pool_loaded", "ip_picked", "pick_ip"),
        Step("ip_picked", "pool_loaded", "conflict"),
        Step("pool_loaded", "ip_picked", "pick_ip"),
    ]
    assert record.walk == ["start", "parsed", "connected", "pool_loaded", "ip_picked",
                           "pool_loaded", "ip_picked", "pool_done", "done"]
    assert record.conflicts == 1
    assert (record.command, record.container, record.ifname) == ("ADD", "c1", "eth0")
    assert (record.network, record.pools) == ("net", ["p"])
    assert record.addresses == [Address("p", "10.0.0.11")]
    assert (record.code, record.error) == (0, "")
    assert 0 < record.seconds <= record.elapsed


def test_the_last_race_lost_when_time_runs_out_is_counted_too() -> None:
    """The compare-and-set that ends the call with 125 fires no `conflict` transition, but was
    lost all the same: the count is ADD's own, not the walk's."""
    m = Mem()
    m.pool()

    def thief(key: str) -> None:
        if key.startswith("ipam/p/") and m.kv.get(key) is None:
            aside(m, key, {"target": "thief"})
            m.stores[-1].deadline.end = time.monotonic() - 1

    m.kv.before_write = thief
    run = m.call("ADD")
    assert run.code == 125
    record = run.inv.record
    assert record.conflicts == 1 and "conflict" not in [s.trigger for s in record.steps]
    assert record.walk[-1] == "failed" and record.code == 125
    assert "compare-and-set" in record.error
    assert record.addresses == []


def test_a_del_reports_the_addresses_the_runtime_named() -> None:
    m = Mem()
    m.pool()
    add = m.call("ADD")
    conf = netconf()
    conf["prevResult"] = add.output
    run = m.call("DEL", conf)
    assert run.code == 0
    record = run.inv.record
    assert record.addresses == [Address(None, "10.0.0.10")]
    assert record.conflicts == 0 and record.command == "DEL"


def test_a_call_that_cannot_be_parsed_still_reports_its_command_and_code() -> None:
    seen: list[CallRecord] = []
    inv = Invocation(b"{not json", {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c9",
                                    "CNI_IFNAME": "eth0"},
                     store_factory=no_store, observer=seen.append)
    assert inv.run() == 6
    (record,) = seen
    assert record.walk == ["start", "failed"]
    assert (record.command, record.container, record.code, record.network) == ("ADD", "c9", 6, "")
    assert record.requests == []


def test_a_failing_observer_costs_the_call_nothing() -> None:
    def broken(report: CallRecord) -> None:
        raise RuntimeError("metrics bug")

    inv = Invocation(b'{"cniVersion": "1.0.0"}', {"CNI_COMMAND": "VERSION"},
                     store_factory=no_store, observer=broken)
    assert inv.run() == 0 and inv.output is not None


def test_every_request_the_client_sends_is_heard_as_sent() -> None:
    """The hook sees leader checks, answers of any status and failures (no status, the kind of
    trouble), with the server shown without user-info and the time each took."""
    fake = FakeTransport()
    a, b = "http://user:pw@a:8500", "http://b:8500"
    fake.server(a, "10.0.0.1:8300").on("GET", "/v1/kv/x", dropped())
    fake.server(b, "10.0.0.1:8300").on("GET", "/v1/kv/x", reply(200, b"[]"))
    heard: list[Sent] = []
    client = ConsulClient([a, b], transport=fake, deadline=fake.clock.deadline(15),
                          on_request=heard.append)
    assert client.request("GET", "/v1/kv/x").status == 200
    assert [(h.method, h.server, h.path, h.status, h.error) for h in heard] == [
        ("GET", "http://***@a:8500", LEADER_PATH, 200, None),
        ("GET", "http://***@a:8500", "/v1/kv/x", None, "connection dropped before an answer came"),
        ("GET", "http://b:8500", LEADER_PATH, 200, None),
        ("GET", "http://b:8500", "/v1/kv/x", 200, None),
    ]
    assert len(heard) == len(fake.sent) == client.requests_sent
    assert all(h.seconds >= 0 for h in heard)


def test_an_observer_that_fails_does_not_fail_the_request() -> None:
    fake = FakeTransport()
    fake.server("http://a:8500", "10.0.0.1:8300")

    def broken(sent: Sent) -> None:
        raise RuntimeError("metrics bug")

    client = ConsulClient(["http://a:8500"], transport=fake, deadline=fake.clock.deadline(5),
                          on_request=broken)
    assert client.request("GET", "/v1/kv/x").status == 404


def test_the_calls_store_tells_the_report_of_each_request() -> None:
    """The machine hands its report's hook to the store it opens: the requests in the report
    are exactly those the transport was sent, in order."""
    fake = FakeTransport()
    fake.server("http://a:8500", "10.0.0.1:8300")

    def store(settings: Any, budget: float, known_good: str | None, on_request: Any) -> Any:
        return ConsulStore(ConsulClient(settings.servers, transport=fake, on_request=on_request,
                                        deadline=fake.clock.deadline(budget)))

    conf = netconf()
    conf["ipam"]["consul_servers"] = ["http://a:8500"]
    inv = Invocation(json.dumps(conf).encode(),
                     {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_IFNAME": "eth0"},
                     store_factory=store)
    assert inv.run() == 114  # the fake's KV holds no pool
    assert [(r.method, r.path, r.status) for r in inv.record.requests] == [
        (s.method, s.path, r.status) for s, r in zip(fake.sent, inv.record.requests, strict=True)
    ]
    assert inv.record.requests[0].path == LEADER_PATH
    assert len(inv.record.requests) == len(fake.sent) >= 2


@pytest.fixture
def records() -> Any:
    got: list[Any] = []
    sink = logger.add(lambda m: got.append(m.record), level="DEBUG", format="{message}")
    yield got
    logger.remove(sink)


def test_the_account_rides_on_one_log_record_with_the_call_id_on_every_line(records) -> None:
    m = Mem()
    m.pool()
    run = m.call("ADD")
    ids = {r["extra"].get("call_id") for r in records}
    assert ids == {run.inv.inputs.call_id}
    carrying = [r for r in records if "call_record" in r["extra"]]
    assert len(carrying) == 1 and carrying[0]["extra"]["call_record"] is run.inv.record
    assert carrying[0] is records[-1]


def test_a_call_run_within_another_counts_its_requests_for_both(tmp_path) -> None:
    """An ADD first finishes the DEL its attachment still owes (taken over while Consul was
    away), in a call of its own: that call's record says so (`within`), and the ADD's requests
    include its requests, which were the ADD's doing."""
    from ipam_da_consul.cni.state import open_state
    from ipam_da_consul.consul import ConsulUnavailable

    from tests.support.machine import Caches, Faulty

    m = Mem(open_state(str(tmp_path / "state")))
    m.pool()
    assert m.call("ADD").code == 0
    m.wrap = lambda kv: Faulty(kv, "txn", ConsulUnavailable("no Consul server answered"))
    assert m.call("DEL", caches=Caches()).code == 0
    m.wrap = lambda kv: kv
    got: list[Any] = []
    sink = logger.add(lambda msg: got.append(msg.record["extra"].get("call_record")),
                      level="DEBUG", format="{message}")
    try:
        add = m.call("ADD")
    finally:
        logger.remove(sink)
    nested, outer = [r for r in got if r is not None]
    assert (nested.command, nested.within, outer.within) == ("DEL", add.inv.inputs.call_id, None)
    assert outer is add.inv.record and nested.requests
    # The DEL ran first, then the ADD sent its own.
    assert outer.requests[: len(nested.requests)] == nested.requests
    assert len(outer.requests) > len(nested.requests)
