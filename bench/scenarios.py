"""What the benchmark measures: pools in a real Consul, the sequential figures, requests per
call, concurrency, multi-host bursts, memory and imports (the Bench class)."""

from __future__ import annotations

import argparse
import functools
import ipaddress
import json
import os
import random
import re
import statistics
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.runner import (
    CNI_VERSION,
    HOST_LOCAL,
    PLUGIN,
    PLUGIN_VERBOSE,
    TIME_BIN,
    Helper,
    Run,
    Series,
    _r,
    base_env,
    cni_env,
    interpreter_of,
    p95,
    proc_status_kb,
    reap_all,
    run,
    spawn,
)
from tests.support.agent import ConsulAgent

FILL_SIZES = (0, 1_000, 10_000, 60_000)
CONCURRENCY = 50
SEQ_BUDGET_S = 150.0  # timed seconds for all sequential figures (--quick: 40%); see sequential()
MODES = {"inproc": "in-process", "helper": "via helper"}
# Multi-host bursts: simulated hosts (distinct `ipam.host`, one helper each) x concurrent ADDs
# per host, the same total for every host count so the rows compare; both `ipam.pick` modes.
HOST_COUNTS = (1, 2, 4, 8)
BURST_TOTAL = 48
PICKS = ("stripe", "lowest", "spread")

# Consul requests are counted from the verbose log in its JSON format (cni/logs.py): each call
# ends with one `{"event": "call", ...}` line holding every request its client sent (the
# client's on_request events, not the wording of its debug lines), whether the plugin process
# or the helper served it.
JSON_LOG = {"IPAM_DA_CONSUL_LOG_FORMAT": "json"}
IMPORT_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)\s*$")


# -- Consul fixtures -------------------------------------------------------------------------
def fill_pool(agent: ConsulAgent, pool: str, first: ipaddress.IPv4Address, n: int) -> float:
    """Seconds to write n allocation keys (the lowest n addresses from `first`)."""
    started = time.perf_counter()
    agent.fill_pool(pool, first, n)
    return time.perf_counter() - started


def netconf(
    url: str, pool: str, prev: dict[str, Any] | None = None, ipam: dict[str, Any] | None = None
) -> bytes:
    """The config ipam-delegated hands its delegate: the whole network config, pools in
    prevResult, and (for CHECK and DEL) the addresses of the ADD. `ipam`: extra keys (a
    simulated host's `host`, the `pick` mode)."""
    prev_result = dict(prev or {"cniVersion": CNI_VERSION, "ips": []})
    prev_result["pools"] = [{"name": pool}]
    conf = {
        "cniVersion": CNI_VERSION,
        "name": "benchnet",
        "type": "ipam-delegated",
        "ipam": {
            "type": "ipam-delegated",
            "delegates": ["ipam-da-consul"],
            "consul_servers": [url],
            **(ipam or {}),
        },
        "prevResult": prev_result,
    }
    return json.dumps(conf).encode()


def host_local_conf(data_dir: str) -> bytes:
    return json.dumps(
        {
            "cniVersion": CNI_VERSION,
            "name": "benchnet",
            "type": "bridge",
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": "10.250.0.0/16", "gateway": "10.250.0.1"}]],
                "dataDir": data_dir,
            },
        }
    ).encode()


def netconf_with_prev(stdin: bytes, prev: dict[str, Any]) -> bytes:
    """The same config with the ADD's addresses in prevResult, for its DEL."""
    conf = json.loads(stdin)
    conf["prevResult"] = {**prev, "pools": conf["prevResult"]["pools"]}
    return json.dumps(conf).encode()


def prev_of(r: Run) -> dict[str, Any]:
    """What a runtime hands DEL: the ADD's addresses (none when the ADD failed)."""
    return {"cniVersion": CNI_VERSION, "ips": _ips(r) or []}


# -- the benchmark ----------------------------------------------------------------------------
class Bench:
    def __init__(
        self, args: argparse.Namespace, agent: ConsulAgent, helper: Helper | None, tmp: Path
    ) -> None:
        self.args = args
        self.agent = agent
        self.helper = helper
        self.tmp = tmp
        self.url = agent.url
        self.tag = f"b{os.getpid()}"
        self.python = interpreter_of(PLUGIN)
        self.modes = [m for m in MODES if m == "inproc" or helper is not None]
        self.series: dict[str, Series] = {}
        self.notes: list[str] = []
        self.result: dict[str, Any] = {}
        self.counter = 0
        self.pools: dict[str, str] = {}
        self.helper_calls = 0

    def log(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    def cid(self, what: str) -> str:
        self.counter += 1
        return f"{self.tag}-{what}-{self.counter}"

    def s(self, key: str, label: str) -> Series:
        return self.series.setdefault(key, Series(key, label))

    def socket_env(self, mode: str) -> dict[str, str]:
        if mode == "helper":
            assert self.helper is not None
            return {"IPAM_DA_CONSUL_SOCKET": str(self.helper.socket)}
        return {"IPAM_DA_CONSUL_SOCKET": str(self.tmp / "no-helper.sock")}

    # -- setup ---------------------------------------------------------------------------
    def make_pools(self) -> None:
        """Per mode: a /24, a /24 for CHECK, an IPv6 /64, and /16s filled to each size."""
        a = self.agent
        for j, mode in enumerate(self.modes):

            def pool(key: str, subnet: str, gateway: str, mode: str = mode) -> str:
                name = a.create_pool(
                    f"{self.tag}-{mode}-{key}", [{"subnet": subnet, "gateway": gateway}]
                )
                self.pools[f"{mode}:{key}"] = name
                return name

            pool("v4", f"10.{j}.1.0/24", f"10.{j}.1.1")
            pool("check", f"10.{j}.2.0/24", f"10.{j}.2.1")
            pool("v6", f"fd00:be:{j}::/64", f"fd00:be:{j}::1")
            for i, size in enumerate(FILL_SIZES):
                net = ipaddress.IPv4Network(f"10.{10 + 10 * j + i}.0.0/16")
                name = pool(f"fill{size}", str(net), str(net[1]))
                if size:
                    took = fill_pool(a, name, net[2], size)  # .0 is the network, .1 the gateway
                    self.log(f"filled {name} with {size:,} allocations in {took:.1f} s")

    # -- one plugin call ------------------------------------------------------------------
    def plugin(
        self,
        mode: str,
        command: str,
        pool: str,
        container: str,
        prev: dict[str, Any] | None = None,
        verbose: bool = False,
        extra_env: dict[str, str] | None = None,
    ) -> Run:
        env = {**cni_env(command, container), **self.socket_env(mode), **(extra_env or {})}
        exe = PLUGIN_VERBOSE if verbose else PLUGIN
        if mode == "helper":
            self.helper_calls += 1
        return run([str(exe)], env, netconf(self.url, self.pools[pool], prev))

    def add_del(
        self,
        mode: str,
        pool: str,
        add: Series | None,
        dele: Series | None,
        what: str,
        verbose: bool = False,
        extra_env: dict[str, str] | None = None,
    ) -> tuple[Run, Run]:
        """ADD then DEL with a fresh container id, so the pool keeps its size."""
        cid = self.cid(what)
        r_add = self.plugin(mode, "ADD", pool, cid, verbose=verbose, extra_env=extra_env)
        if add is not None:
            add.add(r_add, r_add.ok and _ips(r_add) is not None)
        r_del = self.plugin(
            mode, "DEL", pool, cid, prev_of(r_add), verbose=verbose, extra_env=extra_env
        )
        if dele is not None:
            dele.add(r_del, r_del.ok and not r_del.stdout.strip())
        elif not r_del.ok:
            self.notes.append(f"DEL after an ADD in {pool} failed: {r_del.problem()}")
        return r_add, r_del

    # -- sequential figures ------------------------------------------------------------------
    def sequential(self) -> None:
        a = self.args
        floor = self.s("floor", "python -c pass (floor)")
        bare = self.s("bare", "python -S -c pass (no site: bare interpreter)")
        jobs: list[tuple[list[Series], Callable[[], object]]] = [
            ([floor], lambda: floor.add(run([self.python, "-c", "pass"], base_env()))),
            ([bare], lambda: bare.add(run([self.python, "-S", "-c", "pass"], base_env()))),
        ]
        standing: list[tuple[str, str, dict[str, Any]]] = []
        for mode in self.modes:
            jobs += self.mode_jobs(mode, standing)
        hl = self.s("host_local", "host-local ADD (Go peer)")
        hl_del = self.s("host_local_del", "host-local DEL (Go peer)")
        if HOST_LOCAL.exists():
            conf = host_local_conf(str(self.tmp / "host-local"))

            def do_hl() -> None:
                cid = self.cid("hl")
                hl.add(run([str(HOST_LOCAL)], cni_env("ADD", cid), conf))
                hl_del.add(run([str(HOST_LOCAL)], cni_env("DEL", cid), conf))

            jobs.append(([hl, hl_del], do_hl))
        else:
            hl.note = f"skipped: {HOST_LOCAL} is absent (apt install containernetworking-plugins)"
            self.notes.append(hl.note)

        # Warm-up: byte-compiles, fills the page cache and the helper's pool cache, and times
        # each job so that slow figures cannot blow the time budget.
        warm = 1 if a.quick else 2
        cost: dict[int, float] = {}
        for i, (series, job) in enumerate(jobs):
            started = time.perf_counter()
            for _ in range(warm):
                job()
            cost[i] = (time.perf_counter() - started) / warm
            for s in series:
                s.wall.clear()
                s.cpu.clear()
                s.errors.clear()
            self.log(f"warm-up {series[0].key}: {cost[i] * 1000:.0f} ms per run")
        # Share the budget out, cheapest job first: what a cheap job leaves goes to the rest.
        budget = SEQ_BUDGET_S * (0.4 if a.quick else 1.0)
        left = len(jobs)
        for i in sorted(cost, key=cost.__getitem__):
            share = budget / left
            runs = a.runs if cost[i] * a.runs <= share else max(5, int(share / cost[i]))
            budget -= runs * cost[i]
            left -= 1
            for s in jobs[i][0]:
                s.target_runs = runs
                if runs < a.runs:
                    s.note = f"runs capped at {runs} by the time budget ({cost[i]:.1f} s per run)"

        rng = random.Random(4)
        most = max(j[0][0].target_runs for j in jobs)
        helper_cpu0, calls0 = (self.helper.cpu_ms() if self.helper else 0.0), self.helper_calls
        for i in range(most):
            order = [j for j in jobs if j[0][0].target_runs > i]
            rng.shuffle(order)
            for _, job in order:
                job()
            if (i + 1) % 5 == 0 or i + 1 == most:
                self.log(f"round {i + 1}/{most}")
        if self.helper:
            calls = self.helper_calls - calls0
            used = self.helper.cpu_ms() - helper_cpu0
            self.result["helper_cpu"] = {
                "sequential_calls": calls,
                "cpu_ms_total": _r(used),
                "cpu_ms_per_call": _r(used / calls, 2) if calls else None,
                "note": "the helper's own CPU (serving calls plus background pool refreshes) "
                "while the sequential figures ran; a plugin's cpu ms column counts "
                "only the client process",
            }

        for mode, cid, prev in standing:
            r = self.plugin(mode, "DEL", f"{mode}:check", cid, prev)
            if not r.ok:
                self.notes.append(f"final DEL of the CHECK allocation failed: {r.problem()}")

    def mode_jobs(
        self, mode: str, standing: list[tuple[str, str, dict[str, Any]]]
    ) -> list[tuple[list[Series], Callable[[], object]]]:
        tag = MODES[mode]
        add = self.s(f"{mode}:add", f"ADD, IPv4 /24, empty ({tag})")
        check = self.s(f"{mode}:check", f"CHECK ({tag})")
        dele = self.s(f"{mode}:del", f"DEL ({tag})")
        fills = {
            n: self.s(f"{mode}:add_{n}", f"ADD, /16 holding {n:,} ({tag})") for n in FILL_SIZES
        }
        v6 = self.s(f"{mode}:add_v6", f"ADD, IPv6 /64, empty ({tag})")

        # CHECK needs an ADD it can check; it stands for the whole run.
        check_cid = self.cid("check")
        r = self.plugin(mode, "ADD", f"{mode}:check", check_cid)
        if not r.ok:
            raise RuntimeError(f"setup ADD for CHECK failed: {r.problem()}")
        check_prev = json.loads(r.stdout)
        standing.append((mode, check_cid, check_prev))

        def do_check() -> None:
            r = self.plugin(mode, "CHECK", f"{mode}:check", check_cid, check_prev)
            check.add(r, r.ok and not r.stdout.strip())

        def do_fill(n: int) -> Callable[[], object]:
            return lambda: self.add_del(mode, f"{mode}:fill{n}", fills[n], None, f"f{n}")

        return [
            ([add, dele], lambda: self.add_del(mode, f"{mode}:v4", add, dele, "add")),
            ([check], do_check),
            *[([fills[n]], do_fill(n)) for n in FILL_SIZES],
            ([v6], lambda: self.add_del(mode, f"{mode}:v6", v6, None, "v6")),
        ]

    # -- Consul requests per call -------------------------------------------------------------
    def requests_uncontended(self) -> None:
        """Each verbose call's own records, found by the log's size before and after it: this
        works whether the plugin process or the helper wrote them."""
        log = self.tmp / "verbose-uncontended.log"
        env = {"IPAM_DA_CONSUL_LOG_FILE": str(log), **JSON_LOG}
        n = 3 if self.args.quick else 5
        counts: dict[str, list[int]] = defaultdict(list)
        consul_ms: dict[str, list[float]] = defaultdict(list)
        latency: dict[str, list[float]] = defaultdict(list)

        def counted(
            label: str,
            mode: str,
            command: str,
            pool: str,
            cid: str,
            prev: dict[str, Any] | None = None,
        ) -> Run:
            before = log.stat().st_size if log.exists() else 0
            r = self.plugin(mode, command, f"{mode}:{pool}", cid, prev, verbose=True, extra_env=env)
            reqs = [req for call in parse_calls(log, before) for req in requests_of(call)]
            counts[label].append(len(reqs))
            consul_ms[label].append(sum(ms for _, ms in reqs))
            for kind, ms in reqs:
                latency[f"{label}: {kind}"].append(ms)
            return r

        for mode in self.modes:
            tag = MODES[mode]
            cid = self.cid("vcheck")
            r = self.plugin(mode, "ADD", f"{mode}:check", cid)
            check_prev = json.loads(r.stdout) if r.ok else None
            for _ in range(n):
                for what, pool in (("/24", "v4"), ("@60k", "fill60000"), ("v6", "v6")):
                    c = self.cid("v")
                    r_add = counted(f"ADD {what} ({tag})", mode, "ADD", pool, c)
                    counted(f"DEL {what} ({tag})", mode, "DEL", pool, c, prev_of(r_add))
                if check_prev is not None:
                    counted(f"CHECK ({tag})", mode, "CHECK", "check", cid, check_prev)
            self.plugin(mode, "DEL", f"{mode}:check", cid, check_prev)
        self.result["requests_uncontended"] = {
            label: {
                "requests_median": statistics.median(v),
                "requests_max": max(v),
                "consul_ms_median": _r(statistics.median(consul_ms[label])),
            }
            for label, v in counts.items()
        }
        self.result["consul_latency_ms"] = {
            k: {"n": len(v), "median": _r(statistics.median(v), 2), "p95": _r(p95(v), 2)}
            for k, v in sorted(latency.items())
        }
        if not any(x for v in counts.values() for x in v):
            self.notes.append(
                "no Consul requests found in the verbose JSON log: has its format changed? "
                "(expected one {\"event\": \"call\", \"consul_requests\": [...]} line per call)"
            )

    # -- concurrency --------------------------------------------------------------------------
    def concurrent_round(self, mode: str, verbose: bool, log: Path | None = None) -> dict[str, Any]:
        key = f"{mode}:conc{self.cid('p')}"
        j = self.modes.index(mode)
        self.pools[key] = self.agent.create_pool(
            f"{self.tag}-{key.replace(':', '-')}",
            [{"subnet": f"10.{j}.3.0/24", "gateway": f"10.{j}.3.1"}],
        )
        # One call first, as on a node that has served this pool before (the helper knows it).
        self.add_del(mode, key, None, None, "cw")
        logged = {"IPAM_DA_CONSUL_LOG_FILE": str(log), **JSON_LOG} if log else {}
        extra = {**self.socket_env(mode), **logged}
        exe = str(PLUGIN_VERBOSE if verbose else PLUGIN)
        cids = [self.cid("c") for _ in range(CONCURRENCY)]
        stdin = netconf(self.url, self.pools[key])
        envs = [{**cni_env("ADD", c), **extra} for c in cids]
        log_before = log.stat().st_size if log and log.exists() else 0
        cpu0 = self.helper.cpu_ms() if self.helper and mode == "helper" else None
        children = [spawn([exe], env, stdin) for env in envs]
        runs = reap_all(children)
        first = min(c.started for c in children)
        last = max(c.started + r.wall_ms / 1000 for r, c in zip(runs, children, strict=True))
        wall = (last - first) * 1000
        helper_cpu = self.helper.cpu_ms() - cpu0 if self.helper and cpu0 is not None else None
        calls = parse_calls(log, log_before) if log else None
        ips = [_ip_of(r) for r in runs]
        failed = [r.problem() for r, ip in zip(runs, ips, strict=True) if ip is None]
        got = [ip for ip in ips if ip]
        dupes = sorted(ip for ip, k in Counter(got).items() if k > 1)
        in_kv = self.agent.allocations(self.pools[key])
        kv_ok = sorted(in_kv.values()) == sorted(
            c for c, ip in zip(cids, ips, strict=True) if ip
        ) and len(set(in_kv)) == len(got)
        # DEL all, concurrently too, with the addresses a runtime would pass back.
        dels = [
            spawn(
                [exe],
                {**cni_env("DEL", c), **extra},
                netconf(self.url, self.pools[key], prev_of(r)),
            )
            for c, r in zip(cids, runs, strict=True)
        ]
        del_runs = reap_all(dels)
        del_first = min(c.started for c in dels)
        del_last = max(c.started + r.wall_ms / 1000 for r, c in zip(del_runs, dels, strict=True))
        out = {
            "pool": self.pools[key],
            "wall_ms": _r(wall),
            "allocations_per_s": _r(len(got) / (wall / 1000)) if wall else None,
            "per_process_median_ms": _r(statistics.median(r.wall_ms for r in runs)),
            "per_process_p95_ms": _r(p95([r.wall_ms for r in runs])),
            "per_process_max_ms": _r(max(r.wall_ms for r in runs)),
            "helper_cpu_ms": _r(helper_cpu),
            "failures": len(failed),
            "first_failures": failed[:3],
            "duplicate_ips": dupes,
            "kv_matches_results": kv_ok,
            "del_wall_ms": _r((del_last - del_first) * 1000),
            "del_failures": sum(not r.ok for r in del_runs),
            "left_after_del": len(self.agent.allocations(self.pools[key])),
        }
        if calls is not None:
            # Each ADD's own record names its container, in either mode.
            per_container: dict[str, int] = Counter()
            for call in calls:
                if call.get("command") == "ADD":
                    per_container[call.get("container", "")] += len(requests_of(call))
            counts = [per_container.get(c, 0) for c in cids]
            total = sum(counts)
            out["requests_total"] = total
            out["requests_per_add_mean"] = _r(total / len(runs), 2)
            out["requests_per_add_median"] = statistics.median(counts)
            out["requests_per_add_max"] = max(counts)
        return out

    def concurrency(self) -> None:
        out: dict[str, Any] = {"processes": CONCURRENCY}
        for mode in self.modes:
            # In-process rounds cost ~15 s each on 2 cores; the verbose round adds one more.
            rounds = 1 if self.args.quick or mode == "inproc" else 3
            timed = []
            for i in range(rounds):
                res = self.concurrent_round(mode, verbose=False)
                timed.append(res)
                self.log(
                    f"concurrent {MODES[mode]} round {i + 1}/{rounds}: {res['wall_ms']} ms,"
                    f" {res['failures']} failures"
                )
            counted = self.concurrent_round(
                mode, verbose=True, log=self.tmp / f"verbose-concurrent-{mode}.log"
            )
            walls = [r["wall_ms"] for r in timed if r["wall_ms"]]
            rates = [r["allocations_per_s"] for r in timed if r["allocations_per_s"]]
            out[mode] = {
                "rounds": timed,
                "wall_ms_median": _r(statistics.median(walls)) if walls else None,
                "allocations_per_s_median": _r(statistics.median(rates)) if rates else None,
                "per_process_median_ms": _r(
                    statistics.median(r["per_process_median_ms"] for r in timed)
                ),
                "verbose_round": counted,
            }
            for r in [*timed, counted]:
                if (
                    r["failures"]
                    or r["duplicate_ips"]
                    or not r["kv_matches_results"]
                    or r["del_failures"]
                    or r["left_after_del"]
                ):
                    self.notes.append(
                        f"concurrent round on {r['pool']}: {r['failures']} ADD failures, "
                        f"duplicates {r['duplicate_ips']}, KV matches results: "
                        f"{r['kv_matches_results']}, {r['del_failures']} DEL failures, "
                        f"{r['left_after_del']} left after DEL; first: {r['first_failures'][:1]}"
                    )
        self.result["concurrent"] = out

    # -- many hosts bursting into one pool ---------------------------------------------------
    def raft_index(self) -> int:
        """Consul's last Raft log index: every write attempt, won or lost, is one entry."""
        resp = self.agent.http.get(f"{self.url}/v1/agent/self", timeout=10)
        resp.raise_for_status()
        return int(resp.json()["Stats"]["raft"]["last_log_index"])

    def multihost_round(
        self, mode: str, pick: str, hosts: int, per_host: int, helpers: list[Helper]
    ) -> dict[str, Any]:
        key = f"mh:{mode}:{pick}:{hosts}:{self.cid('m')}"
        self.pools[key] = self.agent.create_pool(
            f"{self.tag}-mh-{self.counter}", [{"subnet": "10.77.0.0/24", "gateway": "10.77.0.1"}]
        )
        stdin = [
            # A generous budget: the figure is the writes a burst costs, not whether a loaded
            # machine starts 48 interpreters within the default 15 s.
            netconf(
                self.url,
                self.pools[key],
                ipam={"host": f"sim-{h}", "pick": pick, "timeout": 120},
            )
            for h in range(hosts)
        ]

        def env(command: str, cid: str, h: int) -> dict[str, str]:
            sock = (
                {"IPAM_DA_CONSUL_SOCKET": str(helpers[h].socket)}
                if mode == "helper"
                else self.socket_env("inproc")
            )
            return {**cni_env(command, cid), **sock}

        # One call per host first, as on nodes that have served this pool before (each helper
        # caches it); then a pause so every helper's copy has caught up with the others'.
        for h in range(hosts):
            cid = self.cid("mw")
            r = run([str(PLUGIN)], env("ADD", cid, h), stdin[h])
            run([str(PLUGIN)], env("DEL", cid, h), netconf_with_prev(stdin[h], prev_of(r)))
        time.sleep(1.5)
        calls = [(h, self.cid("mh")) for h in range(hosts) for _ in range(per_host)]
        random.Random(hosts).shuffle(calls)  # hosts start interleaved, as a rollout would
        index0 = self.raft_index()
        children = [spawn([str(PLUGIN)], env("ADD", cid, h), stdin[h]) for h, cid in calls]
        runs = reap_all(children)
        index1 = self.raft_index()
        first = min(c.started for c in children)
        last = max(c.started + r.wall_ms / 1000 for r, c in zip(runs, children, strict=True))
        wall = last - first
        ips = [_ip_of(r) for r in runs]
        got = [ip for ip in ips if ip]
        dupes = sorted(ip for ip, k in Counter(got).items() if k > 1)
        failed = [r.problem() for r, ip in zip(runs, ips, strict=True) if ip is None]
        dels = [
            spawn([str(PLUGIN)], env("DEL", cid, h), netconf_with_prev(stdin[h], prev_of(r)))
            for (h, cid), r in zip(calls, runs, strict=True)
        ]
        del_runs = reap_all(dels)
        left = len(self.agent.allocations(self.pools[key]))
        return {
            "mode": mode,
            "pick": pick,
            "hosts": hosts,
            "per_host": per_host,
            "allocated": len(got),
            "failures": len(failed),
            "first_failures": failed[:2],
            "duplicate_ips": dupes,
            "raft_entries": index1 - index0,
            "raft_per_add": _r((index1 - index0) / len(got), 2) if got else None,
            "wall_ms": _r(wall * 1000),
            "allocations_per_s": _r(len(got) / wall, 1) if wall else None,
            "del_failures": sum(not r.ok for r in del_runs),
            "left_after_del": left,
        }

    def multihost(self) -> None:
        counts = [int(x) for x in self.args.hosts.split(",")]
        helpers: list[Helper] = []
        rows: list[dict[str, Any]] = []
        try:
            if "helper" in self.modes:
                for h in range(max(counts)):
                    hp = Helper(self.tmp, f"host{h}")
                    helpers.append(hp)
            wanted = self.args.multihost_modes.split(",")
            modes = [m for m in self.modes if m in wanted]
            for mode in sorted(modes, key=lambda m: m != "helper"):  # the quick ones first
                total = self.args.burst_inproc if mode == "inproc" else BURST_TOTAL
                for pick in PICKS:
                    # Each host count bursts `repeats` times, the counts taking turns, so a
                    # slow spell of the machine falls on all of them alike.
                    rounds: dict[int, list[dict[str, Any]]] = {h: [] for h in counts}
                    for _ in range(self.args.mh_repeats):
                        for hosts in counts:
                            rounds[hosts].append(
                                self.multihost_round(
                                    mode, pick, hosts, max(1, total // hosts), helpers
                                )
                            )
                    for hosts in counts:
                        row = _merge_rounds(rounds[hosts])
                        rows.append(row)
                        self.log(
                            f"multi-host {MODES[mode]} pick={pick} {hosts} x {row['per_host']}: "
                            f"{row['raft_per_add']} Raft entries/ADD, "
                            f"{row['allocations_per_s']} allocations/s "
                            f"({row['allocations_per_s_runs']}), {row['failures']} failed"
                        )
                        if row["duplicate_ips"] or row["failures"] or row["left_after_del"]:
                            self.notes.append(
                                f"multi-host round {mode}/{pick}/{hosts}: {row['failures']} "
                                f"failed, duplicates {row['duplicate_ips']}, "
                                f"{row['left_after_del']} left after DEL; "
                                f"first: {row['first_failures'][:1]}"
                            )
        finally:
            for hp in helpers:
                hp.close()
        self.result["multihost"] = {
            "burst_total": BURST_TOTAL,
            "burst_total_inproc": self.args.burst_inproc,
            "repeats": self.args.mh_repeats,
            "pool": "IPv4 /24 (253 addresses), one per round",
            "rows": rows,
        }

    # -- memory ------------------------------------------------------------------------------
    def memory(self) -> None:
        """Peak RSS through /usr/bin/time, whose fork leaves no trace of our own RSS."""
        if not TIME_BIN.exists():
            self.notes.append(f"peak memory skipped: {TIME_BIN} is absent (apt install time)")
            return
        n = 3 if self.args.quick else 5
        report = self.tmp / "time.out"

        def timed(argv: list[str], env: dict[str, str], stdin: bytes = b"") -> tuple[Run, int]:
            r = run([str(TIME_BIN), "-f", "%M", "-o", str(report), *argv], env, stdin)
            return r, int(report.read_text().split()[-1]) if r.ok else 0

        def floor() -> int:
            return timed([self.python, "-c", "pass"], base_env())[1]

        def add(mode: str, pool: str) -> int:
            cid = self.cid("mem")
            env = {**cni_env("ADD", cid), **self.socket_env(mode)}
            r, kb = timed([str(PLUGIN)], env, netconf(self.url, self.pools[f"{mode}:{pool}"]))
            self.plugin(mode, "DEL", f"{mode}:{pool}", cid, prev_of(r))
            if not r.ok:
                self.notes.append(f"memory ADD failed: {r.problem()}")
            return kb

        def host_local() -> int:
            cid = self.cid("hlmem")
            conf = host_local_conf(str(self.tmp / "host-local"))
            r, kb = timed([str(HOST_LOCAL)], cni_env("ADD", cid), conf)
            run([str(HOST_LOCAL)], cni_env("DEL", cid), conf)
            if not r.ok:
                self.notes.append(f"memory host-local ADD failed: {r.problem()}")
            return kb

        cases: list[tuple[str, Callable[[], int]]] = [("floor", floor)]
        for mode in self.modes:
            cases += [
                (f"{mode}:add", functools.partial(add, mode, "v4")),
                (f"{mode}:add_60000", functools.partial(add, mode, "fill60000")),
            ]
        if HOST_LOCAL.exists():
            cases.append(("host_local", host_local))
        out: dict[str, Any] = {}
        for key, fn in cases:
            values = [v for v in (fn() for _ in range(n)) if v]
            out[key] = {
                "max_rss_kb_median": int(statistics.median(values)) if values else None,
                "max_rss_kb_max": max(values) if values else None,
                "n": len(values),
            }
        if self.helper and self.helper.pid:
            out["helper_process"] = {
                "max_rss_kb_median": proc_status_kb(self.helper.pid, "VmHWM"),
                "rss_kb_now": proc_status_kb(self.helper.pid, "VmRSS"),
                "note": "the helper's own high-water mark (VmHWM) over the whole benchmark, "
                "holding every pool it served",
            }
        self.result["memory"] = out

    # -- where the time goes -----------------------------------------------------------------
    def imports(self) -> None:
        """-X importtime of real ADD processes (not a synthetic import list), and of the floor."""
        n = 3 if self.args.quick else 5
        runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for _ in range(n):
            env = {**base_env(), "PYTHONPROFILEIMPORTTIME": "1"}
            runs["floor"].append(parse_importtime(run([self.python, "-c", "pass"], env).stderr))
            for mode in self.modes:
                r_add, _ = self.add_del(
                    mode,
                    f"{mode}:v4",
                    None,
                    None,
                    "imp",
                    extra_env={"PYTHONPROFILEIMPORTTIME": "1"},
                )
                if r_add.ok:
                    runs[mode].append(parse_importtime(r_add.stderr))

        def med(rs: list[dict[str, Any]], part: str) -> dict[str, float]:
            keys = {k for r in rs for k in r[part]}
            return {k: statistics.median(r[part].get(k, 0.0) for r in rs) for k in keys}

        def top(d: dict[str, float], k: int = 12) -> dict[str, float | None]:
            return {
                name: _r(v, 1) for name, v in sorted(d.items(), key=lambda x: -x[1])[:k] if v >= 0.1
            }

        out: dict[str, Any] = {
            "note": "self_ms_by_package sums each package's own module bodies (it adds up to "
            "the total); cumulative_ms_of_package is the first import of each "
            "package's top module, including what it pulled in. Profiling inflates "
            "both by some 10-20%."
        }
        for key, rs in runs.items():
            if not rs:
                self.notes.append(f"import profile of {key} skipped: its runs failed")
                continue
            out[key] = {
                "total_ms": _r(statistics.median(r["total"] for r in rs)),
                "modules": int(statistics.median(r["modules"] for r in rs)),
                "self_ms_by_package": top(med(rs, "self_by_root")),
                "cumulative_ms_of_package": top(med(rs, "cumulative_root")),
            }
        self.result["imports"] = out
        hook = next(
            (
                v
                for k, v in out.get("floor", {}).get("cumulative_ms_of_package", {}).items()
                if k.startswith("__editable__")
            ),
            None,
        )
        if hook:
            self.notes.append(
                f"the venv holds an editable install, whose import hook (.pth) costs {hook} ms "
                "of every interpreter start, the floor's included; with `pip install .` the "
                "floor and every figure would be about that much lower, and ratios higher"
            )

    def helper_log(self) -> None:
        """What the helper said on its stderr (its background work reports nowhere else)."""
        if self.helper is None or not self.helper.log.exists():
            return
        lines = self.helper.log.read_text(errors="replace").splitlines()
        warnings = [ln for ln in lines if "WARNING" in ln or "ERROR" in ln]
        examples: dict[str, str] = {}
        kinds: Counter[str] = Counter()
        for line in warnings:
            shape = re.sub(r"'[^']*'|/v1/kv/\S+|\d+(\.\d+)?", "_", line)  # any pool alike
            kinds[shape] += 1
            examples.setdefault(shape, line)
        self.result["helper_log"] = {
            "warnings": len(warnings),
            "kinds": [{"count": n, "example": examples[k]} for k, n in kinds.most_common(8)],
        }
        if warnings:
            self.notes.append(
                f"the helper logged {len(warnings)} warnings/errors, e.g. "
                f"{warnings[0][:200]!r} (see helper_log in the JSON)"
            )

    def profile(self) -> None:
        """cProfile of one in-process ADD (imports done first: the work alone), in the empty
        /24 and in the pool holding 60,000."""
        for pool_key in ("v4", "fill60000"):
            cid = self.cid("prof")
            out = self.tmp / "profile.txt"
            code = (
                "import cProfile, io, pstats, sys\n"
                "import ipam_da_consul.cni.main as m\n"
                "import ipam_da_consul.cni.machine, ipam_da_consul.cni.logs\n"
                "p = cProfile.Profile()\n"
                "code = p.runcall(m.run, False)\n"
                "s = io.StringIO()\n"
                "pstats.Stats(p, stream=s).sort_stats('cumulative').print_stats(25)\n"
                f"open({str(out)!r}, 'w').write(s.getvalue())\n"
                "sys.exit(code)\n"
            )
            pool = f"inproc:{pool_key}"
            env = {**cni_env("ADD", cid), **self.socket_env("inproc")}
            r = run([self.python, "-c", code], env, netconf(self.url, self.pools[pool]))
            self.plugin("inproc", "DEL", pool, cid, prev_of(r))
            if not r.ok or not out.exists():
                self.notes.append(f"in-process profile failed: {r.problem()}")
                continue
            text = out.read_text()
            out.unlink()
            self.result[f"profile_inproc_add_{pool_key}"] = text.splitlines()
            print(f"\ncProfile, one in-process ADD in pool {pool_key}, imports excluded:")
            print(text, flush=True)


def _merge_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One row for the repeated bursts of one mode, pick and host count: the medians of the
    per-burst figures (each burst's own list kept), the counts summed, every problem kept."""

    def median(key: str) -> float | None:
        values = [r[key] for r in rounds if r[key] is not None]
        return _r(statistics.median(values), 2) if values else None

    first = rounds[0]
    return {
        "mode": first["mode"],
        "pick": first["pick"],
        "hosts": first["hosts"],
        "per_host": first["per_host"],
        "bursts": len(rounds),
        "allocated": sum(r["allocated"] for r in rounds),
        "failures": sum(r["failures"] for r in rounds),
        "first_failures": [f for r in rounds for f in r["first_failures"]][:2],
        "duplicate_ips": sorted({ip for r in rounds for ip in r["duplicate_ips"]}),
        "raft_entries": sum(r["raft_entries"] for r in rounds),
        "raft_per_add": median("raft_per_add"),
        "raft_per_add_runs": [r["raft_per_add"] for r in rounds],
        "wall_ms": median("wall_ms"),
        "allocations_per_s": median("allocations_per_s"),
        "allocations_per_s_runs": [r["allocations_per_s"] for r in rounds],
        "del_failures": sum(r["del_failures"] for r in rounds),
        "left_after_del": max(r["left_after_del"] for r in rounds),
    }


def _ips(r: Run) -> list[dict[str, Any]] | None:
    if not r.ok:
        return None
    try:
        ips = json.loads(r.stdout)["ips"]
    except (ValueError, KeyError, TypeError):
        return None
    return ips if isinstance(ips, list) and ips else None


def _ip_of(r: Run) -> str | None:
    ips = _ips(r)
    return str(ips[-1].get("address", "")).split("/")[0] or None if ips else None


def parse_calls(path: Path, offset: int = 0) -> list[dict[str, Any]]:
    """The calls' records of a JSON verbose log from `offset` on (cni/logs.py)."""
    if not path.exists():
        return []
    with open(path, "rb") as fh:
        fh.seek(offset)
        text = fh.read().decode(errors="replace")
    calls = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line of another format: not a record
        if isinstance(record, dict) and record.get("event") == "call":
            calls.append(record)
    return calls


def requests_of(call: dict[str, Any]) -> list[tuple[str, float]]:
    """(kind, ms) of each Consul request a call's record holds."""
    return [
        (request_kind(r["method"], r["path"]), float(r["ms"]))
        for r in call.get("consul_requests") or []
    ]


def request_kind(method: str, url: str) -> str:
    path = re.sub(r"^[a-z]+://[^/]+", "", url).split("?")[0]
    if path.startswith("/v1/kv/"):
        key = path[len("/v1/kv/") :]
        parts = key.rstrip("/").split("/")
        if len(parts) >= 3:
            shape = "<pool>/<ip>"
        elif key.endswith("/"):
            shape = "<pool>/"
        else:
            shape = "<pool>"
        return f"{method} /v1/kv/{parts[0]}/{shape}"
    return f"{method} {path}"


def parse_importtime(stderr: bytes) -> dict[str, Any]:
    total = 0.0
    modules = 0
    self_by_root: dict[str, float] = defaultdict(float)
    cumulative_root: dict[str, float] = {}
    for line in stderr.decode(errors="replace").splitlines():
        m = IMPORT_LINE.match(line)
        if not m:
            continue
        own, cum, indent, name = int(m[1]) / 1000, int(m[2]) / 1000, len(m[3]), m[4]
        modules += 1
        self_by_root[name.split(".")[0]] += own
        if indent <= 1:  # importtime indents nested imports by two more spaces per level
            total += cum
        if "." not in name:
            cumulative_root.setdefault(name, cum)
    return {
        "total": total,
        "modules": modules,
        "self_by_root": dict(self_by_root),
        "cumulative_root": cumulative_root,
    }
