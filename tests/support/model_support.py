"""Harness for tests/e2e/test_model.py: network configs, simulated hosts with their helpers, calls
run as real processes (alone, together, or around a fault), and a reading of the allocation
keys straight from Consul's KV.

Nothing here knows the plugin's internals: every call is the installed `ipam-da-consul`
executable with the config on stdin, as a runtime runs it.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.agent import ConsulAgent
from tests.support.util_procs import Call, Done, Helper, LossyProxy, run_one

# Short budgets so that every fault resolves within a few seconds.
TIMEOUT = 6.0  # timeout caps the whole call: the rollback reserve (1.5 s) comes out of it
IPAM_TIMEOUTS = {"timeout": TIMEOUT, "consul_read_timeout": 2, "consul_connect_timeout": 1}
# A call with its helper paused must end by its deadline (11) or fall back in-process within
# ~1 s; either way it is over within the budget plus interpreter start-up on 2 busy cores
# (generous: a call that waits for SIGCONT is what this catches).
PAUSE_BOUND = TIMEOUT + 4.0
# How long the helper stays stopped at most (SIGCONT comes earlier when the call returns).
PAUSE_LIMIT = PAUSE_BOUND + 1.0
# Harness guard only: no call may run longer than this (a hang is reported, not waited out).
CALL_GUARD = 45.0

# Pools by role; each example of the model gets its own copies (names suffixed), so the
# helpers' caches and the keys of earlier examples never meet the current one.
RANGES: dict[str, list[dict[str, str]]] = {
    "shared": [
        {
            "subnet": "10.60.0.0/24",
            "rangeStart": "10.60.0.10",
            "rangeEnd": "10.60.0.250",
            "gateway": "10.60.0.1",
        },
        # IPv4-mapped IPv6, after the IPv4 range (so only static requests reach it): the family
        # whose text Python 3.11 (`::ffff:a3c:114`) and 3.13 (`::ffff:10.60.1.20`) spell apart.
        {
            "subnet": "::ffff:10.60.1.0/120",
            "rangeStart": "::ffff:10.60.1.10",
            "rangeEnd": "::ffff:10.60.1.250",
        },
    ],
    # IPv6: other tools write upper case or the uncompressed form (`FD00:62::10`).
    "v6": [{"subnet": "fd00:62::/120", "rangeStart": "fd00:62::10", "rangeEnd": "fd00:62::fa"}],
    "a": [
        {
            "subnet": "10.61.0.0/24",
            "rangeStart": "10.61.0.10",
            "rangeEnd": "10.61.0.250",
            "gateway": "10.61.0.1",
        }
    ],
    # "b" is never created: the pool a config lists but KV does not have.
}
# Network name -> pool roles, in the order the config lists them.
NETWORKS: dict[str, list[str]] = {
    "net-a": ["shared", "v6"],
    "net-b": ["shared", "a"],
    "net-c": ["a"],
    "net-x": ["a", "b"],  # b is missing: every ADD must fail (114) and leave nothing
}
GOOD_NETWORKS = ["net-a", "net-b", "net-c"]
HOSTS = ["h1", "h2"]
IFNAMES = ["eth0", "eth1"]


def ranges_hold(role: str, ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    for r in RANGES.get(role, []):
        if addr in ipaddress.ip_network(r["subnet"]):
            lo = ipaddress.ip_address(r["rangeStart"])
            hi = ipaddress.ip_address(r["rangeEnd"])
            if int(lo) <= int(addr) <= int(hi):  # one IP version: all of them in the subnet
                return True
    return False


def netconf11(
    consul_url: str | list[str],
    name: str,
    pools: list[str | dict[str, Any]],
    host: str,
    prev: dict[str, Any] | None = None,
    valid: list[tuple[str, str]] | None = None,
    **ipam: Any,
) -> dict[str, Any]:
    """A CNI 1.1.0 standalone config (ipam-da-consul directly under bridge); `ipam` adds or
    overrides settings."""
    servers = consul_url if isinstance(consul_url, list) else [consul_url]
    conf: dict[str, Any] = {
        "cniVersion": "1.1.0",
        "name": name,
        "type": "bridge",
        "ipam": {
            "type": "ipam-da-consul",
            "consul_servers": servers,
            # A name, or a whole Pool object (one with its own "requested_ip").
            "pools": [p if isinstance(p, dict) else {"name": p} for p in pools],
            "host": host,
            **IPAM_TIMEOUTS,
            **ipam,
        },
    }
    if prev is not None:
        conf["prevResult"] = prev
    if valid is not None:
        conf["cni.dev/valid-attachments"] = [{"containerID": c, "ifname": i} for c, i in valid]
    return conf


def result_addresses(result: dict[str, Any]) -> list[str]:
    return [canonical(ipaddress.ip_interface(i["address"]).ip) for i in result.get("ips", [])]


# -- spellings of one address ------------------------------------------------------------------

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def canonical(ip: str | Address) -> str:
    """RFC 5952 text, the one spelling the plugin writes (and upstream's): Python before 3.13
    spells an IPv4-mapped address `::ffff:a3c:114`, RFC 5952 `::ffff:10.60.1.20`. Written here
    from the RFC, not taken from the plugin, so that the test checks the plugin's spelling."""
    addr = ipaddress.ip_address(ip) if isinstance(ip, str) else ip
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return f"::ffff:{addr.ipv4_mapped}"
    return str(addr)


def other_spellings(ip: str) -> list[str]:
    """How other writers spell the address: what Python before 3.13 prints for a mapped one,
    upper case, the uncompressed form (a hand-written `consul kv put`). None for IPv4, which
    has one spelling."""
    addr = ipaddress.ip_address(ip)
    if addr.version == 4:
        return []
    names = [str(addr), str(addr).upper(), addr.exploded, addr.exploded.upper()]
    if addr.ipv4_mapped is not None:
        names.append(canonical(addr).upper())
    out: list[str] = []
    for name in names:
        if name != canonical(addr) and name not in out:
            out.append(name)
    return out


# -- KV ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    pool: str  # the pool's real name in KV
    ip: str
    value: Any  # decoded JSON, or {"__raw__": text} when not JSON

    @property
    def addr(self) -> str:
        """The address, whatever the key's spelling."""
        return canonical(self.ip)

    @property
    def target(self) -> str | None:
        return self.value.get("target") if isinstance(self.value, dict) else None

    @property
    def ifname(self) -> str | None:
        return self.value.get("ifname") if isinstance(self.value, dict) else None

    @property
    def host(self) -> str | None:
        return self.value.get("host") if isinstance(self.value, dict) else None

    @property
    def network(self) -> str | None:
        return self.value.get("network") if isinstance(self.value, dict) else None

    def __repr__(self) -> str:
        return f"ipam/{self.pool}/{self.ip}={json.dumps(self.value, sort_keys=True)}"


def allocation_keys(consul: ConsulAgent, pools: set[str], prefix: str = "ipam/") -> list[Key]:
    """Every allocation key `<prefix><pool>/<ip>` of the given pools; anything else under the
    prefix (pool keys, folder keys, fences under `.fences/`, other pools) is not an allocation."""
    out = []
    for k, v in consul.tree(prefix).items():
        rest = k[len(prefix) :]
        pool, sep, ip = rest.partition("/")
        if not sep or not ip or pool not in pools or "/" in ip:
            continue
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            continue  # not named after an address: not an allocation (a marker, a fence)
        try:
            value = json.loads(v)
        except ValueError:
            value = {"__raw__": v.decode(errors="replace")}
        out.append(Key(pool, ip, value))
    return sorted(out, key=lambda key: (key.pool, _order(key.ip)))


def _order(ip: str) -> tuple[int, int, str]:
    addr = ipaddress.ip_address(ip)
    return addr.version, int(addr), ip


# -- helpers (one per simulated host) --------------------------------------------------------


# -- per-host clocks ---------------------------------------------------------------------------

FAKETIME_LIB = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"
HAVE_FAKETIME = os.path.exists(FAKETIME_LIB)
# Where each simulated host's wall clock starts, in hours from the real one: h1 ahead, h2
# behind, five hours apart (more than any "an hour ago" a design might reason with).
CLOCK_START = {"h1": 3, "h2": -2}
# libfaketime keeps the offset it read for FAKETIME_CACHE_DURATION (1 s), counted in whole seconds
# of the real clock and expired only once more than that has passed: a running helper follows a
# step within this.
CLOCK_FOLLOW = 2.0

# libfaketime 0.9.10 (Debian 12) shifts the absolute CLOCK_MONOTONIC deadline given to
# clock_nanosleep() by the faked offset even with FAKETIME_DONT_FAKE_MONOTONIC=1 (upstream issue
# 426, fixed after 0.9.10), and Python 3.11's time.sleep() sleeps that way: it fails with EINVAL.
# A real clock step never does that, so the faked processes sleep the same monotonic duration
# through select(), which libfaketime passes through untouched (it only scales timeouts when a
# rate is set). Nothing else changes: the plugin's clocks are libfaketime's.
_SLEEP_SHIM = """\
import select as _select
import time as _time


def _sleep(secs, _wait=_select.select, _now=_time.monotonic):
    if secs < 0:
        raise ValueError("sleep length must be non-negative")
    end = _now() + secs
    while True:
        left = end - _now()
        if left <= 0:
            return
        _wait([], [], [], left)


_time.sleep = _sleep
"""


class HostClock:
    """A simulated host's wall clock: libfaketime, preloaded into every process of the host (its
    plugin calls and its helper), reads the offset from a file, so a step reaches the running
    helper too. CLOCK_MONOTONIC and CLOCK_BOOTTIME stay real (FAKETIME_DONT_FAKE_MONOTONIC; the
    call deadlines and the fence sessions' periods use them): what an NTP step does."""

    def __init__(self, directory: Path, hours: int) -> None:
        self.directory = directory
        self.hours = hours
        directory.mkdir(parents=True, exist_ok=True)
        self.file = directory / "offset"
        self.shim = directory / "shim"
        self.shim.mkdir(exist_ok=True)
        (self.shim / "sitecustomize.py").write_text(_SLEEP_SHIM)
        self.set(hours)

    def set(self, hours: int) -> None:
        self.hours = hours
        # A new file renamed over the old one: a process reading it never sees it half written.
        tmp = self.file.with_suffix(".new")
        tmp.write_text(f"{hours:+d}h\n")
        os.replace(tmp, self.file)

    @property
    def env(self) -> dict[str, str]:
        path = [str(self.shim), *filter(None, [os.environ.get("PYTHONPATH")])]
        preload = [FAKETIME_LIB, *filter(None, [os.environ.get("LD_PRELOAD")])]
        return {
            "LD_PRELOAD": " ".join(preload),
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",
            "FAKETIME_TIMESTAMP_FILE": str(self.file),
            "FAKETIME_CACHE_DURATION": "1",
            "PYTHONPATH": os.pathsep.join(path),
        }


class HostHelper:
    """A simulated host's `ipam-da-consul-helper`: running, paused (SIGSTOP) or killed. With a
    `clock_hours`, the host's processes (helper and in-process calls) run on a clock that many
    hours off (libfaketime; without it, on the real clock)."""

    def __init__(self, directory: Path, clock_hours: int | None = None) -> None:
        self.directory = directory
        # The state folder is made by whoever uses it first, but only inside a folder that
        # exists: the plugin checks every ancestor's owner and mode before it creates anything.
        directory.mkdir(parents=True, exist_ok=True)
        self.clock = (
            HostClock(directory / "clock", clock_hours)
            if clock_hours is not None and HAVE_FAKETIME
            else None
        )
        self.helper: Helper | None = None
        self.paused = False
        self.start()

    def start(self) -> None:
        env = {**os.environ, **self.clock.env} if self.clock else None
        self.helper = Helper(self.directory, env=env)
        self.paused = False

    @property
    def alive(self) -> bool:
        return self.helper is not None and self.helper.proc.poll() is None

    @property
    def socket(self) -> str:
        return str(self.directory / "run" / "helper.sock")

    @property
    def env(self) -> dict[str, str]:
        # A killed helper leaves its socket file behind: calls find nobody listening there,
        # exactly as on a host whose helper crashed.
        return {"IPAM_DA_CONSUL_SOCKET": self.socket, **self.host_env}

    @property
    def host_env(self) -> dict[str, str]:
        """An in-process call on this host: the host's state folder, shared with its helper,
        and the host's clock."""
        clock = self.clock.env if self.clock else {}
        return {"IPAM_DA_CONSUL_STATE_DIR": str(self.directory / "state"), **clock}

    def step_clock(self, hours: int) -> None:
        assert self.clock is not None
        self.clock.set(self.clock.hours + hours)

    def pending(self) -> list[str]:
        """The host's state entries with work left (a DEL taken over, a write to void)."""
        folder = self.directory / "state" / "pending"
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []

    def pause(self) -> None:
        assert self.helper is not None and self.alive
        os.kill(self.helper.proc.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        if self.helper is not None and self.paused and self.alive:
            os.kill(self.helper.proc.pid, signal.SIGCONT)
        self.paused = False

    def kill(self) -> None:
        assert self.helper is not None
        self.resume()
        self.helper.proc.kill()
        self.helper.proc.wait()

    def ensure_running(self) -> None:
        self.resume()
        if not self.alive:
            self.start()

    def close(self) -> None:
        self.resume()
        if self.helper is not None:
            self.helper.close()


# -- running calls ----------------------------------------------------------------------------


@dataclass
class Running:
    """One call started in a thread (its own process); `wait()` gives its Done."""

    call: Call
    thread: threading.Thread
    box: dict[str, Any] = field(default_factory=dict)

    def wait(self, timeout: float | None = None) -> Done | None:
        self.thread.join(timeout)
        if self.thread.is_alive():
            return None
        if "error" in self.box:
            raise self.box["error"]
        return self.box["done"]


def start_call(call: Call, gate: threading.Event | None = None, delay: float = 0.0) -> Running:
    """Run `call` in a thread: once `gate` is set (if any), `delay` seconds later."""
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            if delay:
                if gate is not None:
                    gate.wait()
                time.sleep(delay)
            box["done"] = run_one(call, gate)
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return Running(call, thread, box)


def run_together(calls: list[Call], delays: list[float] | None = None) -> list[Done]:
    """Start every call at the same moment, one process each, released by one Event (or each
    its `delays` seconds after that moment)."""
    gate = threading.Event()
    delays = delays or [0.0] * len(calls)
    running = [start_call(c, gate, d) for c, d in zip(calls, delays, strict=True)]
    time.sleep(0.02)  # every thread is parked on the gate
    gate.set()
    done = []
    for r in running:
        d = r.wait(CALL_GUARD + 5)
        assert d is not None, f"harness: {r.call.command} did not return"
        done.append(d)
    return done


def brief(done: Done) -> str:
    out = done.stdout.strip().replace("\n", " ")
    if len(out) > 300:
        out = out[:300] + "..."
    return f"rc={done.rc} {done.elapsed:.2f}s {out}"


def slow_listings(consul_url: str, delay: float = 0.4) -> LossyProxy:
    """A relay in front of Consul that holds back the answer to every pool listing (a GET with
    `recurse`, not a blocking query) by `delay`: a slow network or a busy server. Calls started
    together then all read the pool before any of them writes, so their CAS writes collide, the
    interleaving a runtime's parallel attachments hit now and then. Every answer is Consul's own.
    """

    def hold(method: str, path: str) -> bool:
        listing = method == "GET" and path.startswith("/v1/kv/") and "recurse" in path
        if listing and "index=" not in path:
            time.sleep(delay)
        return False  # never drop: only late

    return LossyProxy(consul_url, hold)
