"""Where log lines go. Warnings and errors always reach the caller's stderr; the verbose
flavour also appends every debug line to a log file.

One routing sink serves both ways of running: in-process, the call's stderr is ours; in the
helper, each call carries its own `CallLog` (via loguru's contextualize), so concurrent calls
never mix their lines and each caller gets its own warnings back.

The file's format is text (for people: lines may span several lines, their wording changes)
or, with IPAM_DA_CONSUL_LOG_FORMAT=json, one JSON object per line for log shippers: each
message as `{"event": "log", ...}` with its call's ID, and at each call's end its account
(cni/events.py CallRecord) as `{"event": "call", ...}`: command, container, network, pools,
addresses, code, duration and each Consul request. Both formats are written alike: one
`os.write` of whole lines to a descriptor opened O_APPEND, so any number of processes can
append at once and logrotate's copytruncate (deploy/debian/ipam-da-consul.logrotate) loses
nothing a process has written.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import sys
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, TextIO

from loguru import logger

DEFAULT_LOG_FILE = "/var/log/cni/ipam-da-consul.log"
LOG_FORMAT_ENV = "IPAM_DA_CONSUL_LOG_FORMAT"
FORMATS = ("text", "json")
_WARNING = 30


class LogRefused(Exception):
    """The log file is not safe to append to as root; the message says why."""


# O_NONBLOCK: a FIFO planted as the log would otherwise hold the call until someone reads it;
# with it, opening one without a reader fails and one with a reader is refused as not a file.
_OPEN_FLAGS = (
    os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
)


def open_log(path: str) -> int:
    """A descriptor appending to the log file `path`, which is created 0600 (its missing
    folders 0700) and refused when another local user could have chosen what it is: its
    folder owned by another user, or writable by group or others without the sticky bit (they
    could swap the file for a link to any file root can write); the file a symbolic link, not
    a regular file, or owned by another user (who could read what root writes). Root and this
    process's user are trusted. Existing folders and files are never chmod'ed.

    The checks are made on the folder and the file actually opened (descriptors, not paths),
    so a swap after a check cannot take effect. Raises OSError or LogRefused."""
    folder, name = os.path.split(os.path.abspath(path))
    _make_folders(folder)
    trusted = (0, os.geteuid())
    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        st = os.fstat(dir_fd)
        if st.st_uid not in trusted:
            raise LogRefused(f"its folder {folder} belongs to another user (uid {st.st_uid})")
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise LogRefused(
                f"its folder {folder} is writable by other users (mode "
                f"{stat.S_IMODE(st.st_mode):04o}) and has no sticky bit"
            )
        try:
            fd = os.open(name, _OPEN_FLAGS, 0o600, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise LogRefused("it is a symbolic link") from None
            raise
    finally:
        os.close(dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise LogRefused("it is not a regular file")
        if st.st_uid not in trusted:
            raise LogRefused(f"it belongs to another user (uid {st.st_uid})")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _make_folders(folder: str) -> None:
    """Create `folder` and its missing parents, each 0700 (os.makedirs gives the parents the
    umask's mode). Existing ones are left as they are."""
    missing: list[str] = []
    while not os.path.lexists(folder):
        missing.append(folder)
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    for path in reversed(missing):
        # One made meanwhile by a concurrent call is fine: the folder is checked once opened.
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)


def log_format(environ: Mapping[str, str]) -> str:
    """The log file's format IPAM_DA_CONSUL_LOG_FORMAT asks for: `json`, else `text`."""
    return "json" if environ.get(LOG_FORMAT_ENV, "").strip().lower() == "json" else "text"


class CallLog:
    def __init__(self, stderr: TextIO, log_file: str | None = None, fmt: str = "text") -> None:
        self.stderr = stderr
        self.json = fmt == "json"
        # Opened and checked once (per call in the helper); then one os.write per line, which
        # O_APPEND keeps whole when concurrent calls append to the same file.
        self.fd: int | None = self._open(log_file) if log_file else None

    def _open(self, path: str) -> int | None:
        # A log we cannot write must never cost an allocation: warn and carry on.
        try:
            return open_log(path)
        except LogRefused as exc:
            reason = str(exc)
        except OSError as exc:
            reason = f"cannot open it: {exc.strerror or exc}"
        self.stderr.write(
            f"ipam-da-consul: WARNING: not logging to {path}: {reason}; debug logs are off\n"
        )
        return None

    def emit(self, record: dict[str, Any]) -> None:
        text = record["message"]
        if record["exception"] is not None and record["exception"].value is not None:
            text += f" ({type(record['exception'].value).__name__})"
        if record["level"].no >= _WARNING:
            self.stderr.write(f"ipam-da-consul: {record['level'].name}: {text}\n")
        if self.fd is not None:
            stamp = datetime.now().astimezone().isoformat(timespec="milliseconds")
            if self.json:
                line = _json_line(stamp, record, text)
            else:
                line = f"{stamp} {os.getpid()} {record['level'].name:<7} {text}\n"
            try:
                os.write(self.fd, line.encode("utf-8", "replace"))
            except OSError:
                self.close()

    def close(self, _close: Callable[[int], None] = os.close) -> None:
        # `_close` bound at definition: at interpreter exit this module's `os` may be gone
        # before the in-process CallLog is.
        fd, self.fd = self.fd, None
        if fd is not None:
            _close(fd)

    def __del__(self) -> None:
        # The helper makes one per call and drops it when the call ends.
        self.close()


def _json_line(stamp: str, record: dict[str, Any], text: str) -> str:
    """One JSON object on one line: json.dumps escapes every newline a message may hold."""
    extra = record["extra"]
    head: dict[str, Any] = {"time": stamp, "pid": os.getpid(), "level": record["level"].name}
    call_record = extra.get("call_record")
    if call_record is not None:
        body = {"event": "call", **head, **call_record.as_json()}
    else:
        body = {"event": "log", **head, "call": extra.get("call_id"), "msg": text}
    return json.dumps(body, ensure_ascii=False, default=str) + "\n"


_default = CallLog(sys.stderr)


def _route(message: Any) -> None:
    record = message.record
    call = record["extra"].get("call") or _default
    call.emit(record)


def verbose_log_file() -> str:
    return os.environ.get("IPAM_DA_CONSUL_LOG_FILE") or DEFAULT_LOG_FILE


def configure(verbose: bool) -> None:
    """In-process: this process's stderr, plus the debug file for the verbose flavour."""
    global _default
    _default.close()
    _default = CallLog(
        sys.stderr, verbose_log_file() if verbose else None, log_format(os.environ)
    )
    logger.remove()
    logger.add(_route, level="DEBUG" if verbose else "WARNING", format="{message}", catch=True)


def configure_helper() -> None:
    """The helper: every level reaches the router, which asks each call what it wants."""
    logger.remove()
    logger.add(_route, level="DEBUG", format="{message}", catch=True)
