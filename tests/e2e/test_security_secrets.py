"""Issue 25, finding 6: secrets in the wrong places, against the session's real Consul agent.

- A password in a server URL (`http://user:pw@host`) is still sent (as basic auth, here to a
  proxy in front of Consul that demands it) but never shown: not in the verbose log, the CNI
  error JSON, stderr, the helper's metrics, `usage --prometheus` or the admin CLI's messages.
- The admin CLI reads its token from stdin (`--token-file -`); `--token VALUE` warns.
- The verbose log is created 0600 in a 0700 folder, and a local user (run as `nobody`) who
  controls its folder or plants a file or symlink there cannot make root append elsewhere.
- Core dumps are off in the plugin (in-process and thin client), the helper and the admin CLI.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.e2e.test_singlefile import single_file_bin  # noqa: F401 (a fixture)
from tests.support.agent import ConsulAgent, SecureConsulAgent
from tests.support.plugin import NO_HELPER, Outcome, executable, run_plugin
from tests.support.plugin_helpers import FAST, assert_cni_error
from tests.support.util_procs import Helper, Unresponsive

USER = "ipam-proxy-user"
PASSWORD = "url-pw-7f3c9e"
ADMIN = "ipam-da-consul-admin"
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


class AuthProxy:
    """Consul behind a proxy that demands basic auth (USER:PASSWORD), as a reverse proxy in
    front of Consul may: it answers 401 to a request without the right credentials and relays
    the others. It counts both."""

    def __init__(self, upstream: str) -> None:
        self.authorized = 0
        self.refused = 0
        expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def relay(self) -> None:
                size = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(size) if size else None
                if self.headers.get("Authorization") != expected:
                    proxy.refused += 1
                    self.send(401, b"unauthorized", {"WWW-Authenticate": 'Basic realm="consul"'})
                    return
                proxy.authorized += 1
                headers = {
                    k: v for k, v in self.headers.items()
                    if k.lower() not in ("host", "authorization")
                }
                resp = requests.request(
                    self.command, upstream + self.path, data=body, headers=headers, timeout=60
                )
                keep = {
                    k: v for k, v in resp.headers.items()
                    if k.lower() not in ("content-length", "transfer-encoding", "connection",
                                         "content-encoding")
                }
                self.send(resp.status_code, resp.content, keep)

            def send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_PUT = do_DELETE = do_POST = relay

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.hostport = f"127.0.0.1:{self.server.server_address[1]}"
        self.url = f"http://{USER}:{PASSWORD}@{self.hostport}"
        self.shown = f"http://***@{self.hostport}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy(consul: ConsulAgent) -> Iterator[AuthProxy]:
    p = AuthProxy(consul.url)
    yield p
    p.close()


def assert_hidden(*texts: str) -> None:
    for text in texts:
        assert PASSWORD not in text, text
        assert USER not in text, text


# -- a password in a server URL -----------------------------------------------------------------
def test_url_password_is_sent_but_never_shown(
    proxy: AuthProxy, make_pool, conf_for, tmp_path: Path
) -> None:
    pool = make_pool()
    log = tmp_path / "verbose.log"
    env = {"IPAM_DA_CONSUL_LOG_FILE": str(log)}
    conf = conf_for(pool, consul_servers=[proxy.url])
    add = run_plugin("ADD", conf, container="url-pw", verbose=True, env=env)
    assert add.rc == 0, add
    assert proxy.authorized >= 2 and proxy.refused == 0  # the user-info went as basic auth
    text = log.read_text()
    assert f"GET {proxy.shown}/v1/status/leader -> 200" in text, text
    assert_hidden(text, add.stdout, add.stderr)

    # Refused credentials: the failure names the server, never its password.
    wrong = dict(conf, ipam=dict(conf["ipam"], **FAST))
    wrong["ipam"]["consul_servers"] = [proxy.url.replace(PASSWORD, PASSWORD + "-wrong")]
    out = run_plugin("ADD", wrong, container="url-pw-2", verbose=True, env=env)
    err = assert_cni_error(out, 11, "1.0.0", proxy.shown, "HTTP 401")
    assert_hidden(err["msg"], err.get("details", ""), out.stderr, log.read_text())

    # A URL the config rules refuse is quoted without its user-info too (a '#' in a password
    # must be percent-encoded; unencoded, the rest reads as a fragment).
    bad = dict(conf)
    bad["ipam"] = dict(conf["ipam"], consul_servers=[f"http://{USER}:{PASSWORD}#x@{proxy.hostport}"])
    out = run_plugin("ADD", bad, container="url-pw-3", verbose=True, env=env)
    err = assert_cni_error(out, 7, "1.0.0", proxy.hostport)
    assert_hidden(out.stdout, out.stderr, log.read_text())


def test_url_password_is_not_a_metrics_label(
    proxy: AuthProxy, make_pool, conf_for, tmp_path: Path
) -> None:
    helper = Helper(tmp_path, stderr=tmp_path / "helper.err",
                    args=["--metrics-address", "127.0.0.1:0"])
    try:
        url = helper.wait_stderr("metrics on ").split("metrics on ")[1].split()[0]
        pool = make_pool()
        conf = conf_for(pool)
        conf["ipam"]["consul_servers"] = [proxy.url]
        out = run_plugin("ADD", conf, container="url-pw-m", env=helper.env)
        assert out.rc == 0, out
        text = requests.get(url, timeout=10).text
    finally:
        helper.close()
    assert f'consul="{proxy.shown}"' in text, text
    assert_hidden(text, helper.stderr_text())


def admin(*args: str, env: dict[str, str] | None = None, stdin: bytes | None = None) -> Outcome:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("CONSUL_", "CNI_"))}
    full.update(env or {})
    p = subprocess.run(
        [executable(ADMIN), *args], input=stdin, env=full, capture_output=True, timeout=60
    )
    return Outcome(p.returncode, p.stdout.decode(), p.stderr.decode())


def test_admin_never_shows_a_url_password(proxy: AuthProxy, make_pool) -> None:
    pool = make_pool()
    out = admin("--consul", proxy.url, "usage", pool, "--prometheus")
    assert out.rc == 0, out
    assert f'consul="{proxy.shown}"' in out.stdout, out
    assert_hidden(out.stdout, out.stderr)
    # -v logs every request on stderr.
    out = admin("--consul", proxy.url, "-v", "list")
    assert out.rc == 0 and proxy.shown in out.stderr, out
    assert_hidden(out.stdout, out.stderr)
    # Failures: refused credentials, and an address the rules refuse.
    wrong = proxy.url.replace(PASSWORD, PASSWORD + "-wrong")
    out = admin("--consul", wrong, "--timeout", "1", "list")
    assert out.rc == 3 and proxy.shown in out.stderr, out
    assert_hidden(out.stderr)
    out = admin("--consul", f"http://{USER}:{PASSWORD}#x@{proxy.hostport}", "list")
    assert out.rc == 2 and proxy.hostport in out.stderr, out
    assert_hidden(out.stderr)
    out = admin("list", env={"CONSUL_HTTP_ADDR": f"{USER}:{PASSWORD}@{proxy.hostport}/x?y"})
    assert out.rc == 2, out
    assert_hidden(out.stderr)


# -- the admin CLI's token ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureConsulAgent]:
    """ACLs on, default deny: a request without the right token is refused (403)."""
    agent = SecureConsulAgent(tmp_path_factory.mktemp("secrets-secure")).start()
    try:
        agent.create_pool("secret-blue", [{"subnet": "10.0.40.0/24"}])
        yield agent
    finally:
        agent.close()


def secure_args(agent: SecureConsulAgent) -> list[str]:
    tls = agent.tls
    return [
        "--consul", agent.url, "--ca-file", tls.ca, "--cert-file", tls.client_cert,
        "--key-file", tls.client_key,
    ]


def test_admin_reads_its_token_from_stdin(secure: SecureConsulAgent) -> None:
    token = secure.create_token("stdin-read", 'key_prefix "ipam/" { policy = "read" }')
    base = secure_args(secure)
    denied = admin(*base, "--timeout", "5", "list")
    assert denied.rc == 3 and "403" in denied.stderr, denied
    out = admin(*base, "--token-file", "-", "list", stdin=f"{token}\n".encode())
    assert out.rc == 0 and out.stderr == "" and "secret-blue" in out.stdout, out
    assert token not in out.stdout
    empty = admin(*base, "--token-file", "-", "list", stdin=b"\n")
    assert empty.rc == 2 and "stdin" in empty.stderr and "empty" in empty.stderr, empty


@pytest.mark.parametrize(
    "command",
    [
        ["reconcile", "--live-ids", "-"],
        ["check", "--live-ids", "-"],
        ["create", "p", "--ranges-json", "-"],
    ],
)
def test_token_from_stdin_is_refused_when_stdin_is_taken(
    secure: SecureConsulAgent, command: list[str]
) -> None:
    option = command[-2]
    out = admin(*secure_args(secure), "--token-file", "-", *command, stdin=b"abc\n")
    assert out.rc == 2 and out.stdout == "", out
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{ADMIN}: error: "), out
    assert "--token-file -" in out.stderr and f"{option} -" in out.stderr, out


def test_token_on_the_command_line_warns(secure: SecureConsulAgent) -> None:
    token = secure.create_token("argv-read", 'key_prefix "ipam/" { policy = "read" }')
    out = admin(*secure_args(secure), "--token", token, "list")
    assert out.rc == 0 and "secret-blue" in out.stdout, out
    warning = out.stderr.splitlines()
    assert len(warning) == 1 and warning[0].startswith(f"{ADMIN}: warning: "), out
    assert "process list" in out.stderr and "--token-file" in out.stderr, out
    assert token not in out.stdout + out.stderr


# -- the verbose log file -------------------------------------------------------------------------
@pytest.fixture
def shared() -> Iterator[Path]:
    """A folder other local users can reach (pytest's tmp_path is 0700): holding a root-owned
    `victim` file, a sticky world-writable `pub` (as /tmp is) and a world-writable `open`
    without the sticky bit."""
    base = Path(tempfile.mkdtemp(prefix="ipdc-secrets-"))
    base.chmod(0o755)
    (base / "victim").write_text("precious\n")
    (base / "victim").chmod(0o600)
    for name, mode in (("pub", 0o1777), ("open", 0o777)):
        (base / name).mkdir()
        (base / name).chmod(mode)
    yield base
    subprocess.run(["rm", "-rf", str(base)], check=True)


def as_nobody(*argv: str) -> None:
    subprocess.run([*NOBODY, *argv], check=True, capture_output=True)


def assert_not_logged(out: Outcome, path: Path, victim: Path) -> None:
    """The call worked, said once why it does not log, and root wrote nothing it should not."""
    assert out.rc == 0, out
    assert out.json["ips"][0]["address"] == "10.0.21.100/23", out
    assert victim.read_text() == "precious\n", "root appended to the file a user linked"
    warnings = [line for line in out.stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and str(path) in warnings[0], out


def test_log_folder_and_file_are_created_private(
    make_pool, conf_for, shared: Path
) -> None:
    log = shared / "new" / "deeper" / "ipam.log"
    old = os.umask(0)  # whatever the runtime's umask: private
    try:
        out = run_plugin("ADD", conf_for(make_pool()), container="private", verbose=True,
                         env={"IPAM_DA_CONSUL_LOG_FILE": str(log)})
    finally:
        os.umask(old)
    assert out.rc == 0 and out.stderr == "", out
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (log.parent.parent, log.parent, log)}
    assert modes == {"new": 0o700, "deeper": 0o700, "ipam.log": 0o600}, modes
    assert "private" in log.read_text()


@pytest.mark.parametrize(
    "plant",
    [
        "symlink in a folder the user owns",
        "symlink in a world-writable folder without the sticky bit",
        "symlink in a sticky world-writable folder",
        "the user's own file in a sticky world-writable folder",
    ],
)
def test_a_local_user_cannot_choose_what_root_appends_to(
    make_pool, conf_for, shared: Path, plant: str
) -> None:
    victim = shared / "victim"
    if plant.startswith("symlink in a folder the user owns"):
        as_nobody("mkdir", "-m", "0755", str(shared / "pub" / "mine"))
        log = shared / "pub" / "mine" / "ipam.log"
    elif "without the sticky bit" in plant:
        log = shared / "open" / "ipam.log"
    else:
        log = shared / "pub" / "ipam.log"
    if plant.startswith("symlink"):
        as_nobody("ln", "-s", str(victim), str(log))
    else:
        as_nobody("sh", "-c", f"umask 0; : > {log}")
    out = run_plugin("ADD", conf_for(make_pool()), container="planted", verbose=True,
                     env={"IPAM_DA_CONSUL_LOG_FILE": str(log)})
    if not log.is_symlink():
        assert log.read_text() == "", "root wrote the call's log into a file the user reads"
    assert_not_logged(out, log, victim)


def test_the_helper_refuses_a_planted_log_too(
    make_pool, conf_for, shared: Path, tmp_path: Path
) -> None:
    victim = shared / "victim"
    log = shared / "pub" / "ipam.log"
    as_nobody("ln", "-s", str(victim), str(log))
    helper = Helper(tmp_path)
    try:
        out = run_plugin("ADD", conf_for(make_pool()), container="planted-h", verbose=True,
                         env={"IPAM_DA_CONSUL_LOG_FILE": str(log), **helper.env})
        assert helper.stats()["served"] == 1  # the helper ran it, not the client
    finally:
        helper.close()
    assert_not_logged(out, log, victim)


# -- core dumps -----------------------------------------------------------------------------------
def crashes_without_a_core(
    argv: list[str], env: dict[str, str], stdin: bytes, busy: Callable[[], bool], cwd: Path
) -> None:
    """Start `argv` with a core limit of unlimited (as systemd gives services, or `ulimit -c
    unlimited` a shell), wait until `busy()` says it is in the middle of its work, holding its
    token, then crash it with SIGSEGV: it must have dropped its core limit to 0, and dump
    nothing."""
    proc = subprocess.Popen(
        ["prlimit", "--core=unlimited", "--", *argv], stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=cwd,
    )
    try:
        assert proc.stdin is not None
        proc.stdin.write(stdin)
        proc.stdin.close()
        end = time.monotonic() + 20
        while not busy():
            assert proc.poll() is None, f"{argv[0]} exited early"
            assert time.monotonic() < end, f"{argv[0]} never got busy"
            time.sleep(0.05)
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
        core = next(line for line in limits.splitlines() if line.startswith("Max core file"))
        os.kill(proc.pid, signal.SIGSEGV)
        _, status = os.waitpid(proc.pid, 0)
        proc.returncode = -signal.SIGSEGV
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.wait()
    dumped = [p.name for p in cwd.glob("core*")]
    assert os.WIFSIGNALED(status) and not os.WCOREDUMP(status), f"it dumped core: {dumped}"
    assert not dumped
    assert core.split()[4:6] == ["0", "0"], core


def plugin_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CNI_", "CONSUL_", "IPAM_"))}
    env.update(CNI_COMMAND="ADD", CNI_CONTAINERID="core", CNI_IFNAME="eth0",
               CNI_NETNS="/var/run/netns/x", CNI_PATH="/nonexistent", **extra)
    return env


def silent_conf(url: str) -> bytes:
    return json.dumps({
        "cniVersion": "1.0.0", "name": "core", "type": "bridge",
        "ipam": {"type": "ipam-da-consul", "consul_servers": [url],
                 "consul_token": "core-dump-token", "consul_read_timeout": 60, "timeout": 60,
                 "pools": [{"name": "p"}]},
    }).encode()


def test_no_core_dump_in_process(tmp_path: Path) -> None:
    silent = Unresponsive()
    try:
        crashes_without_a_core(
            [executable("ipam-da-consul")], plugin_env({"IPAM_DA_CONSUL_SOCKET": NO_HELPER}),
            silent_conf(silent.url), lambda: bool(silent.held), tmp_path,
        )
    finally:
        silent.close()


def test_no_core_dump_in_the_thin_client(tmp_path: Path) -> None:
    """The thin client holds stdin (the token) while it waits for the helper's answer; here a
    socket that accepts and never answers stands in for a hung helper."""
    path = tmp_path / "helper.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(8)
    held: list[socket.socket] = []
    threading.Thread(target=lambda: held.append(listener.accept()[0]), daemon=True).start()
    try:
        crashes_without_a_core(
            [executable("ipam-da-consul")],
            plugin_env({"IPAM_DA_CONSUL_SOCKET": str(path),
                        "IPAM_DA_CONSUL_HELPER_ACK_TIMEOUT": "60"}),
            silent_conf("http://127.0.0.1:9"), lambda: bool(held), tmp_path,
        )
    finally:
        for s in [*held, listener]:
            s.close()


def test_no_core_dump_in_the_helper(tmp_path: Path) -> None:
    sock = tmp_path / "h.sock"
    crashes_without_a_core(
        [executable("ipam-da-consul-helper"), "--socket", str(sock), "--no-journal"],
        plugin_env({}), b"", sock.exists, tmp_path,
    )


def test_no_core_dump_in_the_admin_cli(tmp_path: Path) -> None:
    silent = Unresponsive()
    try:
        env = plugin_env({"CONSUL_HTTP_TOKEN": "core-dump-token"})
        crashes_without_a_core(
            [executable(ADMIN), "--consul", silent.url, "--timeout", "60", "list"],
            env, b"", lambda: bool(silent.held), tmp_path,
        )
    finally:
        silent.close()


def test_the_admin_cli_run_by_a_user_is_not_dumpable(request: pytest.FixtureRequest) -> None:
    """An operator who is not root: other processes of theirs (a browser, anything they ran)
    cannot read the CLI's memory or environment, where the token is. The kernel shows this by
    giving /proc/<pid> of a process that is not dumpable to root.

    The user runs the installed single-file CLI from a folder they can read: the checkout's
    virtualenv may sit under a folder only root can enter (a clone in `mktemp -d`'s)."""
    folder = Path(tempfile.mkdtemp(prefix="ipdc-admin-"))
    folder.chmod(0o755)
    admin = folder / ADMIN
    shutil.copy(request.getfixturevalue("single_file_bin") / ADMIN, admin)
    admin.chmod(0o755)
    with open(admin, "rb") as fh:
        python = fh.readline().decode().removeprefix("#!").split()[0]
    if subprocess.run([*NOBODY, python, "-c", "pass"], capture_output=True).returncode:
        shutil.rmtree(folder)
        pytest.skip(f"uid 65534 cannot run the single file's interpreter {python}")
    silent = Unresponsive()
    env = plugin_env({"CONSUL_HTTP_TOKEN": "core-dump-token"})
    proc = subprocess.Popen(
        [*NOBODY, str(admin), "--consul", silent.url, "--timeout", "60", "list"],
        env=env, cwd="/", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        end = time.monotonic() + 20
        while not silent.held:
            assert proc.poll() is None and time.monotonic() < end, "the CLI never got busy"
            time.sleep(0.05)
        status = Path(f"/proc/{proc.pid}/status").read_text()
        owner = os.stat(f"/proc/{proc.pid}/environ").st_uid
    finally:
        proc.kill()
        proc.wait()
        silent.close()
        shutil.rmtree(folder)
    assert "Uid:\t65534" in status, status  # it does run as the user
    assert owner == 0, f"/proc/<pid>/environ belongs to uid {owner}: the user's to read"
