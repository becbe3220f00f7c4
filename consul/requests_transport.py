"""The transport the product uses (transport.py): requests over a kept-alive session, with the
ACL token and TLS settings, mapping requests' and urllib3's exceptions to the transport's kinds
of trouble in one place."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from urllib.parse import urlsplit

import requests
from urllib3.exceptions import (
    ConnectTimeoutError,
    DecodeError,
    NameResolutionError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
)
from urllib3.exceptions import SSLError as Urllib3SSLError

from .transport import (
    Answer,
    ConnectFailed,
    ConnectTimedOut,
    Dropped,
    ReadTimedOut,
    TLSConfig,
    TLSFailed,
    TransportError,
)

__all__ = ["RequestsTransport", "TLSConfig"]

class RequestsTransport:
    def __init__(self, token: str | None = None, tls: TLSConfig | None = None) -> None:
        self.session = requests.Session()
        self.session.trust_env = (
            False  # a proxy from the environment must not sit between us and Consul
        )
        # Servers on this host answer uncompressed. Consul gzips a 60,000-key pool listing
        # (8 MB) in ~150 ms of its own CPU, twice what sending it plain over loopback takes,
        # and the call spends ~30 ms more inflating it; every ADD in-process lists its pool.
        # Across a network the bytes count more, and requests asks for gzip as before.
        self._plain: dict[str, bool] = {}
        if token:
            self.session.headers["X-Consul-Token"] = token
        tls = tls or TLSConfig()
        if tls.ca_file:
            self.session.verify = tls.ca_file
        if tls.cert_file:
            self.session.cert = (tls.cert_file, tls.key_file) if tls.key_file else tls.cert_file

    def plain(self, server: str) -> bool:
        """Whether `server` is asked for uncompressed answers."""
        plain = self._plain.get(server)
        if plain is None:
            plain = self._plain[server] = _on_this_host(server)
        return plain

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
        try:
            r = self.session.request(
                method,
                server + path,
                params=params,
                data=body,
                timeout=(connect_timeout, read_timeout),
                headers=_IDENTITY if self.plain(server) else None,
                stream=True,
                # Never: the token and the body would follow to wherever the answer points.
                allow_redirects=False,
            )
            content = _read_body(r)
        except requests.RequestException as exc:
            raise _kind_of(exc) from exc
        return Answer(r.status_code, content, dict(r.headers))

    def close(self) -> None:
        self.session.close()


_IDENTITY = {"Accept-Encoding": "identity"}


def _read_body(r: requests.Response) -> bytes:
    """The whole body in one read, failing as `Response.content` does. `.content` passes a
    chunked body through three layers 10 kB at a time: a quarter of the time it takes to read
    a 60,000-key listing (8 MB) from a server on this host. Once the body is read, urllib3
    has given the connection back to the pool for the next request."""
    try:
        return r.raw.read(decode_content=True) or b""
    except BaseException as exc:
        # urllib3 drops a connection it failed on; this covers what it does not catch.
        r.close()
        # requests' own mapping (models.Response.iter_content).
        if isinstance(exc, ProtocolError):
            raise requests.exceptions.ChunkedEncodingError(exc) from exc
        if isinstance(exc, DecodeError):
            raise requests.exceptions.ContentDecodingError(exc) from exc
        if isinstance(exc, ReadTimeoutError):
            raise requests.ConnectionError(exc) from exc
        if isinstance(exc, Urllib3SSLError):
            raise requests.exceptions.SSLError(exc) from exc
        raise


def _on_this_host(url: str) -> bool:
    """A loopback address, or localhost, in a server URL."""
    host = urlsplit(url).hostname or ""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _kind_of(exc: requests.RequestException) -> TransportError:
    """The transport's kind of `exc`."""
    if isinstance(exc, requests.ConnectTimeout):
        return ConnectTimedOut()
    if isinstance(exc, requests.ReadTimeout):
        return ReadTimedOut()
    if isinstance(exc, requests.exceptions.SSLError):
        return TLSFailed(str(exc))
    if isinstance(exc, requests.ConnectionError):
        # Also a body that stalled halfway (_read_body): sent, and no whole answer.
        return Dropped() if _connected(exc) else ConnectFailed()
    name = type(exc).__name__
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return Dropped(name)  # the connection closed mid-answer (_read_body)
    # A body that does not decode, and whatever else requests may raise.
    return TransportError(name) if _connected(exc) else ConnectFailed(name)


def _connected(exc: requests.RequestException) -> bool:
    """False when no connection was made (refused, no route, no such host, connect timeout):
    then not a byte of the request left this host. requests wraps urllib3's reason in
    arguments and causes, so the whole chain is searched."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        cause = todo.pop()
        if id(cause) in seen:
            continue
        seen.add(id(cause))
        if isinstance(cause, NewConnectionError | ConnectTimeoutError | NameResolutionError):
            return False
        todo += [a for a in cause.args if isinstance(a, BaseException)]
        for linked in (getattr(cause, "reason", None), cause.__cause__, cause.__context__):
            if isinstance(linked, BaseException):
                todo.append(linked)
    return True
