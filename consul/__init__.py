"""A small Consul HTTP client: server choice with failover, timeouts, ACL token, TLS, KV, and
the connection settings with their rules (settings.py).

Knows nothing of CNI or pools.

The names below are loaded when first asked for: importing a light module of the package (the
settings' rules, urls.py) must not load the client and requests with it. The plugin's config
and the helper's first look at a request read the settings' rules; only a call that reaches
Consul needs the client.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .client import ConsulClient, Deadline, Sent, TLSConfig
    from .errors import ConsulError, ConsulUnavailable, NotConsul, UnsafeKey
    from .kv import ConsulKV
    from .settings import ConsulSettings, SettingsError, build_client

__all__ = [
    "ConsulClient",
    "ConsulError",
    "ConsulKV",
    "ConsulSettings",
    "ConsulUnavailable",
    "Deadline",
    "NotConsul",
    "Sent",
    "SettingsError",
    "TLSConfig",
    "UnsafeKey",
    "build_client",
]

_HOMES = {
    "ConsulClient": "client",
    "Deadline": "client",
    "Sent": "client",
    "TLSConfig": "client",
    "ConsulError": "errors",
    "ConsulUnavailable": "errors",
    "NotConsul": "errors",
    "SettingsError": "settings",
    "UnsafeKey": "errors",
    "ConsulKV": "kv",
    "ConsulSettings": "settings",
    "build_client": "settings",
}


def __getattr__(name: str) -> object:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{home}", __name__), name)
    globals()[name] = value
    return value
