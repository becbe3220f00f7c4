"""The allocator's write rules over the in-memory KV (no Consul): fenced claims, rollbacks that
remove only this call's bytes, lost replies, and fence sweeps. tests/e2e/test_safety.py proves the
same rules against a real Consul."""

from __future__ import annotations

import ipaddress
import json

import pytest
from ipam_da_consul.allocator.allocate import FENCE_TTL, Allocator, Attachment
from ipam_da_consul.allocator.layout import Layout
from ipam_da_consul.allocator.pool import Pool, parse_pool
from ipam_da_consul.allocator.schemas import dump_fence
from ipam_da_consul.allocator.store import KVEntry

from tests.support.memkv import HeldBack, MemKV

RANGES = json.dumps([{"subnet": "10.0.0.0/24"}]).encode()
IP1, IP2 = ipaddress.ip_address("10.0.0.1"), ipaddress.ip_address("10.0.0.2")
LAYOUT = Layout()


def kv_with_pool() -> MemKV:
    kv = MemKV()
    kv.put("ipam/p", RANGES)
    return kv


def allocator(kv, ifname: str = "eth0", call: str = "call-1", network: str = "net") -> Allocator:
    return Allocator(kv, LAYOUT, "host-a", attachment=Attachment(network, "ctr", ifname), call=call)


def pool(kv) -> Pool:
    return parse_pool(LAYOUT, "p", kv.list("ipam/p"))


def test_claim_writes_the_attachment_and_this_calls_nonce():
    kv = kv_with_pool()
    a = allocator(kv)
    claim = a.claim(pool(kv), IP1)
    assert claim.won and claim.index == kv.get("ipam/p/10.0.0.1").modify_index
    assert json.loads(kv.get("ipam/p/10.0.0.1").value) == {
        "target": "ctr", "ifname": "eth0", "host": "host-a", "network": "net", "call": "call-1",
        "at": round(a.started_at, 3)}


def test_a_lost_claim_folds_the_holder_into_the_pool():
    kv = kv_with_pool()
    kv.put("ipam/p/10.0.0.1", b'{"target": "other"}')
    p = pool(kv)
    p.discard(IP1)  # as a stale cached copy would have it
    claim = allocator(kv).claim(p, IP1)
    assert not claim.won and not claim.doubtful
    assert p.held[IP1].target == "other"


def test_a_resend_that_finds_our_own_write_has_won():
    # The first send applied but its reply was lost; the resend loses the compare to ourselves.
    kv = kv_with_pool()
    a = allocator(kv)
    first = a.claim(pool(kv), IP1)
    again = a.claim(pool(kv), IP1)  # the same call: the same bytes
    assert first.won and again.won and again.index == first.index


def test_rollback_of_a_sibling_interface_never_removes_ours():
    """eth0 and eth1 of one container race for one address; eth0 wins. eth1's rollback must
    leave eth0's key alone, though both name the container."""
    kv = kv_with_pool()
    eth0, eth1 = allocator(kv, "eth0", "call-0"), allocator(kv, "eth1", "call-1")
    won = eth0.claim(pool(kv), IP1)
    lost = eth1.claim(pool(kv), IP1)
    assert won.won and not lost.won
    assert eth1.undo(lost) is False
    assert kv.get("ipam/p/10.0.0.1") is not None
    assert eth0.undo(won) is True  # the winner's own rollback does remove it
    assert kv.get("ipam/p/10.0.0.1") is None


def test_another_call_of_the_same_attachment_never_removes_our_write():
    kv = kv_with_pool()
    ours = allocator(kv, call="call-a").claim(pool(kv), IP1)
    theirs = allocator(kv, call="call-b")
    mirror = ours.__class__(ours.key, ours.ip, theirs.value(), None)
    assert theirs.undo(mirror) is False
    assert kv.get(ours.key) is not None


def test_take_over_rollback_restores_only_over_our_bytes():
    kv = kv_with_pool()
    kv.put("ipam/p/10.0.0.1", b'{"target": "old"}')
    p = pool(kv)
    a = allocator(kv)
    claim = a.take_over(p, p.held[IP1])
    assert claim.won and claim.previous == b'{"target": "old"}'
    kv.put("ipam/p/10.0.0.1", b'{"target": "newer"}')  # re-allocated again since
    assert a.undo(claim) is False
    assert kv.get("ipam/p/10.0.0.1").value == b'{"target": "newer"}'


def test_a_write_held_back_past_the_fence_never_applies():
    kv = kv_with_pool()
    stuck = HeldBack(kv, TimeoutError("no answer before the read timeout"))
    with pytest.raises(TimeoutError):
        allocator(stuck).claim(pool(kv), IP1)
    allocator(kv, call="del").raise_fence("DEL")  # the runtime's cleanup DEL
    assert stuck.kept is not None
    assert stuck.release().failed == 0  # it arrives late: the fence check fails
    assert kv.get("ipam/p/10.0.0.1") is None


def test_without_the_fence_the_held_back_write_would_apply():
    kv = kv_with_pool()
    stuck = HeldBack(kv, TimeoutError("no answer before the read timeout"))
    with pytest.raises(TimeoutError):
        allocator(stuck).claim(pool(kv), IP1)
    assert stuck.release().ok  # the hazard the fence exists for


def test_an_add_after_a_del_of_the_same_attachment_goes_behind_the_fence():
    kv = kv_with_pool()
    allocator(kv, call="del").raise_fence("DEL")
    writes = kv.writes
    claim = allocator(kv, call="restart").claim(pool(kv), IP1)
    assert claim.won
    assert kv.writes - writes == 2  # one try against "no fence", one behind it


def test_fences_are_per_network_container_and_interface():
    layout = Layout("x/")
    keys = {
        layout.fence_key("net-a", "c", "eth0"),
        layout.fence_key("net-b", "c", "eth0"),
        layout.fence_key("net-a", "c", "eth1"),
        layout.fence_key("net/odd", "c", ""),
    }
    assert len(keys) == 4
    assert all(k.startswith("x/.fences/") and k.count("/") == 4 for k in keys)


def test_sweep_removes_only_expired_fences():
    kv = kv_with_pool()
    old = LAYOUT.fence_key("net", "gone", "eth0")
    new = LAYOUT.fence_key("net", "recent", "eth0")
    other = LAYOUT.fence_key("net-b", "gone", "eth0")
    kv.put(old, dump_fence(1000.0, "h", "DEL"))
    kv.put(new, dump_fence(1000.0 + FENCE_TTL, "h", "DEL"))
    kv.put(other, dump_fence(1000.0, "h", "DEL"))
    kv.put(LAYOUT.fence_key("net", "unreadable", "eth0"), b"?")
    assert allocator(kv).sweep_fences("net", now=1000.0 + FENCE_TTL + 1) == 1
    assert kv.get(old) is None and kv.get(new) is not None and kv.get(other) is not None


def test_scoped_key_names_are_invalid_allocations():
    from ipam_da_consul.allocator.errors import InvalidPool
    from ipam_da_consul.allocator.pool import parse_held

    with pytest.raises(InvalidPool, match="plain IP address"):
        parse_held(KVEntry("ipam/p/fd00:9::10%x", b'{"target": "t"}', 5), "ipam/p/")
