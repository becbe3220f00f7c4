"""An attachment's writes, recorded before they are sent: what the allocator must still answer
for after the call that sent them is gone.

Consul can apply a write after its sender gave up on it (a reply lost on a flaky network, a
request a follower forwards once a leader is elected). So every allocation write is a `Claim`
in the attachment's ledger *before* it leaves this host, and stays there until its fate is
known and settled:

- `sent`: recorded, outcome not known yet (a process killed here leaves it so: it counts as
  `doubt`);
- `held`: Consul applied it and the attachment holds the key;
- `doubt`: the reply never came: it may apply later. It must be voided (the attachment's fence
  raised, then the key deleted only while it holds exactly these bytes) before it can become a
  second address, or be adopted by a later ADD that finds exactly these bytes as its own.

`resent`: the write went out more than once (a resend after failover). Even when it won, an
earlier send may still be on its way: undoing it must raise the fence first, or that send
re-creates the key once it is deleted.

The ledger of one attachment is what its DEL releases and what a replay voids; the allocator
owns it (allocate.py), a store keeps it: in memory for one call, or in a file that outlives
the process (cni/state.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal, Protocol

# "lost" is never kept: what a write that certainly did not apply reports to its caller.
State = Literal["sent", "held", "doubt", "lost"]


@dataclass(frozen=True)
class Claim:
    """One allocation write: the exact bytes, what the key held before (None: absent), and the
    call that sent it."""

    key: str
    value: bytes
    previous: bytes | None
    call: str
    state: State = "sent"
    resent: bool = False
    # The previous holder's fence and where it was when this write took the key over from it:
    # undoing the take-over gives the key back only while that holder was not deleted since.
    holder_fence: str | None = None
    holder_fence_index: int = 0

    @property
    def won(self) -> bool:
        return self.state == "held"

    @property
    def settled(self) -> bool:
        return self.state == "held" and not self.resent

    def as_(self, state: State, resent: bool = False) -> Claim:
        return replace(self, state=state, resent=self.resent or resent)


class Ledger(Protocol):
    """Where an attachment's claims are kept. `save` is durable enough to survive the process
    (a store that cannot make it so says so by raising OSError)."""

    def claims(self) -> list[Claim]: ...

    def save(self, claims: list[Claim]) -> None: ...


@dataclass
class MemoryLedger:
    """Claims for the life of one call: no state folder, or the unit tier."""

    kept: list[Claim] = field(default_factory=list)

    def claims(self) -> list[Claim]:
        return list(self.kept)

    def save(self, claims: list[Claim]) -> None:
        self.kept = list(claims)
