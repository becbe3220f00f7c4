"""Marshmallow schemas for the KV wire objects: IP Range and Allocation."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable
from typing import Any

from marshmallow import EXCLUDE, Schema, ValidationError, fields, post_load, validate

from .ranges import IPRange


class _ParsedText(fields.Field):
    """A string turned into an ipaddress object by `parse`; any ValueError is 'invalid'."""

    needs_prefix = False

    def parse(self, text: str) -> Any:
        raise NotImplementedError

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if not isinstance(value, str) or (self.needs_prefix and "/" not in value):
            raise self.make_error("invalid", input=value)
        if "%" in value:
            # A zone ID (fe80::1%eth0) names a link, not an address: written as a key it would
            # be a second spelling of an address someone may already hold.
            raise self.make_error("scoped", input=value)
        try:
            return self.parse(value.strip())
        except ValueError as exc:
            raise self.make_error("invalid", input=value) from exc

    def _serialize(self, value: Any, attr: str | None, obj: Any, **kwargs: Any) -> Any:
        return None if value is None else str(value)


class IPAddressField(_ParsedText):
    """An IPv4 or IPv6 address."""

    default_error_messages = {  # noqa: RUF012
        "invalid": "Not a valid IP address: {input!r}.",
        "scoped": "Not a plain IP address: {input!r} has a zone ID ('%...'), which is not allowed.",
    }

    def parse(self, text: str) -> Any:
        return ipaddress.ip_address(text)


class IPNetworkField(_ParsedText):
    """A subnet in CIDR notation; host bits are cleared as host-local does."""

    default_error_messages = {  # noqa: RUF012
        "invalid": "Not a valid subnet in CIDR notation: {input!r}.",
        "scoped": "Not a valid subnet: {input!r} has a zone ID ('%...'), which is not allowed.",
    }
    needs_prefix = True

    def parse(self, text: str) -> Any:
        return ipaddress.ip_network(text, strict=False)


class IPInterfaceField(_ParsedText):
    """An address with its prefix length, e.g. 10.0.21.100/23 (a CNI result's `address`)."""

    default_error_messages = {  # noqa: RUF012
        "invalid": "Not a valid address/prefix: {input!r}.",
        "scoped": "Not a valid address/prefix: {input!r} has a zone ID ('%...').",
    }
    needs_prefix = True

    def parse(self, text: str) -> Any:
        return ipaddress.ip_interface(text)


class ExcludeField(_ParsedText):
    """One reservation inside a range: an address, or a CIDR without host bits."""

    default_error_messages = {  # noqa: RUF012
        "invalid": "Not an IP address or CIDR without host bits: {input!r}.",
        "scoped": "Not a plain address: {input!r} has a zone ID ('%...').",
    }

    def parse(self, text: str) -> Any:
        return ipaddress.ip_network(text, strict=True)


class IPRangeSchema(Schema):
    class Meta:
        unknown = EXCLUDE

    subnet = IPNetworkField(required=True)
    rangeStart = IPAddressField(load_default=None)
    rangeEnd = IPAddressField(load_default=None)
    gateway = IPAddressField(load_default=None)
    # Not in the seed: readers that do not know it see an ordinary range.
    # (marshmallow takes declared fields off the class, so this does not shadow Schema.exclude)
    exclude = fields.List(ExcludeField(), load_default=list)  # type: ignore[assignment]

    @post_load
    def build(self, data: dict[str, Any], **kwargs: Any) -> IPRange:
        for name in ("rangeStart", "rangeEnd", "gateway"):
            ip = data[name]
            if ip is not None and ip.version != data["subnet"].version:
                raise ValidationError(f"{ip} is not the IP version of the subnet", name)
        try:
            return IPRange.build(
                data["subnet"],
                data["rangeStart"],
                data["rangeEnd"],
                data["gateway"],
                data["exclude"],
            )
        except ValueError as exc:
            raise ValidationError(str(exc)) from exc


class AllocationSchema(Schema):
    """`{"target": ...}`; every other field is optional so target-only readers still work.

    `network` is the CNI network name (an attachment is network + container + ifname); `call`
    is a nonce of the call that wrote the key, so a rollback removes only its own write.
    """

    class Meta:
        unknown = EXCLUDE

    target = fields.String(required=True, validate=validate.Length(min=1))
    ifname = fields.String(load_default=None)
    host = fields.String(load_default=None)
    network = fields.String(load_default=None)
    call = fields.String(load_default=None)
    # The runtime's names for the container (K8S_POD_NAME, NOMAD_ALLOC_ID, ...), for operators.
    runtime = fields.Dict(keys=fields.String(), values=fields.String(), load_default=None)
    # A released address cooling down (`reuse_after`): unix time from which it may be reused.
    # Until then the key stays, so readers that know only `target` see it taken.
    free_after = fields.Float(load_default=None)
    # When the call that wrote it started (unix time): a DEL redone late (the helper's journal)
    # spares a key its attachment wrote again after that DEL.
    at = fields.Float(load_default=None)


_range = IPRangeSchema()
_allocation = AllocationSchema()


def load_ranges(raw: bytes) -> list[IPRange]:
    """Parse a pool key's value; ValueError with a readable message when it is unusable."""
    data = _json(raw)
    if not isinstance(data, list) or not data:
        raise ValueError("expected a non-empty JSON array of IP Range objects")
    out = []
    # One range at a time: marshmallow drops the index of errors raised in post_load.
    for i, item in enumerate(data):
        try:
            out.append(_range.load(item))
        except ValidationError as exc:
            raise ValueError(describe(exc.messages, f"[{i}]")) from exc
    return out


def load_allocation(raw: bytes) -> dict[str, Any]:
    data = _json(raw)
    if not isinstance(data, dict):
        raise ValueError('expected a JSON object like {"target": "<container id>"}')
    # Pools are read whole, tens of thousands of values at a time: accept the well-formed case
    # with the schema's own rules in plain Python (tests/unit/allocator/test_folder_validation.py
    # proves they agree) and let marshmallow judge, and word the error, when anything looks off.
    get = data.get
    target, ifname, host, network, call = (
        get("target"),
        get("ifname"),
        get("host"),
        get("network"),
        get("call"),
    )
    runtime, free_after, at = get("runtime"), get("free_after"), get("at")
    if (
        type(target) is str
        and target
        and (ifname is None or type(ifname) is str)
        and (host is None or type(host) is str)
        and (network is None or type(network) is str)
        and (call is None or type(call) is str)
        and (runtime is None or _text_dict(runtime))
        and (free_after is None or _plain_number(free_after))
        and (at is None or _plain_number(at))
    ):
        return {
            "target": target,
            "ifname": ifname,
            "host": host,
            "network": network,
            "call": call,
            "runtime": runtime,
            "free_after": None if free_after is None else float(free_after),
            "at": None if at is None else float(at),
        }
    try:
        return _allocation.load(data)
    except ValidationError as exc:
        raise ValueError(describe(exc.messages)) from exc


# Integers beyond this go to marshmallow: float() of a huge one overflows, and what the schema
# makes of that is its business.
_PLAIN_INT = 1 << 53


def _plain_number(value: Any) -> bool:
    """What fields.Float takes without a question: a finite float, or an int float() keeps
    exact. Not a bool (the schema refuses them), not NaN or infinity (`allow_nan` is off)."""
    kind = type(value)
    if kind is float:
        return bool(value - value == 0.0)  # False for NaN and both infinities
    return kind is int and -_PLAIN_INT < value < _PLAIN_INT


def _text_dict(value: Any) -> bool:
    return type(value) is dict and all(type(v) is str for v in value.values())


def dump_allocation(
    target: str,
    ifname: str | None = None,
    host: str | None = None,
    network: str | None = None,
    call: str | None = None,
    runtime: dict[str, str] | None = None,
    at: float | None = None,
) -> bytes:
    body = {
        "target": target,
        "ifname": ifname,
        "host": host,
        "network": network,
        "call": call,
        "runtime": runtime or None,
        "at": None if at is None else round(at, 3),
    }
    return json.dumps({k: v for k, v in body.items() if v is not None}).encode()


def dump_tombstone(held_value: bytes, free_after: float) -> bytes:
    """A released allocation kept until `free_after`: the holder's fields, marked."""
    body = json.loads(held_value)
    body.pop("call", None)
    body.pop("at", None)
    return json.dumps(body | {"free_after": round(free_after, 3)}).encode()


def dump_fence(at: float, host: str | None, reason: str) -> bytes:
    """A fence's value: when it was raised (unix time) and by whom, for operators and sweeps."""
    return json.dumps({"at": round(at, 3), "host": host, "by": reason}).encode()


def fence_time(raw: bytes) -> float | None:
    """When a fence was raised; None when its value is unreadable (then it is never swept)."""
    try:
        at = json.loads(raw).get("at")
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None
    return float(at) if isinstance(at, int | float) else None


# The C scanner behind json.loads, called directly: a pool's 60,000 values are each a few dozen
# bytes, where json.loads spends most of its time on encoding detection and Python-level
# wrappers. Anything it does not take whole (whitespace, another encoding, an error) goes
# through json.loads, which judges and words the error.
_Scan = Callable[[str, int], tuple[Any, int]]
_scan: _Scan = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def _json(raw: bytes) -> Any:
    try:
        text = raw.decode()
        data, end = _scan(text, 0)
        if end == len(text):
            return data
    except (UnicodeDecodeError, StopIteration, ValueError):
        pass
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"not valid JSON ({exc})") from exc


def describe(messages: Any, path: str = "") -> str:
    """Flatten marshmallow's nested error dict into `field.sub: message` phrases."""
    if isinstance(messages, dict):
        parts = []
        for key, sub in messages.items():
            name = path if key == "_schema" else (f"{path}.{key}" if path else str(key))
            if isinstance(key, int):
                name = f"{path}[{key}]"
            parts.append(describe(sub, name))
        return "; ".join(parts)
    if isinstance(messages, list):
        text = " ".join(str(m) for m in messages)
        return f"{path}: {text}" if path else text
    return f"{path}: {messages}" if path else str(messages)
