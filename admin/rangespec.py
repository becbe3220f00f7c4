"""Ranges for `create`: parsed from `--range` specs or a JSON file, validated by the very
function the plugin uses to read a pool key, and encoded in the seed's wire format."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from marshmallow import ValidationError

from ..allocator.ranges import IPRange
from ..allocator.schemas import IPRangeSchema, describe, load_ranges
from ..allocator.usage import overlapping
from .errors import UsageError

RANGE_SPEC_HELP = (
    "SUBNET[,START-END][,gw=GATEWAY]: e.g. 10.0.20.0/23,10.0.21.100-10.0.21.150,gw=10.0.20.1. "
    "start=IP and end=IP set one bound alone. Without bounds the whole subnet is used "
    "(minus network and broadcast addresses), as host-local does."
)

_NAMED = {"gw": "gateway", "gateway": "gateway", "start": "rangeStart", "end": "rangeEnd"}


def parse_spec(spec: str) -> dict[str, str]:
    """One `--range` value to a wire dict of strings; the schema checks the addresses."""
    parts = [p.strip() for p in spec.split(",")]
    if not parts[0]:
        raise UsageError(f"--range {spec!r}: it must start with a subnet such as 10.0.20.0/23")
    out = {"subnet": parts[0]}

    def put(field: str, value: str) -> None:
        if not value:
            raise UsageError(f"--range {spec!r}: {field} is empty")
        if field in out:
            raise UsageError(f"--range {spec!r}: {field} is given twice")
        out[field] = value

    for part in parts[1:]:
        key, sep, value = part.partition("=")
        if sep:
            field = _NAMED.get(key.strip().lower())
            if field is None:
                raise UsageError(
                    f"--range {spec!r}: unknown item {part!r}; expected START-END, start=IP, "
                    "end=IP or gw=IP"
                )
            put(field, value.strip())
        elif "-" in part:
            start, _, end = part.partition("-")
            put("rangeStart", start.strip())
            put("rangeEnd", end.strip())
        else:
            raise UsageError(
                f"--range {spec!r}: cannot read {part!r}; expected START-END or gw=GATEWAY"
            )
    # Per-spec validation only to name the faulty --range in the message; `encode` below runs
    # the plugin's own loader on the exact bytes written.
    try:
        IPRangeSchema().load(out)
    except ValidationError as exc:
        raise UsageError(f"--range {spec!r}: {describe(exc.messages)}") from None
    return out


def read_json(source: str) -> list[Any]:
    """The wire array from a file, or from stdin for `-`."""
    try:
        raw = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read --ranges-json {source!r}: {exc.strerror}") from None
    what = "stdin" if source == "-" else repr(source)
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"--ranges-json {what} is not valid JSON: {exc}") from None
    if not isinstance(data, list):
        raise UsageError(
            f"--ranges-json {what} must hold a JSON array of IP Range objects "
            '(e.g. [{"subnet": "10.0.20.0/23"}])'
        )
    return data


def encode(wire: list[Any]) -> tuple[bytes, list[IPRange]]:
    """Validate with the plugin's loader and return the normalised value to write.

    The value is re-encoded from the parsed ranges: subnets without host bits, explicit
    rangeStart/rangeEnd, only the seed's four keys; so every reader sees the same pool.
    """
    try:
        ranges = load_ranges(json.dumps(wire).encode())
    except ValueError as exc:
        raise UsageError(f"invalid ranges: {exc}") from None
    clashes = overlapping(ranges)
    if clashes:
        i, j = clashes[0]
        raise UsageError(
            f"ranges {i + 1} ({ranges[i].start}-{ranges[i].end}) and {j + 1} "
            f"({ranges[j].start}-{ranges[j].end}) overlap: give each address to one range only"
        )
    value = json.dumps([r.to_wire() for r in ranges]).encode()
    try:
        load_ranges(value)  # spelled out (rangeStart, rangeEnd) it may pass a pool key's limit
    except ValueError as exc:
        raise UsageError(f"invalid ranges: {exc}") from None
    return value, ranges
