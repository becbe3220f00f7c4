"""The real helper process and its socket folder."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

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


def test_real_helper_refuses_a_world_writable_folder(tmp_path):
    path = folder(tmp_path, 0o777)
    out = start(path / "helper.sock")
    assert out.returncode != 0, out
    assert "sticky" in out.stderr and str(path) in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert mode(path) == 0o777 and not (path / "helper.sock").exists()


def test_real_helper_in_a_tmp_like_folder_leaves_it_alone(tmp_path):
    path = folder(tmp_path, 0o1777)
    (path / "run").symlink_to(path)  # Helper puts its socket in <dir>/run/
    helper = Helper(path)
    try:
        sock = Path(helper.socket)
        assert stat.S_ISSOCK(sock.lstat().st_mode)
        assert mode(sock) == 0o600
        assert mode(path) == 0o1777
    finally:
        helper.close()
    assert not Path(helper.socket).exists()
