"""The helper's frames as marshmallow schemas: each request it reads is validated here, each
answer it sends is written here (framing and the shared constants: wire.py; the order of the
frames: client.py). The thin client reads and writes the same frames by hand, with marshal
only: it loads nothing it does not need on every plugin call.

Imported by a handler when its first request comes (marshmallow, ~50 ms), or before by the
helper's preload: never on the helper's way to listening.
"""

from __future__ import annotations

import math
from typing import Any

from marshmallow import EXCLUDE, Schema, ValidationError, fields, validate

from .wire import WIRE_VERSION


class _Exactly(fields.Field):
    """A value of exactly one of these Python types, as marshal gives it back: no conversion."""

    default_error_messages = {"invalid": "Not a {kinds}: {input!r}."}  # noqa: RUF012

    def __init__(self, *kinds: type, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.kinds = kinds

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if type(value) not in self.kinds:
            names = " or ".join(k.__name__ for k in self.kinds)
            raise self.make_error("invalid", kinds=names, input=value)
        return value


def _finite(value: float) -> None:
    if not math.isfinite(value):
        raise ValidationError("Not a finite number.")


class _Frame(Schema):
    class Meta:
        unknown = EXCLUDE


class CallRequest(_Frame):
    """client -> helper: a plugin call. `started` is the client's time.monotonic() at its
    start (the helper reads the same system-wide clock)."""

    v = _Exactly(int, required=True, validate=validate.Equal(WIRE_VERSION))
    stdin = _Exactly(bytes, required=True)
    env = fields.Dict(keys=fields.String(), values=fields.String(), required=True)
    verbose = _Exactly(bool, load_default=False)
    started = _Exactly(float, required=True, validate=_finite)


class Go(_Frame):
    """client -> helper: committed to the helper."""

    go = _Exactly(bool, required=True, validate=validate.Equal(True))


class Ack(_Frame):
    """helper -> client: the call will be run here once the client says go."""

    v = fields.Integer(required=True)
    ack = fields.Boolean(required=True)
    deadline = fields.Float(required=True)
    cniVersion = fields.String(required=True)


class Answer(_Frame):
    """helper -> client: the call's stdout, stderr and exit code."""

    stdout = fields.String(required=True)
    stderr = fields.String(required=True)
    code = fields.Integer(required=True)


class Refused(_Frame):
    """helper -> client: not run here (another wire version)."""

    v = fields.Integer(required=True)
    refused = fields.String(required=True)


class Stats(_Frame):
    """helper -> client: the counters `op: stats` asks for."""

    v = fields.Integer(required=True)
    stats = fields.Dict(keys=fields.String(), values=fields.Integer(), required=True)


_call, _go = CallRequest(), Go()
_ack, _answer, _refused, _stats = Ack(), Answer(), Refused(), Stats()


def load_call(request: dict[str, Any]) -> dict[str, Any]:
    """The call a request asks for; ValueError saying what is wrong with it."""
    try:
        return _call.load(request)
    except ValidationError as exc:
        raise ValueError(f"malformed call request: {exc.messages}") from None


def is_go(frame: object) -> bool:
    return isinstance(frame, dict) and not _go.validate(frame)


def ack(deadline: float, cni_version: str) -> dict[str, Any]:
    frame = {"v": WIRE_VERSION, "ack": True, "deadline": deadline, "cniVersion": cni_version}
    return _ack.dump(frame)


def answer(stdout: str, stderr: str, code: int) -> dict[str, Any]:
    return _answer.dump({"stdout": stdout, "stderr": stderr, "code": code})


def refused(why: str) -> dict[str, Any]:
    return _refused.dump({"v": WIRE_VERSION, "refused": why})


def stats(counters: dict[str, int]) -> dict[str, Any]:
    return _stats.dump({"v": WIRE_VERSION, "stats": counters})
