"""One allocation key as read: who holds the address, and the ModifyIndex a compare-and-set
needs. Its own module so that the pool (pool.py) and the fast reading of a folder
(fastpath.py) both make them without importing each other."""

from __future__ import annotations

from dataclasses import dataclass, field

from .ranges import IPAddress


@dataclass(frozen=True)
class Held:
    """One allocation key: who holds the address, and the ModifyIndex for CAS. Its fields after
    `ip`, `key`, `index` and `value` are AllocationSchema's (fastpath.py checks that they are)."""

    ip: IPAddress
    target: str
    key: str
    index: int
    ifname: str | None = None
    host: str | None = None
    value: bytes = b""  # the raw JSON: a rollback compares it, a take-over's restores it
    network: str | None = None
    call: str | None = None
    runtime: dict[str, str] | None = field(default=None, compare=False, hash=False)
    free_after: float | None = None
    at: float | None = None

    @property
    def cooling(self) -> bool:
        """A released address cooling down (`reuse_after`): taken, held by nobody, until
        Consul deletes its key when the cool-down's session ends (allocate.py release)."""
        return self.free_after is not None

    def owned_by(self, target: str, ifname: str | None = None, network: str | None = None) -> bool:
        # An allocation without ifname or network (upstream, older versions, other tools)
        # belongs to the whole container. A released one (cooling down) belongs to nobody.
        if self.target != target or self.free_after is not None:
            return False
        if network is not None and self.network is not None and self.network != network:
            return False
        return ifname is None or self.ifname is None or self.ifname == ifname
