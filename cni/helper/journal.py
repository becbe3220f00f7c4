"""The helper's journal of DELs that could not reach Consul, and the thread that redoes them.

Why: a DEL that finds no Consul returns 11 and relies on the runtime to call it again; many
runtimes never do (Podman's `rm -f`, a kubelet that gave up on the sandbox), and the address
then stays allocated until GC or an operator. The helper outlives the call, so it records the
whole DEL (stdin and the CNI environment) in a file and redoes it once Consul answers.

One file per attachment (network, container, ifname), named by a hash of it: a DEL the runtime
retries while Consul is still away replaces its entry instead of adding one. Each file is
written to a temporary name, fsynced, renamed and the folder fsynced, so after a crash an
entry is either whole or absent. Files are 0600 in a 0700 folder: they hold the ACL token.

The rule for dropping an entry without redoing it: a later call of the same attachment that
this helper served successfully (an ADD: the attachment exists again and owns its keys, even
an address left from before, which an idempotent ADD hands back; or a DEL: the work is done).
Calls of an attachment with an entry and that entry's replay are serialised by a per-journal
lock, so a replay can never raise the fence under an ADD and then delete the address that ADD
just wrote. An entry is removed only after its DEL succeeded; a replay cut short (the helper
killed) is redone from the start, which is safe because DEL is idempotent: the fence is raised
again and only keys still naming the attachment are CAS-deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loguru import logger

from ..env import REPLAY_BEFORE
from ..errors import INPUT_CODES

DEFAULT_STATE_DIR = "/var/lib/ipam-da-consul"
JOURNAL_FOLDER = "journal"
# Set on the environment of a replayed DEL: its own failure must not journal it again.
REPLAY_MARK = "IPAM_DA_CONSUL_REPLAY"
# Test knob: while this file exists the replay thread waits (to slip an ADD in before it).
PAUSE_ENV = "IPAM_DA_CONSUL_TEST_JOURNAL_PAUSE"
_FIRST_BACKOFF = 0.5
# Low, because a DEL waiting here holds an address; a pass while Consul is away costs one
# failed connection per entry. A successful call through the helper also wakes the replay.
_MAX_BACKOFF = 5.0
_VERSION = 1


@dataclass(frozen=True)
class Entry:
    """One journaled DEL: what it needs to be redone, and when the runtime asked for it."""

    path: Path
    network: str
    container: str
    ifname: str
    at: float  # wall time of the DEL, for operators reading the journal
    stdin: bytes
    env: dict[str, str]


def attachment_of(stdin: bytes, env: Mapping[str, str]) -> tuple[str, str, str] | None:
    """(network, container, ifname) of a call, or None when its input names no container."""
    container = env.get("CNI_CONTAINERID", "")
    if not container:
        return None
    try:
        data = json.loads(stdin)
    except (ValueError, UnicodeDecodeError):
        return None
    name = data.get("name") if isinstance(data, dict) else None
    return (name if isinstance(name, str) else "", container, env.get("CNI_IFNAME", ""))


class Journal:
    def __init__(self, state_dir: str | Path) -> None:
        self.folder = Path(state_dir) / JOURNAL_FOLDER
        prepare(self.folder)
        # Serialises writes of entries, calls of journaled attachments, and their replay.
        self.lock = threading.RLock()
        # Set by a new entry, or a call that reached Consul: worth a pass now. An Event, not a
        # Condition on `lock`, so that poking never waits for a replay in progress.
        self.wake = threading.Event()
        self.stopped = False

    # -- recording --------------------------------------------------------------------------
    def path_for(self, attachment: tuple[str, str, str]) -> Path:
        digest = hashlib.sha256("\0".join(attachment).encode()).hexdigest()[:32]
        return self.folder / f"{digest}.json"

    def record(self, stdin: bytes, env: Mapping[str, str]) -> bool:
        """Journal a DEL that could not reach Consul; False when it cannot be (no container,
        a replay's own failure, a write error: the runtime's retry is then the only one)."""
        attachment = attachment_of(stdin, env)
        if attachment is None or env.get(REPLAY_MARK):
            return False
        body = {
            "v": _VERSION,
            "at": time.time(),
            "network": attachment[0],
            "container": attachment[1],
            "ifname": attachment[2],
            "stdin": stdin.decode("utf-8", errors="surrogateescape"),
            "env": dict(env),
        }
        data = json.dumps(body).encode("utf-8", errors="surrogateescape")
        try:
            with self.lock:
                write_atomically(self.path_for(attachment), data)
            self.wake.set()
        except OSError as exc:
            logger.error("helper: could not journal a DEL for {}: {}", _show(attachment), exc)
            return False
        with _helper_log():
            logger.warning(
                "helper: Consul unreachable; DEL of {} journaled, redone when Consul is back",
                _show(attachment),
            )
        return True

    def entries(self) -> list[Entry]:
        out = []
        for path in sorted(self.folder.glob("*.json")):
            try:
                out.append(load_entry(path))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                # A file this helper did not write whole (renames are atomic): keep it for an
                # operator rather than guess, and say so once per pass.
                logger.error("helper: unreadable journal entry {}: {}", path, exc)
        return out

    def __len__(self) -> int:
        return sum(1 for _ in self.folder.glob("*.json"))

    # -- calls of journaled attachments ------------------------------------------------------
    @contextmanager
    def call(self, stdin: bytes, env: Mapping[str, str]) -> Iterator[Callable[[int], None]]:
        """Around a call the helper serves: one of an attachment with an entry runs under the
        lock (never beside its replay); `done(code)` drops the entry when an ADD or DEL of it
        succeeded. Other calls pass without the lock."""
        attachment = attachment_of(stdin, env) if not env.get(REPLAY_MARK) else None
        path = self.path_for(attachment) if attachment is not None else None
        if path is None or not path.exists():
            yield self.poke
            return
        command = env.get("CNI_COMMAND", "")

        def done(code: int) -> None:
            self.poke(code)
            if code == 0 and command in ("ADD", "DEL"):
                self.remove(path)
                with _helper_log():
                    logger.warning(
                        "helper: {} of {} succeeded after its DEL was journaled; entry dropped "
                        "without replay",
                        command,
                        _show(attachment),
                    )

        with self.lock:
            yield done

    def poke(self, code: int) -> None:
        """After a call: one that succeeded reached Consul, so pending entries may go now."""
        if code == 0 and not self.wake.is_set() and any(self.folder.glob("*.json")):
            self.wake.set()

    def remove(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        fsync_folder(path.parent)

    # -- replay -----------------------------------------------------------------------------
    def replay_once(self, run: Callable[[bytes, dict[str, str]], int]) -> bool:
        """Redo every entry once; True when the journal is empty afterwards. `run` does a DEL
        as the plugin does and returns its exit code."""

        clean = True
        for entry in self.entries():
            if _paused():
                return False
            with self.lock:
                # Dropped or replaced meanwhile (an ADD served, a newer DEL journaled): the
                # next pass sees the newer one.
                try:
                    current = load_entry(entry.path)
                except (OSError, ValueError, KeyError, TypeError):
                    continue
                if current != entry:
                    clean = False
                    continue
                env = {
                    **entry.env,
                    "CNI_COMMAND": "DEL",
                    REPLAY_MARK: entry.path.stem,
                    REPLAY_BEFORE: repr(entry.at),
                }
                code = run(entry.stdin, env)
                attachment = (entry.network, entry.container, entry.ifname)
                if code == 0:
                    self.remove(entry.path)
                    logger.warning("helper: journaled DEL of {} redone", _show(attachment))
                elif code in INPUT_CODES:
                    # It can never succeed; keeping it would retry forever.
                    self.remove(entry.path)
                    logger.error(
                        "helper: journaled DEL of {} dropped: its input is invalid (code {})",
                        _show(attachment),
                        code,
                    )
                else:
                    clean = False
                    logger.info(
                        "helper: journaled DEL of {} not redone yet (code {})",
                        _show(attachment),
                        code,
                    )
        return clean and len(self) == 0

    def run_forever(self, run: Callable[[bytes, dict[str, str]], int]) -> None:
        """The replay thread: a pass at start-up and on each new entry, with backoff (capped)
        while Consul stays away."""
        backoff = _FIRST_BACKOFF
        while not self.stopped:
            self.wake.clear()  # before the pass: a poke during it brings on the next one
            try:
                clean = self.replay_once(run)
            except Exception as exc:  # the thread must outlive any one bad pass
                logger.opt(exception=exc).error("helper: journal replay failed")
                clean = False
            if self.stopped:
                return
            if clean:
                backoff = _FIRST_BACKOFF
                self.wake.wait()  # until a DEL is journaled
            else:
                self.wake.wait(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF)

    def stop(self) -> None:
        self.stopped = True
        self.wake.set()


def _helper_log() -> Any:
    # Inside a call, lines go to that call's stderr (cni/logs.py); these are the helper's own
    # news, for its log, where an operator looks for what happened to a DEL later.
    return logger.contextualize(call=None)


def _paused() -> bool:
    knob = os.environ.get(PAUSE_ENV)
    return knob is not None and os.path.exists(knob)


def _show(attachment: tuple[str, str, str] | None) -> str:
    # Names only: never the stdin, which holds the ACL token.
    if attachment is None:
        return "?"
    network, container, ifname = attachment
    return f"{network}/{container}/{ifname}"


def load_entry(path: Path) -> Entry:
    data: dict[str, Any] = json.loads(path.read_bytes().decode("utf-8", errors="surrogateescape"))
    if data.get("v") != _VERSION:
        raise ValueError(f"unknown journal version {data.get('v')!r}")
    env = data["env"]
    if not isinstance(env, dict):
        raise TypeError("env is not an object")
    return Entry(
        path,
        str(data["network"]),
        str(data["container"]),
        str(data["ifname"]),
        float(data["at"]),
        str(data["stdin"]).encode("utf-8", errors="surrogateescape"),
        {str(k): str(v) for k, v in env.items()},
    )


def prepare(folder: Path) -> None:
    """Create the journal folder (and its parent) 0700; refuse one others could read or write,
    since entries hold ACL tokens."""
    old_umask = os.umask(0o077)
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    finally:
        os.umask(old_umask)
    st = os.stat(folder)
    if st.st_uid not in (0, os.geteuid()):
        raise OSError(f"the journal folder {folder} belongs to uid {st.st_uid}")
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise OSError(
            f"the journal folder {folder} is mode {stat.S_IMODE(st.st_mode):04o}; it must be "
            "0700, as its entries hold ACL tokens"
        )


def write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # The rename is durable only once the folder is.
    fsync_folder(path.parent)


def fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
