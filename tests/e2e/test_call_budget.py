"""`ipam.timeout` caps the whole process as the runtime sees it, counted from its start: what an
in-process call does after its answer (finishing other attachments' owed entries, cni/main.py
finish_others) runs within what is left of it, never within a budget of its own."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

from ipam_da_consul.cni.state import open_state

from tests.support import plugin
from tests.support.agent import ConsulAgent
from tests.support.plugin import netconf
from tests.support.util_procs import Unresponsive

# Past the call's `timeout`: the plugin keeps EXIT_MARGIN (0.3 s) of it for writing the answer
# and exiting; this leaves room for a loaded CI machine's scheduling on top.
SLACK = 0.5


def owe_a_del(state_dir: str, conf: dict[str, Any], container: str) -> None:
    """Leave the state folder owing a DEL of `container`, as the helper leaves one it took
    over while Consul was away."""
    env = {
        "CNI_COMMAND": "DEL",
        "CNI_CONTAINERID": container,
        "CNI_IFNAME": "eth0",
        "CNI_NETNS": "/var/run/netns/test",
        "CNI_PATH": str(plugin.BIN_DIR),
    }
    state = open_state(state_dir)
    try:
        entry = state.entry((conf["name"], container, "eth0"), time.monotonic() + 5)
        with entry:
            entry.journal_del(json.dumps(conf).encode(), env)
        assert state.pending(), "the DEL is owed"
    finally:
        state.close()


def timed_add(conf: dict[str, Any], container: str) -> tuple[float, subprocess.CompletedProcess]:
    env = plugin.base_env() | {
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": container,
        "CNI_IFNAME": "eth0",
        "CNI_NETNS": "/var/run/netns/test",
        "CNI_PATH": str(plugin.BIN_DIR),
    }
    began = time.monotonic()
    done = subprocess.run(
        [plugin.executable("ipam-da-consul")],
        input=json.dumps(conf).encode(),
        env=env,
        capture_output=True,
        timeout=60,
    )
    return time.monotonic() - began, done


def test_an_add_finishing_an_owed_del_at_a_hung_server_exits_within_its_timeout(
    consul: ConsulAgent, make_pool: Any, tmp_path: Path
) -> None:
    hung = Unresponsive()
    try:
        # The owed DEL's own settings give it 10 s against a server that never answers: were
        # it given its own budget after the ADD's answer, the process would outlive the ADD's
        # 3 s by seconds (7.9 s seen).
        owe_a_del(
            plugin.state_dir(),
            netconf([hung.url], [{"name": "gone-pool"}], timeout=10),
            "owed-c",
        )
        pool = make_pool()
        took, done = timed_add(netconf([consul.url], [{"name": pool}], timeout=3), "budget-c")
    finally:
        hung.close()
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert json.loads(done.stdout)["ips"], done.stdout
    assert took <= 3.0 + SLACK, f"exited {took:.2f} s after it started, past its 3 s timeout"
    # The DEL stays owed, for the next call or the helper: not lost, and not finished (its
    # server never answered).
    state = open_state(plugin.state_dir())
    try:
        assert state.pending(), "the owed DEL is still owed"
    finally:
        state.close()
