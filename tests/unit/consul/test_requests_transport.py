"""The requests transport (consul/requests_transport.py) reports each kind of trouble as the
transport's typed error, worded as the client's messages always were: real sockets for the
connection kinds, requests' own exceptions for the rest."""

from __future__ import annotations

import pytest
import requests
from ipam_da_consul.consul import requests_transport as rt
from ipam_da_consul.consul.transport import (
    ConnectFailed,
    ConnectTimedOut,
    Dropped,
    ReadTimedOut,
    TLSFailed,
    TransportError,
)
from urllib3.exceptions import ProtocolError

from tests.support.util_procs import BlackHole, Unresponsive
from tests.unit.consul.test_client_failover import dead_url


def send(url: str, timeout: float = 0.2) -> TransportError:
    transport = rt.RequestsTransport()
    try:
        with pytest.raises(TransportError) as caught:
            transport.send(
                url, "PUT", "/v1/kv/k", {"cas": "0"}, b"v",
                connect_timeout=timeout, read_timeout=timeout,
            )
    finally:
        transport.close()
    return caught.value


def test_a_refused_connection_never_left_this_host() -> None:
    err = send(dead_url())
    assert type(err) is ConnectFailed
    assert err.problem == "connection failed (refused or unreachable)"
    assert not err.connected and not err.may_have_arrived


def test_a_connection_that_never_completes_is_a_connect_timeout(hole: BlackHole) -> None:
    err = send(hole.url)
    assert type(err) is ConnectTimedOut and err.problem == "connect timed out"
    assert not err.connected and not err.may_have_arrived


def test_a_server_that_takes_the_request_and_says_nothing_is_a_read_timeout() -> None:
    hung = Unresponsive()
    try:
        err = send(hung.url)
    finally:
        hung.close()
    assert type(err) is ReadTimedOut and err.problem == "no answer before the read timeout"
    assert err.connected and err.may_have_arrived


@pytest.mark.parametrize(
    ("exc", "kind", "problem", "arrived"),
    [
        (
            requests.ConnectionError(ProtocolError("Connection aborted.", ConnectionResetError())),
            Dropped, "connection dropped before an answer came", True,
        ),
        (
            requests.exceptions.SSLError("certificate verify failed"),
            TLSFailed, "TLS error (certificate verify failed)", False,
        ),
        (
            requests.exceptions.ChunkedEncodingError(ProtocolError("Connection broken")),
            Dropped, "connection dropped before an answer came (ChunkedEncodingError)", True,
        ),
        (
            requests.exceptions.ContentDecodingError("not gzip"),
            TransportError, "request failed (ContentDecodingError)", True,
        ),
    ],
    ids=["reset", "tls", "cut-short", "bad-gzip"],
)
def test_each_failure_of_requests_has_its_kind(
    exc: requests.RequestException, kind: type[TransportError], problem: str, arrived: bool
) -> None:
    err = rt._kind_of(exc)
    assert (type(err), err.problem, err.may_have_arrived, err.connected) == (
        kind, problem, arrived, True
    )
