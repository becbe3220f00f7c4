"""Real Consul agents for tests, the demo and the benchmark: a dev agent or a 3-server cluster
on loopback. Nothing here mocks Consul."""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Self

import requests

ROOT = Path(__file__).resolve().parents[2]


def consul_binary() -> str:
    """CONSUL_BIN, then PATH, then the project's own fetch script."""
    env = os.environ.get("CONSUL_BIN")
    if env:
        return env
    cached = ROOT / ".cache/consul/x/usr/bin/consul"
    if cached.exists():
        return str(cached)
    found = shutil.which("consul")
    if found:
        return found
    out = subprocess.run(
        ["bash", str(ROOT / "scripts/fetch-consul.sh")], check=True, capture_output=True, text=True
    )
    return out.stdout.strip().splitlines()[-1]


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


class ConsulAgent:
    """One consul process. `dev=True` is an in-memory single server with a leader in ~2 s."""

    def __init__(
        self,
        name: str = "dev",
        dev: bool = True,
        extra: list[str] | None = None,
        scheme: str = "http",
        https_port: int | None = None,
        token: str | None = None,
        verify: str | bool = True,
        cert: tuple[str, str] | None = None,
    ) -> None:
        self.name = name
        self.dev = dev
        self.extra = extra or []
        self.http_port, self.dns_port, self.serf_lan, self.serf_wan, self.server_port = free_ports(
            5
        )
        self.https_port = https_port
        self.scheme = scheme
        self.token = token
        self.verify = verify
        self.cert = cert
        self.data_dir = tempfile.mkdtemp(prefix=f"consul-{name}-")
        self.log_path = Path(self.data_dir) / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.http = requests.Session()
        self.http.trust_env = False
        if token:
            self.http.headers["X-Consul-Token"] = token

    @property
    def url(self) -> str:
        if self.scheme == "https":
            return f"https://127.0.0.1:{self.https_port}"
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def serf_addr(self) -> str:
        return f"127.0.0.1:{self.serf_lan}"

    def command(self) -> list[str]:
        cmd = [consul_binary(), "agent", "-node", self.name, "-bind", "127.0.0.1"]
        cmd += ["-client", "127.0.0.1", "-http-port", str(self.http_port), "-dns-port", "-1"]
        cmd += ["-grpc-port", "-1", "-serf-lan-port", str(self.serf_lan)]
        cmd += ["-serf-wan-port", str(self.serf_wan), "-server-port", str(self.server_port)]
        if self.dev:
            cmd += ["-dev"]
        else:
            cmd += ["-server", "-data-dir", self.data_dir, "-ui=false"]
        return cmd + self.extra

    def start(self, wait_leader: bool = True, timeout: float = 30.0) -> Self:
        log = open(self.log_path, "ab")  # noqa: SIM115 (kept open for the process's life)
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT)
        self.wait_http(timeout)
        if wait_leader:
            self.wait_leader(timeout)
        return self

    def wait_http(self, timeout: float = 30.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"consul {self.name} exited: {self.log_path.read_text()[-2000:]}"
                )
            try:
                self.http.get(
                    self.url + "/v1/status/leader", timeout=1, verify=self.verify, cert=self.cert
                )
                return
            except requests.RequestException:
                time.sleep(0.1)
        raise TimeoutError(f"consul {self.name} did not answer HTTP in {timeout}s")

    def leader(self) -> str:
        r = self.http.get(
            self.url + "/v1/status/leader", timeout=2, verify=self.verify, cert=self.cert
        )
        return r.json() if r.status_code == 200 else ""

    def wait_leader(self, timeout: float = 30.0) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                leader = self.leader()
                if leader and self._kv_works():
                    return leader
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"consul {self.name} has no leader after {timeout}s")

    def _kv_works(self) -> bool:
        r = self.http.get(
            self.url + "/v1/kv/__probe__", timeout=2, verify=self.verify, cert=self.cert
        )
        return r.status_code in (200, 404)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def close(self) -> None:
        self.stop(signal.SIGKILL)
        shutil.rmtree(self.data_dir, ignore_errors=True)

    # -- KV helpers (tests inspect KV directly, as an operator would) ------------------------
    def _req(self, method: str, key: str, **kw: Any) -> requests.Response:
        return self.http.request(
            method, f"{self.url}/v1/kv/{key}", timeout=10, verify=self.verify, cert=self.cert, **kw
        )

    def put(self, key: str, value: str | bytes | Any) -> None:
        if not isinstance(value, str | bytes):
            value = json.dumps(value)
        r = self._req("PUT", key, data=value)
        r.raise_for_status()

    def get(self, key: str) -> bytes | None:
        r = self._req("GET", key)
        if r.status_code == 404:
            return None
        r.raise_for_status()
        v = r.json()[0]["Value"]
        return base64.b64decode(v) if v else b""

    def get_json(self, key: str) -> Any:
        raw = self.get(key)
        return None if raw is None else json.loads(raw)

    def modify_index(self, key: str) -> int | None:
        r = self._req("GET", key)
        return None if r.status_code == 404 else int(r.json()[0]["ModifyIndex"])

    def tree(self, prefix: str) -> dict[str, bytes]:
        r = self._req("GET", prefix, params={"recurse": "true"})
        if r.status_code == 404:
            return {}
        r.raise_for_status()
        return {e["Key"]: base64.b64decode(e["Value"]) if e["Value"] else b"" for e in r.json()}

    def allocations(self, pool: str, prefix: str = "ipam/") -> dict[str, str]:
        """ip -> target for every allocation key of `pool`."""
        folder = f"{prefix}{pool}/"
        return {
            k[len(folder) :]: json.loads(v)["target"]
            for k, v in self.tree(folder).items()
            if k != folder
        }

    def delete_tree(self, prefix: str) -> None:
        self._req("DELETE", prefix, params={"recurse": "true"}).raise_for_status()

    def kv_index(self) -> KVMark:
        """Consul's X-Consul-Index for the whole KV: it moves on every write anywhere. Compared
        with `==`, a move that only sessions ending explain is no write (see KVMark)."""
        r = self._req("GET", "", params={"recurse": "true", "keys": "true"})
        return KVMark(int(r.headers["X-Consul-Index"]), self)

    def only_sessions_ended(self, after: int, upto: int) -> bool:
        """Whether the KV index moved from `after` to `upto` only by sessions ending: no key
        was written in between, and the last move was a session's (Consul deleting what it
        held, in the same Raft entry as the session)."""
        r = self._req("GET", "", params={"recurse": "true"})
        entries = r.json() if r.status_code == 200 else []  # 404: no key at all
        if any(after < e["ModifyIndex"] <= upto for e in entries):
            return False
        sessions = self.http.get(
            f"{self.url}/v1/session/list", timeout=10, verify=self.verify, cert=self.cert
        )
        return int(sessions.headers["X-Consul-Index"]) == upto

    def create_pool(self, name: str, ranges: list[dict[str, str]], prefix: str = "ipam/") -> str:
        self.put(f"{prefix}{name}", ranges)
        self.put(f"{prefix}{name}/", "")
        return name

    def fill_pool(self, pool: str, first: ipaddress.IPv4Address, n: int) -> None:
        """Allocations `fill-<i>` of the n addresses from `first`, written with /v1/txn in
        chunks of 64 operations (Consul 1.8 refuses more), four at a time, then counted."""
        def value(i: int) -> str:
            return base64.b64encode(json.dumps({"target": f"fill-{i}"}).encode()).decode()

        ops = [
            {"KV": {"Verb": "set", "Key": f"ipam/{pool}/{first + i}", "Value": value(i)}}
            for i in range(n)
        ]
        local = threading.local()

        def put(chunk: list[dict[str, Any]]) -> None:
            if not hasattr(local, "s"):
                local.s = requests.Session()
                local.s.trust_env = False
                local.s.headers.update(self.http.headers)
            resp = local.s.put(self.url + "/v1/txn", json=chunk, timeout=30)
            if resp.status_code != 200:
                raise RuntimeError(f"filling {pool}: HTTP {resp.status_code} {resp.text}")

        with ThreadPoolExecutor(4) as ex:
            list(ex.map(put, [ops[i : i + 64] for i in range(0, n, 64)]))
        keys = self.http.get(
            f"{self.url}/v1/kv/ipam/{pool}/", params={"keys": "true"}, timeout=30
        ).json()
        held = [k for k in keys if k != f"ipam/{pool}/"]
        if len(held) != n:
            raise RuntimeError(f"pool {pool} holds {len(held)} allocations after filling {n}")


class ConsulCluster:
    """Three servers on loopback joined with -retry-join: a real raft cluster for fault tests."""

    def __init__(self, size: int = 3) -> None:
        self.agents = [ConsulAgent(f"srv{i}", dev=False) for i in range(size)]
        for agent in self.agents:
            joins = [a.serf_addr for a in self.agents if a is not agent]
            agent.extra = (
                ["-bootstrap-expect", str(size)]
                + [arg for j in joins for arg in ("-retry-join", j)]
                + ["-hcl", "performance { raft_multiplier = 1 }"]
            )

    def start(self) -> ConsulCluster:
        for agent in self.agents:
            agent.start(wait_leader=False)
        for agent in self.agents:
            agent.wait_leader(60)
        return self

    def leader_agent(self) -> ConsulAgent:
        leader = next(a.leader() for a in self.agents if a.proc is not None)
        port = int(leader.rsplit(":", 1)[1])
        return next(a for a in self.agents if a.server_port == port)

    def close(self) -> None:
        for agent in self.agents:
            agent.close()


# -- a Consul that needs credentials: ACLs (default deny) and HTTPS with client certificates ----


class TLSFiles:
    """PEM files of a throwaway CA, a server certificate for 127.0.0.1/localhost and a client
    certificate, written into `directory` (trustme is a test-only dependency)."""

    def __init__(self, directory: Path) -> None:
        import trustme

        directory.mkdir(parents=True, exist_ok=True)
        ca = trustme.CA()
        # Consul's own RPC TLS wants server.<dc>.<domain>; the HTTPS clients want the address.
        server = ca.issue_cert("127.0.0.1", "localhost", "server.dc1.consul")
        client = ca.issue_cert("client.dc1.consul")
        self.ca = str(directory / "ca.pem")
        self.server_cert = str(directory / "server.pem")
        self.server_key = str(directory / "server-key.pem")
        self.client_cert = str(directory / "client.pem")
        self.client_key = str(directory / "client-key.pem")
        ca.cert_pem.write_to_path(self.ca)
        server.cert_chain_pems[0].write_to_path(self.server_cert)
        server.private_key_pem.write_to_path(self.server_key)
        client.cert_chain_pems[0].write_to_path(self.client_cert)
        client.private_key_pem.write_to_path(self.client_key)


class SecureConsulAgent(ConsulAgent):
    """A dev agent with ACLs enabled (default policy deny, a random master token) and an HTTPS
    port that requires a client certificate (`verify_incoming_https`). `url` is the HTTPS one;
    the helper's own KV calls use the master token, the CA and the client certificate."""

    def __init__(self, directory: Path, name: str = "secure") -> None:
        import uuid

        self.tls = TLSFiles(directory / "tls")
        master = str(uuid.uuid4())
        super().__init__(
            name,
            scheme="https",
            token=master,
            verify=self.tls.ca,
            cert=(self.tls.client_cert, self.tls.client_key),
        )
        taken = {self.http_port, self.serf_lan, self.serf_wan, self.server_port}
        self.https_port = next(p for p in free_ports(6) if p not in taken)
        self.master_token = master
        config = directory / "secure.hcl"
        config.write_text(
            'acl {\n  enabled = true\n  default_policy = "deny"\n'
            f'  tokens {{ master = "{master}" }}\n}}\n'
            f"ports {{ https = {self.https_port} }}\n"
            f'ca_file = "{self.tls.ca}"\ncert_file = "{self.tls.server_cert}"\n'
            f'key_file = "{self.tls.server_key}"\nverify_incoming_https = true\n'
        )
        self.extra = ["-config-file", str(config)]

    def _acl(self, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        r = self.http.put(
            f"{self.url}/v1/acl/{kind}", json=body, timeout=10, verify=self.verify, cert=self.cert
        )
        r.raise_for_status()
        return r.json()

    def create_token(self, name: str, rules: str) -> str:
        """A new ACL token whose only policy is `rules` (HCL); returns its SecretID."""
        import uuid

        policy = self._acl("policy", {"Name": f"{name}-{uuid.uuid4().hex[:8]}", "Rules": rules})
        token = self._acl("token", {"Description": name, "Policies": [{"ID": policy["ID"]}]})
        return str(token["SecretID"])


def module_consul(name: str) -> Any:
    """A `consul` fixture for one module's own dev agent (it overrides the session one, and
    with it make_pool and conf_for). For KV-index checks: Consul's reaping of KV tombstones,
    some 15 minutes after deletes, moves the index of a long-lived agent with no write."""

    import pytest  # here, not at the top: the bench and scripts/demo.py import this module

    @pytest.fixture(scope="module")
    def consul() -> Iterator[ConsulAgent]:
        agent = ConsulAgent(name).start()
        yield agent
        agent.close()

    return consul


class KVMark(int):
    """A KV index read by a test, to show a call wrote nothing. On an agent shared by many
    tests, a cool-down or fence session of an earlier test can end meanwhile, and Consul then
    deletes its keys: that moves the index without any write of the call under test."""

    agent: ConsulAgent

    def __new__(cls, index: int, agent: ConsulAgent) -> Self:
        mark = super().__new__(cls, index)
        mark.agent = agent
        return mark

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, int):
            return NotImplemented
        if int(self) == int(other):
            return True
        lo, hi = sorted((int(self), int(other)))
        return self.agent.only_sessions_ended(lo, hi)

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    __hash__ = int.__hash__
