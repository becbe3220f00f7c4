"""The Debian package (scripts/build-deb.sh) through its whole life, with Debian's own dpkg and
lintian: built from the single-file build, lintian-clean, installed, a real ADD and DEL through
Debian's `bridge` plugin from the installed path, upgraded to a rebuilt package of a higher
version, removed, purged; what is on disk checked after each step.

Where: a throwaway root, this machine's own root seen through an overlay (its changes kept
in a folder of the test, in a private mount namespace), entered with chroot. dpkg, its
database, the maintainer scripts, deb-systemd-helper, python3 and the bridge plugin are this
machine's, unchanged; nothing of the package or its scripts touches the machine itself, which
other tests and runtimes share. Consul and the network namespaces are the host's (the root
shares its network). No systemd runs here (no /run/systemd/system), so the scripts take their
no-systemd branch: units enabled by deb-systemd-helper's links, nothing started; the
restart on upgrade is debhelper's `deb-systemd-invoke try-restart`, which only runs under
systemd (docs/packaging.md).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_bridge import free_subnet_octet, ip, ip_json
from tests.e2e.test_singlefile import single_file_bin  # noqa: F401  (a fixture)
from tests.support.agent import ConsulAgent

ROOT = Path(__file__).resolve().parents[2]
VERSION = re.findall(r'^__version__ = "(.+)"$',
                     (ROOT / "src/ipam_da_consul/__init__.py").read_text(), re.M)[0]
UPGRADE = f"{VERSION}+t2"
BRIDGE = Path("/usr/lib/cni/bridge")
NAMES = ("ipam-da-consul", "ipam-da-consul-verbose", "ipam-da-consul-admin",
         "ipam-da-consul-helper")
UNITS = ("ipam-da-consul-helper.socket", "ipam-da-consul-helper.service",
         "ipam-da-consul-usage.service", "ipam-da-consul-usage.timer",
         "ipam-da-consul-reconcile.service", "ipam-da-consul-reconcile.timer")
ENABLED = {"sockets.target.wants": "ipam-da-consul-helper.socket",
           "timers.target.wants": ("ipam-da-consul-usage.timer",
                                   "ipam-da-consul-reconcile.timer")}
TEXTFILE = "/var/lib/node-exporter-test/ipam-da-consul.prom"
LINKS = {
    "/usr/lib/cni/ipam-da-consul": "/opt/cni/bin/ipam-da-consul",
    "/usr/lib/cni/ipam-da-consul-verbose": "/opt/cni/bin/ipam-da-consul-verbose",
    "/usr/bin/ipam-da-consul-admin": "/opt/cni/bin/ipam-da-consul-admin",
    "/usr/sbin/ipam-da-consul-helper": "/opt/cni/bin/ipam-da-consul-helper",
}


def wants_links() -> dict[str, str]:
    return {f"/etc/systemd/system/{wants}/{unit}": f"/lib/systemd/system/{unit}"
            for wants, units in ENABLED.items()
            for unit in ((units,) if isinstance(units, str) else units)}

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: dpkg, mounts, chroot"),
    pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb"),
    pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux's unshare"),
    pytest.mark.skipif(not BRIDGE.exists(),
                       reason=f"{BRIDGE} is missing: apt-get install containernetworking-plugins"),
]

# Mounts the overlay in a private mount namespace, the host's /proc, /sys, /dev and network
# namespaces inside it, and runs the command chrooted there.
_ENTER = """
set -e
mount -t overlay overlay -o "lowerdir=/,upperdir=$UPPER,workdir=$WORK" "$MERGED"
for d in proc sys dev run/netns; do
  mkdir -p "/$d" "$MERGED/$d"
  mount --rbind "/$d" "$MERGED/$d"
done
exec chroot "$MERGED" "$@"
"""


@dataclass
class Root:
    """This machine's root through an overlay: the same files, changes kept in `upper`."""

    base: Path

    def __post_init__(self) -> None:
        for d in ("upper", "work", "merged"):
            (self.base / d).mkdir(parents=True)
        probe = self.run("true", check=False)
        if probe.returncode != 0:
            pytest.skip(f"cannot mount an overlay of / here: {probe.stderr.strip()}")
        # A fresh machine: whatever this one's own calls left is not the package's.
        self.run("rm", "-rf", "/var/lib/ipam-da-consul", "/var/log/cni/ipam-da-consul.log")
        # man-db's trigger rebuilds every page's index after each dpkg run: seconds that test
        # nothing of ours (the root's own setting; the host's stays).
        self.run("sh", "-c", "echo 'man-db man-db/auto-update boolean false' | "
                 "debconf-set-selections")

    @property
    def upper(self) -> Path:
        return self.base / "upper"

    def run(self, *argv: str, env: dict[str, str] | None = None, check: bool = True,
            stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
        full = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
                "DEBIAN_FRONTEND": "noninteractive", "UPPER": str(self.upper),
                "WORK": str(self.base / "work"), "MERGED": str(self.base / "merged"),
                **(env or {})}
        done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                               _ENTER, "sh", *argv], env=full, capture_output=True,
                              input=stdin, timeout=300)
        out = subprocess.CompletedProcess(
            done.args, done.returncode, done.stdout.decode(errors="replace"),
            done.stderr.decode(errors="replace"))
        if check:
            assert out.returncode == 0, (argv, out.stdout[-2000:], out.stderr[-2000:])
        return out

    def path(self, inside: str) -> Path:
        """Where a path of the root is, if the package or its scripts changed it: the upper
        folder (a file the root never changed is the host's, and not of interest here). Its
        folder as the host resolves it: /lib is /usr/lib on a merged-/usr system."""
        folder, name = os.path.split(inside)
        return self.upper / os.path.realpath(folder).lstrip("/") / name

    def present(self, *paths: str) -> set[str]:
        """Which of `paths` the root has (files, folders or links, dangling or not): one
        entry into the root for all of them."""
        script = 'for p; do if [ -e "$p" ] || [ -L "$p" ]; then echo "$p"; fi; done'
        return set(self.run("sh", "-c", script, "sh", *paths).stdout.split())

    def exists(self, inside: str) -> bool:
        return bool(self.present(inside))

    def links(self, *paths: str) -> dict[str, str]:
        """Where each of `paths` that is a symbolic link points."""
        script = 'for p; do if [ -L "$p" ]; then echo "$p $(readlink "$p")"; fi; done'
        rows = self.run("sh", "-c", script, "sh", *paths).stdout.splitlines()
        return dict(row.split(" ", 1) for row in rows)

    def link(self, inside: str) -> str | None:
        return self.links(inside).get(inside)

    def status(self) -> str:
        done = self.run("dpkg-query", "-W", "-f", "${Status} ${Version}", "ipam-da-consul",
                        check=False)
        return done.stdout.strip() if done.returncode == 0 else "not known"

    def changed(self) -> set[str]:
        """Every file or link the root holds that the host does not (dpkg's own records and
        what the root's mounts left aside)."""
        out = set()
        for path in self.upper.rglob("*"):
            rel = "/" + path.relative_to(self.upper).as_posix()
            st = path.lstat()
            if stat.S_ISDIR(st.st_mode) or (stat.S_ISCHR(st.st_mode) and st.st_rdev == 0):
                continue  # a folder, or overlayfs's mark of a file removed
            if rel.startswith(("/var/lib/dpkg/", "/var/log/dpkg.log", "/var/cache/man/",
                               "/var/cache/debconf/", "/var/log/apt/")):
                continue
            out.add(rel)
        return out


@pytest.fixture(scope="module")
def debs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
        tuple[Path, Path, subprocess.Popen[str]]]:
    """The package as shipped (build-deb.sh, lintian running on it meanwhile), and a rebuild of
    a higher version to upgrade to."""
    single: Path = request.getfixturevalue("single_file_bin")
    out = tmp_path_factory.mktemp("debs")
    first = subprocess.Popen(
        ["bash", str(ROOT / "scripts/build-deb.sh"), "--single-file", str(single),
         "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert first.stdout is not None
    built = first.stdout.readline()  # "built <path> (<size> KiB)" comes before lintian runs
    deb = out / f"ipam-da-consul_{VERSION}_all.deb"
    assert built.startswith(f"built {deb}"), built + first.stdout.read()
    # The same files under a higher version; uncompressed, which only the build's time sees.
    second = subprocess.run(
        ["bash", str(ROOT / "scripts/build-deb.sh"), "--single-file", str(single),
         "--out", str(out), "--version", UPGRADE, "--no-lintian", "--compression", "none"],
        capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    yield deb, out / f"ipam-da-consul_{UPGRADE}_all.deb", first
    if first.poll() is None:
        first.kill()
        first.wait()


@dataclass
class Net:
    consul: ConsulAgent
    bridge: str
    octet: int
    pool: str

    def conf(self) -> dict[str, Any]:
        return {
            "cniVersion": "1.0.0", "name": f"net-{self.bridge}", "type": "bridge",
            "bridge": self.bridge, "isGateway": True,
            "ipam": {"type": "ipam-da-consul", "consul_servers": [self.consul.url],
                     "pools": [{"name": self.pool}]},
        }


@pytest.fixture
def net(consul: ConsulAgent) -> Iterator[Net]:
    made = ip("netns", "add", f"ipdc-deb-probe-{os.getpid()}", check=False)
    if made.returncode != 0:
        pytest.skip(f"`ip netns add` fails here: {made.stderr.strip()}")
    ip("netns", "del", f"ipdc-deb-probe-{os.getpid()}", check=False)
    octet = free_subnet_octet()
    pool = consul.create_pool(f"deb-{os.getpid()}", [{
        "subnet": f"10.99.{octet}.0/24", "rangeStart": f"10.99.{octet}.10",
        "rangeEnd": f"10.99.{octet}.50", "gateway": f"10.99.{octet}.1"}])
    n = Net(consul, f"ipdcdeb{os.getpid() % 100000}", octet, pool)
    ip("netns", "add", n.bridge)
    forward = Path("/proc/sys/net/ipv4/ip_forward").read_text()
    try:
        yield n
    finally:
        ip("netns", "del", n.bridge, check=False)
        ip("link", "del", n.bridge, check=False)
        if Path("/proc/sys/net/ipv4/ip_forward").read_text() != forward:
            Path("/proc/sys/net/ipv4/ip_forward").write_text(forward)


def bridge(root: Root, net: Net, command: str, cni_path: str,
           prev: dict[str, Any] | None = None) -> subprocess.CompletedProcess[str]:
    """Debian's bridge plugin as a runtime runs it, inside the root: it finds `ipam-da-consul`
    in CNI_PATH, where the package put it."""
    conf = net.conf() | ({"prevResult": prev} if prev else {})
    return root.run(
        "/usr/lib/cni/bridge", env={
            "CNI_COMMAND": command, "CNI_CONTAINERID": "deb-ctr-1", "CNI_IFNAME": "eth0",
            "CNI_NETNS": f"/var/run/netns/{net.bridge}", "CNI_PATH": cni_path},
        stdin=json.dumps(conf).encode(), check=False)


def test_install_use_upgrade_remove_purge(
    debs: tuple[Path, Path, subprocess.Popen[str]], net: Net, consul: ConsulAgent,
    tmp_path: Path,
) -> None:
    deb, newer, _ = debs
    root = Root(tmp_path / "root")
    began = time.monotonic()
    assert root.status() in ("not known", "unknown ok not-installed")
    steps: dict[str, float] = {}

    # -- install ---------------------------------------------------------------------------
    root.run("dpkg", "-i", str(deb))
    steps["install"] = time.monotonic() - began
    assert root.status() == f"install ok installed {VERSION}"
    for name in NAMES:
        exe = root.path(f"/opt/cni/bin/{name}")
        assert exe.is_file() and exe.stat().st_mode & 0o777 == 0o755, name
    for unit in UNITS:
        assert root.path(f"/lib/systemd/system/{unit}").is_file(), unit
    # The commands where runtimes and operators look, and the units enabled as on a systemd
    # host (the service is not: the socket starts it).
    assert root.links(*LINKS, *wants_links(), "/etc/systemd/system/sockets.target.wants/"
                      "ipam-da-consul-helper.service") == {**LINKS, **wants_links()}
    for conffile in ("/etc/default/ipam-da-consul", "/etc/logrotate.d/ipam-da-consul"):
        assert root.path(conffile).is_file(), conffile
    doc = root.path("/usr/share/doc/ipam-da-consul")
    assert (doc / "copyright").read_text().startswith("Format: https://www.debian.org/doc/")
    for page in ("man1/ipam-da-consul-admin.1.gz", "man8/ipam-da-consul-helper.8.gz",
                 "man8/ipam-da-consul.8.gz"):
        assert root.path(f"/usr/share/man/{page}").is_file(), page
    assert "usage" in root.run("ipam-da-consul-admin", "--help").stdout  # on PATH
    assert "--metrics-address" in root.run("ipam-da-consul-helper", "--help").stdout
    assert not root.present("/var/lib/ipam-da-consul")  # made by the first call, 0700

    # -- a real ADD and DEL through bridge, from the installed path -------------------------
    add = bridge(root, net, "ADD", "/opt/cni/bin:/usr/lib/cni")
    assert add.returncode == 0, add
    result = json.loads(add.stdout)
    got = result["ips"][0]["address"].split("/")[0]
    assert got.startswith(f"10.99.{net.octet}.") and consul.allocations(net.pool) == {
        got: "deb-ctr-1"}
    addrs = [a["local"] for link in ip_json("-n", net.bridge, "addr", "show", "dev", "eth0")
             for a in link["addr_info"] if a["family"] == "inet"]
    assert addrs == [got]
    # Found through Debian's folder alone too (runtimes that look only there).
    delete = bridge(root, net, "DEL", "/usr/lib/cni", prev=result)
    assert delete.returncode == 0, delete
    assert consul.allocations(net.pool) == {}
    state = root.path("/var/lib/ipam-da-consul")
    assert state.is_dir() and state.stat().st_mode & 0o777 == 0o700
    kept_state = {p.relative_to(state).as_posix() for p in state.rglob("*")}
    assert "sessions" in kept_state  # the DEL's fence session, shared by later calls
    # The verbose flavour's log, for the purge to take.
    verbose = root.run("/opt/cni/bin/ipam-da-consul-verbose", env={"CNI_COMMAND": "VERSION"},
                       stdin=b'{"cniVersion": "1.0.0"}', check=False)
    assert verbose.returncode == 0, verbose
    assert root.path("/var/log/cni/ipam-da-consul.log").is_file()
    steps["add/del"] = time.monotonic() - began

    # -- upgrade, with an operator's settings --------------------------------------------
    defaults = root.path("/etc/default/ipam-da-consul")
    root.run("sh", "-c", f"sed -i 's|^USAGE_TEXTFILE=$|USAGE_TEXTFILE={TEXTFILE}|' "
             "/etc/default/ipam-da-consul && mkdir -p /var/lib/node-exporter-test && "
             f"echo stale > {TEXTFILE}")
    assert f"USAGE_TEXTFILE={TEXTFILE}\n" in defaults.read_text()
    root.run("dpkg", "-i", str(newer))
    steps["upgrade"] = time.monotonic() - began
    assert root.status() == f"install ok installed {UPGRADE}"
    assert f"USAGE_TEXTFILE={TEXTFILE}\n" in defaults.read_text()  # the operator's, kept
    assert root.links(*wants_links()) == wants_links()  # still enabled
    again = bridge(root, net, "ADD", "/opt/cni/bin:/usr/lib/cni")
    assert again.returncode == 0, again
    assert bridge(root, net, "DEL", "/opt/cni/bin", prev=json.loads(again.stdout)).returncode \
        == 0
    assert consul.allocations(net.pool) == {}

    # -- remove: the files go, settings and state stay, units masked --------------------------
    root.run("dpkg", "-r", "ipam-da-consul")
    steps["remove"] = time.monotonic() - began
    assert root.status() == f"deinstall ok config-files {UPGRADE}"
    assert root.present(
        *(f"/opt/cni/bin/{n}" for n in NAMES), *LINKS, "/usr/share/doc/ipam-da-consul/copyright",
        TEXTFILE, *(f"/lib/systemd/system/{u}" for u in UNITS), "/usr/lib/cni/bridge",
    ) == {"/usr/lib/cni/bridge"}  # Debian's own plugin stays, of course
    assert root.path("/etc/default/ipam-da-consul").is_file()
    assert root.path("/etc/logrotate.d/ipam-da-consul").is_file()
    assert {p.relative_to(state).as_posix() for p in state.rglob("*")} >= kept_state
    assert root.path("/var/log/cni/ipam-da-consul.log").is_file()
    masks = [f"/etc/systemd/system/{u}" for u in UNITS]
    assert root.links(*masks) == dict.fromkeys(masks, "/dev/null")  # masked: nothing starts them

    # -- purge: nothing left ------------------------------------------------------------------
    root.run("dpkg", "-P", "ipam-da-consul")
    steps["purge"] = time.monotonic() - began
    assert root.status() in ("not known", "unknown ok not-installed")
    assert not root.present(
        "/etc/default/ipam-da-consul", "/etc/logrotate.d/ipam-da-consul",
        "/var/lib/ipam-da-consul", "/var/log/cni/ipam-da-consul.log", *masks, *wants_links(),
        "/opt/cni/bin/ipam-da-consul")
    # What the package, its scripts and its calls changed on the root is all gone (the
    # operator's own textfile folder aside, and dpkg's records of what happened).
    assert root.changed() <= {"/var/lib/node-exporter-test"}, sorted(root.changed())

    print(f"\nsteps (s since start): {steps}")


@pytest.mark.skipif(shutil.which("lintian") is None,
                    reason="needs Debian's lintian (apt-get install lintian)")
def test_the_shipped_package_is_lintian_clean(
    debs: tuple[Path, Path, subprocess.Popen[str]],
) -> None:
    """build-deb.sh ran lintian on the package while the test above used it: no error, no
    warning (the overrides, each with its reason, are deploy/debian/*.lintian-overrides)."""
    lintian = debs[2]
    assert lintian.stdout is not None
    report = lintian.stdout.read()
    assert lintian.wait(timeout=600) == 0, report
    print(f"\n{report}")
    assert f"lintian ipam-da-consul_{VERSION}_all.deb: exit 0" in report
    assert not [line for line in report.splitlines() if line[:2] in ("E:", "W:")], report
