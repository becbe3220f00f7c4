"""A real container runtime end to end: Debian's Podman with its CNI backend runs Debian's
`bridge` plugin with `"ipam": {"type": "ipam-da-consul"}`, against a Consul server of this
module's own (a persistent single server, so it can be stopped and started again with its
data), on a tiny image imported from busybox-static (no registry).

Podman's state is private to the module: its own storage (`--root`, `--runroot`), its own
containers.conf / storage.conf (CONTAINERS_CONF, CONTAINERS_STORAGE_CONF), its own CNI config
folder, all in one temporary folder that is removed afterwards, with the bridge. The machine's
own podman state is never read or written.

Deselect with `-m "not podman"`. Timings of `podman run` are printed (`-s` shows them) and,
with IPDC_PODMAN_TIMINGS=FILE, written there as JSON."""

from __future__ import annotations

import itertools
import json
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.agent import ConsulAgent
from tests.support.cri import static_elf
from tests.support.plugin import BIN_DIR, executable
from tests.support.util_procs import helper_stats

BRIDGE_DIR = Path("/usr/lib/cni")
BUSYBOX = Path("/usr/bin/busybox")  # busybox-static: runs in an empty root file system
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
IMAGE = "localhost/ipdc-busybox:1"
BATCH = 10
SAMPLES = 3


pytestmark = [
    pytest.mark.podman,
    pytest.mark.skipif(os.geteuid() != 0, reason="rootful podman with CNI networks needs root"),
    pytest.mark.skipif(
        shutil.which("podman") is None or shutil.which("runc") is None,
        reason="podman or runc missing: apt-get install podman runc (scripts/setup.sh does)",
    ),
    pytest.mark.skipif(
        not (BRIDGE_DIR / "bridge").exists(),
        reason="/usr/lib/cni/bridge missing: apt-get install containernetworking-plugins",
    ),
    pytest.mark.skipif(
        not static_elf(BUSYBOX),
        reason="no static /usr/bin/busybox to make an image from: apt-get install busybox-static",
    ),
]

TIMINGS: dict[str, Any] = {}


def record(name: str, value: Any) -> None:
    TIMINGS[name] = value
    print(f"\n[podman timing] {name}: {value}")
    path = os.environ.get("IPDC_PODMAN_TIMINGS")
    if path:
        Path(path).write_text(json.dumps(TIMINGS, indent=2) + "\n")


def free_octet() -> int:
    """x such that nothing on this host routes 10.123.x.0/24 (Podman's own default is
    10.88.0.0/16; test_bridge uses 10.99.x)."""
    out = subprocess.run(
        ["ip", "-j", "-4", "route", "show", "table", "all"], capture_output=True, text=True
    )
    used = {r.get("dst", "") for r in json.loads(out.stdout or "[]")}
    for x in itertools.chain(range(os.getpid() % 200, 256), range(256)):
        if not any(dst.startswith(f"10.123.{x}.") for dst in used):
            return x
    raise RuntimeError("every 10.123.x.0/24 is in use on this host")


def _ulimit(kind: int, want: int) -> str:
    # Podman's defaults ask for more than this machine's hard limits allow, and runc then
    # fails with "error setting rlimits": ask for what the hard limit allows.
    hard = resource.getrlimit(kind)[1]
    n = want if hard == resource.RLIM_INFINITY else min(want, hard)
    return f"{n}:{n}"


@dataclass
class Podman:
    """One private podman installation and one CNI network on a private bridge."""

    base: Path
    consul: ConsulAgent
    octet: int
    network: str
    pool: str
    bridge: str
    socket: str = "/nonexistent/ipam-da-consul-tests/helper.sock"

    @property
    def state_dir(self) -> str:
        return str(self.base / "state")

    def addr(self, host: int) -> str:
        return f"10.123.{self.octet}.{host}"

    def env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("CNI_", "CONSUL_", "IPAM_DA_", "CONTAINERS_"))
        }
        env["CONTAINERS_CONF"] = str(self.base / "containers.conf")
        env["CONTAINERS_STORAGE_CONF"] = str(self.base / "storage.conf")
        # Podman hands its environment to the CNI plugins: this picks the helper, or none.
        env["IPAM_DA_CONSUL_SOCKET"] = self.socket
        # The host's state folder: the module's own, never the machine's /var/lib one.
        env["IPAM_DA_CONSUL_STATE_DIR"] = self.state_dir
        env["TMPDIR"] = str(self.base / "tmp")
        return env

    def __call__(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        p = subprocess.run(
            [*self.prefix(), *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=self.env(),
            timeout=timeout,
        )
        if check and p.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} failed ({p.returncode}): {p.stderr}")
        return p

    def prefix(self) -> list[str]:
        return ["podman", "--root", str(self.base / "root"), "--runroot", str(self.base / "run")]

    def run(self, *args: str, check: bool = True) -> tuple[str, float, str]:
        """`podman run -d` on our network: (container ID, wall seconds, stderr)."""
        start = time.monotonic()
        p = self("run", "-d", "--network", self.network, *args, IMAGE, "sleep", "600", check=check)
        took = time.monotonic() - start
        cid = p.stdout.strip().splitlines()[-1] if p.returncode == 0 else ""
        return cid, took, p.stderr

    def eth0(self, cid: str) -> str:
        out = self("exec", cid, "ip", "-o", "-4", "addr", "show", "dev", "eth0").stdout
        return out.split(" inet ")[1].split("/")[0]

    def inspect_ip(self, cid: str) -> str:
        fmt = "{{json .NetworkSettings.Networks}}"
        nets = json.loads(self("inspect", "--format", fmt, cid).stdout)
        return str(nets[self.network]["IPAddress"])

    def rm(self, *cids: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self("rm", "-f", "-t", "0", *cids, check=check)

    def live_ids(self) -> str:
        return self("ps", "-a", "-q", "--no-trunc").stdout

    def allocations(self) -> dict[str, dict[str, Any]]:
        folder = f"ipam/{self.pool}/"
        return {
            k[len(folder) :]: json.loads(v)
            for k, v in self.consul.tree(folder).items()
            if k != folder
        }


def _write_config(base: Path, network: str, bridge: str, consul: ConsulAgent, pool: str) -> None:
    for sub in ("root", "run", "tmp", "net.d", "rootfs/bin"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    nofile = _ulimit(resource.RLIMIT_NOFILE, 1024)
    nproc = _ulimit(resource.RLIMIT_NPROC, 1024)
    (base / "containers.conf").write_text(
        f"""[containers]
default_ulimits = ["nofile={nofile}", "nproc={nproc}"]
log_driver = "k8s-file"

[network]
network_backend = "cni"
cni_plugin_dirs = ["{BIN_DIR}", "{BRIDGE_DIR}"]
network_config_dir = "{base / "net.d"}"

[engine]
# Debian's runc: crun may refuse this machine's cgroups.
runtime = "runc"
# The cleanup of a container that exits by itself is run by conmon (`podman container
# cleanup`), which gets only these variables: without the socket, its DEL runs in-process.
conmon_env_vars = ["IPAM_DA_CONSUL_SOCKET={base / "helper" / "helper.sock"}"]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{base / "events.log"}"
tmp_dir = "{base / "tmp"}"
"""
    )
    (base / "storage.conf").write_text(
        f"""[storage]
# vfs: no overlay mounts to leak, whatever file system the folder is on.
driver = "vfs"
graphroot = "{base / "root"}"
runroot = "{base / "run"}"
"""
    )
    conflist = {
        "cniVersion": "1.0.0",
        "name": network,
        "plugins": [
            {
                "type": "bridge",
                "bridge": bridge,
                "isGateway": True,
                "ipMasq": False,
                "ipam": {
                    "type": "ipam-da-consul",
                    "consul_servers": [consul.url],
                    "pools": [{"name": pool}],
                },
            }
        ],
    }
    (base / "net.d" / f"{network}.conflist").write_text(json.dumps(conflist, indent=1))


@pytest.fixture(scope="module")
def consul() -> Iterator[ConsulAgent]:
    """A single persistent server: stopped, it refuses connections as a dead agent does, and
    started again it still holds the allocations."""
    agent = ConsulAgent("podman", dev=False, extra=["-bootstrap-expect", "1"]).start()
    yield agent
    agent.close()


@pytest.fixture(scope="module")
def podman(consul: ConsulAgent) -> Iterator[Podman]:
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2's `ip`")
    octet = free_octet()
    pool = consul.create_pool(
        f"podman-{os.getpid()}",
        [
            {
                "subnet": f"10.123.{octet}.0/24",
                "rangeStart": f"10.123.{octet}.10",
                "rangeEnd": f"10.123.{octet}.100",
                "gateway": f"10.123.{octet}.1",
            }
        ],
    )
    # A short path: conmon's sockets live under the run root and must fit in sun_path.
    base = Path(tempfile.mkdtemp(prefix="ipdc-pm-", dir="/tmp"))
    network, bridge = f"ipdcnet{os.getpid()}", f"ipdcpm{os.getpid() % 100000}"
    _write_config(base, network, bridge, consul, pool)
    forward = IP_FORWARD.read_text()
    pm = Podman(base, consul, octet, network, pool, bridge)
    try:
        rootfs = base / "rootfs"
        shutil.copy2(BUSYBOX, rootfs / "bin" / "busybox")
        for applet in ("sh", "ip", "sleep", "true", "cat"):
            (rootfs / "bin" / applet).symlink_to("busybox")
        tarball = base / "rootfs.tar"
        subprocess.run(["tar", "-C", str(rootfs), "-cf", str(tarball), "."], check=True)
        made = pm("import", str(tarball), IMAGE, check=False)
        if made.returncode != 0:
            pytest.skip(f"podman cannot import an image on this machine: {made.stderr.strip()}")
        # Can this machine run a container at all (cgroups, namespaces, runc)? Not our plugin's
        # business: without a network, the answer is the machine's.
        probe = pm("run", "--rm", "--network", "none", IMAGE, "true", check=False)
        if probe.returncode != 0:
            pytest.skip(f"this machine cannot run containers: {probe.stderr.strip()[-400:]}")
        yield pm
    finally:
        pm("rm", "-a", "-f", "-t", "0", check=False)
        pm("rmi", "-a", "-f", check=False)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)
        if IP_FORWARD.read_text() != forward:
            IP_FORWARD.write_text(forward)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def helper(podman: Podman) -> Iterator[str]:
    sock = podman.base / "helper" / "helper.sock"
    proc = subprocess.Popen(
        [executable("ipam-da-consul-helper"), "--socket", str(sock),
         "--state-dir", podman.state_dir],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    end = time.monotonic() + 30
    while not sock.exists():
        assert proc.poll() is None, "the helper exited"
        assert time.monotonic() < end, "the helper did not create its socket"
        time.sleep(0.05)
    try:
        yield str(sock)
    finally:
        proc.terminate()
        proc.wait(10)


def admin(
    consul: ConsulAgent, *args: str, stdin: str = "", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in (env or os.environ).items() if not k.startswith(("CONSUL_", "CNI_"))}
    env["CONSUL_HTTP_ADDR"] = consul.url
    return subprocess.run(
        [executable("ipam-da-consul-admin"), *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


# -- the cases ----------------------------------------------------------------------------------
def sequential_runs(podman: Podman, label: str) -> None:
    """SAMPLES runs one after the other, each removed before the next: the median is the
    figure, as one run on a shared machine says little."""
    times = []
    for _ in range(SAMPLES):
        cid, took, _ = podman.run()
        times.append(took)
        podman.rm(cid)
    record(
        f"podman run, Consul up, {label} (s)",
        {"median": round(statistics.median(times), 2), "all": [round(t, 2) for t in times]},
    )
    assert podman.allocations() == {}


def test_one_container_gets_its_address_from_consul(podman: Podman) -> None:
    cid, _, _ = podman.run()
    try:
        inside = podman.eth0(cid)
        held = podman.allocations()
        assert list(held) == [inside], held
        # Somewhere in the pool's range: the default pick (stripe) takes this host's block.
        assert inside in {podman.addr(n) for n in range(10, 101)}, inside
        value = held[inside]
        assert value["target"] == cid and len(cid) == 64  # the runtime's full container ID
        assert value["network"] == podman.network and value["ifname"] == "eth0"
        assert podman.inspect_ip(cid) == inside
    finally:
        podman.rm(cid)
    assert podman.allocations() == {}
    sequential_runs(podman, "in-process")


def test_a_named_container_is_found_by_its_name(podman: Podman, consul: ConsulAgent) -> None:
    """What Podman's CNI backend passes besides the ID: `IgnoreUnknown=1` and the container's
    name as K8S_POD_NAME, without a namespace. `ip-of` finds it by that name, also written as
    the `-/NAME` older versions showed (issue 22, finding 7)."""
    name = f"ipdc-named-{os.getpid()}"
    cid, _, _ = podman.run("--name", name)
    try:
        [(ip, value)] = podman.allocations().items()
        assert value["target"] == cid
        assert value["runtime"] == {"K8S_POD_NAME": name}, value
        for wanted in (name, f"-/{name}"):
            out = admin(consul, "ip-of", wanted, "--pool", podman.pool, "--json")
            assert out.returncode == 0, out
            assert [(a["ip"], a["target"]) for a in json.loads(out.stdout)] == [(ip, cid)]
    finally:
        podman.rm(cid)
    assert podman.allocations() == {}


def _batch(podman: Podman, label: str) -> None:
    with ThreadPoolExecutor(BATCH) as pool:
        runs = list(pool.map(lambda _: podman.run(check=False), range(BATCH)))
    failed = [err for cid, _, err in runs if not cid]
    assert not failed, failed[0]
    cids = [cid for cid, _, _ in runs]
    times = sorted(t for _, t, _ in runs)
    record(
        f"podman run x{BATCH} concurrent, {label} (s)",
        {"median": round(statistics.median(times), 2), "max": round(times[-1], 2)},
    )
    held = podman.allocations()
    assert len(held) == BATCH, held
    assert sorted(v["target"] for v in held.values()) == sorted(cids)
    # What Podman says each container got is what Consul holds for it: all distinct.
    assert {podman.inspect_ip(cid): cid for cid in cids} == {
        ip: v["target"] for ip, v in held.items()
    }
    podman.rm(*cids)
    assert podman.allocations() == {}


def test_concurrent_batch_in_process(podman: Podman) -> None:
    _batch(podman, "in-process")


def test_concurrent_batch_through_the_helper(podman: Podman, helper: str) -> None:
    podman.socket = helper
    try:
        sequential_runs(podman, "via helper")
        _batch(podman, "via helper")
    finally:
        podman.socket = Podman.socket


def test_a_container_that_exits_is_released_through_the_helper(
    podman: Podman, helper: str
) -> None:
    """Podman's own cleanup process (conmon's exit command, `podman container cleanup`) does
    the DEL of a container that exits by itself, with conmon's environment: `conmon_env_vars`
    in containers.conf gives it IPAM_DA_CONSUL_SOCKET, so the helper serves it too (issue 22,
    finding 7; deploy/examples/README.md, Podman)."""
    podman.socket = helper
    try:
        served = helper_stats(helper).get("served", 0)
        ran = podman("run", "-d", "--network", podman.network, IMAGE, "true")
        cid = ran.stdout.strip().splitlines()[-1]
        end = time.monotonic() + 30
        while True:  # until its ADD is in and the cleanup's DEL has released it
            now = helper_stats(helper).get("served", 0)
            mine = [ip for ip, v in podman.allocations().items() if v["target"] == cid]
            if now >= served + 2 and not mine:
                break
            assert time.monotonic() < end, (now - served, mine)
            time.sleep(0.2)
        assert now == served + 2  # its ADD (podman run) and the cleanup's DEL
    finally:
        podman.socket = Podman.socket
        podman("container", "prune", "-f", check=False)


def test_static_ip(podman: Podman) -> None:
    wanted = podman.addr(42)
    cid, _, _ = podman.run("--ip", wanted)
    assert podman.eth0(cid) == wanted
    assert {ip: v["target"] for ip, v in podman.allocations().items()} == {wanted: cid}
    podman.rm(cid)
    assert podman.allocations() == {}


def test_consul_down_then_reconcile_releases_the_orphan(podman: Podman, consul: ConsulAgent):
    """Consul stops: `podman run` fails; `podman rm -f` of a running container cannot DEL and
    removes it anyway, leaving its address held. Podman never calls CNI GC, so only
    `reconcile`, fed Podman's own list of containers, gives it back."""
    keep, _, _ = podman.run()
    doomed, _, _ = podman.run()
    assert len(podman.allocations()) == 2
    consul.stop()
    try:
        failed, took, err = podman.run(check=False)
        record("podman run, Consul stopped (s)", round(took, 2))
        assert failed == "" and "Consul" in err, err
        start = time.monotonic()
        gone = podman.rm(doomed, check=False)
        record("podman rm -f, Consul stopped (s)", round(time.monotonic() - start, 2))
        assert gone.returncode == 0, gone.stderr  # removed regardless; the DEL failed
    finally:
        consul.start()
    held = podman.allocations()
    assert sorted(v["target"] for v in held.values()) == sorted([keep, doomed])
    live = podman.live_ids()
    assert doomed not in live and keep in live

    base = ["reconcile", "--pool", podman.pool, "--live-ids", "-", "--settle", "0"]
    admin(consul, *base, stdin=live)  # an earlier run: only what it saw is judged
    check = admin(consul, "check", podman.pool, "--live-ids", "-", "--settle", "0", stdin=live)
    assert check.returncode == 1 and "orphaned-allocation" in check.stdout, check
    dry = admin(consul, *base, stdin=live)
    assert dry.returncode == 0, dry
    assert dry.stdout.startswith(f"would release {podman.pool} ") and doomed in dry.stdout
    assert len(podman.allocations()) == 2
    # For a timer: reconcile runs the listing itself, after reading KV.
    ps = shlex.join([*podman.prefix(), "ps", "-a", "-q", "--no-trunc"])
    apply = ["reconcile", "--pool", podman.pool, "--live-cmd", ps, "--settle", "0"]
    out = admin(consul, *apply, "--apply", "--json", env=podman.env())
    assert out.returncode == 0, out
    assert [o["target"] for o in json.loads(out.stdout)["orphans"]] == [doomed]
    assert [v["target"] for v in podman.allocations().values()] == [keep]
    assert admin(consul, "check", podman.pool, "--live-ids", "-", "--settle", "0",
                 stdin=live).returncode == 0
    # The container whose ADD failed never held an address; the live one keeps its own.
    podman("rm", "-a", "-f", "-t", "0")
    assert podman.allocations() == {}
