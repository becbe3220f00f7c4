"""Where the admin CLI finds Consul: command-line options first, then the environment
variables the `consul` CLI itself reads, then the local agent. The rules for each setting are
consul/settings.py's, shared with the plugin; here they meet the CLI's option names."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..allocator.layout import Layout
from ..consul import ConsulClient, ConsulKV, SettingsError, TLSConfig
from ..consul import settings as cs
from .errors import UsageError

DEFAULT_ADDR = cs.DEFAULT_ADDR
DEFAULT_PREFIX = cs.DEFAULT_PREFIX
DEFAULT_TIMEOUT = 10.0
STDIN = "-"


@dataclass(frozen=True)
class Settings:
    servers: list[str]
    layout: Layout
    timeout: float
    token: str | None = field(default=None, repr=False)
    tls: TLSConfig = field(default_factory=TLSConfig)
    datacenter: str | None = None

    def consul(self) -> cs.ConsulSettings:
        """One budget for the whole command, and a single read may use all of it (big
        listings); grace and attempt timeouts are the plugin's defaults."""
        return cs.ConsulSettings(
            self.servers,
            connect_timeout=min(cs.CONNECT_TIMEOUT.default, self.timeout),
            read_timeout=self.timeout,
            timeout=self.timeout,
            token=self.token,
            ca_file=self.tls.ca_file,
            cert_file=self.tls.cert_file,
            key_file=self.tls.key_file,
            datacenter=self.datacenter,
            kv_prefix=self.layout.prefix,
        )


def resolve(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    try:
        servers = cs.servers_from(getattr(args, "consul", None), "--consul", env)
        tls = cs.tls_config(
            getattr(args, "ca_file", None),
            getattr(args, "cert_file", None),
            getattr(args, "key_file", None),
            env,
            check_as=("--ca-file", "--cert-file", "--key-file"),
        )
        prefix = cs.kv_prefix(getattr(args, "prefix", None) or DEFAULT_PREFIX, "--prefix")
        # --token, --token-file (- for stdin), then CONSUL_HTTP_TOKEN_FILE and CONSUL_HTTP_TOKEN.
        token = getattr(args, "token", None)
        if not token and getattr(args, "token_file", None) == STDIN:
            token = token_from_stdin(args)
        else:
            token = cs.resolve_token(
                token, getattr(args, "token_file", None), env, file_source="--token-file"
            )
    except SettingsError as exc:
        # The message names the option or variable at fault; the CLI's exit status 2 says
        # nothing was sent.
        raise UsageError(str(exc)) from None
    return Settings(
        servers=servers,
        layout=Layout(prefix),
        timeout=getattr(args, "timeout", None) or DEFAULT_TIMEOUT,
        token=token,
        tls=tls,
        datacenter=cs.datacenter(getattr(args, "datacenter", None)),
    )


# Options whose value `-` also reads stdin: the token cannot come from there too.
_STDIN_OPTIONS = (("live_ids", "--live-ids"), ("ranges_json", "--ranges-json"))


def token_from_stdin(args: argparse.Namespace) -> str:
    """`--token-file -`: the token is the first line of stdin, which nobody else sees (unlike
    a command-line argument, in every user's process list)."""
    for attr, option in _STDIN_OPTIONS:
        if getattr(args, attr, None) == STDIN:
            raise UsageError(
                f"--token-file - and {option} - both read stdin: give the token in a file "
                f"(--token-file FILE or CONSUL_HTTP_TOKEN_FILE) or {option} a file"
            )
    token = sys.stdin.readline().strip() if sys.stdin is not None else ""
    if not token:
        raise UsageError("--token-file -: stdin is empty: pipe the ACL token in")
    return token


def connect(settings: Settings) -> tuple[ConsulClient, ConsulKV]:
    client = cs.build_client(settings.consul())
    return client, ConsulKV(client)
