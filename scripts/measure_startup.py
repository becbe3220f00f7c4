"""Start-up cost of the single-file plugin against the venv install, as a runtime runs them.

    .venv/bin/python scripts/measure_startup.py [--runs N] [--single DIR ...]

Starts a Consul dev agent and, per flavour, its own helper; then times, interleaved in a
shuffled order each round: each interpreter's `python -c pass` (the floor), and ADD through the
helper and in-process for the venv and for every single-file build named (default dist/). Every
figure is a whole process; wall time from spawn to reap, CPU time (user + sys) from wait4, so
the CPU figure stays meaningful on a machine other work shares. Each ADD is followed by an
untimed DEL so the pools never fill.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.agent import ConsulAgent  # noqa: E402


@dataclass
class Series:
    label: str
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def line(self, floor: Series | None) -> str:
        w, c = statistics.median(self.wall), statistics.median(self.cpu)
        ratio = ""
        if floor is not None:
            fw, fc = statistics.median(floor.wall), statistics.median(floor.cpu)
            ratio = f"{w / fw:6.2f}x {c / fc:6.2f}x"
        return f"| {self.label:<44} | {w:8.1f} | {c:8.1f} | {ratio:>15} | {len(self.wall):3} |"


def timed(argv: list[str], env: dict[str, str], stdin: bytes = b"") -> tuple[float, float, str]:
    """Wall ms, CPU ms of the child, its stdout."""
    with tempfile.TemporaryFile() as fin:
        fin.write(stdin)
        fin.seek(0)
        began = time.monotonic()
        proc = subprocess.Popen(argv, stdin=fin, stdout=subprocess.PIPE, env=env)
        assert proc.stdout is not None
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = (time.monotonic() - began) * 1000
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{argv} failed ({proc.returncode}): {out!r}")
    return wall, (usage.ru_utime + usage.ru_stime) * 1000, out.decode()


def interpreter(script: Path) -> str:
    with open(script, "rb") as fh:
        line = fh.readline().decode().strip()
    return line[2:].split()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--single", type=Path, action="append", help="folder of a build")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    venv_bin = ROOT / ".venv/bin"
    flavours = {"venv": venv_bin}
    for i, folder in enumerate(args.single or [ROOT / "dist"]):
        flavours[f"single{i} ({interpreter(folder / 'ipam-da-consul')})"] = folder
    tmp = Path(tempfile.mkdtemp(prefix="ipdc-startup-"))
    agent = ConsulAgent("startup").start()
    helpers: list[subprocess.Popen[bytes]] = []
    try:
        base = {k: v for k, v in os.environ.items()
                if not k.startswith(("CNI_", "CONSUL_", "IPAM_DA_", "PYTHON"))}
        floors: dict[str, Series] = {}
        for py in {str(venv_bin / "python"), *(interpreter(f / "ipam-da-consul")
                                               for f in flavours.values())}:
            floors[py] = Series(f"floor: {py} -c pass")
        series: dict[tuple[str, str], Series] = {}
        sockets: dict[str, str] = {}
        pools: dict[tuple[str, str], str] = {}
        for n, (name, folder) in enumerate(flavours.items()):
            sock = tmp / f"h{n}" / "helper.sock"
            helpers.append(subprocess.Popen([str(folder / "ipam-da-consul-helper"), "--socket",
                                             str(sock)], stderr=subprocess.DEVNULL))
            sockets[name] = str(sock)
            for m, mode in enumerate(("helper", "inproc")):
                series[name, mode] = Series(f"ADD {name} ({mode})")
                pools[name, mode] = agent.create_pool(
                    f"startup-{n}-{m}", [{"subnet": f"10.77.{n * 2 + m}.0/24"}]
                )
        end = time.monotonic() + 30
        while not all(os.path.exists(s) for s in sockets.values()):
            if time.monotonic() > end:
                raise RuntimeError("a helper made no socket")
            time.sleep(0.05)

        def conf(pool: str) -> bytes:
            return json.dumps({"cniVersion": "1.0.0", "name": "startup", "type": "x", "ipam": {
                "type": "ipam-da-consul", "consul_servers": [agent.url],
                "pools": [{"name": pool}]}}).encode()

        counter = iter(range(10**9))

        def add_del(name: str, mode: str) -> None:
            env = dict(base, CNI_CONTAINERID=f"c{next(counter)}", CNI_IFNAME="eth0",
                       CNI_NETNS="/var/run/netns/x", CNI_PATH="/nonexistent",
                       IPAM_DA_CONSUL_SOCKET=sockets[name] if mode == "helper"
                       else str(tmp / "none.sock"))
            exe = str(flavours[name] / "ipam-da-consul")
            data = conf(pools[name, mode])
            wall, cpu, _ = timed([exe], dict(env, CNI_COMMAND="ADD"), data)
            series[name, mode].wall.append(wall)
            series[name, mode].cpu.append(cpu)
            timed([exe], dict(env, CNI_COMMAND="DEL"), data)

        def floor(py: str) -> None:
            wall, cpu, _ = timed([py, "-c", "pass"], base)
            floors[py].wall.append(wall)
            floors[py].cpu.append(cpu)

        jobs = [lambda py=py: floor(py) for py in floors]
        jobs += [lambda k=k: add_del(*k) for k in series]
        for job in jobs:  # warm-up: page cache, the helpers' pool caches
            job()
        for _ in range(args.runs):
            random.shuffle(jobs)
            for job in jobs:
                job()
        print(f"load average {os.getloadavg()[0]:.2f}; median of {args.runs} runs")
        print("| figure | wall ms | CPU ms | x floor (wall, CPU) | n |")
        print("|---|---:|---:|---:|---:|")
        for f in floors.values():
            print(f.line(None))
        for (name, _mode), s in series.items():
            print(s.line(floors[interpreter(flavours[name] / "ipam-da-consul")]
                         if name != "venv" else floors[str(venv_bin / "python")]))
        if args.json:
            data = {s.label: {"wall_ms": statistics.median(s.wall),
                              "cpu_ms": statistics.median(s.cpu)}
                    for s in [*floors.values(), *series.values()]}
            args.json.write_text(json.dumps(data, indent=2))
    finally:
        for h in helpers:
            h.terminate()
            h.wait(10)
        agent.close()


if __name__ == "__main__":
    main()
