"""Stripes (allocator/stripes.py): each one run of key names, so a host lists and watches its
block of the pool alone; homes spread over a pool's stripes."""

from __future__ import annotations

import ipaddress
import json
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st
from ipam_da_consul.allocator.layout import key_name
from ipam_da_consul.allocator.schemas import load_ranges
from ipam_da_consul.allocator.stripes import WALK, Stripes, stripe_of

from tests.support.properties import examples


def ranges(*subnets: str) -> list:
    return load_ranges(json.dumps([{"subnet": s} for s in subnets]).encode())


@settings(max_examples=examples(300), deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_an_ipv4_stripe_is_exactly_the_names_with_its_prefix(value: int) -> None:
    ip = ipaddress.IPv4Address(value)
    stripe = stripe_of(ip)
    assert stripe.holds(ip) and key_name(ip).startswith(stripe.prefix)
    other = ipaddress.IPv4Address(value ^ (1 << 8))  # the same last octet, another /24
    assert not key_name(other).startswith(stripe.prefix)


@settings(max_examples=examples(300), deadline=None)
@given(st.integers(0, 2**128 - 1), st.integers(1, 0xFFFF))
def test_an_ipv6_stripe_names_all_but_its_first_address_with_its_prefix(
    value: int, low: int
) -> None:
    base = value >> 16 << 16
    ip = ipaddress.IPv6Address(base + low)
    stripe = stripe_of(ip)
    if ip.ipv4_mapped is not None:
        return  # mapped addresses are striped as IPv4 (below)
    assert (stripe.first, stripe.last) == (base, base + 0xFFFF)
    assert key_name(ip).startswith(stripe.prefix)


@settings(max_examples=examples(200), deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_ipv4_mapped_addresses_are_striped_by_their_ipv4_24(value: int) -> None:
    ip = ipaddress.IPv6Address((0xFFFF << 32) | value)
    stripe = stripe_of(ip)
    assert stripe.last - stripe.first == 255
    assert stripe.prefix.startswith("::ffff:") and key_name(ip).startswith(stripe.prefix)


def test_a_pools_stripes_are_numbered_in_pool_order_and_computed() -> None:
    s = Stripes(ranges("10.0.0.0/16"))
    assert s.count == 256
    assert (s.at(0).prefix, s.at(255).prefix) == ("10.0.0.", "10.0.255.")
    v6 = Stripes(ranges("fd00:20::/64"))
    assert v6.count == 2**48  # never listed
    assert v6.at(v6.count - 1).prefix == "fd00:20::ffff:ffff:ffff:"
    small = Stripes(ranges("10.1.2.0/28"))
    assert small.count == 1 and small.walk("h", "p") == [small.at(0)]


def test_homes_spread_hosts_over_the_stripes_and_walk_on_from_there() -> None:
    s = Stripes(ranges("10.0.0.0/16"))
    homes = Counter(s.home(f"host-{i}", "blue") for i in range(2560))
    assert len(homes) > 240 and max(homes.values()) < 30  # ~10 each
    walk = s.walk("host-1", "blue")
    assert len(walk) == WALK and walk[0] == s.at(s.home("host-1", "blue"))
    assert [w.first for w in walk] == [walk[0].first + 256 * i for i in range(WALK)] or \
        walk[0].prefix == "10.0.253." or walk[0].prefix.startswith("10.0.25")


def test_clipping_keeps_what_is_reserved() -> None:
    [rng] = load_ranges(json.dumps([{"subnet": "10.0.0.0/23", "gateway": "10.0.1.1"}]).encode())
    second = stripe_of(ipaddress.ip_address("10.0.1.7"))
    [part] = second.clip([rng])
    assert (str(part.start), str(part.end)) == ("10.0.1.0", "10.0.1.254")
    assert not part.allocatable(ipaddress.ip_address("10.0.1.1"))  # the gateway
    assert not part.allocatable(ipaddress.ip_address("10.0.1.255"))  # out of the range
    assert part.size() == 254
