"""The fast reading of a pool folder judges every key exactly as the schema always did.

Reference: the seed's reading, kept here verbatim in spirit: every key name through
ipaddress.ip_address, every value through json.loads and the marshmallow AllocationSchema.
The fast path (allocator/pool.py parse_held, allocator/schemas.py load_allocation) must agree
with it on every value: the same Held, or the same error with the same words. No Consul here;
tests/e2e/test_folder_validation.py runs the same cases through the plugin against a real one.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import math
import time
from dataclasses import fields
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ipam_da_consul.allocator.errors import InvalidPool
from ipam_da_consul.allocator.layout import Layout
from ipam_da_consul.allocator.pool import Held, Pool, _ip_of_key, parse_held, parse_pool
from ipam_da_consul.allocator.schemas import AllocationSchema, describe, load_allocation
from ipam_da_consul.allocator.store import KVEntry
from ipam_da_consul.consul.client import Response
from ipam_da_consul.consul.errors import ConsulError
from ipam_da_consul.consul.kv import _entries
from marshmallow import ValidationError

FOLDER = "ipam/p/"
LAYOUT = Layout()
RANGES = json.dumps([{"subnet": "10.30.0.0/16", "gateway": "10.30.0.1"}]).encode()
_schema = AllocationSchema()


def reference_allocation(raw: bytes) -> dict[str, Any]:
    """The seed's load_allocation: json.loads, then the schema for every value."""
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


@pytest.mark.parametrize("raw", BAD_VALUES, ids=repr)
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
]


@pytest.mark.parametrize("raw", GOOD_VALUES, ids=repr)
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


@settings(max_examples=600, deadline=None)
@given(st.integers(0, 2**128 - 1))
def test_every_canonical_ipv6_name_is_the_address_ipaddress_reads(n: int) -> None:
    for name in (str(ipaddress.IPv6Address(n)), ipaddress.IPv6Address(n).exploded):
        assert _ip_of_key(name) == ipaddress.ip_address(name)
        assert type(_ip_of_key(name)) is ipaddress.IPv6Address


@settings(max_examples=400, deadline=None)
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


@settings(max_examples=300, deadline=None)
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
def sixty_thousand() -> list[KVEntry]:
    first = ipaddress.IPv4Address("10.30.0.2")
    return [KVEntry("ipam/p", RANGES, 5)] + [
        KVEntry(f"{FOLDER}{first + i}", json.dumps({"target": f"fill-{i}"}).encode(), 100 + i)
        for i in range(60_000)
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
    want = {h.ip: h for h in map(reference_held, big[1:] + extra)}
    assert pool.held.keys() == want.keys()
    for ip, h in want.items():
        same_held(pool.held[ip], h)
    ours = pool.ours("me", "eth0", "net")
    assert [h.key for h in ours] == [FOLDER + "10.30.200.1"]
    taken = pool.taken(4)
    assert taken == sorted(int(ip) for ip, h in want.items() if not h.reusable(time.time()))
    assert int(ipaddress.ip_address("10.30.200.2")) not in taken  # cooled down: free again
    assert pool.taken(6) == []
    ip, _ = pool.next_free()
    assert str(ip) == "10.30.200.2"


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
