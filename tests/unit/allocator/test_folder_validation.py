"""The contract of allocator/fastpath.py: the fast reading of a pool folder judges every key
exactly as the schema always did.

Reference: the seed's reading, kept here verbatim in spirit: every key name through
ipaddress.ip_address, every value through json.loads and the marshmallow AllocationSchema.
The fast path (fastpath.py parse_folder, load_allocation, through allocator/pool.py parse_pool
and parse_held) must agree with it on every value: the same Held, or the same error with the
same words. No Consul here; tests/e2e/test_folder_validation.py runs the same cases through the
plugin against a real one.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import math
import threading
from dataclasses import fields
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ipam_da_consul.allocator import fastpath
from ipam_da_consul.allocator.errors import InvalidPool
from ipam_da_consul.allocator.fastpath import (
    HeldMap,
    _parse_flat,
    all_plain,
    is_plain,
    load_allocation,
    parse_allocations,
)
from ipam_da_consul.allocator.layout import Layout
from ipam_da_consul.allocator.pool import (
    Held,
    Pool,
    _folder_rows,
    _ip_of_key,
    parse_held,
    parse_pool,
)
from ipam_da_consul.allocator.schemas import (
    MAX_ALLOCATION_BYTES,
    AllocationSchema,
    describe,
)
from ipam_da_consul.allocator.store import KVEntry
from ipam_da_consul.consul.client import Response
from ipam_da_consul.consul.errors import ConsulError
from ipam_da_consul.consul.kv import _entries
from marshmallow import ValidationError, validate
from marshmallow import fields as mfields

from tests.support.properties import LONG, examples

FOLDER = "ipam/p/"
LAYOUT = Layout()
RANGES = json.dumps([{"subnet": "10.30.0.0/16", "gateway": "10.30.0.1"}]).encode()
_schema = AllocationSchema()


def reference_allocation(raw: bytes) -> dict[str, Any]:
    """The seed's load_allocation: json.loads, then the schema for every value; and, first,
    the size limit (issue 25: a value too large is never parsed)."""
    if len(raw) > MAX_ALLOCATION_BYTES:
        raise ValueError(
            f"the value is {len(raw)} bytes, more than the {MAX_ALLOCATION_BYTES} an allocation "
            "may hold"
        )
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError('expected a JSON object like {"target": "<container id>"}')
    try:
        return _schema.load(data)
    except ValidationError as exc:
        raise ValueError(describe(exc.messages)) from exc


def reference_held(entry: KVEntry, folder: str = FOLDER) -> Held:
    name = entry.key[len(folder) :]
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        ip = None
    if ip is None or "%" in name:
        raise InvalidPool(
            f"KV key {entry.key!r} in the pool folder is not named after a plain IP address"
        )
    try:
        alloc = reference_allocation(entry.value)
    except ValueError as exc:
        raise InvalidPool(f"KV key {entry.key!r} does not hold a valid Allocation: {exc}") from exc
    return Held(
        ip,
        alloc["target"],
        entry.key,
        entry.modify_index,
        ifname=alloc["ifname"],
        host=alloc["host"],
        value=entry.value,
        network=alloc["network"],
        call=alloc["call"],
        runtime=alloc["runtime"],
        free_after=alloc["free_after"],
        at=alloc["at"],
    )


def outcome(fn: Any, *args: Any) -> tuple[str, Any]:
    try:
        return "ok", fn(*args)
    except (ValueError, InvalidPool) as exc:
        return type(exc).__name__, str(exc)


def same_held(a: Held, b: Held) -> None:
    # dataclass == leaves runtime out (compare=False): every field, one by one.
    for f in fields(Held):
        x, y = getattr(a, f.name), getattr(b, f.name)
        assert x == y and type(x) is type(y), (f.name, x, y)
    assert a == b and hash(a) == hash(b)


# -- every kind of malformed value ----------------------------------------------------------------
BAD_VALUES: list[bytes] = (
    [
        # not an object, or not JSON at all
        b"",
        b"garbage",
        b"null",
        b"7",
        b'"abc"',
        b'["abc"]',
        b"{",
        b'{"target": "a"} x',
        b"\xff\xfe\x00{",  # not UTF-8
        b'{"target": "caf\xe9"}',  # Latin-1, not UTF-8
        b'{"target": NaN}',
        # target
        b"{}",
        b'{"target": ""}',
        b'{"target": null}',
        b'{"target": 7}',
        b'{"target": true}',
        b'{"target": ["a"]}',
        b'{"target": {"a": "b"}}',
        b'{"owner": "x"}',
    ]
    + [
        json.dumps({"target": "a", name: bad}).encode()
        for name in ("ifname", "host", "network", "call")
        for bad in (3, 1.5, True, ["eth0"], {"a": "b"})
    ]
    + [
        b'{"target": "a", "runtime": "web-0"}',
        b'{"target": "a", "runtime": ["web-0"]}',
        b'{"target": "a", "runtime": 7}',
        b'{"target": "a", "runtime": {"K8S_POD_NAME": 7}}',
        b'{"target": "a", "runtime": {"K8S_POD_NAME": null}}',
        b'{"target": "a", "runtime": {"K8S_POD_NAME": {"x": "y"}}}',
    ]
    + [
        b'{"target": "a", "%s": %s}' % (name.encode(), bad)
        for name in ("free_after", "at")
        for bad in (
            b'"soon"',
            b"true",
            b"false",
            b"[1]",
            b'{"t": 1}',
            b"NaN",
            b"Infinity",
            b"-Infinity",
            b"1e400",
            b"1" + b"0" * 400,
        )
    ]
)


def sized(size: int, **fields: Any) -> bytes:
    """A well-formed allocation padded with an unknown field to exactly `size` bytes."""
    head = json.dumps({"target": "a", **fields, "pad": ""}).encode()
    return head[:-2] + b"x" * (size - len(head)) + head[-2:]


# Too large, whatever they hold: never parsed.
TOO_LARGE = [
    sized(MAX_ALLOCATION_BYTES + 1),
    sized(400 * 1024, ifname="eth0"),
    b"garbage" * 600,
    b"[" * 3_000 + b"]" * 3_000,
]
BAD_VALUES += TOO_LARGE


@pytest.mark.parametrize("raw", BAD_VALUES, ids=lambda raw: repr(raw[:60]))
def test_bad_value_fails_as_the_schema_says(raw: bytes) -> None:
    entry = KVEntry(FOLDER + "10.30.1.7", raw, 42)
    expected = outcome(reference_held, entry)
    assert expected[0] == "InvalidPool", expected
    assert outcome(parse_held, entry, FOLDER) == expected


GOOD_VALUES: list[bytes] = [
    b'{"target": "a"}',
    b' {"target": "a"} ',
    b'{"target": "a", "unknown": [1, {"x": null}]}',
    b'{"target": "a", "ifname": null, "host": null, "network": null, "call": null}',
    b'{"target": "a", "ifname": "eth0", "host": "n1", "network": "net", "call": "c0ffee"}',
    b'{"target": "a", "runtime": {}}',
    b'{"target": "a", "runtime": {"K8S_POD_NAME": "web-0"}, "at": 1700000000.123}',
    b'{"target": "a", "free_after": 1700000000}',
    b'{"target": "a", "free_after": 1.5e9, "at": -3}',
    b'{"target": "a", "free_after": "1.5"}',  # the schema's Float reads numeric strings
    b'{"target": "a", "at": 9007199254740993}',  # past 2**53: judged by the schema
    b'{"target": "caf\xc3\xa9 \\u00e9"}',
    b'\xef\xbb\xbf{"target": "bom"}',  # json.loads takes a UTF-8 BOM
    b'{"target": "first", "target": "second"}',
    sized(MAX_ALLOCATION_BYTES),  # as large as a value may be
    sized(MAX_ALLOCATION_BYTES, runtime={"K8S_POD_NAME": "web-0"}),
]


@pytest.mark.parametrize("raw", GOOD_VALUES, ids=lambda raw: repr(raw[:60]))
def test_good_value_reads_as_the_schema_reads_it(raw: bytes) -> None:
    entry = KVEntry(FOLDER + "10.30.1.7", raw, 42)
    status, expected = outcome(reference_held, entry)
    assert status == "ok", expected
    same_held(parse_held(entry, FOLDER), expected)


# -- key names ------------------------------------------------------------------------------------
BAD_NAMES = [
    "not-an-ip",
    "",
    "10.30.1",
    "10.30.1.256",
    "010.30.1.7",
    "10.30.1.7 ",
    " 10.30.1.7",
    "10.30.1.7/32",
    "10.30.1.7%eth0",
    "fd00::1%eth0",
    "fd00::1::2",
    "fd00::g",
    "fd00:0:0:0:0:0:0:0:1",
    "::1.2.3.04",
    "10.30.1.7\x00",
    "10.30.1.\u0667",  # an Arabic-Indic digit
    "fd00::\u0661",
    "sub/10.30.1.7",
]
GOOD_NAMES = [
    "10.30.1.7",
    "0.0.0.0",
    "192.168.9.9",  # outside the pool's ranges: held, never handed out (as before)
    "fd00::1",
    "FD00::1",
    "fd00:0:0:0:0:0:0:1",
    "fd00:0000::0001",
    "::",
    "::1",
    "::ffff:10.30.1.7",
    "::ffff:a1e:107",
    "::10.30.1.7",
    "1:0:0:1::1",
    "1::1:0:0:1",
    "2001:db8::1:0:0:1",
    "fd00:1:2:3:4:5:6:7",
]


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_bad_key_name_fails_as_before(name: str) -> None:
    entry = KVEntry(FOLDER + name, b'{"target": "a"}', 42)
    expected = outcome(reference_held, entry)
    assert expected[0] == "InvalidPool", expected
    assert outcome(parse_held, entry, FOLDER) == expected


@pytest.mark.parametrize("name", GOOD_NAMES, ids=repr)
def test_good_key_name_reads_as_before(name: str) -> None:
    entry = KVEntry(FOLDER + name, b'{"target": "a"}', 42)
    same_held(parse_held(entry, FOLDER), reference_held(entry))


@settings(max_examples=examples(600), deadline=None)
@given(st.integers(0, 2**128 - 1))
def test_every_canonical_ipv6_name_is_the_address_ipaddress_reads(n: int) -> None:
    for name in (str(ipaddress.IPv6Address(n)), ipaddress.IPv6Address(n).exploded):
        assert _ip_of_key(name) == ipaddress.ip_address(name)
        assert type(_ip_of_key(name)) is ipaddress.IPv6Address


@settings(max_examples=examples(400), deadline=None)
@given(st.text(alphabet="0123456789abcdefABCDEF:.%x ", max_size=45))
def test_any_name_reads_as_ipaddress_reads_it(name: str) -> None:
    entry = KVEntry(FOLDER + name, b'{"target": "a"}', 42)
    expected = outcome(reference_held, entry)
    got = outcome(parse_held, entry, FOLDER)
    assert got[0] == expected[0] and (got[0] != "InvalidPool" or got == expected)
    if got[0] == "ok":
        same_held(got[1], expected[1])


# -- hypothesis: values of every shape ---------------------------------------------------------
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**60), 2**60),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)
_field_names = ["target", "ifname", "host", "network", "call", "runtime", "free_after", "at", "x"]
_objects = st.dictionaries(st.sampled_from(_field_names), _values, max_size=8)


@settings(max_examples=examples(300), deadline=None)
@given(_objects | _values)
def test_any_json_value_reads_as_the_schema_reads_it(data: Any) -> None:
    raw = json.dumps(data).encode()
    expected = outcome(reference_allocation, raw)
    got = outcome(load_allocation, raw)
    if expected[0] == "ok" and got[0] == "ok":
        assert got[1].keys() == expected[1].keys()
        for key, want in expected[1].items():
            have = got[1][key]
            assert type(have) is type(want) and (
                have == want or (isinstance(want, float) and math.isnan(want) and math.isnan(have))
            ), (key, have, want)
    else:
        assert got == expected


# -- in a folder of 60,000 ------------------------------------------------------------------------
def sixty_thousand(n: int = 60_000) -> list[KVEntry]:
    first = ipaddress.IPv4Address("10.30.0.2")
    return [KVEntry("ipam/p", RANGES, 5)] + [
        KVEntry(f"{FOLDER}{first + i}", json.dumps({"target": f"fill-{i}"}).encode(), 100 + i)
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def big() -> list[KVEntry]:
    return sixty_thousand()


@pytest.mark.parametrize(
    ("name", "raw"),
    [("10.30.100.100", raw) for raw in BAD_VALUES[::3]]
    + [(name, b'{"target": "a"}') for name in BAD_NAMES[::2]],
    ids=repr,
)
def test_one_bad_key_among_thousands_fails_the_read(
    big: list[KVEntry], name: str, raw: bytes
) -> None:
    # Among 3,000 rather than all 60,000: the same loop, and the unit tier stays in seconds
    # (test_60000_read_as_before reads the whole folder once).
    bad = KVEntry(FOLDER + name, raw, 7)
    entries = [*big[:1_500], bad, *big[1_500:3_000]]
    expected = outcome(reference_held, bad)
    assert outcome(parse_pool, LAYOUT, "p", entries) == expected


def test_60000_read_as_before(big: list[KVEntry]) -> None:
    extra = [
        KVEntry(FOLDER + "10.30.200.1", b'{"target": "me", "ifname": "eth0"}', 9),
        KVEntry(FOLDER + "10.30.200.2", b'{"target": "gone", "free_after": 1}', 9),
        KVEntry(FOLDER + "10.30.200.3", b'{"target": "cool", "free_after": 1e12}', 9),
        KVEntry(FOLDER + "192.168.0.1", b'{"target": "outside"}', 9),
    ]
    pool = parse_pool(LAYOUT, "p", big + extra)
    every = {ipaddress.ip_address(e.key[len(FOLDER) :]): e for e in big[1:] + extra}
    assert pool.taken(4) == live(every, 4)  # from the rows, before any Held is made
    assert pool.held.keys() == every.keys()
    # Each Held against the schema's reading: of every key in the long profile, of every 20th
    # (and the odd ones) in the short one, for the schema takes most of this test's time.
    compared = big[1:] if LONG else big[1::20]
    want = {h.ip: h for h in map(reference_held, compared + extra)}  # a later key wins
    for ip, h in want.items():
        same_held(pool.held[ip], h)
    ours = pool.ours("me", "eth0", "net")
    assert [h.key for h in ours] == [FOLDER + "10.30.200.1"]
    taken = pool.taken(4)
    assert taken == sorted(int(ip) for ip in every)
    # A release cooling down is taken, whatever its free_after says: Consul deletes it.
    assert int(ipaddress.ip_address("10.30.200.2")) in taken
    assert pool.taken(6) == []
    ip, _ = pool.next_free()
    assert str(ip) != "10.30.200.2"


def test_ours_without_index_agrees_with_the_index() -> None:
    held = {
        ipaddress.ip_address(f"10.30.0.{i}"): Held(
            ipaddress.ip_address(f"10.30.0.{i}"),
            f"t{i % 3}",
            f"{FOLDER}10.30.0.{i}",
            i,
            ifname=("eth0", "eth1", None)[i % 3 if i % 2 else 0],
            network=("net", None)[i % 2],
            free_after=1.0 if i == 9 else None,
        )
        for i in range(2, 40)
    }
    plain = Pool("p", [], dict(held))
    cached = Pool("p", [], dict(held)).cache_copy()
    for target in ("t0", "t1", "t2", "none"):
        for ifname in (None, "eth0", "eth1"):
            for network in (None, "net", "other"):
                assert plain.ours(target, ifname, network) == cached.ours(target, ifname, network)
    assert plain._by_target is None  # the pass did not build the index


# -- what Consul sends ----------------------------------------------------------------------------
def test_listing_with_bad_base64_is_a_consul_error() -> None:
    body = json.dumps(
        [{"Key": FOLDER + "10.30.0.2", "Value": "not*base64!", "ModifyIndex": 3}]
    ).encode()
    with pytest.raises(ConsulError, match="could not be read"):
        _entries(Response(200, body, {}), FOLDER)


def test_listing_values_decode_as_base64_does() -> None:
    values = [b"", b"x", b'{"target": "a"}', bytes(range(256))]
    body = json.dumps(
        [
            {
                "Key": f"{FOLDER}10.30.0.{i}",
                "Value": base64.b64encode(v).decode() or None,
                "ModifyIndex": i,
            }
            for i, v in enumerate(values)
        ]
    ).encode()
    got = _entries(Response(200, body, {}), FOLDER)
    assert [e.value for e in got] == values


# -- a whole folder at once (allocator/fastpath.py parse_folder, parse_allocations)
# Values that, joined for one json.loads, would run into each other, in the groups that do it:
# each value is invalid alone, but a pair reads as one object (through an array or a string
# across the join) while a third reads as two, so the count of objects still matches.
RUN_ON_GROUPS: list[list[bytes]] = [
    [b'{"target":"a","k":[1', b"2]}"],
    [b'{"target":"a","k":{"x":1', b"2}}"],
    [b'{"target":"a","k":"', b'"}'],
    [b'{"target":"c"},{"target":"d"}'],
    [b'{"target":"c"}\n,{"target":"d"}'],
    [b'{"target":"a"}\n'],
    [b'{"target":"a",\n"ifname":"eth0"}'],
    [b'{"target":"a"},'],
    [b',{"target":"a"}'],
]
RUN_ON_VALUES = [raw for group in RUN_ON_GROUPS for raw in group]
_raw_values = st.one_of(
    st.sampled_from(GOOD_VALUES + BAD_VALUES + RUN_ON_VALUES),
    # Around the size limit, each side of it.
    st.integers(MAX_ALLOCATION_BYTES - 2, MAX_ALLOCATION_BYTES + 2).map(sized),
    _objects.map(lambda o: json.dumps(o).encode()),
    _objects.map(lambda o: json.dumps(o, separators=(",", ":")).encode()),
    st.fixed_dictionaries(
        {"target": st.text(min_size=1, max_size=8)},
        optional={
            "ifname": st.text(max_size=4),
            "runtime": st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2),
            "free_after": st.none() | st.floats(0, 2e9) | st.integers(0, 2 * 10**9),
        },
    ).map(lambda o: json.dumps(o).encode()),
)


def _same_json(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


@settings(max_examples=examples(500), deadline=None)
@given(
    st.lists(
        st.one_of(_raw_values.map(lambda raw: [raw]), st.sampled_from(RUN_ON_GROUPS)),
        max_size=10,
    ).map(lambda groups: [raw for group in groups for raw in group])
)
def test_values_read_at_once_are_each_value_read_alone(raws: list[bytes]) -> None:
    got = parse_allocations(raws)
    if got is None:
        return
    assert len(got) == len(raws)
    for value, raw in zip(got, raws, strict=True):
        assert _same_json(value, json.loads(raw)), (value, raw)
        status, expected = outcome(reference_allocation, raw)
        assert status == "ok", expected


_numbers = (
    st.floats(allow_nan=True, allow_infinity=True)
    | st.integers(-(2**60), 2**60)
    | st.sampled_from([2**53, -(2**53), 2**53 - 1, 1 - 2**53, True])
)
# Allocations that are mostly well formed, each field sometimes not: a batch is then often
# all plain but one, which is where a check that skips a rule would show.
_near_plain = st.fixed_dictionaries(
    {"target": st.text(max_size=3) | st.just("c0ffee")},
    optional={
        "ifname": st.none() | st.text(max_size=3) | st.integers(0, 3),
        "host": st.none() | st.text(max_size=3),
        "network": st.text(max_size=3) | st.booleans(),
        "call": st.text(max_size=3) | st.none(),
        "at": st.none() | _numbers,
        "free_after": st.none() | _numbers,
        "runtime": st.none()
        | st.dictionaries(st.text(max_size=2), st.text(max_size=2) | st.integers(0, 2), max_size=2),
        "x": _values,
    },
)


@settings(max_examples=examples(600), deadline=None)
@given(
    st.lists(_objects | _values, max_size=6),
    st.lists(_objects, max_size=4),
    st.lists(_near_plain, min_size=1, max_size=6),
)
def test_all_plain_judges_as_is_plain_judges_each(
    items: list[Any], more: list[Any], near: list[Any]
) -> None:
    for batch in (
        items,
        more,
        near,
        [{"target": "a"}, *more],
        [*items, {"target": "a", "at": 1.5}],
        [*near, {"target": "a"}],
        *([item, {"target": "b", "at": 2.5}] for item in near),
    ):
        each = all(type(i) is dict and is_plain(i) for i in batch)
        assert all_plain(batch) is each, batch


def test_a_value_nested_too_deeply_is_an_invalid_allocation() -> None:
    # Deeper than json's recursion allows, within the size limits.
    deep = b'{"target": "a", "x": ' + b"[" * 2_000 + b"]" * 2_000 + b"}"
    assert len(deep) <= MAX_ALLOCATION_BYTES
    entries = [*sixty_thousand(19), KVEntry(FOLDER + "10.30.250.1", deep, 7)]
    status, message = outcome(parse_pool, LAYOUT, "p", entries)
    assert status == "InvalidPool" and "nested too deeply" in message, message
    ranges = [KVEntry("ipam/p", b"[" * 30_000 + b"]" * 30_000, 5)]
    status, message = outcome(parse_pool, LAYOUT, "p", ranges)
    assert status == "InvalidPool" and "nested too deeply" in message, message


@pytest.mark.parametrize("at", [0, 1, 2_999])
@pytest.mark.parametrize("raw", TOO_LARGE[:2], ids=lambda raw: f"{len(raw)} bytes")
def test_a_value_too_large_among_thousands_fails_as_key_by_key(
    big: list[KVEntry], at: int, raw: bytes
) -> None:
    bad = KVEntry(f"{FOLDER}10.30.250.1", raw, 7)
    entries = [*big[: 1 + at], bad, *big[1 + at : 3_000]]
    expected = reference_pool(entries)
    assert expected == ("InvalidPool", outcome(reference_held, bad)[1])
    assert "more than the 4096 an allocation may hold" in expected[1]
    assert outcome(parse_pool, LAYOUT, "p", entries) == expected
    assert parse_allocations([e.value for e in entries[1:]]) is None  # never parsed whole


def test_plain_values_take_the_fast_paths() -> None:
    flat = [
        json.dumps({"target": f"t{i}", "ifname": "eth0", "at": 1.5}).encode() for i in range(50)
    ]
    nested = [
        json.dumps({"target": f"t{i}", "runtime": {"K8S_POD_NAME": f"web-{i}"}}).encode()
        for i in range(50)
    ]
    assert _parse_flat(flat) is not None
    assert parse_allocations(flat) == [json.loads(v) for v in flat]
    assert _parse_flat(nested) is None  # a nested object: one parse per value
    assert parse_allocations(nested) == [json.loads(v) for v in nested]
    assert parse_allocations([*flat, b'{"target": 7}']) is None


def reference_pool(entries: list[KVEntry]) -> tuple[str, Any]:
    """Key by key, the first bad one in listing order failing the read."""
    held: dict[Any, Held] = {}
    for entry in entries:
        if entry.key.startswith(FOLDER) and entry.key != FOLDER:
            status, h = outcome(reference_held, entry)
            if status != "ok":
                return status, h
            held[h.ip] = h
    return "ok", held


def live(held: dict[Any, Any], version: int) -> list[int]:
    return sorted(int(ip) for ip in held if ip.version == version)


def same_pool(pool: Pool, held: dict[Any, Held]) -> None:
    # The free space first: looking at every Held would make them all, rows no more.
    for version in (4, 6):
        assert pool.taken(version) == live(held, version)
    assert set(pool.held) == set(held) and len(pool.held) == len(held)
    for ip, h in held.items():
        assert ip in pool.held
        same_held(pool.held[ip], h)


_names = st.one_of(
    st.integers(0, 300).map(lambda i: str(ipaddress.IPv4Address("10.30.0.0") + i)),
    st.integers(0, 300).map(lambda i: str(ipaddress.IPv6Address("fd00::") + i)),
    # Not "": that key is the folder's own, and a listing names a key once.
    st.sampled_from([n for n in GOOD_NAMES + BAD_NAMES if n]),
)


@settings(max_examples=examples(400), deadline=None)
@given(
    st.lists(st.tuples(_names, _raw_values), max_size=10, unique_by=lambda kv: kv[0]),
    st.sampled_from(["v4", "v6", "any"]),
)
def test_a_folder_reads_as_key_by_key(pairs: list[tuple[str, bytes]], kind: str) -> None:
    if kind != "any":
        pairs = [(n, v) for n, v in pairs if (":" in n) == (kind == "v6")]
    entries = [KVEntry("ipam/p", RANGES, 5), KVEntry(FOLDER, b"", 6)] + [
        KVEntry(FOLDER + name, raw, 10 + i) for i, (name, raw) in enumerate(pairs)
    ]
    expected = reference_pool(entries)
    got = outcome(parse_pool, LAYOUT, "p", entries)
    if expected[0] != "ok":
        assert got == expected
        return
    assert got[0] == "ok", got
    same_pool(got[1], expected[1])
    for target in {h.target for h in expected[1].values()}:
        want = sorted(
            (h for h in expected[1].values() if h.owned_by(target, "eth0", "net")),
            key=lambda h: (h.ip.version, int(h.ip)),
        )
        assert got[1].ours(target, "eth0", "net") == want


@pytest.mark.parametrize("at", [0, 1, 2_999])
def test_values_that_would_run_into_each_other_fail_as_key_by_key(
    big: list[KVEntry], at: int
) -> None:
    # Read as one, these three would give three objects for three keys, two of them wrong.
    three = [*RUN_ON_GROUPS[0], *RUN_ON_GROUPS[3]]
    run_on = [KVEntry(f"{FOLDER}10.30.250.{i}", raw, 7) for i, raw in enumerate(three)]
    entries = [*big[: 1 + at], *run_on, *big[1 + at : 3_000]]
    expected = reference_pool(entries)
    assert expected[0] == "InvalidPool"
    assert outcome(parse_pool, LAYOUT, "p", entries) == expected


@settings(max_examples=examples(150), deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["put", "discard", "get", "contains"]),
            st.integers(0, 40),
            st.sampled_from(["t2", "t7", "t9", "t20", "new"]),
        ),
        max_size=25,
    )
)
def test_rows_change_as_a_dict_of_held_changes(ops: list[tuple[str, int, str]]) -> None:
    entries = [KVEntry("ipam/p", RANGES, 5)] + [
        KVEntry(
            f"{FOLDER}10.30.0.{i}",
            json.dumps(
                {"target": f"t{i}", "ifname": "eth0"} | ({"free_after": 1} if i in (7, 9) else {})
            ).encode(),
            100 + i,
        )
        for i in range(2, 30)
    ]
    pool = parse_pool(LAYOUT, "p", entries)
    model = dict(reference_pool(entries)[1])
    for op, n, target in ops:
        ip = ipaddress.IPv4Address("10.30.0.0") + n
        if op == "put":
            h = Held(ip, target, f"{FOLDER}{ip}", 900 + n, ifname="eth0")
            pool.put(h)
            model[ip] = h
        elif op == "discard":
            pool.discard(ip)
            model.pop(ip, None)
        elif op == "get":
            assert pool.held.get(ip) == model.get(ip)
        else:
            assert (ip in pool.held) == (ip in model)
        # Touching one address or one target at a time: the other rows stay rows.
        assert isinstance(pool.held, HeldMap)
        assert sorted(pool.held.live_ints(4)) == live(model, 4)
        assert pool.taken(4) == live(model, 4)
        assert len(pool.held) == len(model)
        for t in {target, "t3"}:
            want = sorted(
                (h for h in model.values() if h.owned_by(t, "eth0")), key=lambda h: int(h.ip)
            )
            assert pool.ours(t, "eth0") == want
    same_pool(pool, model)


def test_a_whole_folder_of_60000_is_kept_as_rows(big: list[KVEntry]) -> None:
    pool = parse_pool(LAYOUT, "p", big)
    assert isinstance(pool.held, HeldMap) and pool.held._rows
    assert len(pool.held._made) == 0  # nothing made until asked for
    pool.next_free()
    pool.ours("fill-7", "eth0")
    assert len(pool.held._made) == 1
    pool.indexed()  # the helper's copy: everything made, the columns let go
    assert pool.held._rows == {} and len(pool.held) == 60_000


def dual_stack(n: int) -> list[KVEntry]:
    v4, v6 = ipaddress.IPv4Address("10.30.0.2"), ipaddress.IPv6Address("fd00::2")
    return [KVEntry("ipam/p", RANGES, 5)] + [
        KVEntry(
            f"{FOLDER}{v4 + i if i % 2 else v6 + i}",
            json.dumps({"target": f"c{i}", "ifname": "eth0"}).encode(),
            100 + i,
        )
        for i in range(n)
    ]


def test_a_dual_stack_folder_is_kept_as_rows_of_each_version() -> None:
    entries = dual_stack(400)
    pool = parse_pool(LAYOUT, "p", entries)
    assert isinstance(pool.held, HeldMap) and len(pool.held._rows) == 2
    want = reference_pool(entries)[1]
    assert pool.taken(4) == live(want, 4) and pool.taken(6) == live(want, 6)
    assert [h.key for h in pool.ours("c3", "eth0")] == [f"{FOLDER}10.30.0.5"]
    assert [h.key for h in pool.ours("c4", "eth0")] == [f"{FOLDER}fd00::6"]
    assert pool.free() == Pool("p", pool.ranges, dict(want)).free()
    same_pool(pool, want)


def test_only_plain_addresses_are_keys() -> None:
    pool = parse_pool(LAYOUT, "p", dual_stack(10))
    plain = ipaddress.IPv6Address("fd00::2")
    others: list[Any] = [
        ipaddress.IPv6Address("fd00::2%eth0"),
        ipaddress.IPv6Interface("fd00::2/64"),
        "fd00::2",
        int(plain),
    ]
    for other in others:
        assert other not in pool.held and pool.held.get(other) is None
    assert pool.held[plain].ip == plain and type(pool.held[plain].ip) is ipaddress.IPv6Address


def test_reading_while_iterating_yields_every_key() -> None:
    pool = parse_pool(LAYOUT, "p", dual_stack(10))
    seen = []
    for ip in pool.held:
        seen.append(ip)
        pool.held.get(ipaddress.IPv4Address("10.30.0.9"))  # made while we iterate
    assert sorted(map(str, seen)) == sorted(map(str, reference_pool(dual_stack(10))[1]))


def test_threads_reading_one_pool_see_every_key(big: list[KVEntry]) -> None:
    # The helper's calls may share a pool that still has rows: a read makes one, and another
    # thread must never see it gone from the rows and not yet made.
    pool = parse_pool(LAYOUT, "p", big[:20_001])
    ips = [ipaddress.IPv4Address("10.30.0.2") + i for i in range(20_000)]
    missed: list[object] = []

    def read(part: int) -> None:
        for ip in ips[part::2] + ips[(part + 1) % 2 :: 2]:
            if pool.held.get(ip) is None or ip not in pool.held:
                missed.append(ip)

    threads = [threading.Thread(target=read, args=(n % 2,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert missed == []


def test_keys_named_twice_read_as_key_by_key() -> None:
    # Consul names a key once; a hand-made listing may not, and reads as the loop read it.
    entries = sixty_thousand(49)
    twice = [entries[0], KVEntry(FOLDER, b"", 6), *entries[1:], KVEntry(FOLDER, b"", 7)]
    assert outcome(parse_pool, LAYOUT, "p", twice)[0] == "ok"
    ranges2 = json.dumps([{"subnet": "10.30.0.0/24"}]).encode()
    pool = parse_pool(LAYOUT, "p", [*entries, KVEntry("ipam/p", ranges2, 8)])
    assert str(pool.ranges[0].subnet) == "10.30.0.0/24" and pool.ranges_index == 8


# Keys around the folder `ipam/p/` in code point order: other pools sharing its prefix sort
# before and after it, and so do the pool key and the folder's own key.
_NEAR = [
    "ipam/p",
    "ipam/p/",
    "ipam/p/1",
    "ipam/p/~",
    "ipam/p/\u00e9",
    "ipam/p//x",
    "ipam/p-v6/1",
    "ipam/p.0/1",
    "ipam/p0/1",
    "ipam/p\u00e9/1",
    "ipam/o/1",
    "ipam/q",
    "ipam/",
]


@settings(max_examples=examples(800), deadline=None)
@given(st.lists(st.sampled_from(_NEAR) | st.text(max_size=9).map(FOLDER.__add__), max_size=9))
def test_the_folder_rows_are_the_keys_that_start_with_the_folder(keys: list[str]) -> None:
    assert _folder_rows(keys, FOLDER) == [i for i, k in enumerate(keys) if k.startswith(FOLDER)]


# -- the fields judged are the schema's -----------------------------------------------------------
class _WithPod(AllocationSchema):
    pod = mfields.String(load_default=None)
    weight = mfields.Float(load_default=None)


def test_a_field_added_to_the_schema_is_judged_by_the_fast_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    added = fastpath.fields_of(_WithPod)
    assert added.text[-1:] == ("pod",) and added.numbers[-1:] == ("weight",)
    monkeypatch.setattr(fastpath, "FIELDS", added)
    schema = _WithPod()
    for data in (
        {"target": "a", "pod": "web-0", "weight": 2},
        {"target": "a", "pod": 7},
        {"target": "a", "weight": "heavy"},
        {"target": "a", "weight": math.inf},
    ):
        try:
            want: Any = schema.load(data)
        except ValidationError:
            want = None
        # Each of these is plain exactly when the schema takes it: a field left unjudged would
        # let the refused ones through.
        assert fastpath.is_plain(data) is (want is not None), data
        if want is not None:
            assert fastpath.plain_allocation(data) == want, data
        assert fastpath.all_plain([{"target": "b"}, data]) is fastpath.is_plain(data)


@pytest.mark.parametrize(
    "field",
    [
        mfields.Integer(load_default=None),
        mfields.List(mfields.String(), load_default=None),
        mfields.String(load_default=None, validate=validate.Length(max=3)),
        mfields.String(required=True),
        mfields.Dict(keys=mfields.String(), values=mfields.Integer(), load_default=None),
        mfields.Float(load_default=None, allow_nan=True),
        mfields.String(load_default=None, data_key="other"),
    ],
    ids=repr,
)
def test_a_field_the_fast_path_cannot_judge_stops_it_from_loading(field: Any) -> None:
    extended = type("Extended", (AllocationSchema,), {"extra": field})
    with pytest.raises(TypeError, match="extra"):
        fastpath.fields_of(extended)


def test_the_fast_path_judges_the_schemas_fields_and_held_carries_them() -> None:
    assert fastpath.fields_of(AllocationSchema) == fastpath.FIELDS
    assert set(fastpath.FIELDS.names) == set(AllocationSchema._declared_fields)
    assert {f.name for f in fields(Held)} == {*fastpath.FIELDS.names, "ip", "key", "index", "value"}
