"""What a pool's writer can make one call cost (issue 25, finding 5), for the record:

- rss: peak RSS (`/usr/bin/time -f %M`) of an in-process ADD into a pool whose folder holds 60
  allocations carrying a 400 KiB unknown field, against one holding 60 plain ones;
- helper: the helper's RSS after an ADD into that pool with each of four tokens;
- spread: wall time of an in-process `pick: spread` ADD into a /16 with 30,000 and with 1,024
  exclusions (every other address), and with none.

Starts its own Consul (`--agent server`: a one-server agent, compact answers as production
gets them; `dev`: a -dev agent, which pretty-prints). Run from the repo root:

    .venv/bin/python scripts/measure_pool_limits.py [--agent dev|server] [rss] [helper] [spread]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.getcwd())

from tests.support.agent import ConsulAgent
from tests.support.plugin import BIN_DIR, NO_HELPER, netconf, run_plugin
from tests.support.util_procs import Helper

PAD = 400 * 1024


def add(conf: dict[str, Any], container: str) -> tuple[int, str, int, float]:
    """An in-process ADD under /usr/bin/time: exit status, stdout, peak RSS (KiB), wall s."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("CNI_", "CONSUL_", "IPAM_DA_"))
    }
    env.update(IPAM_DA_CONSUL_SOCKET=NO_HELPER, CNI_COMMAND="ADD", CNI_CONTAINERID=container,
               CNI_IFNAME="eth0", CNI_NETNS="/x", CNI_PATH=str(BIN_DIR))
    began = time.monotonic()
    p = subprocess.run(
        ["/usr/bin/time", "-f", "%M", str(BIN_DIR / "ipam-da-consul")],
        input=json.dumps(conf).encode(), env=env, capture_output=True, check=False,
    )
    took = time.monotonic() - began
    peak = int(p.stderr.decode().strip().splitlines()[-1])
    return p.returncode, p.stdout.decode(), peak, took


def fat_pool(agent: ConsulAgent) -> None:
    agent.create_pool("fat", [{"subnet": "10.50.0.0/16", "gateway": "10.50.0.1"}])
    first = ipaddress.IPv4Address("10.50.0.2")
    for i in range(60):
        agent.put(f"ipam/fat/{first + i}", {"target": f"t{i}", "pad": "x" * PAD})
    agent.create_pool("thin", [{"subnet": "10.51.0.0/16", "gateway": "10.51.0.1"}])
    for i in range(60):
        agent.put(f"ipam/thin/{ipaddress.IPv4Address('10.51.0.2') + i}", {"target": f"t{i}"})


def rss(agent: ConsulAgent, runs: int) -> None:
    for name in ("thin", "fat"):
        for r in range(runs):
            rc, out, peak, took = add(netconf([agent.url], [{"name": name}]), f"m-{name}-{r}")
            print(f"rss pool={name} rc={rc} peak_rss_kib={peak} wall={took:.2f}s {out[:90]}")


def helper_rss(agent: ConsulAgent) -> None:
    def now(pid: int) -> str:
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
        return " ".join(line.split(":")[0] + "=" + line.split()[1] for line in status
                        if line.startswith(("VmRSS", "VmHWM")))

    helper = Helper(Path(tempfile.mkdtemp()))
    try:
        out = run_plugin("ADD", netconf([agent.url], [{"name": "thin"}]), container="warm",
                         env=helper.env)
        print(f"helper after a small pool: rc={out.rc} {now(helper.proc.pid)} (KiB)")
        for token in range(4):
            conf = netconf([agent.url], [{"name": "fat"}], consul_token=f"token-{token}")
            out = run_plugin("ADD", conf, container=f"f{token}", env=helper.env)
            time.sleep(1)
            print(f"helper after the fat pool, token {token}: rc={out.rc} "
                  f"{now(helper.proc.pid)} (KiB) pools={helper.stats().get('pools')}")
    finally:
        helper.close()


def spread(agent: ConsulAgent, runs: int) -> None:
    base = int(ipaddress.IPv4Address("10.60.0.0"))
    for n in (30_000, 1_024, 0):
        name = f"excl{n}"
        exclude = [str(ipaddress.IPv4Address(base + 2 + 2 * i)) for i in range(n)]
        agent.put(f"ipam/{name}", [{"subnet": "10.60.0.0/16", "gateway": "10.60.0.1",
                                     "exclude": exclude}])
        agent.put(f"ipam/{name}/", "")
        for r in range(runs):
            conf = netconf([agent.url], [{"name": name}], pick="spread")
            rc, out, peak, took = add(conf, f"s-{n}-{r}")
            print(f"spread exclusions={n} rc={rc} wall={took:.2f}s peak_rss_kib={peak} "
                  f"{out[:90]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", nargs="*", default=["rss", "helper", "spread"])
    parser.add_argument("--agent", choices=["dev", "server"], default="server")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if args.agent == "server":
        agent = ConsulAgent("measure", dev=False, extra=["-bootstrap-expect", "1"]).start()
    else:
        agent = ConsulAgent("measure").start()
    try:
        if {"rss", "helper"} & set(args.what):
            fat_pool(agent)
        if "rss" in args.what:
            rss(agent, args.runs)
        if "helper" in args.what:
            helper_rss(agent)
        if "spread" in args.what:
            spread(agent, args.runs)
    finally:
        agent.close()


if __name__ == "__main__":
    main()
