"""The single-file plugin (scripts/build-plugin.sh): each entry point one executable zipapp that
needs only the host's Python. Built once per session into a temporary folder, or dist/ when it
is newer than every source file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest

from tests.support.agent import ConsulAgent

ROOT = Path(__file__).resolve().parents[2]
NAMES = (
    "ipam-da-consul", "ipam-da-consul-verbose", "ipam-da-consul-admin", "ipam-da-consul-helper"
)
_SOURCES = ("src", "cni", "allocator", "consul", "admin")
_built: dict[str, Path] = {}


def _newest_source() -> float:
    files = [p for d in _SOURCES for p in (ROOT / d).rglob("*.py")]
    files += [ROOT / "pyproject.toml", ROOT / "scripts" / "build_plugin.py"]
    return max(p.stat().st_mtime for p in files)


def _fresh(folder: Path) -> bool:
    newest = _newest_source()
    return all((folder / n).exists() and (folder / n).stat().st_mtime >= newest for n in NAMES)


def _target_python() -> str:
    """The hosts' interpreter, as the build script defaults to; this one when it is missing."""
    system = "/usr/bin/python3"
    probe = [system, "-c", "import sys; assert sys.version_info >= (3, 11)"]
    if os.path.exists(system) and subprocess.run(probe, capture_output=True).returncode == 0:
        return system
    return sys.executable


@pytest.fixture(scope="session")
def single_file_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the four single-file executables. Cached at module level too, since
    test_bridge imports this fixture and a fixture imported elsewhere is set up again."""
    if "dir" not in _built:
        dist = ROOT / "dist"
        if _fresh(dist):
            _built["dir"] = dist
        else:
            out = tmp_path_factory.mktemp("single-file")
            build = [sys.executable, str(ROOT / "scripts" / "build_plugin.py"),
                     "--python", _target_python(), "--out", str(out)]
            done = subprocess.run(build, capture_output=True, text=True, timeout=900)
            assert done.returncode == 0, done.stderr[-3000:]
            _built["dir"] = out
    return _built["dir"]


def interpreter(exe: Path) -> str:
    with open(exe, "rb") as fh:
        return fh.readline().decode().removeprefix("#!").split()[0]


def bare_env(tmp: Path, **extra: str) -> dict[str, str]:
    """What a runtime may give: no HOME, no PYTHON*, a private empty TMPDIR to watch."""
    return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "TMPDIR": str(tmp), **extra}


def cni(
    exe: Path, command: str, conf: dict[str, Any], container: str, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    full = {**env, "CNI_COMMAND": command, "CNI_CONTAINERID": container, "CNI_IFNAME": "eth0",
            "CNI_NETNS": "/var/run/netns/x", "CNI_PATH": str(exe.parent)}
    return subprocess.run([str(exe)], input=json.dumps(conf), env=full, cwd="/",
                          capture_output=True, text=True, timeout=120)


def test_each_entry_point_is_one_self_contained_zipapp(single_file_bin: Path) -> None:
    for name in NAMES:
        exe = single_file_bin / name
        assert os.access(exe, os.X_OK), exe
        with open(exe, "rb") as fh:
            shebang = fh.readline().decode()
        assert shebang.startswith("#!/") and shebang.rstrip().endswith(" -IS"), shebang
        with zipfile.ZipFile(exe) as zf:
            names = set(zf.namelist())
        assert {"__main__.py", "__main__.pyc", "ipam_da_consul/cni/helper/client.pyc"} <= names
        assert "prometheus_client/__init__.pyc" in names  # the helper's metrics, bundled
        # Nothing zipimport could not load, nothing extracted at run time.
        assert not [n for n in names if n.endswith((".so", ".pyd"))]
        assert not [n for n in names if "__pycache__" in n]


def test_in_process_with_nothing_but_the_interpreter(
    single_file_bin: Path, consul: ConsulAgent, make_pool, conf_for, tmp_path: Path
) -> None:
    """No HOME, no venv, cwd /, nothing to extract: the file writes nowhere (the empty TMPDIR
    stays empty; a zipapp tool that unpacks itself would need HOME or TMPDIR)."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    pool = make_pool()
    conf = conf_for(pool)
    env = bare_env(tmp, IPAM_DA_CONSUL_SOCKET=str(tmp_path / "no-helper.sock"))
    exe = single_file_bin / "ipam-da-consul"
    add = cni(exe, "ADD", conf, "sf1", env)
    assert add.returncode == 0, add
    result = json.loads(add.stdout)
    assert result["ips"] == [{"address": "10.0.21.100/23", "gateway": "10.0.20.1"}]
    check = cni(exe, "CHECK", {**conf, "prevResult": {**conf["prevResult"], **result}}, "sf1",
                env)
    assert check.returncode == 0, check
    delete = cni(exe, "DEL", conf, "sf1", env)
    assert delete.returncode == 0, delete
    assert consul.allocations(pool) == {}
    assert list(tmp.iterdir()) == []


def test_thin_client_through_the_single_file_helper(
    single_file_bin: Path, consul: ConsulAgent, make_pool, conf_for, tmp_path: Path
) -> None:
    sock = tmp_path / "run" / "helper.sock"
    helper = subprocess.Popen([str(single_file_bin / "ipam-da-consul-helper"), "--socket",
                               str(sock)], env=bare_env(tmp_path), stderr=subprocess.PIPE)
    try:
        end = time.monotonic() + 60
        while not sock.exists():
            assert helper.poll() is None, helper.stderr.read() if helper.stderr else ""
            assert time.monotonic() < end, "the helper made no socket"
            time.sleep(0.05)
        pool = make_pool()
        log = tmp_path / "verbose.log"
        env = bare_env(tmp_path, IPAM_DA_CONSUL_SOCKET=str(sock),
                       IPAM_DA_CONSUL_HELPER_ACK_TIMEOUT="30", IPAM_DA_CONSUL_LOG_FILE=str(log))
        add = cni(single_file_bin / "ipam-da-consul-verbose", "ADD", conf_for(pool), "sf2", env)
        assert add.returncode == 0, add
        assert json.loads(add.stdout)["ips"][0]["address"] == "10.0.21.100/23"
        # The helper ran it: its pid is on the debug lines.
        assert f" {helper.pid} DEBUG" in log.read_text()

        # The thin client imported nothing heavy: -X importtime of the same call.
        client = [interpreter(single_file_bin / "ipam-da-consul"), "-IS", "-X", "importtime",
                  str(single_file_bin / "ipam-da-consul")]
        env.pop("IPAM_DA_CONSUL_LOG_FILE")
        full = {**env, "CNI_COMMAND": "ADD", "CNI_CONTAINERID": "sf2", "CNI_IFNAME": "eth0",
                "CNI_NETNS": "/var/run/netns/x", "CNI_PATH": "/nonexistent"}
        again = subprocess.run(client, input=json.dumps(conf_for(pool)), env=full,
                               capture_output=True, text=True, timeout=60)
        assert again.returncode == 0, again
        imported = {line.split("|")[-1].strip() for line in again.stderr.splitlines()
                    if line.startswith("import time:")}
        assert "ipam_da_consul.cni.helper.client" in imported
        heavy = {"requests", "loguru", "marshmallow", "transitions", "prometheus_client", "json",
                 "socket"}
        assert not heavy & imported, heavy & imported
    finally:
        helper.terminate()
        helper.wait(15)


def test_admin_single_file(
    single_file_bin: Path, consul: ConsulAgent, make_pool, tmp_path: Path
) -> None:
    pool = make_pool()
    out = subprocess.run(
        [str(single_file_bin / "ipam-da-consul-admin"), "--consul", consul.url, "list", "--json"],
        env=bare_env(tmp_path), capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out
    assert pool in out.stdout


def test_copied_anywhere_it_still_runs(single_file_bin: Path, tmp_path: Path) -> None:
    """The install is a copy: no path inside the file depends on where it was built."""
    target = tmp_path / "opt-cni-bin" / "ipam-da-consul"
    target.parent.mkdir()
    shutil.copy2(single_file_bin / "ipam-da-consul", target)
    out = subprocess.run([str(target)], input='{"cniVersion": "1.1.0"}', cwd="/",
                         env=bare_env(tmp_path, CNI_COMMAND="VERSION"),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out
    assert json.loads(out.stdout)["supportedVersions"] == ["0.4.0", "1.0.0", "1.1.0"]
