"""The install story (issue 22, finding 6), as docs/install.md tells it: `deploy/examples/
install.sh` puts the plugins in the CNI folder and the operator CLI on PATH, from the single
files or from a pip install in a virtualenv (what works on Debian 12, where PEP 668 refuses a
pip install into the system's Python), upgrades by running again, and `--uninstall` removes what
it made. Run into temporary folders (CNI_BIN_DIR, BIN_DIR), without touching systemd; the
commands are then used exactly as a new operator would: by name, from PATH."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.test_singlefile import ROOT, single_file_bin  # noqa: F401 (a fixture)
from tests.support.agent import ConsulAgent

INSTALL = ROOT / "deploy" / "examples" / "install.sh"
NAMES = [
    "ipam-da-consul", "ipam-da-consul-verbose", "ipam-da-consul-helper", "ipam-da-consul-admin"
]


def install(tmp: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = {
        "PATH": os.environ["PATH"],
        "CNI_BIN_DIR": str(tmp / "opt-cni-bin"),
        "BIN_DIR": str(tmp / "usr-local-bin"),
        **env,
    }
    return subprocess.run(
        ["bash", str(INSTALL), "--no-systemd", *args], env=full, capture_output=True, text=True,
        timeout=120,
    )


def operator(tmp: Path, consul: ConsulAgent, *command: str) -> subprocess.CompletedProcess[str]:
    """A command typed by name, found on PATH, as the README's examples type it."""
    env = {"PATH": f"{tmp / 'usr-local-bin'}:/usr/sbin:/usr/bin:/sbin:/bin",
           "CONSUL_HTTP_ADDR": consul.url, "HOME": str(tmp)}
    return subprocess.run(list(command), env=env, capture_output=True, text=True, timeout=120)


def add(tmp: Path, consul: ConsulAgent, pool: str, container: str) -> dict[str, object]:
    conf = {"cniVersion": "1.0.0", "name": "installnet",
            "ipam": {"type": "ipam-da-consul", "consul_servers": [consul.url],
                     "pools": [{"name": pool}]}}
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": container, "CNI_IFNAME": "eth0",
           "CNI_NETNS": "/var/run/netns/x", "CNI_PATH": str(tmp / "opt-cni-bin"),
           "IPAM_DA_CONSUL_SOCKET": "/nonexistent/helper.sock",
           "IPAM_DA_CONSUL_STATE_DIR": str(tmp / "state"), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([str(tmp / "opt-cni-bin" / "ipam-da-consul")], input=json.dumps(conf),
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out
    return dict(json.loads(out.stdout))


def check_installed(tmp: Path, consul: ConsulAgent, pool: str) -> None:
    for name in NAMES:
        assert os.access(tmp / "opt-cni-bin" / name, os.X_OK), name
    for name in ("ipam-da-consul-admin", "ipam-da-consul-helper"):
        link = tmp / "usr-local-bin" / name
        assert link.is_symlink() and os.readlink(link) == str(tmp / "opt-cni-bin" / name)
    created = operator(tmp, consul, "ipam-da-consul-admin", "create", pool, "--range",
                       "10.0.93.0/24", "--allow-overlap")
    assert created.returncode == 0, created
    ip = add(tmp, consul, pool, "installed")["ips"][0]["address"]  # type: ignore[index]
    listed = operator(tmp, consul, "ipam-da-consul-admin", "allocations", pool)
    assert listed.returncode == 0 and ip.split("/")[0] in listed.stdout, listed
    helped = operator(tmp, consul, "ipam-da-consul-helper", "--help")
    assert helped.returncode == 0 and "--socket" in helped.stdout, helped


def check_uninstalled(tmp: Path) -> None:
    foreign = tmp / "usr-local-bin" / "someone-elses"
    foreign.write_text("#!/bin/sh\n")
    out = install(tmp, "--uninstall")
    assert out.returncode == 0 and "kept the state folder" in out.stdout, out
    assert sorted(os.listdir(tmp / "opt-cni-bin")) == []
    assert sorted(os.listdir(tmp / "usr-local-bin")) == ["someone-elses"]


def test_the_single_files_install_upgrade_and_uninstall(
    tmp_path: Path, consul: ConsulAgent, single_file_bin: Path  # noqa: F811
) -> None:
    out = install(tmp_path, DIST=str(single_file_bin))
    assert out.returncode == 0, out
    assert "ipam-da-consul-admin is on PATH" in out.stdout
    pool = f"inst-{os.getpid()}"
    check_installed(tmp_path, consul, pool)
    # Again: an upgrade, in place.
    again = install(tmp_path, DIST=str(single_file_bin))
    assert again.returncode == 0, again
    check_installed(tmp_path, consul, pool + "-2")
    check_uninstalled(tmp_path)
    # Nothing built: said so, nothing installed.
    missing = install(tmp_path, DIST=str(tmp_path / "nothing"))
    assert missing.returncode == 1 and "build-plugin.sh" in missing.stderr, missing


def test_a_pip_install_in_a_virtualenv_installs_the_same_way(
    tmp_path: Path, consul: ConsulAgent
) -> None:
    """docs/install.md's pip route, which works on Debian 12: a virtualenv, pip into it, then
    install.sh --venv. Slow (a wheel is built)."""
    venv = tmp_path / "venv"
    made = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True,
                          text=True, timeout=300)
    assert made.returncode == 0, made
    pip = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", f"{ROOT}[fast]"],
        capture_output=True, text=True, timeout=900,
    )
    if pip.returncode != 0 and "No matching distribution" in pip.stderr:
        pytest.skip(f"no package index to install from: {pip.stderr.strip()[-300:]}")
    assert pip.returncode == 0, pip.stderr[-3000:]
    out = install(tmp_path, "--venv", str(venv))
    assert out.returncode == 0, out
    for name in NAMES:
        assert os.readlink(tmp_path / "opt-cni-bin" / name) == str(venv / "bin" / name)
    check_installed(tmp_path, consul, f"inst-venv-{os.getpid()}")
    check_uninstalled(tmp_path)
