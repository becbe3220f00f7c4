"""Errors of the Consul client."""


class ConsulError(Exception):
    """Consul answered, but not with what the request needed (HTTP status, bad body).

    `doubtful` is True when the request was a write and an attempt of it may have reached
    Consul without its answer arriving (read timeout, connection dropped after sending, a 5xx
    other than "No cluster leader"): Consul may have applied it even though this is raised.
    """

    def __init__(self, message: str, status: int | None = None, *, doubtful: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.doubtful = doubtful


class UnsafeKey(ConsulError):
    """A key no request may be built from (allocator/store.py key_problem): raised before
    anything is sent."""


class ConsulUnavailable(ConsulError):
    """No listed server answered with a leader before the time budget ran out, or none could
    even be connected to for the unreachable grace."""


class SettingsError(ValueError):
    """A connection setting that cannot be used (consul/settings.py). The message names the
    setting as the caller spelled it and what to give instead, never a token; the plugin turns
    it into CNI error 7, the admin CLI into a usage error."""
