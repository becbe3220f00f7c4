"""Unit tests of the transition table in cni/machine.py: every edge of it taken by some call (no
dead row, no edge a handler needs missing), `fail` from every state, no auto transitions, and
one transition logged per step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from ipam_da_consul.allocator.schemas import load_ranges
from ipam_da_consul.allocator.stripes import Stripes
from ipam_da_consul.cni import machine
from ipam_da_consul.cni.events import Step
from ipam_da_consul.cni.machine import STATES, TRANSITIONS, Invocation
from ipam_da_consul.cni.state import StateDir
from ipam_da_consul.consul import ConsulUnavailable
from transitions import Machine

from tests.support.machine import HOST, Caches, Faulty, Mem, MemStore, Run, netconf

TERMINAL = {"done", "failed"}


def no_store(*args: object) -> Any:
    raise AssertionError("these calls never open a store")


def edges() -> dict[str, dict[str, list[str | None]]]:
    """trigger -> {source: [dest]} as the transitions library built it."""
    machine = Invocation(b"", {}, store_factory=no_store).machine
    return {
        name: {src: [t.dest for t in ts] for src, ts in event.transitions.items()}
        for name, event in machine.events.items()
    }


def table_sources(entry: list) -> set[str]:
    src = entry[1]
    return set(STATES) if src == "*" else {src} if isinstance(src, str) else set(src)


def test_states_are_the_documented_ones() -> None:
    assert {"start", "parsed", "connected", "pool_loaded", "ip_picked", "pool_done",
            "done", "failed"} <= set(STATES)
    assert len(STATES) == len(set(STATES))


def test_every_row_names_known_states_and_triggers_are_unique() -> None:
    triggers = [t[0] for t in TRANSITIONS]
    assert len(triggers) == len(set(triggers)), "each trigger is one row of the one table"
    for row in TRANSITIONS:
        assert table_sources(row) <= set(STATES), row
        assert row[2] in STATES, row


def test_fail_is_reachable_from_every_state() -> None:
    assert edges()["fail"] == {s: ["failed"] for s in STATES}


def test_no_auto_transitions() -> None:
    inv = Invocation(b"", {}, store_factory=no_store)
    assert inv.machine.auto_transitions is False
    assert not [name for name in dir(inv) if name.startswith("to_")]
    assert set(edges()) == {t[0] for t in TRANSITIONS}


def test_terminal_states_only_fail() -> None:
    for trigger, by_source in edges().items():
        if trigger != "fail":
            assert not set(by_source) & TERMINAL, trigger


def test_done_is_reachable_from_every_working_state() -> None:
    graph: dict[str, set[str]] = {s: set() for s in STATES}
    for trigger, by_source in edges().items():
        if trigger == "fail":
            continue
        for src, dests in by_source.items():
            graph[src].update(d for d in dests if d is not None)  # None: internal (none here)
    for state in set(STATES) - TERMINAL:
        seen, todo = {state}, [state]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        assert "done" in seen, state


# -- the machine driven in-process, without Consul ----------------------------------------------
def test_version_walks_parse_then_report() -> None:
    inv = Invocation(b'{"cniVersion": "0.4.0"}', {"CNI_COMMAND": "VERSION"}, store_factory=no_store)
    assert inv.run() == 0
    assert inv.state == "done"
    assert inv.output is not None and inv.output["cniVersion"] == "0.4.0"
    assert inv.record.steps == [Step("start", "parsed", "parse"), Step("parsed", "done", "report")]


def test_bad_input_fires_fail_from_start() -> None:
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_IFNAME": "eth0"}
    inv = Invocation(b"{not json", env, store_factory=no_store)
    assert inv.run() == 6
    assert inv.state == "failed"
    assert inv.record.steps == [Step("start", "failed", "fail")]
    assert inv.output is not None and inv.output["code"] == 6


def test_every_cni_command_has_its_module_of_handlers() -> None:
    from ipam_da_consul.cni.commands import KINDS
    from ipam_da_consul.cni.env import COMMANDS

    assert sorted(KINDS) == sorted(COMMANDS)
    assert all(kind.name == name for name, kind in KINDS.items())



# -- every edge of the table is one some call takes ----------------------------------------------
def table_edges() -> set[tuple[str, str]]:
    """(source, trigger) of each row but `fail`, which every state has (tested above)."""
    rows = [(str(row[0]), table_sources(row)) for row in TRANSITIONS if row[0] != "fail"]
    return {(src, trigger) for trigger, sources in rows for src in sources}


@pytest.fixture
def taken(monkeypatch: pytest.MonkeyPatch) -> set[tuple[str, str]]:
    """The (source, trigger) of every transition the calls of a test take."""
    seen: set[tuple[str, str]] = set()

    class Recording(Machine):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.after_state_change.append(
                lambda event: seen.add((event.transition.source, event.event.name))
            )

    monkeypatch.setattr(machine, "Machine", Recording)
    return seen


class FailingRead:
    """Consul unreachable when a key under `prefix` is read: that pool cannot be loaded."""

    def __init__(self, kv: Any, prefix: str) -> None:
        self.kv, self.prefix = kv, prefix

    def __getattr__(self, name: str) -> Any:
        return getattr(self.kv, name)

    def get(self, key: str, consistent: bool = False) -> Any:
        return self.kv.get(self.readable(key), consistent)

    def list(self, prefix: str, consistent: bool = False) -> Any:
        return self.kv.list(self.readable(prefix), consistent)

    def readable(self, key: str) -> str:
        if key.startswith(self.prefix):
            raise ConsulUnavailable("no Consul server answered")
        return key


def taken_over(tmp_path: Path, name: str, wrap: Any, select_fails: bool = False) -> Run:
    """A DEL of a container holding an address in pool p (of pools p and q), with the helper
    and its state folder, while `wrap` makes Consul fail: it is taken over (`defer`)."""
    m = Mem(StateDir(str(tmp_path / name)))
    m.pool("p")
    m.pool("q", [{"subnet": "10.1.0.0/24"}])
    assert m.call("ADD").code == 0
    m.wrap = wrap
    if select_fails:
        opened = m.factory

        def no_leader() -> str:
            raise ConsulUnavailable("no Consul server answered with a leader")

        def factory(*args: Any) -> MemStore:
            store = opened(*args)
            store.select = no_leader  # type: ignore[method-assign]
            return store

        setattr(m, "factory", factory)  # noqa: B010 (an attribute mypy takes for the method)
    run = m.call("DEL", netconf([{"name": "p"}, {"name": "q"}]), caches=Caches())
    assert (run.code, run.walk[-1]) == (0, "done"), run.lines
    return run


def test_every_edge_of_the_table_is_taken_by_some_call(
    taken: set[tuple[str, str]], tmp_path: Path
) -> None:
    m = Mem()
    m.pool("p")
    m.pool("q", [{"subnet": "10.1.0.0/24"}])
    two = netconf([{"name": "p"}, {"name": "q"}])
    assert m.call("VERSION", stdin=b'{"cniVersion": "1.1.0"}').code == 0
    assert m.call("ADD", two).code == 0
    prev = {"cniVersion": "1.1.0", "ips": [{"address": "10.0.0.10/24"}]}
    assert m.call("CHECK", netconf() | {"prevResult": prev}).code == 0
    assert m.call("STATUS").code == 0
    assert m.call("STATUS", netconf(pools=[])).code == 0
    valid = {"cni.dev/valid-attachments": [{"containerID": "c1", "ifname": "eth0"}]}
    assert m.call("GC", two | valid).code == 0
    assert m.call("DEL", two).code == 0

    def thief(key: str) -> None:  # writes the address between a call's read and its write
        if key == "ipam/p/10.0.0.10" and m.kv.get(key) is None:
            m.kv.before_write = None
            m.kv.put(key, b'{"target": "thief"}')

    m.kv.before_write = thief
    assert m.call("ADD", container="c2").walk.count("ip_picked") == 2

    wide = Mem()
    wide.pool("w", [{"subnet": "10.8.0.0/16"}])
    home = Stripes(load_ranges(b'[{"subnet": "10.8.0.0/16"}]')).walk(HOST, "w")[0]
    for i in range(256):
        wide.put(f"ipam/w/{home.prefix}{i}", {"target": "filler"})
    assert wide.call("ADD", netconf([{"name": "w"}], pick="stripe")).code == 0

    # A DEL without Consul, taken over by the helper, from each state Consul can fail in.
    def no_fence(kv: Any) -> Any:
        return Faulty(kv, "txn", ConsulUnavailable("no Consul server answered"))

    def no_release(kv: Any) -> Any:
        return Faulty(kv, "delete", ConsulUnavailable("no Consul server answered"))

    taken_over(tmp_path, "parsed", lambda kv: kv, select_fails=True)
    taken_over(tmp_path, "connected", no_fence)
    taken_over(tmp_path, "fenced", lambda kv: FailingRead(kv, "ipam/p/"))
    taken_over(tmp_path, "pool_loaded", no_release)
    taken_over(tmp_path, "pool_done", lambda kv: FailingRead(kv, "ipam/q/"))

    assert taken - {(s, "fail") for s in STATES} == table_edges()
