"""Where pools live in KV: `<prefix><pool>` holds ranges, `<prefix><pool>/<ip>` allocations."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote

from .ranges import IPAddress

# One safe path segment: Consul keys go into URLs, so no separators, escapes or spaces.
_POOL_NAME = re.compile(r"^[^/?#%\s]+$")
# The CNI spec's rule for network names (libcni checks it too): one KV path segment, never
# `.` or `..`, nothing a URL would encode.
_NETWORK_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.\-]*")
# Attachment fences live beside the pools under this name, which no pool may take.
FENCES = ".fences"


def check_pool_name(name: str) -> str | None:
    """Why `name` cannot be a pool name, or None when it can."""
    if not name:
        return "a pool name cannot be empty"
    if name == FENCES:
        return f"pool name {name!r} is reserved for attachment fences"
    if name in (".", "..") or not _POOL_NAME.fullmatch(name):
        return (
            f"pool name {name!r} must be one KV path segment (no '/', '..', '?', '#', '%', spaces)"
        )
    return None


def check_network_name(name: str) -> str | None:
    """Why `name` cannot be a CNI network name, or None when it can. The name is a segment
    of fence keys (`<prefix>.fences/<network>/...`) and is recorded in allocations."""
    if not _NETWORK_NAME.fullmatch(name):
        return (
            f"network name {name!r} is not valid: the CNI spec asks for a letter or digit, "
            "then letters, digits, '_', '.' or '-'"
        )
    return None


@dataclass(frozen=True)
class Layout:
    prefix: str = "ipam/"

    def pool_key(self, pool: str) -> str:
        return f"{self.prefix}{pool}"

    def folder(self, pool: str) -> str:
        return f"{self.prefix}{pool}/"

    def allocation_key(self, pool: str, ip: IPAddress) -> str:
        return f"{self.prefix}{pool}/{ip}"

    def fences(self, network: str | None = None) -> str:
        """The folder of all fences, or of one network's."""
        if network is None:
            return f"{self.prefix}{FENCES}/"
        return f"{self.prefix}{FENCES}/{_segment(network)}/"

    def fence_key(self, network: str, container: str, ifname: str) -> str:
        """One attachment's fence: raising it voids every write of the attachment sent before.
        See allocator/allocate.py for why writes are fenced."""
        return f"{self.fences(network)}{container}/{_segment(ifname)}"


def _segment(name: str) -> str:
    # Interface names may hold '%', '?', '#' or any other byte but '/', ':' and whitespace (as
    # the kernel allows), and the key of every fence written so far was made this way. Network
    # names are checked by the CNI rule (check_network_name), whose characters quote leaves as
    # they are, so their fence keys are the same as before.
    return quote(name, safe="") or "-"
