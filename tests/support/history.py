"""The partition test's history of plugin calls and its checker over that history and the KV
tree read back after the quiet period (tests/e2e/test_partition.py). Pure: the unit tier tests
the checker on synthetic histories."""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

CALL_TIMEOUT = 10.0  # ipam.timeout
# `timeout` caps a call from its process's start to its exit (cni/main.py process_started); on
# top of it only what the plugin cannot count: the fork and exec before its clock starts, and
# this harness noticing the exit. IPAM_PARTITION_OVERHEAD changes it.
OVERHEAD = float(os.environ.get("IPAM_PARTITION_OVERHEAD", "0.5"))
HANG = CALL_TIMEOUT + 30  # a call still running then is killed and reported as hung


# -- history ------------------------------------------------------------------------------------


@dataclass
class Op:
    worker: str
    host: str
    kind: str  # add | check | del | cleanup (DEL after a failed ADD)
    command: str
    container: str
    start: float
    end: float
    rc: int
    stdout: str = ""
    stderr: str = ""
    timeout: float = CALL_TIMEOUT
    cpu: float = 0.0  # CPU seconds of the plugin process itself
    runq: float = 0.0  # seconds it was runnable but waited for a CPU (a busy machine)
    fed: float = 0.0  # seconds from its start until this harness had written its stdin
    log: str = ""  # the verbose log of this call (IPAM_PARTITION_VERBOSE=1)
    # A take-over: this ADD's Pool asks for the address of `takes_from`, a container whose DEL
    # started at the same moment (the Nomad reschedule pattern).
    takes_from: str = ""
    # Made to fail: its network lists a missing pool after the one it takes an address in
    # (114 after the take-over, then a rollback). Not counted as failed for availability.
    doomed: bool = False

    @property
    def span(self) -> float | None:
        """First to last line of the verbose log, if there is one. Its stamps are the host's
        wall clock: a step of that clock within the call leaves no usable span."""
        try:
            stamps = [datetime.fromisoformat(line.split(" ", 1)[0])
                      for line in Path(self.log).read_text().splitlines() if line[:4].isdigit()]
        except (OSError, ValueError):
            return None
        if not stamps:
            return None
        span = (stamps[-1] - stamps[0]).total_seconds()
        return span if 0 <= span <= self.elapsed + 1 else None

    @property
    def took_over(self) -> list[tuple[str, str]]:
        """(address, container) this ADD says it re-allocated from (its warning)."""
        return [(str(ipaddress.ip_address(ip)), c) for ip, c in _TOOK_OVER.findall(self.stderr)]

    @property
    def elapsed(self) -> float:
        return self.end - self.start

    @property
    def ok(self) -> bool:
        return self.rc == 0

    @property
    def address(self) -> str | None:
        if self.command != "ADD" or self.rc != 0:
            return None
        try:
            ips = json.loads(self.stdout)["ips"]
            return str(ipaddress.ip_interface(ips[0]["address"]).ip)
        except (ValueError, KeyError, IndexError, TypeError):
            return None

    def brief(self, t0: float = 0.0) -> str:
        msg = ""
        if self.rc not in (0, -9):
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                msg = " " + str(json.loads(self.stdout).get("msg", ""))[:90]
        took = f" (taking over from {self.takes_from})" if self.takes_from else ""
        span = self.span if self.log else None
        return (f"{self.command} {self.container}{took} "
                f"[{self.start - t0:.2f}s..{self.end - t0:.2f}s, "
                f"{self.elapsed:.2f}s, cpu {self.cpu:.2f}s, waiting for a CPU {self.runq:.2f}s"
                f"{f', stdin written after {self.fed:.2f}s' if self.fed >= 0.1 else ''}"
                f"{f', in-plugin {span:.2f}s' if span is not None else ''}] rc={self.rc}"
                f"{' ' + self.address if self.address else ''}{msg}")


# cni/commands/add.py's warning on a take-over: "re-allocated requested IP <ip> in pool <name>
# from container <repr> to <repr>".
_TOOK_OVER = re.compile(
    r"re-allocated requested IP (\S+) in pool .*? from container '([^']*)' to ")


@dataclass
class Phase:
    name: str
    target: str
    start: float
    healed: float
    end: float
    leader_during: str = "-"  # the leader the other servers saw just before the heal


# -- the checker (pure: unit-tested in tests/unit/support/test_history.py) ------------------


def parse_tree(tree: dict[str, bytes], folder: str) -> dict[str, dict[str, Any]]:
    """ip -> allocation object for the keys of one pool folder."""
    out: dict[str, dict[str, Any]] = {}
    for key, raw in tree.items():
        if not key.startswith(folder) or key == folder:
            continue
        try:
            out[key[len(folder):]] = json.loads(raw)
        except ValueError:
            out[key[len(folder):]] = {"target": f"<unparsable {raw[:40]!r}>"}
    return out


def duplicate_targets(allocs: dict[str, dict[str, Any]]) -> list[str]:
    seen: dict[tuple[str, str], list[str]] = {}
    for ip, a in allocs.items():
        seen.setdefault((str(a.get("target")), str(a.get("ifname", "eth0"))), []).append(ip)
    return [f"{t}/{i} holds {sorted(ips)}" for (t, i), ips in seen.items() if len(ips) > 1]


@dataclass
class Hold:
    """An attachment holding an address, as its runtime sees it: from its ADD's return until
    its first DEL that returned 0. A DEL that failed ends nothing: the runtime was told the
    address is still held, keeps using it and retries. The DEL that succeeded released the
    address at some moment between its start and its return (its release is committed before
    the process exits, and another ADD may be served the address and return first), so the
    latest moment known to be inside the hold is that DEL's start: `until`.

    A take-over ends a hold too: a successful ADD whose Pool's own requested IP re-allocated
    the address from this holder (as it says: see Op.took_over) took it from the moment that
    ADD started, as the operator asked."""

    ip: str
    since: float
    until: float
    add: Op

    def overlaps(self, other: Hold) -> bool:
        # An empty hold (taken over before its ADD even returned) overlaps nothing.
        return max(self.since, other.since) < min(self.until, other.until)


def holds(ops: list[Op]) -> dict[str, list[Hold]]:
    """ip -> the holds of that address, by the strict DEL rule (see Hold)."""
    by_container: dict[str, list[Op]] = {}
    takers: dict[tuple[str, str], list[Op]] = {}  # (ip, holder) -> ADDs that took it over
    for op in sorted(ops, key=lambda o: o.start):
        by_container.setdefault(op.container, []).append(op)
        if op.command == "ADD" and op.ok:
            for ip, holder in op.took_over:
                takers.setdefault((ip, holder), []).append(op)
    out: dict[str, list[Hold]] = {}
    for container, cops in by_container.items():
        add = next((o for o in cops if o.command == "ADD" and o.ok and o.address), None)
        if add is None or add.address is None:
            continue
        done = next((o for o in cops if o.command == "DEL" and o.ok and o.start >= add.start),
                    None)
        until = done.start if done else float("inf")
        for taker in takers.get((add.address, container), []):
            if taker.end > add.start:  # could have run after this holder's write
                until = min(until, max(taker.start, add.end))
        out.setdefault(add.address, []).append(Hold(add.address, add.end, until, add))
    for spans in out.values():
        spans.sort(key=lambda h: h.since)
    return out


def taken_over(a: Op, b: Op) -> bool:
    """One of the two ADDs was made to take over the other's address: a Pool's own requested
    IP naming the address of a container whose DEL started at the same moment (the seed's
    re-allocation). The taker holding it before that DEL returned 0 is what was asked for,
    however it came by the address."""
    return a.takes_from == b.container or b.takes_from == a.container


def check_history(ops: list[Op], final_tree: dict[str, bytes], folder: str,
                  snapshots: Sequence[tuple[float, dict[str, bytes]]] = (),
                  t0: float = 0.0) -> list[str]:
    """Anomalies (human-readable) in a history and the KV tree read after the quiet period."""
    anomalies: list[str] = []
    by_container: dict[str, list[Op]] = {}
    for op in sorted(ops, key=lambda o: o.start):
        by_container.setdefault(op.container, []).append(op)

    # 1. No address handed out while the runtime's DEL of its previous holder has not yet
    # succeeded (Hold): a DEL that failed never released it as far as the runtime knows. A
    # take-over excepted.
    for ip, spans in holds(ops).items():
        for i, a in enumerate(spans):
            for b in spans[i + 1:]:
                if a.overlaps(b) and not taken_over(a.add, b.add):
                    anomalies.append(f"DUPLICATE {ip}: {a.add.brief(t0)} and {b.add.brief(t0)} "
                                     "both hold it")
    final = parse_tree(final_tree, folder)
    for dup in duplicate_targets(final):
        anomalies.append(f"DUPLICATE TARGET in the final tree: {dup}")
    reported: set[str] = set()
    for at, tree in snapshots:
        for dup in duplicate_targets(parse_tree(tree, folder)):
            if dup not in reported:
                reported.add(dup)
                anomalies.append(f"DUPLICATE TARGET at {at - t0:.2f}s: {dup}")

    # 2-5. Keys left in the final tree.
    keys_by_target: dict[str, list[str]] = {}
    for ip, value in final.items():
        keys_by_target.setdefault(str(value.get("target")), []).append(ip)
    for target, ips in sorted(keys_by_target.items()):
        cops = by_container.get(target, [])
        add = next((o for o in cops if o.command == "ADD"), None)
        dels = [o for o in cops if o.command == "DEL"]
        last_ok_del = next((o for o in reversed(dels) if o.ok), None)
        log = f" log {add.log}" if add is not None and add.log else ""
        if add is None:
            anomalies.append(f"UNKNOWN KEY {ips} for {target}: no ADD in the history")
        elif not add.ok and last_ok_del is not None:
            anomalies.append(
                f"LEAK after failed ADD: key {ips} for {target}; {add.brief(t0)}; cleanup "
                f"{last_ok_del.brief(t0)} returned 0 (the failed ADD's write landed after it or "
                f"was never seen by it){log}")
        elif add.ok and last_ok_del is not None:
            anomalies.append(
                f"LEAK after DEL: key {ips} for {target}; {add.brief(t0)}; "
                f"{last_ok_del.brief(t0)} returned 0{log}")
        elif not add.ok and not dels:
            anomalies.append(
                f"NOT VOIDED: key {ips} for {target}, whose ADD failed and whose runtime never "
                f"ran DEL (as dockershim, CRI-O after a reboot): the helper or the host's next "
                f"call must void it; {add.brief(t0)}{log}")
        else:
            anomalies.append(f"NOT EMPTY: key {ips} for {target} whose DEL never succeeded; "
                             f"{add.brief(t0)}; DELs: {[d.brief(t0) for d in dels]}")
    for op in ops:
        if op.rc == -9:
            anomalies.append(f"HUNG: {op.brief(t0)} killed after {op.elapsed:.0f}s")
    return anomalies


def take_overs(ops: list[Op]) -> dict[str, int]:
    """What the take-overs came to: the taker's ADD succeeded or failed, and whom it took the
    address from (the stopped container, another one, nobody: the DEL had released it)."""
    out: dict[str, int] = {}
    for o in ops:
        if o.command != "ADD" or not o.takes_from:
            continue
        took = [c for _, c in o.took_over]
        whom = ("stopped one" if o.takes_from in took else
                "another" if took else "none (released first)")
        key = f"rc {o.rc}, took from {whom}"
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))


def overruns(ops: list[Op], overhead: float = OVERHEAD) -> list[Op]:
    return sorted((o for o in ops if o.elapsed > o.timeout + overhead),
                  key=lambda o: -o.elapsed)


def availability(ops: list[Op], phases: list[Phase]) -> list[dict[str, Any]]:
    rows = []
    for ph in phases:
        window = [o for o in ops if ph.start <= o.start < ph.end]
        oks = sorted(o.end for o in window if o.ok and ph.start <= o.end <= ph.end)
        marks = [ph.start, *oks, ph.end]
        gap = max(b - a for a, b in itertools.pairwise(marks))
        rows.append({
            "fault": ph.name, "target": ph.target, "calls": len(window),
            "failed": sum(1 for o in window if not o.ok and not (o.doomed and o.rc == 114)),
            "longest_call": max((o.elapsed for o in window), default=0.0),
            "longest_gap": gap, "seconds": ph.end - ph.start, "during": ph.leader_during,
        })
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'fault':<13}{'leader':>7}{'then':>6}{'window s':>10}{'calls':>7}{'failed':>8}"
             f"{'longest call s':>16}{'longest gap s':>15}"]
    for r in rows:
        lines.append(f"{r['fault']:<13}{r['target']:>7}{r.get('during', '-'):>6}"
                     f"{r['seconds']:>10.1f}{r['calls']:>7}{r['failed']:>8}"
                     f"{r['longest_call']:>16.2f}{r['longest_gap']:>15.2f}")
    return "\n".join(lines)
