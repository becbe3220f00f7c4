"""Unit tests of range arithmetic (allocator/ranges.py): defaults, validation, reserved
addresses, the gap-walking lowest_free, and size()."""

from __future__ import annotations

import ipaddress
import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ipam_da_consul.allocator.ranges import IPRange, first_gap, sorted_ints

from tests.support.properties import examples

ip_address = ipaddress.ip_address

ip = ipaddress.ip_address
net = ipaddress.ip_network


def build(subnet: str, start: str | None = None, end: str | None = None,
          gateway: str | None = None) -> IPRange:
    return IPRange.build(
        net(subnet),
        ip(start) if start else None,
        ip(end) if end else None,
        ip(gateway) if gateway else None,
    )


# -- build: defaults ---------------------------------------------------------------------------
def test_ipv4_defaults_skip_network_and_broadcast() -> None:
    r = build("10.0.20.0/23")
    assert r.start == ip("10.0.20.1")
    assert r.end == ip("10.0.21.254")
    assert r.gateway is None
    assert (r.version, r.prefixlen) == (4, 23)


def test_ipv6_default_end_is_the_last_address() -> None:
    r = build("fd00::/120")
    assert r.start == ip("fd00::1")
    assert r.end == ip("fd00::ff")
    assert r.version == 6


def test_explicit_bounds_are_kept() -> None:
    r = build("10.0.20.0/23", "10.0.21.100", "10.0.21.150", "10.0.20.1")
    assert (r.start, r.end, r.gateway) == (ip("10.0.21.100"), ip("10.0.21.150"), ip("10.0.20.1"))
    assert r.to_wire() == {"subnet": "10.0.20.0/23", "rangeStart": "10.0.21.100",
                           "rangeEnd": "10.0.21.150", "gateway": "10.0.20.1"}


def test_only_one_bound_given_defaults_the_other() -> None:
    assert build("10.0.0.0/24", start="10.0.0.200").end == ip("10.0.0.254")
    assert build("10.0.0.0/24", end="10.0.0.9").start == ip("10.0.0.1")


def test_to_wire_without_gateway_has_no_gateway_key() -> None:
    assert build("10.0.0.0/30").to_wire() == {
        "subnet": "10.0.0.0/30", "rangeStart": "10.0.0.1", "rangeEnd": "10.0.0.2"}


# -- build: validation -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("subnet", "start", "end", "gateway", "needle"),
    [
        ("10.0.0.0/24", "10.0.1.5", None, None, "rangeStart 10.0.1.5 is outside"),
        ("10.0.0.0/24", None, "10.0.1.5", None, "rangeEnd 10.0.1.5 is outside"),
        ("10.0.0.0/24", None, None, "10.0.1.1", "gateway 10.0.1.1 is outside"),
        ("10.0.0.0/24", "10.0.0.50", "10.0.0.40", None, "rangeStart 10.0.0.50 is after rangeEnd"),
        ("10.0.0.0/31", None, None, None, "too small"),
        ("10.0.0.1/32", None, None, None, "too small"),
        ("fd00::/127", None, None, None, "too small"),
        ("fd00::/64", "fd00:0:0:1::1", None, None, "rangeStart fd00:0:0:1::1 is outside"),
    ],
)
def test_build_rejects_inconsistent_pieces(
    subnet: str, start: str | None, end: str | None, gateway: str | None, needle: str
) -> None:
    with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
        build(subnet, start, end, gateway)


def test_smallest_usable_subnets() -> None:
    assert build("10.0.0.0/30").size() == 2
    assert build("fd00::/126").size() == 3


# -- reserved addresses ------------------------------------------------------------------------
def test_reserved_ipv4_network_broadcast_gateway() -> None:
    r = build("10.0.0.0/24", gateway="10.0.0.1")
    assert r.reserved() == {int(ip("10.0.0.0")), int(ip("10.0.0.255")), int(ip("10.0.0.1"))}
    for addr in ("10.0.0.0", "10.0.0.255", "10.0.0.1"):
        assert not r.allocatable(ip(addr))
    assert r.allocatable(ip("10.0.0.2"))


def test_reserved_ipv6_has_no_broadcast() -> None:
    r = build("fd00::/120", gateway="fd00::1")
    assert r.reserved() == {int(ip("fd00::")), int(ip("fd00::1"))}
    assert r.allocatable(ip("fd00::ff"))


def test_contains_is_start_to_end_and_same_family() -> None:
    r = build("10.0.0.0/24", "10.0.0.10", "10.0.0.20")
    assert r.contains(ip("10.0.0.10")) and r.contains(ip("10.0.0.20"))
    assert not r.contains(ip("10.0.0.9")) and not r.contains(ip("10.0.0.21"))
    assert not r.contains(ip("::a00:a"))  # same integer as 10.0.0.10, other family


def test_explicit_range_over_whole_subnet_still_skips_reserved() -> None:
    r = build("10.0.0.0/29", "10.0.0.0", "10.0.0.7", "10.0.0.1")
    assert r.lowest_free([]) == ip("10.0.0.2")
    taken = sorted_ints([ip(f"10.0.0.{i}") for i in range(2, 7)], 4)
    assert r.lowest_free(taken) is None  # .7 is the broadcast address
    assert r.size() == 5


# -- lowest_free ---------------------------------------------------------------------------------
def test_lowest_free_fills_the_lowest_gap() -> None:
    r = build("10.0.0.0/24")
    taken = sorted_ints([ip("10.0.0.1"), ip("10.0.0.2"), ip("10.0.0.4"), ip("10.0.0.9")], 4)
    assert r.lowest_free(taken) == ip("10.0.0.3")


def test_lowest_free_ignores_taken_outside_the_range() -> None:
    r = build("10.0.0.0/24", "10.0.0.100", "10.0.0.102")
    taken = sorted_ints([ip("10.0.0.5"), ip("10.0.0.100"), ip("10.0.0.200")], 4)
    assert r.lowest_free(taken) == ip("10.0.0.101")


def test_lowest_free_skips_gateway_inside_range() -> None:
    r = build("10.0.0.0/24", "10.0.0.10", "10.0.0.12", "10.0.0.11")
    assert r.lowest_free(sorted_ints([ip("10.0.0.10")], 4)) == ip("10.0.0.12")


def test_lowest_free_tolerates_taken_equal_to_reserved() -> None:
    r = build("10.0.0.0/24", gateway="10.0.0.1")
    taken = sorted_ints([ip("10.0.0.1"), ip("10.0.0.2")], 4)
    assert r.lowest_free(taken) == ip("10.0.0.3")


def test_lowest_free_full_range_is_none() -> None:
    r = build("10.0.0.0/24", "10.0.0.10", "10.0.0.12")
    assert r.lowest_free(sorted_ints([ip(f"10.0.0.{i}") for i in (10, 11, 12)], 4)) is None


def test_lowest_free_ipv6_last_address_is_usable() -> None:
    r = build("fd00::/120", "fd00::fe")
    assert r.lowest_free([]) == ip("fd00::fe")
    assert r.lowest_free(sorted_ints([ip("fd00::fe")], 6)) == ip("fd00::ff")
    assert r.lowest_free(sorted_ints([ip("fd00::fe"), ip("fd00::ff")], 6)) is None


def test_lowest_free_in_a_slash_64_is_quick() -> None:
    """The range is walked by gaps between taken addresses, never address by address."""
    r = build("fd00:64::/64", gateway="fd00:64::1")
    first = int(ip("fd00:64::2"))
    taken = list(range(first, first + 20_000))  # a long run, then a hole, then more
    taken += list(range(first + 20_001, first + 30_000))
    started = time.perf_counter()
    assert r.lowest_free(taken) == ip(first + 20_000)
    # The last few addresses of a /64: start near the end.
    tail = build("fd00:64::/64", "fd00:64::ffff:ffff:ffff:fffd")
    end = int(ip("fd00:64::ffff:ffff:ffff:ffff"))
    assert tail.lowest_free([end - 2, end - 1]) == ip(end)
    assert tail.lowest_free([end - 2, end - 1, end]) is None
    assert time.perf_counter() - started < 2.0


def test_lowest_free_in_a_slash_8_is_quick() -> None:
    r = build("10.0.0.0/8")
    base = int(ip("10.0.0.1"))
    taken = list(range(base, base + 100_000))
    started = time.perf_counter()
    assert r.lowest_free(taken) == ip(base + 100_000)
    assert r.lowest_free([]) == ip("10.0.0.1")
    # A range near the end of the /8 with only the last address left.
    near_end = build("10.0.0.0/8", "10.255.255.250")
    last = int(ip("10.255.255.254"))
    assert near_end.lowest_free(list(range(last - 4, last))) == ip(last)
    assert near_end.lowest_free(list(range(last - 4, last + 1))) is None
    assert time.perf_counter() - started < 2.0


@pytest.mark.parametrize(
    ("taken", "start", "gap"),
    [([], 5, 5), ([5, 6, 7, 9], 5, 8), ([5, 6, 7, 9], 4, 4), ([5, 6, 7, 9], 9, 10),
     ([5, 6, 7, 9], 8, 8), ([1, 2, 3], 2, 4)],
)
def test_first_gap(taken: list[int], start: int, gap: int) -> None:
    assert first_gap(taken, start) == gap


@st.composite
def range_and_taken(draw: st.DrawFn) -> tuple[IPRange, list[int]]:
    """A small IPv4 or IPv6 range, maybe with a gateway, and a random set of taken addresses."""
    six = draw(st.booleans())
    prefix = draw(st.integers(122, 126) if six else st.integers(26, 30))
    subnet = net(f"fd00::/{prefix}" if six else f"10.0.0.0/{prefix}")
    first, last = int(subnet.network_address), int(subnet.broadcast_address)
    lo = draw(st.integers(first, last))
    hi = draw(st.integers(lo, last))
    gateway = draw(st.none() | st.integers(first, last))
    addr = ipaddress.IPv6Address if six else ipaddress.IPv4Address
    rng = IPRange.build(subnet, addr(lo), addr(hi), None if gateway is None else addr(gateway))
    taken = sorted(draw(st.sets(st.integers(first - 3, last + 3))))
    return rng, taken


@settings(max_examples=examples(200), deadline=None)
@given(range_and_taken())
def test_lowest_free_matches_a_brute_force_walk(case: tuple[IPRange, list[int]]) -> None:
    rng, taken = case
    busy = set(taken) | rng.reserved()
    expected = next((a for a in range(int(rng.start), int(rng.end) + 1) if a not in busy), None)
    got = rng.lowest_free(taken)
    assert (None if got is None else int(got)) == expected
    free = sum(1 for a in range(int(rng.start), int(rng.end) + 1) if a not in rng.reserved())
    assert rng.size() == free


# -- size ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "size"),
    [
        (("10.0.0.0/24",), 254),
        (("10.0.0.0/24", None, None, "10.0.0.1"), 253),
        (("10.0.20.0/23", "10.0.21.100", "10.0.21.150", "10.0.20.1"), 51),  # gateway outside
        (("10.0.20.0/23", "10.0.21.100", "10.0.21.150", "10.0.21.120"), 50),  # gateway inside
        (("10.0.0.0/29", "10.0.0.0", "10.0.0.7"), 6),  # network and broadcast in the range
        (("10.0.0.0/8",), 2**24 - 2),
        (("fd00::/64",), 2**64 - 1),  # only the network address is reserved
        (("fd00::/64", None, None, "fd00::1"), 2**64 - 2),
    ],
)
def test_size(args: tuple[str | None, ...], size: int) -> None:
    assert build(*args).size() == size  # type: ignore[arg-type]


def test_sorted_ints_filters_family_and_sorts() -> None:
    ips = [ip("10.0.0.3"), ip("fd00::1"), ip("10.0.0.1")]
    assert sorted_ints(ips, 4) == [int(ip("10.0.0.1")), int(ip("10.0.0.3"))]
    assert sorted_ints(ips, 6) == [int(ip("fd00::1"))]


# -- exclude: operator reservations inside a range --------------------------------------------
def excluded_range(subnet: str, *exclude: str, **kw: str) -> IPRange:
    from ipam_da_consul.allocator.schemas import IPRangeSchema

    return IPRangeSchema().load({"subnet": subnet, "exclude": list(exclude), **kw})


def test_exclude_is_never_picked_and_not_counted():
    rng = excluded_range("10.0.0.0/29", "10.0.0.1", "10.0.0.2/31", "10.0.0.4/31")
    # .1-.5 excluded, .6 left (.0 network, .7 broadcast)
    assert rng.size() == 1
    assert str(rng.lowest_free([])) == "10.0.0.6"
    assert rng.lowest_free([int(ip_address("10.0.0.6"))]) is None
    assert not rng.allocatable(ip_address("10.0.0.3"))
    assert rng.to_wire()["exclude"] == ["10.0.0.1/32", "10.0.0.2/31", "10.0.0.4/31"]


def test_exclude_merges_and_counts_a_gateway_inside_once():
    rng = excluded_range("10.0.0.0/24", "10.0.0.0/28", "10.0.0.8/29", gateway="10.0.0.1")
    assert rng.excluded == ((int(ip_address("10.0.0.0")), int(ip_address("10.0.0.15"))),)
    assert rng.size() == 254 - 15  # .1-.15 (the gateway among them) excluded once
    assert str(rng.lowest_free([])) == "10.0.0.16"


def test_a_huge_ipv6_exclusion_costs_no_walk():
    # A walk over 3 * 2**62 excluded addresses would never end: this returns at once.
    rng = excluded_range("fd00:1::/64", "fd00:1::/65", "fd00:1:0:0:8000::/66")
    assert str(rng.lowest_free([])) == "fd00:1:0:0:c000::"
    assert rng.size() == 2**62


@pytest.mark.parametrize(
    ("exclude", "needle"),
    [
        ("10.1.0.0/24", "not inside subnet"),
        ("fd00::1", "not inside subnet"),
        ("10.0.0.1/24", "without host bits"),
        ("10.0.0.5%x", "zone ID"),
        ("nonsense", "CIDR"),
    ],
)
def test_bad_exclusions_are_invalid_ranges(exclude: str, needle: str):
    from ipam_da_consul.allocator.schemas import load_ranges

    with pytest.raises(ValueError, match=needle):
        load_ranges(json.dumps([{"subnet": "10.0.0.0/24", "exclude": [exclude]}]).encode())


# -- counting and numbering free addresses with exclusions (the `spread` pick) -----------------
@st.composite
def range_with_exclusions(draw: st.DrawFn) -> tuple[IPRange, list[int]]:
    """A small range with a gateway maybe, random exclusions (addresses and blocks, some
    overlapping or touching each other, the gateway, the ends of the range or beyond them) and
    random keys, anywhere."""
    six = draw(st.booleans())
    prefix = draw(st.integers(121, 126) if six else st.integers(25, 30))
    subnet = net(f"fd00::/{prefix}" if six else f"10.0.0.0/{prefix}")
    first, last = int(subnet.network_address), int(subnet.broadcast_address)
    lo = draw(st.integers(first, last))
    hi = draw(st.integers(lo, last))
    gateway = draw(st.none() | st.integers(first, last))
    addr = ipaddress.IPv6Address if six else ipaddress.IPv4Address
    exclude = []
    for _ in range(draw(st.integers(0, 12))):
        size = draw(st.integers(0, min(4, prefix_room(subnet))))
        start = draw(st.integers(first, last)) >> size << size
        exclude.append(ipaddress.ip_network((addr(start), subnet.max_prefixlen - size)))
    rng = IPRange.build(
        subnet, addr(lo), addr(hi), None if gateway is None else addr(gateway), exclude
    )
    taken = sorted(draw(st.sets(st.integers(first - 3, last + 3))))
    return rng, taken


def prefix_room(subnet: ipaddress.IPv4Network | ipaddress.IPv6Network) -> int:
    return subnet.max_prefixlen - subnet.prefixlen


def brute_free(rng: IPRange, taken: list[int]) -> list[int]:
    busy = set(taken)
    return [
        a
        for a in range(int(rng.start), int(rng.end) + 1)
        if a not in busy and rng.allocatable(ipaddress.ip_address(a))
    ]


@settings(max_examples=examples(400), deadline=None)
@given(range_with_exclusions())
def test_counting_and_numbering_free_addresses_match_a_brute_force_walk(
    case: tuple[IPRange, list[int]],
) -> None:
    rng, taken = case
    free = brute_free(rng, taken)
    span = range(int(rng.start), int(rng.end) + 1)
    blocked = [a for a in span if not rng.allocatable(ipaddress.ip_address(a))]
    assert rng.size() == len(span) - len(blocked)
    assert [a for a in span if rng.blocks(a)] == blocked
    assert rng.blocked_taken(taken) == sorted(set(taken) & set(blocked))
    assert rng.free_count(taken) == len(free)
    assert rng.free_count(taken, rng.blocked_taken(taken)) == len(free)
    for n, want in enumerate(free):
        assert int(rng.nth_free(taken, n)) == want  # type: ignore[arg-type]
    assert rng.nth_free(taken, len(free)) is None
    assert rng.nth_free(taken, -1) is None
    lowest = rng.lowest_free(taken)
    assert (None if lowest is None else int(lowest)) == (free[0] if free else None)


def test_thirty_thousand_exclusions_cost_a_pick_no_walk() -> None:
    # Every other address of a /16 excluded: 30,000 spans (past what a pool may hold, to make
    # a walk over them show). Counting and numbering are binary searches over them.
    base = int(ip("10.60.0.0"))
    exclude = [net(f"{ip(base + 2 + 2 * i)}/32") for i in range(30_000)]
    rng = IPRange.build(net("10.60.0.0/16"), gateway=ip("10.60.0.1"), exclude=exclude)
    taken = list(range(base + 3, base + 3 + 2 * 10_000, 2))  # the first 10,000 free ones
    blocked = rng.blocked_taken(taken)
    began = time.perf_counter()
    for n in range(200):
        assert rng.free_count(taken, blocked) == 65534 - 1 - 30_000 - 10_000
        got = rng.nth_free(taken, n * 7, blocked)
        assert got == ip(base + 3 + 2 * (10_000 + n * 7))
    # A walk over 30,000 exclusions per count took ~0.6 s per pick.
    assert time.perf_counter() - began < 1.0
