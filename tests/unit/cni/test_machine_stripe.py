"""ADD and DEL with the default `pick: stripe` over the in-memory KV: what each call reads (its
home stripe, never the whole pool while there is room there), how it widens when there is not,
and that a small pool still fills completely. On a real Consul: tests/e2e/test_stripes.py."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest
from ipam_da_consul.allocator.schemas import load_ranges
from ipam_da_consul.allocator.stripes import Stripes
from ipam_da_consul.cni.state import StateDir

from tests.support.machine import HOST, Mem, netconf

WIDE = [{"subnet": "10.8.0.0/16"}]


def stripe(*pools: dict[str, Any], **ipam: Any) -> dict[str, Any]:
    conf = netconf(list(pools) or None, **ipam)
    del conf["ipam"]["pick"]  # the default
    return conf


class Recording:
    """The KV as the call's store sees it, remembering every read and listing."""

    def __init__(self, kv: Any, seen: list[tuple[str, str]]) -> None:
        self.kv, self.seen = kv, seen

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.kv, name)
        if name in ("get", "list", "keys", "txn"):
            def call(*args: Any, **kwargs: Any) -> Any:
                self.seen.append((name, str(args[0]) if name != "txn" else "txn"))
                return attr(*args, **kwargs)
            return call
        return attr


def recorded(m: Mem) -> list[tuple[str, str]]:
    seen: list[tuple[str, str]] = []
    m.wrap = lambda kv: Recording(kv, seen)
    return seen


def home(name: str = "p", host: str = HOST) -> str:
    return Stripes(load_ranges(json.dumps(WIDE).encode())).walk(host, name)[0].prefix


def test_add_reads_the_pool_key_and_its_home_stripe_only() -> None:
    m = Mem()
    m.pool(ranges=WIDE)
    seen = recorded(m)
    run = m.call("ADD", stripe())
    assert run.code == 0, run.output
    prefix = home()
    assert seen == [("get", "ipam/p"), ("list", f"ipam/p/{prefix}"), ("txn", "txn")]
    assert run.store is not None and run.store.requests_sent == 4  # + the leader check
    assert run.output is not None
    assert run.output["ips"][0]["address"].startswith(prefix)


def test_attachments_spread_inside_the_stripe() -> None:
    m = Mem()
    m.pool(ranges=WIDE)
    got = {m.call("ADD", stripe(), container=f"c{i}").output["ips"][0]["address"]  # type: ignore[index]
           for i in range(20)}
    assert len(got) == 20 and all(a.startswith(home()) for a in got)
    assert sorted(got) != [f"{home()}{i}/16" for i in range(1, 21)]  # not lowest-first


def fill(m: Mem, prefix: str) -> None:
    for i in range(256):
        m.put(f"ipam/p/{prefix}{i}", {"target": "filler"})


def test_a_full_home_stripe_sends_the_call_to_the_next_one() -> None:
    m = Mem()
    m.pool(ranges=WIDE)
    walk = Stripes(load_ranges(json.dumps(WIDE).encode())).walk(HOST, "p")
    fill(m, walk[0].prefix)
    seen = recorded(m)
    run = m.call("ADD", stripe())
    assert run.code == 0
    assert run.walk.count("pool_loaded") == 2  # widened once
    assert [p for op, p in seen if op == "list"] == [f"ipam/p/{walk[0].prefix}",
                                                    f"ipam/p/{walk[1].prefix}"]
    assert run.output is not None and run.output["ips"][0]["address"].startswith(walk[1].prefix)


def test_past_the_walk_the_key_names_show_a_stripe_with_room() -> None:
    m = Mem()
    m.pool(ranges=WIDE)
    for s in Stripes(load_ranges(json.dumps(WIDE).encode())).walk(HOST, "p"):
        fill(m, s.prefix)
    seen = recorded(m)
    run = m.call("ADD", stripe())
    assert run.code == 0
    assert ("keys", "ipam/p/") in seen  # one listing of names, no values
    assert not any(op == "list" and p == "ipam/p/" for op, p in seen)
    assert run.logged("no room there; reading stripe")


def test_a_host_remembers_where_it_found_room(tmp_path: Path) -> None:
    """A pool packed from its start (by `lowest`, by older versions): the host's stripes are
    full. The first ADD lists the pool's key names once; the next ones go straight to the
    stripe where it found room, until that is full, then home again."""
    m = Mem(StateDir(str(tmp_path / "state")))
    m.pool(ranges=WIDE)
    walk = Stripes(load_ranges(json.dumps(WIDE).encode())).walk(HOST, "p")
    for s in walk:
        fill(m, s.prefix)
    first = m.call("ADD", stripe(), container="c0")
    assert first.code == 0
    found = first.output["ips"][0]["address"].rsplit(".", 1)[0] + "."  # type: ignore[index]
    assert found not in {s.prefix for s in walk}
    for i in range(1, 4):
        seen = recorded(m)
        run = m.call("ADD", stripe(), container=f"c{i}")
        assert run.code == 0
        assert [p for op, p in seen if op in ("list", "keys")] == [f"ipam/p/{found}"], seen
        assert run.output["ips"][0]["address"].startswith(found)  # type: ignore[index]
    # That stripe fills up, and home has room again: back home, and the hint is forgotten.
    fill(m, found)
    m.kv.data.pop(f"ipam/p/{walk[0].prefix}7")
    back = m.call("ADD", stripe(), container="c-home")
    assert back.output is not None and back.output["ips"][0]["address"] == f"{walk[0].prefix}7/16"
    seen = recorded(m)
    m.kv.data.pop(f"ipam/p/{walk[0].prefix}8")
    m.call("ADD", stripe(), container="c-home-2")
    assert next(p for op, p in seen if op == "list") == f"ipam/p/{walk[0].prefix}", seen


def test_a_small_pool_fills_completely_and_full_is_said_after_a_whole_read() -> None:
    m = Mem()
    m.pool(ranges=[{"subnet": "10.9.9.0/28"}])
    got = set()
    for i in range(14):
        run = m.call("ADD", stripe(), container=f"c{i}")
        assert run.code == 0, (i, run.output)
        got.add(run.output["ips"][0]["address"])  # type: ignore[index]
    assert len(got) == 14
    seen = recorded(m)
    full = m.call("ADD", stripe(), container="one-too-many")
    assert full.code == 122, full.output
    assert ("list", "ipam/p/") in seen  # "full" only after every key was read
    assert full.output is not None and "is full: all 14 addresses" in full.output["msg"]


def test_a_re_add_finds_its_key_outside_its_stripe_through_its_ledger(tmp_path: Path) -> None:
    m = Mem(StateDir(str(tmp_path / "state")))
    m.pool(ranges=WIDE)
    walk = Stripes(load_ranges(json.dumps(WIDE).encode())).walk(HOST, "p")
    fill(m, walk[0].prefix)
    first = m.call("ADD", stripe())
    assert first.code == 0
    address = first.output["ips"][0]["address"]  # type: ignore[index]
    assert address.startswith(walk[1].prefix)
    m.kv.data.pop(f"ipam/p/{walk[0].prefix}7")  # room at home again
    writes = m.kv.writes
    again = m.call("ADD", stripe())
    assert again.output is not None and again.output["ips"][0]["address"] == address
    assert m.kv.writes == writes  # handed back, not written twice


def test_a_static_address_outside_the_stripe_is_read_before_it_is_judged() -> None:
    m = Mem()
    m.pool(ranges=WIDE)
    m.put("ipam/p/10.8.200.9", {"target": "someone"})
    assert home() != "10.8.200."
    run = m.call("ADD", stripe(), env={"CNI_ARGS": "IP=10.8.200.9"})
    assert run.code == 126, run.output
    free = m.call("ADD", stripe(), container="c2", env={"CNI_ARGS": "IP=10.8.201.9"})
    assert free.output is not None and free.output["ips"][0]["address"] == "10.8.201.9/16"


def test_del_reads_the_keys_it_knows_and_lists_nothing(tmp_path: Path) -> None:
    m = Mem(StateDir(str(tmp_path / "state")))
    m.pool(ranges=WIDE)
    add = m.call("ADD", stripe())
    key = f"ipam/p/{add.output['ips'][0]['address'].split('/')[0]}"  # type: ignore[index]
    seen = recorded(m)
    run = m.call("DEL", stripe())
    assert run.code == 0
    assert not any(op in ("list", "keys") for op, _ in seen), seen
    assert ("get", key) in seen and m.kv.get(key) is None


def test_del_with_neither_ledger_nor_prev_result_lists_its_home_stripe() -> None:
    m = Mem()
    m.pool(ranges=WIDE)
    prefix = home()
    m.put(f"ipam/p/{prefix}9", {"target": "c1", "ifname": "eth0", "network": "net"})
    seen = recorded(m)
    run = m.call("DEL", stripe())
    assert run.code == 0
    assert ("list", f"ipam/p/{prefix}") in seen
    assert m.kv.get(f"ipam/p/{prefix}9") is None


@pytest.mark.parametrize("subnet", ["fd00:77::/64", "::ffff:10.7.0.0/112"])
def test_ipv6_and_mapped_pools_stripe_too(subnet: str) -> None:
    m = Mem()
    m.pool(ranges=[{"subnet": subnet}])
    run = m.call("ADD", stripe())
    assert run.code == 0, run.output
    ip = ipaddress.ip_interface(run.output["ips"][0]["address"]).ip  # type: ignore[index]
    assert ip in ipaddress.ip_network(subnet)
    assert len(m.keys("ipam/p/")) == 1
