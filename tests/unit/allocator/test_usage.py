"""Unit tests of allocator/usage.py: per-range counting, reserved addresses, overlaps.

Pure logic, no Consul."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st
from ipam_da_consul.allocator.ranges import IPRange
from ipam_da_consul.allocator.usage import (
    overlapping,
    pool_usage,
    reserved_by,
    reserved_role,
)

from tests.support.properties import examples

ip = ipaddress.ip_address
net = ipaddress.ip_network


def rng(subnet: str, start: str | None = None, end: str | None = None, gw: str | None = None):
    return IPRange.build(
        net(subnet),
        ip(start) if start else None,
        ip(end) if end else None,
        ip(gw) if gw else None,
    )


def test_counts_each_range_and_the_total() -> None:
    a = rng("10.0.20.0/23", "10.0.21.100", "10.0.21.150", "10.0.20.1")  # 51 addresses
    b = rng("10.0.30.0/29", gw="10.0.30.1")  # .1-.6 minus the gateway: 5 addresses
    held = [ip("10.0.21.100"), ip("10.0.21.101"), ip("10.0.30.2")]
    u = pool_usage([a, b], held)
    assert [(r.size, r.allocated, r.free, r.percent) for r in u.ranges] == [
        (51, 2, 49, 3.92),
        (5, 1, 4, 20.0),
    ]
    assert (u.capacity, u.allocated, u.free, u.percent) == (56, 3, 53, 5.36)
    assert u.outside == () and u.reserved == ()


def test_an_address_counts_once_against_the_first_range_holding_it() -> None:
    a = rng("10.0.0.0/24", "10.0.0.10", "10.0.0.20")
    b = rng("10.0.0.0/24", "10.0.0.15", "10.0.0.30")  # overlaps a on .15-.20
    u = pool_usage([a, b], [ip("10.0.0.16"), ip("10.0.0.16"), ip("10.0.0.25")])
    assert [r.allocated for r in u.ranges] == [1, 1]


def test_reserved_and_outside_addresses_are_reported_not_counted() -> None:
    # rangeStart on the network address: the range spans it but never hands it out.
    a = rng("10.0.40.0/24", "10.0.40.0", "10.0.40.50", "10.0.40.20")
    held = [
        ip("10.0.40.0"),  # network, inside the span
        ip("10.0.40.20"),  # gateway, inside the span
        ip("10.0.40.255"),  # broadcast, outside the span but reserved by the subnet
        ip("10.0.40.200"),  # in the subnet, outside the span, not reserved
        ip("192.168.1.1"),  # nowhere near
        ip("10.0.40.7"),
    ]
    u = pool_usage([a], held)
    assert u.ranges[0].allocated == 1
    assert u.reserved == (ip("10.0.40.0"), ip("10.0.40.20"), ip("10.0.40.255"))
    assert u.outside == (ip("10.0.40.200"), ip("192.168.1.1"))
    assert u.ranges[0].size == 49 and u.ranges[0].free == 48  # .0-.50 minus .0 and .20


def test_ipv6_has_no_broadcast_and_mixed_pools_count_by_version() -> None:
    v6 = rng("fd00::/120", gw="fd00::1")
    v4 = rng("10.1.0.0/30")
    last = ip("fd00::ff")
    assert reserved_role(v6, last) is None and v6.allocatable(last)
    u = pool_usage([v4, v6], [last, ip("10.1.0.1"), ip("fd00::1")])
    assert [r.allocated for r in u.ranges] == [1, 1]
    assert u.reserved == (ip("fd00::1"),)
    assert reserved_by([v4, v6], ip("fd00::1")) == (v6, "gateway")
    assert reserved_by([v4, v6], ip("10.1.0.3")) == (v4, "broadcast")
    assert reserved_by([v4, v6], ip("10.1.0.2")) is None


def test_an_empty_pool_is_all_free() -> None:
    u = pool_usage([rng("10.2.0.0/24")], [])
    assert (u.capacity, u.allocated, u.free, u.percent) == (254, 0, 254, 0.0)


def test_overlapping_pairs() -> None:
    ranges = [
        rng("10.0.0.0/24", "10.0.0.1", "10.0.0.10"),
        rng("10.0.0.0/24", "10.0.0.11", "10.0.0.20"),  # adjacent: no overlap
        rng("10.0.0.0/23", "10.0.0.20", "10.0.1.5"),  # shares .20 with the second
        rng("fd00::/120"),  # other version
        rng("10.0.0.0/24", "10.0.0.5", "10.0.0.5"),  # inside the first only
    ]
    assert overlapping(ranges) == [(0, 4), (1, 2)]
    assert overlapping(ranges[:2]) == []


@settings(max_examples=examples(200), deadline=None)
@given(
    st.integers(min_value=24, max_value=30),
    st.sets(st.integers(min_value=0, max_value=255), max_size=80),
    st.booleans(),
)
def test_allocated_plus_free_is_capacity_for_allocatable_addresses(
    prefixlen: int, offsets: set[int], with_gateway: bool
) -> None:
    subnet = net(f"10.9.0.0/{prefixlen}")
    gateway = subnet.network_address + 1 if with_gateway else None
    r = IPRange.build(subnet, gateway=gateway)
    held = [subnet.network_address + (o % subnet.num_addresses) for o in offsets]
    u = pool_usage([r], held)
    allocatable = {h for h in held if r.allocatable(h)}
    assert u.allocated == len(allocatable)
    assert u.allocated + u.free == u.capacity == r.size()
    # Every distinct held address lands in exactly one bucket.
    assert u.allocated + len(u.reserved) + len(u.outside) == len(set(held))
