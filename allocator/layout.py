"""Where pools live in KV: `<prefix><pool>` holds ranges, `<prefix><pool>/<ip>` allocations."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote

from .ranges import IPAddress

# One safe path segment: Consul keys go into URLs, so no separators, escapes or spaces.
_POOL_NAME = re.compile(r"^[^/?#%\s]+$")
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
    # Network names are free text in a config; a key segment must not split on '/'.
    return quote(name, safe="") or "-"
