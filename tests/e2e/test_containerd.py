"""Kubernetes' CNI path end to end: Debian's containerd (1.6, CRI plugin, runc) runs Debian's
`bridge` plugin with `"ipam": {"type": "ipam-da-consul"}` for pods that this test asks for
through the CRI gRPC API (`runtime.v1`), as the kubelet does. Two network configs in the CNI
folder (`max_conf_num = 2`), both drawing from one pool: go-cni attaches a pod's networks in
parallel (eth0, eth1) and tears them down on StopPodSandbox.

containerd is an instance of this module's own (tests/support/cri.py says what it shares with
the machine, and cleans up): own config, root, state, sockets, runc root, CNI folders, network
namespaces, no registry (the sandbox image is built from busybox-static and imported). Consul is
a persistent single server of this module's, so it can be stopped and started with its data.

containerd passes its own environment to CNI plugins (libcni adds the CNI_* variables to it):
the plugin finds the helper's socket through `IPAM_DA_CONSUL_SOCKET` and the host's state folder
through `IPAM_DA_CONSUL_STATE_DIR`, set in containerd's environment only. "Through the helper"
means a helper listens on that socket; "in-process" means none does, as on a node without it.

Every scenario checks KV against what containerd reports: PodSandboxStatus's IP, and each
interface's addresses from the CNI result containerd keeps (its verbose status), are the pool's
keys, whose values name the sandbox ID, the interface, the network and the pod's `K8S_POD_*`
names.

Deselect with `-m "not containerd"`. Timings (pod start with and without the helper, next to
`host-local` on the same containerd) are printed (`-s` shows them) and, with
IPDC_CRI_TIMINGS=FILE, written there as JSON. The burst is 20 pods through the helper and 4
in-process; the longer run (minutes more on 2 cores, most of it in-process calls running out of
their `timeout` and tried again) is
`IPDC_CRI_PODS_IN_PROCESS=20 .venv/bin/python -m pytest -s tests/e2e/test_containerd.py`.
IPDC_CRI_PLUGIN_LOG=FILE runs the verbose flavour, its debug log appended to FILE.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.support import cri
from tests.support.agent import ConsulAgent
from tests.support.plugin import executable
from tests.support.util_procs import Helper, wait_for

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "examples" / "kubernetes"
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
# The burst: through the helper, and in-process (a node without the helper), where 2 x n
# interpreters start at once (~0.5 s of CPU each); the longer run sets both to 20.
PODS = int(os.environ.get("IPDC_CRI_PODS", "20"))
PODS_IN_PROCESS = int(os.environ.get("IPDC_CRI_PODS_IN_PROCESS", "4"))
SAMPLES = int(os.environ.get("IPDC_CRI_SAMPLES", "5"))
PLUGIN_LOG = os.environ.get("IPDC_CRI_PLUGIN_LOG", "")
SANDBOX_ID = re.compile(r'sandbox "([0-9a-f]{64})"')
T = TypeVar("T")


def _missing() -> str | None:
    """Why this machine cannot run the test, or None."""
    if os.geteuid() != 0:
        return "containerd's CRI plugin with CNI networks needs root"
    for tool, package in (
        ("containerd", "containerd"),
        ("ctr", "containerd"),
        ("containerd-shim-runc-v2", "containerd"),
        ("runc", "runc"),
        ("nsenter", "util-linux"),
        ("ip", "iproute2"),
    ):
        if shutil.which(tool) is None:
            return f"`{tool}` missing: apt-get install {package} (scripts/setup.sh does)"
    for plugin in ("bridge", "loopback", "host-local"):
        if not (cri.CNI_PLUGINS / plugin).exists():
            need = "apt-get install containernetworking-plugins"
            return f"{cri.CNI_PLUGINS / plugin} missing: {need}"
    if not cri.static_elf(cri.BUSYBOX):
        return "no static /usr/bin/busybox for the sandbox image: apt-get install busybox-static"
    try:
        cri.cri_modules()
    except ImportError as exc:
        return f"no CRI client: {exc} (pip install '.[test]' installs grpcio and grpcio-tools)"
    return None


pytestmark = [pytest.mark.containerd]

TIMINGS: dict[str, Any] = {}


def record(name: str, value: Any) -> None:
    TIMINGS[name] = value
    print(f"\n[containerd timing] {name}: {value}")
    path = os.environ.get("IPDC_CRI_TIMINGS")
    if path:
        Path(path).write_text(json.dumps(TIMINGS, indent=2) + "\n")


def free_octet(*firsts: str) -> int:
    """x such that nothing on this host routes <first>.x.0/24 for each first two octets
    (test_podman uses 10.123.x, test_bridge 10.99.x)."""
    out = subprocess.run(
        ["ip", "-j", "-4", "route", "show", "table", "all"], capture_output=True, text=True
    )
    used = {r.get("dst", "") for r in json.loads(out.stdout or "[]")}
    for x in itertools.chain(range(os.getpid() % 200, 256), range(256)):
        if not any(dst.startswith(f"{f}.{x}.") for f in firsts for dst in used):
            return x
    raise RuntimeError(f"every {firsts}.x.0/24 is in use on this host")


def grpc_error() -> type[Exception]:
    import grpc

    return grpc.RpcError


# The one failure a busy node may give: the plugin's call ran out of its `timeout` (15 s from
# its process's start) before it got the CPU for its work.
OUT_OF_TIME = "ipam.timeout"


def retrying(call: Callable[[int], T], retries: int, errors: list[str]) -> T:
    """call(attempt), again after a back-off while it fails for lack of time, up to `retries`
    times; each such failure's message goes to `errors`."""
    for attempt in itertools.count():
        try:
            return call(attempt)
        except grpc_error() as exc:
            details = str(exc.details())  # type: ignore[attr-defined]
            if attempt >= retries or OUT_OF_TIME not in details:
                raise
            errors.append(details)
            back_off(attempt)
    raise AssertionError("unreachable")


def back_off(attempt: int) -> None:
    """The kubelet's pause before it tries a pod again: growing, and spread out, so that the
    pods that failed together do not all come back at the same instant."""
    time.sleep(min(20.0, 2.0 * 2**attempt) * random.uniform(0.5, 1.5))


# -- the node --------------------------------------------------------------------------------------
def conflist(name: str, bridge: str, ipam: dict[str, Any], gateway: bool) -> dict[str, Any]:
    """deploy/examples/kubernetes/10-consulnet.conflist's shape (tests/e2e/test_examples.py
    holds them equal) with this run's names."""
    return {
        "cniVersion": "1.0.0",
        "name": name,
        "plugins": [
            {
                "type": "bridge",
                "bridge": bridge,
                "isGateway": gateway,
                "ipMasq": False,
                "ipam": ipam,
            }
        ],
    }


def consul_ipam(url: str, pool: str) -> dict[str, Any]:
    return {"type": "ipam-da-consul", "consul_servers": [url], "pools": [{"name": pool}]}


@dataclass
class Node:
    """One Kubernetes node as the kubelet sees it: containerd's CRI, the helper (when on), and
    the networks its CNI folder holds."""

    containerd: cri.Containerd
    client: cri.CRI
    consul: ConsulAgent
    pool: str
    networks: list[str]  # eth0's network, eth1's
    helper_dir: Path
    helper: Helper | None = None
    names: Iterator[int] = field(default_factory=itertools.count)

    # -- the helper --------------------------------------------------------------------------
    @property
    def socket(self) -> str:
        return str(self.helper_dir / "run" / "helper.sock")

    @property
    def state_dir(self) -> Path:
        return self.helper_dir / "state"

    def helper_on(self) -> Helper:
        if self.helper is None:
            self.helper = Helper(self.helper_dir, stderr=self.helper_dir.parent / "helper.log")
            assert self.helper.socket == self.socket and self.helper.state_dir == str(
                self.state_dir
            )
        return self.helper

    def helper_off(self) -> None:
        if self.helper is not None:
            self.helper.close()
            self.helper = None
        assert not Path(self.socket).exists()

    def served(self) -> int:
        """Calls the running helper has run (0 without a helper)."""
        return self.helper.stats().get("served", 0) if self.helper is not None else 0

    def pending(self) -> list[str]:
        """Entries of the host's state folder with work left (cni/state.py)."""
        folder = self.state_dir / "pending"
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []

    # -- pods ----------------------------------------------------------------------------------
    def name(self, prefix: str) -> str:
        return f"{prefix}-{next(self.names)}"

    def run_pods(
        self,
        n: int,
        prefix: str,
        handler: str = "",
        retries: int = 0,
        keep_failed: bool = False,
    ) -> tuple[list[cri.Pod], list[str]]:
        """n RunPodSandbox calls at once, as the kubelet starts a node's pods. One that failed
        because the plugin ran out of its `timeout` (a busy node, in-process) is tried again
        after a pause (the kubelet's back-off, with the next attempt number), up to `retries`
        times; any other failure is raised. A failed try whose cleanup DEL failed too is kept
        by containerd (NOTREADY), with what its other network got: the kubelet removes such a
        sandbox, and so does this unless `keep_failed`. The pods, and the errors of the failed
        tries (each names its sandbox)."""
        names = [self.name(prefix) for _ in range(n)]
        errors: list[str] = []

        def run(name: str) -> cri.Pod:
            return retrying(
                lambda attempt: self.client.run_pod(name, "team-a", handler, attempt=attempt),
                retries,
                errors,
            )

        with ThreadPoolExecutor(max(1, n)) as ex:
            pods = list(ex.map(run, names))
        if not keep_failed:
            self.remove_failed_tries(errors)
        return pods, errors

    def remove_failed_tries(self, errors: list[str]) -> None:
        """Stop and remove the sandboxes these RunPodSandbox errors name, if still listed."""
        listed = self.client.pods()
        kept = [i for e in errors for i in SANDBOX_ID.findall(e) if i in listed]
        gone = [cri.Pod(i, "", "", "", 0.0) for i in kept]
        self.stop_pods(gone, retries=3)
        self.remove_pods(gone, retries=3)

    def stop_pods(self, pods: list[cri.Pod], retries: int = 0) -> list[str]:
        """StopPodSandbox of every pod at once; one whose DEL ran out of time is stopped again
        (the kubelet retries) up to `retries` times. The errors of the failed tries."""
        errors: list[str] = []

        def stop(pod: cri.Pod) -> None:
            retrying(lambda _: self.client.stop_pod(pod.id), retries, errors)

        with ThreadPoolExecutor(max(1, len(pods))) as ex:
            list(ex.map(stop, pods))
        return errors

    def remove_pods(self, pods: list[cri.Pod], retries: int = 0) -> None:
        """RemovePodSandbox of every pod at once. containerd 1.6 runs the CNI DELs again here
        (its forced stop tears the network down whenever the sandbox had one), which may run
        out of time like StopPodSandbox's: the kubelet retries, and so does this."""

        def remove(pod: cri.Pod) -> None:
            retrying(lambda _: self.client.remove_pod(pod.id), retries, [])

        with ThreadPoolExecutor(max(1, len(pods))) as ex:
            list(ex.map(remove, pods))

    # -- KV ------------------------------------------------------------------------------------
    def read(self, prefix: str) -> list[dict[str, Any]]:
        """A consistent listing: a server that has just started may answer a default read
        before it has replayed its log, with an older KV."""
        end = time.monotonic() + 30
        while True:
            r = self.consul.http.get(
                f"{self.consul.url}/v1/kv/{prefix}",
                params={"recurse": "true", "consistent": "true"},
                timeout=10,
            )
            if r.status_code == 404:
                return []
            if r.status_code == 200:
                return list(r.json())
            if time.monotonic() > end:  # "Not ready to serve consistent reads", past a while
                r.raise_for_status()
            time.sleep(0.2)

    def allocations(self) -> dict[str, dict[str, Any]]:
        folder = f"ipam/{self.pool}/"
        return {
            e["Key"][len(folder) :]: json.loads(base64.b64decode(e["Value"]))
            for e in self.read(folder)
            if e["Key"] != folder
        }

    def fences(self) -> dict[tuple[str, str, str], str]:
        """(network, container, ifname) -> the session the fence is tied to ("" if none), for
        this node's networks."""
        found: dict[tuple[str, str, str], str] = {}
        for network in self.networks:
            for e in self.read(f"ipam/.fences/{network}/"):
                _, _, net, container, ifname = e["Key"].split("/", 4)
                found[(net, container, ifname)] = e.get("Session") or ""
        return found

    def admin(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CONSUL_", "CNI_"))}
        env["CONSUL_HTTP_ADDR"] = self.consul.url
        return subprocess.run(
            [executable("ipam-da-consul-admin"), *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )

    # -- the check every scenario makes ------------------------------------------------------
    def check_pods(
        self,
        pods: list[cri.Pod],
        ifnames: tuple[str, ...] = ("eth0", "eth1"),
        failed: frozenset[str] = frozenset(),
    ) -> None:
        """What containerd says each pod got is what KV holds for it, and nothing else is
        held: one key per (pod, interface), naming the sandbox, the interface, its network and
        the pod's K8S_POD_* names; no address twice. Keys of `failed` sandboxes (whose
        RunPodSandbox failed) may still be there: what a failed call leaves in doubt is voided
        later, from the host's state folder."""
        held = self.allocations()
        expected: dict[str, tuple[str, str, str]] = {}
        for pod in pods:
            status = self.client.status(pod.id)
            assert status.state == "SANDBOX_READY", (pod, status)
            got = {i: status.interfaces.get(i, []) for i in ifnames}
            assert all(len(ips) == 1 for ips in got.values()), (pod, status)
            assert status.ip == got["eth0"][0] and status.additional_ips == [], status
            for ifname, network in zip(ifnames, self.networks, strict=False):
                [ip] = got[ifname]
                assert ip not in expected, f"{ip} reported for two attachments"
                expected[ip] = (pod.id, ifname, network)
                value = held.get(ip)
                assert value is not None, f"{pod.name}/{ifname} got {ip}, which KV does not hold"
                assert (value["target"], value["ifname"], value["network"]) == (
                    pod.id,
                    ifname,
                    network,
                ), value
                assert value["runtime"] == {
                    "K8S_POD_NAMESPACE": pod.namespace,
                    "K8S_POD_NAME": pod.name,
                    "K8S_POD_INFRA_CONTAINER_ID": pod.id,
                    "K8S_POD_UID": pod.uid,
                }, value
        extra = {ip: v for ip, v in held.items() if ip not in expected}
        assert all(v["target"] in failed for v in extra.values()), (
            f"KV holds addresses containerd never reported: {extra}"
        )


@pytest.fixture(scope="module")
def base() -> Iterator[Path]:
    """This run's folder: containerd's, the helper's and Consul's files all live under it, so
    that whatever names it (processes, mounts) is ours to clean up, now or, after a run that
    was killed, at the next run's start."""
    why = _missing()  # before anything starts
    if why:
        pytest.skip(why)
    for old, problems in cri.clean_leftovers().items():
        print(f"\n[containerd] cleaned up after a killed run: {old} {problems or ''}")
    # A short path: socket paths (containerd's, the helper's) must fit in sun_path.
    folder = Path(tempfile.mkdtemp(prefix=cri.PREFIX, dir="/tmp"))
    cri.record(folder)
    yield folder
    problems = cri.clean(folder)
    assert not problems, problems


@pytest.fixture(scope="module")
def consul(base: Path) -> Iterator[ConsulAgent]:
    """A single persistent server: stopped, it refuses connections as a dead agent does, and
    started again it still holds the allocations. Raft's production timings (multiplier 5)
    would spend 7-9 s electing itself at each of the many starts here; 1 takes 1-2 s."""
    agent = ConsulAgent(
        "containerd",
        dev=False,
        extra=["-bootstrap-expect", "1", "-hcl", "performance { raft_multiplier = 1 }"],
    )
    os.rmdir(agent.data_dir)
    agent.data_dir = str(base / "consul")
    agent.log_path = base / "consul" / "agent.log"
    os.mkdir(agent.data_dir, 0o700)
    agent.start()
    yield agent
    agent.close()


@pytest.fixture(scope="module")
def node(base: Path, consul: ConsulAgent) -> Iterator[Node]:
    x = free_octet("10.124", "10.125")
    pool = consul.create_pool(
        f"cri-{os.getpid()}",
        [
            {
                "subnet": f"10.124.{x}.0/24",
                "rangeStart": f"10.124.{x}.10",
                "rangeEnd": f"10.124.{x}.250",
                "gateway": f"10.124.{x}.1",
            }
        ],
    )
    tag = base.name[len(cri.PREFIX) :].lower().replace("_", "")
    networks = [f"ipdc-a-{tag}", f"ipdc-b-{tag}"]
    host_local = [f"ipdc-ha-{tag}", f"ipdc-hb-{tag}"]
    bridges = [f"ipdc{c}{tag[:8]}" for c in "abhi"]  # IFNAMSIZ: 15 characters at most
    forward = IP_FORWARD.read_text()
    cri.record(
        base,
        bridges=bridges,
        networks=networks + host_local,
        # The shims' socket folder, made by this run's first shim if not there yet.
        made=[str(p) for p in (cri.SHIM_SOCKETS.parent, cri.SHIM_SOCKETS) if not p.exists()],
    )
    # The bridges, made here with a MAC of their own. Left to Debian's bridge plugin (1.1.1),
    # a bridge whose first ADDs all failed before it got its gateway address (Consul down)
    # has lost its last port, and with it its MAC (00:00:00:00:00:00 on this kernel); the next
    # ADD then fails once, "could not set bridge's mac: invalid argument" (the plugin sets the
    # MAC it read before attaching the pod). Not this plugin's business.
    for i, bridge in enumerate(bridges):
        mac = f"02:1d:c0:{os.getpid() >> 8 & 0xFF:02x}:{os.getpid() & 0xFF:02x}:{i:02x}"
        for cmd in (
            ["ip", "link", "add", bridge, "type", "bridge"],
            ["ip", "link", "set", bridge, "address", mac, "up"],
        ):
            subprocess.run(cmd, check=True, capture_output=True)
    helper_dir = base / "helper"
    # The state folder's parent must exist: the plugin checks every folder above it first.
    helper_dir.mkdir(mode=0o700)
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("CNI_", "CONSUL_", "IPAM_DA_"))
    }
    # What the CNI plugins get: containerd's own environment.
    env["IPAM_DA_CONSUL_SOCKET"] = str(helper_dir / "run" / "helper.sock")
    env["IPAM_DA_CONSUL_STATE_DIR"] = str(helper_dir / "state")
    env["TMPDIR"] = str(base / "tmp")
    if PLUGIN_LOG:
        env["IPAM_DA_CONSUL_LOG_FILE"] = PLUGIN_LOG
    env["PATH"] = f"{env.get('PATH', '')}:/usr/sbin:/usr/bin:/sbin:/bin"
    cni_dir = base / "cni"
    overlay = cri.overlay_works(base)
    containerd = cri.Containerd(
        base,
        env,
        snapshotter="overlayfs" if overlay is None else "native",
        runtimes=[
            cri.Runtime("one", cni_dir / "one.d", 1),
            cri.Runtime("hostlocal", cni_dir / "hl.d", 2),
        ],
        conf_dir=cni_dir / "net.d",
        max_conf_num=2,
    )
    if overlay is not None:
        print(f"\n[containerd] overlay mounts fail here ({overlay}): native snapshotter")
    client: cri.CRI | None = None
    the_node: Node | None = None
    try:
        containerd.prepare()
        for plugin in ("bridge", "loopback", "host-local"):
            (containerd.bin_dir / plugin).symlink_to(cri.CNI_PLUGINS / plugin)
        # IPDC_CRI_PLUGIN_LOG=FILE: the verbose flavour under the same name, its debug log
        # (every call, state transition and Consul request, timed) appended to FILE.
        flavour = "ipam-da-consul-verbose" if PLUGIN_LOG else "ipam-da-consul"
        (containerd.bin_dir / "ipam-da-consul").symlink_to(executable(flavour))
        ours = [
            conflist(net, br, consul_ipam(consul.url, pool), gateway=(i == 0))
            for i, (net, br) in enumerate(zip(networks, bridges[:2], strict=True))
        ]
        hl = [
            conflist(
                net,
                br,
                {
                    "type": "host-local",
                    "dataDir": str(base / "host-local"),
                    "ranges": [
                        [
                            {
                                "subnet": f"10.125.{x}.0/24",
                                "rangeStart": f"10.125.{x}.10",
                                "rangeEnd": f"10.125.{x}.250",
                                "gateway": f"10.125.{x}.1",
                            }
                        ]
                    ],
                },
                gateway=(i == 0),
            )
            for i, (net, br) in enumerate(zip(host_local, bridges[2:], strict=True))
        ]
        # go-cni takes the configs in file-name order: the first is eth0, the next eth1.
        for folder, lists in (("net.d", ours), ("one.d", ours[:1]), ("hl.d", hl)):
            (cni_dir / folder).mkdir(exist_ok=True)
            for i, c in enumerate(lists):
                (cni_dir / folder / f"{10 * (i + 1)}-{c['name']}.conflist").write_text(
                    json.dumps(c, indent=1)
                )
        try:
            containerd.start()
            client = cri.CRI(containerd)
            info = client.wait_ready()
        except RuntimeError as exc:
            pytest.skip(f"containerd cannot run here: {str(exc)[-600:]}")
        loaded = [n["Config"]["Name"] for n in info["cniconfig"]["Networks"]]
        assert loaded == ["cni-loopback", *networks], loaded
        image = cri.build_image(base / "pause.tar")
        imported = containerd.ctr(
            "images", "import", "--snapshotter", containerd.snapshotter, str(image)
        )
        if imported.returncode != 0 or not client.image_present(cri.SANDBOX_IMAGE):
            pytest.skip(f"ctr cannot import an image here: {imported.stderr.strip()[-400:]}")
        the_node = Node(containerd, client, consul, pool, networks, helper_dir)
        # Can this machine run a pod at all (cgroups, namespaces, runc)? Not the plugin's
        # business: host-local answers that.
        try:
            probe = client.run_pod("probe", "kube-system", "hostlocal")
        except Exception as exc:
            pytest.skip(f"this machine cannot run a pod sandbox: {str(exc)[-600:]}")
        client.stop_pod(probe.id)
        client.remove_pod(probe.id)
        print(f"\n[containerd] {client.version()}, snapshotter {containerd.snapshotter}")
        yield the_node
    finally:
        if the_node is not None:
            the_node.helper_off()
        if client is not None:
            with contextlib.suppress(Exception):
                left = client.remove_all()
                if left:
                    print(f"\n[containerd] pods not removed: {left}")
            client.close()
        containerd.stop()  # the rest goes with the folder (`base`)
        if IP_FORWARD.read_text() != forward:
            IP_FORWARD.write_text(forward)


@pytest.fixture(params=["helper", "in-process"])
def mode(request: pytest.FixtureRequest, node: Node) -> Iterator[str]:
    if request.param == "helper":
        node.helper_on()
    else:
        node.helper_off()
    yield request.param
    node.helper_off()


@pytest.fixture
def up(node: Node) -> Iterator[Node]:
    """Consul running at the start of the test and again at its end; no pod left over."""
    if node.consul.proc is None:
        node.consul.start()
    yield node
    if node.consul.proc is None:
        node.consul.start()
    left = node.client.remove_all()
    assert not left, left


# -- the scenarios -------------------------------------------------------------------------------
def remove_failed(node: Node, failed: set[str], running: tuple[cri.Pod, ...] = ()) -> None:
    """A sandbox whose RunPodSandbox failed and whose cleanup DEL failed too stays listed
    (NOTREADY), for the kubelet to stop and remove once it can: do that. Nothing else but the
    running pods is listed."""
    listed = node.client.pods()
    for pod in running:
        assert listed.pop(pod.id) == "SANDBOX_READY"
    assert set(listed) <= failed and all(v == "SANDBOX_NOTREADY" for v in listed.values()), listed
    gone = [cri.Pod(pod_id, "", "", "", 0.0) for pod_id in listed]
    # A DEL may run out of time on a busy node, as the ADD did: the kubelet tries again.
    node.stop_pods(gone, retries=3)
    node.remove_pods(gone, retries=3)


def stop_and_remove(
    node: Node,
    pods: list[cri.Pod],
    ifnames: tuple[str, ...] = ("eth0", "eth1"),
    retries: int = 3,
) -> list[str]:
    """StopPodSandbox tears the networks down (DEL, in parallel): nothing of the pods is left
    in the pool once it returns, though containerd still lists them; RemovePodSandbox then
    removes them. Each DEL leaves its attachment's fence (README, "Fences"), tied to a Consul
    session that ends it later. The errors of StopPodSandbox tries that failed."""
    failed = node.stop_pods(pods, retries=retries)
    ids = {p.id for p in pods}
    assert not [v for v in node.allocations().values() if v["target"] in ids]
    listed = node.client.pods()
    assert all(listed[p.id] == "SANDBOX_NOTREADY" for p in pods), listed
    node.remove_pods(pods, retries=retries)
    assert not set(node.client.pods()) & ids
    assert not [v for v in node.allocations().values() if v["target"] in ids]
    fences = node.fences()
    ours = {(net, p.id, i) for p in pods for net, i in zip(node.networks, ifnames, strict=False)}
    assert ours <= set(fences), sorted(ours - set(fences))[:4]
    assert all(fences[k] for k in ours), "a fence tied to no session"
    return failed


def test_one_pod_on_one_network(up: Node, mode: str) -> None:
    node = up
    served = node.served()
    [pod], _ = node.run_pods(1, f"solo-{mode}", handler="one", retries=3)
    node.check_pods([pod], ifnames=("eth0",))
    status = node.client.status(pod.id)
    [ip] = status.interfaces["eth0"]
    # What the bridge plugin set inside the pod is what the plugin handed out.
    inside = cri.in_netns(status.netns, "ip", "-4", "-o", "addr", "show", "dev", "eth0")
    assert f" {ip}/24 " in inside, inside
    assert set(status.interfaces) == {"lo", "eth0"}  # "one" has one network
    if mode == "helper":
        assert node.served() >= served + 1, "the ADD did not go through the helper"
    who = node.admin("who-has", ip, "--json")
    assert who.returncode == 0, who
    [holder] = json.loads(who.stdout)
    assert holder["target"] == pod.id and holder["runtime"]["K8S_POD_NAME"] == pod.name
    stop_and_remove(node, [pod], ifnames=("eth0",))
    assert node.allocations() == {}
    assert node.pending() == []


def test_pods_at_once_on_two_networks_sharing_one_pool(up: Node, mode: str) -> None:
    """n pods at once, each attached to both networks in parallel by go-cni: 2n ADDs on one
    pool at the same moment, then 2n DELs. In-process on a small busy machine, a call may run
    out of its `timeout` (15 s, counted from the plugin process's start) before it gets the CPU
    for its write: the kubelet tries RunPodSandbox and StopPodSandbox again, and so does this
    test, up to 5 times. What a failed try leaves must be nothing once its sandbox is removed."""
    node = up
    n = PODS if mode == "helper" else PODS_IN_PROCESS
    pods, failed = node.run_pods(n, f"burst-{mode}", retries=5, keep_failed=True)
    # A failed try whose cleanup DEL failed too is kept (NOTREADY) with what its other
    # network got, until the kubelet stops and removes it: so does this test.
    refused = {i for e in failed for i in SANDBOX_ID.findall(e)}
    node.check_pods(pods, failed=frozenset(refused))
    remove_failed(node, refused, tuple(pods))
    node.check_pods(pods)
    held = node.allocations()
    assert len(held) == 2 * n

    # The operator finds each pod by its Kubernetes name.
    def ip_of(pod: cri.Pod) -> tuple[cri.Pod, subprocess.CompletedProcess[str]]:
        return pod, node.admin("ip-of", f"{pod.namespace}/{pod.name}", "--json")

    with ThreadPoolExecutor(4) as ex:
        for pod, out in ex.map(ip_of, pods):
            assert out.returncode == 0, out
            found = {(a["ifname"], a["ip"]) for a in json.loads(out.stdout)}
            status = node.client.status(pod.id)
            assert found == {(i, status.interfaces[i][0]) for i in ("eth0", "eth1")}
    stopped = stop_and_remove(node, pods, retries=5)
    assert node.allocations() == {}
    record(
        f"RunPodSandbox x{n} at once, two networks, {mode}",
        {
            "median s": round(statistics.median(p.seconds for p in pods), 2),
            "max s": round(max(p.seconds for p in pods), 2),
            "failed tries (run, stop)": [len(failed), len(stopped)],
            "why": sorted({e.rsplit(": ", 1)[-1] for e in failed + stopped}),
        },
    )
    if mode == "helper":
        assert not failed and not stopped
    assert node.pending() == []


def test_containerd_restarted_while_pods_run(up: Node) -> None:
    """containerd stops (as `systemctl restart containerd` does) while pods run: the pods go on
    in their shims, their addresses stay held, and the restarted containerd reports the same
    addresses and tears them down (DEL) on StopPodSandbox. In-process calls: the helper is
    tested elsewhere, and a node may well restart containerd without one."""
    node = up
    node.helper_off()
    pods, _ = node.run_pods(2, "restart", retries=3)
    node.check_pods(pods)
    held = node.allocations()
    before = {p.id: node.client.status(p.id) for p in pods}
    node.containerd.stop()
    for pod in pods:
        os.kill(before[pod.id].pid, 0)  # the sandbox process lives on
        status = before[pod.id]
        inside = cri.in_netns(status.netns, "ip", "-4", "-o", "addr", "show", "dev", "eth1")
        assert f" {status.interfaces['eth1'][0]}/24 " in inside
    assert node.allocations() == held
    node.containerd.start()
    node.client.wait_ready()
    after = {p.id: node.client.status(p.id) for p in pods}
    assert after == before
    node.check_pods(pods)
    assert node.allocations() == held  # not one byte rewritten
    stop_and_remove(node, pods)
    assert node.allocations() == {}
    assert node.pending() == []


def test_consul_stopped_during_run_pod_sandbox(up: Node, mode: str) -> None:
    """Consul down for a whole RunPodSandbox: it fails fast (the plugin gives up when no server
    can even be connected to, `consul_unreachable_grace`, 2 s, instead of its 15 s `timeout`),
    saying why. Through the helper, containerd's cleanup DEL is taken over and the sandbox is
    gone; in-process that DEL fails too (11) and containerd keeps the sandbox, NOTREADY, for
    the kubelet to remove later. Then Consul killed while pods start: whatever started,
    started whole, and once Consul is back and the pods are removed, nothing of any of them is
    left in the pool, not even a write whose reply the kill cut off."""
    node = up
    node.consul.stop()
    start = time.monotonic()
    with pytest.raises(grpc_error()) as failed:
        node.client.run_pod(node.name(f"noconsul-{mode}"), "team-a")
    took = time.monotonic() - start
    record(f"RunPodSandbox failing, Consul stopped, {mode} (s)", round(took, 2))
    details = failed.value.details()  # type: ignore[attr-defined]
    assert "failed to setup network" in details and "Consul" in details, details
    # Waiting out its `timeout` instead, the ADD alone would take 15 s.
    assert took < 15, f"{took:.1f} s to fail"
    refused = set(SANDBOX_ID.findall(details))
    if mode == "helper":
        assert node.client.pods() == {}
    node.consul.start()
    remove_failed(node, refused)
    assert node.allocations() == {}
    wait_for("nothing pending", lambda: node.pending() == [], timeout=30)

    results: list[cri.Pod | str] = []

    def start_pod(name: str) -> None:
        try:
            results.append(node.client.run_pod(name, "team-a"))
        except grpc_error() as exc:
            results.append(str(exc.details()))  # type: ignore[attr-defined]

    # Fewer in-process: each failed one costs four more in-process DELs to remove.
    cut = 4 if mode == "helper" else 2
    threads = [
        threading.Thread(target=start_pod, args=(node.name(f"cut-{mode}"),)) for _ in range(cut)
    ]
    for t in threads:
        t.start()
    # Cut Consul off as the writes land (how many pods make it varies; any split will do).
    with contextlib.suppress(AssertionError):
        wait_for("a first write", lambda: bool(node.allocations()), timeout=20)
    node.consul.stop(signal.SIGKILL)
    for t in threads:
        t.join(180)
    node.consul.start()
    started = [r for r in results if isinstance(r, cri.Pod)]
    errors = [r for r in results if isinstance(r, str)]
    record(f"pods started / failed as Consul was killed, {mode}", [len(started), len(errors)])
    assert len(results) == cut
    assert all("failed to setup network" in e for e in errors), errors
    refused = {i for e in errors for i in SANDBOX_ID.findall(e)}
    assert len(refused) == len(errors), errors
    node.check_pods(started, failed=frozenset(refused))
    left = [v for v in node.allocations().values() if v["target"] in refused]
    record(f"keys of failed pods in KV as Consul came back, {mode}", len(left))
    remove_failed(node, refused, tuple(started))
    # The node goes on starting pods: a call that reaches Consul also finishes what the
    # failed ones left in the host's state folder (the helper's replay does too).
    [later], _ = node.run_pods(1, f"later-{mode}", retries=3)
    node.check_pods([*started, later], failed=frozenset(refused))
    stop_and_remove(node, [*started, later])
    took = wait_for("nothing left in the pool", lambda: node.allocations() == {}, timeout=30)
    record(f"failed pods' writes gone, s after the last DEL, {mode}", round(took, 2))
    wait_for("nothing pending", lambda: node.pending() == [], timeout=30)


def test_pod_removed_while_consul_down_the_helper_takes_the_del_over(up: Node) -> None:
    """StopPodSandbox while Consul is down, through the helper: each DEL is kept in the host's
    state folder and answered done, so the kubelet's StopPodSandbox and RemovePodSandbox
    succeed; the addresses stay held (nobody else can get them) until Consul is back, when the
    helper releases them."""
    node = up
    helper = node.helper_on()
    pods, _ = node.run_pods(2, "takeover", retries=3)
    node.check_pods(pods)
    held = node.allocations()
    node.consul.stop()
    start = time.monotonic()
    node.stop_pods(pods)
    record("StopPodSandbox, Consul stopped, helper (s)", round(time.monotonic() - start, 2))
    node.remove_pods(pods)
    assert node.client.pods() == {}
    assert len(node.pending()) == 4  # one entry per attachment: 2 pods x 2 networks
    # Held back while Consul comes back, so that KV can be read before the replay.
    helper.stop()
    try:
        node.consul.start()
        assert node.allocations() == held
    finally:
        helper.resume()
    took = wait_for(
        "the helper released the addresses", lambda: node.allocations() == {}, timeout=30
    )
    record("addresses released after Consul came back, helper (s)", round(took, 2))
    wait_for("nothing pending", lambda: node.pending() == [], timeout=30)
    fences = node.fences()
    ifnames = ("eth0", "eth1")
    attachments = [(n, p.id, i) for p in pods for n, i in zip(node.networks, ifnames, strict=True)]
    assert all(fences.get(a) for a in attachments), fences


def test_pod_removed_while_consul_down_without_the_helper(up: Node) -> None:
    """The same without a helper: the DEL returns 11 (try again later), so StopPodSandbox
    fails and the pod stays; the kubelet's next StopPodSandbox, once Consul is back,
    releases the addresses."""
    node = up
    node.helper_off()
    pods, _ = node.run_pods(1, "nohelper", retries=3)
    node.check_pods(pods)
    node.consul.stop()
    with pytest.raises(grpc_error()) as failed:
        node.client.stop_pod(pods[0].id)
    details = failed.value.details()  # type: ignore[attr-defined]
    assert "failed to destroy network" in details and "Consul" in details, details
    assert pods[0].id in node.client.pods()
    node.consul.start()
    assert len(node.allocations()) == 2
    stop_and_remove(node, pods)
    assert node.allocations() == {}
    assert node.pending() == []


def test_pod_start_timings(up: Node) -> None:
    """RunPodSandbox to Ready (it returns once the sandbox is ready, networks attached) with
    both networks, one pod at a time, the earlier ones still running: host-local, then
    ipam-da-consul in-process and through the helper. A measurement for the README, not an
    assertion."""
    node = up
    table: dict[str, dict[str, float]] = {}
    for label, handler, helper in (
        ("host-local", "hostlocal", False),
        ("ipam-da-consul, in-process", "", False),
        ("ipam-da-consul, through the helper", "", True),
    ):
        if helper:
            node.helper_on()
        else:
            node.helper_off()
        pods = []
        for _ in range(SAMPLES):  # one after the other; the earlier ones go on running
            [pod], _ = node.run_pods(1, "timing", handler, retries=3)
            assert node.client.status(pod.id).state == "SANDBOX_READY"
            pods.append(pod)
        node.stop_pods(pods, retries=3)
        node.remove_pods(pods, retries=3)
        times = [p.seconds for p in pods]
        table[label] = {
            "median s": round(statistics.median(times), 3),
            "min s": round(min(times), 3),
            "max s": round(max(times), 3),
        }
        record(f"RunPodSandbox to Ready, two networks, {label}", table[label])
    assert node.allocations() == {}
    print("\n| pod start (RunPodSandbox, 2 networks) | median s | min s | max s |")
    print("|---|---:|---:|---:|")
    for label, t in table.items():
        print(f"| {label} | {t['median s']} | {t['min s']} | {t['max s']} |")
