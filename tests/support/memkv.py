"""An in-memory KV with Consul's compare-and-set semantics, for the fast unit tier.

One global index, bumped by every applied write, as Consul's raft index is; `create` is
`cas=0`; a transaction applies all of its ops or none. It never replaces the real-Consul test of
the same behaviour (see tests/e2e/test_safety.py): it makes the allocator's logic cheap to explore.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from ipam_da_consul.allocator.store import Cas, Check, DeleteCas, KVEntry, Op, Set, TxnResult


class MemKV:
    def __init__(self) -> None:
        self.data: dict[str, KVEntry] = {}
        self.index = 0
        self.lock = threading.Lock()
        self.writes = 0  # every write attempt, applied or not (Consul spends a raft entry each)
        # Called before each write is applied, e.g. to make another writer win in between.
        self.before_write: Callable[[str], None] | None = None

    def get(self, key: str) -> KVEntry | None:
        return self.data.get(key)

    def list(self, prefix: str) -> list[KVEntry]:
        return [e for k, e in sorted(self.data.items()) if k.startswith(prefix)]

    def create(self, key: str, value: bytes) -> bool:
        return self.txn([Cas(key, value, 0)]).ok

    def replace(self, key: str, value: bytes, index: int) -> bool:
        return self.txn([Cas(key, value, index)]).ok

    def delete(self, key: str, index: int) -> bool:
        return self.txn([DeleteCas(key, index)]).ok

    def put(self, key: str, value: bytes) -> int:
        return self.txn([Set(key, value)]).indexes[key]

    def txn(self, ops: Sequence[Op]) -> TxnResult:
        if self.before_write is not None:
            for op in ops:
                self.before_write(op.key)
        with self.lock:
            self.writes += 1
            self.index += 1
            for i, op in enumerate(ops):
                current = self.data.get(op.key)
                held = current.modify_index if current is not None else 0
                if isinstance(op, Check | Cas | DeleteCas) and op.index != held:
                    return TxnResult(i, {})
                if isinstance(op, DeleteCas) and current is None:
                    return TxnResult(i, {})
            indexes = {}
            for op in ops:
                if isinstance(op, Cas | Set):
                    self.data[op.key] = KVEntry(op.key, op.value, self.index)
                    indexes[op.key] = self.index
                elif isinstance(op, DeleteCas):
                    del self.data[op.key]
            return TxnResult(None, indexes)


class HeldBack:
    """A KV whose first transaction is kept instead of sent: a request stuck in a follower
    until a leader is elected. The sender sees `error`; `release()` sends it, late."""

    def __init__(self, kv: Any, error: Exception) -> None:
        self.kv = kv
        self.error = error
        self.kept: list[Op] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.kv, name)

    def txn(self, ops: Sequence[Op]) -> TxnResult:
        if self.kept is None:
            self.kept = list(ops)
            raise self.error
        result: TxnResult = self.kv.txn(ops)
        return result

    def release(self) -> TxnResult:
        assert self.kept is not None
        result: TxnResult = self.kv.txn(self.kept)
        return result
