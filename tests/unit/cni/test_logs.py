"""The verbose log file's safety rules (cni/logs.py open_log, CallLog), in this process: what is
created, what is refused, and that a refusal is one warning, never an error. The attacker's
side (another local user) is in tests/e2e/test_security_secrets.py."""

from __future__ import annotations

import io
import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest
from ipam_da_consul.cni import logs
from ipam_da_consul.cni.logs import CallLog, LogRefused, open_log


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def record(message: str) -> dict[str, Any]:
    class Level:
        name, no = "DEBUG", 10

    return {"message": message, "exception": None, "level": Level()}


def test_created_private_whatever_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "ipam.log"
    old = os.umask(0)
    try:
        os.close(open_log(str(path)))
    finally:
        os.umask(old)
    assert (mode(tmp_path / "a"), mode(tmp_path / "a" / "b"), mode(path)) == (0o700, 0o700, 0o600)


def test_existing_folder_and_file_are_not_chmoded(tmp_path: Path) -> None:
    folder = tmp_path / "logs"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    (folder / "ipam.log").write_text("old\n")
    (folder / "ipam.log").chmod(0o640)
    log = CallLog(io.StringIO(), str(folder / "ipam.log"))
    log.emit(record("new"))
    log.close()
    assert (mode(folder), mode(folder / "ipam.log")) == (0o755, 0o640)
    assert (folder / "ipam.log").read_text().startswith("old\n")
    assert (folder / "ipam.log").read_text().endswith(" new\n")


def test_a_sticky_world_writable_folder_is_fine(tmp_path: Path) -> None:
    folder = tmp_path / "tmp"
    folder.mkdir()
    folder.chmod(0o1777)
    os.close(open_log(str(folder / "ipam.log")))


@pytest.mark.parametrize(
    ("plant", "reason"),
    [
        ("group-writable folder", "writable by other users (mode 0770)"),
        ("world-writable folder", "writable by other users (mode 0777)"),
        ("symlink", "symbolic link"),
        ("folder as the file", "cannot open it"),
        ("fifo", "cannot open it"),
        ("fifo with a reader", "not a regular file"),
    ],
)
def test_refused_with_one_warning(tmp_path: Path, plant: str, reason: str) -> None:
    folder = tmp_path / "logs"
    folder.mkdir()
    path = folder / "ipam.log"
    reader = None
    if plant.endswith("writable folder"):
        folder.chmod(0o770 if plant.startswith("group") else 0o777)
    elif plant == "symlink":
        (tmp_path / "victim").write_text("precious\n")
        path.symlink_to(tmp_path / "victim")
    elif plant == "folder as the file":
        path.mkdir()
    else:
        os.mkfifo(path)
        if plant == "fifo with a reader":
            reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    err = io.StringIO()
    began = time.monotonic()
    try:
        log = CallLog(err, str(path))
    finally:
        if reader is not None:
            os.close(reader)
    assert time.monotonic() - began < 1  # a FIFO without a reader does not hold the call
    assert log.fd is None
    log.emit(record("not written"))
    lines = err.getvalue().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and reason in lines[0], lines
    assert "WARNING" in lines[0] and "debug logs are off" in lines[0]
    if plant == "symlink":
        assert (tmp_path / "victim").read_text() == "precious\n"


def test_a_file_of_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give the file away")
    path = tmp_path / "ipam.log"
    path.write_text("")
    os.chown(path, 65534, 65534)
    with pytest.raises(LogRefused, match="belongs to another user"):
        open_log(str(path))
    folder = tmp_path / "theirs"
    folder.mkdir()
    os.chown(folder, 65534, 65534)
    with pytest.raises(LogRefused, match=r"folder .* belongs to another user"):
        open_log(str(folder / "ipam.log"))


def test_each_line_is_one_append(tmp_path: Path) -> None:
    path = tmp_path / "ipam.log"
    first, second = CallLog(io.StringIO(), str(path)), CallLog(io.StringIO(), str(path))
    for i in range(50):
        (first if i % 2 else second).emit(record(f"line {i} " + "x" * 5000))
    first.close()
    second.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 50 and all(line.endswith("x" * 5000) for line in lines)


def test_dropping_a_call_log_closes_its_file(tmp_path: Path) -> None:
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        CallLog(io.StringIO(), str(tmp_path / "ipam.log")).emit(record("x"))
    assert len(os.listdir("/proc/self/fd")) == before
    assert logs.DEFAULT_LOG_FILE == "/var/log/cni/ipam-da-consul.log"
