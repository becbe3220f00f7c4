"""Drive cni.machine.Invocation over tests/support/memkv.py's MemKV, through the store factory: no
Consul, no network, a call in milliseconds. Each call's walk through the states is the
invocation's own account of the transitions it fired (`Invocation.record`, cni/events.py), so a
test pins the exact path whatever the log lines say."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ipam_da_consul.cni.config import ConsulSettings
from ipam_da_consul.cni.events import Request
from ipam_da_consul.cni.machine import Invocation
from ipam_da_consul.cni.state import StateDir
from ipam_da_consul.consul import Deadline
from loguru import logger

from tests.support.memkv import MemKV

HOST = "host-a"
RANGES: list[dict[str, str]] = [
    {"subnet": "10.0.0.0/24", "rangeStart": "10.0.0.10", "rangeEnd": "10.0.0.12"}
]


def netconf(
    pools: list[dict[str, Any]] | None = None,
    version: str = "1.1.0",
    name: str = "net",
    **ipam: Any,
) -> dict[str, Any]:
    """Strict lowest-first picking unless a test says otherwise, so walks and keys are exact;
    tests/unit/cni/test_machine_stripe.py drives the default (`stripe`)."""
    return {
        "cniVersion": version,
        "name": name,
        "ipam": {
            "type": "ipam-da-consul",
            "consul_servers": ["http://127.0.0.1:8500"],
            "host": HOST,
            "pools": [{"name": "p"}] if pools is None else pools,
            "pick": "lowest",
            **ipam,
        },
    }


@dataclass(frozen=True)
class MemRequest:
    """One call of the in-memory KV, told to the store's `on_request` as ConsulClient tells
    of an HTTP request (cni/events.py Request): the method is the KV operation's name."""

    method: str
    path: str
    server: str = "mem://leader"
    status: int | None = 200
    error: str | None = None
    seconds: float = 0.0


class _Counted:
    """The store's KV: each call of a method is one request, as ConsulClient counts them."""

    def __init__(self, kv: Any, store: MemStore) -> None:
        self.inner = kv
        self.store = store

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            self.store.requests_sent += 1
            if self.store.on_request is not None:
                self.store.on_request(MemRequest(name, str(args[0]) if args else ""))
            return attr(*args, **kwargs)

        return call


@dataclass
class MemStore:
    """The call's store over MemKV; `select` stands for the leader check."""

    kv: Any
    deadline: Deadline
    current: str | None = None
    requests_sent: int = 0
    selects: int = 0
    closed: bool = False
    on_request: Callable[[Request], None] | None = None

    def __post_init__(self) -> None:
        self.kv = _Counted(self.kv, self)

    def select(self) -> str:
        self.selects += 1
        self.requests_sent += 1
        self.current = "mem://leader"
        return self.current

    def close(self) -> None:
        self.closed = True


class Faulty:
    """A KV whose `method` raises `error` from its (after+1)-th call on, while `armed`."""

    def __init__(self, kv: Any, method: str, error: Exception, after: int = 0) -> None:
        self.kv, self.method, self.error, self.after = kv, method, error, after
        self.calls = 0
        self.armed = True

    def __getattr__(self, name: str) -> Any:
        real = getattr(self.kv, name)
        if name != self.method:
            return real

        def call(*args: Any) -> Any:
            self.calls += 1
            if self.armed and self.calls > self.after:
                raise self.error
            return real(*args)

        return call


class Caches:
    """The helper's side as a DEL or STATUS sees it: a remembered server, and DELs taken over
    when Consul cannot be reached. (ADD's pool cache needs a watchable KV: tests/test_cache.py
    covers it on Consul.)"""

    def __init__(self, server: str | None = None, takes_over_dels: bool = True) -> None:
        self.server = server
        self.remembered: list[str] = []
        self.takes_over_dels = takes_over_dels

    def recent_server(self, settings: ConsulSettings) -> str | None:
        return self.server

    def remember_server(self, settings: ConsulSettings, server: str) -> None:
        self.remembered.append(server)

    def get(self, settings: ConsulSettings, layout: Any) -> Any:
        raise AssertionError("only ADD reads the pool cache")

    def peek(self, settings: ConsulSettings) -> Any:
        return None


@dataclass
class Run:
    code: int
    output: dict[str, Any] | None
    walk: list[str]  # the states, from start
    lines: list[str]  # every log message of the call
    inv: Invocation
    store: MemStore | None

    def logged(self, text: str) -> bool:
        return any(text in line for line in self.lines)


class Mem:
    """One in-memory KV and the calls made against it; with `state`, the host's state folder
    (cni/state.py) its calls share."""

    def __init__(self, state: StateDir | None = None) -> None:
        self.state = state
        self.kv = MemKV()
        # Wraps the KV each call's store gets (a fault, a held-back write).
        self.wrap: Callable[[Any], Any] = lambda kv: kv
        self.stores: list[MemStore] = []

    def pool(self, name: str = "p", ranges: list[dict[str, str]] | None = None) -> None:
        self.kv.put(f"ipam/{name}", json.dumps(RANGES if ranges is None else ranges).encode())

    def put(self, key: str, value: dict[str, Any]) -> None:
        self.kv.put(key, json.dumps(value).encode())

    def value(self, key: str) -> dict[str, Any] | None:
        entry = self.kv.get(key)
        return None if entry is None else json.loads(entry.value)

    def index(self, key: str) -> int:
        """The key's ModifyIndex; 0 when it does not exist."""
        entry = self.kv.get(key)
        return 0 if entry is None else entry.modify_index

    def keys(self, prefix: str = "ipam/") -> list[str]:
        return [e.key for e in self.kv.list(prefix)]

    def factory(
        self,
        settings: ConsulSettings,
        budget: float,
        known_good: str | None,
        on_request: Callable[[Request], None] | None = None,
    ) -> MemStore:
        # No HTTP here: each KV call is a request (`requests_sent`, `on_request`).
        store = MemStore(self.wrap(self.kv), Deadline(budget), known_good, on_request=on_request)
        self.stores.append(store)
        return store

    def call(
        self,
        command: str,
        conf: dict[str, Any] | None = None,
        container: str = "c1",
        ifname: str = "eth0",
        env: dict[str, str] | None = None,
        stdin: bytes | None = None,
        caches: Any = None,
        abandoned: Callable[[], bool] | None = None,
    ) -> Run:
        environ = {
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": container,
            "CNI_IFNAME": ifname,
            "CNI_NETNS": "/var/run/netns/x",
            "CNI_PATH": "/opt/cni/bin",
            **(env or {}),
        }
        raw = json.dumps(netconf() if conf is None else conf).encode() if stdin is None else stdin
        lines: list[str] = []
        sink = logger.add(lambda m: lines.append(str(m).rstrip("\n")), level="DEBUG",
                          format="{message}")
        stores = len(self.stores)
        try:
            inv = Invocation(raw, environ, caches, abandoned=abandoned,
                             store_factory=self.factory, state=self.state)
            code = inv.run()
        finally:
            logger.remove(sink)
        walk = inv.record.walk
        store = self.stores[stores] if len(self.stores) > stores else None
        return Run(code, inv.output, walk, lines, inv, store)


def ours(run: Run, container: str = "c1", ifname: str = "eth0") -> dict[str, Any]:
    """The allocation value `run` writes for its attachment."""
    return {"target": container, "ifname": ifname, "host": HOST, "network": "net",
            "call": run.inv.inputs.call_id}
