"""Undoing a take-over whose holder's DEL had already raised its fence when the take-over read
it (found by the partition test, tests/e2e/test_partition.py, helper mode: "LEAK after DEL").

The holder's DEL raises its fence; the taking ADD then reads that fence, takes the key over and
goes on to a later pool; the DEL lists the pool, finds nothing of its own any more and returns
0; the ADD fails and undoes the take-over. The fence has not moved since the taker read it, so
the undo gave the key back to a container whose DEL had returned 0."""

from __future__ import annotations

import ipaddress
import json

from ipam_da_consul.allocator.allocate import Allocator, Attachment
from ipam_da_consul.allocator.layout import Layout
from ipam_da_consul.allocator.pool import Pool, parse_pool
from ipam_da_consul.allocator.store import KVEntry

from tests.support.memkv import MemKV

LAYOUT = Layout()
IP1 = ipaddress.ip_address("10.0.0.1")
KEY = "ipam/p/10.0.0.1"


def setup() -> tuple[MemKV, bytes]:
    kv = MemKV()
    kv.put("ipam/p", json.dumps([{"subnet": "10.0.0.0/24"}]).encode())
    value = json.dumps({"target": "old", "ifname": "eth0", "network": "net"}).encode()
    kv.put(KEY, value)
    return kv, value


def allocator(kv: MemKV, target: str, call: str) -> Allocator:
    return Allocator(kv, LAYOUT, "host-a", attachment=Attachment("net", target, "eth0"),
                     call=call)


def pool(kv: MemKV) -> Pool:
    return parse_pool(LAYOUT, "p", kv.list("ipam/p"))


def entry(kv: MemKV, key: str = KEY) -> KVEntry:
    found = kv.get(key)
    assert found is not None, key
    return found


def test_a_take_over_after_its_holders_del_raised_the_fence_is_never_given_back() -> None:
    kv, _ = setup()
    p = pool(kv)  # the taker read the key while the holder still had it
    deleting = allocator(kv, "old", "del")
    deleting.raise_fence("DEL")  # the holder's DEL, before the taker reads the fence
    taker = allocator(kv, "new", "add")
    claim = taker.take_over(p, p.held[IP1])
    assert claim.won
    # The DEL lists the pool: the key is no longer its own; it returns 0.
    assert not [h for h in deleting.scan("p", lambda why: None) if deleting.owns(h)]
    taker.void([claim], "rollback")
    assert kv.get(KEY) is None


def test_a_fence_raised_for_a_live_holder_still_gives_the_address_back() -> None:
    # The holder's own successful ADD voided a write in doubt after writing its key: its fence
    # is newer than the key, but the holder lives.
    kv, value = setup()
    allocator(kv, "old", "add-2").raise_fence("in-doubt write")
    p = pool(kv)
    taker = allocator(kv, "new", "add")
    claim = taker.take_over(p, p.held[IP1])
    taker.void([claim], "rollback")
    assert entry(kv).value == value


def test_a_holder_deleted_before_it_was_added_again_gets_its_address_back() -> None:
    # A restart reusing the container ID: DEL (fence), then an ADD written behind that fence.
    kv, _ = setup()
    kv.delete(KEY, entry(kv).modify_index)
    allocator(kv, "old", "del").raise_fence("DEL")
    again = allocator(kv, "old", "add-2")
    again.fence_index = entry(kv, LAYOUT.fence_key("net", "old", "eth0")).modify_index
    assert again.claim(pool(kv), IP1).won
    value = entry(kv).value
    p = pool(kv)
    taker = allocator(kv, "new", "add")
    claim = taker.take_over(p, p.held[IP1])
    taker.void([claim], "rollback")
    assert entry(kv).value == value
