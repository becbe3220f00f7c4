"""The partition test's clock nemesis (as Jepsen's bump and strobe): every simulated host runs
its plugin processes and its helper under Debian's libfaketime with a wall clock of its own,
some hours ahead, one behind, and stepped back during the run as an NTP correction of a
boot-time clock does.

How: `LD_PRELOAD=libfaketime.so.1` with a per-host `FAKETIME_TIMESTAMP_FILE` holding a relative
offset ("+7200"), re-read every `FAKETIME_CACHE_DURATION` second so that the long-lived helper
follows a step, and `FAKETIME_DONT_FAKE_MONOTONIC=1`, which leaves CLOCK_MONOTONIC and
CLOCK_BOOTTIME alone: the plugin's deadlines, the thin client's start time and the fence
sessions' periods use them, and a host's NTP step does not move them either. `probe()` checks
all of this on the machine before a run (a libfaketime that faked BOOTTIME would be refused).

libfaketime 0.9.10 (Debian 12) rewrites every absolute CLOCK_MONOTONIC deadline given to
clock_nanosleep as if it were on its faked clock, even with FAKETIME_DONT_FAKE_MONOTONIC=1
(upstream issue 426, fixed in 0.9.11): the kernel gets a negative time, and Python 3.11's
`time.sleep`, which sleeps that way, fails with EINVAL. A real host has no such bug, so a
small shim loaded before libfaketime hands sleeps on the clocks it leaves alone straight to
the kernel (built here with the C compiler; without one there is no clock nemesis).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LIBRARY_GLOB = "/usr/lib/*/faketime/libfaketime.so.1"
# How often a process re-reads its host's offset: the helper follows a step within this.
CACHE_SECONDS = 1

_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* Sleeps on the clocks libfaketime is told to leave alone go to the kernel untouched; the
   rest (CLOCK_REALTIME) through libfaketime, which translates its faked deadlines. */
int clock_nanosleep(clockid_t clock, int flags, const struct timespec *req, struct timespec *rem)
{
    static int (*next)(clockid_t, int, const struct timespec *, struct timespec *);
    if (clock == CLOCK_MONOTONIC || clock == CLOCK_BOOTTIME || clock == CLOCK_MONOTONIC_RAW)
        return syscall(SYS_clock_nanosleep, clock, flags, req, rem) == -1 ? errno : 0;
    if (next == NULL)
        next = (int (*)(clockid_t, int, const struct timespec *, struct timespec *))
            dlsym(RTLD_NEXT, "clock_nanosleep");
    return next(clock, flags, req, rem);
}
"""

# Run under the preload: what the clocks read, whether a sleep on the monotonic clock works, and
# how soon a running process follows a step of its offset file (from +2h to -1h).
_PROBE = r"""
import json, sys, time
def clocks():
    return {"real": time.time(), "mono": time.clock_gettime(time.CLOCK_MONOTONIC),
            "boot": time.clock_gettime(time.CLOCK_BOOTTIME)}
first = clocks()
print(json.dumps({"first": first}), flush=True)
began = time.monotonic()
try:
    time.sleep(0.2)
    print(json.dumps({"slept": time.monotonic() - began}), flush=True)
except OSError as exc:
    print(json.dumps({"slept": repr(exc)}), flush=True)
sys.stdin.readline()  # the parent has stepped the offset
told, until = time.monotonic(), time.monotonic() + 10
while time.time() > first["real"] - 3 * 3600 + 60 and time.monotonic() < until:
    time.sleep(0.05)
print(json.dumps({"followed_after": time.monotonic() - told, "stepped": clocks()}), flush=True)
"""


def library() -> str | None:
    found = sorted(glob.glob(LIBRARY_GLOB))
    return found[0] if found else None


def library_version() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "libfaketime"],
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    return "unknown version"


def hm(offset: float) -> str:
    sign = "-" if offset < 0 else "+"
    minutes = round(abs(offset) / 60)
    return f"{sign}{minutes // 60}h{minutes % 60:02d}"


@dataclass
class Kit:
    """libfaketime and the sleep shim, checked to work as this test needs."""

    lib: str
    shim: str
    version: str
    checked: str  # what the probe saw, for the report


def prepare(folder: Path) -> Kit | str:
    """The kit, or why the clock nemesis cannot run here."""
    lib = library()
    if lib is None:
        return f"libfaketime not installed (no {LIBRARY_GLOB}; Debian package faketime)"
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return "no C compiler to build the sleep shim libfaketime 0.9.10 needs under Python 3.11"
    folder.mkdir(parents=True, exist_ok=True)
    src, shim = folder / "sleep_shim.c", folder / "sleep_shim.so"
    src.write_text(_SHIM)
    built = subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(shim), str(src), "-ldl"],
                           capture_output=True, text=True, timeout=60)
    if built.returncode != 0:
        return f"the sleep shim does not build: {built.stderr.strip()[-300:]}"
    kit = Kit(lib, str(shim), library_version(), "")
    ok, said = probe(kit, folder)
    if not ok:
        return said
    kit.checked = said
    return kit


def env_for(kit: Kit, offset_file: Path) -> dict[str, str]:
    return {
        "LD_PRELOAD": f"{kit.shim}:{kit.lib}",
        "FAKETIME_TIMESTAMP_FILE": str(offset_file),
        "FAKETIME_CACHE_DURATION": str(CACHE_SECONDS),
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }


def write_offset(path: Path, offset: float) -> None:
    # Renamed into place: a process re-reading the file never sees it half written.
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{'+' if offset >= 0 else '-'}{abs(int(offset))}\n")
    os.replace(tmp, path)


def probe(kit: Kit, folder: Path) -> tuple[bool, str]:
    """Empirically: under the preload, CLOCK_REALTIME carries the offset, CLOCK_MONOTONIC and
    CLOCK_BOOTTIME read what this (unfaked) process reads, a monotonic sleep works, and a
    running process follows a step of its offset file. (True, what was seen) or (False, why)."""
    offset_file = folder / "probe.offset"
    write_offset(offset_file, 7200)
    env = {**os.environ, **env_for(kit, offset_file)}
    before = (time.time(), time.monotonic(), time.clock_gettime(time.CLOCK_BOOTTIME))
    proc = subprocess.Popen([sys.executable, "-c", _PROBE], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=env)
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)

    threading.Thread(target=read, daemon=True).start()
    try:
        first = _line(lines, 20)
        after = (time.time(), time.monotonic(), time.clock_gettime(time.CLOCK_BOOTTIME))
        if "first" not in first:
            return False, "the probe under libfaketime said nothing"
        seen = first["first"]
        skew = seen["real"] - before[0]
        if not 7200 - 5 < skew < 7200 + 5 + (after[0] - before[0]):
            return False, f"CLOCK_REALTIME under libfaketime is off by {skew:.0f}s, not +7200s"
        for name, i, clock in (("mono", 1, "CLOCK_MONOTONIC"), ("boot", 2, "CLOCK_BOOTTIME")):
            if not before[i] <= seen[name] <= after[i]:
                return False, (f"{clock} is faked ({seen[name]:.1f}, outside {before[i]:.1f}.."
                               f"{after[i]:.1f}) despite FAKETIME_DONT_FAKE_MONOTONIC=1")
        slept = _line(lines, 20).get("slept")
        if not isinstance(slept, float) or not 0.19 < slept < 5:
            return False, f"time.sleep(0.2) under libfaketime: {slept}"
        write_offset(offset_file, -3600)
        assert proc.stdin is not None
        proc.stdin.write("stepped\n")
        proc.stdin.flush()
        second = _line(lines, 20)
        stepped = second.get("stepped") or {}
        if not stepped or stepped["real"] - time.time() > -3000:
            return False, "a running process did not follow a step of its offset file"
        followed = float(second.get("followed_after", 0.0))
    except (ValueError, OSError) as exc:
        return False, f"the probe under libfaketime failed: {exc!r}"
    finally:
        proc.kill()
        proc.wait()
    return True, (f"checked: CLOCK_REALTIME {skew:+.0f}s, CLOCK_MONOTONIC and CLOCK_BOOTTIME "
                  f"unfaked, time.sleep works, a running process followed a step to -1h in "
                  f"{followed:.1f}s")


def _line(lines: queue.Queue[str], timeout: float) -> dict[str, Any]:
    """The probe's next JSON line; {} when none comes in time (a faked monotonic clock can make
    its sleeps last hours)."""
    try:
        line = lines.get(timeout=timeout)
    except queue.Empty:
        return {}
    return dict(json.loads(line)) if line.strip() else {}


@dataclass
class Clocks:
    """Each simulated host's wall-clock offset, and what was applied when (monotonic)."""

    kit: Kit | None
    folder: Path
    hosts: list[str]
    offsets: dict[str, float] = field(default_factory=dict)
    events: list[tuple[float, str]] = field(default_factory=list)
    _strobe: threading.Thread | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        for host in self.hosts:
            self.offsets[host] = 0.0
            if self.kit is not None:
                write_offset(self.file(host), 0.0)

    def file(self, host: str) -> Path:
        return self.folder / f"{host}.offset"

    def env(self, host: str) -> dict[str, str]:
        return env_for(self.kit, self.file(host)) if self.kit is not None else {}

    def set(self, changes: dict[str, float], why: str) -> None:
        if self.kit is None:
            return
        said = []
        for host, offset in changes.items():
            old = self.offsets[host]
            write_offset(self.file(host), offset)
            self.offsets[host] = offset
            said.append(f"{host} {hm(old)} -> {hm(offset)}" if old else f"{host} {hm(offset)}")
        self.events.append((time.monotonic(), f"{', '.join(said)} ({why})"))

    def strobe(self, host: str, a: float, b: float, every: float, seconds: float) -> None:
        """Flip `host` between offsets a and b every `every` seconds for `seconds`, then a."""
        if self.kit is None:
            return
        self.events.append((time.monotonic(), f"{host} strobe {hm(a)} <-> {hm(b)} every "
                                              f"{every:g}s for {seconds:g}s"))

        def run() -> None:
            end, flip = time.monotonic() + seconds, False
            while not self._stop.wait(every) and time.monotonic() < end:
                flip = not flip
                write_offset(self.file(host), b if flip else a)
            write_offset(self.file(host), a)
            self.offsets[host] = a

        self._strobe = threading.Thread(target=run, daemon=True)
        self._strobe.start()

    def close(self) -> None:
        self._stop.set()
        if self._strobe is not None:
            self._strobe.join(10)

    def report(self, t0: float, reason: str | None) -> list[str]:
        if self.kit is None:
            return [f"clocks: no clock nemesis ({reason})"]
        head = (f"clocks (libfaketime {self.kit.version}, FAKETIME_DONT_FAKE_MONOTONIC=1, "
                f"re-read every {CACHE_SECONDS}s; {self.kit.checked}):")
        return [head, *(f"  {at - t0:7.1f}s  {what}" for at, what in self.events)]
