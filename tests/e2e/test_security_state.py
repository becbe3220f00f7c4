"""Nobody else can steer the host's state folder (cni/state.py), where DELs the helper takes
over are kept with the ACL token of their call (issue 25, finding 2).

Before: with a `--socket` other than the default, the DEL journal lived in `<socket folder>/
state/journal`, and only `journal` itself was checked, once, at start: a local user who created
`state` first could swap `journal` for a folder of theirs after start, and the root helper then
replayed their entries with the node's token. Now the state folder never derives from the
socket's; every folder above it must belong to root (or the helper's user) and be writable by
nobody else (unless sticky); the folder is opened once and used through its descriptor, so a
path swapped later changes nothing; every file in it is used only when it is a regular file of
ours, mode 0600, opened without following links. The attacker here is `nobody` (setpriv).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.plugin import executable, netconf, run_plugin
from tests.support.util_procs import Helper

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.fixture
def shared() -> Iterator[Path]:
    """A folder every user can reach (pytest's own are root's 0700)."""
    top = Path(tempfile.mkdtemp(prefix="ipdc-state-"))
    top.chmod(0o755)
    yield top
    shutil.rmtree(top, ignore_errors=True)


def start(state: Path, sock: Path) -> subprocess.CompletedProcess[str]:
    """A helper that must refuse to start: it exits on its own."""
    return subprocess.run(
        [executable("ipam-da-consul-helper"), "--socket", str(sock), "--state-dir", str(state)],
        capture_output=True, text=True, timeout=30,
    )


def test_a_state_folder_another_user_made_first_is_refused(shared: Path, tmp_path: Path) -> None:
    shared.chmod(0o1777)  # as /tmp: anyone may make a folder in it first
    parent = shared / "attacker"
    subprocess.run([*NOBODY, "mkdir", "-m", "0700", str(parent)], check=True)
    subprocess.run([*NOBODY, "mkdir", "-m", "0700", str(parent / "state")], check=True)
    out = start(parent / "state", tmp_path / "run" / "helper.sock")
    assert out.returncode != 0, out
    assert "uid 65534" in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_a_folder_above_it_others_may_write_to_is_refused(shared: Path, tmp_path: Path) -> None:
    open_to_all = shared / "open"
    open_to_all.mkdir()
    open_to_all.chmod(0o777)  # not sticky: anyone may rename what is in it
    out = start(open_to_all / "state", tmp_path / "run" / "helper.sock")
    assert out.returncode != 0, out
    assert "writable by others" in out.stderr, out.stderr
    assert not (open_to_all / "state").exists()


def test_the_folder_is_used_through_its_descriptor(consul, make_pool, tmp_path: Path) -> None:
    """Renaming the folder under a running helper (and putting another in its place) does not
    move where it keeps what it takes over."""
    pool = make_pool()
    helper = Helper(tmp_path)
    try:
        state = Path(helper.state_dir)
        state.rename(state.with_name("state.moved"))
        state.mkdir(mode=0o700)
        conf = netconf(["http://127.0.0.1:1"], [{"name": pool}], consul_unreachable_grace=0.5)
        env = {**helper.env, "IPAM_DA_CONSUL_HELPER_ACK_TIMEOUT": "30"}
        gone = run_plugin("DEL", conf, container="c-fd", env=env)
        assert gone.rc == 0 and "finishes this DEL" in gone.stderr, gone
        assert list((state.with_name("state.moved") / "pending").iterdir())
        assert not (state / "pending").exists()
    finally:
        helper.close()


def test_an_entry_another_user_planted_is_never_used(consul, make_pool, tmp_path: Path) -> None:
    """Even in the helper's own folder (root could be tricked into copying one there), a file
    that is not the helper's own, 0600, is refused: its call fails rather than run it."""
    from ipam_da_consul.cni.state import entry_name

    pool = make_pool()
    helper = Helper(tmp_path)
    try:
        entries = Path(helper.state_dir) / "attachments"
        planted = entries / f"{entry_name(('testnet', 'c-planted', 'eth0'))}.json"
        planted.write_text('{"v": 2}\n')
        os.chown(planted, 65534, 65534)
        planted.chmod(0o600)
        env = {**helper.env, "IPAM_DA_CONSUL_HELPER_ACK_TIMEOUT": "30"}
        out = run_plugin("ADD", netconf([consul.url], [{"name": pool}]), container="c-planted",
                         env=env)
        assert out.rc == 11 and "not a regular file of ours" in out.json["msg"], out
        assert consul.allocations(pool) == {}
    finally:
        helper.close()
