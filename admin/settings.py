"""Where the admin CLI finds Consul: command-line options first, then the environment
variables the `consul` CLI itself reads, then the local agent."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from ..allocator.layout import Layout
from ..consul import ConsulClient, ConsulKV, Deadline, TLSConfig
from .errors import UsageError

DEFAULT_ADDR = "http://127.0.0.1:8500"
DEFAULT_PREFIX = "ipam/"
DEFAULT_TIMEOUT = 10.0


@dataclass(frozen=True)
class Settings:
    servers: list[str]
    layout: Layout
    timeout: float
    token: str | None = field(default=None, repr=False)
    tls: TLSConfig = field(default_factory=TLSConfig)
    datacenter: str | None = None


def resolve(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    ssl = env.get("CONSUL_HTTP_SSL", "").lower() in ("1", "true", "yes")
    given = getattr(args, "consul", None)
    if given:
        servers = [normalize_url(u, "--consul") for u in given]
    elif env.get("CONSUL_HTTP_ADDR"):
        servers = [normalize_url(env["CONSUL_HTTP_ADDR"], "CONSUL_HTTP_ADDR", ssl)]
    else:
        servers = [DEFAULT_ADDR]
    tls = TLSConfig(
        _file(getattr(args, "ca_file", None), "--ca-file", env, "CONSUL_CACERT"),
        _file(getattr(args, "cert_file", None), "--cert-file", env, "CONSUL_CLIENT_CERT"),
        _file(getattr(args, "key_file", None), "--key-file", env, "CONSUL_CLIENT_KEY"),
    )
    if tls.key_file and not tls.cert_file:
        raise UsageError(
            "a client key needs its certificate: add --cert-file or CONSUL_CLIENT_CERT"
        )
    return Settings(
        servers=servers,
        layout=Layout(normalize_prefix(getattr(args, "prefix", None) or DEFAULT_PREFIX)),
        timeout=getattr(args, "timeout", None) or DEFAULT_TIMEOUT,
        token=_token(args, env),
        tls=tls,
        datacenter=getattr(args, "datacenter", None) or None,
    )


def connect(settings: Settings) -> tuple[ConsulClient, ConsulKV]:
    client = ConsulClient(
        settings.servers,
        # One budget for the whole command; a single read may use all of it (big listings).
        connect_timeout=min(2.0, settings.timeout),
        read_timeout=settings.timeout,
        deadline=Deadline(settings.timeout),
        token=settings.token,
        tls=settings.tls,
        datacenter=settings.datacenter,
    )
    return client, ConsulKV(client)


def normalize_url(raw: str, source: str, ssl: bool = False) -> str:
    """`host:port` becomes `http://host:port` (https with CONSUL_HTTP_SSL), as the consul CLI
    does; anything but an http(s) URL with a host is refused."""
    url = raw.strip()
    if "://" not in url:
        url = ("https://" if ssl else "http://") + url
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError on a bad port)
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"{source} {raw!r} is not a Consul HTTP address: give http(s)://HOST:PORT")
    return url.rstrip("/")


def normalize_prefix(prefix: str) -> str:
    # Same rule as the plugin's kv_prefix, so both read and write the same keys.
    prefix = prefix.strip("/")
    return f"{prefix}/" if prefix else ""


def _file(given: str | None, option: str, env: Mapping[str, str], var: str) -> str | None:
    path = given or env.get(var) or None
    source = option if given else var
    if path is not None and not os.access(path, os.R_OK):
        # Checked here: requests raises a bare OSError for a missing CA bundle.
        raise UsageError(f"cannot read {source} {path!r}: check the path and permissions")
    return path


def _token(args: argparse.Namespace, env: Mapping[str, str]) -> str | None:
    """--token, --token-file, then CONSUL_HTTP_TOKEN_FILE and CONSUL_HTTP_TOKEN (the order the
    plugin uses for its environment). The token itself is never echoed."""
    if getattr(args, "token", None):
        return args.token
    given = getattr(args, "token_file", None)
    path = given or env.get("CONSUL_HTTP_TOKEN_FILE")
    if path:
        source = "--token-file" if given else "CONSUL_HTTP_TOKEN_FILE"
        try:
            with open(path, encoding="utf-8") as fh:
                token = fh.read().strip()
        except OSError as exc:
            raise UsageError(f"cannot read {source} {path!r}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise UsageError(f"{source} {path!r} is not a text file holding a token") from None
        if not token:
            raise UsageError(f"{source} {path!r} is empty: put the ACL token in it")
        return token
    return env.get("CONSUL_HTTP_TOKEN") or None
