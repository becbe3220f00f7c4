"""Errors of the Consul client."""


class ConsulError(Exception):
    """Consul answered, but not with what the request needed (HTTP status, bad body)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ConsulUnavailable(ConsulError):
    """No listed server answered with a leader before the time budget ran out."""
