"""The allocator's write rules over the in-memory KV (no Consul): fenced claims recorded in the
ledger before they are sent, voids that remove only a call's own bytes, take-overs undone only
while their holder lives, resent writes that stay in doubt, one address under one key whatever
its spelling, fences tied to sessions. tests/e2e/test_safety.py proves the same rules against a
real Consul."""

from __future__ import annotations

import ipaddress
import json

import pytest
from ipam_da_consul.allocator.allocate import Allocator, Attachment
from ipam_da_consul.allocator.errors import InvalidPool
from ipam_da_consul.allocator.layout import Layout, key_name, spellings
from ipam_da_consul.allocator.ledger import MemoryLedger
from ipam_da_consul.allocator.pool import Pool, parse_held, parse_pool
from ipam_da_consul.allocator.store import KVEntry, StoreError, TxnResult
from ipam_da_consul.cni.state import MemorySessions

from tests.support.memkv import HeldBack, MemKV

RANGES = json.dumps([{"subnet": "10.0.0.0/24"}]).encode()
IP1, IP2 = ipaddress.ip_address("10.0.0.1"), ipaddress.ip_address("10.0.0.2")
LAYOUT = Layout()
LOST_REPLY = StoreError("no answer before the read timeout", doubtful=True)


def kv_with_pool(ranges: bytes = RANGES) -> MemKV:
    kv = MemKV()
    kv.put("ipam/p", ranges)
    return kv


def allocator(
    kv, ifname: str = "eth0", call: str = "call-1", network: str = "net", target: str = "ctr",
    ledger: MemoryLedger | None = None, sessions: MemorySessions | None = None,
) -> Allocator:
    return Allocator(
        kv, LAYOUT, "host-a", attachment=Attachment(network, target, ifname), call=call,
        ledger=ledger, sessions=sessions,
    )


def pool(kv) -> Pool:
    return parse_pool(LAYOUT, "p", kv.list("ipam/p"))


def test_claim_writes_the_attachment_and_this_calls_nonce():
    kv = kv_with_pool()
    a = allocator(kv)
    claim = a.claim(pool(kv), IP1)
    assert claim.won and claim.state == "held" and not claim.resent
    assert json.loads(kv.get("ipam/p/10.0.0.1").value) == {
        "target": "ctr", "ifname": "eth0", "host": "host-a", "network": "net", "call": "call-1"}
    assert a.ledger.claims() == [claim]


def test_the_claim_is_in_the_ledger_before_the_write_is_sent():
    kv = kv_with_pool()
    ledger = MemoryLedger()
    seen = []
    kv.before_write = lambda key: seen.append([(c.key, c.state) for c in ledger.claims()])
    allocator(kv, ledger=ledger).claim(pool(kv), IP1)
    assert seen and all(s == [("ipam/p/10.0.0.1", "sent")] for s in seen)


def test_a_lost_claim_folds_the_holder_into_the_pool_and_leaves_no_claim():
    kv = kv_with_pool()
    kv.put("ipam/p/10.0.0.1", b'{"target": "other"}')
    p = pool(kv)
    p.discard(IP1)  # as a stale cached copy would have it
    a = allocator(kv)
    claim = a.claim(p, IP1)
    assert not claim.won and claim.state == "lost"
    assert p.held[IP1].target == "other"
    assert a.ledger.claims() == []


def test_a_resend_that_finds_our_own_write_has_won_and_stays_suspect():
    # The first send applied but its reply was lost; the resend loses the compare to ourselves.
    kv = kv_with_pool()
    a = allocator(kv)
    first = a.claim(pool(kv), IP1)
    again = a.claim(pool(kv), IP1)  # the same call: the same bytes
    assert first.won and again.won and again.resent and not again.settled


def test_a_lost_reply_leaves_the_claim_in_doubt():
    kv = kv_with_pool()
    stuck = HeldBack(kv, LOST_REPLY)
    a = allocator(stuck)
    with pytest.raises(StoreError):
        a.claim(pool(kv), IP1)
    assert [c.state for c in a.ledger.claims()] == ["doubt"]
    assert a.unsettled() == a.ledger.claims()


def test_a_refused_write_leaves_no_claim():
    kv = kv_with_pool()
    refused = HeldBack(kv, StoreError("HTTP 403 Permission denied", 403))
    a = allocator(refused)
    with pytest.raises(StoreError):
        a.claim(pool(kv), IP1)
    assert a.ledger.claims() == []


def test_void_of_a_sibling_interface_never_removes_ours():
    """eth0 and eth1 of one container race for one address; eth0 wins. eth1's void must leave
    eth0's key alone, though both name the container."""
    kv = kv_with_pool()
    eth0, eth1 = allocator(kv, "eth0", "call-0"), allocator(kv, "eth1", "call-1")
    won = eth0.claim(pool(kv), IP1)
    lost = eth1.claim(pool(kv), IP1)
    assert won.won and not lost.won
    eth1.void([lost], "rollback")
    assert kv.get("ipam/p/10.0.0.1") is not None
    eth0.void([won], "rollback")  # the winner's own rollback does remove it
    assert kv.get("ipam/p/10.0.0.1") is None
    assert eth0.ledger.claims() == []


def test_another_call_of_the_same_attachment_never_removes_our_write():
    kv = kv_with_pool()
    ours = allocator(kv, call="call-a").claim(pool(kv), IP1)
    theirs = allocator(kv, call="call-b")
    mirror = ours.__class__(ours.key, theirs.value(), None, "call-b", "doubt")
    theirs.void([mirror], "void")
    assert kv.get(ours.key) is not None


def test_take_over_rollback_restores_only_over_our_bytes():
    kv = kv_with_pool()
    kv.put("ipam/p/10.0.0.1", b'{"target": "old"}')
    p = pool(kv)
    a = allocator(kv)
    claim = a.take_over(p, p.held[IP1])
    assert claim.won and claim.previous == b'{"target": "old"}'
    kv.put("ipam/p/10.0.0.1", b'{"target": "newer"}')  # re-allocated again since
    a.void([claim], "rollback")
    assert kv.get("ipam/p/10.0.0.1").value == b'{"target": "newer"}'


def old_holder(kv: MemKV) -> bytes:
    value = json.dumps({"target": "old", "ifname": "eth0", "network": "net"}).encode()
    kv.put("ipam/p/10.0.0.1", value)
    return value


def test_take_over_rollback_gives_the_address_back_to_a_live_holder():
    kv = kv_with_pool()
    value = old_holder(kv)
    p = pool(kv)
    a = allocator(kv, target="new")
    claim = a.take_over(p, p.held[IP1])
    assert claim.holder_fence == LAYOUT.fence_key("net", "old", "eth0")
    a.void([claim], "rollback")
    assert kv.get("ipam/p/10.0.0.1").value == value


def test_take_over_rollback_never_resurrects_a_deleted_holder():
    """The holder is being stopped; its DEL raises its fence, finds the key no longer its own and
    returns 0. The taking ADD then fails on a later pool: giving the key back would hold the
    address for a container that no longer exists."""
    kv = kv_with_pool()
    old_holder(kv)
    p = pool(kv)
    a = allocator(kv, target="new")
    claim = a.take_over(p, p.held[IP1])
    allocator(kv, target="old", call="del").raise_fence("DEL")  # the holder's DEL
    a.void([claim], "rollback")
    assert kv.get("ipam/p/10.0.0.1") is None


def test_a_resent_write_that_won_is_fenced_before_its_rollback():
    """The first send is held by a follower; the resend wins. Rolling back must raise the fence
    first, or the first send re-creates the key once it is deleted."""
    kv = kv_with_pool()

    class Resent:
        def __init__(self) -> None:
            self.kept: list = []

        def __getattr__(self, name: str):
            return getattr(kv, name)

        def txn(self, ops):
            self.kept = self.kept or list(ops)  # the first send, which a follower holds
            result = kv.txn(ops)
            return TxnResult(result.failed, result.indexes, True, result.why)

    resent = Resent()
    a = allocator(resent)
    claim = a.claim(pool(kv), IP1)
    assert claim.won and claim.resent
    a.void([claim], "rollback")
    assert kv.get("ipam/p/10.0.0.1") is None
    assert kv.txn(resent.kept).failed == 0  # the late first send: the fence stops it
    assert kv.get("ipam/p/10.0.0.1") is None


def test_a_write_held_back_past_the_fence_never_applies():
    kv = kv_with_pool()
    stuck = HeldBack(kv, LOST_REPLY)
    with pytest.raises(StoreError):
        allocator(stuck).claim(pool(kv), IP1)
    allocator(kv, call="del").raise_fence("DEL")  # the runtime's cleanup DEL
    assert stuck.kept is not None
    assert stuck.release().failed == 0  # it arrives late: the fence check fails
    assert kv.get("ipam/p/10.0.0.1") is None


def test_without_the_fence_the_held_back_write_would_apply():
    kv = kv_with_pool()
    stuck = HeldBack(kv, LOST_REPLY)
    with pytest.raises(StoreError):
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


def test_a_fence_is_tied_to_a_session_and_goes_with_it():
    kv = kv_with_pool()
    sessions = MemorySessions("fences", 4200)
    a = allocator(kv, sessions=sessions)
    a.raise_fence("DEL")
    fence = LAYOUT.fence_key("net", "ctr", "eth0")
    assert kv.locked[fence] == sessions.session
    assert b"at" not in kv.get(fence).value  # no time: older sweepers leave it alone
    assert kv.expire_session(sessions.session) == [fence]
    assert kv.get(fence) is None


def test_a_fence_raised_again_takes_a_new_index_and_the_current_session():
    kv = kv_with_pool()
    sessions = MemorySessions("fences", 4200)
    a = allocator(kv, sessions=sessions)
    a.raise_fence("DEL")
    first, session = a.fence_index, sessions.session
    kv.expire_session(session)  # Consul lost it (or its TTL ran out): the next fence gets another
    kv.sessions["dead"] = 1
    a.raise_fence("DEL")
    assert a.fence_index > first and sessions.session != session
    assert kv.locked[LAYOUT.fence_key("net", "ctr", "eth0")] == sessions.session


def test_without_a_session_the_fence_stays():
    kv = kv_with_pool()
    allocator(kv).raise_fence("DEL")
    assert kv.get(LAYOUT.fence_key("net", "ctr", "eth0")) is not None
    assert not kv.locked


def test_release_deletes_only_the_version_it_read():
    """A DEL replayed late must not delete a key the attachment wrote again since (a re-ADD)."""
    kv = kv_with_pool()
    a = allocator(kv)
    a.claim(pool(kv), IP1)
    read = parse_held(kv.get("ipam/p/10.0.0.1"), "ipam/p/")
    newer = allocator(kv, call="re-add")
    entry = kv.get("ipam/p/10.0.0.1")
    kv.replace("ipam/p/10.0.0.1", newer.value(), entry.modify_index)
    assert a.release(read) is True
    assert json.loads(kv.get("ipam/p/10.0.0.1").value)["call"] == "re-add"


def test_one_address_one_key_whatever_the_spelling():
    """Python before 3.13 spells an IPv4-mapped address ::ffff:a00:a; a write of the canonical
    ::ffff:10.0.0.10 must lose to it, not create a second key for the same address."""
    kv = kv_with_pool(json.dumps([{"subnet": "::ffff:10.0.0.0/120"}]).encode())
    ip = ipaddress.ip_address("::ffff:10.0.0.10")
    assert key_name(ip) == "::ffff:10.0.0.10" and "::ffff:a00:a" in spellings(ip)
    kv.put("ipam/p/::ffff:a00:a", b'{"target": "other"}')
    p = pool(kv)
    assert p.held[ip].key == "ipam/p/::ffff:a00:a"
    p.discard(ip)  # a stale view
    claim = allocator(kv).claim(p, ip)
    assert not claim.won
    assert kv.get("ipam/p/::ffff:10.0.0.10") is None
    assert p.held[ip].target == "other"


@pytest.mark.parametrize("name", ["FD00:5::10", "fd00:0005:0000:0000:0000:0000:0000:0010"])
def test_other_spellings_of_an_ipv6_key_are_checked(name: str):
    kv = kv_with_pool(json.dumps([{"subnet": "fd00:5::/120"}]).encode())
    ip = ipaddress.ip_address("fd00:5::10")
    kv.put(f"ipam/p/{name}", b'{"target": "other"}')
    p = pool(kv)
    p.discard(ip)
    assert not allocator(kv).claim(p, ip).won
    assert kv.get("ipam/p/fd00:5::10") is None


def test_scoped_key_names_are_invalid_allocations():
    with pytest.raises(InvalidPool, match="plain IP address"):
        parse_held(KVEntry("ipam/p/fd00:9::10%x", b'{"target": "t"}', 5), "ipam/p/")
