"""Many hosts on one Consul: what an allocation costs the servers as the fleet grows (issue 20).

    .venv/bin/python bench/bench.py --only fleet [--fleet-hosts 64,256] [--fleet-rates 1,10,100]
                                    [--fleet-seconds 30] [--fleet-quiet 70] [--fleet-pool 60000]

One Consul server agent holds one /16 pool filled with `--fleet-pool` allocations. Simulated
hosts keep the pool exactly as a helper does: each is the helper's own code (a `PoolCaches`
with its pool watchers, its state folder) instantiated in this process, and each call runs the
helper's `execute` (the state machine, the helper's caches), so each host issues exactly the
requests a helper on a real host issues. What Consul sends is counted per host and per kind
(calls, and the background watchers) in the transport every request goes through
(consul/requests_transport.py), each host reaching Consul under its own URL user-info, which
Consul ignores. Consul's own CPU is read from /proc; its Raft log index from /v1/agent/self.

Phases per host count: the fleet starts (every host allocates once, so its watchers run), a
quiet window (no call: what a host costs when nothing happens), then a window per rate with
ADDs and DELs at that rate, spread over random hosts. A real helper process with the pool
kept gives the helper's memory. Then the per-host costs are extrapolated to 1,000 and 5,000
hosts with the formula printed.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import random
import statistics
import threading
import time
from collections import defaultdict, deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ipam_da_consul.consul import requests_transport

from tests.support.agent import ConsulAgent

POOL_SUBNET = "10.50.0.0/16"
STRIPES = 256  # /24 stripes of the /16
WATCH_KINDS = ("call", "watch")
_local = threading.local()


@dataclass
class Tally:
    requests: int = 0
    received: int = 0  # bytes Consul sent: status line, headers, body
    sent: int = 0  # bytes of our requests (approximate: path, query, body)
    blocking: int = 0  # blocking queries (a watcher's wait; each return is a wake or a timeout)


@dataclass
class Meter:
    """What Consul sends each simulated host, by kind: the host's calls, or its watchers."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    tally: dict[tuple[str, str], Tally] = field(default_factory=lambda: defaultdict(Tally))

    def snapshot(self) -> dict[tuple[str, str], Tally]:
        with self.lock:
            return {
                k: Tally(v.requests, v.received, v.sent, v.blocking)
                for k, v in self.tally.items()
            }


@contextlib.contextmanager
def counting(meter: Meter) -> Iterator[None]:
    """Every request of this process, counted by the host in its server URL's user-info."""
    real = requests_transport.RequestsTransport.send

    def send(self: Any, server: str, method: str, path: str, params: Any, body: Any,
             **kw: Any) -> Any:
        answer = real(self, server, method, path, params, body, **kw)
        host = server.split("//", 1)[1].split("@", 1)[0] if "@" in server else "-"
        kind = getattr(_local, "kind", "watch")
        size = 15 + sum(len(k) + len(v) + 4 for k, v in answer.headers.items()) + len(answer.body)
        with meter.lock:
            t = meter.tally[(host, kind)]
            t.requests += 1
            t.received += size
            t.sent += len(path) + len(str(params or "")) + len(body or b"") + 100
            t.blocking += bool(params and "index" in params)
        return answer

    requests_transport.RequestsTransport.send = send  # type: ignore[method-assign]
    try:
        yield
    finally:
        requests_transport.RequestsTransport.send = real  # type: ignore[method-assign]


class SimHost:
    """One host: the helper's caches (with their pool watchers) and state folder."""

    def __init__(self, index: int, url: str, tmp: Path) -> None:
        from ipam_da_consul.cni.compose import watch_kv
        from ipam_da_consul.cni.helper.caches import PoolCaches
        from ipam_da_consul.cni.state import open_state

        self.name = f"h{index}"
        scheme, rest = url.split("//", 1)
        self.url = f"{scheme}//{self.name}@{rest}"
        self.caches = PoolCaches(1.0, make_kv=watch_kv)
        self.state = open_state(str(tmp / self.name))
        self.caches.state = self.state
        self.live: deque[tuple[str, bytes]] = deque()
        self.lock = threading.Lock()

    def conf(self, pool: str) -> bytes:
        return json.dumps({
            "cniVersion": "1.0.0", "name": "fleetnet",
            "ipam": {"type": "ipam-da-consul", "consul_servers": [self.url],
                     "pools": [{"name": pool}], "host": self.name},
        }).encode()

    def call(self, command: str, container: str, stdin: bytes) -> tuple[str, int]:
        from ipam_da_consul.cni.main import execute

        env = {"CNI_COMMAND": command, "CNI_CONTAINERID": container, "CNI_IFNAME": "eth0",
               "CNI_NETNS": "/var/run/netns/fleet", "CNI_PATH": "/opt/cni/bin"}
        _local.kind = "call"
        try:
            return execute(stdin, env, self.caches, started=time.monotonic(), state=self.state)
        finally:
            _local.kind = "watch"

    def close(self) -> None:
        for cache in list(self.caches.caches.values()):
            cache.close()
        self.state.close()


def consul_cpu_s(agent: ConsulAgent) -> float:
    assert agent.proc is not None
    fields = Path(f"/proc/{agent.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def raft_index(agent: ConsulAgent) -> int:
    resp = agent.http.get(f"{agent.url}/v1/agent/self", timeout=10)
    resp.raise_for_status()
    return int(resp.json()["Stats"]["raft"]["last_log_index"])


@dataclass
class Window:
    name: str
    hosts: int
    rate: float
    seconds: float
    adds: int = 0
    add_failures: int = 0
    dels: int = 0
    del_failures: int = 0
    raft: int = 0
    cpu_s: float = 0.0
    call: Tally = field(default_factory=Tally)
    watch: Tally = field(default_factory=Tally)
    failures: list[str] = field(default_factory=list)

    @property
    def pairs(self) -> float:
        """Containers added and deleted: each costs an ADD and a DEL."""
        return (self.adds + self.dels) / 2

    def row(self) -> dict[str, Any]:
        per_host = max(1, self.hosts) * self.seconds
        allocs = max(1.0, self.pairs)
        return {
            "window": self.name, "hosts": self.hosts, "rate_target": self.rate,
            "seconds": round(self.seconds, 1),
            "adds": self.adds, "add_failures": self.add_failures,
            "dels": self.dels, "del_failures": self.del_failures,
            "allocations_per_s": round(self.adds / self.seconds, 2),
            "bytes_per_s_per_host": round((self.call.received + self.watch.received) / per_host),
            "watch_bytes_per_s_per_host": round(self.watch.received / per_host),
            "requests_per_s_per_host": round(
                (self.call.requests + self.watch.requests) / per_host, 3),
            "consul_bytes_per_s": round((self.call.received + self.watch.received)
                                        / self.seconds),
            "consul_cpu_per_s": round(self.cpu_s / self.seconds, 4),
            "consul_cpu_ms_per_allocation": round(1000 * self.cpu_s / allocs, 2)
            if self.adds else None,
            "call_bytes_per_allocation": round(self.call.received / allocs) if self.adds else None,
            "watch_bytes_per_allocation": round(self.watch.received / allocs)
            if self.adds else None,
            "raft_entries_per_add_and_del": round(self.raft / allocs, 3) if self.adds else None,
            "blocking_queries_per_s_per_host": round(self.watch.blocking / per_host, 4),
            "first_failures": self.failures[:3],
        }


class Fleet:
    def __init__(self, agent: ConsulAgent, tmp: Path, pool: str, log: Any) -> None:
        self.agent, self.tmp, self.pool, self.log = agent, tmp, pool, log
        self.meter = Meter()
        self.hosts: list[SimHost] = []
        self.counter = 0
        self.rng = random.Random(20)

    def grow(self, n: int) -> None:
        """Hosts up to `n`, each with one allocation: its stripe watcher runs from then on, and
        it knows where it found room (a packed pool's full home stripe costs a host one listing
        of the pool's key names, once). A first ADD that fails (its time budget spent on a
        loaded machine) is tried again, so the windows measure warm hosts, as a fleet is but
        for its first minute."""

        def first(host: SimHost) -> None:
            for _ in range(5):
                if self.add(host)[0]:
                    return
            raise RuntimeError(f"{host.name}: no first allocation in 5 tries")

        with ThreadPoolExecutor(4) as pool:
            new = [SimHost(i, self.agent.url, self.tmp) for i in range(len(self.hosts), n)]
            self.hosts += new
            list(pool.map(first, new))

    def container(self) -> str:
        self.counter += 1
        return f"fleet-{self.counter}"

    def add(self, host: SimHost) -> tuple[bool, str]:
        cid = self.container()
        stdin = host.conf(self.pool)
        out, code = host.call("ADD", cid, stdin)
        if code == 0:
            with host.lock:
                host.live.append((cid, stdin))
            return True, ""
        return False, out[:300]

    def delete(self, host: SimHost) -> tuple[bool, str] | None:
        with host.lock:
            if len(host.live) <= 1:  # keep one, so the host's watcher stays
                return None
            cid, stdin = host.live.popleft()
        out, code = host.call("DEL", cid, stdin)
        return (code == 0, out[:300])

    def window(self, name: str, rate: float, seconds: float) -> Window:
        w = Window(name, len(self.hosts), rate, seconds)
        before, cpu0, raft0 = self.meter.snapshot(), consul_cpu_s(self.agent), raft_index(
            self.agent)
        began = time.monotonic()
        if rate > 0:
            self.drive(w, rate, seconds)
        else:
            time.sleep(seconds)
        w.seconds = time.monotonic() - began
        after, w.cpu_s = self.meter.snapshot(), consul_cpu_s(self.agent) - cpu0
        w.raft = raft_index(self.agent) - raft0
        for (host, kind), t in after.items():
            b = before.get((host, kind), Tally())
            target = w.call if kind == "call" else w.watch
            target.requests += t.requests - b.requests
            target.received += t.received - b.received
            target.sent += t.sent - b.sent
            target.blocking += t.blocking - b.blocking
        return w

    def drive(self, w: Window, rate: float, seconds: float) -> None:
        """ADDs and DELs at `rate` each, on random hosts, from a pool of threads."""
        lock = threading.Lock()

        def one(kind: str) -> None:
            host = self.rng.choice(self.hosts)
            if kind == "add":
                ok, why = self.add(host)
                with lock:
                    w.adds += 1
                    w.add_failures += not ok
                    if not ok:
                        w.failures.append(why)
            else:
                done = self.delete(host)
                if done is not None:
                    with lock:
                        w.dels += 1
                        w.del_failures += not done[0]
                        if not done[0]:
                            w.failures.append(done[1])

        end = time.monotonic() + seconds
        step = 1.0 / rate
        with ThreadPoolExecutor(max(4, min(64, int(rate * 2)))) as pool:
            tick = time.monotonic()
            while tick < end:
                pool.submit(one, "add")
                pool.submit(one, "del")
                tick += step
                time.sleep(max(0.0, tick - time.monotonic()))

    def check(self) -> list[str]:
        """No address held twice, no container with two keys."""
        keys = self.agent.http.get(f"{self.agent.url}/v1/kv/ipam/{self.pool}/",
                                   params={"recurse": "true"}, timeout=60).json()
        targets: dict[str, int] = defaultdict(int)
        import base64

        for e in keys:
            if e["Key"].endswith("/"):
                continue
            value = json.loads(base64.b64decode(e.get("Value") or b"e30="))
            targets[value.get("target", "?")] += 1
        return [f"{t} holds {n} keys" for t, n in targets.items() if n > 1]

    def close(self) -> None:
        for h in self.hosts:
            h.close()


def helper_rss(agent: ConsulAgent, pool: str, tmp: Path) -> dict[str, Any]:
    """A real ipam-da-consul-helper keeping the pool (its home stripe), after a few calls."""
    from bench.runner import Helper, proc_status_kb, run
    from bench.scenarios import netconf as bench_conf
    from tests.support.plugin import executable

    helper = Helper(tmp, "fleet-helper")
    try:
        env_extra = {**helper.env, "IPAM_DA_CONSUL_HELPER_ACK_TIMEOUT": "30"}
        from bench.runner import cni_env

        for i in range(5):
            env = {**cni_env("ADD", f"rss-{i}"), **env_extra}
            run([executable("ipam-da-consul")], env, bench_conf(agent.url, pool))
        time.sleep(2)
        rss = proc_status_kb(helper.pid, "VmRSS")
        hwm = proc_status_kb(helper.pid, "VmHWM")
    finally:
        helper.close()
    return {"rss_kib": rss, "peak_kib": hwm}


def extrapolate(idle: Window, quiets: list[Window], busy: list[Window]) -> dict[str, Any]:
    """Per-host costs to 1,000 and 5,000 hosts, with the formula in `formula`."""
    quiet = max(quiets, key=lambda w: w.hosts)
    idle_cpu = idle.cpu_s / idle.seconds
    q_bytes = (quiet.call.received + quiet.watch.received) / (quiet.hosts * quiet.seconds)
    q_cpu = max(0.0, quiet.cpu_s / quiet.seconds - idle_cpu) / quiet.hosts
    q_blocking = quiet.watch.blocking / (quiet.hosts * quiet.seconds)
    out: dict[str, Any] = {
        "formula": (
            "bytes/s(N, R) = N*q + R*(a + 2*(1 + (N-1)/S)*b); "
            "CPU/s(N, R) = idle + N*c_q + R*(c_a + 2*(1 + (N-1)/S)*c_b). "
            "q, c_q: what one quiet host costs (bytes/s, CPU s/s; idle: Consul with no host); "
            "a: bytes Consul sends the calling host per ADD+DEL; b: bytes per wake of a stripe "
            "watcher (its key names listing and the new keys' values); each ADD and each DEL "
            "writes a key of one stripe and wakes its watchers: the writer's own and, with N "
            "hosts over S stripes (256 /24s of the /16), (N-1)/S others; c_a, c_b: Consul CPU "
            "per ADD+DEL and per wake, fitted to the measured windows"
        ),
        "idle_cpu_per_s": round(idle_cpu, 4),
        "quiet_bytes_per_s_per_host": round(q_bytes, 1),
        "quiet_cpu_per_s_per_host": round(q_cpu, 6),
        "rows": [],
        "fit": [],
    }
    samples = []  # (pairs/s, wakes/s, CPU s/s beyond idle and quiet hosts)
    wake_bytes = []
    call_bytes = []
    for w in busy:
        if not w.pairs:
            continue
        wakes = max(0.0, w.watch.blocking - q_blocking * w.hosts * w.seconds)
        extra = max(0.0, w.watch.received - q_bytes * w.hosts * w.seconds)
        if wakes:
            wake_bytes.append(extra / wakes)
        call_bytes.append(w.call.received / w.pairs)
        cpu = max(0.0, w.cpu_s / w.seconds - idle_cpu - q_cpu * w.hosts)
        samples.append((w.pairs / w.seconds, wakes / w.seconds, cpu))
        out["fit"].append({
            "hosts": w.hosts, "pairs_per_s": round(w.pairs / w.seconds, 2),
            "wakes_per_write": round(wakes / (2 * w.pairs), 3),
            "expected_wakes_per_write": round(1 + (w.hosts - 1) / STRIPES, 3),
            "bytes_per_wake": round(extra / wakes) if wakes else None,
        })
    if not samples:
        return out
    a = statistics.median(call_bytes)
    b = statistics.median(wake_bytes) if wake_bytes else 0.0
    c_a, c_b = _fit(samples)
    out.update(a_bytes=round(a), b_bytes=round(b), c_a_ms=round(1000 * c_a, 3),
               c_b_ms=round(1000 * c_b, 3))
    for n in (64, 256, 1000, 5000):
        for rate in (1.0, 10.0, 100.0):
            wakes = 2 * (1 + (n - 1) / STRIPES)
            out["rows"].append({
                "hosts": n, "rate": rate,
                "leader_bytes_per_s": round(n * q_bytes + rate * (a + wakes * b)),
                "leader_cpu_cores": round(idle_cpu + n * q_cpu + rate * (c_a + wakes * c_b), 3),
            })
    return out


def _fit(samples: list[tuple[float, float, float]]) -> tuple[float, float]:
    """Least squares of cpu = pairs*c_a + wakes*c_b over the windows (both >= 0)."""
    sxx = sum(p * p for p, _, _ in samples)
    syy = sum(w * w for _, w, _ in samples)
    sxy = sum(p * w for p, w, _ in samples)
    sxc = sum(p * c for p, _, c in samples)
    syc = sum(w * c for _, w, c in samples)
    det = sxx * syy - sxy * sxy
    if abs(det) > 1e-12:
        c_a = (sxc * syy - syc * sxy) / det
        c_b = (syc * sxx - sxc * sxy) / det
        if c_a >= 0 and c_b >= 0:
            return c_a, c_b
    # Not separable (one host count, or noise): all of it per ADD+DEL, none per wake.
    return (sxc / sxx if sxx else 0.0), 0.0


def run_fleet(agent: ConsulAgent, tmp: Path, args: Any, log: Any) -> dict[str, Any]:
    from loguru import logger

    logger.remove()
    logger.add(lambda m: None, level="ERROR")  # the simulated helpers' own lines: not here
    pool = agent.create_pool("fleet", [{"subnet": POOL_SUBNET}])
    started = time.monotonic()
    agent.fill_pool(pool, ipaddress.IPv4Address("10.50.0.1"), args.fleet_pool)
    log(f"fleet: pool {pool} filled with {args.fleet_pool} in {time.monotonic() - started:.0f} s")
    result: dict[str, Any] = {"pool_allocations": args.fleet_pool, "windows": []}
    windows: list[Window] = []
    meter_fleet = Fleet(agent, tmp / "fleet", pool, log)
    with counting(meter_fleet.meter):
        try:
            idle = meter_fleet.window("idle", 0, min(20.0, args.fleet_quiet))
            log(f"fleet: Consul with no host: {idle.cpu_s / idle.seconds:.4f} CPU s/s")
            for hosts in args.fleet_hosts:
                t, before, added = time.monotonic(), meter_fleet.meter.snapshot(), len(
                    meter_fleet.hosts)
                meter_fleet.grow(hosts)
                got = sum(
                    v.received - before.get(k, Tally()).received
                    for k, v in meter_fleet.meter.snapshot().items()
                    if k[1] == "call"
                )
                started_bytes = got / max(1, hosts - added)
                result.setdefault("first_add_bytes_per_host", []).append(round(started_bytes))
                log(f"fleet: {hosts} hosts up in {time.monotonic() - t:.0f} s; "
                    f"a new host's first ADD: {started_bytes / 1e6:.2f} MB from Consul")
                w = meter_fleet.window("quiet", 0, args.fleet_quiet)
                windows.append(w)
                log(f"fleet: quiet, {hosts} hosts: {w.row()}")
                for rate in args.fleet_rates:
                    w = meter_fleet.window(f"rate {rate:g}/s", rate, args.fleet_seconds)
                    windows.append(w)
                    log(f"fleet: {hosts} hosts at {rate:g}/s: {w.row()}")
            result["duplicates"] = meter_fleet.check()
        finally:
            meter_fleet.close()
    result["windows"] = [w.row() for w in windows]
    result["extrapolation"] = extrapolate(
        idle, [w for w in windows if w.rate == 0], [w for w in windows if w.rate > 0]
    )
    result["helper_memory"] = helper_rss(agent, pool, tmp)
    result["goals"] = goals(result)
    return result


def goals(result: dict[str, Any]) -> list[str]:
    out = []
    ex = result["extrapolation"]
    rows = [r for r in ex.get("rows", []) if r["hosts"] == 1000 and r["rate"] == 100.0]
    if rows:
        worst = max(rows, key=lambda r: r["leader_bytes_per_s"])
        ok = worst["leader_bytes_per_s"] <= 10e6
        mb = worst["leader_bytes_per_s"] / 1e6
        out.append(f"1,000 hosts, 100 allocations/s: leader sends {mb:.2f} MB/s "
                   f"(<= 10 MB/s): {'met' if ok else 'MISSED'}")
        cpu = max(r["leader_cpu_cores"] for r in rows)
        out.append(f"1,000 hosts, 100 allocations/s: leader CPU {cpu:.2f} cores (<= 1): "
                   f"{'met' if cpu <= 1 else 'MISSED'}")
    q = ex["quiet_bytes_per_s_per_host"]
    out.append(f"quiet pool: {q:.0f} B/s per host (<= 1 KB/s): {'met' if q <= 1024 else 'MISSED'}")
    rss = result["helper_memory"].get("rss_kib") or 0
    out.append(f"helper memory with one {result['pool_allocations']}-allocation pool: "
               f"{rss / 1024:.1f} MiB (<= 64 MiB): {'met' if rss <= 64 * 1024 else 'MISSED'}")
    dup = result.get("duplicates") or []
    out.append(f"no container with two keys after the run: {'met' if not dup else dup[:3]}")
    return out
