"""The benchmark's report: the machine it ran on, the JSON, the terminal table and its
Markdown copy."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.runner import PLUGIN, ROOT, interpreter_of, ratio
from bench.scenarios import MODES, PICKS, Bench
from tests.support.agent import consul_binary


# -- report --------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    consul = "unknown"
    with contextlib.suppress(Exception):
        out = subprocess.run(
            [consul_binary(), "version"], capture_output=True, text=True, timeout=10
        )
        consul = out.stdout.splitlines()[0].strip()
    commit = None
    with contextlib.suppress(Exception):
        env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # read-only: never touch the index
        commit = (
            subprocess.run(
                ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                timeout=10,
                env=env,
            ).stdout.strip()
            or None
        )
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            env=env,
        ).stdout.strip()
        if commit and dirty:
            commit += "+dirty"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "python_executable": interpreter_of(PLUGIN),
        "consul": consul,
        "commit": commit,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
    }


def build_report(b: Bench, started: float, load_at_start: float) -> dict[str, Any]:
    floor_s = b.series.get("floor")
    floor = floor_s.median if floor_s else None
    floor_cpu = statistics.median(floor_s.cpu) if floor_s and floor_s.cpu else None
    med = {k: s.median for k, s in b.series.items()}
    ratios: dict[str, float | None] = {}
    targets: dict[str, Any] = {}
    limit_60k = {"inproc": 2.0, "helper": 1.5}
    for mode in b.modes:

        def m(key: str, mode: str = mode) -> float | None:
            return med.get(f"{mode}:{key}")

        ratios |= {
            f"{mode}: ADD / floor": ratio(m("add"), floor),
            f"{mode}: ADD / bare interpreter": ratio(m("add"), med.get("bare")),
            f"{mode}: ADD@60k / ADD@0": ratio(m("add_60000"), m("add_0")),
            f"{mode}: ADD@10k / ADD@0": ratio(m("add_10000"), m("add_0")),
            f"{mode}: ADD@1k / ADD@0": ratio(m("add_1000"), m("add_0")),
            f"{mode}: ADD v6 /64 / ADD v4 /24": ratio(m("add_v6"), m("add")),
            f"{mode}: ADD / host-local ADD": ratio(m("add"), med.get("host_local")),
        }
        if mode == "inproc":
            # The process's own CPU time holds steady when the machine is busy. (Through the
            # helper, the work happens in the helper, so the client's CPU says little.)
            def c(key: str) -> float | None:
                s = b.series.get(key)
                return statistics.median(s.cpu) if s and s.cpu else None

            ratios |= {
                "inproc: ADD / floor, CPU time": ratio(c("inproc:add"), c("floor")),
                "inproc: ADD@60k / ADD@0, CPU time": ratio(
                    c("inproc:add_60000"), c("inproc:add_0")
                ),
                "inproc: ADD v6 / v4, CPU time": ratio(c("inproc:add_v6"), c("inproc:add")),
            }
        req = b.result.get("requests_uncontended", {}).get(f"ADD /24 ({MODES[mode]})", {})
        targets |= {
            f"{mode}: ADD <= 3x floor": _verdict(ratios[f"{mode}: ADD / floor"], 3.0),
            # Issue 10: in-process 60k <= 2x empty (it downloads the pool); helper <= 1.5x.
            f"{mode}: ADD@60k <= {limit_60k[mode]}x ADD@0": _verdict(
                ratios[f"{mode}: ADD@60k / ADD@0"], limit_60k[mode]
            ),
            f"{mode}: v6 no slower than v4 (5% noise allowance)": _verdict(
                ratios[f"{mode}: ADD v6 /64 / ADD v4 /24"], 1.05
            ),
            f"{mode}: Consul requests per uncontended ADD": req.get("requests_median"),
        }
    targets |= multihost_targets(b.result.get("multihost", {}).get("rows", []))
    mach = machine()
    mach["loadavg_1m_at_start"] = load_at_start
    return {
        "machine": mach,
        "settings": {
            "consul": b.args.consul,
            "runs": b.args.runs,
            "quick": b.args.quick,
            "duration_s": round(time.perf_counter() - started, 1),
        },
        "figures": {k: s.summary(floor, floor_cpu) for k, s in b.series.items()},
        "ratios": ratios,
        "targets": targets,
        **b.result,
        "notes": b.notes,
    }


def multihost_targets(rows: list[dict[str, Any]]) -> dict[str, str]:
    """Issue 10's multi-host targets, for each pick mode and each way of running."""
    out: dict[str, str] = {}

    def row(mode: str, pick: str, hosts: int) -> dict[str, Any] | None:
        return next(
            (r for r in rows if (r["mode"], r["pick"], r["hosts"]) == (mode, pick, hosts)), None
        )

    for mode in MODES:
        for pick in PICKS:
            counts = sorted({r["hosts"] for r in rows if r["mode"] == mode})
            one = row(mode, pick, 1)
            # The figure is 8 hosts; the most this run had is reported too.
            for hosts in sorted({h for h in counts if h == 8 or h == counts[-1]} - {1}):
                top = row(mode, pick, hosts)
                if top is None:
                    continue
                name = f"multi-host {mode} pick={pick}"
                out[f"{name}: Raft entries per ADD <= 1.3 with {hosts} hosts"] = _verdict(
                    top["raft_per_add"], 1.3
                )
                # Allocations/s at the 8 hosts only: the simulated hosts share this
                # machine's cores, and with 16 the helpers' own refreshes begin to compete.
                judged = 8 if 8 in counts else counts[-1]
                if (
                    hosts == judged
                    and one is not None
                    and one["allocations_per_s"]
                    and top["allocations_per_s"]
                ):
                    # Medians of repeated bursts; as for v6 against v4, 5% is noise.
                    fast = top["allocations_per_s"] >= 0.95 * one["allocations_per_s"]
                    out[
                        f"{name}: allocations/s with {hosts} hosts >= 1 host (5% noise allowance)"
                    ] = (
                        f"{'met' if fast else 'MISSED'} ({top['allocations_per_s']} vs "
                        f"{one['allocations_per_s']})"
                    )
            if mode == "inproc" and one is not None:
                n = one["per_host"]
                label = f"in-process pick={pick}: writes per ADD, {n} concurrent on one host <= 2"
                out[label] = _verdict(one["raft_per_add"], 2.0)
    return out


def multihost_table(rep: dict[str, Any]) -> list[str]:
    rows = rep.get("multihost", {}).get("rows", [])
    if not rows:
        return []
    out = [
        "| mode | pick | hosts x concurrent ADDs | Raft entries per successful ADD | "
        "allocations/s | failed |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        rates = [x for x in r.get("allocations_per_s_runs", []) if x is not None]
        spread = f" ({min(rates)} to {max(rates)})" if len(rates) > 1 else ""
        out.append(
            f"| {MODES[r['mode']]} | {r['pick']} | {r['hosts']} x {r['per_host']} | "
            f"{r['raft_per_add']} | {r['allocations_per_s']}{spread} | {r['failures']} |"
        )
    return out


def _verdict(value: float | None, limit: float) -> str:
    if value is None:
        return "not measured"
    return f"{'met' if value <= limit else 'MISSED'} ({value} vs <= {limit})"


def _fmt(v: float | None, suffix: str = "") -> str:
    return "-" if v is None else f"{v:.1f}{suffix}"


def _mib(kb: int | None) -> str:
    return "-" if not kb else f"{kb / 1024:.1f} MiB"


def render(rep: dict[str, Any]) -> list[str]:
    rows = [("figure", "median ms", "p95 ms", "x floor", "cpu ms", "cpu x floor", "n")]
    for f in rep["figures"].values():
        rows.append(
            (
                f["label"] + (f" [{f['errors']} errors]" if f["errors"] else ""),
                _fmt(f["median_ms"]),
                _fmt(f["p95_ms"]),
                _fmt(f["ratio_to_floor"], "x"),
                _fmt(f["cpu_median_ms"]),
                _fmt(f["cpu_ratio_to_floor"], "x"),
                str(f["n"]),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += ["", "ratios:"] + [f"  {k}: {v}" for k, v in rep["ratios"].items() if v is not None]
    c = rep.get("concurrent", {})
    for mode, tag in MODES.items():
        if mode not in c:
            continue
        x, v = c[mode], c[mode]["verbose_round"]
        lines.append(
            f"{c['processes']} concurrent ADDs {tag}: wall {x['wall_ms_median']} ms (median of "
            f"{len(x['rounds'])}), {x['allocations_per_s_median']} allocations/s, per process "
            f"median {x['per_process_median_ms']} ms; Consul requests per ADD mean "
            f"{v.get('requests_per_add_mean')}"
            + (
                f", median {v['requests_per_add_median']}, max {v['requests_per_add_max']}"
                if "requests_per_add_max" in v
                else ""
            )
            + (
                f"; helper CPU {x['rounds'][0]['helper_cpu_ms']} ms"
                if x["rounds"][0].get("helper_cpu_ms") is not None
                else ""
            )
        )
    ru = rep.get("requests_uncontended")
    if ru:
        lines.append("Consul requests per uncontended call (ms spent waiting on Consul):")
        lines += [
            f"  {k}: {v['requests_median']} ({v['consul_ms_median']} ms)" for k, v in ru.items()
        ]
    hc = rep.get("helper_cpu")
    if hc:
        lines.append(
            f"helper CPU during the sequential figures: {hc['cpu_ms_total']} ms for "
            f"{hc['sequential_calls']} calls ({hc['cpu_ms_per_call']} ms per call)"
        )
    mem = rep.get("memory")
    if mem:
        lines.append(
            "peak RSS (median): "
            + ", ".join(f"{k} {_mib(v['max_rss_kb_median'])}" for k, v in mem.items())
        )
    imp = rep.get("imports")
    if imp:
        for key in ("floor", *MODES):
            if key not in imp:
                continue
            x = imp[key]
            lines.append(
                f"imports, {key}: {x['total_ms']} ms, {x['modules']} modules; own time "
                "by package: "
                + ", ".join(f"{k} {v}" for k, v in list(x["self_ms_by_package"].items())[:8])
            )
            if key != "floor":
                lines.append(
                    "  cumulative first import: "
                    + ", ".join(
                        f"{k} {v}" for k, v in list(x["cumulative_ms_of_package"].items())[:8]
                    )
                )
    lat = rep.get("consul_latency_ms")
    if lat:
        lines.append("Consul request latency seen by the plugin (median / p95 ms):")
        lines += [f"  {k}: {v['median']} / {v['p95']} (n {v['n']})" for k, v in lat.items()]
    mh = multihost_table(rep)
    if mh:
        lines += [
            "",
            "many hosts bursting into one /24 (Raft entries from /v1/agent/self):",
            *mh,
            "",
        ]
    lines.append("targets:")
    lines += [f"  {k}: {v}" for k, v in rep["targets"].items()]
    lines += [f"note: {n}" for n in rep["notes"]]
    m = rep["machine"]
    lines.append(
        f"machine: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}, Python "
        f"{m['python']}, {m['consul']} {rep['settings'].get('consul', 'dev')} agent, commit "
        f"{m['commit']}, {m['date']}, load "
        f"average {m['loadavg_1m_at_start']} at start, {m['loadavg_1m_at_end']} at "
        f"end, {rep['settings']['duration_s']} s"
    )
    return lines


def markdown(rep: dict[str, Any]) -> str:
    m = rep["machine"]
    out = [
        f"Measured {m['date']} on {m['cpu']} ({m['cores']} cores), Linux {m['kernel']}, "
        f"Python {m['python']}, {m['consul']} {rep['settings'].get('consul', 'dev')} agent on "
        f"loopback, commit {m['commit']}, "
        f"load average {m['loadavg_1m_at_start']} at start and {m['loadavg_1m_at_end']} at "
        f"end; median and p95 over up to "
        f"{rep['settings']['runs']} runs{' (--quick)' if rep['settings']['quick'] else ''}, "
        f"{rep['settings']['duration_s']:.0f} s in all.",
        "",
        "| figure | median ms | p95 ms | x floor | CPU x floor | n |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for f in rep["figures"].values():
        out.append(
            f"| {f['label']} | {_fmt(f['median_ms'])} | {_fmt(f['p95_ms'])} | "
            f"{_fmt(f['ratio_to_floor'], 'x')} | {_fmt(f['cpu_ratio_to_floor'], 'x')} | "
            f"{f['n']} |"
        )
    out += ["", "| ratio | value |", "|---|---:|"]
    out += [f"| {k} | {v} |" for k, v in rep["ratios"].items() if v is not None]
    out.append("")
    c = rep.get("concurrent", {})
    for mode, tag in MODES.items():
        if mode in c:
            x, v = c[mode], c[mode]["verbose_round"]
            out.append(
                f"- {c['processes']} concurrent ADDs on one pool, {tag}: "
                f"{x['wall_ms_median']} ms wall, {x['allocations_per_s_median']} "
                f"allocations/s, Consul requests per ADD {v.get('requests_per_add_mean')}"
                + (f" (max {v['requests_per_add_max']})" if "requests_per_add_max" in v else "")
            )
    ru = rep.get("requests_uncontended", {})
    if ru:
        out.append(
            "- Consul requests per uncontended call: "
            + ", ".join(f"{k} {v['requests_median']}" for k, v in ru.items())
        )
    mem = rep.get("memory")
    if mem:
        out.append(
            "- peak RSS: "
            + ", ".join(f"{k} {_mib(v['max_rss_kb_median'])}" for k, v in mem.items())
        )
    mh = multihost_table(rep)
    if mh:
        out += [
            "",
            f"Many hosts bursting into one IPv4 /24, {rep['multihost']['burst_total']} ADDs "
            f"per helper row and {rep['multihost'].get('burst_total_inproc')} per in-process "
            "row (one helper per simulated host, or in-process); Raft entries counted from "
            "Consul's `/v1/agent/self` `last_log_index` before and after the burst; each row "
            f"the median of {rep['multihost'].get('repeats', 1)} bursts, the host counts taking "
            "turns (the range of allocations/s in brackets):",
            "",
            *mh,
            "",
        ]
    out += [f"- target {k}: {v}" for k, v in rep["targets"].items()]
    out += [f"- note: {n}" for n in rep["notes"]]
    return "\n".join(out) + "\n"
