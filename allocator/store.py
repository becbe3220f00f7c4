"""The storage contract the allocator needs: a KV store with compare-and-set and transactions.

`ipam_da_consul.consul.ConsulKV` satisfies it over HTTP; the allocator never sees HTTP.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, overload


def key_problem(key: str) -> str | None:
    """Why `key` cannot be sent to the store as the key it is, or None when it can.

    Keys travel in URL paths, and what sits between the plugin and Consul cleans paths:
    urllib3 drops `.` and `..` segments, proxies and routers merge `//` or decode `%2F`. Such a
    key is a request for another key (`ipam/.fences/../` lists all of `ipam/`). The KV root ""
    and a folder's trailing `/` are fine."""
    if not key:
        return None
    path = key[:-1] if key.endswith("/") else key
    if any(segment in _DOT_OR_EMPTY for segment in path.split("/")):
        return "it has an empty, '.' or '..' path segment"
    if "%2f" in key.lower():
        return "it holds an encoded slash ('%2F')"
    return None


_DOT_OR_EMPTY = frozenset(("", ".", ".."))


@dataclass(frozen=True)
class KVEntry:
    key: str
    value: bytes
    modify_index: int


class Columns(Sequence[KVEntry]):
    """A listing kept as three columns, entries made only when asked for one.

    A pool folder lists tens of thousands of keys; an object per key is a large part of
    reading it, and the fast reading of a folder (fastpath.py) works on the columns anyway."""

    __slots__ = ("indexes", "keys", "values")

    def __init__(self, keys: list[str], values: list[bytes], indexes: list[int]) -> None:
        self.keys, self.values, self.indexes = keys, values, indexes

    @classmethod
    def of(cls, entries: Sequence[KVEntry]) -> Columns:
        if isinstance(entries, Columns):
            return entries
        return cls(
            [e.key for e in entries], [e.value for e in entries], [e.modify_index for e in entries]
        )

    def __add__(self, other: Sequence[KVEntry]) -> Columns:
        more = Columns.of(other)
        return Columns(
            self.keys + more.keys, self.values + more.values, self.indexes + more.indexes
        )

    def __len__(self) -> int:
        return len(self.keys)

    @overload
    def __getitem__(self, i: int) -> KVEntry: ...
    @overload
    def __getitem__(self, i: slice) -> Columns: ...
    def __getitem__(self, i: int | slice) -> KVEntry | Columns:
        if isinstance(i, slice):
            return Columns(self.keys[i], self.values[i], self.indexes[i])
        return KVEntry(self.keys[i], self.values[i], self.indexes[i])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str | bytes):
            return NotImplemented
        return list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Columns({list(self)!r})"


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


@dataclass(frozen=True)
class Delete:
    """Delete the key whatever it holds (and whichever session holds it)."""

    key: str


@dataclass(frozen=True)
class Lock:
    """Write `value` and tie the key to `session`: Consul deletes it when the session ends."""

    key: str
    value: bytes
    session: str


Op = Check | Cas | Set | DeleteCas | Delete | Lock


@dataclass(frozen=True)
class TxnResult:
    # Index in the op list of the first op that did not hold; None when the whole txn applied.
    failed: int | None
    # ModifyIndex of each key the transaction wrote, when it applied.
    indexes: dict[str, int]
    # The transaction was sent more than once (a lost reply, a resend after failover): an
    # earlier send may apply, or have applied, without us hearing of it. A failed compare may
    # then be our own write, and a won one may be repeated later if its key is deleted first.
    doubtful: bool = False
    # Why the failed op did not hold, as the store words it (e.g. an invalid session).
    why: str = ""

    @property
    def ok(self) -> bool:
        return self.failed is None


class StoreError(Exception):
    """The store answered, but not with what was asked, or could not be asked.

    `doubtful`: the request was a write and an attempt of it may have reached the store
    without its answer arriving: it may have applied though this is raised (see ledger.py)."""

    def __init__(self, message: str, status: int | None = None, *, doubtful: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.doubtful = doubtful


class StoreUnavailable(StoreError):
    """No server of the store could be asked in time: try again later."""


class UnsafeKey(StoreError):
    """A key no request may be built from (`key_problem`): refused before anything is sent."""


class KV(Protocol):
    """`consistent` reads are linearizable: what a read decides (which keys a DEL releases,
    whether a rollback finds its write) must never come from a deposed leader that has not yet
    noticed a newer leader's writes. Other reads only pick candidates for a compare-and-set."""

    def get(self, key: str, consistent: bool = False) -> KVEntry | None:
        """The entry, or None when the key does not exist."""

    def list(self, prefix: str, consistent: bool = False) -> Sequence[KVEntry]:
        """Every entry whose key starts with `prefix` (empty when none)."""

    def keys(self, prefix: str) -> Sequence[str]:
        """The names of the keys under `prefix`, without their values."""

    def create_session(self, name: str, ttl: float) -> str:
        """A session that ends `ttl` seconds (at least) after its creation, measured by the
        store, deleting every key locked with it; never renewed, tied to no health check."""

    def create(self, key: str, value: bytes) -> bool:
        """Write only if the key is absent; False when it already exists."""

    def replace(self, key: str, value: bytes, index: int) -> bool:
        """Write only if the key's ModifyIndex is still `index`."""

    def delete(self, key: str, index: int) -> bool:
        """Delete only if the key's ModifyIndex is still `index`."""

    def txn(self, ops: Sequence[Op]) -> TxnResult:
        """Apply every op atomically, or none of them (at most 64 ops)."""


class WatchableKV(KV, Protocol):
    """A KV that can also wait for changes: the helper's pool cache (cni/helper/cache.py)
    watches with it, and a listing records the index to watch from. A watcher's own, for its
    life (cni/compose.py watch_kv): `close` lets its connection go."""

    def list_after(
        self, prefix: str, index: int = 0, wait_seconds: float = 0.0
    ) -> tuple[Sequence[KVEntry], int]:
        """A listing that returns once the prefix changes after `index`, or after the wait."""

    def keys_after(
        self, prefix: str, index: int = 0, wait_seconds: float = 0.0
    ) -> tuple[list[str], int]:
        """Key names only, with the same blocking behaviour."""

    def close(self) -> None: ...
