"""A small Consul HTTP client: server choice with failover, timeouts, ACL token, TLS, KV, and
the connection settings with their rules (settings.py).

Knows nothing of CNI or pools.
"""

from .client import ConsulClient, Deadline, Sent, TLSConfig
from .errors import ConsulError, ConsulUnavailable, NotConsul, SettingsError, UnsafeKey
from .kv import ConsulKV
from .settings import ConsulSettings, build_client

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
