"""Consul's KV and transaction endpoints as the allocator's `KV` protocol.

This is the adapter for the allocator's storage port, so it speaks the port's types.
"""

from __future__ import annotations

import base64
import builtins
import json
from binascii import a2b_base64
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import repeat
from operator import itemgetter
from typing import Any
from urllib.parse import quote

from ..allocator.store import (
    Cas,
    Check,
    Columns,
    Delete,
    DeleteCas,
    KVEntry,
    Lock,
    Op,
    Set,
    TxnResult,
    key_problem,
)
from . import answers
from .client import ConsulClient, Response, check_status
from .errors import ConsulError, UnsafeKey


@dataclass(frozen=True)
class KeyNames:
    """A `?keys` listing of a prefix."""

    keys: list[str]
    # Consul's index of the prefix when listed: every key under it written before the listing
    # has a ModifyIndex at most this, every key written after a higher one.
    index: int
    # Consul left out keys the token may not read (it does so without an error).
    acl_filtered: bool


class ConsulKV:
    def __init__(self, client: ConsulClient) -> None:
        self.client = client

    def close(self) -> None:
        """Let the client's connections go: a pool watcher's KV is its own (a call's store
        closes its client itself)."""
        self.client.close()

    def get(self, key: str, consistent: bool = False) -> KVEntry | None:
        resp = self.client.request("GET", _path(key), _CONSISTENT if consistent else None)
        if resp.status == 404:
            return None
        check_status(resp, f"reading KV key {key!r}")
        entries = _entries(resp, key)
        return entries[0] if entries else None

    def list(self, prefix: str, consistent: bool = False) -> Columns:
        params = {"recurse": "true"} | (_CONSISTENT if consistent else {})
        resp = self.client.request("GET", _path(prefix), params)
        if resp.status == 404:
            return Columns([], [], [])
        check_status(resp, f"listing KV prefix {prefix!r}")
        return _entries(resp, prefix)

    def keys(self, prefix: str) -> builtins.list[str]:
        return self.names(prefix).keys

    def create_session(self, name: str, ttl: float) -> str:
        body = {
            "Name": name,
            "TTL": f"{int(ttl)}s",
            # Its keys go with it: that is what the session is for.
            "Behavior": "delete",
            # A key of an ended session may be locked again at once (the default waits 15 s).
            "LockDelay": "0s",
            # No health check: only the TTL, counted by Consul's leader, ends it. The default
            # (the agent's serfHealth) would end it, and delete its keys, whenever the agent it
            # was created through looks unhealthy.
            "Checks": [],
            "NodeChecks": [],
        }
        resp = self.client.request("PUT", "/v1/session/create", None, json.dumps(body).encode())
        check_status(resp, "creating a Consul session")
        return answers.session_id(resp)

    def list_after(
        self, prefix: str, index: int = 0, wait_seconds: float = 0.0
    ) -> tuple[Columns, int]:
        """A listing with its X-Consul-Index. With `index`, a blocking query: Consul answers when
        something under the prefix changes after it, or when the wait is over."""
        resp, new_index = self._blocking_get(prefix, {"recurse": "true"}, index, wait_seconds)
        return (Columns([], [], []) if resp.status == 404 else _entries(resp, prefix)), new_index

    def keys_after(
        self, prefix: str, index: int = 0, wait_seconds: float = 0.0
    ) -> tuple[builtins.list[str], int]:
        """Like list_after, names only: a tenth of the bytes for a large folder."""
        resp, new_index = self._blocking_get(prefix, {"keys": "true"}, index, wait_seconds)
        if resp.status == 404:
            return [], new_index
        return answers.key_names(resp, repr(prefix)), new_index

    def names(self, prefix: str, separator: str | None = None) -> KeyNames:
        """The names of the keys under `prefix`, never their values. With `separator`, a name
        ends at the first separator after the prefix: each folder is named once, as
        `<prefix><folder>/`, however many keys it holds."""
        params = {"keys": "true"} | ({"separator": separator} if separator else {})
        resp = self.client.request("GET", _path(prefix), params)
        keys: builtins.list[str] = []
        if resp.status != 404:
            check_status(resp, f"listing KV prefix {prefix!r}")
            keys = answers.key_names(resp, repr(prefix))
        try:
            index = int(resp.headers.get("X-Consul-Index", "0"))
        except ValueError:
            index = 0
        filtered = resp.headers.get("X-Consul-Results-Filtered-By-ACLs", "").lower() == "true"
        return KeyNames(keys, index, filtered)

    def _blocking_get(
        self, prefix: str, params: dict[str, str], index: int, wait_seconds: float
    ) -> tuple[Response, int]:
        timeout = None
        if index:
            params = params | {"index": str(index), "wait": f"{max(1, int(wait_seconds * 1000))}ms"}
            # Consul adds up to wait/16 of jitter before it answers.
            timeout = wait_seconds * 1.1 + self.client.read_timeout
        resp = self.client.request("GET", _path(prefix), params, timeout=timeout)
        if resp.status != 404:
            check_status(resp, f"listing KV prefix {prefix!r}")
        return resp, int(resp.headers.get("X-Consul-Index", "0") or 0)

    def create(self, key: str, value: bytes) -> bool:
        return self._write("PUT", key, value, 0)

    def replace(self, key: str, value: bytes, index: int) -> bool:
        return self._write("PUT", key, value, index)

    def delete(self, key: str, index: int) -> bool:
        return self._write("DELETE", key, None, index)

    def txn(self, ops: Sequence[Op]) -> TxnResult:
        body = json.dumps([{"KV": _txn_op(op)} for op in ops]).encode()
        resp = self.client.request("PUT", "/v1/txn", None, body)
        if resp.status != 409:
            check_status(resp, "a KV transaction")
            return TxnResult(None, answers.txn_indexes(resp), resp.doubtful)
        errors = answers.txn_errors(resp)
        whats = [what for _, what in errors if what]
        if any("Permission denied" in w for w in whats):
            raise ConsulError(
                "a KV transaction was refused: HTTP 403 Permission denied (check the ACL "
                f"token's KV write permissions for {', '.join(op.key for op in ops)})",
                403,
            )
        first = min((i for i, _ in errors if i is not None), default=0)
        return TxnResult(first, {}, resp.doubtful, "; ".join(whats)[:300])

    def _write(self, method: str, key: str, value: bytes | None, index: int) -> bool:
        resp = self.client.request(method, _path(key), {"cas": str(index)}, value)
        check_status(resp, f"{'deleting' if method == 'DELETE' else 'writing'} KV key {key!r}")
        answer = resp.body.strip()
        if answer not in (b"true", b"false"):
            raise ConsulError(f"unexpected answer to a CAS write of {key!r}: {answer[:100]!r}")
        return answer == b"true"


# A linearizable read: the leader confirms with a quorum that it still leads before answering.
_CONSISTENT = {"consistent": "true"}


def _path(key: str) -> str:
    """The URL path of a key. Every KV request's path is built here, so a key that would reach
    another key once the path is cleaned (allocator/store.py key_problem) is refused here,
    before anything is sent."""
    problem = key_problem(key)
    if problem is not None:
        raise UnsafeKey(f"KV key {key!r} cannot be sent to Consul: {problem}")
    return "/v1/kv/" + quote(key, safe="/:")


# A listing this large is a pool folder of thousands of keys: parsed with orjson when it is
# installed (the `fast` extra), in half the time json takes for 60,000 entries (~80 ms against
# ~140). Imported only then, so small calls never pay for it.
_LARGE_LISTING = 1 << 20
_orjson_loads: Callable[[bytes], Any] | None = None
# A large listing is parsed this much at a time (see _pieces).
_PIECE = 1 << 16


def _listing_json(body: bytes) -> Any:
    if len(body) >= _LARGE_LISTING:
        try:
            return _large_loads()(body)
        except ValueError:
            pass  # json has the last word on what is JSON (orjson refuses some of it)
    return json.loads(body)


def _large_loads() -> Callable[[bytes], Any]:
    global _orjson_loads
    if _orjson_loads is None:
        try:
            import orjson

            _orjson_loads = orjson.loads
        except ImportError:
            _orjson_loads = json.loads
    return _orjson_loads


_KEY, _MODIFY_INDEX = itemgetter("Key"), itemgetter("ModifyIndex")


def _entries(resp: Response, what: str) -> Columns:
    body = resp.body
    listing = None
    if len(body) >= _LARGE_LISTING:
        try:
            listing = _columns(map(_listing_json_large, _pieces(body)))
        except Exception:  # the whole body, read below, has the last word
            listing = None
    try:
        if listing is None:
            listing = _columns([_listing_json(body)])
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as exc:
        raise ConsulError(
            f"Consul sent a KV answer for {what!r} that could not be read: {exc}"
        ) from exc
    if not set(map(type, listing.keys)) <= {str}:
        raise ConsulError(f"Consul sent a KV answer for {what!r} with a key that is not text")
    return listing


def _listing_json_large(piece: bytes) -> list[Any]:
    # One parser for every piece: a piece it refuses sends the whole body to _listing_json,
    # so no listing is read partly by orjson and partly by json (they differ on integers
    # beyond 64 bits, for one).
    data = _large_loads()(piece)
    if type(data) is not list:
        raise ValueError("a piece of a listing is not an array")
    return data


def _pieces(body: bytes) -> Iterator[bytes]:
    """The listing `[e1,e2,...]` as arrays of a few hundred entries each, cut where `},{`
    follows `_PIECE` bytes. Parsed one after the other, the entries of a piece are dropped
    before the next piece is parsed, so their memory is used again: parsed whole, 60,000
    entries take 50 MB that the kernel must first map in (a fault per page, ~40 ms here).

    Every piece parses as an array only if the body is one and the pieces' entries, in
    order, are its entries. A piece is the body's bytes from just after one cut to the next
    cut's `}`, in `[` and `]`: its entries are a run of the body's entries exactly when each
    cut falls between two entries of the body's array, for an entry parses alone as it does
    in the array. A cut anywhere else leaves the piece before it unparseable: inside a
    string, the string is left open (no `"` follows the cut's `}` in that piece); inside an
    entry, the entry is left open, or closed by the `]` added where it needed `}`. Cuts are
    at ASCII bytes, so no UTF-8 sequence is split."""
    start, head = 0, b""
    while True:
        cut = body.find(b"},{", start + _PIECE)
        if cut < 0:
            yield head + body[start:] if start else body  # uncut: the body itself, no copy
            return
        yield b"".join((head, memoryview(body)[start : cut + 1], b"]"))
        start, head = cut + 2, b"["


def _columns(parts: Iterable[list[Any]]) -> Columns:
    """The keys, values and indexes of entries parsed from a listing, part by part."""
    keys: list[Any] = []
    values: list[bytes] = []
    indexes: list[int] = []
    for data in parts:
        # Mapped, not looped: a pool folder lists tens of thousands of entries.
        keys += map(_KEY, data)
        part = list(map(_MODIFY_INDEX, data))
        if not set(map(type, part)) <= {int}:
            part = [int(i) for i in part]
        indexes += part
        raw: list[Any] = list(map(dict.get, data, repeat("Value")))
        if None in raw:  # a folder's own key, or an empty value
            raw = [v or "" for v in raw]
        # binascii directly: base64.b64decode's wrapper is most of the cost of the values.
        values += map(a2b_base64, raw)
    return Columns(keys, values, indexes)


def _txn_op(op: Op) -> dict[str, object]:
    if isinstance(op, Check):
        if op.index == 0:
            return {"Verb": "check-not-exists", "Key": op.key}
        return {"Verb": "check-index", "Key": op.key, "Index": op.index}
    if isinstance(op, Cas):
        return {"Verb": "cas", "Key": op.key, "Value": _b64(op.value), "Index": op.index}
    if isinstance(op, Set):
        return {"Verb": "set", "Key": op.key, "Value": _b64(op.value)}
    if isinstance(op, DeleteCas):
        return {"Verb": "delete-cas", "Key": op.key, "Index": op.index}
    if isinstance(op, Delete):
        return {"Verb": "delete", "Key": op.key}
    if isinstance(op, Lock):
        return {"Verb": "lock", "Key": op.key, "Value": _b64(op.value), "Session": op.session}
    raise TypeError(f"not a KV transaction op: {op!r}")


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")
