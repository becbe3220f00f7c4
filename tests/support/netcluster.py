"""A three-server Consul cluster in three network namespaces, for partition tests.

Layout (all private to this harness, deleted on close and at the next start if a run was
killed):

    root namespace: bridge `ipdcpartbr` 172.31.250.1/24 (the workers and helpers live here),
                    veths ipdcpartv1..3
    ipdcpart-s1: eth0 172.31.250.11/24   consul server s1 (HTTP 172.31.250.11:8500)
    ipdcpart-s2: eth0 172.31.250.12/24   consul server s2
    ipdcpart-s3: eth0 172.31.250.13/24   consul server s3

Every server is `consul agent -server -bootstrap-expect 3 -retry-join <the others>` bound to its
namespace's address, with `raft_multiplier = 1` so elections take about a second. The nemesis
acts only inside the namespaces (`ip netns exec <ns> iptables ...`) and with signals on the
consul processes this harness started; the root namespace's firewall is never touched.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from tests.support.agent import consul_binary

PREFIX = "ipdcpart"
BRIDGE = f"{PREFIX}br"
# Exactly the names this harness creates: cleanup touches these and nothing else (other tests
# on this machine use names that start alike, e.g. ipdc<pid>b0, ipdcpm<pid>).
NAMESPACES = tuple(f"{PREFIX}-s{i}" for i in (1, 2, 3))
LINKS = (BRIDGE, *(f"{PREFIX}v{i}" for i in (1, 2, 3)))
NET = "172.31.250"
ROOT_IP = f"{NET}.1"
HTTP_PORT = 8500
# Pids of processes this harness started in the root namespace (helpers), so that a run killed
# with SIGKILL can be cleaned up by the next one (processes inside our namespaces are found with
# `ip netns pids`).
STATE = Path(tempfile.gettempdir()) / "ipdc-partition-pids.json"


def sh(*cmd: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=check, timeout=timeout)


def netns_exec(ns: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return sh("ip", "netns", "exec", ns, *cmd, check=check)


def unsupported_reason() -> str | None:
    """Why namespaces + iptables cannot work here, or None."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces, a bridge and iptables rules"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"needs `{tool}` (apt-get install iproute2 iptables)"
    probe = f"{PREFIX}-probe-{os.getpid()}"
    try:
        made = sh("ip", "netns", "add", probe, check=False)
        if made.returncode != 0:
            return f"`ip netns add` fails here: {made.stderr.strip()}"
        rule = netns_exec(probe, "iptables", "-A", "INPUT", "-p", "tcp", "--dport", "1",
                          "-j", "DROP", check=False)
        if rule.returncode != 0:
            return f"iptables does not work inside a namespace: {rule.stderr.strip()}"
    finally:
        sh("ip", "netns", "del", probe, check=False)
    return None


# -- leftovers ------------------------------------------------------------------------------------


def _remember(pid: int) -> None:
    pids = _remembered()
    pids.append(pid)
    STATE.write_text(json.dumps(pids))


def _forget(pid: int) -> None:
    pids = [p for p in _remembered() if p != pid]
    STATE.write_text(json.dumps(pids))


def _remembered() -> list[int]:
    try:
        return [int(p) for p in json.loads(STATE.read_text())]
    except (OSError, ValueError, TypeError):
        return []


def _our_namespaces() -> list[str]:
    out = sh("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines()
            if line.split() and line.split()[0] in NAMESPACES]


DATA_PREFIX = "ipdc-partition-data-"


def cleanup_leftovers(keep: str | None = None) -> list[str]:
    """Remove what a killed run of this harness left: processes in our namespaces, the
    namespaces, the bridge and veths, remembered helper processes, consul data folders (but
    `keep`). Returns what it removed."""
    removed: list[str] = []
    for pid in _remembered():
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            if "ipam-da-consul-helper" in cmdline or "consul" in cmdline:
                os.kill(pid, signal.SIGKILL)
                removed.append(f"process {pid}")
    with contextlib.suppress(OSError):
        STATE.unlink()
    for ns in _our_namespaces():
        for text in sh("ip", "netns", "pids", ns, check=False).stdout.split():
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(text), signal.SIGCONT)
                os.kill(int(text), signal.SIGKILL)
                removed.append(f"process {pid} in {ns}")
        sh("ip", "netns", "del", ns, check=False)
        removed.append(f"netns {ns}")
    for name in LINKS:
        if sh("ip", "link", "show", name, check=False).returncode == 0:
            sh("ip", "link", "del", name, check=False)
            removed.append(f"link {name}")
    for folder in Path(tempfile.gettempdir()).glob(f"{DATA_PREFIX}*"):
        if str(folder) != keep:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(f"folder {folder}")
    return removed


# -- the cluster ----------------------------------------------------------------------------------


@dataclass
class Server:
    index: int
    ns: str
    ip: str
    data_dir: str
    peers: list[str]
    proc: subprocess.Popen[bytes] | None = None
    paused: bool = False
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = Path(self.data_dir) / "agent.log"

    @property
    def name(self) -> str:
        return f"s{self.index}"

    @property
    def url(self) -> str:
        return f"http://{self.ip}:{HTTP_PORT}"

    @property
    def raft_addr(self) -> str:
        return f"{self.ip}:8300"

    def command(self) -> list[str]:
        cmd = ["ip", "netns", "exec", self.ns, consul_binary(), "agent", "-server",
               "-bootstrap-expect", "3", "-node", self.name, "-bind", self.ip,
               "-client", self.ip, "-data-dir", self.data_dir, "-ui=false",
               "-dns-port", "-1", "-grpc-port", "-1",
               "-config-file", str(Path(self.data_dir) / "perf.hcl")]
        for peer in self.peers:
            cmd += ["-retry-join", peer]
        return cmd

    def start(self) -> None:
        (Path(self.data_dir) / "perf.hcl").write_text(
            "performance { raft_multiplier = 1 }\nleave_on_terminate = false\n"
        )
        log = open(self.log_path, "ab")  # noqa: SIM115 (kept open for the process's life)
        # `ip netns exec` execs consul: the pid is consul's own, so signals reach it directly.
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT)
        self.paused = False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(sig)
            if sig == signal.SIGSTOP:
                self.paused = True
            elif sig == signal.SIGCONT:
                self.paused = False

    def kill(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGCONT)
                self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        self.proc = None
        self.paused = False

    def iptables(self, *args: str) -> None:
        netns_exec(self.ns, "iptables", "-w", "5", *args)

    def heal(self) -> None:
        netns_exec(self.ns, "iptables", "-w", "5", "-F", "INPUT", check=False)
        netns_exec(self.ns, "iptables", "-w", "5", "-F", "OUTPUT", check=False)


class NetCluster:
    def __init__(self) -> None:
        self.servers: list[Server] = []
        self.tmp = tempfile.mkdtemp(prefix=DATA_PREFIX)
        self.http = requests.Session()
        self.http.trust_env = False
        ips = [f"{NET}.{10 + i}" for i in (1, 2, 3)]
        for i, ip in enumerate(ips, start=1):
            data = Path(self.tmp) / f"s{i}"
            data.mkdir()
            self.servers.append(Server(i, NAMESPACES[i - 1], ip, str(data),
                                       [p for p in ips if p != ip]))

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    # -- network --------------------------------------------------------------------------------
    def build_network(self) -> None:
        used = sh("ip", "-4", "-o", "addr", "show", check=False).stdout
        if f" {NET}." in used:
            raise RuntimeError(f"{NET}.0/24 is already in use on this host:\n{used}")
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "addr", "add", f"{ROOT_IP}/24", "dev", BRIDGE)
        sh("ip", "link", "set", BRIDGE, "up")
        for s in self.servers:
            host_end = f"{PREFIX}v{s.index}"
            sh("ip", "netns", "add", s.ns)
            sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", "eth0",
               "netns", s.ns)
            sh("ip", "link", "set", host_end, "master", BRIDGE)
            sh("ip", "link", "set", host_end, "up")
            sh("ip", "-n", s.ns, "addr", "add", f"{s.ip}/24", "dev", "eth0")
            sh("ip", "-n", s.ns, "link", "set", "eth0", "up")
            sh("ip", "-n", s.ns, "link", "set", "lo", "up")

    def start(self, timeout: float = 60) -> NetCluster:
        cleanup_leftovers(keep=self.tmp)
        try:
            self.build_network()
            for s in self.servers:
                s.start()
            self.wait_healthy(timeout)
            self.tune_autopilot()
        except BaseException:
            self.close()
            raise
        return self

    def tune_autopilot(self) -> None:
        # A restarted server votes again once autopilot deems it stable (10 s by default).
        r = self.http.put(f"{self.leader_server().url}/v1/operator/autopilot/configuration",
                          json={"CleanupDeadServers": False, "ServerStabilizationTime": "1s",
                                "LastContactThreshold": "200ms", "MaxTrailingLogs": 250},
                          timeout=5)
        r.raise_for_status()

    def close(self, keep_logs: Path | None = None) -> None:
        for s in self.servers:
            s.kill()
        if keep_logs is not None:
            for s in self.servers:
                with contextlib.suppress(OSError):
                    shutil.copy(s.log_path, keep_logs / f"consul-{s.name}.log")
        for s in self.servers:
            sh("ip", "netns", "del", s.ns, check=False)
        for s in self.servers:
            sh("ip", "link", "del", f"{PREFIX}v{s.index}", check=False)
        sh("ip", "link", "del", BRIDGE, check=False)
        cleanup_leftovers()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- observation ----------------------------------------------------------------------------
    def _get(self, s: Server, path: str, timeout: float = 1.5) -> requests.Response:
        return self.http.get(s.url + path, timeout=timeout)

    def leader_of(self, s: Server) -> str:
        try:
            r = self._get(s, "/v1/status/leader")
            return r.json() if r.status_code == 200 else ""
        except (requests.RequestException, ValueError):
            return ""

    def leader_server(self) -> Server:
        """The server every reachable live server agrees is the leader."""
        votes = {self.leader_of(s) for s in self.servers if s.alive() and not s.paused}
        votes.discard("")
        if len(votes) != 1:
            raise RuntimeError(f"no agreed leader: {votes}")
        addr = votes.pop()
        return next(s for s in self.servers if s.raft_addr == addr)

    def healthy(self) -> bool:
        """Every server up, one agreed leader, KV answers everywhere, autopilot tolerates a
        failure (so the next fault leaves a quorum)."""
        if not all(s.alive() and not s.paused for s in self.servers):
            return False
        try:
            leader = self.leader_server()
            for s in self.servers:
                if self._get(s, "/v1/kv/__probe__").status_code not in (200, 404):
                    return False
            health = self._get(leader, "/v1/operator/autopilot/health").json()
        except (requests.RequestException, RuntimeError, ValueError):
            return False
        return bool(health.get("Healthy")) and int(health.get("FailureTolerance", 0)) >= 1

    def wait_healthy(self, timeout: float = 60) -> float:
        began = time.monotonic()
        end = began + timeout
        while time.monotonic() < end:
            for s in self.servers:
                if s.proc is not None and s.proc.poll() is not None:
                    raise RuntimeError(f"consul {s.name} exited: "
                                       f"{s.log_path.read_text()[-2000:]}")
            if self.healthy():
                return time.monotonic() - began
            time.sleep(0.2)
        raise TimeoutError(f"cluster not healthy after {timeout}s: "
                           + "; ".join(f"{s.name}: {self.leader_of(s)!r}" for s in self.servers))

    def healthy_server(self) -> Server:
        return next(s for s in self.servers if s.alive() and not s.paused and self.leader_of(s))

    def kv_tree(self, prefix: str) -> dict[str, bytes]:
        """A consistent read of the KV tree under prefix from a server that has a leader."""
        return {e["Key"]: decode(e) for e in self.kv_entries(prefix)}

    def kv_entries(self, prefix: str) -> list[dict]:
        """Consul's own entries (Key, Value, CreateIndex, ModifyIndex), consistent read."""
        last: Exception | None = None
        for s in self.servers:
            if not s.alive() or s.paused:
                continue
            try:
                r = self.http.get(f"{s.url}/v1/kv/{prefix}",
                                  params={"recurse": "true", "consistent": "true"}, timeout=3)
                if r.status_code == 404:
                    return []
                r.raise_for_status()
                return list(r.json())
            except requests.RequestException as e:
                last = e
        raise RuntimeError(f"no server answered the KV read: {last}")

    def stale_read(self, s: Server, prefix: str, timeout: float = 1.0
                   ) -> tuple[int, dict[str, bytes]]:
        """One server's own committed state (`?stale`): its raft index and the tree."""
        r = self.http.get(f"{s.url}/v1/kv/{prefix}", params={"recurse": "true", "stale": "true"},
                          timeout=timeout)
        index = int(r.headers.get("X-Consul-Index", "0"))
        if r.status_code == 404:
            return index, {}
        r.raise_for_status()
        return index, {e["Key"]: decode(e) for e in r.json()}

    def put(self, key: str, value: str) -> None:
        r = self.http.put(f"{self.healthy_server().url}/v1/kv/{key}", data=value, timeout=5)
        r.raise_for_status()

    def create_pool(self, name: str, ranges: list[dict[str, str]], prefix: str = "ipam/") -> str:
        self.put(f"{prefix}{name}", json.dumps(ranges))
        self.put(f"{prefix}{name}/", "")
        return name


def decode(entry: dict) -> bytes:
    return base64.b64decode(entry["Value"]) if entry.get("Value") else b""


# -- the nemesis ----------------------------------------------------------------------------------


class Nemesis:
    """Faults on the current leader. `apply()` starts one, `heal()` ends it (idempotent)."""

    FAULTS = ("isolate", "clients-only", "asym-in", "asym-out", "kill", "pause-4", "pause-15",
              "no-quorum")

    def __init__(self, cluster: NetCluster) -> None:
        self.cluster = cluster
        self.target: Server | None = None
        self.fault: str | None = None
        self.also: list[Server] = []  # further servers a fault touches (no-quorum)

    def apply(self, fault: str) -> Server:
        c = self.cluster
        leader = c.leader_server()
        peers = [s.ip for s in c.servers if s is not leader]
        self.target, self.fault = leader, fault
        if fault == "isolate":
            # Nothing in or out of eth0: neither peers nor clients reach it.
            leader.iptables("-A", "INPUT", "-i", "eth0", "-j", "DROP")
            leader.iptables("-A", "OUTPUT", "-o", "eth0", "-j", "DROP")
        elif fault == "no-quorum":
            # The leader and one follower isolated: no majority anywhere until the heal.
            self.also = [next(s for s in c.servers if s is not leader)]
            for s in (leader, *self.also):
                s.iptables("-A", "INPUT", "-i", "eth0", "-j", "DROP")
                s.iptables("-A", "OUTPUT", "-o", "eth0", "-j", "DROP")
        elif fault == "clients-only":
            # Clients (the root namespace) cannot talk to its HTTP port; servers still can.
            leader.iptables("-A", "INPUT", "-s", ROOT_IP, "-p", "tcp", "--dport",
                            str(HTTP_PORT), "-j", "DROP")
            leader.iptables("-A", "OUTPUT", "-d", ROOT_IP, "-p", "tcp", "--sport",
                            str(HTTP_PORT), "-j", "DROP")
        elif fault == "asym-in":
            # The leader hears nothing from its peers but still sends to them; clients fine.
            for p in peers:
                leader.iptables("-A", "INPUT", "-s", p, "-j", "DROP")
        elif fault == "asym-out":
            # The leader's packets to its peers are lost; it still hears them; clients fine.
            for p in peers:
                leader.iptables("-A", "OUTPUT", "-d", p, "-j", "DROP")
        elif fault == "kill":
            leader.kill()
        elif fault.startswith("pause-"):
            leader.signal(signal.SIGSTOP)
        else:
            raise ValueError(fault)
        return leader

    def heal(self) -> None:
        t, fault = self.target, self.fault
        if t is None:
            return
        if fault == "kill":
            if not t.alive():
                t.start()
        elif fault is not None and fault.startswith("pause-"):
            t.signal(signal.SIGCONT)
        else:
            for s in (t, *self.also):
                s.heal()
        self.target = self.fault = None
        self.also = []

    @staticmethod
    def duration(fault: str, default: float) -> float:
        """How long the fault lasts: a pause's length is in its name."""
        if fault.startswith("pause-"):
            return float(fault.split("-", 1)[1])
        return default


def remember_process(pid: int) -> None:
    _remember(pid)


def forget_process(pid: int) -> None:
    _forget(pid)
