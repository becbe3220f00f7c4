"""The thin client: hand the call to a running helper over a unix socket.

Only modules that cost next to nothing to import are used here (`_socket` rather than
`socket`, which pulls in enum and selectors; `marshal` rather than `json`), so a call served by
the helper costs little more than starting the interpreter. Every failure to reach the helper
returns None and the caller does the work in-process; a call that reached the helper but got no
answer is safe to redo, because ADD, DEL and CHECK are idempotent.

Wire format, both ways: an 8-byte big-endian length, then a marshal'd dict. Client and helper
are the same installation, so they share one marshal version.
"""

from __future__ import annotations

import _socket
import marshal
import os

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: see cni/main.py
if TYPE_CHECKING:
    from collections.abc import Callable

DEFAULT_SOCKET = "/run/ipam-da-consul/helper.sock"
# Long enough for any call the helper runs (its own deadline is `ipam.timeout` plus rollback).
_ANSWER_TIMEOUT = 300.0
_FORWARDED = ("CNI_", "CONSUL_", "IPAM_DA_CONSUL_")
MAX_MESSAGE = 16 * 1024 * 1024


def socket_path() -> str:
    return os.environ.get("IPAM_DA_CONSUL_SOCKET") or DEFAULT_SOCKET


def frame(message: dict[str, object]) -> bytes:
    body = marshal.dumps(message)
    return len(body).to_bytes(8, "big") + body


def request(stdin: bytes, verbose: bool) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if k.startswith(_FORWARDED)}
    return {"v": 2, "stdin": stdin, "env": env, "verbose": verbose}


def via_helper(stdin: bytes, verbose: bool) -> tuple[str, str, int] | None:
    path = socket_path()
    try:
        st = os.stat(path)
    except OSError:
        return None
    if st.st_uid not in (0, os.geteuid()):
        return None  # a socket someone else planted: never hand them a call or a token
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(_ANSWER_TIMEOUT)
        sock.connect(path)
        sock.sendall(frame(request(stdin, verbose)))
        answer = marshal.loads(read_frame(sock.recv))
        return str(answer["stdout"]), str(answer["stderr"]), int(answer["code"])
    except (OSError, ValueError, EOFError, KeyError, TypeError):
        return None
    finally:
        sock.close()


def read_frame(recv: Callable[[int], bytes]) -> bytes:
    """One length-prefixed message from `recv` (a socket's recv)."""

    def exactly(n: int) -> bytes:
        chunks, left = [], n
        while left:
            chunk = recv(min(left, 1 << 20))
            if not chunk:
                raise EOFError("connection closed mid-message")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    size = int.from_bytes(exactly(8), "big")
    if size > MAX_MESSAGE:
        raise ValueError(f"message of {size} bytes is too large")
    return exactly(size)
