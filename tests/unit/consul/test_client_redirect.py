"""A Consul server that answers with a redirect (consul/client.py): nothing is re-sent to the
Location, the server is unusable for the rest of the client's life (failed over like a server
whose answer is not Consul's), and the error names the server and the Location, user-info
hidden. A real local HTTP server on each side: one that redirects, one that records."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from ipam_da_consul.consul.client import ConsulClient, Deadline
from ipam_da_consul.consul.errors import ConsulUnavailable

LEADER = b'"127.0.0.1:8300"'


class Server:
    """Answers the leader check with a leader, and every other request with `status` (a 307 to
    `location` + path when `location` is set); records what it received."""

    def __init__(self, location: str | None = None, redirect_leader: bool = False) -> None:
        self.seen: list[tuple[str, str, dict[str, str]]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def any(self) -> None:
                size = int(self.headers.get("Content-Length") or 0)
                if size:
                    self.rfile.read(size)
                outer.seen.append((self.command, self.path, dict(self.headers)))
                leader = self.path.startswith("/v1/status/leader")
                if location is not None and (redirect_leader or not leader):
                    self.answer(307, b"", {"Location": location + self.path})
                else:
                    self.answer(200, LEADER if leader else b"[]")

            do_GET = do_PUT = do_DELETE = any

            def answer(
                self, status: int, body: bytes, headers: dict[str, str] | None = None
            ) -> None:
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def servers() -> Iterator[Callable[..., Server]]:
    made: list[Server] = []

    def make(*args: Any, **kw: Any) -> Server:
        made.append(Server(*args, **kw))
        return made[-1]

    yield make
    for s in made:
        s.close()


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_a_redirected_request_is_not_resent(servers: Callable[..., Server], method: str) -> None:
    target = servers()
    redirecting = servers(target.url)
    client = ConsulClient([redirecting.url], token="t0ken", deadline=Deadline(10))
    began = time.monotonic()
    with pytest.raises(ConsulUnavailable) as caught:
        client.request(method, "/v1/kv/ipam/p", body=b"{}" if method == "PUT" else None)
    assert time.monotonic() - began < 2  # a redirect does not heal by waiting
    assert target.seen == []
    assert not caught.value.doubtful
    message = str(caught.value)
    assert redirecting.url in message and f"{target.url}/v1/kv/ipam/p" in message, message
    assert "redirect" in message and "t0ken" not in message
    # One leader check, one request, and then nothing more to this server.
    assert [(m, p) for m, p, _ in redirecting.seen] == [
        ("GET", "/v1/status/leader"),
        (method, "/v1/kv/ipam/p"),
    ]


def test_the_next_server_serves_after_a_redirect(servers: Callable[..., Server]) -> None:
    target, good = servers(), servers()
    redirecting = servers(target.url)
    client = ConsulClient([redirecting.url, good.url], deadline=Deadline(10))
    assert client.request("GET", "/v1/kv/ipam/p").status == 200
    assert client.current == good.url
    assert client.request("GET", "/v1/kv/ipam/p").status == 200
    assert target.seen == [] and len(redirecting.seen) == 2
    # The leader check does not bring the redirecting server back.
    assert client.select() == good.url and len(redirecting.seen) == 2


def test_a_redirected_leader_check_skips_the_server_at_once(
    servers: Callable[..., Server],
) -> None:
    target = servers()
    redirecting = servers("http://mallory:hunter2@" + target.url.removeprefix("http://"), True)
    client = ConsulClient(["http://me:s3cret@" + redirecting.url.removeprefix("http://")])
    began = time.monotonic()
    with pytest.raises(ConsulUnavailable) as caught:
        client.select()
    assert time.monotonic() - began < 2
    message = str(caught.value)
    assert "s3cret" not in message and "hunter2" not in message and "mallory" not in message
    assert "http://***@127.0.0.1:" in message and "HTTP 307" in message, message
    assert target.seen == []
    # The user-info is still sent, as basic auth.
    assert redirecting.seen[0][2].get("Authorization", "").startswith("Basic ")
