"""Debian's containerd with its CRI plugin, run as a private instance, and a CRI client.

Kubernetes reaches CNI through a CRI runtime: the kubelet calls `RunPodSandbox`, and
containerd's CRI plugin (go-cni over libcni) runs the network configs of its CNI folder (up to
`max_conf_num`) for the pod, in parallel, and `StopPodSandbox` tears them down. This module
plays the kubelet (gRPC, `runtime.v1`, from the CRI proto vendored in `cri_api/`) against a
containerd that shares nothing with the machine's own: its config, root, state, sockets, runc
root, CNI folders and network namespaces are all under one temporary folder. What containerd
1.6 does not let a config move is said here, and cleaned up by `clean`:

- shim sockets: `/run/containerd/s/<sha256(address/namespace/id)>` (the shim's socket root is
  compiled in); removed by the shim when it exits, and here by name if it did not;
- libcni's result cache: `/var/lib/cni/results/<network>-<sandbox>-<ifname>` (go-cni 1.1 sets
  no cache folder); removed by the DEL, and here by network name (each run names its networks
  after its own folder) and sandbox ID if a DEL never came;
- `/run/containerd` and `/run/containerd/s` themselves, when the run made them: removed here
  if empty.

A run that was killed leaves its folder behind with a record of what it made (`leftovers.json`):
the next run cleans it up before starting (`clean_leftovers`).

No registry is ever contacted: the sandbox ("pause") image is built here from busybox-static
and imported with `ctr`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PROTO = Path(__file__).parent / "cri_api" / "api.proto"
CNI_PLUGINS = Path("/usr/lib/cni")
BUSYBOX = Path("/usr/bin/busybox")
SANDBOX_IMAGE = "localhost/ipdc-pause:1"
NAMESPACE = "k8s.io"  # the containerd namespace the CRI plugin works in
PREFIX = "ipdc-cri-"  # this module's folders under /tmp, and its cgroup parent
SHIM_SOCKETS = Path("/run/containerd/s")
CNI_CACHE = Path("/var/lib/cni/results")
# The module name the generated code is imported under: "api" would be anyone's.
_MODULE = "ipdc_cri_runtime_v1"


# -- the CRI API ---------------------------------------------------------------------------------
def cri_modules() -> tuple[Any, Any]:
    """The CRI `runtime.v1` messages and stubs, compiled from the vendored proto by the
    installed grpcio-tools on first use (kept in `.cache/cri/`, keyed by the proto's and the
    compiler's versions): nothing generated is committed, so the code always matches the
    installed protobuf runtime. ImportError when grpcio / grpcio-tools are missing."""
    import grpc  # noqa: F401  (ImportError here names what is missing)
    import grpc_tools
    from grpc_tools import protoc

    version = getattr(grpc_tools, "__version__", "") or _dist_version("grpcio-tools")
    key = hashlib.sha256(PROTO.read_bytes() + version.encode()).hexdigest()[:16]
    out = ROOT / ".cache" / "cri" / key
    if not (out / f"{_MODULE}_pb2_grpc.py").exists():
        work = out.with_name(f"{key}.tmp{os.getpid()}")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        shutil.copyfile(PROTO, work / f"{_MODULE}.proto")
        include = Path(protoc.__file__).parent / "_proto"
        rc = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{work}",
                f"-I{include}",
                f"--python_out={work}",
                f"--grpc_python_out={work}",
                str(work / f"{_MODULE}.proto"),
            ]
        )
        if rc != 0:
            raise RuntimeError(f"grpcio-tools {version} could not compile {PROTO} (exit {rc})")
        with contextlib.suppress(OSError):  # another process may have won the race
            work.rename(out)
        shutil.rmtree(work, ignore_errors=True)
    if str(out) not in sys.path:
        sys.path.insert(0, str(out))  # the _grpc module imports the _pb2 one by its bare name
    import importlib

    return importlib.import_module(f"{_MODULE}_pb2"), importlib.import_module(f"{_MODULE}_pb2_grpc")


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


# -- the sandbox image ---------------------------------------------------------------------------
def _arch() -> str:
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def _add(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, 0
    tar.addfile(info, io.BytesIO(data))


def build_image(path: Path, busybox: Path = BUSYBOX, name: str = SANDBOX_IMAGE) -> Path:
    """An OCI image layout in a tar file, for `ctr images import`: one uncompressed layer with
    a static busybox as /bin/busybox, whose entrypoint sleeps (the sandbox container only holds
    the pod's namespaces; CRI stops it with SIGKILL, so PID 1 need not handle signals)."""
    layer_buf = io.BytesIO()
    with tarfile.open(fileobj=layer_buf, mode="w", format=tarfile.PAX_FORMAT) as layer:
        folder = tarfile.TarInfo("bin")
        folder.type, folder.mode, folder.mtime = tarfile.DIRTYPE, 0o755, 0
        layer.addfile(folder)
        _add(layer, "bin/busybox", busybox.read_bytes(), 0o755)
    layer_bytes = layer_buf.getvalue()
    layer_digest = "sha256:" + hashlib.sha256(layer_bytes).hexdigest()
    config = json.dumps(
        {
            "architecture": _arch(),
            "os": "linux",
            "config": {"Entrypoint": ["/bin/busybox", "sleep", "86400"], "WorkingDir": "/"},
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        },
        sort_keys=True,
    ).encode()
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer_digest,
                    "size": len(layer_bytes),
                }
            ],
        },
        sort_keys=True,
    ).encode()
    manifest_digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    index = json.dumps(
        {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": manifest_digest,
                    "size": len(manifest),
                    "platform": {"architecture": _arch(), "os": "linux"},
                    # ctr names the imported image after this annotation.
                    "annotations": {
                        "io.containerd.image.name": name,
                        "org.opencontainers.image.ref.name": name.rsplit(":", 1)[1],
                    },
                }
            ],
        },
        sort_keys=True,
    ).encode()
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        _add(tar, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        _add(tar, "index.json", index)
        for digest, blob in (
            (layer_digest, layer_bytes),
            (config_digest, config),
            (manifest_digest, manifest),
        ):
            _add(tar, f"blobs/sha256/{digest.split(':', 1)[1]}", blob)
    return path


# -- machine checks ------------------------------------------------------------------------------
def static_elf(path: Path) -> bool:
    """An ELF executable without an interpreter (PT_INTERP) runs in an empty root file system;
    Debian's plain `busybox` package is dynamically linked and would not."""
    try:
        head = path.read_bytes()[:65536]
    except OSError:
        return False
    if head[:5] != b"\x7fELF\x02":  # 64-bit ELF
        return False
    phoff = int.from_bytes(head[0x20:0x28], "little")
    size = int.from_bytes(head[0x36:0x38], "little")
    count = int.from_bytes(head[0x38:0x3A], "little")
    types = {
        int.from_bytes(head[phoff + i * size : phoff + i * size + 4], "little")
        for i in range(count)
    }
    return 3 not in types  # PT_INTERP


def overlay_works(folder: Path) -> str | None:
    """None when an overlay mount works on `folder`'s file system (what containerd's overlayfs
    snapshotter needs), else why not."""
    probe = folder / "overlay-probe"
    dirs = {n: probe / n for n in ("lower", "upper", "work", "merged")}
    try:
        for d in dirs.values():
            d.mkdir(parents=True)
        opts = f"lowerdir={dirs['lower']},upperdir={dirs['upper']},workdir={dirs['work']}"
        p = subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", opts, str(dirs["merged"])],
            capture_output=True,
            text=True,
        )
        if p.returncode != 0:
            return p.stderr.strip() or f"mount exited {p.returncode}"
        subprocess.run(["umount", str(dirs["merged"])], capture_output=True)
        return None
    finally:
        shutil.rmtree(probe, ignore_errors=True)


# -- the instance --------------------------------------------------------------------------------
@dataclass
class Runtime:
    """A CRI runtime handler: its own CNI config folder and how many configs a pod gets."""

    name: str
    conf_dir: Path
    max_conf_num: int


@dataclass
class Containerd:
    """One private containerd: `start`, `stop` (the pods go on running in their shims, as on a
    node where containerd restarts), `start` again, `close` (everything gone)."""

    base: Path
    env: dict[str, str]
    snapshotter: str = "overlayfs"
    runtimes: list[Runtime] = field(default_factory=list)
    conf_dir: Path | None = None
    max_conf_num: int = 2
    proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return str(self.base / "c.sock")

    @property
    def bin_dir(self) -> Path:
        return self.base / "cni" / "bin"

    @property
    def log_path(self) -> Path:
        return self.base / "containerd.log"

    @property
    def cgroup_parent(self) -> str:
        return f"/{self.base.name}"

    def config(self) -> str:
        b = self.base
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        lines = [
            "version = 2",
            f'root = "{b / "root"}"',
            f'state = "{b / "state"}"',
            f'temp = "{b / "tmp"}"',
            # Plugins that would look at the machine or are not needed: fewer to load.
            'disabled_plugins = ["io.containerd.snapshotter.v1.aufs", '
            '"io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", '
            '"io.containerd.snapshotter.v1.devmapper", "io.containerd.internal.v1.tracing", '
            '"io.containerd.tracing.processor.v1.otlp"]',
            "[grpc]",
            f'  address = "{self.address}"',
            "[ttrpc]",
            f'  address = "{self.address}.ttrpc"',
            '[plugins."io.containerd.internal.v1.opt"]',
            f'  path = "{b / "opt"}"',
            # The tasks service needs the v1 runtime loaded; it never runs a pod here.
            '[plugins."io.containerd.runtime.v1.linux"]',
            f'  runtime_root = "{b / "runc-v1"}"',
            f"[{cri}]",
            f'  sandbox_image = "{SANDBOX_IMAGE}"',
            "  disable_apparmor = true",
            # The sandbox asks for oom_score_adj -998; lowering it below ours needs
            # CAP_SYS_RESOURCE, which a test machine may not give root (runc then fails).
            "  restrict_oom_score_adj = true",
            # The pods' network namespaces under our state folder, not /var/run/netns.
            "  netns_mounts_under_state_dir = true",
            '  stream_server_address = "127.0.0.1"',
            '  stream_server_port = "0"',
            f"[{cri}.cni]",
            f'  bin_dir = "{self.bin_dir}"',
            f'  conf_dir = "{self.conf_dir or b / "cni" / "net.d"}"',
            f"  max_conf_num = {self.max_conf_num}",
            f"[{cri}.registry]",
            f'  config_path = "{b / "certs.d"}"',
            f"[{cri}.containerd]",
            f'  snapshotter = "{self.snapshotter}"',
            '  default_runtime_name = "runc"',
        ]
        for name, conf_dir, max_conf in [
            ("runc", None, 0),
            *((r.name, r.conf_dir, r.max_conf_num) for r in self.runtimes),
        ]:
            lines += [
                f"[{cri}.containerd.runtimes.{name}]",
                '  runtime_type = "io.containerd.runc.v2"',
            ]
            if conf_dir is not None:
                lines += [f'  cni_conf_dir = "{conf_dir}"', f"  cni_max_conf_num = {max_conf}"]
            lines += [
                f"[{cri}.containerd.runtimes.{name}.options]",
                # runc's state: ours, not /run/containerd/runc.
                f'  Root = "{b / "runc"}"',
                "  SystemdCgroup = false",
            ]
        return "\n".join(lines) + "\n"

    def prepare(self) -> None:
        for sub in ("root", "state", "tmp", "opt", "runc", "certs.d", "cni/bin", "cni/net.d"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        (self.base / "config.toml").write_text(self.config())

    def start(self, timeout: float = 60.0) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                ["containerd", "--config", str(self.base / "config.toml"), "--log-level", "info"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                # Its own process group: a Ctrl-C of pytest is not containerd's business.
                start_new_session=True,
            )
        end = time.monotonic() + timeout
        while not Path(self.address).exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"containerd exited: {self.log_tail()}")
            if time.monotonic() > end:
                raise RuntimeError(f"containerd made no socket in {timeout} s: {self.log_tail()}")
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """containerd alone: the shims, and so the pods, keep running."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def ctr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ctr", "--address", self.address, "--namespace", NAMESPACE, *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
        )

    def close(self) -> list[str]:
        """Stop containerd and remove everything of this instance; what could not be, said."""
        self.stop()
        return clean(self.base)


# -- clean-up, this run's or a killed one's --------------------------------------------------------
def record(base: Path, **what: Any) -> None:
    """What a run made outside its folder, for `clean` (a killed run's, by the next run)."""
    path = base / "leftovers.json"
    known = json.loads(path.read_text()) if path.exists() else {}
    for k, v in what.items():
        known[k] = sorted({*known.get(k, []), *v})
    known["pid"] = os.getpid()
    path.write_text(json.dumps(known))


def _processes_of(base: Path) -> list[int]:
    """Processes whose command line names our folder: containerd, its shims, a helper."""
    mine, found = os.getpid(), []
    needle = str(base).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == mine:
            continue
        try:
            if needle in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _mounts_under(base: Path) -> list[str]:
    prefix = str(base) + "/"
    points = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            point = line.split()[4].replace("\\040", " ")
            if point.startswith(prefix):
                points.append(point)
    return sorted(points, key=len, reverse=True)  # the deepest first


def clean(base: Path) -> list[str]:
    """Remove everything a run under `base` made: its containers (runc delete), processes,
    mounts (pod network namespaces, rootfs, shm), shim sockets, bridges, libcni cache files,
    cgroups and the folder itself. What it could not remove, said."""
    problems: list[str] = []
    runc_root = base / "runc"
    if runc_root.is_dir():
        for ns in runc_root.iterdir():
            listed = subprocess.run(
                ["runc", "--root", str(ns), "list", "-q"], capture_output=True, text=True
            )
            for cid in listed.stdout.split():
                subprocess.run(
                    ["runc", "--root", str(ns), "delete", "--force", cid], capture_output=True
                )
    for pid in _processes_of(base):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    end = time.monotonic() + 10
    while _processes_of(base) and time.monotonic() < end:
        time.sleep(0.05)
    for point in _mounts_under(base):
        p = subprocess.run(["umount", "-l", point], capture_output=True, text=True)
        if p.returncode != 0:
            problems.append(f"umount {point}: {p.stderr.strip()}")
    tasks = base / "state" / "io.containerd.runtime.v2.task"
    address = str(base / "c.sock")
    if tasks.is_dir():
        for ns in tasks.iterdir():
            for bundle in ns.iterdir() if ns.is_dir() else []:
                digest = hashlib.sha256(f"{address}/{ns.name}/{bundle.name}".encode()).hexdigest()
                with contextlib.suppress(OSError):
                    (SHIM_SOCKETS / digest).unlink()
    known: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        known = json.loads((base / "leftovers.json").read_text())
    for bridge in known.get("bridges", []):
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)
    sandboxes = base / "root" / "io.containerd.grpc.v1.cri" / "sandboxes"
    ids = [d.name for d in sandboxes.iterdir()] if sandboxes.is_dir() else []
    # libcni names a cached result <network>-<container>-<ifname>; CRI's loopback network
    # ("cni-loopback") is everyone's, so those go by sandbox ID.
    patterns = [f"{n}-*" for n in known.get("networks", [])] + [f"*-{i}-*" for i in ids]
    for pattern in patterns if CNI_CACHE.is_dir() else []:
        for cached in CNI_CACHE.glob(pattern):
            with contextlib.suppress(OSError):
                cached.unlink()
    for made in reversed(known.get("made", [])):
        with contextlib.suppress(OSError):
            Path(made).rmdir()  # only if empty: another containerd may use it by now
    cgroups = Path("/sys/fs/cgroup")
    for top in [cgroups, *(d for d in cgroups.iterdir() if d.is_dir())] if cgroups.is_dir() else []:
        parent = top / base.name
        if parent.is_dir():
            for d in sorted(parent.rglob("*"), key=lambda p: len(str(p)), reverse=True):
                if d.is_dir():
                    with contextlib.suppress(OSError):
                        d.rmdir()
            with contextlib.suppress(OSError):
                parent.rmdir()
    if _mounts_under(base):
        problems.append(f"mounts left under {base}")
    else:
        shutil.rmtree(base, ignore_errors=True)
    return problems


def clean_leftovers(parent: Path = Path("/tmp")) -> dict[str, list[str]]:
    """Clean the folders of earlier runs whose process is gone (killed before its teardown):
    each folder cleaned, with what could not be."""
    cleaned = {}
    for base in parent.glob(f"{PREFIX}*"):
        try:
            pid = json.loads((base / "leftovers.json").read_text())["pid"]
        except (OSError, ValueError, KeyError):
            pid = None
        if pid is not None and Path(f"/proc/{pid}").exists():
            continue  # a run still going on
        cleaned[str(base)] = clean(base)
    return cleaned


# -- the client ------------------------------------------------------------------------------------
@dataclass
class Pod:
    id: str
    name: str
    namespace: str
    uid: str
    seconds: float  # RunPodSandbox's wall time: the pod is Ready when it returns


@dataclass
class PodStatus:
    state: str  # SANDBOX_READY / SANDBOX_NOTREADY
    ip: str
    additional_ips: list[str]
    # Every interface's addresses, from the CNI result containerd kept (verbose status).
    interfaces: dict[str, list[str]]
    netns: str
    pid: int  # the sandbox process


class CRI:
    """The kubelet's side of CRI, as much of it as these tests need."""

    def __init__(self, containerd: Containerd) -> None:
        import grpc

        self.api, stubs = cri_modules()
        self.containerd = containerd
        self.channel = grpc.insecure_channel(f"unix://{containerd.address}")
        self.runtime = stubs.RuntimeServiceStub(self.channel)
        self.images = stubs.ImageServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def wait_ready(self, timeout: float = 60.0) -> dict[str, Any]:
        """Until the CRI plugin says its runtime and network are ready; its verbose info."""
        import grpc

        end = time.monotonic() + timeout
        last = ""
        while time.monotonic() < end:
            try:
                r = self.runtime.Status(self.api.StatusRequest(verbose=True), timeout=5)
                ready = {c.type: c.status for c in r.status.conditions}
                if ready.get("RuntimeReady") and ready.get("NetworkReady"):
                    return {k: _json_or_text(v) for k, v in r.info.items()}
                last = str(r.status)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED:  # the CRI plugin did not load
                    raise RuntimeError(
                        f"containerd serves no CRI: {self.containerd.log_tail()}"
                    ) from None
                last = str(exc)
            time.sleep(0.1)
        raise RuntimeError(f"CRI not ready after {timeout} s: {last}\n{self.containerd.log_tail()}")

    def version(self) -> str:
        r = self.runtime.Version(self.api.VersionRequest(), timeout=10)
        return f"{r.runtime_name} {r.runtime_version} (CRI {r.runtime_api_version})"

    def image_present(self, image: str) -> bool:
        r = self.images.ImageStatus(
            self.api.ImageStatusRequest(image=self.api.ImageSpec(image=image)), timeout=10
        )
        return r.HasField("image")

    def pod_config(
        self, name: str, namespace: str, uid: str, logs: Path, attempt: int = 0
    ) -> Any:
        api = self.api
        return api.PodSandboxConfig(
            metadata=api.PodSandboxMetadata(
                name=name, uid=uid, namespace=namespace, attempt=attempt
            ),
            hostname=name[:63],
            log_directory=str(logs),
            labels={"io.kubernetes.pod.name": name, "io.kubernetes.pod.namespace": namespace},
            linux=api.LinuxPodSandboxConfig(cgroup_parent=self.containerd.cgroup_parent),
        )

    def run_pod(
        self,
        name: str,
        namespace: str = "default",
        handler: str = "",
        timeout: float = 120,
        attempt: int = 0,
    ) -> Pod:
        """RunPodSandbox; the pod's UID is its name's (so a retry is the same pod)."""
        uid = hashlib.sha256(f"{namespace}/{name}".encode()).hexdigest()[:32]
        uid = f"{uid[:8]}-{uid[8:12]}-{uid[12:16]}-{uid[16:20]}-{uid[20:32]}"
        logs = self.containerd.base / "logs" / f"{namespace}_{name}"
        logs.mkdir(parents=True, exist_ok=True)
        request = self.api.RunPodSandboxRequest(
            config=self.pod_config(name, namespace, uid, logs, attempt), runtime_handler=handler
        )
        start = time.monotonic()
        r = self.runtime.RunPodSandbox(request, timeout=timeout)
        return Pod(r.pod_sandbox_id, name, namespace, uid, time.monotonic() - start)

    def status(self, pod_id: str) -> PodStatus:
        r = self.runtime.PodSandboxStatus(
            self.api.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=True), timeout=30
        )
        info = json.loads(r.info.get("info", "{}"))
        result = info.get("cniResult") or {}
        interfaces = {
            name: [str(c["IP"]) for c in (iface.get("IPConfigs") or [])]
            for name, iface in (result.get("Interfaces") or {}).items()
            if iface.get("IPConfigs")
        }
        namespaces = ((info.get("runtimeSpec") or {}).get("linux") or {}).get("namespaces") or []
        netns = next((n.get("path", "") for n in namespaces if n.get("type") == "network"), "")
        s = r.status
        return PodStatus(
            state=self.api.PodSandboxState.Name(s.state),
            ip=s.network.ip,
            additional_ips=[a.ip for a in s.network.additional_ips],
            interfaces=interfaces,
            netns=str(netns),
            pid=int(info.get("pid") or 0),
        )

    def stop_pod(self, pod_id: str, timeout: float = 120) -> None:
        self.runtime.StopPodSandbox(
            self.api.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=timeout
        )

    def remove_pod(self, pod_id: str, timeout: float = 120) -> None:
        self.runtime.RemovePodSandbox(
            self.api.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=timeout
        )

    def pods(self) -> dict[str, str]:
        """id -> state of every pod sandbox containerd knows."""
        r = self.runtime.ListPodSandbox(self.api.ListPodSandboxRequest(), timeout=30)
        return {p.id: self.api.PodSandboxState.Name(p.state) for p in r.items}

    def remove_all(self, rounds: int = 3) -> list[str]:
        """Stop and remove every pod, a few at a time, in up to `rounds` rounds (a CNI DEL may
        fail for a while, as it does for the kubelet); what still failed, said."""
        import grpc

        def remove(pod_id: str) -> str | None:
            try:
                self.stop_pod(pod_id)
                self.remove_pod(pod_id)
            except grpc.RpcError as exc:
                return f"{pod_id}: {exc.details()}"
            return None

        failed: list[str] = []
        for round_ in range(rounds):
            if round_:
                time.sleep(2)
            with ThreadPoolExecutor(4) as ex:
                failed = [f for f in ex.map(remove, list(self.pods())) if f]
            if not failed:
                break
        return failed


def _json_or_text(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value


def in_netns(netns: str, *cmd: str) -> str:
    """Run a command in a pod's network namespace (containerd's bind mount of it)."""
    p = subprocess.run(
        ["nsenter", f"--net={netns}", *cmd], capture_output=True, text=True, timeout=30
    )
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} in {netns}: {p.stderr}")
    return p.stdout
