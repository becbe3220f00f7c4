"""Marshmallow schemas for the KV wire objects: IP Range and Allocation."""

from __future__ import annotations

import ipaddress
import json
import math
from collections.abc import Callable
from itertools import chain, repeat
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
    if len(raw) > MAX_ALLOCATION_BYTES:
        raise ValueError(_too_large(raw))
    data = _json(raw)
    if not isinstance(data, dict):
        raise ValueError('expected a JSON object like {"target": "<container id>"}')
    # Pools are read whole, tens of thousands of values at a time: accept the well-formed case
    # with the schema's own rules in plain Python (tests/unit/allocator/test_folder_validation.py
    # proves they agree) and let marshmallow judge, and word the error, when anything looks off.
    if _is_plain(data):
        return plain_allocation(data)
    try:
        return _allocation.load(data)
    except ValidationError as exc:
        raise ValueError(describe(exc.messages)) from exc


def _is_plain(data: dict[str, Any]) -> bool:
    """The schema would take this object as it is (see load_allocation)."""
    get = data.get
    target = get("target")
    if type(target) is not str or not target:
        return False
    if len(data) == 1:
        return True
    ifname, host, network, call = get("ifname"), get("host"), get("network"), get("call")
    runtime, free_after, at = get("runtime"), get("free_after"), get("at")
    return (
        (ifname is None or type(ifname) is str)
        and (host is None or type(host) is str)
        and (network is None or type(network) is str)
        and (call is None or type(call) is str)
        and (runtime is None or _text_dict(runtime))
        and (free_after is None or _plain_number(free_after))
        and (at is None or _plain_number(at))
    )


def plain_allocation(data: dict[str, Any]) -> dict[str, Any]:
    """What the schema loads from an object `_is_plain` accepted."""
    get = data.get
    free_after, at = get("free_after"), get("at")
    return {
        "target": data["target"],
        "ifname": get("ifname"),
        "host": get("host"),
        "network": get("network"),
        "call": get("call"),
        "runtime": get("runtime"),
        "free_after": None if free_after is None else float(free_after),
        "at": None if at is None else float(at),
    }


def parse_allocations(raws: list[bytes]) -> list[dict[str, Any]] | None:
    """The JSON objects of many values, each as parsed alone and accepted by the schema's
    rules (`_is_plain`); None when any value needs `load_allocation` one at a time, to be
    judged or worded there (or just to be parsed there: one with a byte order mark, say)."""
    n = len(raws)
    if not n:
        return []
    if max(map(len, raws)) > MAX_ALLOCATION_BYTES:
        return None  # `load_allocation` names the first such value, in listing order
    data = _parse_flat(raws) or _parse_each(raws)
    return data if data is not None and _all_plain(data) else None


_NoneType = type(None)
_TEXT_FIELDS = ("ifname", "host", "network", "call")
_NUMBER_FIELDS = ("free_after", "at")


def _all_plain(data: list[Any]) -> bool:
    """`_is_plain` of every item, judged a field at a time across all of them: each pass a
    few C-level maps where a loop would call `_is_plain` 60,000 times (tests/unit/allocator/
    test_folder_validation.py proves the two agree)."""
    if not data:
        return True
    if set(map(type, data)) != {dict}:
        return False
    get = dict.get
    targets = list(map(get, data, repeat("target")))
    if set(map(type, targets)) != {str} or "" in targets:
        return False
    if set(map(len, data)) == {1}:
        return True  # a target and nothing else, as other tools write them
    for name in _TEXT_FIELDS:
        if not set(map(type, map(get, data, repeat(name)))) <= {str, _NoneType}:
            return False
    for name in _NUMBER_FIELDS:
        values = list(map(get, data, repeat(name)))
        kinds = set(map(type, values))
        if not kinds <= {_NoneType, float, int}:
            return False
        if float in kinds and not all(map(math.isfinite, [v for v in values if type(v) is float])):
            return False
        if int in kinds:
            ints = [v for v in values if type(v) is int]
            if not (min(ints) > -_PLAIN_INT and max(ints) < _PLAIN_INT):
                return False
    runtimes = [v for v in map(get, data, repeat("runtime")) if v is not None]
    return not runtimes or (
        set(map(type, runtimes)) == {dict}
        and set(map(type, chain.from_iterable(map(dict.values, runtimes)))) <= {str}
    )


def _parse_flat(raws: list[bytes]) -> list[Any] | None:
    """Objects without a nested object, all parsed by one json.loads of `[v1,\nv2,...]`: a
    fifth of the cost of a parse per value. None when the values are not all such objects.

    Each value is parsed as if alone, for the counts below prove that no value can run into
    the next: a raw newline occurs only between values, so every value starts with `{`, ends
    with `}` and holds no other brace. A value's object can then only end at its own last
    `}`, unless that brace is inside a string; such a string would run on into the newline
    after it, which JSON refuses in a string. So a successful parse has one object per value,
    each the value's own."""
    n = len(raws)
    joined = b",\n".join(raws)
    if (
        joined.count(b"{") != n
        or joined.count(b"}") != n
        or joined.count(b"\n") != n - 1
        or joined.count(b"},\n{") != n - 1
        or joined[:1] != b"{"
        or joined[-1:] != b"}"
    ):
        return None
    try:
        data = json.loads(b"[" + joined + b"]")
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return data if len(data) == n else None  # the length cannot differ (see above)


def _parse_each(raws: list[bytes]) -> list[Any] | None:
    """Every value through the C scanner on its own (as `_json` does first), mapped rather
    than looped: None when any value is not plain UTF-8 JSON from its first byte to its last."""
    try:
        texts = list(map(bytes.decode, raws))
        found = list(map(_scan, texts, repeat(0)))
    except (UnicodeDecodeError, StopIteration, ValueError, RecursionError):
        return None
    if [end for _, end in found] != list(map(len, texts)):
        return None
    return [value for value, _ in found]


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


def _too_large(raw: bytes) -> str:
    return (
        f"the value is {len(raw)} bytes, more than the {MAX_ALLOCATION_BYTES} an allocation "
        "may hold"
    )


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


# The `free_after` of a release this plugin cools down: no reader's clock ever reaches it, so
# every reader sees the address taken (older versions compared `free_after` with their own
# clock) until Consul deletes the key when its cool-down session ends.
COOLING_UNTIL_DELETED = 4102444800.0  # 2100-01-01


def dump_tombstone(held_value: bytes) -> bytes:
    """A released allocation cooling down: the holder's fields, marked."""
    body = json.loads(held_value)
    body.pop("call", None)
    body.pop("at", None)
    mark = {"free_after": COOLING_UNTIL_DELETED}
    out = json.dumps(body | mark).encode()
    if len(out) > MAX_ALLOCATION_BYTES:
        # Another tool's value near the limit (ours lose more with `call` and `at` than the
        # mark adds): a release needs only who held it, and must stay readable.
        who = {k: body[k] for k in ("target", "ifname", "host", "network") if k in body}
        out = json.dumps(who | mark).encode()
    return out


def dump_fence(host: str | None, reason: str) -> bytes:
    """A fence's value: who raised it and why, for operators. No time: Consul ends the fence
    with its session; older versions swept fences by an `at` time, and leave these alone."""
    return json.dumps({"host": host, "by": reason}).encode()


def fence_reason(raw: bytes) -> str | None:
    """Why a fence was raised (dump_fence's "by"); None when its value is unreadable."""
    try:
        by = json.loads(raw).get("by")
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None
    return by if isinstance(by, str) else None


def fence_time(raw: bytes) -> float | None:
    """When a fence was raised; None when its value is unreadable (then it is never swept)."""
    if len(raw) > MAX_ALLOCATION_BYTES:
        return None  # a fence holds ~60 bytes: this one is no fence of ours, and not parsed
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
    except (UnicodeDecodeError, StopIteration, ValueError, RecursionError):
        pass
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
