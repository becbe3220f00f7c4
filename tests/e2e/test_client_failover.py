"""ConsulClient against real Consul agents and real sockets: how long each kind of unusable
server costs, which errors name what, that a write is never sent after the deadline, and
which writes are reported in doubt. Nothing here mocks Consul."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from ipam_da_consul.consul import ConsulClient, ConsulError, ConsulKV, ConsulUnavailable, Deadline
from ipam_da_consul.consul.client import Response

from tests.support.agent import ConsulAgent, module_consul
from tests.support.util_procs import LossyProxy, Unresponsive, drop_first
from tests.unit.consul.test_client_failover import dead_url, timed

consul = module_consul("client-failover")
_keys = iter(range(10**6))


@pytest.fixture
def hung() -> Iterator[Unresponsive]:
    h = Unresponsive()
    yield h
    h.close()


@pytest.fixture(scope="module")
def leaderless() -> Iterator[ConsulAgent]:
    """A lone `-server -bootstrap-expect 3`: answers HTTP, never gets a leader."""
    agent = ConsulAgent("client-leaderless", dev=False, extra=["-bootstrap-expect", "3"])
    agent.start(wait_leader=False)
    yield agent
    agent.close()


def key() -> str:
    return f"client-test/{next(_keys)}-{time.monotonic_ns()}"


# -- nothing can answer: fail within the grace, not the budget ----------------------------------


def test_black_hole_costs_a_connect_timeout(consul, hole):
    client = ConsulClient([hole.url, consul.url], connect_timeout=0.5, deadline=Deadline(15))
    took, server = timed(client.select)
    assert server == consul.url
    assert 0.4 < took < 1.5, took


def test_hung_server_costs_a_check_timeout_not_the_read_timeout(consul, hung):
    """A server that accepts connections and says nothing is skipped after a leader-check
    timeout (1 s), even with the default 5 s read timeout."""
    client = ConsulClient([hung.url, consul.url], deadline=Deadline(15))
    took, server = timed(client.select)
    assert server == consul.url
    assert 0.9 < took < 2.0, took


# -- a server answers but has no leader: patience until the deadline ---------------------------


def test_no_leader_keeps_patience(leaderless):
    """Not the 2 s grace: an election may end any moment, so the whole budget is used."""
    client = ConsulClient([dead_url(), leaderless.url], deadline=Deadline(3.5))
    took, err = timed(client.select)
    assert isinstance(err, ConsulUnavailable), err
    assert took > 3.2, took
    assert f"{leaderless.url}: has no raft leader" in str(err)


def test_no_leader_then_a_leader_is_used(consul, leaderless):
    client = ConsulClient([leaderless.url, consul.url], deadline=Deadline(5))
    assert client.select() == consul.url


# -- the datacenter applies to the leader check ------------------------------------------------


def test_leader_check_asks_about_the_datacenter(consul):
    client = ConsulClient([consul.url], datacenter="dc-nowhere", deadline=Deadline(10))
    took, err = timed(client.select)
    # Without ?dc= the local leader would have passed the check.
    assert type(err) is ConsulError, err
    assert "No path to datacenter" in str(err) and "dc-nowhere" in str(err)
    assert took < 1.0 and client.requests_sent == 1, (took, client.requests_sent)

    ok = ConsulClient([consul.url], datacenter="dc1", deadline=Deadline(10))
    assert ok.select() == consul.url
    assert ConsulKV(ok).get(key()) is None


# -- never a write after the deadline ----------------------------------------------------------


@pytest.mark.parametrize("method", ["PUT", "DELETE", "POST"])
def test_no_write_once_the_deadline_is_spent(consul, method):
    k = key()
    index = consul.kv_index()
    client = ConsulClient([consul.url], deadline=Deadline(0), known_good=consul.url)
    with pytest.raises(ConsulUnavailable, match="not sent"):
        client.request(method, f"/v1/kv/{k}", {"cas": "0"}, b"late")
    # Also without a vouched-for server: not even a leader check goes out.
    fresh = ConsulClient([consul.url], deadline=Deadline(0))
    with pytest.raises(ConsulUnavailable, match="not sent"):
        fresh.request(method, f"/v1/kv/{k}", {"cas": "0"}, b"late")
    assert (client.requests_sent, fresh.requests_sent) == (0, 0)
    assert consul.get(k) is None and consul.kv_index() == index


def test_write_that_hung_until_the_deadline_is_not_resent(consul):
    """The first server takes the write and never answers; when the budget runs out there,
    the write is not sent to the next server, and the error says it may have been applied."""
    proxy = LossyProxy(consul.url, drop_first("PUT"), hang=True)
    # A relay that drops nothing, to see what reaches the second server.
    second = LossyProxy(consul.url, lambda m, p: False)
    k = key()
    try:
        client = ConsulClient([proxy.url, second.url], deadline=Deadline(1.5))
        took, err = timed(lambda: client.request("PUT", f"/v1/kv/{k}", {"cas": "0"}, b"v"))
    finally:
        proxy.close()
        second.close()
    assert isinstance(err, ConsulUnavailable), err
    assert err.doubtful, err
    assert took < 2.5, took
    assert [m for m, _ in proxy.seen if m == "PUT"] == ["PUT"]
    assert [m for m, _ in second.seen if m != "GET"] == []
    assert consul.get(k) == b"v"  # the hung server had applied it


# -- in doubt ----------------------------------------------------------------------------------


def put_cas0(client: ConsulClient, k: str, value: bytes) -> Response:
    return client.request("PUT", f"/v1/kv/{k}", {"cas": "0"}, value)


@pytest.mark.parametrize("hang", [False, True], ids=["dropped", "hung"])
def test_lost_reply_makes_the_resend_doubtful(consul, hang):
    """Consul applied the create, its answer was lost; the resend to the next server finds the
    key taken ("false"). `doubtful` tells the caller that this may be its own write."""
    proxy = LossyProxy(consul.url, drop_first("PUT"), hang=hang)
    k = key()
    try:
        client = ConsulClient([proxy.url, consul.url], deadline=Deadline(10), attempt_timeout=0.5)
        resp = put_cas0(client, k, b"mine")
    finally:
        proxy.close()
    assert proxy.dropped == [("PUT", f"/v1/kv/{k}?cas=0")]
    assert (resp.status, resp.body.strip(), resp.doubtful) == (200, b"false", True)
    assert consul.get(k) == b"mine"


def test_refused_first_server_is_not_doubtful(consul):
    client = ConsulClient([dead_url(), consul.url], deadline=Deadline(10))
    client.current = client.servers[0]  # as if it had answered a moment ago
    resp = put_cas0(client, key(), b"v")
    assert (resp.status, resp.body.strip(), resp.doubtful) == (200, b"true", False)


def test_reads_are_never_doubtful(consul):
    proxy = LossyProxy(consul.url, drop_first("GET"))
    try:
        client = ConsulClient([proxy.url, consul.url], deadline=Deadline(10))
        resp = client.request("GET", f"/v1/kv/{key()}")
    finally:
        proxy.close()
    assert len(proxy.dropped) == 1
    assert (resp.status, resp.doubtful) == (404, False)


def test_write_failing_everywhere_reports_doubt(consul):
    """Every try is taken and never answered: the final error is in doubt."""
    proxy = LossyProxy(consul.url, lambda m, p: m == "PUT", hang=True)
    k = key()
    try:
        client = ConsulClient([proxy.url], deadline=Deadline(2.0), attempt_timeout=0.3)
        took, err = timed(lambda: put_cas0(client, k, b"v"))
    finally:
        proxy.close()
    assert isinstance(err, ConsulUnavailable) and err.doubtful, err
    assert took < 3.0, took


def test_doubt_survives_a_failover_that_finds_no_server(consul):
    """The write's connection is dropped after Consul applied it, and then the server is gone:
    the ConsulUnavailable raised by the failover still says the write may have been applied."""
    proxies: list[LossyProxy] = []

    def drop(method: str, path: str) -> bool:
        if method != "PUT":
            return False
        proxies[0].server.socket.close()  # from now on: connection refused
        return True

    proxies.append(LossyProxy(consul.url, drop))
    k = key()
    try:
        client = ConsulClient([proxies[0].url], deadline=Deadline(10), unreachable_grace=0.3)
        took, err = timed(lambda: put_cas0(client, k, b"v"))
    finally:
        proxies[0].close()
    assert isinstance(err, ConsulUnavailable) and err.doubtful, err
    assert "connection failed (refused or unreachable)" in str(err)
    assert took < 2.0, took
    assert consul.get(k) == b"v"


# -- what stays as it was ----------------------------------------------------------------------


def test_known_good_skips_the_leader_check(consul):
    client = ConsulClient([dead_url(), consul.url], known_good=consul.url, deadline=Deadline(5))
    assert client.request("GET", f"/v1/kv/{key()}").status == 404
    assert client.requests_sent == 1
