"""Issue 25, finding 3: no redirect is ever followed. A Consul URL that answers 3xx (here a
tiny server on loopback, over plain HTTP and over HTTPS verified with the CA) must never get our
request, its ACL token or its `/v1/txn` body re-sent to the `Location` it names: the server is
unusable, like one whose answer is not Consul's. The Location is a second local listener that
records everything it receives; every test asserts it received nothing.

The plugin (in-process and through its helper) and the admin CLI are run installed, as a runtime
and an operator run them, against the session's real Consul dev agent."""

from __future__ import annotations

import os
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.support.agent import ConsulAgent, TLSFiles
from tests.support.plugin import Outcome, executable, run_plugin
from tests.support.plugin_helpers import assert_cni_error
from tests.support.util_procs import Helper

TOKEN = "redirect-test-token-5a1d"
ADMIN = "ipam-da-consul-admin"


class _Quiet(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep pytest output clean

    def body(self) -> bytes:
        size = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(size) if size else b""

    def answer(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Server:
    def __init__(self, handler: type[BaseHTTPRequestHandler], tls: TLSFiles | None = None) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        scheme = "http"
        if tls is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(tls.server_cert, tls.server_key)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Recorder(_Server):
    """Where the redirects point: records each request (method, path, headers, body) and
    answers as a leader check would, so a client that follows is not stopped by its answer."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, dict[str, str], bytes]] = []
        recorder = self

        class Handler(_Quiet):
            def any(self) -> None:
                recorder.seen.append((self.command, self.path, dict(self.headers), self.body()))
                self.answer(200, b'"127.0.0.1:8300"', {"Content-Type": "application/json"})

            do_GET = do_PUT = do_DELETE = do_POST = any

        super().__init__(Handler)


class Redirector(_Server):
    """A Consul URL that answers 307 to `target` (same path) when `redirect(method, path)`, and
    otherwise relays to the real `upstream` Consul."""

    def __init__(
        self,
        target: str,
        upstream: str | None = None,
        redirect: Callable[[str, str], bool] = lambda m, p: True,
        tls: TLSFiles | None = None,
    ) -> None:
        self.redirected: list[tuple[str, str]] = []
        outer = self

        class Handler(_Quiet):
            def any(self) -> None:
                body = self.body()
                if upstream is None or redirect(self.command, self.path):
                    outer.redirected.append((self.command, self.path))
                    self.answer(307, b"", {"Location": target + self.path})
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                resp = requests.request(
                    self.command, upstream + self.path, data=body or None, headers=headers,
                    timeout=10,
                )
                keep = {
                    k: v for k, v in resp.headers.items()
                    if k.lower() not in ("content-length", "transfer-encoding", "connection",
                                         "content-encoding")
                }
                self.answer(resp.status_code, resp.content, keep)

            do_GET = do_PUT = do_DELETE = do_POST = any

        super().__init__(Handler, tls)


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    r = Recorder()
    yield r
    r.close()


def writes(method: str, path: str) -> bool:
    return method != "GET"


def conf(servers: list[str], pool: str, **ipam: Any) -> dict[str, Any]:
    return {
        "cniVersion": "1.0.0",
        "name": "redirectnet",
        "type": "bridge",
        "ipam": {
            "type": "ipam-da-consul",
            "consul_servers": servers,
            "consul_token": TOKEN,
            "pools": [{"name": pool}],
            "pick": "lowest",  # tests name the address a call gets
            **ipam,
        },
    }


@pytest.fixture(params=["in-process", "helper"])
def plugin(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Outcome]]:
    """run_plugin in-process, or through a helper of this test's own."""
    helper = Helper(tmp_path / "h") if request.param == "helper" else None

    def run(command: str, config: dict[str, Any], **kw: Any) -> Outcome:
        env = dict(kw.pop("env", None) or {}, **(helper.env if helper else {}))
        return run_plugin(command, config, env=env, **kw)

    yield run
    if helper is not None:
        helper.close()


def assert_nothing_resent(recorder: Recorder) -> None:
    assert recorder.seen == [], f"the redirect target received: {recorder.seen}"


def assert_named(text: str, server: str, recorder: Recorder) -> None:
    assert "redirect" in text, text
    assert server in text, text
    assert recorder.url in text, text  # where it tried to send us


def test_a_redirecting_server_gets_nothing_resent(
    plugin: Callable[..., Outcome], recorder: Recorder, make_pool
) -> None:
    redirector = Redirector(recorder.url)
    try:
        began = time.monotonic()
        out = plugin("ADD", conf([redirector.url], make_pool()), container="redir-1")
        took = time.monotonic() - began
    finally:
        redirector.close()
    assert_nothing_resent(recorder)
    err = assert_cni_error(out, 11, "1.0.0")
    assert_named(err["msg"], redirector.url, recorder)
    assert TOKEN not in out.stdout + out.stderr
    assert redirector.redirected, "the redirector was never asked"
    # A redirect does not heal by waiting: no need to spend the call's 15 s budget.
    assert took < 10, took


def test_a_write_answered_with_a_redirect_is_not_resent(
    plugin: Callable[..., Outcome], recorder: Recorder, consul: ConsulAgent, make_pool
) -> None:
    """The server checks out (its leader check and reads are relayed to the real Consul), then
    answers the allocation's transaction with a 307."""
    pool = make_pool()
    redirector = Redirector(recorder.url, consul.url, writes)
    try:
        out = plugin("ADD", conf([redirector.url], pool), container="redir-2")
    finally:
        redirector.close()
    assert_nothing_resent(recorder)
    err = assert_cni_error(out, 11, "1.0.0")
    assert_named(err["msg"], redirector.url, recorder)
    assert ("PUT", "/v1/txn") in redirector.redirected, redirector.redirected
    assert consul.allocations(pool) == {}  # nothing allocated


def test_the_next_server_serves_when_one_redirects(
    recorder: Recorder, consul: ConsulAgent, make_pool
) -> None:
    redirector = Redirector(recorder.url)
    try:
        out = run_plugin("ADD", conf([redirector.url, consul.url], make_pool()), container="r3")
    finally:
        redirector.close()
    assert_nothing_resent(recorder)
    assert out.rc == 0, out
    assert out.json["ips"][0]["address"] == "10.0.21.100/23"
    assert redirector.redirected


def test_https_redirect_to_plain_http_is_not_followed(
    recorder: Recorder, make_pool, tmp_path: Path
) -> None:
    """The issue's case: an https Consul URL, verified with consul_ca_file, answers 307 to a
    plain-http host: the token and the body would cross the network in clear text."""
    tls = TLSFiles(tmp_path / "tls")
    redirector = Redirector(recorder.url, tls=tls)
    try:
        out = run_plugin(
            "ADD", conf([redirector.url], make_pool(), consul_ca_file=tls.ca), container="r4"
        )
    finally:
        redirector.close()
    assert_nothing_resent(recorder)
    err = assert_cni_error(out, 11, "1.0.0")
    assert_named(err["msg"], redirector.url, recorder)


def test_location_user_info_is_not_shown(make_pool, recorder: Recorder) -> None:
    target = recorder.url.replace("http://", "http://mallory:loc-pw-77@")
    redirector = Redirector(target)
    try:
        out = run_plugin("ADD", conf([redirector.url], make_pool()), container="r5")
    finally:
        redirector.close()
    assert_nothing_resent(recorder)
    err = assert_cni_error(out, 11, "1.0.0")
    assert "loc-pw-77" not in out.stdout + out.stderr and "mallory" not in err["msg"], out
    assert recorder.url.removeprefix("http://") in err["msg"], err


def admin(*args: str, stdin: bytes | None = None) -> Outcome:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONSUL_", "CNI_"))}
    env["CONSUL_HTTP_TOKEN"] = TOKEN
    p = subprocess.run(
        [executable(ADMIN), *args], input=stdin, env=env, capture_output=True, timeout=60
    )
    return Outcome(p.returncode, p.stdout.decode(), p.stderr.decode())


def test_admin_never_follows_a_redirect(recorder: Recorder, consul: ConsulAgent) -> None:
    redirector = Redirector(recorder.url)
    try:
        listed = admin("--consul", redirector.url, "list")
    finally:
        redirector.close()
    assert_nothing_resent(recorder)
    assert listed.rc == 3 and listed.stdout == "", listed
    assert len(listed.stderr.splitlines()) == 1, listed  # one error line
    assert_named(listed.stderr, redirector.url, recorder)

    # Reads relayed to the real Consul, the create's write redirected.
    pool = f"redir-admin-{time.monotonic_ns()}"
    # A subnet no other pool of this agent has: `create` refuses addresses two pools share,
    # so it reads every pool key first, one by one through the relay; on the agent the whole
    # e2e tier shares that is hundreds, hence a budget that lets the write be reached.
    redirector = Redirector(recorder.url, consul.url, writes)
    try:
        created = admin("--consul", redirector.url, "--timeout", "120", "create", pool,
                        "--range", "198.18.77.0/24")
    finally:
        redirector.close()
    assert_nothing_resent(recorder)
    assert created.rc == 3, created
    assert_named(created.stderr, redirector.url, recorder)
    assert any(m != "GET" for m, _ in redirector.redirected), redirector.redirected
    assert consul.get_json(f"ipam/{pool}") is None
