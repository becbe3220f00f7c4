"""Demo: a real Consul dev agent, one pool, and ADD -> CHECK -> DEL through the installed plugin."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.agent import ConsulAgent  # noqa: E402

PLUGIN = str(Path(sys.executable).parent / "ipam-da-consul")
RANGES = [
    {
        "subnet": "10.0.20.0/23",
        "rangeStart": "10.0.21.100",
        "rangeEnd": "10.0.21.150",
        "gateway": "10.0.20.1",
    }
]


def call(command: str, conf: dict, container: str) -> dict | None:
    env = {
        **os.environ,
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": container,
        "CNI_IFNAME": "eth0",
        "CNI_NETNS": "/var/run/netns/demo",
        "CNI_PATH": "/opt/cni/bin",
    }
    p = subprocess.run([PLUGIN], input=json.dumps(conf).encode(), env=env, capture_output=True)
    shown = p.stdout.decode().strip() or "(no output: success)"
    print(f"\n$ CNI_COMMAND={command} CNI_CONTAINERID={container} ipam-da-consul", end="")
    print(f"  -> exit {p.returncode}")
    print(shown)
    if p.stderr:
        print(p.stderr.decode().rstrip(), file=sys.stderr)
    if p.returncode != 0:
        raise SystemExit(f"demo: {command} failed")
    return json.loads(p.stdout) if p.stdout.strip() else None


def main() -> None:
    agent = ConsulAgent("demo").start()
    try:
        print(f"Consul dev agent up at {agent.url}")
        agent.create_pool("demo-pool", RANGES)
        print("KV: ipam/demo-pool =", json.dumps(RANGES))
        conf = {
            "cniVersion": "1.0.0",
            "name": "demo-net",
            "ipam": {
                "type": "ipam-delegated",
                "delegates": ["ipam-da-consul"],
                "consul_servers": [agent.url],
            },
            "prevResult": {"cniVersion": "1.0.0", "ips": [], "pools": [{"name": "demo-pool"}]},
        }
        added = call("ADD", conf, "demo-container")
        print("KV now:", {k: v.decode() for k, v in agent.tree("ipam/demo-pool/").items() if v})
        checked = {**conf, "prevResult": {**(added or {}), "pools": [{"name": "demo-pool"}]}}
        call("CHECK", checked, "demo-container")
        call("DEL", checked, "demo-container")
        left = {k: v for k, v in agent.tree("ipam/demo-pool/").items() if v}
        print("\nKV after DEL:", left or "no allocations left")
    finally:
        agent.close()
        print("Consul dev agent stopped")


if __name__ == "__main__":
    main()
