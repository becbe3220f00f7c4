"""The host's state folder, shared by the plugin's calls and the helper: each attachment's
ledger (allocator/ledger.py: its writes, recorded before they are sent, and a DEL accepted while
Consul was away) and the sessions its fences are tied to.

Why on disk: a write's fate can stay unknown after the process that sent it is gone (killed by
the runtime at its timeout, or a lost reply followed by a failed rollback), and a runtime may
never call DEL for it (dockershim, CRI-O after a reboot). The next call of the attachment, the
helper, or the operator CLI finishes what it left, from here.

Nobody but root (or the helper's own user) can steer it. The folder (default
`/var/lib/ipam-da-consul`, `IPAM_DA_CONSUL_STATE_DIR`, the helper's `--state-dir`) is checked
once per process: every ancestor must belong to root or to us and be writable by nobody else
(unless sticky, as /tmp is); the folder itself 0700 and ours. It is opened once with
O_DIRECTORY|O_NOFOLLOW and used through that descriptor only, so renaming or replacing a path
component afterwards changes nothing; every file in it is opened with O_NOFOLLOW and used only
when it is a regular file of ours, mode 0600 (entries hold the ACL token of their call).

An entry is one file per attachment, `attachments/<hash>.json`: its own lock (flock, held for
the whole call, so an attachment's calls and its replay never run at once) and its content,
rewritten in place (one pwrite of a line, then a truncate: a process killed in between leaves
the new line and junk after it, and only the first line is read). `pending/<hash>` exists while
the entry has work left (a claim to void, a DEL to finish): what the helper's replay and the
operator CLI look at, without opening every live attachment's entry.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import stat
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..allocator.ledger import Claim
from ..allocator.store import KV, StoreError

if TYPE_CHECKING:
    from marshmallow import Schema

DEFAULT_STATE_DIR = "/var/lib/ipam-da-consul"
STATE_DIR_ENV = "IPAM_DA_CONSUL_STATE_DIR"
_ENTRIES, _PENDING, _SESSIONS, _NOTES = "attachments", "pending", "sessions", "notes"
_VERSION = 2
# A session is used for fences this long (by this host's monotonic clock), then a new one is
# made; Consul ends each one at the earliest FENCE_LIFETIME + this after its creation, so every
# fence lives at least FENCE_LIFETIME (allocator/allocate.py).
SESSION_PERIOD = 600.0
_O_FILE = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

Attachment = tuple[str, str, str]  # (network, container, ifname)


class StateError(OSError):
    """The state folder, or a file in it, cannot be trusted or used."""


def state_dir_path(environ: Mapping[str, str]) -> str:
    return environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR


def _trusted(st: os.stat_result, what: str, private: bool) -> None:
    if st.st_uid not in (0, os.geteuid()):
        raise StateError(f"{what} belongs to uid {st.st_uid}, neither root nor us")
    mode = stat.S_IMODE(st.st_mode)
    if private and mode & 0o077:
        raise StateError(f"{what} is mode {mode:04o}; it must be 0700 (entries hold ACL tokens)")
    if not private and mode & 0o022 and not mode & stat.S_ISVTX:
        raise StateError(f"{what} (mode {mode:04o}) is writable by others without the sticky bit")


def _open_folder(path: str) -> int:
    """Create (0700) and open the state folder, refusing one another user could steer."""
    real = Path(os.path.realpath(path))
    for parent in reversed(real.parents):
        try:
            st = os.lstat(parent)
        except FileNotFoundError:
            break  # made below, 0700, by us
        _trusted(st, f"{parent} (above the state folder)", private=False)
    old = os.umask(0o077)
    try:
        real.mkdir(mode=0o700, parents=True, exist_ok=True)
    finally:
        os.umask(old)
    fd = os.open(real, _O_DIR)
    try:
        _trusted(os.fstat(fd), f"the state folder {real}", private=True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _subfolder(parent: int, name: str) -> int:
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, 0o700, dir_fd=parent)
    fd = os.open(name, _O_DIR, dir_fd=parent)
    try:
        _trusted(os.fstat(fd), f"the state folder's {name}/", private=True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _file_of_ours(fd: int, name: str) -> os.stat_result:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        raise StateError(f"{name} in the state folder is not a regular file of ours")
    if stat.S_IMODE(st.st_mode) != 0o600:
        raise StateError(f"{name} in the state folder is mode {stat.S_IMODE(st.st_mode):04o}")
    return st


def _note_name(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:32] + ".json"


def entry_name(attachment: Attachment) -> str:
    return hashlib.sha256("\0".join(attachment).encode()).hexdigest()[:32]


class StateDir:
    def __init__(self, path: str) -> None:
        self.path = path
        # DELs taken over since this process opened the folder: the helper's metrics read it
        # (PoolCaches.counts), as no call path reports a take-over otherwise.
        self.taken_over = 0
        self._count_lock = threading.Lock()
        self.fd = _open_folder(path)
        self.entries = _subfolder(self.fd, _ENTRIES)
        self.pending_fd = _subfolder(self.fd, _PENDING)
        self.sessions_fd = _subfolder(self.fd, _SESSIONS)
        self.notes_fd = _subfolder(self.fd, _NOTES)

    def close(self) -> None:
        for fd in (self.entries, self.pending_fd, self.sessions_fd, self.notes_fd, self.fd):
            os.close(fd)

    # -- notes: what a tool observed, for its next run ----------------------------------------
    def observed(self, key: str) -> tuple[int, float] | None:
        """The Consul index a run recorded under `key`, and how long ago (this host's
        monotonic clock, CLOCK_BOOTTIME): None when none was, or before the last boot."""
        from . import state_schemas as schemas

        note = self.note(key, schemas.OBSERVED)
        if note is None or note["boot"] != _boot_id():
            return None
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - note["since"]
        return (note["index"], age) if age >= 0 else None

    def observe(self, key: str, index: int) -> None:
        from . import state_schemas as schemas

        since = time.clock_gettime(time.CLOCK_BOOTTIME)
        body = {"index": index, "boot": _boot_id(), "since": since}
        self.write_note(key, schemas.OBSERVED, body)

    def note(self, key: str, schema: Schema) -> dict[str, Any] | None:
        """What was noted under `key`, read through `schema`, if anything readable."""
        from . import state_schemas as schemas

        name = _note_name(key)
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.notes_fd)
        except FileNotFoundError:
            return None
        try:
            _file_of_ours(fd, name)
            note = schemas.load(schema, json.loads(os.pread(fd, 4096, 0) or b"{}"))
        except (ValueError, StateError):
            return None
        finally:
            os.close(fd)
        return note if note["key"] == key else None

    def write_note(self, key: str, schema: Schema, body: dict[str, Any] | None) -> None:
        """Note `body` under `key` through `schema` (None: forget it). Written in one go: a note
        is a hint or a watermark that a reader may miss, never a record another write depends
        on."""
        name = _note_name(key)
        if body is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=self.notes_fd)
            return
        data = json.dumps(schema.dump({**body, "key": key})).encode()
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=self.notes_fd)
        try:
            _file_of_ours(fd, name)
            os.write(fd, data)
        finally:
            os.close(fd)

    # -- entries ------------------------------------------------------------------------------
    def entry(self, attachment: Attachment, until: float) -> Entry:
        """The attachment's entry, locked: waits for a call or replay holding it (up to
        `until`, monotonic)."""
        name = entry_name(attachment)
        entry = self._lock(name, until)
        if entry is None:
            raise StateError(
                f"the state entry of {'/'.join(attachment)} stayed locked by another call"
            )
        if not entry.attachment[1]:
            entry.attachment = attachment
        return entry

    def entry_by_name(self, name: str, until: float) -> Entry | None:
        """The entry `name`, locked (None if a call held it until `until`)."""
        return self._lock(name, until)

    def try_entry(self, name: str) -> Entry | None:
        """The entry `name` if nobody holds it now (the helper's replay never waits)."""
        return self._lock(name, 0.0)

    def _lock(self, name: str, until: float) -> Entry | None:
        file = f"{name}.json"
        while True:
            fd = os.open(file, _O_FILE, 0o600, dir_fd=self.entries)
            try:
                _file_of_ours(fd, file)
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() >= until:
                            os.close(fd)
                            return None
                        time.sleep(0.01)
                if os.fstat(fd).st_nlink == 0:
                    os.close(fd)  # removed by the holder we waited for: open the new one
                    continue
                return Entry(self, name, fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.close(fd)
                raise

    def pending(self) -> list[str]:
        """Names of entries with work left."""
        return sorted(os.listdir(self.pending_fd))

    def names(self) -> list[str]:
        return sorted(n[:-5] for n in os.listdir(self.entries) if n.endswith(".json"))

    def _mark(self, name: str, pending: bool) -> None:
        if pending:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=self.pending_fd)
            os.close(fd)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=self.pending_fd)

    # -- fence sessions -----------------------------------------------------------------------
    def sessions(
        self, reach: str, name: str, ttl: float, period: float = SESSION_PERIOD
    ) -> SessionFile:
        """The session (for fences, or for releases cooling down: `name` says which, with its
        TTL) shared by this host's calls that reach Consul the same way (`reach`: servers,
        datacenter and token, hashed: tokens never share a session)."""
        key = hashlib.sha256(f"{reach}\0{name}\0{ttl}".encode()).hexdigest()[:32]
        return SessionFile(self, key, name, ttl, period)


@dataclass
class Call:
    """A call's input, kept to act for it later: stdin (the config, ACL token included) and
    its CNI environment."""

    stdin: bytes
    env: dict[str, str]


@dataclass
class Entry:
    """One attachment's ledger, locked until `close`."""

    state: StateDir
    name: str
    fd: int
    attachment: Attachment = ("", "", "")
    kept: list[Claim] = field(default_factory=list)
    # The input of the last call that wrote: how to reach Consul to void what it left.
    context: Call | None = None
    # A DEL the helper accepted while Consul was away, to finish.
    deleting: Call | None = None
    attempts: int = 0
    unreadable: str | None = None

    def __post_init__(self) -> None:
        data = os.pread(self.fd, 1 << 20, 0)
        if not data.strip():
            return  # a new entry: no schema needed
        from . import state_schemas as schemas

        try:
            d = json.loads(data.split(b"\n", 1)[0].decode("utf-8", "surrogateescape"))
            # By hand: another version's shape is not this one's schema.
            if not isinstance(d, dict) or d.get("v") != _VERSION:
                version = d.get("v") if isinstance(d, dict) else None
                raise ValueError(f"unknown entry version {version!r}")
            loaded = schemas.load(schemas.ENTRY, d)
        except (ValueError, RecursionError) as exc:
            # Not ours to guess at: it stays for an operator, and this call goes on without it.
            self.unreadable = f"unreadable state entry {self.name}: {exc}"
            return
        self.attachment = (loaded["network"], loaded["container"], loaded["ifname"])
        self.kept = loaded["claims"]
        self.context = _call(loaded["context"])
        self.deleting = _call(loaded["deleting"])
        self.attempts = loaded["attempts"]

    # -- the Ledger protocol --------------------------------------------------------------------
    def claims(self) -> list[Claim]:
        return list(self.kept)

    def save(self, claims: list[Claim]) -> None:
        self.kept = list(claims)
        self.write()

    # -- the rest -----------------------------------------------------------------------------
    @property
    def has_work(self) -> bool:
        return self.deleting is not None or any(c.state != "held" for c in self.kept)

    def remember(self, stdin: bytes, env: Mapping[str, str]) -> None:
        self.context = Call(stdin, dict(env))

    def journal_del(self, stdin: bytes, env: Mapping[str, str]) -> None:
        new = self.deleting is None  # a runtime's retry of the same DEL is the same entry
        self.deleting = Call(stdin, dict(env))
        self.attempts = 0
        self.write(durable=True)
        if new:
            with self.state._count_lock:
                self.state.taken_over += 1

    def write(self, durable: bool = False) -> None:
        if self.unreadable:
            raise StateError(self.unreadable)
        from . import state_schemas as schemas

        network, container, ifname = self.attachment
        body = schemas.ENTRY.dump(
            {
                "v": _VERSION,
                "network": network,
                "container": container,
                "ifname": ifname,
                "claims": self.kept,
                "context": self.context,
                "deleting": self.deleting,
                "attempts": self.attempts,
            }
        )
        data = json.dumps(body).encode("utf-8", "surrogateescape") + b"\n"
        os.pwrite(self.fd, data, 0)
        os.ftruncate(self.fd, len(data))
        if durable:
            # A DEL answered "done" must survive a crash of the host, not only of a process.
            os.fsync(self.fd)
        self.state._mark(self.name, self.has_work)

    def done(self) -> None:
        """The attachment is gone: its entry goes (under the lock, which `close` releases)."""
        self.kept, self.deleting = [], None
        if self.unreadable:
            return
        os.unlink(f"{self.name}.json", dir_fd=self.state.entries)
        self.state._mark(self.name, False)

    def close(self) -> None:
        if self.fd >= 0:
            if not self.unreadable and os.fstat(self.fd).st_nlink and not self.kept \
                    and self.deleting is None:
                self.done()  # nothing left to remember
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Entry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NoteHints:
    """Stripe hints (allocator/stripes.py) of in-process calls: notes in the state folder, one
    per pool and way of reaching Consul (`scope`), so the host's next call finds them."""

    def __init__(self, state: StateDir, scope: str) -> None:
        self.state, self.scope = state, scope

    def hint(self, pool: str) -> str | None:
        from . import state_schemas as schemas

        try:
            note = self.state.note(f"stripe-hint {self.scope} {pool}", schemas.HINT)
        except OSError:
            return None
        return note["address"] if note else None

    def remember_hint(self, pool: str, address: str | None) -> None:
        from . import state_schemas as schemas

        body = None if address is None else {"address": address}
        with contextlib.suppress(OSError):
            self.state.write_note(f"stripe-hint {self.scope} {pool}", schemas.HINT, body)


class SessionFile:
    """The fence session of one way of reaching Consul, shared through the state folder: used
    for SESSION_PERIOD by this host's monotonic clock (CLOCK_BOOTTIME, which a reboot restarts:
    the boot ID tells), then replaced. Consul's leader decides when its fences go."""

    def __init__(
        self, state: StateDir, key: str, name: str, ttl: float, period: float = SESSION_PERIOD
    ) -> None:
        self.state, self.file, self.name, self.ttl = state, f"{key}.json", name, ttl
        self.period = period
        self.refused = False

    def get(self, kv: KV) -> str | None:
        if self.refused:
            return None
        fd = os.open(self.file, _O_FILE, 0o600, dir_fd=self.state.sessions_fd)
        try:
            _file_of_ours(fd, self.file)
            fcntl.flock(fd, fcntl.LOCK_EX)
            now, boot = time.clock_gettime(time.CLOCK_BOOTTIME), _boot_id()
            kept = _session_of(fd)
            if kept is not None and kept["boot"] == boot and 0 <= now - kept["since"] < self.period:
                return str(kept["id"])
            try:
                session = kv.create_session(self.name, self.ttl)
            except StoreError as exc:
                if exc.status == 403:
                    self.refused = _refused(self.name)
                    return None
                raise
            from . import state_schemas as schemas

            kept = schemas.SESSION.dump({"id": session, "boot": boot, "since": now})
            data = json.dumps(kept).encode() + b"\n"
            os.pwrite(fd, data, 0)
            os.ftruncate(fd, len(data))
            return session
        finally:
            os.close(fd)

    def failed(self, session: str) -> None:
        fd = os.open(self.file, _O_FILE, 0o600, dir_fd=self.state.sessions_fd)
        try:
            _file_of_ours(fd, self.file)
            fcntl.flock(fd, fcntl.LOCK_EX)
            kept = _session_of(fd)
            if kept is not None and kept["id"] == session:
                os.ftruncate(fd, 0)
        finally:
            os.close(fd)


def _session_of(fd: int) -> dict[str, Any] | None:
    """The session a session file keeps; None when it keeps none (empty, or unreadable: a new
    one is made)."""
    line = os.pread(fd, 4096, 0).split(b"\n", 1)[0]
    if not line:
        return None
    from . import state_schemas as schemas

    try:
        kept: dict[str, Any] = schemas.load(schemas.SESSION, json.loads(line))
    except (ValueError, RecursionError):
        return None
    return kept


def _call(loaded: dict[str, Any] | None) -> Call | None:
    return None if loaded is None else Call(loaded["stdin"], loaded["env"])


class MemorySessions:
    """Fence sessions of one process, when there is no state folder: each process makes its
    own (one Raft write more per call that raises a fence)."""

    def __init__(self, name: str, ttl: float, period: float = SESSION_PERIOD) -> None:
        self.name, self.ttl, self.period = name, ttl, period
        self.session: str | None = None
        self.since = 0.0
        self.refused = False

    def get(self, kv: KV) -> str | None:
        if self.refused:
            return None
        if self.session is None or time.monotonic() - self.since >= self.period:
            try:
                self.session = kv.create_session(self.name, self.ttl)
            except StoreError as exc:
                if exc.status == 403:
                    self.refused = _refused(self.name)
                    return None
                raise
            self.since = time.monotonic()
        return self.session

    def failed(self, session: str) -> None:
        if self.session == session:
            self.session = None


def _refused(name: str) -> bool:
    from loguru import logger

    logger.warning(
        "Consul refused to create a session ({}): the ACL token needs `session_prefix \"\" "
        "{{ policy = \"write\" }}`; until then fences stay (remove them with "
        "`ipam-da-consul-admin fences`) and releases get no cool-down",
        name,
    )
    return True


_BOOT_ID: str | None = None


def _boot_id() -> str:
    global _BOOT_ID
    if _BOOT_ID is None:
        try:
            with open("/proc/sys/kernel/random/boot_id") as fh:
                _BOOT_ID = fh.read().strip()
        except OSError:
            _BOOT_ID = ""
    return _BOOT_ID


def open_state(path: str) -> StateDir:
    """The state folder, or StateError / OSError saying why it cannot be used."""
    try:
        return StateDir(path)
    except OSError as exc:
        if isinstance(exc, StateError):
            raise
        raise StateError(f"the state folder {path} cannot be used: {exc.strerror or exc}") from exc


