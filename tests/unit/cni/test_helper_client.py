"""The thin client's side of the handshake, against stand-in helpers on a real unix socket:
when it falls back, when it is committed, and how long it waits. Plus the helper's small
pieces (deadline from stdin, the hang-up check). No Consul needed."""

from __future__ import annotations

import json
import marshal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from ipam_da_consul.cni import stdin as stdin_json
from ipam_da_consul.cni.helper import client
from ipam_da_consul.cni.helper.client import EXIT_MARGIN
from ipam_da_consul.cni.helper.server import hung_up
from ipam_da_consul.cni.helper.wire import WIRE_VERSION, frame, read_frame
from ipam_da_consul.consul.settings import CALL_TIMEOUT


class FakeHelper:
    """Listens on a unix socket; `behave(conn, request)` plays the helper for one client."""

    def __init__(self, path: Path, behave: Callable[[socket.socket, dict[str, Any]], None]) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(8)
        self.behave = behave
        self.after_ack: list[object] = []  # what the client sent after the request
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            conn.settimeout(10)
            self.behave(conn, marshal.loads(read_frame(conn.recv)))

    def next_message(self, conn: socket.socket) -> None:
        try:
            self.after_ack.append(marshal.loads(read_frame(conn.recv)))
        except EOFError:
            self.after_ack.append("EOF")

    def close(self) -> None:
        self.thread.join(10)
        self.sock.close()


@pytest.fixture
def sock_path(tmp_path, monkeypatch):
    path = tmp_path / "h.sock"
    monkeypatch.setenv("IPAM_DA_CONSUL_SOCKET", str(path))
    monkeypatch.setenv("IPAM_DA_CONSUL_HELPER_ACK_TIMEOUT", "0.5")
    return path


def ack(conn: socket.socket, request: dict[str, Any], deadline: float, **extra: object) -> None:
    message = {"v": WIRE_VERSION, "ack": True, "deadline": deadline, "cniVersion": "0.4.0"}
    conn.sendall(frame({**message, **extra}))


def test_no_ack_falls_back_within_the_ack_timeout(sock_path):
    def silent(conn, request):
        fake.next_message(conn)  # what the client does next: hang up, never "go"

    fake = FakeHelper(sock_path, silent)
    began = time.monotonic()
    assert client.via_helper(b"{}", False) is None
    assert time.monotonic() - began == pytest.approx(0.5, abs=0.3)
    fake.close()
    assert fake.after_ack == ["EOF"]


def test_request_carries_started_and_the_wire_version(sock_path):
    seen: list[dict] = []

    def record(conn, request):
        seen.append(request)

    fake = FakeHelper(sock_path, record)
    assert client.via_helper(b"{}", True, started=123.5) is None
    fake.close()
    assert seen[0]["v"] == WIRE_VERSION and seen[0]["started"] == 123.5
    assert seen[0]["stdin"] == b"{}" and seen[0]["verbose"] is True


def test_another_version_falls_back_without_go(sock_path):
    def old(conn, request):
        conn.sendall(frame({"v": WIRE_VERSION + 1, "ack": True, "deadline": 1e12}))
        fake.next_message(conn)

    fake = FakeHelper(sock_path, old)
    assert client.via_helper(b"{}", False) is None
    fake.close()
    assert fake.after_ack == ["EOF"]


def test_ack_with_a_past_deadline_or_garbage_falls_back_without_go(sock_path, monkeypatch):
    def late(conn: socket.socket, request: dict[str, Any]) -> None:
        ack(conn, request, request["started"] - 1)
        fake.next_message(conn)

    fake = FakeHelper(sock_path, late)
    assert client.via_helper(b"{}", False) is None
    fake.close()
    assert fake.after_ack == ["EOF"]

    def garbage(conn: socket.socket, request: dict[str, Any]) -> None:
        conn.sendall(frame(["not", "a", "dict"]))  # type: ignore[arg-type]
        fake.next_message(conn)

    fake = FakeHelper(sock_path.with_name("g.sock"), garbage)
    monkeypatch.setenv("IPAM_DA_CONSUL_SOCKET", str(sock_path.with_name("g.sock")))
    assert client.via_helper(b"{}", False) is None
    fake.close()
    assert fake.after_ack == ["EOF"]


def test_answer_after_go_is_returned(sock_path):
    def good(conn, request):
        ack(conn, request, request["started"] + 5)
        fake.next_message(conn)
        conn.sendall(frame({"stdout": "out\n", "stderr": "err\n", "code": 0}))

    fake = FakeHelper(sock_path, good)
    assert client.via_helper(b"{}", False) == ("out\n", "err\n", 0)
    fake.close()
    assert fake.after_ack == [{"go": True}]


def test_no_answer_after_go_is_error_11_before_the_deadline(sock_path):
    """`ipam.timeout` is a cap on the call as the runtime sees it: the client gives up a little
    before the deadline, leaving itself the time to answer and exit."""
    def stuck(conn, request):
        ack(conn, request, request["started"] + 0.6)
        fake.next_message(conn)
        time.sleep(2.0)  # stopped: holds the connection, never answers

    fake = FakeHelper(sock_path, stuck)
    began = time.monotonic()
    out, err, code = client.via_helper(b"{}", False, started=began)
    elapsed = time.monotonic() - began
    assert code == 11
    assert 0.6 - EXIT_MARGIN - 0.05 <= elapsed <= 0.6
    error = json.loads(out)
    assert error["code"] == 11 and error["cniVersion"] == "0.4.0"
    assert f"the helper at {sock_path} did not answer before the call's deadline" in error["msg"]
    assert "did not answer" in err
    fake.close()


def test_helper_dying_after_go_falls_back(sock_path):
    def dies(conn, request):
        ack(conn, request, request["started"] + 5)
        fake.next_message(conn)  # then the connection closes: EOF

    fake = FakeHelper(sock_path, dies)
    assert client.via_helper(b"{}", False) is None
    fake.close()


@pytest.mark.parametrize("text", ["plain", 'quote " back \\ slash', "ctl \x00\x1f\n\t", "é ☃"])
def test_error_json_is_valid(text):
    assert json.loads(client._json_str(text)) == text


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, 1.0), ("2.5", 2.5), ("0", 1.0), ("-1", 1.0), ("nan", 1.0), ("inf", 1.0), ("x", 1.0)],
)
def test_ack_timeout_from_env(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("IPAM_DA_CONSUL_HELPER_ACK_TIMEOUT", raising=False)
    else:
        monkeypatch.setenv("IPAM_DA_CONSUL_HELPER_ACK_TIMEOUT", value)
    assert client.ack_timeout() == expected


@pytest.mark.parametrize(
    ("stdin", "expected"),
    [
        (b'{"cniVersion": "1.1.0", "ipam": {"timeout": 3}}', (3.0, "1.1.0")),
        (b'{"cniVersion": "1.0.0", "ipam": {"timeout": 2.5}}', (2.5, "1.0.0")),
        (b'{"cniVersion": "1.0.0", "ipam": {}}', (CALL_TIMEOUT.default, "1.0.0")),
        (b'{"ipam": {"timeout": "3"}}', (CALL_TIMEOUT.default, None)),
        (b'{"ipam": {"timeout": true}}', (CALL_TIMEOUT.default, None)),
        (b'{"ipam": {"timeout": 100000}}', (CALL_TIMEOUT.default, None)),
        (b'{"ipam": {"timeout": -1}}', (CALL_TIMEOUT.default, None)),
        # The setting's own limits (consul/settings.py), as the config's schema applies them.
        (b'{"ipam": {"timeout": 0.05}}', (CALL_TIMEOUT.default, None)),
        (b'{"ipam": {"timeout": 600}}', (600.0, None)),
        (b'{"cniVersion": "", "ipam": {"timeout": 0.1}}', (0.1, None)),
        (b"{not json", (CALL_TIMEOUT.default, None)),
        (b"[]", (CALL_TIMEOUT.default, None)),
        (b"\xff", (CALL_TIMEOUT.default, None)),
    ],
)
def test_call_timeout_from_stdin(stdin, expected):
    config = stdin_json.peek(stdin)
    assert (stdin_json.call_timeout(config), stdin_json.cni_version(config)) == expected


def test_hang_up_check_sees_a_closed_client():
    helper_end, client_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with helper_end:
        abandoned = hung_up(helper_end)
        assert abandoned() is False
        client_end.close()
        assert abandoned() is True


def test_client_imports_stay_cheap():
    """What the client path adds to a bare interpreter's modules: nothing heavy."""
    import subprocess
    import sys

    code = (
        "import sys; before = set(sys.modules); "
        "import ipam_da_consul.cni.main, ipam_da_consul.cni.helper.client; "
        "print(' '.join(sorted(set(sys.modules) - before)))"
    )
    added = set(subprocess.check_output([sys.executable, "-c", code], text=True).split())
    assert added <= {
        "ipam_da_consul",
        "ipam_da_consul.cni",
        "ipam_da_consul.cni.main",
        "ipam_da_consul.cni.helper",
        "ipam_da_consul.cni.helper.client",
        "ipam_da_consul.cni.helper.wire",
        "_socket",
        "marshal",
        "time",
        "__future__",  # a few names, for `from __future__ import annotations`
    }, added


# -- the frames, as the helper validates and writes them (cni/helper/frames.py) ----------------
def test_the_clients_request_is_a_valid_call_frame() -> None:
    from ipam_da_consul.cni.helper.server import Call

    request = client.request(b'{"cniVersion": "1.1.0", "ipam": {"timeout": 3}}', True, 100.0)
    call = Call.from_request(request, now=200.0)
    assert (call.started, call.deadline, call.verbose, call.cni_version) == (
        100.0, 103.0, True, "1.1.0")
    assert Call.from_request(request, now=50.0).started == 50.0  # never later than now


@pytest.mark.parametrize(
    "change",
    [
        {"stdin": "not bytes"},
        {"started": float("nan")},
        {"started": 5},
        {"env": {"CNI_COMMAND": 1}},
        {"env": ["CNI_COMMAND"]},
        {"verbose": "yes"},
        {"v": True},
    ],
    ids=repr,
)
def test_a_malformed_call_frame_is_refused(change: dict[str, Any]) -> None:
    from ipam_da_consul.cni.helper.server import Call

    request = client.request(b"{}", False, 100.0) | change
    with pytest.raises(ValueError, match="malformed call request"):
        Call.from_request(request, now=200.0)
    missing = client.request(b"{}", False, 100.0)
    del missing["env"]
    with pytest.raises(ValueError, match="env"):
        Call.from_request(missing, now=200.0)


def test_the_helpers_frames_are_what_the_client_reads() -> None:
    from ipam_da_consul.cni.helper import frames

    assert frames.ack(12.5, "1.0.0") == {
        "v": client.WIRE_VERSION, "ack": True, "deadline": 12.5, "cniVersion": "1.0.0"}
    assert frames.answer("out", "err", 7) == {"stdout": "out", "stderr": "err", "code": 7}
    assert frames.is_go({"go": True}) and not frames.is_go({"go": 1}) and not frames.is_go([])
