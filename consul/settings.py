"""How to reach Consul, and the one home of the rules for each connection setting: server URLs,
the ACL token (inline, from a file, from the environment), TLS files, datacenter, KV prefix and
time limits. The plugin's network config (cni/config.py, cni/schemas.py) and the admin CLI's
options (admin/settings.py) both go through these rules, so both reach the same Consul the same
way and read and write the same keys; `build_client` is the one place a ConsulClient is made
from settings.

A setting that cannot be used raises SettingsError, its message naming the setting as the
caller spells it (`source`) and what to give instead; each caller turns it into its own kind
of failure. An ACL token is never part of a message or a repr.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from .transport import TLSConfig
from .urls import shown_url

if TYPE_CHECKING:
    from .client import ConsulClient, Sent


class SettingsError(ValueError):
    """A connection setting that cannot be used. The message names the setting as the caller
    spelled it and what to give instead, never a token; the plugin turns it into CNI error 7,
    the admin CLI into a usage error."""


# The variables the `consul` CLI reads; the plugin and the admin CLI honour the same ones.
ENV_ADDR = "CONSUL_HTTP_ADDR"
ENV_SSL = "CONSUL_HTTP_SSL"
ENV_TOKEN = "CONSUL_HTTP_TOKEN"
ENV_TOKEN_FILE = "CONSUL_HTTP_TOKEN_FILE"
ENV_CA_FILE = "CONSUL_CACERT"
ENV_CERT_FILE = "CONSUL_CLIENT_CERT"
ENV_KEY_FILE = "CONSUL_CLIENT_KEY"

DEFAULT_ADDR = "http://127.0.0.1:8500"
DEFAULT_PREFIX = "ipam/"


@dataclass(frozen=True)
class Limit:
    """A time setting in seconds: its default and the closed range it must lie in."""

    default: float
    low: float
    high: float


CONNECT_TIMEOUT = Limit(2.0, 0.01, 60)
READ_TIMEOUT = Limit(5.0, 0.01, 300)
# How long every server may refuse connections before a call gives up (ConsulClient).
UNREACHABLE_GRACE = Limit(2.0, 0, 600)
# The first try of a request waits this long, each further one twice as long (ConsulClient).
ATTEMPT_TIMEOUT = Limit(2.0, 0.01, 300)
# The whole call's budget, retries across servers included.
CALL_TIMEOUT = Limit(15.0, 0.1, 600)


@dataclass(frozen=True)
class ConsulSettings:
    """Everything needed to reach Consul and find the pools, already checked by the rules
    below. Field order is positional API: tests and the helper build these directly."""

    servers: list[str]
    connect_timeout: float = CONNECT_TIMEOUT.default
    read_timeout: float = READ_TIMEOUT.default
    timeout: float = CALL_TIMEOUT.default
    unreachable_grace: float = UNREACHABLE_GRACE.default
    attempt_timeout: float = ATTEMPT_TIMEOUT.default
    token: str | None = field(default=None, repr=False)
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    datacenter: str | None = None
    kv_prefix: str = DEFAULT_PREFIX

    @property
    def tls(self) -> TLSConfig:
        return TLSConfig(self.ca_file, self.cert_file, self.key_file)


def build_client(
    settings: ConsulSettings,
    budget: float | None = None,
    known_good: str | None = None,
    on_request: Callable[[Sent], None] | None = None,
) -> ConsulClient:
    """A client for `settings` whose time budget is `budget` seconds (default: the settings'
    `timeout`). `known_good`: a server a long-lived caller saw with a leader moments ago.
    `on_request`: told of each request sent (ConsulClient)."""
    # Here, not at the top: the rules above are read where no client is made (the plugin's
    # config, the helper's first look at a request), and the client brings requests.
    from .client import ConsulClient, Deadline

    return ConsulClient(
        settings.servers,
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        unreachable_grace=settings.unreachable_grace,
        attempt_timeout=settings.attempt_timeout,
        deadline=Deadline(settings.timeout if budget is None else budget),
        token=settings.token,
        tls=settings.tls,
        datacenter=settings.datacenter,
        known_good=known_good,
        on_request=on_request,
    )


# -- servers ---------------------------------------------------------------------------------
def check_server_url(value: str) -> str:
    """`value` when it is an http(s) URL with a host and nothing after the path, which the
    client appends API paths to. urlsplit, not a URL regex: compiling marshmallow's costs
    ~60 ms per process, a fifth of an in-process plugin call."""
    try:
        url = urlsplit(value)
        url.port  # noqa: B018 (raises ValueError for a port that is not a number in range)
    except ValueError:
        url = None
    if url is None or url.scheme not in ("http", "https") or not url.hostname:
        raise SettingsError(f"not an http(s) URL of a Consul server: {shown_url(value)!r}")
    if any(c.isspace() for c in value) or url.query or url.fragment:
        raise SettingsError(
            f"a Consul server URL has no spaces, query or fragment: {shown_url(value)!r}"
        )
    return value


def server_address(raw: str, source: str, ssl: bool = False) -> str:
    """An address as the consul CLI takes one: `host:port` becomes `http://host:port` (https
    with `ssl`); then it must be a server URL as check_server_url says. No trailing slash."""
    url = raw.strip()
    if "://" not in url:
        url = ("https://" if ssl else "http://") + url
    try:
        check_server_url(url)
    except SettingsError:
        raise SettingsError(
            f"{source} {shown_url(raw)!r} is not a Consul HTTP address: give http(s)://HOST:PORT"
        ) from None
    return url.rstrip("/")


def servers_from(given: Sequence[str] | None, source: str, env: Mapping[str, str]) -> list[str]:
    """The addresses given (`source` names the option), else CONSUL_HTTP_ADDR (https when
    CONSUL_HTTP_SSL is true), else the local agent: the consul CLI's order."""
    if given:
        return [server_address(u, source) for u in given]
    if env.get(ENV_ADDR):
        ssl = env.get(ENV_SSL, "").lower() in ("1", "true", "yes")
        return [server_address(env[ENV_ADDR], ENV_ADDR, ssl)]
    return [DEFAULT_ADDR]


# -- ACL token ---------------------------------------------------------------------------------
def resolve_token(
    token: str | None,
    token_file: str | None,
    env: Mapping[str, str],
    *,
    file_source: str,
    empty_file_is_anonymous: bool = False,
) -> str | None:
    """The ACL token: `token`, else the one in `token_file` (`file_source` names that setting),
    else in the file CONSUL_HTTP_TOKEN_FILE names, else CONSUL_HTTP_TOKEN; None: anonymous.

    An empty token file is an error unless `empty_file_is_anonymous`, and then it does mean
    anonymous: the environment's CONSUL_HTTP_TOKEN is not tried (the plugin's rule)."""
    if token:
        return token
    if token_file:
        return read_token_file(token_file, file_source, empty_ok=empty_file_is_anonymous)
    if env.get(ENV_TOKEN_FILE):
        return read_token_file(
            env[ENV_TOKEN_FILE], ENV_TOKEN_FILE, empty_ok=empty_file_is_anonymous
        )
    return env.get(ENV_TOKEN) or None


def read_token_file(path: str, source: str, *, empty_ok: bool = False) -> str | None:
    """The token held in the file `path` (surrounding whitespace dropped: files usually end in
    a newline); None when it is empty and `empty_ok`. Messages name the file, never its text."""
    try:
        with open(path, encoding="utf-8") as fh:
            token = fh.read().strip()
    except OSError as exc:
        raise SettingsError(f"cannot read {source} {path!r}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise SettingsError(
            f"{source} {path!r} is not UTF-8 text: an ACL token is a UUID or text"
        ) from None
    if not token and not empty_ok:
        raise SettingsError(f"{source} {path!r} is empty: put the ACL token in it")
    return token or None


# -- TLS ---------------------------------------------------------------------------------------
def tls_config(
    ca_file: str | None,
    cert_file: str | None,
    key_file: str | None,
    env: Mapping[str, str],
    *,
    check_as: tuple[str, str, str] | None = None,
) -> TLSConfig:
    """The CA bundle, client certificate and its key: each as given, else from CONSUL_CACERT,
    CONSUL_CLIENT_CERT, CONSUL_CLIENT_KEY.

    With `check_as` (the caller's names of the three settings) the files are checked now: each
    must be readable, since requests raises a bare OSError for a missing CA bundle, and a key
    needs its certificate, since a key alone would be ignored."""
    given = (ca_file, cert_file, key_file)
    env_vars = (ENV_CA_FILE, ENV_CERT_FILE, ENV_KEY_FILE)
    paths = [g or env.get(var) or None for g, var in zip(given, env_vars, strict=True)]
    if check_as is not None:
        for path, g, option, var in zip(paths, given, check_as, env_vars, strict=True):
            source = option if g else var
            if path is not None and not os.access(path, os.R_OK):
                raise SettingsError(
                    f"cannot read {source} {path!r}: check the path and permissions"
                )
        if paths[2] and not paths[1]:
            raise SettingsError(
                f"a client key needs its certificate: add {check_as[1]} or {ENV_CERT_FILE}"
            )
    return TLSConfig(*paths)


# -- datacenter, KV prefix -------------------------------------------------------------------
def datacenter(value: str | None) -> str | None:
    """None (the agent's own datacenter) for an absent or empty setting."""
    return value or None


def kv_prefix(raw: str, source: str = "a KV prefix") -> str:
    """The prefix the pools live under, as `<segment>/.../` or "" (the KV root): surrounding
    slashes do not matter, so `ipam`, `/ipam` and `ipam/` name the same keys. Keys go into URL
    paths, so no '?', '#', '%' or whitespace, and no empty, '.' or '..' segment."""
    if any(c in "?#%" or c.isspace() for c in raw):
        raise SettingsError(
            f"{source} cannot hold '?', '#', '%' or whitespace (keys go into URLs): {raw!r}"
        )
    prefix = raw.strip("/")
    if prefix and any(segment in ("", ".", "..") for segment in prefix.split("/")):
        # An HTTP client removes '.' and '..' segments: `ipam/../x` would be read as `x`.
        raise SettingsError(
            f"{source} cannot have an empty, '.' or '..' segment (keys go into URLs): {raw!r}"
        )
    return f"{prefix}/" if prefix else ""
