"""What ConsulClient needs from HTTP: send one request to one server, get its answer or one of
a few kinds of trouble. The client decides failover, leader suspicion and doubt from the kind
alone, never from an HTTP library's exceptions; `requests_transport.py` is the transport the
product uses, tests may script their own (tests/support/fake_transport.py).

Standard library only, and nothing else in `consul/` imported."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, NamedTuple, Protocol


@dataclass(frozen=True)
class TLSConfig:
    """The CA bundle, client certificate and key a transport uses (None: the system's CAs, no
    client certificate). Here, not with the requests transport, so that the settings' rules
    (settings.py) can make one without importing requests."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


class Answer(NamedTuple):
    """A whole HTTP answer: a redirect is an answer too, never followed by a transport."""

    status: int
    body: bytes
    headers: Mapping[str, str]


class Transport(Protocol):
    def send(
        self,
        server: str,
        method: str,
        path: str,
        params: Mapping[str, str] | None,
        body: bytes | None,
        *,
        connect_timeout: float,
        read_timeout: float,
    ) -> Answer:
        """`method` `server + path` with `params` as its query: the whole answer, or a
        TransportError. `read_timeout` bounds each wait for bytes of the answer."""
        ...

    def close(self) -> None: ...


class TransportError(Exception):
    """No whole answer came. Each kind says what the client may conclude: whether the server
    is there at all, and whether a write may have reached Consul (and been applied) although
    its answer was lost. `problem` is what messages and logs show: the kind's `what`, then any
    detail in parentheses.

    Raised as itself for trouble of no known kind: taken as connected and maybe arrived, the
    side on which a write is reported in doubt rather than wrongly as not applied."""

    what: ClassVar[str] = "request failed"
    # A connection was made: the server is there, whatever else went wrong.
    connected: ClassVar[bool] = True
    # Bytes of the request may have reached the server.
    may_have_arrived: ClassVar[bool] = True

    def __init__(self, detail: str | None = None) -> None:
        self.problem = f"{self.what} ({detail})" if detail else self.what
        super().__init__(self.problem)


class ConnectFailed(TransportError):
    """Refused, no route, no such host: not a byte of the request left this host."""

    what = "connection failed (refused or unreachable)"
    connected = False
    may_have_arrived = False


class ConnectTimedOut(TransportError):
    """The TCP handshake did not complete in time: nothing was sent."""

    what = "connect timed out"
    connected = False
    may_have_arrived = False


class TLSFailed(TransportError):
    """The server answered the connection, but the TLS handshake failed (a wrong CA, a
    missing client certificate): the request itself was never sent, and waiting will not
    heal it."""

    what = "TLS error"
    may_have_arrived = False


class ReadTimedOut(TransportError):
    """The request was sent and nothing came back in time: the server, or the leader it
    forwards to, is hung."""

    what = "no answer before the read timeout"


class Dropped(TransportError):
    """The request was sent and the connection closed, reset or went silent before the whole
    answer came: before its first byte, or mid-answer."""

    what = "connection dropped before an answer came"
