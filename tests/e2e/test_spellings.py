"""One address, one key, whatever its spelling, against a real Consul.

- Python 3.11 and 3.12 spell an IPv4-mapped IPv6 address `::ffff:a00:a`, Python 3.13 (and the
  upstream Rust plugin) `::ffff:10.0.0.10`; the single-file build runs on the host's `python3`,
  so a fleet mixing Debian 12 and 13 runs both. Both now write the RFC 5952 spelling, and every
  write checks that the address's other spellings are absent: two hosts racing for one address
  can no longer both win it under two key names.
- A key written by another tool in another spelling (`FD00:5::10`) holds its address for every
  reader: a static request for it is refused (126) through the helper as in-process.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.agent import ConsulAgent
from tests.support.model_support import run_together, slow_listings
from tests.support.plugin import run_plugin
from tests.support.plugin_helpers import assert_cni_error
from tests.support.util_procs import Call, Helper

ROOT = Path(__file__).resolve().parents[2]


def _python_313() -> str | None:
    """A working Python 3.13: pyenv's, or one on PATH (a pyenv shim may not run one)."""
    candidates = sorted(Path("/root/.pyenv/versions").glob("3.13*/bin/python3"))
    candidates += [Path(p) for p in [shutil.which("python3.13")] if p]
    for path in candidates:
        probe = [str(path), "-c", "import sys; assert sys.version_info[:2] == (3, 13)"]
        if subprocess.run(probe, capture_output=True).returncode == 0:
            return str(path)
    return None


@pytest.fixture(scope="module")
def plugin_313(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The single-file plugin built for (and run by) Python 3.13."""
    python = _python_313()
    if python is None:
        pytest.skip("no Python 3.13 here: `pyenv install 3.13` to run this test")
    out = tmp_path_factory.mktemp("single-file-313")
    build = [sys.executable, str(ROOT / "scripts" / "build_plugin.py"),
             "--python", python, "--out", str(out)]
    subprocess.run(build, check=True, capture_output=True, timeout=300)
    return out / "ipam-da-consul"


def mapped_pool(consul: ConsulAgent, name: str) -> str:
    return consul.create_pool(name, [{"subnet": "::ffff:10.0.0.0/124"}])


def test_python_3_13_and_3_11_never_both_win_one_mapped_address(
    consul: ConsulAgent, plugin_313: Path, conf_for: Any
) -> None:
    """Both calls read the empty pool before either writes (listings answered late), then both
    write its lowest address, each with its own Python: one must lose."""
    pool = mapped_pool(consul, "mapped-race")
    relay = slow_listings(consul.url, delay=1.0)
    try:
        conf = conf_for(pool, pick="lowest")
        conf["ipam"]["consul_servers"] = [relay.url]
        calls = [Call("ADD", "py311", conf), Call("ADD", "py313", conf, exe=str(plugin_313))]
        first, second = run_together(calls)
    finally:
        relay.close()
    assert first.rc == 0 and second.rc == 0, (first, second)
    got = {ipaddress.ip_interface(d.json["ips"][0]["address"]).ip for d in (first, second)}
    assert len(got) == 2, (first, second)  # two addresses, not one address spelled twice
    assert all(d.json["ips"][0]["address"].startswith("::ffff:10.0.0.") for d in (first, second))
    held = consul.allocations(pool)
    assert sorted(held.values()) == ["py311", "py313"]
    assert all(key.startswith("::ffff:10.0.0.") for key in held), held  # one spelling


@pytest.mark.parametrize("route", ["in-process", "helper"])
@pytest.mark.parametrize("spelling", ["FD00:5::10", "fd00:0005:0000:0000:0000:0000:0000:0010"])
def test_a_key_in_another_spelling_holds_its_address(
    consul: ConsulAgent, make_pool: Any, conf_for: Any, tmp_path: Path, route: str, spelling: str
) -> None:
    pool = make_pool([{"subnet": "fd00:5::/120"}])
    helper = Helper(tmp_path) if route == "helper" else None
    try:
        env = {**helper.env, "IPAM_DA_CONSUL_HELPER_ACK_TIMEOUT": "30"} if helper else {}
        # The helper watches the pool from the start, as it would on a busy host.
        assert run_plugin("ADD", conf_for(pool), container="warm", env=env).rc == 0
        consul.put(f"ipam/{pool}/{spelling}", {"target": "other-tool"})
        if helper:
            time.sleep(2.0)  # a refresh or two of the watched copy
        before = consul.kv_index()
        out = run_plugin("ADD", conf_for(pool), container="static", env={
            **env, "CNI_ARGS": "IP=fd00:5::10"})
        assert_cni_error(out, 126, "1.0.0", "fd00:5::10", "other-tool")
        assert consul.kv_index() == before
        assert consul.get(f"ipam/{pool}/fd00:5::10") is None
    finally:
        if helper:
            helper.close()
