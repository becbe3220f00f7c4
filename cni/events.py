"""What one call did, told by the code that did it: the machine's transitions as it fires them,
each Consul request as the client sends it, the command's own counts. The helper's metrics
(cni/helper/metrics.py), the verbose JSON log (cni/logs.py) and the tests' walks read these,
never the text of a log line, so rewording a message for operators changes none of them.

A leaf module: no import of Consul (a request is anything with the fields of `Request`, which
consul.client.Sent has), nor of the machine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol


class Request(Protocol):
    """One request to one Consul server (consul.client.Sent)."""

    @property
    def method(self) -> str: ...

    @property
    def server(self) -> str:
        """As shown: no user-info."""

    @property
    def path(self) -> str: ...

    @property
    def status(self) -> int | None:
        """None: no whole answer came (`error` says what happened)."""

    @property
    def error(self) -> str | None: ...

    @property
    def seconds(self) -> float: ...


@dataclass(frozen=True)
class Step:
    """One transition the machine fired (cni/machine.py's table)."""

    source: str
    dest: str
    trigger: str


@dataclass(frozen=True)
class Address:
    """An address the call handed out (ADD) or was told of by the runtime (prevResult)."""

    pool: str | None
    ip: str


@dataclass
class CallRecord:
    """One call, filled in as it runs and complete once it has ended."""

    call_id: str
    # CNI_COMMAND as given (also when it is not a valid one: the call then fails with 4).
    command: str = ""
    container: str = ""
    ifname: str = ""
    # Known once stdin is parsed: the network config's `name` and the pools it names.
    network: str = ""
    pools: list[str] = field(default_factory=list)
    addresses: list[Address] = field(default_factory=list)
    code: int = 0
    error: str = ""
    # Compare-and-set writes of ADD that another writer won (each one picked again, or the
    # last one ran the call out of time).
    conflicts: int = 0
    # The work, from the machine's start to its end, and the call as the runtime sees it
    # (from `started`: the plugin process's start, or the thin client's).
    seconds: float = 0.0
    elapsed: float = 0.0
    steps: list[Step] = field(default_factory=list)
    # Every request sent during the call, those of a call it ran within itself included (a
    # DEL its attachment still owed): all of them were this call's doing.
    requests: list[Request] = field(default_factory=list)
    # The ID of the call this one ran within, if it did (its requests are that call's too).
    within: str | None = None

    @property
    def walk(self) -> list[str]:
        """The states in order, from `start`."""
        return ["start", *(step.dest for step in self.steps)]

    def request(self, sent: Request) -> None:
        """The store's `on_request`: one more request of this call."""
        self.requests.append(sent)

    def as_json(self) -> dict[str, Any]:
        """The call as one JSON object (the verbose log's `json` format). Nothing secret: no
        config, no token; servers are shown without user-info."""
        return {
            "call": self.call_id,
            "within": self.within,
            "command": self.command,
            "container": self.container,
            "ifname": self.ifname,
            "network": self.network,
            "pools": self.pools,
            "addresses": [{"pool": a.pool, "ip": a.ip} for a in self.addresses],
            "code": self.code,
            "error": self.error,
            "conflicts": self.conflicts,
            "duration_ms": round(self.seconds * 1000, 1),
            "elapsed_ms": round(self.elapsed * 1000, 1),
            "states": self.walk,
            "consul_requests": [
                {
                    "method": r.method,
                    "server": r.server,
                    "path": r.path,
                    "status": r.status,
                    "error": r.error,
                    "ms": round(r.seconds * 1000, 1),
                }
                for r in self.requests
            ],
        }


# Told of each call once it has ended (execute()'s `observer`): the helper's metrics.
Observer = Callable[[CallRecord], None]
