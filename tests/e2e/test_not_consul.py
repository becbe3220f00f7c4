"""`consul_servers` pointing at an ordinary web server (issue 22, finding 2), through the
installed plugin (in-process and through its helper) and the admin CLI: recognised from the
leader check at once, so the call fails in about a second instead of its whole budget, with
CNI error 111 (not 11: no retry heals it, and the helper does not keep the DEL), and a message
that says what answered without quoting the page. A real local HTTP server, nothing mocked."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_admin import admin, assert_fails
from tests.support.agent import ConsulAgent
from tests.support.plugin import run_plugin
from tests.support.plugin_helpers import assert_cni_error
from tests.support.util_procs import Helper

PAGE = (
    b"<!DOCTYPE HTML>\n<html lang=\"en\">\n    <head>\n        <meta charset=\"utf-8\">\n"
    b"        <title>Error response</title>\n    </head>\n    <body>\n"
    b"        <h1>Error response</h1>\n        <p>Error code: 404</p>\n    </body>\n</html>\n"
)


class WebServer:
    """An ordinary web server: every GET is answered with a 404 HTML page, as
    `python3 -m http.server` answers a path it does not have; records the paths asked."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                outer.seen.append(self.path)
                self.send_response(404)
                self.send_header("Content-Type", "text/html;charset=utf-8")
                self.send_header("Content-Length", str(len(PAGE)))
                self.end_headers()
                self.wfile.write(PAGE)

            do_PUT = do_DELETE = do_GET

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def web() -> Iterator[WebServer]:
    server = WebServer()
    yield server
    server.close()


WHAT = "is not a Consul server: GET /v1/status/leader answered HTTP 404 (text/html;charset=utf-8)"


def standalone(servers: list[str], pool: str) -> dict[str, Any]:
    """The config a runtime user writes: the pools in `ipam.pools`."""
    return {
        "cniVersion": "1.0.0",
        "name": "webnet",
        "ipam": {"type": "ipam-da-consul", "consul_servers": servers, "pools": [{"name": pool}]},
    }


@pytest.mark.parametrize("command", ["ADD", "DEL"])
def test_the_plugin_says_what_answered_in_about_a_second(
    web: WebServer, command: str
) -> None:
    began = time.monotonic()
    out = run_plugin(command, standalone([web.url], "blue"), container="ctr-web")
    took = time.monotonic() - began
    err = assert_cni_error(out, 111, "1.0.0", f"{web.url} {WHAT}", "titled 'Error response'")
    # Before: ~12 s (the budget minus the rollback reserve), code 11, the page in the message.
    assert took < 4.0, took
    assert "<p>" not in err["msg"] and "\n" not in err["msg"], err
    assert web.seen == ["/v1/status/leader"]


def test_the_helper_does_not_keep_a_del_it_can_never_finish(
    web: WebServer, tmp_path: Path
) -> None:
    """11 would make the helper answer the DEL done and retry it for a day with a config that
    cannot work; 111 goes back to the runtime at once."""
    helper = Helper(tmp_path, stderr=tmp_path / "helper.log")
    try:
        env = {**helper.env, "IPAM_DA_CONSUL_HELPER_ACK_TIMEOUT": "30"}
        began = time.monotonic()
        out = run_plugin("DEL", standalone([web.url], "blue"), container="ctr-web", env=env)
        assert time.monotonic() - began < 4.0
        assert_cni_error(out, 111, "1.0.0", WHAT)
        assert not list((tmp_path / "state" / "pending").iterdir())
        assert helper.stats().get("served") == 1
    finally:
        helper.close()


def test_a_web_server_listed_first_is_skipped_for_consul(
    consul: ConsulAgent, make_pool, web: WebServer
) -> None:
    pool = make_pool()
    began = time.monotonic()
    out = run_plugin("ADD", standalone([web.url, consul.url], pool), container="ctr-next")
    assert out.rc == 0, out
    assert time.monotonic() - began < 4.0
    assert web.seen == ["/v1/status/leader"]  # asked once, never again in that call
    assert list(consul.allocations(pool).values()) == ["ctr-next"]


def test_the_admin_cli_says_the_same(web: WebServer) -> None:
    began = time.monotonic()
    out = admin(None, "--consul", web.url, "list")
    assert time.monotonic() - began < 4.0  # before: 10 s, its whole --timeout
    assert_fails(out, 3, f"{web.url} {WHAT}", "titled 'Error response'", "Check --consul")
    assert "<p>" not in out.stderr and " )" not in out.stderr, out
