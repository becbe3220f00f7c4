"""The state folder's files as marshmallow schemas (cni/state.py): an attachment's entry (its
claims, the call that left them, a DEL to finish), a shared session's file, and notes. Each is
read and written through its schema.

Imported by cni/state.py only when a file is read or written: most calls find no entry, and the
module is read on every call.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from marshmallow import EXCLUDE, Schema, ValidationError, fields, post_load, validate

from ..allocator.ledger import Claim


class _Bytes(fields.Field):
    """Bytes kept as text: UTF-8, any other byte as a lone surrogate (so any bytes go)."""

    default_error_messages = {"invalid": "Not a string: {input!r}."}  # noqa: RUF012

    def _serialize(self, value: Any, attr: str | None, obj: Any, **kwargs: Any) -> Any:
        return None if value is None else value.decode("utf-8", "surrogateescape")

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if not isinstance(value, str):
            raise self.make_error("invalid", input=value)
        return value.encode("utf-8", "surrogateescape")


class _File(Schema):
    class Meta:
        unknown = EXCLUDE


class ClaimSchema(_File):
    """One allocation write of the attachment (allocator/ledger.py Claim)."""

    key = fields.String(required=True)
    value = _Bytes(required=True)
    previous = _Bytes(load_default=None, allow_none=True)
    call = fields.String(load_default="")
    state = fields.String(required=True, validate=validate.OneOf(["sent", "held", "doubt"]))
    # Absent in the entries of versions that did not write them yet: their default.
    resent = fields.Boolean(load_default=False)
    holder_fence = fields.String(load_default=None, allow_none=True)
    holder_fence_index = fields.Integer(load_default=0)

    @post_load
    def claim(self, data: dict[str, Any], **kwargs: Any) -> Claim:
        return Claim(**data)


class CallSchema(_File):
    """A call's input, kept to act for it later (cni/state.py Call)."""

    stdin = _Bytes(required=True)
    env = fields.Dict(keys=fields.String(), values=fields.String(), required=True)


class EntrySchema(_File):
    """An attachment's entry: `v` is checked before (another version's shape is not known)."""

    v = fields.Integer(required=True)
    network = fields.String(required=True)
    container = fields.String(required=True)
    ifname = fields.String(required=True)
    claims = fields.List(fields.Nested(ClaimSchema), load_default=list)
    context = fields.Nested(CallSchema, load_default=None, allow_none=True)
    deleting = fields.Nested(CallSchema, load_default=None, allow_none=True)
    attempts = fields.Integer(load_default=0, validate=validate.Range(min=0))


class SessionSchema(_File):
    """A session shared by this host's calls (cni/state.py SessionFile): its ID, the boot it
    was made in, and when (CLOCK_BOOTTIME)."""

    id = fields.String(required=True, validate=validate.Length(min=1))
    boot = fields.String(required=True)
    since = fields.Float(required=True)


class _Note(_File):
    """A note (cni/state.py StateDir.note): a hint or a watermark a reader may miss. `key`
    names what it is about, so a note read under another name is not taken for it."""

    key = fields.String(required=True)


class ObservedNoteSchema(_Note):
    """The Consul index a run saw (reconcile's watermark), in which boot and when
    (CLOCK_BOOTTIME): an age on one clock, never a wall time."""

    index = fields.Integer(required=True, strict=True, validate=validate.Range(min=0))
    boot = fields.String(required=True)
    since = fields.Float(required=True)


class HintNoteSchema(_Note):
    """Where in-process calls last found room in a pool outside their home stripe."""

    address = fields.String(required=True, validate=lambda text: _an_address(text))


def _an_address(text: str) -> None:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise ValidationError(f"not an address: {text!r}") from None


ENTRY, CLAIM, CALL, SESSION = EntrySchema(), ClaimSchema(), CallSchema(), SessionSchema()
OBSERVED, HINT = ObservedNoteSchema(), HintNoteSchema()


def load(schema: Schema, data: Any) -> Any:
    """`data` through `schema`; ValueError saying what is wrong."""
    try:
        return schema.load(data)
    except ValidationError as exc:
        raise ValueError(str(exc.messages)) from None
