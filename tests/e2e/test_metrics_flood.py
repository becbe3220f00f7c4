"""Issue 25, finding 4: a local user holding hundreds of idle connections to the metrics port
must not slow the calls down, nor take the helper's descriptors, nor stop scrapes for longer
than the listener's request timeout.

On prometheus_client's own listener (a thread per connection, no timeout) this test fails:
the flood takes every descriptor, the helper can no longer accept on its unix socket, and each
call waits out the client's 1 s ack timeout and runs in-process instead (~1.4 s).
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import pytest
import requests
from ipam_da_consul.cni.helper.metrics import MAX_CONNECTIONS, REQUEST_TIMEOUT

from tests.support.plugin import run_plugin
from tests.support.util_procs import Helper

# The helper's descriptors are lowered to this once it is up: the measured exhaustion took
# 1,019 connections at the common 1,024 soft limit; 256 shows the same with a quarter of them.
# Lowering both limits, not only the soft one, also keeps the helper from raising it back.
FD_LIMIT = 256
FLOOD = 600
CALL_ROUNDS = 5  # an ADD and a DEL each

# The attacker: an unprivileged process (nobody) opening FLOOD connections that never send a
# byte; it says how many connected. Each line on its stdin then asks how many of them the
# listener has not closed yet.
FLOODER = r"""
import select, socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
# A few at a time, each given a moment to be accepted: a burst overflows the listen queue,
# and the kernel then completes handshakes (SYN cookies) for connections the server never sees.
socks, connected, end = [], 0, time.monotonic() + 6
while len(socks) < n:
    batch = [socket.socket() for _ in range(min(4, n - len(socks)))]
    poller = select.poll()
    for s in batch:
        s.setblocking(False)
        s.connect_ex((host, port))
        poller.register(s, select.POLLOUT)
    socks += batch
    waiting = {s.fileno() for s in batch}
    until = min(end, time.monotonic() + 0.05)
    while waiting and time.monotonic() < until:
        waiting -= {fd for fd, _ in poller.poll(10)}
    connected += len(batch) - len(waiting)
    time.sleep(0.001)
print("connected", connected, flush=True)
for _ in sys.stdin:
    poller = select.poll()
    for s in socks:
        poller.register(s, select.POLLIN | select.POLLRDHUP | select.POLLHUP | select.POLLERR)
    closed = {fd for fd, _ in poller.poll(0)}
    print(sum(1 for s in socks if s.fileno() not in closed), flush=True)
"""

SETPRIV = shutil.which("setpriv") or ""
# The system's interpreter, -I -S: nobody needs nothing of this checkout or its venv.
PYTHON = shutil.which("python3", path="/usr/bin:/bin") or ""


def descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def scrape(url: str) -> str | None:
    try:
        answer = requests.get(url, timeout=2)
    except requests.RequestException:
        return None
    return answer.text if answer.status_code == 200 else None


def metric(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert found, f"no {name} in the scrape"
    return float(found.group(1))


@pytest.mark.skipif(
    os.geteuid() != 0 or not SETPRIV or not PYTHON,
    reason="needs root, setpriv and /usr/bin/python3 to flood as nobody",
)
def test_a_metrics_flood_leaves_calls_fds_and_scrapes_alone(
    tmp_path: Path, make_pool, conf_for
) -> None:
    helper = Helper(
        tmp_path, stderr=tmp_path / "helper.err", args=["--metrics-address", "127.0.0.1:0"]
    )
    flooder: subprocess.Popen[str] | None = None
    try:
        found = re.search(r"metrics on (http://\S+)", helper.wait_stderr("metrics on "))
        assert found, helper.stderr_text()
        url = found.group(1)
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        pid = helper.proc.pid
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))
        conf = conf_for(make_pool())
        env = helper.env

        def rounds(tag: str) -> list[float]:
            took = []
            for i in range(CALL_ROUNDS):
                for command in ("ADD", "DEL"):
                    began = time.monotonic()
                    out = run_plugin(command, conf, container=f"{tag}{i}", env=env)
                    took.append(time.monotonic() - began)
                    assert out.rc == 0, out
            return took

        rounds("warm")  # imports, pool load, leader check: not what is compared
        before = rounds("base")
        fds_before = descriptors(pid)
        served_before = helper.stats()["served"]
        assert scrape(url) is not None

        flooder = subprocess.Popen(
            [SETPRIV, "--reuid=65534", "--regid=65534", "--clear-groups",
             PYTHON, "-I", "-S", "-c", FLOODER, "127.0.0.1", str(port), str(FLOOD)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert flooder.stdin and flooder.stdout
        said = flooder.stdout.readline().split()
        assert said[:1] == ["connected"], said
        connected = int(said[1])
        flood_began = time.monotonic()

        def still_open() -> int:
            assert flooder and flooder.stdin and flooder.stdout
            flooder.stdin.write("?\n")
            flooder.stdin.flush()
            return int(flooder.stdout.readline())

        fds_flood = descriptors(pid)
        cpu, began = cpu_seconds(pid), time.monotonic()
        during = rounds("flood")
        busy = (cpu_seconds(pid) - cpu) / (time.monotonic() - began)
        fds_flood = max(fds_flood, descriptors(pid))
        # A scrape gets through once the first MAX_CONNECTIONS idle connections have timed out.
        scraped = None
        while scraped is None and time.monotonic() < flood_began + REQUEST_TIMEOUT + 5:
            scraped = scrape(url)
            if scraped is None:
                time.sleep(0.2)
        scraped_after = time.monotonic() - flood_began
        # A connection the kernel queued late (a retried handshake) is held, and timed out,
        # from when it is accepted: wait for those too, a request timeout at most.
        left_open = still_open()
        while left_open and time.monotonic() < flood_began + 2 * REQUEST_TIMEOUT + 5:
            time.sleep(0.2)
            left_open = still_open()
        fds_after = descriptors(pid)
        flooder.stdin.close()
        flooder.wait(10)
        served = helper.stats()["served"] - served_before

        seen = (
            f"calls: median {statistics.median(before) * 1000:.0f} ms before the flood, "
            f"{statistics.median(during) * 1000:.0f} ms during it (slowest "
            f"{max(during) * 1000:.0f} ms), {served} of {len(during)} served by the helper, "
            f"which used {busy:.0%} of a CPU meanwhile; "
            f"helper fds {fds_before} before, {fds_flood} during, {fds_after} after "
            f"(limit {FD_LIMIT}); scrape {'ok' if scraped else 'failed'} after "
            f"{scraped_after:.1f} s; {connected} of {FLOOD} connected, {left_open} still open "
            "at the end"
        )
        print(seen)
        # (a) The calls are still the helper's (a late ack would have sent them in-process)
        # and keep their latency, loosely: one in-process call alone is ~0.4 s.
        assert served == len(during), seen
        assert statistics.median(during) < statistics.median(before) + 0.25, seen
        assert max(during) < 1.0, seen  # the client's ack timeout
        # (c) The listener holds at most its cap; the rest of the flood costs no descriptor.
        assert fds_flood <= fds_before + MAX_CONNECTIONS + 8, seen
        # (b) A scrape gets through while the flooder still holds its connections...
        assert scraped is not None, seen
        assert metric(
            scraped, 'ipam_da_consul_metrics_connections_dropped_total{reason="over_cap"}'
        ) >= FLOOD - MAX_CONNECTIONS, seen
        assert metric(
            scraped, 'ipam_da_consul_metrics_connections_dropped_total{reason="timeout"}'
        ) >= 1, seen
        # (d) ... because every idle connection was closed by the request timeout.
        assert left_open == 0, seen
        assert fds_after <= fds_before + 4, seen
    finally:
        if flooder is not None and flooder.poll() is None:
            flooder.kill()
            flooder.wait()
        helper.close()
