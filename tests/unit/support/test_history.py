"""The partition test's checker can fail: synthetic histories with each anomaly it reports."""

from __future__ import annotations

import json

import pytest

from tests.support.history import (
    CALL_TIMEOUT,
    HANG,
    OVERHEAD,
    Op,
    Phase,
    availability,
    check_history,
    holds,
    overruns,
    take_overs,
)

# -- the checker can fail -----------------------------------------------------------------------


def _op(kind: str, command: str, container: str, start: float, end: float, rc: int = 0,
        ip: str | None = None, takes_from: str = "", took: str = "") -> Op:
    out = json.dumps({"ips": [{"address": f"{ip}/24"}]}) if ip else ""
    if rc:
        out = json.dumps({"code": rc, "msg": "boom"})
    # As cni/commands/add.py words it on the caller's stderr.
    err = (f"ipam-da-consul: WARNING: re-allocated requested IP {ip or '10.0.0.1'} in pool 'p' "
           f"from container {took!r} to {container!r}\n") if took else ""
    return Op("w", "host0", kind, command, container, start, end, rc, out, err,
              takes_from=takes_from)


def _tree(folder: str, **keys: str) -> dict[str, bytes]:
    return {folder: b"", **{folder + ip: json.dumps({"target": t, "ifname": "eth0"}).encode()
                            for ip, t in keys.items()}}


F = "ipam/p/"


def test_checker_clean_history_passes() -> None:
    ops = [_op("add", "ADD", "a", 0, 1, ip="10.0.0.1"), _op("del", "DEL", "a", 2, 3),
           # b's ADD ran beside a's DEL and returned after it: a's hold was over
           _op("add", "ADD", "b", 2.5, 3.5, ip="10.0.0.1"), _op("del", "DEL", "b", 4, 5),
           _op("add", "ADD", "c", 4, 5, rc=11), _op("cleanup", "DEL", "c", 5, 6),
           # d's cleanup DEL never ran, and nothing of it is left: its doubt was voided
           _op("add", "ADD", "d", 5, 6, rc=11)]
    assert check_history(ops, _tree(F), F) == []
    assert overruns(ops) == []


def test_a_hold_lasts_until_the_first_del_that_succeeded() -> None:
    ops = [_op("add", "ADD", "a", 0, 1, ip="10.0.0.1"), _op("del", "DEL", "a", 2, 3, rc=11),
           _op("del", "DEL", "a", 5, 6), _op("del", "DEL", "a", 7, 8)]
    ((hold,),) = holds(ops).values()
    assert (hold.since, hold.until) == (1, 5)


def test_strict_rule_an_address_handed_out_after_a_failed_del() -> None:
    # a's first DEL answered 11 (the runtime keeps the address and retries); b got the address
    # before the retry: a still held it. The old rule (a hold ends when the first DEL starts,
    # whatever it answers) let this pass.
    ops = [_op("add", "ADD", "a", 0, 1, ip="10.0.0.1"), _op("del", "DEL", "a", 2, 3, rc=11),
           _op("add", "ADD", "b", 4, 5, ip="10.0.0.1"), _op("del", "DEL", "a", 6, 7),
           _op("del", "DEL", "b", 8, 9)]
    found = check_history(ops, _tree(F), F)
    assert len(found) == 1 and found[0].startswith("DUPLICATE 10.0.0.1"), found
    # Served while the failing DEL ran: the same.
    during = [*ops[:2], _op("add", "ADD", "b", 2.2, 2.8, ip="10.0.0.1"), *ops[3:]]
    found = check_history(during, _tree(F), F)
    assert len(found) == 1 and found[0].startswith("DUPLICATE 10.0.0.1"), found
    # Once the retry that succeeded has started, it may have released the address.
    later = [*ops[:2], _op("del", "DEL", "a", 3.5, 4.5), _op("add", "ADD", "b", 4, 5,
                                                               ip="10.0.0.1"),
             _op("del", "DEL", "b", 8, 9)]
    assert check_history(later, _tree(F), F) == []


def test_an_address_served_while_the_successful_del_exits_is_no_duplicate() -> None:
    # a's DEL released the key, b was served it and returned, then a's DEL process exited:
    # the release happened within the DEL's call, which is all its return promises.
    ops = [_op("add", "ADD", "a", 0, 1, ip="10.0.0.1"), _op("del", "DEL", "a", 2, 4),
           _op("add", "ADD", "b", 2.5, 3.5, ip="10.0.0.1"), _op("del", "DEL", "b", 5, 6)]
    assert check_history(ops, _tree(F), F) == []
    # Served before that DEL started: a certainly held it still.
    early = [*ops[:2], _op("add", "ADD", "b", 1.2, 1.8, ip="10.0.0.1"), ops[3]]
    found = check_history(early, _tree(F), F)
    assert len(found) == 1 and found[0].startswith("DUPLICATE 10.0.0.1"), found


def test_a_take_over_of_the_stopped_container_is_not_a_duplicate() -> None:
    # y's Pool asks for x's address while x's DEL runs (started at the same moment; it fails,
    # and its retry succeeds later): the seed's re-allocation. Neither asked for nor said, the
    # same history is a duplicate.
    def history(takes_from: str, took: str = "x") -> list[Op]:
        return [_op("add", "ADD", "x", 0, 1, ip="10.0.0.1"),
                _op("del", "DEL", "x", 2, 4, rc=11), _op("del", "DEL", "x", 4.5, 5),
                _op("takeover", "ADD", "y", 2, 3, ip="10.0.0.1", takes_from=takes_from,
                    took=took),
                _op("del", "DEL", "y", 5, 6)]

    assert check_history(history("x"), _tree(F), F) == []
    assert check_history(history("x", took=""), _tree(F), F) == []
    found = check_history(history("", took=""), _tree(F), F)
    assert len(found) == 1 and found[0].startswith("DUPLICATE 10.0.0.1"), found
    assert take_overs(history("x")) == {"rc 0, took from stopped one": 1}


def test_a_take_over_ends_the_hold_of_the_container_it_took_from() -> None:
    ops = [_op("add", "ADD", "x", 0, 1, ip="10.0.0.1"), _op("del", "DEL", "x", 2, 2.5),
           # z got the address once x's DEL had released it; y then took it from z, as its
           # Pool asks (y says so): z's hold ends there.
           _op("add", "ADD", "z", 2.2, 2.7, ip="10.0.0.1"),
           _op("takeover", "ADD", "y", 2, 3, ip="10.0.0.1", takes_from="x", took="z"),
           _op("del", "DEL", "y", 5, 6),
           # y released it, and w got it before z's DEL: z no longer held it
           _op("add", "ADD", "w", 6.5, 7, ip="10.0.0.1"),
           _op("del", "DEL", "z", 8, 9), _op("del", "DEL", "w", 8, 9)]
    assert check_history(ops, _tree(F), F) == []
    # w got the address while y held it: y's take-over excuses nothing there.
    early = [*ops[:5], _op("add", "ADD", "w", 3.5, 4, ip="10.0.0.1"), *ops[6:]]
    found = check_history(early, _tree(F), F)
    assert len(found) == 1 and found[0].startswith("DUPLICATE 10.0.0.1") and " w " in found[0]
    # A taker that failed gave the address back (or z was gone): z's hold goes on.
    failed = [*ops[:3], _op("takeover", "ADD", "y", 2, 3, rc=114, takes_from="x", took="z"),
              *ops[5:]]
    found = check_history(failed, _tree(F), F)
    assert len(found) == 1 and found[0].startswith("DUPLICATE 10.0.0.1"), found
    # A claim of having taken it from z means nothing when z's ADD started after y's returned.
    # z then held it beside y, and beside w.
    after = [*ops[:2], _op("add", "ADD", "z", 3.2, 3.7, ip="10.0.0.1"), *ops[3:]]
    found = check_history(after, _tree(F), F)
    assert len(found) == 2 and all(f.startswith("DUPLICATE 10.0.0.1") and " z " in f
                                   for f in found), found


def test_a_holder_whose_address_was_taken_before_its_add_returned_holds_nothing() -> None:
    # z's write landed, y took the address over from z and returned, then z's ADD returned
    # (late, on a busy host): z was told of an address already re-allocated, as if the
    # take-over had come right after z's return.
    ops = [_op("add", "ADD", "x", 0, 1, ip="10.0.0.1"), _op("del", "DEL", "x", 2, 2.5),
           _op("takeover", "ADD", "y", 2, 3, ip="10.0.0.1", takes_from="x", took="z"),
           _op("add", "ADD", "z", 2.1, 3.4, ip="10.0.0.1"),
           _op("del", "DEL", "y", 5, 6), _op("del", "DEL", "z", 5, 6)]
    assert check_history(ops, _tree(F), F) == []
    (_x, y, z) = sorted(holds(ops)["10.0.0.1"], key=lambda h: h.add.container)
    assert (z.since, z.until) == (3.4, 3.4) and not z.overlaps(y)
    # Without y's word for it, z and y both held it.
    quiet = [*ops[:2], _op("takeover", "ADD", "y", 2, 3, ip="10.0.0.1", takes_from="x"),
             *ops[3:]]
    found = check_history(quiet, _tree(F), F)
    assert len(found) == 1 and found[0].startswith("DUPLICATE 10.0.0.1"), found


def test_a_take_over_rolled_back_must_not_resurrect_a_deleted_holder() -> None:
    # y took x's address, x's DEL returned 0, y failed on its next pool: its rollback must not
    # give the key back to x.
    ops = [_op("add", "ADD", "x", 0, 1, ip="10.0.0.1"), _op("del", "DEL", "x", 2, 3),
           _op("takeover", "ADD", "y", 2, 4, rc=114, takes_from="x", took="x")]
    assert check_history(ops, _tree(F), F) == []
    found = check_history(ops, _tree(F, **{"10.0.0.1": "x"}), F)
    assert len(found) == 1 and found[0].startswith("LEAK after DEL"), found


def test_checker_catches_a_failed_add_without_cleanup_never_voided() -> None:
    # The runtime skipped the cleanup DEL (dockershim, CRI-O after a reboot): its write in doubt
    # must still be voided by the helper or the host's next call.
    ops = [_op("add", "ADD", "c", 0, 10, rc=11)]
    found = check_history(ops, _tree(F, **{"10.0.0.3": "c"}), F)
    assert len(found) == 1 and found[0].startswith("NOT VOIDED"), found
    assert check_history(ops, _tree(F), F) == []


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
    assert OVERHEAD == 0.5  # the gate: timeout + 0.5 s from process start to exit
    ops = [_op("add", "ADD", "a", 0, CALL_TIMEOUT + 4.2, rc=125),
           _op("add", "ADD", "b", 0, CALL_TIMEOUT + 0.45, ip="10.0.0.1"),
           _op("add", "ADD", "d", 0, CALL_TIMEOUT + 0.6, rc=11),
           _op("add", "ADD", "c", 0, HANG, rc=-9)]
    assert [o.container for o in overruns(ops)] == ["c", "a", "d"]
    assert any(f.startswith("HUNG") for f in check_history(ops, _tree(F, **{"10.0.0.1": "b"}),
                                                            F))


def test_availability_gap() -> None:
    doomed = _op("takeover", "ADD", "d", 2, 3, rc=114, takes_from="a")
    doomed.doomed = True  # failed on the missing pool, as the workload made it
    ops = [_op("add", "ADD", "a", 0, 1, ip="10.0.0.1"), _op("add", "ADD", "b", 1, 9, rc=11),
           _op("add", "ADD", "c", 8, 9.5, ip="10.0.0.2"), doomed]
    (row,) = availability(ops, [Phase("isolate", "s1", 0, 5, 12)])
    assert (row["calls"], row["failed"]) == (4, 1)
    assert row["longest_call"] == 8 and row["longest_gap"] == pytest.approx(8.5)
