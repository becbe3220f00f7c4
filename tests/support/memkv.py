"""An in-memory KV with Consul's compare-and-set semantics, for the fast unit tier.

One global index, bumped by every applied write, as Consul's raft index is; `create` is
`cas=0`; a transaction applies all of its ops or none. It never replaces the real-Consul test of
the same behaviour (see tests/e2e/test_safety.py): it makes the allocator's logic cheap to explore.
"""

from __future__ import annotations

import builtins
import threading
from collections.abc import Callable, Sequence
from typing import Any

from ipam_da_consul.allocator.store import (
    Cas,
    Check,
    Delete,
    DeleteCas,
    KVEntry,
    Lock,
    Op,
    Set,
    TxnResult,
)


class MemKV:
    """Sessions are Consul's as this plugin uses them: `expire_session` stands for the TTL
    running out, deleting the keys locked with it."""

    def __init__(self) -> None:
        self.data: dict[str, KVEntry] = {}
        self.index = 0
        self.lock = threading.Lock()
        self.writes = 0  # every write attempt, applied or not (Consul spends a raft entry each)
        # Called before each write is applied, e.g. to make another writer win in between.
        self.before_write: Callable[[str], None] | None = None
        self.sessions: dict[str, float] = {}  # id -> ttl
        self.locked: dict[str, str] = {}  # key -> session
        self.consistent_reads = 0

    def get(self, key: str, consistent: bool = False) -> KVEntry | None:
        self.consistent_reads += consistent
        return self.data.get(key)

    def list(self, prefix: str, consistent: bool = False) -> list[KVEntry]:
        self.consistent_reads += consistent
        return [e for k, e in sorted(self.data.items()) if k.startswith(prefix)]

    def keys(self, prefix: str) -> builtins.list[str]:
        return [k for k in sorted(self.data) if k.startswith(prefix)]

    def create_session(self, name: str, ttl: float) -> str:
        with self.lock:
            self.writes += 1
            self.index += 1
            session = f"session-{self.index}"
            self.sessions[session] = ttl
            return session

    def expire_session(self, session: str) -> builtins.list[str]:
        """The session's TTL ran out: its keys are deleted. Returns them."""
        with self.lock:
            self.index += 1
            self.sessions.pop(session, None)
            gone = [k for k, s in self.locked.items() if s == session]
            for key in gone:
                del self.locked[key]
                self.data.pop(key, None)
            return gone

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
                if isinstance(op, Lock) and op.session not in self.sessions:
                    return TxnResult(i, {}, why=f"invalid session {op.session!r}")
            indexes = {}
            for op in ops:
                if isinstance(op, Cas | Set | Lock):
                    self.data[op.key] = KVEntry(op.key, op.value, self.index)
                    indexes[op.key] = self.index
                    if isinstance(op, Lock):
                        self.locked[op.key] = op.session
                elif isinstance(op, DeleteCas | Delete):
                    self.data.pop(op.key, None)
                    self.locked.pop(op.key, None)
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
