"""The storage contract the allocator needs: a KV store with compare-and-set and transactions.

`ipam_da_consul.consul.ConsulKV` satisfies it over HTTP; the allocator never sees HTTP.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class KVEntry:
    key: str
    value: bytes
    modify_index: int


# -- transaction operations: all of a transaction applies, or none of it ---------------------
@dataclass(frozen=True)
class Check:
    """The key's ModifyIndex is `index`; index 0: the key does not exist."""

    key: str
    index: int


@dataclass(frozen=True)
class Cas:
    """Write `value` if the key's ModifyIndex is `index` (0: only if the key is absent)."""

    key: str
    value: bytes
    index: int


@dataclass(frozen=True)
class Set:
    key: str
    value: bytes


@dataclass(frozen=True)
class DeleteCas:
    key: str
    index: int


Op = Check | Cas | Set | DeleteCas


@dataclass(frozen=True)
class TxnResult:
    # Index in the op list of the first op that did not hold; None when the whole txn applied.
    failed: int | None
    # ModifyIndex of each key the transaction wrote, when it applied.
    indexes: dict[str, int]
    # An earlier send of this transaction may have been applied without us hearing the answer
    # (lost reply, resend after failover): a failed compare may then be our own write.
    doubtful: bool = False

    @property
    def ok(self) -> bool:
        return self.failed is None


class KV(Protocol):
    def get(self, key: str) -> KVEntry | None:
        """The entry, or None when the key does not exist."""

    def list(self, prefix: str) -> list[KVEntry]:
        """Every entry whose key starts with `prefix` (empty when none)."""

    def create(self, key: str, value: bytes) -> bool:
        """Write only if the key is absent; False when it already exists."""

    def replace(self, key: str, value: bytes, index: int) -> bool:
        """Write only if the key's ModifyIndex is still `index`."""

    def delete(self, key: str, index: int) -> bool:
        """Delete only if the key's ModifyIndex is still `index`."""

    def txn(self, ops: Sequence[Op]) -> TxnResult:
        """Apply every op atomically, or none of them (at most 64 ops)."""


class WatchableKV(KV, Protocol):
    """A KV that can also wait for changes (ConsulKV): the helper's pool cache
    (cni/helper/cache.py) watches with it, and a listing records the index to watch from."""

    def list_after(
        self, prefix: str, index: int = 0, wait_seconds: float = 0.0
    ) -> tuple[list[KVEntry], int]:
        """A listing that returns once the prefix changes after `index`, or after the wait."""

    def keys_after(
        self, prefix: str, index: int = 0, wait_seconds: float = 0.0
    ) -> tuple[list[str], int]:
        """Key names only, with the same blocking behaviour."""
