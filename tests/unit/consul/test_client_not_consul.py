"""A server that answers, but not as Consul does (consul/client.py `_not_consul`), through the
scripted transport on a fake clock: recognised from its leader check alone, never asked again
by that client, failed over at once, and when no listed server is Consul the call fails at once
with NotConsul, whose message says what answered (status, content type, an HTML page's title or
the first characters) and never quotes a page. The same against a real local web server, through
the installed plugin, helper and admin CLI: tests/e2e/test_not_consul.py."""

from __future__ import annotations

import json

import pytest
from ipam_da_consul.consul import ConsulError, ConsulUnavailable, NotConsul

from tests.support.fake_transport import LEADER_PATH, refused, reply
from tests.unit.consul.test_client_scripted import KEY, A, B, make

PAGE = (
    b"<!DOCTYPE HTML>\n<html lang=\"en\">\n    <head>\n        <meta charset=\"utf-8\">\n"
    b"        <title>Error response</title>\n    </head>\n    <body>\n"
    + b"        <p>Error code: 404</p>\n" * 200
    + b"    </body>\n</html>\n"
)
HTML = {"Content-Type": "text/html;charset=utf-8"}


@pytest.mark.parametrize(
    ("answer", "words"),
    [
        (reply(404, PAGE, HTML), ["HTTP 404 (text/html;charset=utf-8)", "titled 'Error response'"]),
        (reply(200, PAGE, HTML), ["HTTP 200 (text/html;charset=utf-8)", "titled 'Error response'"]),
        (reply(200, b"OK\n"), ["HTTP 200,", "beginning 'OK'"]),
        (reply(200, b'{"status": "up"}', {"Content-Type": "application/json"}),
         ["HTTP 200 (application/json)", "beginning '{\"status\": \"up\"}'"]),
        (reply(400, b""), ["HTTP 400,", "with an empty body"]),
        (reply(405, b"<html><body>Method Not Allowed</body></html>"),
         ["HTTP 405", "an HTML page beginning '<html><body>Method Not Allowed"]),
    ],
    ids=["html-404", "html-200", "text", "json-object", "400-empty", "html-untitled"],
)
def test_a_lone_server_that_is_not_consul_fails_at_once(answer, words):
    client, fake = make(A)
    fake.servers[A].on("GET", LEADER_PATH, answer, times=None)
    with pytest.raises(NotConsul) as caught:
        client.request("GET", KEY)
    message = str(caught.value)
    assert message.startswith("no listed server is a Consul server"), message
    assert f"{A} is not a Consul server: GET /v1/status/leader answered" in message, message
    for word in words:
        assert word in message, (word, message)
    # A few words of what answered, on one line: never the page.
    assert "\n" not in message and len(message) < 400 and "Error code" not in message, message
    # One leader check, no waiting: nothing to wait for.
    assert fake.trail() == [(A, "GET", LEADER_PATH)]
    assert fake.clock.slept == []
    # NotConsul is a ConsulError (CNI 111, admin exit 3), not "try again later" (11), which
    # the helper would keep retrying a DEL over.
    assert isinstance(caught.value, ConsulError)
    assert not isinstance(caught.value, ConsulUnavailable)


def test_a_long_answer_is_quoted_by_its_first_characters_only():
    client, fake = make(A)
    fake.servers[A].on("GET", LEADER_PATH, reply(200, b"x" * 5000 + b" tail"), times=None)
    with pytest.raises(NotConsul, match=r"beginning 'x{79}…'") as caught:
        client.select()
    assert "tail" not in str(caught.value)


def test_the_next_server_serves_and_the_other_is_never_asked_again():
    client, fake = make(A, B)
    fake.servers[A].on("GET", None, reply(404, PAGE, HTML), times=None)
    assert client.request("GET", KEY).status == 404 and client.current == B  # a missing key
    # A later server choice (a failover) skips it without a request.
    fake.servers[B].on("GET", KEY, reply(500, b"rpc error"))
    client.request("GET", KEY)
    assert len(fake.requests(server=A)) == 1


def test_with_an_unreachable_server_the_grace_applies_not_the_budget():
    """Something else on one URL, nothing at all on the other: the unreachable grace (2 s),
    not the 15 s budget, and the message names both."""
    client, fake = make(A, B, budget=15.0)
    fake.servers[A].on("GET", LEADER_PATH, reply(404, PAGE, HTML), times=None)
    fake.servers[B].down(refused())
    began = fake.clock.now
    with pytest.raises(ConsulUnavailable) as caught:
        client.select()
    assert fake.clock.now - began < 3.0, fake.clock.now - began
    message = str(caught.value)
    assert f"{A}: is not a Consul server" in message and f"{B}: connection failed" in message
    assert len(fake.requests(server=A)) == 1


@pytest.mark.parametrize("status", [502, 503, 429, 401, 403, 407])
def test_a_proxy_whose_consul_is_away_is_waited_for(status):
    """A 5xx (a proxy whose Consul restarts, no path to a datacenter), a 429 (rate limit), or
    credentials asked for (a proxy in front of Consul): something that guards a Consul, not
    something else. Retried until the budget, as before, but quoted on one line."""
    client, fake = make(A, budget=3.0)
    fake.servers[A].on("GET", LEADER_PATH, reply(status, PAGE, HTML), times=None)
    with pytest.raises(ConsulUnavailable) as caught:
        client.select()
    assert fake.clock.now - 1000.0 > 2.5
    assert len(fake.requests(server=A)) > 2
    message = str(caught.value)
    assert f"HTTP {status} (<!DOCTYPE HTML> <html" in message and "\n" not in message, message
    assert len(message) < 400, message


def test_consuls_own_answers_still_pass():
    client, fake = make(A)
    fake.servers[A].on("GET", LEADER_PATH, reply(200, json.dumps("").encode()))
    fake.servers[A].leader = "10.0.0.1:8300"
    assert client.select() == A  # no leader at first: an election, waited for
    assert fake.clock.slept  # it was waited for, not refused
