"""The helper's wire format and the constants its client and server share.

Framing, both ways: an 8-byte big-endian length, then a marshal'd dict. Client and helper are
the same installation, so they share one marshal version. Stdlib only, and cheap to import:
the thin client (client.py) loads this on every plugin call.
"""

from __future__ import annotations

import marshal

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: see cni/main.py
if TYPE_CHECKING:
    from collections.abc import Callable

WIRE_VERSION = 3
DEFAULT_SOCKET = "/run/ipam-da-consul/helper.sock"
TRY_AGAIN_LATER = 11
MAX_MESSAGE = 16 * 1024 * 1024


def frame(message: dict[str, object]) -> bytes:
    body = marshal.dumps(message)
    return len(body).to_bytes(8, "big") + body


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
