"""Marshmallow schemas for the KV wire objects: IP Range, Allocation (a held address, and a
release cooling down: a tombstone) and fence. Each is read and written through its schema; a
pool's folder is read faster through allocator/fastpath.py, proven to give the schema's
answer."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

from marshmallow import EXCLUDE, Schema, ValidationError, fields, post_dump, post_load, validate

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

    @post_dump
    def _without_nulls(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        # Absent reads as null: a value holds only what it says.
        return {k: v for k, v in data.items() if v is not None}


class TombstoneSchema(AllocationSchema):
    """A release cooling down: its holder's fields without the call's (`call`, `at`), marked
    by `free_after`. Fields another tool wrote stay as they were: the key is still read by it."""

    class Meta(AllocationSchema.Meta):
        exclude = ("call", "at")

    free_after = fields.Float(required=True)

    @post_dump(pass_original=True)
    def _others_kept(
        self, data: dict[str, Any], original: dict[str, Any], **kwargs: Any
    ) -> dict[str, Any]:
        known = AllocationSchema._declared_fields
        return data | {k: v for k, v in original.items() if k not in known}


class FenceSchema(Schema):
    """A fence's value: who raised it and why, for operators. No time: Consul ends the fence
    with its session; older versions swept fences by an `at` time, and leave these alone."""

    class Meta:
        unknown = EXCLUDE

    host = fields.String(required=True, allow_none=True)
    by = fields.String(required=True)


_range = IPRangeSchema()
_allocation = AllocationSchema()
_tombstone = TombstoneSchema()
_fence = FenceSchema()

# What a pool's keys may hold. Anyone who may write a pool (a tenant with KV write on it) could
# otherwise make every call that reads it hold or compute as much as they like; each limit is
# checked before the value is parsed, and a key over it is an invalid pool (error 117).
#
# An allocation this plugin writes is 200-400 bytes. With every field at its longest legitimate
# size (a 64-character container ID, a 15-character interface, a 253-character host and network
# name, the call's nonce and time, and the runtime's names at their limits: Kubernetes
# namespace 63, pod name 253, sandbox ID 64, UID 36; Nomad's region, namespace, job and group
# names and allocation ID, 253 characters for those without a documented limit) it is 2,370
# bytes. cni/config.py refuses an ADD whose allocation would not fit (after leaving out the
# runtime's names, which are for operators), so the plugin never writes what it would refuse.
MAX_ALLOCATION_BYTES = 4096
# A pool lists a handful of ranges (host-local's range sets do too); 64 is far past any real
# pool and keeps the range-by-range loops of a pick short.
MAX_RANGES = 64
# Exclusions are kept by hand: gateways, routers, virtual IPs, reserved blocks (a block is one
# CIDR, one entry). 1,024 entries is far past any such list, and parses in ~20 ms; 30,000 took
# 0.6 s on every read of the pool.
MAX_EXCLUSIONS = 1024
# 64 ranges without exclusions are ~13 KiB (IPv6); one range at the exclusion limit, IPv6 /128s
# spelled in full, ~48 KiB.
MAX_RANGES_BYTES = 128 * 1024


def load_ranges(raw: bytes) -> list[IPRange]:
    """Parse a pool key's value; ValueError with a readable message when it is unusable."""
    if len(raw) > MAX_RANGES_BYTES:
        raise ValueError(
            f"the value is {len(raw)} bytes, more than the {MAX_RANGES_BYTES} a pool key may hold"
        )
    data = _json(raw)
    if not isinstance(data, list) or not data:
        raise ValueError("expected a non-empty JSON array of IP Range objects")
    if len(data) > MAX_RANGES:
        raise ValueError(f"{len(data)} ranges, more than the {MAX_RANGES} a pool may have")
    out = []
    # One range at a time: marshmallow drops the index of errors raised in post_load.
    for i, item in enumerate(data):
        exclude = item.get("exclude") if isinstance(item, dict) else None
        if isinstance(exclude, list) and len(exclude) > MAX_EXCLUSIONS:
            raise ValueError(
                f"[{i}].exclude: {len(exclude)} exclusions, more than the {MAX_EXCLUSIONS} a "
                "range may have (exclude a block as one CIDR)"
            )
        try:
            out.append(_range.load(item))
        except ValidationError as exc:
            raise ValueError(describe(exc.messages, f"[{i}]")) from exc
    return out


def load_allocation(raw: bytes) -> dict[str, Any]:
    """An allocation value as the schema reads it; ValueError with a readable message when it
    is unusable. Pools are read through allocator/fastpath.py, which gives the same answer
    without the schema for a well-formed value."""
    if len(raw) > MAX_ALLOCATION_BYTES:
        raise ValueError(_too_large(raw))
    data = _json(raw)
    if not isinstance(data, dict):
        raise ValueError('expected a JSON object like {"target": "<container id>"}')
    try:
        return _allocation.load(data)
    except ValidationError as exc:
        raise ValueError(describe(exc.messages)) from exc


def _too_large(raw: bytes) -> str:
    return (
        f"the value is {len(raw)} bytes, more than the {MAX_ALLOCATION_BYTES} an allocation "
        "may hold"
    )


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
    return _dumps(_allocation, body)


# The `free_after` of a release this plugin cools down: no reader's clock ever reaches it, so
# every reader sees the address taken (older versions compared `free_after` with their own
# clock) until Consul deletes the key when its cool-down session ends.
COOLING_UNTIL_DELETED = 4102444800.0  # 2100-01-01


def dump_tombstone(held_value: bytes) -> bytes:
    """A released allocation cooling down: the holder's fields, marked. `held_value` was read
    as an allocation (the Held released)."""
    body = json.loads(held_value)
    mark = {"free_after": COOLING_UNTIL_DELETED}
    out = _dumps(_tombstone, body | mark)
    if len(out) > MAX_ALLOCATION_BYTES:
        # Another tool's value near the limit (ours lose more with `call` and `at` than the
        # mark adds): a release needs only who held it, and must stay readable.
        who = {k: body[k] for k in ("target", "ifname", "host", "network") if k in body}
        out = _dumps(_tombstone, who | mark)
    return out


def dump_fence(host: str | None, reason: str) -> bytes:
    """A fence's value (FenceSchema)."""
    return _dumps(_fence, {"host": host, "by": reason})


def fence_reason(raw: bytes) -> str | None:
    """Why a fence was raised (FenceSchema's "by"); None when its value is unreadable. Its
    host is not needed for that, so a fence written without one still says why."""
    if len(raw) > MAX_ALLOCATION_BYTES:
        return None  # a fence holds ~60 bytes: this one is no fence of ours, and not parsed
    try:
        return str(_fence.load(_json(raw), partial=("host",))["by"])
    except (ValueError, ValidationError, TypeError):
        return None


def _dumps(schema: Schema, body: dict[str, Any]) -> bytes:
    """`body` as its schema writes it, checked first as the schema reads it: never a value
    this plugin would refuse to read back."""
    data = schema.dump(body)
    problems = schema.validate(data)
    if problems:
        raise ValueError(f"not a valid {type(schema).__name__} value: {describe(problems)}")
    return json.dumps(data).encode()


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"not valid JSON ({exc})") from exc
    except RecursionError:
        # Thousands of nested arrays: JSON, but no value a pool key can hold.
        raise ValueError("not valid JSON (nested too deeply)") from None


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
