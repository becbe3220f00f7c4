"""The demo (scripts/demo.sh): a Consul dev agent, one pool created with the admin CLI, and
ADD -> CHECK -> DEL through the installed plugin, with the config a runtime user writes
(`ipam.pools`). Every command is shown as it is typed, with what it printed."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.agent import ConsulAgent  # noqa: E402

BIN = Path(sys.executable).parent
POOL = "demo-pool"
RANGE = "10.0.20.0/23,10.0.21.100-10.0.21.150,gw=10.0.20.1"
CONTAINER = "demo-container"


def step(text: str) -> None:
    print(f"\n== {text}")


def show(argv: list[str], env: dict[str, str] | None = None, stdin: Path | None = None) -> str:
    """Run a command as typed, print it and what it printed; stop the demo if it fails."""
    shown = " ".join(f"{k}={v}" for k, v in (env or {}).items())
    typed = shlex.join([Path(argv[0]).name, *argv[1:]])
    print(f"$ {shown + ' ' if shown else ''}{typed}{f' < {stdin.name}' if stdin else ''}")
    p = subprocess.run(argv, input=stdin.read_text() if stdin else None, capture_output=True,
                       text=True, env={**os.environ, **(env or {})})
    out = p.stdout.strip()
    print(out if out else "(no output)", f"[exit {p.returncode}]")
    if p.stderr.strip():
        print(p.stderr.rstrip())
    if p.returncode != 0:
        raise SystemExit(f"demo: {typed} failed")
    return p.stdout


def allocations(agent: ConsulAgent) -> dict[str, Any]:
    folder = f"ipam/{POOL}/"
    return {k: json.loads(v) for k, v in agent.tree(folder).items() if k != folder and v}


def main() -> None:
    state = tempfile.mkdtemp(prefix="ipam-da-consul-demo-")
    net, later_net = Path(state) / "net.json", Path(state) / "net+prevResult.json"
    # No helper (the plugin does its work in-process) and a state folder of the demo's own:
    # the demo runs as any user and leaves nothing on the machine.
    os.environ["IPAM_DA_CONSUL_SOCKET"] = os.path.join(state, "no-helper.sock")
    os.environ["IPAM_DA_CONSUL_STATE_DIR"] = os.path.join(state, "state")
    agent = ConsulAgent("demo").start()
    try:
        step(f"a Consul dev agent is up at {agent.url} (in memory; stopped at the end)")
        os.environ["CONSUL_HTTP_ADDR"] = agent.url
        step("create a pool with the operator CLI")
        show([str(BIN / "ipam-da-consul-admin"), "create", POOL, "--range", RANGE])

        conf = {
            "cniVersion": "1.1.0",
            "name": "demo-net",
            "type": "bridge",
            "bridge": "cni-demo",
            "isGateway": True,
            "ipam": {
                "type": "ipam-da-consul",
                "consul_servers": [agent.url],
                "pools": [{"name": POOL}],
            },
        }
        step("the network config (net.json), as in /etc/cni/net.d: the bridge plugin would "
             "pass it to ipam-da-consul; here the plugin is called directly")
        print(json.dumps(conf, indent=2))
        net.write_text(json.dumps(conf))

        plugin = str(BIN / "ipam-da-consul")
        cni = {"CNI_CONTAINERID": CONTAINER, "CNI_IFNAME": "eth0",
               "CNI_NETNS": "/var/run/netns/demo", "CNI_PATH": "/opt/cni/bin"}
        step("ADD: the runtime starts the container; the plugin picks an address")
        added = json.loads(show([plugin], {"CNI_COMMAND": "ADD", **cni}, net))
        for key, value in allocations(agent).items():
            print(f"in Consul: {key} = {json.dumps(value)}")

        # CHECK and DEL get the ADD's result as prevResult, as runtimes pass it.
        later_net.write_text(json.dumps({**conf, "prevResult": added}))
        step("CHECK: the address is still this container's (net.json plus the ADD's result "
             "as prevResult, as runtimes pass it)")
        show([plugin], {"CNI_COMMAND": "CHECK", **cni}, later_net)
        step("DEL: the container is gone; the address is released")
        show([plugin], {"CNI_COMMAND": "DEL", **cni}, later_net)
        left = allocations(agent)
        print(f"in Consul: {left or f'nothing left under ipam/{POOL}/'}")
        step("the pool, as an operator sees it")
        show([str(BIN / "ipam-da-consul-admin"), "usage", POOL])
    finally:
        agent.close()
        shutil.rmtree(state, ignore_errors=True)
        print("\n== the Consul dev agent is stopped; nothing is left outside this folder's "
              ".venv and .cache")


if __name__ == "__main__":
    main()
