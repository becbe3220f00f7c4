"""The partition test's checker can fail: synthetic histories with each anomaly it reports."""

from __future__ import annotations

import json

import pytest

from tests.support.history import (
    CALL_TIMEOUT,
    HANG,
    Op,
    Phase,
    availability,
    check_history,
    overruns,
)

# -- the checker can fail -----------------------------------------------------------------------


def _op(kind: str, command: str, container: str, start: float, end: float, rc: int = 0,
        ip: str | None = None) -> Op:
    out = json.dumps({"ips": [{"address": f"{ip}/24"}]}) if ip else ""
    if rc:
        out = json.dumps({"code": rc, "msg": "boom"})
    return Op("w", "host0", kind, command, container, start, end, rc, out)


def _tree(folder: str, **keys: str) -> dict[str, bytes]:
    return {folder: b"", **{folder + ip: json.dumps({"target": t, "ifname": "eth0"}).encode()
                            for ip, t in keys.items()}}


F = "ipam/p/"


def test_checker_clean_history_passes() -> None:
    ops = [_op("add", "ADD", "a", 0, 1, ip="10.0.0.1"), _op("del", "DEL", "a", 2, 3),
           # b gets a's address while a's DEL runs: not a duplicate (the DEL may have released)
           _op("add", "ADD", "b", 2.5, 3.5, ip="10.0.0.1"), _op("del", "DEL", "b", 4, 5),
           _op("add", "ADD", "c", 4, 5, rc=11), _op("cleanup", "DEL", "c", 5, 6)]
    assert check_history(ops, _tree(F), F) == []
    assert overruns(ops) == []


def test_checker_catches_duplicate_address() -> None:
    ops = [_op("add", "ADD", "a", 0, 1, ip="10.0.0.1"),
           _op("add", "ADD", "b", 2, 3, ip="10.0.0.1"),
           _op("del", "DEL", "a", 4, 5), _op("del", "DEL", "b", 4, 5)]
    found = check_history(ops, _tree(F), F)
    assert len(found) == 1 and found[0].startswith("DUPLICATE 10.0.0.1"), found


def test_checker_catches_duplicate_target() -> None:
    ops = [_op("add", "ADD", "a", 0, 1, ip="10.0.0.1")]
    tree = _tree(F, **{"10.0.0.1": "a", "10.0.0.2": "a"})
    found = check_history(ops, tree, F, snapshots=[(0.5, tree)])
    assert any(f.startswith("DUPLICATE TARGET in the final") for f in found), found
    assert any(f.startswith("DUPLICATE TARGET at 0.50s") for f in found), found


def test_checker_catches_leak_after_failed_add() -> None:
    # The failed ADD's write lands after its cleanup DEL returned 0: the key leaks.
    ops = [_op("add", "ADD", "c", 0, 10, rc=125), _op("cleanup", "DEL", "c", 10, 11)]
    found = check_history(ops, _tree(F, **{"10.0.0.3": "c"}), F)
    assert len(found) == 1 and found[0].startswith("LEAK after failed ADD"), found


def test_checker_catches_leak_after_del_and_leftovers() -> None:
    ops = [_op("add", "ADD", "a", 0, 1, ip="10.0.0.1"), _op("del", "DEL", "a", 2, 3),
           _op("add", "ADD", "b", 0, 1, ip="10.0.0.2"), _op("del", "DEL", "b", 2, 3, rc=11)]
    tree = _tree(F, **{"10.0.0.1": "a", "10.0.0.2": "b", "10.0.0.9": "stranger"})
    found = check_history(ops, tree, F)
    assert sorted(f.split(":")[0] for f in found) == ["LEAK after DEL", "NOT EMPTY",
                                                      "UNKNOWN KEY ['10.0.0.9'] for stranger"]


def test_checker_catches_overrun_and_hang() -> None:
    ops = [_op("add", "ADD", "a", 0, CALL_TIMEOUT + 4.2, rc=125),
           _op("add", "ADD", "b", 0, CALL_TIMEOUT + 0.5, ip="10.0.0.1"),
           _op("add", "ADD", "c", 0, HANG, rc=-9)]
    assert [o.container for o in overruns(ops)] == ["c", "a"]
    assert any(f.startswith("HUNG") for f in check_history(ops, _tree(F, **{"10.0.0.1": "b"}),
                                                            F))


def test_availability_gap() -> None:
    ops = [_op("add", "ADD", "a", 0, 1, ip="10.0.0.1"), _op("add", "ADD", "b", 1, 9, rc=11),
           _op("add", "ADD", "c", 8, 9.5, ip="10.0.0.2")]
    (row,) = availability(ops, [Phase("isolate", "s1", 0, 5, 12)])
    assert (row["calls"], row["failed"]) == (3, 1)
    assert row["longest_call"] == 8 and row["longest_gap"] == pytest.approx(8.5)
