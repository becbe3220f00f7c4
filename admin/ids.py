"""Container IDs as operators type them: full, or a unique prefix of at least MIN_PREFIX
characters (runtimes show 12), and lists of live IDs as runtimes print them."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .errors import UsageError

# Short enough to type, long enough that a typo rarely names another container.
MIN_PREFIX = 6
# What the plugin accepts as CNI_CONTAINERID: anything else in a live list is not an ID (a
# header line, `podman ps` without -q, a stray word) and means the list is not what we think.
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_SHOWN = 8  # candidates named in an ambiguity error


def resolve_target(given: str, targets: Iterable[str], option: str = "--target") -> str | None:
    """The one target `given` names: itself when some target is exactly that, else the only
    target it is a prefix of; None when it names none. Exact matches win, as in `docker`.
    A prefix shorter than MIN_PREFIX that names some target is refused: too easy to mistype."""
    known = set(targets)
    if given in known:
        return given
    found = sorted(t for t in known if t.startswith(given))
    if found and len(given) < MIN_PREFIX:
        raise UsageError(
            f"{option} {given!r} is shorter than {MIN_PREFIX} characters and is no target's full "
            f"ID, only the start of {_names(found)}: give the full ID or at least {MIN_PREFIX} "
            "characters of it"
        )
    if len(found) > 1:
        raise UsageError(
            f"{option} {given!r} is ambiguous: {len(found)} targets start with it "
            f"({_names(found)}); give more characters"
        )
    return found[0] if found else None


def _names(found: Sequence[str]) -> str:
    more = f", and {len(found) - _SHOWN} more" if len(found) > _SHOWN else ""
    return ", ".join(found[:_SHOWN]) + more


@dataclass(frozen=True)
class LiveIDs:
    """The containers a runtime says exist on this host, as read from its listing."""

    ids: frozenset[str]
    source: str

    def keeps(self, target: str) -> bool:
        """Whether `target` is alive: named in full, or by a prefix of MIN_PREFIX or more.
        A shorter entry is a full ID (tests and hand-made names are short), never a prefix.

        A prefix that several targets share keeps them all: from a live list, an ambiguity
        must never cost a running container its address."""
        if target in self.ids:
            return True
        return any(target[:n] in self.ids for n in range(MIN_PREFIX, len(target)))


def parse_live_ids(text: str, source: str) -> LiveIDs:
    """One ID per line; blank lines and `#` comments ignored. Anything that is not an ID is
    refused whole: a list we misread would release live containers' addresses."""
    ids: set[str] = set()
    for number, line in enumerate(text.splitlines(), 1):
        item = line.split("#", 1)[0].strip()
        if not item:
            continue
        if not _ID.fullmatch(item):
            raise UsageError(
                f"{source} line {number}: {item[:80]!r} is not a container ID (one ID per line; "
                "list them with e.g. `podman ps -a -q --no-trunc`); nothing done"
            )
        ids.add(item)
    return LiveIDs(frozenset(ids), source)


def read_live_ids(path: str) -> LiveIDs:
    """The live list from FILE, or stdin for '-'."""
    if path == "-":
        return parse_live_ids(sys.stdin.read(), "stdin")
    try:
        with open(path, encoding="utf-8") as fh:
            return parse_live_ids(fh.read(), path)
    except OSError as exc:
        raise UsageError(f"cannot read --live-ids {path!r}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"--live-ids {path!r} is not a text file of container IDs") from None
