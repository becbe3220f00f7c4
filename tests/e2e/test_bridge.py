"""A real runtime path: Debian's `bridge` plugin (containernetworking-plugins) with
`"ipam": {"type": "ipam-da-consul"}` in standalone mode, against the real Consul dev agent, into
network namespaces the tests create. Every namespace, bridge and subnet is private to a test
(10.99.x.0/24 on a bridge only these namespaces join) and is deleted in teardown."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_singlefile import single_file_bin  # noqa: F401  (a fixture)
from tests.support.agent import ConsulAgent
from tests.support.plugin import Outcome, executable

BRIDGE = Path("/usr/lib/cni/bridge")
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create namespaces and bridges"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2's `ip`"),
    pytest.mark.skipif(
        not BRIDGE.exists(),
        reason=f"{BRIDGE} is missing: apt-get install containernetworking-plugins",
    ),
]

_ids = itertools.count()


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=20)


def ip_json(*args: str) -> Any:
    return json.loads(ip("-j", *args).stdout or "[]")


@pytest.fixture(scope="module", params=["venv", "single-file"])
def cni_path(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """CNI_PATH: our plugin under its runtime name, then Debian's plugins. Skips the module
    when namespaces cannot be made here; puts ip_forward back as it was (isGateway sets it).
    Every test runs with the venv install (a symlink to its console script) and with the
    single-file build copied in, which is that build's whole install."""
    probe = f"ipdc-probe-{os.getpid()}"
    made = ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        pytest.skip(f"`ip netns add` fails here: {made.stderr.strip()}")
    ip("netns", "del", probe, check=False)
    directory = tmp_path_factory.mktemp("cni-bin")
    if request.param == "venv":
        (directory / "ipam-da-consul").symlink_to(executable("ipam-da-consul"))
    else:
        folder = request.getfixturevalue("single_file_bin")
        shutil.copy2(folder / "ipam-da-consul", directory / "ipam-da-consul")
    forward = IP_FORWARD.read_text()
    yield f"{directory}:{BRIDGE.parent}"
    if IP_FORWARD.read_text() != forward:
        IP_FORWARD.write_text(forward)


def free_subnet_octet() -> int:
    """A third octet x such that nothing on this host uses 10.99.x.0/24 yet."""
    used = {r.get("dst", "") for r in ip_json("-4", "route", "show", "table", "all")}
    for x in itertools.chain(range(os.getpid() % 200, 256), range(256)):
        if not any(dst.startswith(f"10.99.{x}.") for dst in used):
            return x
    raise RuntimeError("every 10.99.x.0/24 is in use on this host")


@dataclass
class Network:
    """One bridge, one pool, and the namespaces (containers) attached to it."""

    consul: ConsulAgent
    cni_path: str
    bridge: str
    octet: int
    pool: str
    namespaces: list[str] = field(default_factory=list)

    def in_range(self, ip: str) -> bool:
        """Inside the pool's range (.10 to .50), whichever address the default pick chose."""
        return ip.startswith(f"10.99.{self.octet}.") and 10 <= int(ip.rsplit(".", 1)[1]) <= 50

    def addr(self, host: int) -> str:
        return f"10.99.{self.octet}.{host}"

    @property
    def gateway(self) -> str:
        return self.addr(1)

    def conf(self, pool: str | None = None) -> dict[str, Any]:
        return {
            "cniVersion": "1.0.0",
            "name": f"net-{self.bridge}",
            "type": "bridge",
            "bridge": self.bridge,
            "isGateway": True,
            "ipam": {
                "type": "ipam-da-consul",
                "consul_servers": [self.consul.url],
                "pools": [{"name": pool or self.pool}],
            },
        }

    def namespace(self) -> str:
        name = f"ipdc-{os.getpid()}-{next(_ids)}"
        ip("netns", "add", name)
        self.namespaces.append(name)
        return name

    def run(
        self,
        command: str,
        container: str,
        netns: str,
        conf: dict[str, Any] | None = None,
        prev: dict[str, Any] | None = None,
    ) -> Outcome:
        """`bridge` as a runtime runs it; bridge in turn runs ipam-da-consul from CNI_PATH."""
        data = dict(conf or self.conf())
        if prev is not None:
            data["prevResult"] = prev
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CNI_", "CONSUL_"))}
        env |= {
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": container,
            "CNI_NETNS": f"/var/run/netns/{netns}",
            "CNI_IFNAME": "eth0",
            "CNI_PATH": self.cni_path,
        }
        p = subprocess.run(
            [str(BRIDGE)], input=json.dumps(data).encode(), env=env, capture_output=True, timeout=60
        )
        return Outcome(
            p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")
        )

    def eth0(self, netns: str) -> list[str]:
        """The IPv4 addresses (with prefix) on eth0 inside the namespace."""
        links = ip_json("-n", netns, "addr", "show", "dev", "eth0")
        return [
            f"{a['local']}/{a['prefixlen']}"
            for link in links
            for a in link["addr_info"]
            if a["family"] == "inet"
        ]

    def default_routes(self, netns: str) -> list[tuple[str, str]]:
        routes = ip_json("-n", netns, "-4", "route", "show", "default")
        return [(r.get("gateway", ""), r.get("dev", "")) for r in routes]

    def close(self) -> None:
        # The container ends of the veth pairs go with their namespace; the host ends follow.
        for name in self.namespaces:
            ip("netns", "del", name, check=False)
        ip("link", "del", self.bridge, check=False)


@pytest.fixture
def network(consul: ConsulAgent, cni_path: str) -> Iterator[Network]:
    n = next(_ids)
    octet = free_subnet_octet()
    pool = consul.create_pool(
        f"bridge-{os.getpid()}-{n}",
        [
            {
                "subnet": f"10.99.{octet}.0/24",
                "rangeStart": f"10.99.{octet}.10",
                "rangeEnd": f"10.99.{octet}.50",
                "gateway": f"10.99.{octet}.1",
            }
        ],
    )
    net = Network(consul, cni_path, f"ipdc{os.getpid() % 100000}b{n}", octet, pool)
    try:
        yield net
    finally:
        net.close()


def test_add_check_del_through_bridge(network: Network, consul: ConsulAgent) -> None:
    ns = network.namespace()
    container = f"ctr-{ns}"

    add = network.run("ADD", container, ns)
    assert add.rc == 0, add
    result = add.json
    [(address, gateway)] = [(i["address"], i.get("gateway")) for i in result["ips"]]
    assert gateway == network.gateway
    got = address.split("/")[0]
    assert address == f"{got}/24" and network.in_range(got)
    sandboxes = [i for i in result["interfaces"] if i.get("sandbox")]
    assert [(i["name"], i["sandbox"]) for i in sandboxes] == [("eth0", f"/var/run/netns/{ns}")]

    # The address from Consul is on eth0 in the namespace, with the default route via the
    # gateway, which bridge put on the host side (isGateway).
    assert network.eth0(ns) == [address]
    assert network.default_routes(ns) == [(network.gateway, "eth0")]
    bridge_addrs = [
        a["local"]
        for link in ip_json("addr", "show", "dev", network.bridge)
        for a in link["addr_info"]
        if a["family"] == "inet"
    ]
    assert bridge_addrs == [network.gateway]
    assert consul.allocations(network.pool) == {got: container}
    held = consul.get_json(f"ipam/{network.pool}/{got}")
    assert held["target"] == container

    check = network.run("CHECK", container, ns, prev=result)
    assert check.rc == 0, check

    delete = network.run("DEL", container, ns, prev=result)
    assert delete.rc == 0, delete
    assert consul.allocations(network.pool) == {}
    assert ip("-n", ns, "link", "show", "eth0", check=False).returncode != 0

    again = network.run("DEL", container, ns, prev=result)  # DEL must be idempotent
    assert again.rc == 0, again
    assert consul.allocations(network.pool) == {}


def test_a_second_container_gets_another_address(network: Network, consul: ConsulAgent) -> None:
    first, second = network.namespace(), network.namespace()
    one = network.run("ADD", "ctr-one", first)
    assert one.rc == 0, one
    two = network.run("ADD", "ctr-two", second)
    assert two.rc == 0, two
    ip1, ip2 = (r.json["ips"][0]["address"].split("/")[0] for r in (one, two))
    assert ip1 != ip2 and network.in_range(ip1) and network.in_range(ip2)
    assert network.eth0(first) == [f"{ip1}/24"]
    assert network.eth0(second) == [f"{ip2}/24"]
    assert network.default_routes(second) == [(network.gateway, "eth0")]
    assert consul.allocations(network.pool) == {ip1: "ctr-one", ip2: "ctr-two"}

    # Releasing the first leaves the second alone.
    delete = network.run("DEL", "ctr-one", first, prev=one.json)
    assert delete.rc == 0, delete
    assert consul.allocations(network.pool) == {ip2: "ctr-two"}
    assert network.eth0(second) == [f"{ip2}/24"]


def test_ipam_error_comes_back_through_bridge(network: Network, consul: ConsulAgent) -> None:
    ns = network.namespace()
    missing = f"{network.pool}-missing"
    before = consul.kv_index()
    out = network.run("ADD", "ctr-err", ns, conf=network.conf(missing))
    assert out.rc == 1, out  # Go's skel exits 1 on any error; the code travels in the JSON
    body = out.json
    assert body["code"] == 114 and missing in body["msg"], out
    assert consul.kv_index() == before
    assert network.eth0(ns) == []
