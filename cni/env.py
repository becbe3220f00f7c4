"""The CNI_* environment of one invocation, checked as the spec defines it."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from .errors import CNIError, Code

COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "GC", "STATUS")
# Commands that act on one attachment and so need its container and interface.
_PER_ATTACHMENT = ("ADD", "DEL", "CHECK")
# The CNI spec's rule. It cannot start with '.', so no ID is a '.' or '..' path segment, and
# it holds nothing a URL would encode: a fence key takes it as it is (allocator/layout.py).
_CONTAINER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_BAD_IFNAME = re.compile(r"[/:\s]")


@dataclass(frozen=True)
class Environment:
    command: str
    container_id: str = ""
    ifname: str = ""
    netns: str = ""
    args: dict[str, str] = field(default_factory=dict)


def read_env(env: Mapping[str, str]) -> Environment:
    command = env.get("CNI_COMMAND", "")
    if command not in COMMANDS:
        shown = f"{command!r}" if command else "not set"
        raise CNIError(
            Code.INVALID_ENV, f"CNI_COMMAND is {shown}: expected one of {', '.join(COMMANDS)}"
        )
    if command not in _PER_ATTACHMENT:
        return Environment(command)
    cid = env.get("CNI_CONTAINERID", "")
    if not _CONTAINER_ID.fullmatch(cid):
        raise CNIError(
            Code.INVALID_ENV,
            f"CNI_CONTAINERID {cid!r} is not valid: it must start with a letter or digit, "
            "followed by letters, digits, '_', '.' or '-'",
        )
    ifname = env.get("CNI_IFNAME", "")
    if not _valid_ifname(ifname):
        raise CNIError(
            Code.INVALID_ENV,
            f"CNI_IFNAME {ifname!r} is not a valid interface name "
            "(1-15 bytes, not '.' or '..', no '/', ':' or spaces)",
        )
    return Environment(
        command, cid, ifname, env.get("CNI_NETNS", ""), parse_args(env.get("CNI_ARGS", ""))
    )


def _valid_ifname(ifname: str) -> bool:
    """The kernel's rule (dev_valid_name): 1-15 bytes, not '.' or '..', no '/', ':' or
    whitespace. The name is a segment of fence keys; every other character is quoted there
    (allocator/layout.py)."""
    size = len(ifname.encode("utf-8", "surrogateescape"))
    return 0 < size <= 15 and ifname not in (".", "..") and not _BAD_IFNAME.search(ifname)


def parse_args(raw: str) -> dict[str, str]:
    """`K=V;K=V` into a dict; a pair without '=' is a bad environment."""
    out: dict[str, str] = {}
    for pair in filter(None, raw.split(";")):
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CNIError(
                Code.INVALID_ENV, f"CNI_ARGS has a malformed pair {pair!r}: expected KEY=VALUE"
            )
        out[key] = value
    return out
