"""The installed plugin run as a subprocess exactly as a runtime runs it, and the network
configs it reads: shared by the e2e tests, the bench and the test helpers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BIN_DIR = Path(sys.executable).parent
NO_HELPER = "/nonexistent/ipam-da-consul-tests/helper.sock"
# The state folder (cni/state.py) of in-process calls that name none: one per test, set by the
# e2e tier's conftest, so that no test ever sees another's entries (or the machine's own
# /var/lib/ipam-da-consul).
STATE_DIR: str | None = None


def state_dir() -> str:
    global STATE_DIR
    if STATE_DIR is None:
        import tempfile

        STATE_DIR = tempfile.mkdtemp(prefix="ipam-da-consul-state-")
    return STATE_DIR


def base_env() -> dict[str, str]:
    """The test process's environment without CNI, Consul or plugin settings: a call runs
    in-process, with this test's state folder, unless it says otherwise."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CNI_", "CONSUL_", "IPAM_DA_"))}
    env["IPAM_DA_CONSUL_SOCKET"] = NO_HELPER
    env["IPAM_DA_CONSUL_STATE_DIR"] = state_dir()
    return env


def executable(name: str) -> str:
    path = BIN_DIR / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if not found:
        import pytest  # here, not at the top: the bench shares this module and runs without pytest

        pytest.exit(f"{name} is not installed: run `pip install .` first", 2)
    return found


@dataclass
class Outcome:
    rc: int
    stdout: str
    stderr: str

    @property
    def json(self) -> Any:
        return json.loads(self.stdout)

    def __repr__(self) -> str:
        return f"Outcome(rc={self.rc}, stdout={self.stdout!r}, stderr={self.stderr[-800:]!r})"


def run_plugin(
    command: str,
    conf: dict[str, Any] | str | bytes,
    container: str | None = "c-1",
    ifname: str | None = "eth0",
    env: dict[str, str] | None = None,
    verbose: bool = False,
    timeout: float = 60,
    name: str = "ipam-da-consul",
) -> Outcome:
    # In-process unless a test hands over a helper's socket: never a helper left on the machine.
    full_env = base_env()
    full_env["CNI_COMMAND"] = command
    if container is not None:
        full_env["CNI_CONTAINERID"] = container
    if ifname is not None:
        full_env["CNI_IFNAME"] = ifname
    full_env["CNI_NETNS"] = "/var/run/netns/test"
    full_env["CNI_PATH"] = str(BIN_DIR)
    full_env.update(env or {})
    exe = executable(name + ("-verbose" if verbose else ""))
    data = conf if isinstance(conf, str | bytes) else json.dumps(conf)
    if isinstance(data, str):
        data = data.encode()
    p = subprocess.run([exe], input=data, env=full_env, capture_output=True, timeout=timeout)
    return Outcome(
        p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")
    )


def netconf(
    servers: list[str],
    pools: list[dict[str, Any]] | None,
    version: str = "1.0.0",
    ips: list[dict[str, Any]] | None = None,
    **ipam: Any,
) -> dict[str, Any]:
    # Strict lowest-first picking unless a test says otherwise (`pick=None`: the default,
    # `stripe`), so tests can name the address a call gets.
    ipam.setdefault("pick", "lowest")
    if ipam["pick"] is None:
        del ipam["pick"]
    conf: dict[str, Any] = {
        "cniVersion": version,
        "name": "testnet",
        "type": "ipam-delegated",
        "ipam": {
            "type": "ipam-delegated",
            "delegates": ["ipam-da-consul"],
            "consul_servers": servers,
            **ipam,
        },
    }
    prev: dict[str, Any] = {"cniVersion": version, "ips": ips or []}
    if pools is not None:
        prev["pools"] = pools
    conf["prevResult"] = prev
    return conf
