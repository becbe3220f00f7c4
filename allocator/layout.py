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
        return f"{self.prefix}{pool}/{key_name(ip)}"

    def other_spellings(self, pool: str, ip: IPAddress, key: str) -> list[str]:
        """The keys of `ip` in other spellings than `key`, which a write of `key` checks are
        absent: Consul's compare-and-set serialises writers of one key *name* only."""
        folder = self.folder(pool)
        return [folder + name for name in spellings(ip) if folder + name != key]

    def fences(self, network: str | None = None) -> str:
        """The folder of all fences, or of one network's."""
        if network is None:
            return f"{self.prefix}{FENCES}/"
        return f"{self.prefix}{FENCES}/{_segment(network)}/"

    def fence_key(self, network: str, container: str, ifname: str) -> str:
        """One attachment's fence: raising it voids every write of the attachment sent before.
        See allocator/allocate.py for why writes are fenced."""
        return f"{self.fences(network)}{container}/{_segment(ifname)}"


def key_name(ip: IPAddress) -> str:
    """The one spelling this plugin writes an address's key under, whatever Python runs it:
    RFC 5952 text, which is also what upstream (Rust) writes. Python 3.11 and 3.12 spell an
    IPv4-mapped IPv6 address `::ffff:a00:a`, 3.13 `::ffff:10.0.0.10`: a fleet mixing them would
    otherwise hold one address under two keys."""
    if ip.version == 6:
        mapped = ip.ipv4_mapped
        if mapped is not None:
            return f"::ffff:{mapped}"
    return str(ip)


def spellings(ip: IPAddress) -> list[str]:
    """Every spelling of `ip` a writer is known to produce, the canonical one first: Python
    before 3.13 for IPv4-mapped addresses, upper case, and the uncompressed form (what other
    tools and hand-written `consul kv put` commands write). Readers take any spelling as the
    same address; a write checks that these are absent."""
    canonical = key_name(ip)
    names = [canonical]
    if ip.version == 6:
        full = ip.exploded
        old = str(ip)
        for name in (old, canonical.upper(), old.upper(), full, full.upper()):
            if name not in names:
                names.append(name)
    return names


def _segment(name: str) -> str:
    # Interface names may hold '%', '?', '#' or any other byte but '/', ':' and whitespace (as
    # the kernel allows), and the key of every fence written so far was made this way. Network
    # names are checked by the CNI rule (check_network_name), whose characters quote leaves as
    # they are, so their fence keys are the same as before.
    return quote(name, safe="") or "-"
