"""Where pools live in KV: `<prefix><pool>` holds ranges, `<prefix><pool>/<ip>` allocations."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .ranges import IPAddress

# One safe path segment: Consul keys go into URLs, so no separators, escapes or spaces.
_POOL_NAME = re.compile(r"^[^/?#%\s]+$")


def check_pool_name(name: str) -> str | None:
    """Why `name` cannot be a pool name, or None when it can."""
    if not name:
        return "a pool name cannot be empty"
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
