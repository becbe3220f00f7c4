"""The thin client: hand the call to a running helper over a unix socket.

Only modules that cost next to nothing to import are used here (`_socket` rather than
`socket`, which pulls in enum and selectors; `marshal` rather than `json`), so a call served by
the helper costs little more than starting the interpreter.

A call is run by exactly one of the helper or this process, never both, never neither:

1. client -> helper: the request `{"v", "stdin", "env", "verbose", "started"}`; `started` is
   this process's `time.monotonic()` at start (CLOCK_MONOTONIC is system-wide on Linux, so the
   helper reads it on its own clock).
2. helper -> client: the acknowledgement `{"v", "ack": True, "deadline", "cniVersion"}`, sent
   by a live handler thread; `deadline` is `started` plus the config's `ipam.timeout`.
   A helper that will not run the call (another wire version, a deadline already past) closes
   the connection or answers without "ack" instead.
3. client -> helper: `{"go": True}`. From here on the client is committed to the helper.
4. helper -> client: the answer `{"stdout", "stderr", "code"}`, by the deadline.

No acknowledgement within the ack timeout (a helper that is stopped, swapping or overloaded:
the kernel queues connections and bytes for a stopped process): the client hangs up without
"go" and does the call itself; the helper drops a request whose client hung up. Once "go" is
sent, no answer by the deadline is error 11, never a fallback, because the
helper may still act; the helper's machine stops at the same deadline and before every write
checks that the client is still there. A helper that dies after "go" (EOF) is safe to redo
in-process: ADD, DEL and CHECK are idempotent.

Framing and the shared constants: wire.py.
"""

from __future__ import annotations

import _socket
import marshal
import os
import sys
import time

from .wire import DEFAULT_SOCKET, TRY_AGAIN_LATER, WIRE_VERSION, frame, read_frame

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: see cni/main.py
if TYPE_CHECKING:
    from collections.abc import Callable

DEFAULT_ACK_TIMEOUT = 1.0
# After "go" the client waits until the call's deadline less this, then answers 11 itself:
# `ipam.timeout` caps the call as the runtime sees it, from the process's start to its exit.
# The helper's machine stops 0.3 s before the deadline (cni/commands/base.py EXIT_MARGIN), which
# leaves its answer 0.2 s to cross the socket.
EXIT_MARGIN = 0.1
_FORWARDED = ("CNI_", "CONSUL_", "IPAM_DA_CONSUL_")


def socket_path() -> str:
    return os.environ.get("IPAM_DA_CONSUL_SOCKET") or DEFAULT_SOCKET


def ack_timeout() -> float:
    try:
        value = float(os.environ.get("IPAM_DA_CONSUL_HELPER_ACK_TIMEOUT") or DEFAULT_ACK_TIMEOUT)
    except ValueError:
        return DEFAULT_ACK_TIMEOUT
    return value if 0 < value < 1e6 else DEFAULT_ACK_TIMEOUT  # also rejects nan and inf


def request(stdin: bytes, verbose: bool, started: float) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if k.startswith(_FORWARDED)}
    return {"v": WIRE_VERSION, "stdin": stdin, "env": env, "verbose": verbose, "started": started}


def via_helper(
    stdin: bytes, verbose: bool, started: float | None = None
) -> tuple[str, str, int] | None:
    """The helper's (stdout, stderr, exit code), or None: do the call in this process."""
    started = time.monotonic() if started is None else started
    path = socket_path()
    if not os.path.exists(path):
        return None  # no helper: spare the socket
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        return _call(sock, path, stdin, verbose, started)
    except (OSError, ValueError, EOFError, KeyError, TypeError):
        return None
    finally:
        sock.close()


def _call(
    sock: _socket.socket, path: str, stdin: bytes, verbose: bool, started: float
) -> tuple[str, str, int] | None:
    # Connect, send and the acknowledgement share one budget: each can block on a helper that
    # is stopped (a full backlog, a full socket buffer, no handler thread).
    give_up = time.monotonic() + ack_timeout()
    _budget(sock, give_up)
    sock.connect(path)
    if not _trusted_peer(sock):
        return None  # a socket someone else planted: never hand them a call or a token
    _budget(sock, give_up)
    sock.sendall(frame(request(stdin, verbose, started)))
    ack = marshal.loads(read_frame(_recv_until(sock, give_up)))
    if not isinstance(ack, dict) or ack.get("v") != WIRE_VERSION or ack.get("ack") is not True:
        return None  # the helper will not run it (and has not): do it here
    deadline = float(ack["deadline"])
    version = str(ack.get("cniVersion") or "1.0.0")
    # A deadline already past raises here, before "go": the helper then drops the call.
    _budget(sock, deadline - EXIT_MARGIN)
    sock.sendall(frame({"go": True}))
    # Committed: from here a timeout is an error, not a fallback.
    try:
        answer = marshal.loads(read_frame(_recv_until(sock, deadline - EXIT_MARGIN)))
    except TimeoutError:
        return _no_answer(path, version)
    return str(answer["stdout"]), str(answer["stderr"]), int(answer["code"])


def _trusted_peer(sock: _socket.socket) -> bool:
    """The process at the other end is root's or ours, as the kernel saw it when it connected
    (SO_PEERCRED): not a check of the path, which whoever controls a folder above it could swap
    between a look at it and the connection."""
    creds = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
    uid = int.from_bytes(creds[4:8], sys.byteorder)  # struct ucred: pid, uid, gid
    return uid in (0, os.geteuid())


def _budget(sock: _socket.socket, until: float) -> None:
    left = until - time.monotonic()
    if left <= 0:
        raise TimeoutError("out of time waiting for the helper")
    sock.settimeout(left)


def _recv_until(sock: _socket.socket, until: float) -> Callable[[int], bytes]:
    """`sock.recv` bounded in total, not per chunk: a trickling peer cannot stretch the wait."""

    def recv(n: int) -> bytes:
        _budget(sock, until)
        return sock.recv(n)

    return recv


def _no_answer(path: str, version: str) -> tuple[str, str, int]:
    msg = (
        f"the helper at {path} did not answer before the call's deadline; it may still act on "
        "this call, so it was not redone here"
    )
    out = (
        f'{{"cniVersion": {_json_str(version)}, "code": {TRY_AGAIN_LATER}, '
        f'"msg": {_json_str(msg)}}}\n'
    )
    return out, f"ipam-da-consul: ERROR: {msg}\n", TRY_AGAIN_LATER


def _json_str(text: str) -> str:
    """A JSON string literal, without importing json (see the module docstring)."""
    out = ['"']
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch < " ":
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)
