"""A small Consul HTTP client: server choice with failover, timeouts, ACL token, TLS, KV.

Knows nothing of CNI or pools.
"""

from .client import ConsulClient, Deadline, TLSConfig
from .errors import ConsulError, ConsulUnavailable
from .kv import ConsulKV

__all__ = ["ConsulClient", "ConsulError", "ConsulKV", "ConsulUnavailable", "Deadline", "TLSConfig"]
