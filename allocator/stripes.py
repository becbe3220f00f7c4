"""Stripes: fixed blocks of a pool's addresses, each one run of key names in its folder, so a
host can read, watch and allocate from its own block without ever listing the whole pool.

Why: a pool is one key per allocated address. Any design where each host keeps the whole pool
current costs Consul, per allocation, a listing for every host (hosts x pool size): 1.7 MB
per wake for 60,000 key names, to every watching host. With stripes, a host reads its home
stripe (256 key names, a few kB) and is woken only by writes in it.

A stripe is:
- IPv4 (and IPv4-mapped IPv6): a /24, whose keys are exactly the names starting with `a.b.c.`
  (`::ffff:a.b.c.`);
- IPv6: a /112, whose addresses but the first (`x:...:x:0`, compressed differently) are
  exactly the names starting with the spelling of its second address less its last group.
  That first address is left to the fallback below, which reads key names of the whole pool.

Which stripes a host uses: its home is picked by a hash of the host and the pool (uniform over
the pool's stripes, and fixed for a host), then the next ones in pool order. Hosts therefore
spread over a pool's stripes and rarely write in the same one at once. When a host's stripes
have no free address in the few it looks at, one listing of the pool's key names finds the
stripes with room (and "pool full" is only said after it).

Where a host found room outside its home is remembered (`StripeHints`): its next ADD tries that
stripe first. Without it, a host whose home and next stripes are full (a pool packed from its
start by `lowest`, or by older versions) would pay that listing on every ADD.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass
from typing import Protocol

from .layout import key_name
from .ranges import IPAddress, IPRange

# Stripes a call reads one by one, home first, before it lists the whole pool's key names.
WALK = 4


@dataclass(frozen=True)
class Stripe:
    """One block of a pool's addresses: `first`..`last` (ints), listed as `prefix`."""

    version: int
    first: int
    last: int
    prefix: str

    def holds(self, ip: IPAddress) -> bool:
        return ip.version == self.version and self.first <= int(ip) <= self.last

    def clip(self, ranges: list[IPRange]) -> list[IPRange]:
        """The pool's ranges as seen from inside this stripe."""
        out = []
        for rng in ranges:
            part = rng.clip(self.first, self.last)
            if part is not None:
                out.append(part)
        return out


def _bits(version: int, first: int) -> int:
    """Host bits of a stripe: 8 for IPv4 and IPv4-mapped IPv6, 16 for other IPv6."""
    if version == 4:
        return 8
    return 8 if _mapped(first) else 16


def _mapped(value: int) -> bool:
    return value >> 32 == 0xFFFF


def stripe_of(ip: IPAddress) -> Stripe:
    value, version = int(ip), ip.version
    bits = _bits(version, value)
    first = value >> bits << bits
    last = first | ((1 << bits) - 1)
    make = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
    if version == 4 or bits == 8:
        name = key_name(make(first))
        prefix = name[: name.rindex(".") + 1]
    else:
        name = key_name(make(first + 1))
        prefix = name[: name.rindex(":") + 1]
    return Stripe(version, first, last, prefix)


class StripeHints(Protocol):
    """Where this host last found room in a pool outside its home stripe: an address of that
    stripe. Only a hint: a wrong or stale one costs one listing, never an address."""

    def hint(self, pool: str) -> str | None: ...

    def remember_hint(self, pool: str, address: str | None) -> None: ...


class MemoryHints:
    """Hints kept for the life of a process (the helper's, per way of reaching Consul)."""

    def __init__(self) -> None:
        self.hints: dict[str, str] = {}

    def hint(self, pool: str) -> str | None:
        return self.hints.get(pool)

    def remember_hint(self, pool: str, address: str | None) -> None:
        if address is None:
            self.hints.pop(pool, None)
        else:
            self.hints[pool] = address


class Stripes:
    """A pool's stripes in pool order (range by range), numbered from 0, computed, never
    listed: a /64 has 2**48 of them."""

    def __init__(self, ranges: list[IPRange]) -> None:
        # Per range: its first stripe's base and how many stripes it spans.
        self.spans: list[tuple[int, int, int]] = []  # (version, first base, count)
        for rng in ranges:
            lo, hi = int(rng.start), int(rng.end)
            bits = _bits(rng.version, lo)
            base, top = lo >> bits << bits, hi >> bits << bits
            self.spans.append((rng.version, base, ((top - base) >> bits) + 1))
        self.count = sum(n for _, _, n in self.spans)

    def at(self, index: int) -> Stripe:
        index %= self.count
        for version, base, n in self.spans:
            if index < n:
                bits = _bits(version, base)
                make = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
                return stripe_of(make(base + (index << bits)))
            index -= n
        raise IndexError(index)  # cannot happen: index < count

    def covers(self, stripe: Stripe) -> bool:
        """Whether `stripe` is one of the pool's."""
        for version, base, n in self.spans:
            bits = _bits(version, base)
            if version == stripe.version and base <= stripe.first < base + (n << bits):
                return True
        return False

    def home(self, host: str, pool: str) -> int:
        """This host's first stripe of the pool: the first 8 bytes of SHA-256 over the host and
        the pool (each followed by a NUL byte), modulo the number of stripes."""
        digest = hashlib.sha256(host.encode() + b"\0" + pool.encode() + b"\0").digest()
        return int.from_bytes(digest[:8], "big") % self.count

    def walk(self, host: str, pool: str, hint: Stripe | None = None) -> list[Stripe]:
        """The stripes a call reads one by one: where this host last found room outside its
        home (`hint`, if still the pool's), then home, then the next ones in pool order."""
        home = self.home(host, pool)
        seen: list[Stripe] = [hint] if hint is not None and self.covers(hint) else []
        for i in range(min(WALK, self.count)):
            stripe = self.at(home + i)
            if stripe not in seen:  # two ranges sharing a block list it once
                seen.append(stripe)
        return seen
