"""ConsulClient's decisions through a scripted transport (tests/support/fake_transport.py) on a
fake clock: 5xx failover, leader suspicion and its probe, which writes are reported in doubt,
no write past the deadline, the unreachable grace, lasting TLS failures and an unknown
datacenter. Each test pins the requests sent, in order, and the (fake) time taken. The same
behaviours against real Consul agents and sockets: tests/e2e/test_client_failover.py,
test_client_leader.py and test_cluster.py."""

from __future__ import annotations

from typing import Any

import pytest
from ipam_da_consul.consul import ConsulClient, ConsulError, ConsulUnavailable
from ipam_da_consul.consul.client import Response

from tests.support.fake_transport import (
    LEADER_PATH,
    PROBE_PATH,
    FakeTransport,
    Fault,
    connect_timeout,
    dropped,
    leader_is,
    read_timeout,
    refused,
    reply,
    tls_error,
)

A, B, C = "http://a:8500", "http://b:8500", "http://c:8500"
LEADER, NEW_LEADER = "10.0.0.1:8300", "10.0.0.2:8300"
KEY = "/v1/kv/ipam/blue/10.0.20.5"
RPC_ERROR = b"rpc error making call: EOF"


def make(*servers: str, budget: float = 15.0, **kw: Any) -> tuple[ConsulClient, FakeTransport]:
    """A client of `servers`, each a healthy fake naming LEADER, with `budget` seconds."""
    fake = FakeTransport()
    for server in servers:
        fake.server(server, LEADER)
    client = ConsulClient(list(servers), transport=fake, deadline=fake.clock.deadline(budget), **kw)
    return client, fake


def put(client: ConsulClient, body: bytes = b"mine") -> Response:
    return client.request("PUT", KEY, {"cas": "0"}, body)


# -- 5xx failover, leader suspicion and the probe ------------------------------------------------


def test_a_5xx_fails_over_and_a_probe_clears_the_suspected_leader():
    client, fake = make(A, B)
    fake.servers[A].on("GET", KEY, reply(500, RPC_ERROR))
    resp = client.request("GET", KEY)
    assert (resp.status, resp.doubtful, client.current) == (404, False, B)
    # B names the leader A forwarded to, so it is used only once a read forwarded through it
    # gets an answer; A (naming it too) is asked first, for a new leader would be cheaper.
    assert fake.trail() == [
        (A, "GET", LEADER_PATH),
        (A, "GET", KEY),
        (B, "GET", LEADER_PATH),
        (A, "GET", LEADER_PATH),
        (B, "GET", PROBE_PATH),
        (B, "GET", KEY),
    ]
    # A 5xx comes back at once: the resend is paced.
    assert len(fake.clock.slept) == 1 and 0.05 <= fake.clock.slept[0] <= 0.1
    # The probe cleared the suspicion: the next failover checks without probing.
    fake.servers[B].on("GET", KEY, read_timeout())
    assert client.request("GET", KEY).status == 404 and client.current == A
    assert len(fake.requests(path=PROBE_PATH)) == 2  # the new suspicion's probe, through A


def test_a_server_naming_a_new_leader_is_used_without_a_probe():
    client, fake = make(A, B)
    fake.servers[A].on("GET", KEY, read_timeout())
    fake.servers[B].leader = NEW_LEADER
    resp = client.request("GET", KEY)
    assert (resp.status, client.current) == (404, B)
    assert fake.trail() == [
        (A, "GET", LEADER_PATH),
        (A, "GET", KEY),
        (B, "GET", LEADER_PATH),
        (B, "GET", KEY),
    ]
    # The first try waits attempt_timeout (2 s); the try after a timeout twice as long.
    assert [s.read_timeout for s in fake.requests(path=KEY)] == [2.0, 4.0]


def test_a_leader_whose_probe_fails_stays_suspected_until_a_new_one_is_named():
    client, fake = make(A, B)
    fake.servers[A].on("GET", KEY, reply(500, RPC_ERROR))
    for server in (A, B):
        fake.servers[server].on("GET", PROBE_PATH, read_timeout(), times=None)
    # B names the old leader twice more, then the new one.
    fake.servers[B].leader = NEW_LEADER
    fake.servers[B].on("GET", LEADER_PATH, leader_is(LEADER), times=2)
    resp = client.request("GET", KEY)
    assert (resp.status, client.current) == (404, B)
    probes = fake.requests(path=PROBE_PATH)
    assert [(p.server, p.read_timeout) for p in probes] == [(B, 0.5), (A, 0.5)]
    assert fake.trail()[-2:] == [(B, "GET", LEADER_PATH), (B, "GET", KEY)]


def test_a_server_whose_leader_check_hung_is_skipped_a_while_when_others_answer():
    """Each try of a hung server costs a check timeout: while another server answers, it is
    asked again only every 2 s."""
    client, fake = make(A, B, C)
    fake.servers[A].leader = None  # answers at once, no leader
    fake.servers[B].on("GET", LEADER_PATH, read_timeout(), times=None)
    assert client.select() == C
    assert [s.read_timeout for s in fake.requests(server=B)] == [1.0]
    assert client.select() == C
    assert len(fake.requests(server=B)) == 1
    fake.clock.advance(2.0)
    assert client.select() == C
    assert len(fake.requests(server=B)) == 2


# -- writes in doubt ---------------------------------------------------------------------------


@pytest.mark.parametrize("fault", [read_timeout(), dropped()], ids=["read-timeout", "dropped"])
def test_a_write_resent_after_its_answer_was_lost_is_doubtful(fault: Fault):
    """Consul may have applied the first try: the resend's `false` may be this write's own."""
    client, fake = make(A, B)
    fake.servers[A].on("PUT", KEY, fault)
    fake.servers[B].on("PUT", KEY, reply(200, b"false"))
    resp = put(client)
    assert (resp.status, resp.body, resp.doubtful) == (200, b"false", True)
    puts = fake.requests(method="PUT")
    assert [(p.server, p.params, p.body) for p in puts] == [
        (A, {"cas": "0"}, b"mine"),
        (B, {"cas": "0"}, b"mine"),
    ]


@pytest.mark.parametrize(
    "fault", [refused(), connect_timeout(), tls_error()], ids=["refused", "connect-timeout", "tls"]
)
def test_a_write_that_never_left_this_host_is_not_doubtful(fault: Fault):
    client, fake = make(A, B, known_good=A)  # as if A had answered a moment ago
    fake.servers[A].down(fault)
    resp = put(client)
    assert (resp.status, resp.body, resp.doubtful) == (200, b"true", False)
    assert [p.server for p in fake.requests(method="PUT")] == [A, B]


@pytest.mark.parametrize(
    ("answer", "doubtful"), [(b"No cluster leader", False), (RPC_ERROR, True)]
)
def test_a_5xx_makes_a_write_doubtful_unless_there_was_no_leader(answer: bytes, doubtful: bool):
    client, fake = make(A, B)
    fake.servers[A].on("PUT", KEY, reply(500, answer))
    resp = put(client)
    assert (resp.status, resp.doubtful) == (200, doubtful)
    assert [p.server for p in fake.requests(method="PUT")] == [A, B]


def test_reads_are_never_doubtful():
    client, fake = make(A, B)
    fake.servers[A].on("GET", KEY, dropped())
    resp = client.request("GET", KEY)
    assert (resp.status, resp.doubtful, client.current) == (404, False, B)


def test_doubt_survives_a_failover_that_finds_no_server():
    """The write's connection drops after sending, and then the only server is gone: the
    ConsulUnavailable of the failover still says the write may have been applied."""
    client, fake = make(A, known_good=A, unreachable_grace=0.3)
    fake.servers[A].on("PUT", KEY, dropped())
    fake.servers[A].down()
    began = fake.clock.now
    with pytest.raises(ConsulUnavailable) as caught:
        put(client)
    assert caught.value.doubtful
    assert "connection failed (refused or unreachable)" in str(caught.value)
    assert fake.clock.now - began <= 0.3 + 0.01


# -- no write past the deadline ----------------------------------------------------------------


@pytest.mark.parametrize("method", ["PUT", "DELETE", "POST"])
@pytest.mark.parametrize("known_good", [A, None], ids=["vouched", "fresh"])
def test_no_write_once_the_deadline_is_spent(method: str, known_good: str | None):
    client, fake = make(A, budget=0, known_good=known_good)
    with pytest.raises(ConsulUnavailable, match="not sent") as caught:
        client.request(method, KEY, {"cas": "0"}, b"late")
    assert not caught.value.doubtful
    assert fake.sent == []  # not even a leader check


def test_a_write_that_hung_until_the_deadline_is_not_resent():
    client, fake = make(A, B, budget=1.5)
    fake.servers[A].on("PUT", KEY, read_timeout())
    with pytest.raises(ConsulUnavailable, match="no answer before the read timeout") as caught:
        put(client)
    assert caught.value.doubtful
    # The try waited what was left of the budget, not its 2 s.
    assert fake.requests(method="PUT")[0].read_timeout == pytest.approx(1.5 - 0.001)
    assert fake.requests(server=B) == []


def test_a_resend_due_after_the_deadline_is_not_sent_and_stays_doubtful():
    """The 5xx takes almost all the budget and the pause before the resend the rest: B is
    chosen, but the write is not sent there."""
    client, fake = make(A, B, budget=1.0)
    fake.servers[A].on("PUT", KEY, reply(500, RPC_ERROR, takes=0.995))
    with pytest.raises(ConsulUnavailable, match="not sent") as caught:
        put(client)
    assert caught.value.doubtful
    assert [p.server for p in fake.requests(method="PUT")] == [A]


# -- the unreachable grace ---------------------------------------------------------------------


@pytest.mark.parametrize("grace", [0.5, 2.0])
def test_every_server_refusing_gives_up_after_the_grace_not_the_budget(grace: float):
    client, fake = make(A, B, C, unreachable_grace=grace)
    for server in (A, B, C):
        fake.servers[server].down()
    began = fake.clock.now
    with pytest.raises(ConsulUnavailable) as caught:
        client.request("GET", KEY)
    took = fake.clock.now - began
    assert grace - 0.06 <= took <= grace + 0.01, took
    # Quick retries within the grace, not a single round.
    assert len(fake.sent) >= 2 * 3
    message = str(caught.value)
    assert f"none accepted a connection for {grace:g} s" in message
    for server in (A, B, C):
        assert f"{server}: connection failed (refused or unreachable)" in message
    assert client.current is None


def test_connect_timeouts_count_as_unreachable():
    client, fake = make(A, B, connect_timeout=0.5)
    fake.servers[A].down(connect_timeout())
    fake.servers[B].down()
    began = fake.clock.now
    with pytest.raises(ConsulUnavailable) as caught:
        client.select()
    # At most one round (one connect timeout) past the grace.
    assert fake.clock.now - began <= 2.0 + 0.5 + 0.01
    assert f"{A}: connect timed out" in str(caught.value)
    assert {s.connect_timeout for s in fake.requests(server=A)} == {0.5}


def test_a_server_without_a_leader_gets_the_whole_budget():
    """It answers, and an election may end any moment: no grace, patience until the deadline."""
    client, fake = make(A, B, budget=3.5)
    fake.servers[A].down()
    fake.servers[B].leader = None
    began = fake.clock.now
    with pytest.raises(ConsulUnavailable) as caught:
        client.select()
    assert fake.clock.now - began >= 3.5 - 0.2
    assert f"{B}: has no raft leader" in str(caught.value)


def test_a_leader_found_within_the_grace_is_used():
    client, fake = make(A)
    fake.servers[A].on(None, None, refused(), times=3)
    assert client.select() == A
    assert len(fake.sent) == 4


# -- problems that waiting does not heal -------------------------------------------------------


def test_a_tls_failure_on_every_server_gives_up_at_once():
    client, fake = make(A, B)
    for server in (A, B):
        fake.servers[server].down(tls_error())
    with pytest.raises(ConsulUnavailable) as caught:
        client.request("GET", KEY)
    assert fake.trail() == [(A, "GET", LEADER_PATH), (B, "GET", LEADER_PATH)]
    assert fake.clock.slept == []
    assert str(caught.value).count("TLS error (certificate verify failed)") == 2


def test_an_unknown_datacenter_is_not_retried():
    client, fake = make(A, B, datacenter="dc-nowhere")
    for server in (A, B):
        fake.servers[server].on(
            "GET", LEADER_PATH, reply(500, b"No path to datacenter"), times=None
        )
    with pytest.raises(ConsulError) as caught:
        client.select()
    assert type(caught.value) is ConsulError
    assert "dc-nowhere" in str(caught.value) and "No path to datacenter" in str(caught.value)
    assert [(s.server, s.params) for s in fake.sent] == [(A, {"dc": "dc-nowhere"})]


def test_an_unknown_datacenter_answered_to_a_write_is_not_retried():
    client, fake = make(A, B, datacenter="dc2", known_good=A)
    fake.servers[A].on("PUT", KEY, reply(500, b"No path to datacenter"))
    with pytest.raises(ConsulError) as caught:
        put(client)
    assert type(caught.value) is ConsulError and not caught.value.doubtful
    assert [(s.server, s.params) for s in fake.sent] == [(A, {"cas": "0", "dc": "dc2"})]


def test_a_redirecting_server_is_never_asked_again():
    client, fake = make(A, B)
    fake.servers[A].on("PUT", KEY, reply(307, headers={"Location": "http://elsewhere/x"}))
    resp = put(client)
    assert (resp.status, resp.doubtful, client.current) == (200, False, B)
    assert client.select() == B
    assert [s for s in fake.requests(server=A) if s.path != LEADER_PATH] == fake.requests(
        server=A, method="PUT"
    )
    assert len(fake.requests(server=A)) == 2  # its leader check and the redirected write
