"""A call's time budget (cni/commands/base.py call_budget) and the calls run within another's:
an owed DEL finished before an ADD's answer (nested) or after it (cni/main.py finish_others,
through cni/replay.py) ends by the outer call's end, whatever its own `timeout` says."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from ipam_da_consul.cni import replay
from ipam_da_consul.cni.commands.base import EXIT_MARGIN, ROLLBACK_RESERVE, call_budget
from ipam_da_consul.cni.state import StateDir

from tests.support.machine import Mem, netconf

DEL_ENV = {
    "CNI_COMMAND": "DEL",
    "CNI_CONTAINERID": "c1",
    "CNI_IFNAME": "eth0",
    "CNI_NETNS": "/var/run/netns/x",
    "CNI_PATH": "/opt/cni/bin",
}


def test_a_call_on_its_own_ends_by_its_timeout_less_the_exit_margin() -> None:
    end, seconds = call_budget(100.0, 10.0, None, now=100.5)
    assert end == pytest.approx(110.0 - EXIT_MARGIN)
    assert seconds == pytest.approx(end - min(ROLLBACK_RESERVE, 10.0 / 4) - 100.5)


def test_a_call_within_another_ends_by_the_others_end_and_its_work_gets_part_of_it() -> None:
    """A replay started at 100 s with 10 s of its own, inside a call that must be over by
    101 s: over by 101 s, and its work still gets three quarters of the second."""
    end, seconds = call_budget(100.0, 10.0, 101.0, now=100.0)
    assert end == 101.0
    assert 0.5 < seconds < 1.0


def test_a_call_whose_bound_has_passed_gets_no_time() -> None:
    assert call_budget(100.0, 10.0, 99.0, now=100.0) == (99.0, 0.0)


def test_a_bound_later_than_the_timeout_changes_nothing() -> None:
    assert call_budget(100.0, 2.0, 500.0, now=100.0) == call_budget(100.0, 2.0, None, now=100.0)


def owe_del(state: StateDir, timeout: float) -> None:
    with state.entry(("net", "c1", "eth0"), time.monotonic() + 1) as entry:
        entry.journal_del(json.dumps(netconf(timeout=timeout)).encode(), DEL_ENV)


def test_a_replay_ends_by_the_bound_it_is_given_not_by_its_own_timeout(tmp_path: Path) -> None:
    """cni/main.py finish_others hands replays what is left of the call's time: the owed DEL's
    own 60 s are not its to take (they were: the process outlived its call's timeout)."""
    state = StateDir(str(tmp_path / "state"))
    m = Mem(state)
    m.pool()
    owe_del(state, timeout=60)
    until = time.monotonic() + 1.0
    assert replay.some(state, m.factory, None, limit=4, until=until) == 1
    [store] = m.stores
    assert store.deadline.end <= until
    assert state.pending() == []


def test_a_replay_without_a_bound_keeps_its_own_timeout(tmp_path: Path) -> None:
    """The helper's replay thread and the operator's `journal retry` run no call: the entry's
    own settings decide."""
    state = StateDir(str(tmp_path / "state"))
    m = Mem(state)
    m.pool()
    owe_del(state, timeout=60)
    began = time.monotonic()
    with state.entry(("net", "c1", "eth0"), began + 1) as entry:
        assert replay.finish(entry, state, m.factory) == 0
    [store] = m.stores
    assert store.deadline.end > began + 30


def test_an_owed_del_finished_before_an_add_ends_by_the_adds_end(tmp_path: Path) -> None:
    """The ADD's answer waits for the DEL its entry owes: that DEL gets what is left of the
    ADD's time, not the 60 s of its own settings."""
    state = StateDir(str(tmp_path / "state"))
    m = Mem(state)
    m.pool()
    owe_del(state, timeout=60)
    run = m.call("ADD", netconf(timeout=2))
    assert run.code == 0, run.lines
    add, nested = m.stores
    assert run.inv.call_end is not None
    assert nested.deadline.end <= run.inv.call_end
    assert add.deadline.end <= run.inv.call_end
