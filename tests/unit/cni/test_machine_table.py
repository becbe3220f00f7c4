"""Unit tests of the transition table in cni/machine.py: the documented edges, `fail` from every
state, no auto transitions, and one transition logged per step."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from ipam_da_consul.cni.machine import STATES, TRANSITIONS, Invocation
from loguru import logger

# The edges issue 2 documents, and the fence DEL raises first: trigger -> (sources, dest).
DOCUMENTED = {
    "parse": ({"start"}, "parsed"),
    "report": ({"parsed"}, "done"),
    "connect": ({"parsed"}, "connected"),
    "fence": ({"connected"}, "fenced"),
    "next_pool": ({"connected", "fenced", "pool_done"}, "pool_loaded"),
    "pick_ip": ({"pool_loaded"}, "ip_picked"),
    "write": ({"ip_picked"}, "pool_done"),
    "conflict": ({"ip_picked"}, "pool_loaded"),
    "release": ({"pool_loaded"}, "pool_done"),
    "verify": ({"pool_loaded"}, "pool_done"),
    "emit": ({"connected", "pool_done"}, "done"),
}
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


@pytest.mark.parametrize("trigger", sorted(DOCUMENTED))
def test_documented_edge(trigger: str) -> None:
    sources, dest = DOCUMENTED[trigger]
    rows = [t for t in TRANSITIONS if t[0] == trigger]
    assert len(rows) == 1, f"{trigger} should be one row of the table"
    assert table_sources(rows[0]) == sources
    assert rows[0][2] == dest
    assert edges()[trigger] == {s: [dest] for s in sources}


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


def test_every_working_state_has_a_handler_and_a_way_out() -> None:
    inv = Invocation(b"", {}, store_factory=no_store)
    for state in set(STATES) - TERMINAL:
        assert callable(getattr(inv, f"at_{state}", None)), state
        assert any(state in srcs for t, srcs in edges().items() if t != "fail"), state


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
@pytest.fixture
def debug_log() -> Iterator[list[str]]:
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m).rstrip("\n")), level="DEBUG",
                      format="{message}")
    yield lines
    logger.remove(sink)


def test_version_walks_parse_then_report(debug_log: list[str]) -> None:
    inv = Invocation(b'{"cniVersion": "0.4.0"}', {"CNI_COMMAND": "VERSION"}, store_factory=no_store)
    assert inv.run() == 0
    assert inv.state == "done"
    assert inv.output is not None and inv.output["cniVersion"] == "0.4.0"
    states = [line for line in debug_log if line.startswith("state ")]
    assert states == ["state start -> parsed (parse)", "state parsed -> done (report)"]


def test_bad_input_fires_fail_from_start(debug_log: list[str]) -> None:
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_IFNAME": "eth0"}
    inv = Invocation(b"{not json", env, store_factory=no_store)
    assert inv.run() == 6
    assert inv.state == "failed"
    assert [line for line in debug_log if line.startswith("state ")] == [
        "state start -> failed (fail)"]
    assert inv.output is not None and inv.output["code"] == 6


def test_every_cni_command_has_its_module_of_handlers() -> None:
    from ipam_da_consul.cni.commands import KINDS
    from ipam_da_consul.cni.env import COMMANDS

    assert sorted(KINDS) == sorted(COMMANDS)
    assert all(kind.name == name for name, kind in KINDS.items())


def test_the_machine_imports_nothing_of_the_helper() -> None:
    import subprocess
    import sys

    code = ("import sys, ipam_da_consul.cni.machine; "
            "print(sorted(m for m in sys.modules if m.startswith('ipam_da_consul.cni.helper')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
