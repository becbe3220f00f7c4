"""Errors of the Consul client, in the store's vocabulary (allocator/store.py): callers above
the store never need to know it is Consul."""

from ..allocator.store import StoreError, StoreUnavailable, UnsafeKey

__all__ = ["ConsulError", "ConsulUnavailable", "NotConsul", "UnsafeKey"]


class ConsulError(StoreError):
    """Consul answered, but not with what the request needed (HTTP status, bad body).

    `doubtful` is True when the request was a write and an attempt of it may have reached
    Consul without its answer arriving (read timeout, connection dropped after sending, a 5xx
    other than "No cluster leader"): Consul may have applied it even though this is raised.
    """


class NotConsul(ConsulError):
    """Every listed server answered, but none as Consul does (a web server, another service on
    the port): a setting to fix, which no retry heals. Not StoreUnavailable, so a DEL is not
    kept to retry for a day with a config that cannot work."""


class ConsulUnavailable(ConsulError, StoreUnavailable):
    """No listed server answered with a leader before the time budget ran out, or none could
    even be connected to for the unreachable grace."""

