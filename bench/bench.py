"""Benchmark ipam-da-consul as a runtime runs it: whole processes against a real Consul.

    .venv/bin/python bench/bench.py [--quick] [--runs N] [--json PATH] [--profile]
                                    [--only all|multihost|sizes] [--hosts 1,2,4,8]
                                    [--burst-inproc N] [--consul server|dev]

Starts its own Consul (one server agent, or with --consul dev a dev agent; tests/support/agent.py)
and its own `ipam-da-consul-helper`, then measures the interpreter floor, our ADD, CHECK and
DEL (in-process, and through the helper), the Go `host-local` peer, ADD in pools holding 0 to
60,000 allocations and in an IPv6 /64, 50 concurrent ADDs, many simulated hosts (distinct
`ipam.host`, one helper each, or in-process) bursting into one pool with `ipam.pick` lowest
and spread, counting Raft log entries per successful ADD from Consul's /v1/agent/self, Consul
requests per call and peak memory; prints a table and writes JSON
(plus a Markdown copy of the table next to it).

This file is the command line; bench/runner.py starts and times the processes (the helper
and Consul launchers are the tests' own, from tests/support), bench/scenarios.py holds what
is measured, bench/report.py the report.

Method, so the numbers can be trusted and compared:
- every figure is a whole process started with posix_spawn, stdin a pipe holding the network
  config and the environment a runtime gives (ours minus CNI_*/CONSUL_*/IPAM_DA_CONSUL_*/
  PYTHON* variables); wall time runs from spawn to reap, so floor and plugins pay the same
  spawn cost. The one addition is IPAM_DA_CONSUL_SOCKET, which pins each call to its mode: a
  path nothing listens on (in-process) or our helper's socket, so a helper already running on
  this machine cannot change the figures;
- in-process and helper figures use separate pools, so the helper's background refreshes
  never react to the in-process calls; its CPU time is read from /proc and reported;
- the sequential figures are interleaved in a shuffled order each round, after warm-up runs,
  so drift (page cache, Consul's growing raft log, other load) hits them all alike;
- p95 is nearest-rank: with 8 runs it is the slowest run;
- peak memory comes from /usr/bin/time -f %M: rusage read by this process would report the
  benchmark's own RSS, because a vfork'd child inherits its parent's high-water mark at exec.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import build_report, markdown, render  # noqa: E402
from bench.runner import HELPER, PLUGIN, PLUGIN_VERBOSE, Helper, kill_live  # noqa: E402
from bench.scenarios import BURST_TOTAL, HOST_COUNTS, Bench  # noqa: E402
from tests.support.agent import ConsulAgent  # noqa: E402


# -- main ----------------------------------------------------------------------------------
@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """SIGTERM behaves like Ctrl-C, so the finally blocks clean up either way."""

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="about 8 runs per figure")
    ap.add_argument("--runs", type=int, help="runs per sequential figure (default 30, quick 8)")
    ap.add_argument("--json", type=Path, default=ROOT / "bench/results/latest.json")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="also cProfile in-process ADDs (empty /24 and 60,000 pools)",
    )
    ap.add_argument("--no-helper", action="store_true", help="measure the in-process path only")
    ap.add_argument(
        "--hosts",
        default=",".join(map(str, HOST_COUNTS)),
        help="simulated host counts for the multi-host bursts (default 1,2,4,8; e.g. 1,8,16)",
    )
    ap.add_argument(
        "--burst-inproc",
        type=int,
        default=BURST_TOTAL,
        help=f"ADDs per in-process multi-host burst (default {BURST_TOTAL}; each one is a whole "
        "interpreter, so a loaded machine may want fewer)",
    )
    ap.add_argument(
        "--mh-repeats",
        type=int,
        default=3,
        help="bursts per mode, pick and host count, the counts taking turns (default 3; the "
        "table gives their medians)",
    )
    ap.add_argument(
        "--multihost-modes",
        default="helper,inproc",
        help="which ways of running the multi-host bursts use (default helper,inproc)",
    )
    ap.add_argument(
        "--consul",
        choices=("server", "dev"),
        default="server",
        help="the Consul measured against: one server agent with a data folder, as production "
        "runs it (default), or a -dev agent, which pretty-prints every answer (a 60,000-key "
        "listing is 12 MB instead of 8 MB)",
    )
    ap.add_argument(
        "--only",
        choices=("all", "multihost", "sizes", "fleet"),
        default="all",
        help="run one part: the multi-host bursts, the sequential figures (pool sizes), or the "
        "fleet's cost to Consul (bench/fleet.py; not part of `all`)",
    )
    ap.add_argument("--fleet-hosts", default="64,256", help="simulated host counts (fleet)")
    ap.add_argument("--fleet-rates", default="1,10,100", help="allocations/s tried (fleet)")
    ap.add_argument("--fleet-seconds", type=float, default=30.0, help="seconds per rate (fleet)")
    ap.add_argument(
        "--fleet-quiet", type=float, default=70.0,
        help="seconds with no call (fleet): covers two blocking-query waits of every host",
    )
    ap.add_argument("--fleet-pool", type=int, default=60_000, help="allocations in the pool")
    args = ap.parse_args()
    args.fleet_hosts = [int(n) for n in args.fleet_hosts.split(",") if n]
    args.fleet_rates = [float(n) for n in args.fleet_rates.split(",") if n]
    args.runs = max(3, args.runs or (8 if args.quick else 30))
    for exe in (PLUGIN, PLUGIN_VERBOSE):
        if not exe.exists():
            print(
                f"{exe} is not installed: run this with the venv's python after `pip install -e .`",
                file=sys.stderr,
            )
            return 2
    if not hasattr(os, "pidfd_open"):
        print("needs Linux >= 5.3 and Python >= 3.9 (os.pidfd_open)", file=sys.stderr)
        return 2

    started = time.perf_counter()
    load_at_start = round(os.getloadavg()[0], 2)
    if load_at_start > (os.cpu_count() or 1):
        print(
            f"warning: load average {load_at_start} exceeds the {os.cpu_count()} cores; "
            "absolute times will be inflated (ratios less so: runs are interleaved)",
            file=sys.stderr,
        )
    tmp = Path(tempfile.mkdtemp(prefix="ipam-bench-"))
    agent: ConsulAgent | None = None
    helper: Helper | None = None
    try:
        with interruptible():
            agent = bench_agent(args.consul).start()
            if args.only == "fleet":
                from bench.fleet import run_fleet

                fleet = run_fleet(agent, tmp, args, lambda msg: print(msg, file=sys.stderr))
                write_fleet(fleet, args, started, load_at_start)
                return 0
            if not args.no_helper and HELPER.exists():
                helper = Helper(tmp)
            b = Bench(args, agent, helper, tmp)
            if helper is None:
                b.notes.append(
                    "helper figures skipped: "
                    + ("--no-helper" if args.no_helper else f"{HELPER} is not installed")
                )
            b.log(
                f"Consul {args.consul} agent at {agent.url}; plugin {PLUGIN}; "
                f"runs {args.runs}; "
                f"modes {', '.join(b.modes)}"
            )
            if args.only in ("all", "sizes"):
                b.make_pools()
                b.sequential()
            if args.only == "all":
                b.log("Consul requests per call (verbose flavour)")
                b.requests_uncontended()
                b.log("concurrency")
                b.concurrency()
            if args.only in ("all", "multihost"):
                b.log("many hosts bursting into one pool")
                b.multihost()
            if args.only == "all":
                b.log("memory and imports")
                b.memory()
                b.imports()
            if args.profile:
                b.profile()
            b.helper_log()
            rep = build_report(b, started, load_at_start)
    except KeyboardInterrupt:
        print("interrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        kill_live()
        if helper is not None:
            helper.close()
        if agent is not None:
            agent.close()
        shutil.rmtree(tmp, ignore_errors=True)

    print("\n".join(render(rep)), flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rep, indent=2) + "\n")
    args.json.with_suffix(".md").write_text(markdown(rep))
    print(f"\nwrote {args.json} and {args.json.with_suffix('.md')}", file=sys.stderr)
    return 0


def write_fleet(
    fleet: dict[str, Any], args: argparse.Namespace, started: float, load: float
) -> None:
    from bench.report import machine

    fleet["machine"] = machine()
    fleet["seconds"] = round(time.perf_counter() - started)
    fleet["load_at_start"], fleet["load_at_end"] = load, round(os.getloadavg()[0], 2)
    path = args.json.with_name("fleet.json") if args.json.name == "latest.json" else args.json
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(fleet, indent=2) + "\n")
    m = fleet["machine"]
    lines = [f"# Fleet: one pool of {fleet['pool_allocations']} allocations; {m.get('cpu')} "
             f"({m.get('cores')} cores), {m.get('consul')}, commit {m.get('commit')}, "
             f"{m.get('date')}; load {load} -> {fleet['load_at_end']}; {fleet['seconds']} s", "",
             "| window | hosts | allocations/s | failed | bytes/s per host | watch bytes/s per "
             "host | requests/s per host | Consul CPU s/s | CPU ms per ADD+DEL | Raft entries "
             "per ADD+DEL |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in fleet["windows"]:
        lines.append(f"| {r['window']} | {r['hosts']} | {r['allocations_per_s']} | "
                     f"{r['add_failures'] + r['del_failures']} | {r['bytes_per_s_per_host']} | "
                     f"{r['watch_bytes_per_s_per_host']} | {r['requests_per_s_per_host']} | "
                     f"{r['consul_cpu_per_s']} | {r['consul_cpu_ms_per_allocation']} | "
                     f"{r['raft_entries_per_add_and_del']} |")
    ex = fleet["extrapolation"]
    lines += ["", f"Extrapolation: {ex['formula']}.", "",
              f"Measured: idle = {ex['idle_cpu_per_s']} CPU s/s, q = "
              f"{ex['quiet_bytes_per_s_per_host']} B/s, c_q = "
              f"{ex['quiet_cpu_per_s_per_host']} s/s per host, a = {ex.get('a_bytes')} B, "
              f"b = {ex.get('b_bytes')} B, c_a = {ex.get('c_a_ms')} ms, c_b = "
              f"{ex.get('c_b_ms')} ms. Wakes per write, measured against expected: "
              + "; ".join(f"{f['hosts']} hosts {f['wakes_per_write']} vs "
                          f"{f['expected_wakes_per_write']}" for f in ex["fit"]), "",
              "| hosts | allocations/s | leader MB/s | leader cores |", "|---:|---:|---:|---:|"]
    for r in ex["rows"]:
        lines.append(f"| {r['hosts']} | {r['rate']:g} | {r['leader_bytes_per_s'] / 1e6:.3f} | "
                     f"{r['leader_cpu_cores']} |")
    first = fleet.get("first_add_bytes_per_host")
    if first:
        lines += ["", "A new host's first ADD (its home stripe full: a listing of the pool's key "
                  "names finds one with room, once per helper start), bytes from Consul: "
                  + ", ".join(f"{b / 1e6:.2f} MB" for b in first) + "."]
    mem = fleet["helper_memory"]
    lines += ["", f"Helper RSS with the pool kept: {mem['rss_kib']} KiB (peak {mem['peak_kib']} "
              "KiB).", "", *[f"- {g}" for g in fleet["goals"]]]
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {path} and {path.with_suffix('.md')}", file=sys.stderr)


# Consul caps the HTTP connections of one client address (200 by default). Real hosts each
# have their own; the simulated hosts all come from 127.0.0.1, and their helpers hold one
# long-poll per watched pool (up to --max-pools, 64), so 16 of them would pass the cap and
# have their connections dropped.
_SIMULATED_HOSTS = ["-hcl", "limits { http_max_conns_per_client = 4096 }"]


def bench_agent(kind: str) -> ConsulAgent:
    if kind == "dev":
        return ConsulAgent("bench", extra=_SIMULATED_HOSTS)
    # A single server elects itself; the raft multiplier of 1 is what production is tuned to.
    return ConsulAgent(
        "bench",
        dev=False,
        extra=[
            "-bootstrap-expect",
            "1",
            "-hcl",
            "performance { raft_multiplier = 1 }",
            *_SIMULATED_HOSTS,
        ],
    )


if __name__ == "__main__":
    sys.exit(main())
