"""Expected failures of the admin CLI, each with the exit status scripts can test."""

from __future__ import annotations

# Exit statuses (documented in the CLI's epilog).
OK = 0
PROBLEMS = 1  # `check` found problems
USAGE = 2  # bad command line or input (argparse uses 2 as well)
CONSUL = 3  # Consul unreachable, refused the request (e.g. HTTP 403) or answered nonsense
STATE = 4  # KV state prevents the action: pool missing or exists, allocation absent or changed


class AdminError(Exception):
    """A failure to report as one line on stderr, then exit with `status`."""

    status = USAGE

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UsageError(AdminError):
    status = USAGE


class StateError(AdminError):
    status = STATE
