"""The helper started on demand, as systemd's socket unit starts it, without a running systemd.

Debian's `systemd-socket-activate` (no --accept) waits for the first connection, then execs the
daemon in place with LISTEN_FDS=1 / LISTEN_PID; when the daemon exits it is gone, and a new
connection to the path is refused (checked by hand: it does not re-spawn). systemd itself keeps
the listening socket across service runs and starts the service again when a connection
arrives. `Activator` reproduces exactly that: it holds the listening socket (as the .socket
unit does) and re-runs systemd-socket-activate with it after every exit, so connections made
while no helper runs wait in the socket's queue for the next one.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.agent import ConsulAgent
from tests.support.plugin import executable, run_plugin
from tests.support.util_procs import Unresponsive

ACTIVATE = shutil.which("systemd-socket-activate")
pytestmark = pytest.mark.skipif(
    ACTIVATE is None, reason="systemd-socket-activate is missing: apt-get install systemd"
)

# Put the listening socket at fd 3 and name this process in LISTEN_PID, then exec
# systemd-socket-activate, which takes it over ("Received 1 descriptors via the environment").
_AT_FD3 = (
    "import os, sys\n"
    "os.dup2(int(sys.argv[1]), 3)\n"
    "os.set_inheritable(3, True)\n"  # dup2 onto itself leaves close-on-exec set
    "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1')\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


class Activator:
    """A socket unit: a listening socket held here, and the helper (re)started on demand."""

    def __init__(self, directory: Path, helper_args: list[str]) -> None:
        run = directory / "run"
        run.mkdir(mode=0o700)  # DirectoryMode=0700
        self.path = str(run / "helper.sock")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        os.chmod(self.path, 0o600)  # SocketMode=0600
        self.listener.listen(1024)
        self.log = directory / "activate.err"
        self.argv = [
            sys.executable, "-c", _AT_FD3, str(self.listener.fileno()),
            str(ACTIVATE), executable("ipam-da-consul-helper"), "--socket", self.path,
            *helper_args,
        ]
        self.starts: list[int] = []  # pids, one per helper run
        self.exits: list[int] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopping = False
        self.thread = threading.Thread(target=self._supervise, daemon=True)
        self.thread.start()

    def _supervise(self) -> None:
        while not self.stopping:
            with open(self.log, "ab") as err:
                self.proc = subprocess.Popen(
                    self.argv, pass_fds=(self.listener.fileno(),), stdout=err, stderr=err
                )
            self.starts.append(self.proc.pid)
            self.exits.append(self.proc.wait())

    @property
    def env(self) -> dict[str, str]:
        return {"IPAM_DA_CONSUL_SOCKET": self.path}

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_started(self, timeout: float = 30.0) -> None:
        # The supervising thread spawns asynchronously: on a loaded machine the first Popen can
        # still be under way when the test body starts.
        end = time.monotonic() + timeout
        while not self.starts:
            assert time.monotonic() < end, "systemd-socket-activate was never started"
            time.sleep(0.02)

    def wait_exits(self, n: int, timeout: float = 30.0) -> None:
        end = time.monotonic() + timeout
        while len(self.exits) < n:
            assert time.monotonic() < end, f"the helper never exited: {self.text()[-2000:]}"
            time.sleep(0.05)

    def close(self) -> None:
        self.stopping = True
        # The supervisor may be starting one more run as we stop it: stop whichever is current
        # until it is done, or that run would outlive the test, listening.
        end = time.monotonic() + 15
        while self.thread.is_alive() and time.monotonic() < end:
            proc = self.proc
            if proc is not None and proc.poll() is None:
                proc.terminate()
            self.thread.join(0.1)
        self.listener.close()


@pytest.fixture
def activator(tmp_path: Path) -> Iterator[Activator]:
    a = Activator(tmp_path, ["--idle-exit", "1.5", "--refresh-interval", "0.2"])
    a.wait_started()
    yield a
    a.close()


def served_by(log: Path) -> set[int]:
    """The pids on a verbose call's log lines: the helper's, when it ran the call."""
    return {int(line.split()[1]) for line in log.read_text().splitlines() if line[:1].isdigit()}


def test_served_on_demand_exits_idle_and_starts_again(
    activator: Activator, consul: ConsulAgent, make_pool, conf_for, tmp_path: Path
) -> None:
    pool = make_pool()
    # A cold start imports everything before it can acknowledge: give it time (see the README
    # for what the default 1 s does on a slow host).
    env = {**activator.env, "IPAM_DA_CONSUL_HELPER_ACK_TIMEOUT": "30"}
    assert not activator.exits  # waiting, nothing running yet
    first_log = tmp_path / "add.log"
    add = run_plugin("ADD", conf_for(pool), container="sa1", verbose=True,
                     env={**env, "IPAM_DA_CONSUL_LOG_FILE": str(first_log)})
    assert add.rc == 0, add
    assert add.json["ips"][0]["address"] == "10.0.21.100/23"
    assert served_by(first_log) == {activator.starts[0]}
    # --socket names the socket the unit passes: the line says just that.
    assert f"listening on {activator.path} (socket activation)\n" in activator.text()

    # No call for 1.5 s: the helper exits cleanly, and the socket stays (systemd's).
    activator.wait_exits(1)
    assert activator.exits == [0], activator.text()
    assert "no call for 1.5 s, exiting" in activator.text()
    assert stat.S_ISSOCK(os.stat(activator.path).st_mode)

    # The next call starts it again and is served by the new helper.
    del_log = tmp_path / "del.log"
    delete = run_plugin("DEL", conf_for(pool), container="sa1", verbose=True,
                        env={**env, "IPAM_DA_CONSUL_LOG_FILE": str(del_log)})
    assert delete.rc == 0, delete
    assert len(activator.starts) >= 2
    assert served_by(del_log) == {activator.starts[1]}
    assert consul.allocations(pool) == {}
    activator.wait_exits(2)
    assert activator.exits[:2] == [0, 0]


def test_default_ack_timeout_on_a_cold_start(
    activator: Activator, make_pool, conf_for, tmp_path: Path
) -> None:
    """With the default 1 s, a cold start may be too slow to acknowledge: the call is then
    done in-process, with the same result, and the helper drops the request it acknowledged
    too late. Either way the call succeeds; the helper serves the next one."""
    pool = make_pool()
    began = time.monotonic()
    log = tmp_path / "cold.log"
    add = run_plugin("ADD", conf_for(pool), container="cold", verbose=True,
                     env={**activator.env, "IPAM_DA_CONSUL_LOG_FILE": str(log)})
    took = time.monotonic() - began
    assert add.rc == 0, add
    assert add.json["ips"][0]["address"] == "10.0.21.100/23"
    by_helper = served_by(log) == {activator.starts[0]}
    print(f"cold start: {took:.2f} s, served by {'the helper' if by_helper else 'in-process'}")
    again = run_plugin("ADD", conf_for(pool), container="cold", env=activator.env)
    assert again.rc == 0 and again.json == add.json, again


def test_never_exits_in_the_middle_of_a_call(activator: Activator, tmp_path: Path) -> None:
    hung = Unresponsive()  # accepts and never answers: the call runs to its 3 s deadline
    try:
        conf = {
            "cniVersion": "1.0.0", "name": "n", "type": "x",
            "ipam": {"type": "ipam-da-consul", "consul_servers": [hung.url], "timeout": 3,
                     "pools": [{"name": "p"}]},
        }
        out = run_plugin("ADD", conf, container="slow",
                         env={**activator.env, "IPAM_DA_CONSUL_HELPER_ACK_TIMEOUT": "30"})
    finally:
        hung.close()
    # Longer than --idle-exit, yet answered by the helper (in-process would say the same, so
    # the helper's own exit is what tells): it exited only after answering.
    assert out.rc == 11, out
    assert json.loads(out.stdout)["code"] == 11
    activator.wait_exits(1)
    assert activator.exits == [0]
    text = activator.text()
    assert "Execing" in text and text.index("no call for") > text.index("Execing")


def started_by_activate(tmp_path: Path, mode: int | None, *helper_args: str) -> str:
    """As an operator starts it without systemd: `systemd-socket-activate -l PATH helper`
    (issue 22, finding 8), the socket made by that tool (`mode`: then changed to that), the
    helper started by a first connection. What it said on stderr."""
    run = tmp_path / "sa"
    run.mkdir(mode=0o755)
    path = run / "h.sock"
    log = tmp_path / "activate.err"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [str(ACTIVATE), "-l", str(path), executable("ipam-da-consul-helper"),
             "--state-dir", str(tmp_path / "state"), *helper_args],
            stdout=err, stderr=err,
        )
    try:
        end = time.monotonic() + 30
        while not path.exists():
            assert proc.poll() is None and time.monotonic() < end, log.read_text()
            time.sleep(0.05)
        if mode is not None:
            os.chmod(path, mode)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.connect(str(path))
            while "listening on" not in log.read_text():
                assert proc.poll() is None and time.monotonic() < end, log.read_text()
                time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(10)
    return log.read_text().replace(str(path), "PATH")


def test_the_start_up_line_names_the_activated_socket(tmp_path: Path) -> None:
    """It said `listening on /run/ipam-da-consul/helper.sock (socket activation)` while serving
    another path; now the path it serves, and what plugin calls need to find it."""
    text = started_by_activate(tmp_path, 0o600)
    assert (
        "listening on PATH (socket activation), not on the default "
        "/run/ipam-da-consul/helper.sock: plugin calls need IPAM_DA_CONSUL_SOCKET=PATH\n"
    ) in text, text
    assert "note:" not in text  # 0600: nobody else can connect


def test_a_socket_others_may_connect_to_is_said_to_be_guarded(tmp_path: Path) -> None:
    """The activator chose the mode (systemd-socket-activate: its umask). Connecting takes
    write permission; when others have it, the start-up says who is served."""
    text = started_by_activate(tmp_path, 0o666, "--socket", str(tmp_path / "elsewhere.sock"))
    assert (
        "ipam-da-consul-helper: note: the activated socket PATH is mode 0666, so other local "
        f"users can connect; only root and uid {os.geteuid()} are served (peer credentials)"
    ) in text, text
    assert (
        f"listening on PATH (socket activation), not on {tmp_path / 'elsewhere.sock'} "
        "(--socket): plugin calls need IPAM_DA_CONSUL_SOCKET=PATH"
    ) in text, text


def test_listen_pid_of_another_process_is_ignored(tmp_path: Path) -> None:
    """Variables inherited from elsewhere (LISTEN_PID not ours) never make the helper take
    fd 3: it binds its own socket."""
    sock = tmp_path / "run" / "helper.sock"
    env = {**os.environ, "LISTEN_PID": "1", "LISTEN_FDS": "1"}
    proc = subprocess.Popen(
        [executable("ipam-da-consul-helper"), "--socket", str(sock)],
        env=env, stderr=subprocess.PIPE,
    )
    try:
        end = time.monotonic() + 30
        while not sock.exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < end
            time.sleep(0.05)
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    finally:
        proc.terminate()
        proc.wait(10)
    assert not sock.exists()  # its own socket: removed on exit


def test_activated_without_a_listening_socket_is_refused(tmp_path: Path) -> None:
    helper = executable("ipam-da-consul-helper")
    script = (
        "import os, socket, sys\n"
        "a, b = socket.socketpair()\n"  # connected, not listening: Accept=yes is unsupported
        "os.dup2(a.fileno(), 3)\n"
        "os.set_inheritable(3, True)\n"
        "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1')\n"
        "os.execv(sys.argv[1], sys.argv[1:])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, helper, "--socket", str(tmp_path / "s.sock")],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 1
    assert "not listening" in out.stderr
