"""The storage contract the allocator needs: a KV store with compare-and-set.

`ipam_da_consul.consul.ConsulKV` satisfies it over HTTP; the allocator never sees HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class KVEntry:
    key: str
    value: bytes
    modify_index: int


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
