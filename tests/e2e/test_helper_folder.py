"""The real helper process and its socket folder."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest

from tests.support.plugin import executable
from tests.support.util_procs import Helper
from tests.unit.cni.test_helper_folder import folder, mode


def start(sock: Path) -> subprocess.CompletedProcess[str]:
    """A helper that must refuse to start: it exits on its own."""
    return subprocess.run(
        [executable("ipam-da-consul-helper"), "--socket", str(sock)],
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize("bits", [0o777, 0o1777])
def test_real_helper_refuses_a_folder_others_may_write_to(tmp_path, bits):
    path = folder(tmp_path, bits)
    out = start(path / "helper.sock")
    assert out.returncode != 0, out
    assert "writable by others" in out.stderr and str(path) in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert mode(path) == bits and not (path / "helper.sock").exists()


def test_real_helper_in_a_private_folder_makes_its_socket_0600(tmp_path):
    helper = Helper(tmp_path)
    try:
        sock = Path(helper.socket)
        assert stat.S_ISSOCK(sock.lstat().st_mode)
        assert mode(sock) == 0o600 and mode(sock.parent) == 0o700
    finally:
        helper.close()
    assert not Path(helper.socket).exists()


def test_a_socket_another_user_listens_on_gets_no_call(consul, make_pool, conf_for, tmp_path):
    """The thin client trusts the peer the kernel reports (SO_PEERCRED), not the path: a user
    who controls a folder above the socket can swap it between a look at the path and the
    connection. Here the look is made to see root's socket (os.stat patched, as the race
    would have it) while the connection reaches a listener run by `nobody`: it must get
    nothing, the call running in-process instead."""
    import json
    import os
    import shutil
    import tempfile
    import time

    from tests.support.plugin import run_plugin

    top = Path(tempfile.mkdtemp(prefix="ipdc-peer-"))  # pytest's folders are root's 0700
    top.chmod(0o755)
    shared = top / "shared"
    shared.mkdir(mode=0o755)
    os.chown(shared, 65534, 65534)
    sock, got = shared / "helper.sock", shared / "got"
    listener = subprocess.Popen(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3",
         "-I", "-S", "-c",
         "import socket,sys\n"
         "s=socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(8)\n"
         "c,_=s.accept(); c.settimeout(5)\n"
         "try:\n data=c.recv(65536)\nexcept OSError:\n data=b''\n"
         "open(sys.argv[2],'wb').write(data)\n",
         str(sock), str(got)],
    )
    try:
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sock.exists(), "the planted listener did not start"
        patch = tmp_path / "patch"
        patch.mkdir()
        (patch / "sitecustomize.py").write_text(
            "import os\n_stat = os.stat\n"
            "class _Root:\n"
            "    def __init__(self, st): self._st = st\n"
            "    def __getattr__(self, n): return 0 if n == 'st_uid' else getattr(self._st, n)\n"
            "os.stat = lambda p, *a, **k: _Root(_stat(p, *a, **k))\n"
        )
        pool = make_pool()
        conf = conf_for(pool, consul_token="a-token-nobody-may-see")
        env = {"IPAM_DA_CONSUL_SOCKET": str(sock), "PYTHONPATH": str(patch),
               "IPAM_DA_CONSUL_HELPER_ACK_TIMEOUT": "3"}
        out = run_plugin("ADD", conf, container="peer", env=env)
        assert out.rc == 0, out  # served in-process
        assert json.loads(out.stdout)["ips"]
        listener.wait(10)
    finally:
        listener.kill()
        data = got.read_bytes() if got.exists() else b""
        shutil.rmtree(top, ignore_errors=True)
    assert b"a-token-nobody-may-see" not in data
    assert data == b"", "the planted listener got a request"
