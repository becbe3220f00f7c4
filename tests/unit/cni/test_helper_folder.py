"""Where the helper may put its socket: a folder it creates 0700, or an existing one it leaves
exactly as it is and refuses when others could replace the socket in it."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest
from ipam_da_consul.cni.helper.server import SetupError, clear_stale_socket, prepare_folder


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def folder(tmp_path: Path, bits: int) -> Path:
    path = tmp_path / f"f{bits:o}"
    path.mkdir()
    os.chmod(path, bits)
    return path


def test_missing_folders_are_created_private(tmp_path):
    target = tmp_path / "a" / "b"
    prepare_folder(target)
    assert mode(target) == 0o700
    assert mode(tmp_path / "a") == 0o700


@pytest.mark.parametrize("bits", [0o700, 0o755, 0o711, 0o750])
def test_acceptable_folder_keeps_its_mode(tmp_path, bits):
    path = folder(tmp_path, bits)
    prepare_folder(path)
    assert mode(path) == bits


@pytest.mark.parametrize("bits", [0o777, 0o770, 0o757, 0o1777, 0o1770])
def test_a_folder_others_may_write_to_is_refused_sticky_or_not(tmp_path, bits):
    """Another user could take the socket's name first (the helper could never start) or,
    owning a folder above it, swap it."""
    path = folder(tmp_path, bits)
    with pytest.raises(SetupError, match="writable by others"):
        prepare_folder(path)
    assert mode(path) == bits


def test_folder_of_another_user_is_refused(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to give a folder away")
    path = folder(tmp_path, 0o755)
    os.chown(path, 4242, 4242)
    with pytest.raises(SetupError, match="uid 4242"):
        prepare_folder(path)
    assert mode(path) == 0o755


def test_not_a_folder_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises((SetupError, OSError)):
        prepare_folder(tmp_path / "file")


def test_stale_socket_is_replaced_live_or_foreign_files_are_not(tmp_path):
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()  # bound, never listening: what a dead helper leaves
    clear_stale_socket(stale)
    assert not stale.exists()
    live = tmp_path / "live.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(live))
        listener.listen(1)
        with pytest.raises(SetupError, match="another helper"):
            clear_stale_socket(live)
    regular = tmp_path / "regular"
    regular.write_text("keep me")
    with pytest.raises(SetupError, match="not a socket"):
        clear_stale_socket(regular)
    assert regular.read_text() == "keep me"
