"""Reading a whole answer body (consul/requests_transport.py `_read_body`) from a real local
HTTP server: chunked and compressed bodies come back whole, the connection is kept for the next
request, and a body cut short fails like any transport error (the server is failed over)."""

from __future__ import annotations

import gzip
import http.server
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from ipam_da_consul.consul import requests_transport
from ipam_da_consul.consul.client import ConsulClient, Deadline
from ipam_da_consul.consul.errors import ConsulUnavailable

LEADER = b'"127.0.0.1:8300"'
STALL = 3.0  # seconds a stalling server stays silent, past the client's read timeout
BIG = b"[" + b",".join(b'{"Key":"ipam/p/%d","Value":"eyJ9"}' % i for i in range(60_000)) + b"]"


class Server:
    """An HTTP/1.1 server whose answer to the KV path is set by the test: chunked (`mode`
    "chunked"), gzip-compressed ("gzip"), a chunked body whose connection is closed halfway
    ("cut"), half a body and then silence on an open connection ("stall"), or bytes that
    claim to be gzip and are not ("badgzip"). It notes the client port of every request
    (one per connection)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.ports: list[int] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                outer.ports.append(self.client_address[1])
                if self.path.startswith("/v1/status/leader"):
                    self.answer(LEADER)
                elif outer.mode == "gzip":
                    self.answer(gzip.compress(BIG), {"Content-Encoding": "gzip"})
                elif outer.mode == "badgzip":
                    self.answer(b"not gzip at all", {"Content-Encoding": "gzip"})
                elif outer.mode == "stall":
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(BIG)))
                    self.end_headers()
                    self.wfile.write(BIG[: len(BIG) // 2])
                    self.wfile.flush()
                    time.sleep(STALL)
                    self.close_connection = True
                else:
                    self.chunked(BIG, cut=outer.mode == "cut")

            def answer(self, body: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(200)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def chunked(self, body: bytes, cut: bool) -> None:
                self.send_response(200)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for at in range(0, len(body), 4096):
                    if cut and at > len(body) // 2:
                        self.close_connection = True
                        return
                    piece = body[at : at + 4096]
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                self.wfile.write(b"0\r\n\r\n")

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    s = Server(request.param)
    yield s
    s.close()


@pytest.mark.parametrize("server", ["chunked", "gzip"], indirect=True)
def test_a_large_body_comes_back_whole_on_a_kept_connection(server: Server) -> None:
    client = ConsulClient([server.url])
    for _ in range(3):
        resp = client.request("GET", "/v1/kv/ipam/p/", {"recurse": "true"})
        assert resp.status == 200 and resp.body == BIG
    # The leader check and three listings, all over one connection.
    assert len(server.ports) == 4 and len(set(server.ports)) == 1


@pytest.mark.parametrize("server", ["cut"], indirect=True)
def test_a_body_cut_short_is_a_transport_error(server: Server) -> None:
    session = requests.Session()
    r = session.get(server.url + "/v1/kv/ipam/p/", stream=True, timeout=5)
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        requests_transport._read_body(r)


@pytest.mark.parametrize("server", ["badgzip"], indirect=True)
def test_a_body_that_does_not_decode_is_a_transport_error(server: Server) -> None:
    r = requests.get(server.url + "/v1/kv/ipam/p/", stream=True, timeout=5)
    with pytest.raises(requests.exceptions.ContentDecodingError):
        requests_transport._read_body(r)


@pytest.mark.parametrize("server", ["stall"], indirect=True)
def test_a_server_silent_halfway_through_its_answer_is_failed_over(server: Server) -> None:
    good = Server("chunked")
    try:
        client = ConsulClient([server.url, good.url], read_timeout=1.0, deadline=Deadline(10))
        client.request("GET", "/v1/status/leader")
        assert client.current == server.url
        resp = client.request("GET", "/v1/kv/ipam/p/", {"recurse": "true"})
        assert resp.body == BIG and client.current == good.url
        # The half-read connection is never asked again: the next request to the stalled
        # server comes on a new one.
        client.current = server.url
        client.request("GET", "/v1/status/leader")
        assert len(set(server.ports)) == 2, server.ports
    finally:
        good.close()


@pytest.mark.parametrize("server", ["cut"], indirect=True)
def test_a_server_that_cuts_its_answer_short_is_failed_over(server: Server) -> None:
    good = Server("chunked")
    try:
        client = ConsulClient([server.url, good.url], deadline=Deadline(10))
        resp = client.request("GET", "/v1/kv/ipam/p/", {"recurse": "true"})
        assert resp.body == BIG
        assert client.current == good.url
        # Alone, it is unavailable, not an exception from under requests.
        alone = ConsulClient([server.url], deadline=Deadline(1.5))
        with pytest.raises(ConsulUnavailable, match="failed"):
            alone.request("GET", "/v1/kv/ipam/p/", {"recurse": "true"})
    finally:
        good.close()
