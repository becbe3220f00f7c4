"""Consul's answers, read at one boundary: the marshmallow schemas of the small ones (a
transaction's results or errors, a session's creation, a list of key names) and what each
means to the KV adapter (kv.py). A listing of a pool folder is read by the adapter's columnar
reader instead (kv.py `_entries`): a schema per entry would cost more than the listing's parse,
60,000 entries at a time, and the adapter checks there exactly what the allocator relies on
(each key is text, each value base64, each index an integer).

An answer that does not have its shape is a ConsulError: never guessed at. A transaction Consul
answered 200 to was applied, so one whose results cannot be read is in doubt (its write may
have applied, allocator/ledger.py), never lost.
"""

from __future__ import annotations

from typing import Any

from marshmallow import EXCLUDE, Schema, ValidationError, fields, validate

from .client import Response
from .errors import ConsulError


class _Answer(Schema):
    class Meta:
        unknown = EXCLUDE


class _TxnError(_Answer):
    OpIndex = fields.Integer(load_default=None)
    What = fields.String(load_default="")


class TxnErrors(_Answer):
    """A 409: the ops that did not hold, and why."""

    Errors = fields.List(fields.Nested(_TxnError), load_default=list, allow_none=True)


class _KVResult(_Answer):
    Key = fields.String(required=True)
    ModifyIndex = fields.Integer(load_default=0, allow_none=True)


class _TxnResult(_Answer):
    KV = fields.Nested(_KVResult, load_default=None, allow_none=True)


class TxnResults(_Answer):
    """A 200: what each op read or wrote (only KV ops here)."""

    Results = fields.List(fields.Nested(_TxnResult), load_default=list, allow_none=True)


class SessionCreated(_Answer):
    ID = fields.String(required=True, validate=validate.Length(min=1))


_errors, _results, _session = TxnErrors(), TxnResults(), SessionCreated()
_key_names = fields.List(fields.String())


def txn_errors(resp: Response) -> list[tuple[int | None, str]]:
    """(op index, why) of each op a refused transaction names."""
    data = _read(resp, _errors, "a transaction's errors", doubtful=resp.doubtful)
    return [(e["OpIndex"], e["What"]) for e in data["Errors"] or []]


def txn_indexes(resp: Response) -> dict[str, int]:
    """The ModifyIndex of each key an applied transaction wrote."""
    data = _read(resp, _results, "a transaction's results", doubtful=True)
    return {
        r["KV"]["Key"]: r["KV"]["ModifyIndex"] or 0
        for r in data["Results"] or []
        if r["KV"] is not None
    }


def session_id(resp: Response) -> str:
    try:
        return str(_read(resp, _session, "a session's creation")["ID"])
    except ConsulError:
        raise ConsulError("Consul answered a session creation without a session ID") from None


def key_names(resp: Response, what: str) -> list[str]:
    """A `?keys` listing: the key names, each text."""
    try:
        names = _key_names.deserialize(_json(resp, what))
    except ValidationError as exc:
        raise ConsulError(f"Consul sent a key list for {what} that could not be read: "
                          f"{exc.messages}") from None
    return list(names)


def _read(resp: Response, schema: Schema, what: str, doubtful: bool = False) -> Any:
    try:
        return schema.load(_json(resp, what, doubtful))
    except ValidationError as exc:
        raise ConsulError(
            f"Consul sent {what} that could not be read: {exc.messages}", doubtful=doubtful
        ) from None


def _json(resp: Response, what: str, doubtful: bool = False) -> Any:
    try:
        return resp.json()
    except (ValueError, RecursionError) as exc:
        raise ConsulError(
            f"Consul sent {what} that is not JSON: {exc}", doubtful=doubtful
        ) from None
