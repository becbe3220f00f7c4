"""The partition test's history of plugin calls and its checker over that history and the KV
tree read back after the quiet period (tests/e2e/test_partition.py). Pure: the unit tier tests
the checker on synthetic histories."""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

CALL_TIMEOUT = 10.0  # ipam.timeout
# A process's start and exit on top of `timeout`. A machine loaded by other work stretches
# interpreter start-up (seen: 2-4.5 s at load 15-50 on 2 cores); the "in-plugin" span of the
# verbose log tells the two apart. IPAM_PARTITION_OVERHEAD changes it.
OVERHEAD = float(os.environ.get("IPAM_PARTITION_OVERHEAD", "1.0"))
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
    log: str = ""  # the verbose log of this call (IPAM_PARTITION_VERBOSE=1)

    @property
    def span(self) -> float | None:
        """First to last line of the verbose log, if there is one."""
        try:
            stamps = [datetime.fromisoformat(line.split(" ", 1)[0])
                      for line in Path(self.log).read_text().splitlines() if line[:4].isdigit()]
        except (OSError, ValueError):
            return None
        return (stamps[-1] - stamps[0]).total_seconds() if stamps else None

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
        return (f"{self.command} {self.container} [{self.start - t0:.2f}s..{self.end - t0:.2f}s, "
                f"{self.elapsed:.2f}s, cpu {self.cpu:.2f}s"
                f"{f', in-plugin {self.span:.2f}s' if self.log and self.span else ''}] rc={self.rc}"
                f"{' ' + self.address if self.address else ''}{msg}")


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


def check_history(ops: list[Op], final_tree: dict[str, bytes], folder: str,
                  snapshots: Sequence[tuple[float, dict[str, bytes]]] = (),
                  t0: float = 0.0) -> list[str]:
    """Anomalies (human-readable) in a history and the KV tree read after the quiet period."""
    anomalies: list[str] = []
    by_container: dict[str, list[Op]] = {}
    for op in sorted(ops, key=lambda o: o.start):
        by_container.setdefault(op.container, []).append(op)

    # 1. Two attachments certainly holding one address at once. An attachment certainly holds
    # its address from its ADD's return until its first DEL starts (any DEL attempt may have
    # released it, even one that then failed); without a DEL, until the end.
    held: dict[str, list[tuple[float, float, Op]]] = {}
    for cops in by_container.values():
        add = next((o for o in cops if o.command == "ADD" and o.ok and o.address), None)
        if add is None:
            continue
        first_del = next((o for o in cops if o.command == "DEL" and o.start >= add.start), None)
        until = first_del.start if first_del else float("inf")
        held.setdefault(add.address or "", []).append((add.end, until, add))
    for ip, spans in held.items():
        spans.sort(key=lambda s: s[0])
        for i, (a_from, a_until, a) in enumerate(spans):
            for b_from, b_until, b in spans[i + 1:]:
                if b_from < a_until and a_from < b_until:
                    anomalies.append(f"DUPLICATE {ip}: {a.brief(t0)} and {b.brief(t0)} both "
                                     "hold it")
    final = parse_tree(final_tree, folder)
    for dup in duplicate_targets(final):
        anomalies.append(f"DUPLICATE TARGET in the final tree: {dup}")
    reported: set[str] = set()
    for at, tree in snapshots:
        for dup in duplicate_targets(parse_tree(tree, folder)):
            if dup not in reported:
                reported.add(dup)
                anomalies.append(f"DUPLICATE TARGET at {at - t0:.2f}s: {dup}")

    # 2-4. Keys left in the final tree.
    keys_by_target: dict[str, list[str]] = {}
    for ip, value in final.items():
        keys_by_target.setdefault(str(value.get("target")), []).append(ip)
    for target, ips in sorted(keys_by_target.items()):
        cops = by_container.get(target, [])
        add = next((o for o in cops if o.command == "ADD"), None)
        dels = [o for o in cops if o.command == "DEL"]
        last_ok_del = next((o for o in reversed(dels) if o.ok), None)
        if add is None:
            anomalies.append(f"UNKNOWN KEY {ips} for {target}: no ADD in the history")
        elif not add.ok and last_ok_del is not None:
            anomalies.append(
                f"LEAK after failed ADD: key {ips} for {target}; {add.brief(t0)}; cleanup "
                f"{last_ok_del.brief(t0)} returned 0 (the failed ADD's write landed after it or "
                f"was never seen by it){' log ' + add.log if add.log else ''}")
        elif add.ok and last_ok_del is not None:
            anomalies.append(
                f"LEAK after DEL: key {ips} for {target}; {add.brief(t0)}; "
                f"{last_ok_del.brief(t0)} returned 0{' log ' + add.log if add.log else ''}")
        else:
            anomalies.append(f"NOT EMPTY: key {ips} for {target} whose DEL never succeeded; "
                             f"{add.brief(t0)}; DELs: {[d.brief(t0) for d in dels]}")
    for op in ops:
        if op.rc == -9:
            anomalies.append(f"HUNG: {op.brief(t0)} killed after {op.elapsed:.0f}s")
    return anomalies


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
            "failed": sum(1 for o in window if not o.ok),
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
