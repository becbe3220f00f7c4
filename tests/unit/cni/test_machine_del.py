"""DEL through the machine over the in-memory KV: the fence first (connected -> fenced), then
each pool's keys of the attachment released; late writes voided, journaled replays, cool-downs,
and the error codes of a DEL that cannot finish. On a real Consul: tests/test_del.py,
test_safety.py, test_journal.py, test_cooldown.py."""

from __future__ import annotations

import time
from typing import Any

import pytest
from ipam_da_consul.allocator.allocate import FENCE_TTL
from ipam_da_consul.allocator.schemas import dump_fence
from ipam_da_consul.cni.commands import delete
from ipam_da_consul.cni.env import REPLAY_BEFORE
from ipam_da_consul.consul import ConsulError, ConsulUnavailable

from tests.support.machine import HOST, Caches, Faulty, Mem, netconf
from tests.support.memkv import HeldBack

FENCED = ["start", "parsed", "connected", "fenced", "pool_loaded", "pool_done", "done"]
KEY10, KEY11, KEY12 = "ipam/p/10.0.0.10", "ipam/p/10.0.0.11", "ipam/p/10.0.0.12"
FENCE = "ipam/.fences/net/c1/eth0"


def err(code: int, msg: str) -> dict[str, Any]:
    return {"cniVersion": "1.1.0", "code": code, "msg": msg, "details": ""}


@pytest.fixture(autouse=True)
def no_sweep(monkeypatch: pytest.MonkeyPatch) -> None:
    """DEL sweeps fences in about one call of 32: never, unless a test says so."""
    monkeypatch.setattr(delete.random, "random", lambda: 0.99)


def test_del_raises_the_fence_then_releases_our_key() -> None:
    m = Mem()
    m.pool()
    assert m.call("ADD").code == 0
    run = m.call("DEL")
    assert (run.code, run.output) == (0, None)
    assert run.walk == FENCED
    assert run.logged(f"released {KEY10}")
    assert m.keys() == [FENCE, "ipam/p"]
    fence = m.value(FENCE)
    assert fence is not None and (fence["by"], fence["host"]) == ("DEL", HOST)


def test_del_releases_only_this_attachments_keys_in_every_pool() -> None:
    m = Mem()
    m.pool("p")
    m.pool("q")
    m.put(KEY10, {"target": "c1", "ifname": "eth0", "network": "net"})
    m.put(KEY11, {"target": "c1", "ifname": "eth1", "network": "net"})  # a sibling interface
    m.put(KEY12, {"target": "c1", "ifname": "eth0", "network": "other-net"})
    m.put("ipam/q/10.0.0.10", {"target": "c1"})  # upstream's: the whole container's
    m.put("ipam/q/10.0.0.11", {"target": "c2"})
    run = m.call("DEL", netconf([{"name": "p"}, {"name": "q"}]))
    assert run.code == 0
    assert run.walk == [*FENCED[:-1], "pool_loaded", "pool_done", "done"]
    assert m.keys() == [FENCE, "ipam/p", KEY11, KEY12, "ipam/q", "ipam/q/10.0.0.11"]


def test_del_with_nothing_of_ours_succeeds() -> None:
    m = Mem()
    m.pool()
    run = m.call("DEL")
    assert (run.code, run.walk) == (0, FENCED)
    assert run.logged("pool 'p': nothing of ours to release")
    assert m.keys() == [FENCE, "ipam/p"]


def test_del_of_a_missing_pool_succeeds_with_the_fence_up() -> None:
    m = Mem()
    run = m.call("DEL")
    assert (run.code, run.output, run.walk) == (0, None, FENCED)
    assert run.logged("pool 'p': nothing of ours to release")
    assert m.keys() == [FENCE]


def test_an_unreadable_key_is_skipped_with_a_warning() -> None:
    m = Mem()
    m.pool()
    m.kv.put(KEY11, b"not json")
    m.put(KEY10, {"target": "c1", "ifname": "eth0"})
    run = m.call("DEL")
    assert run.code == 0
    assert run.logged("DEL skips: KV key 'ipam/p/10.0.0.11' does not hold a valid Allocation")
    assert m.keys() == [FENCE, "ipam/p", KEY11]


def test_the_fence_voids_an_add_write_still_in_flight() -> None:
    """An ADD's write went unanswered and its rollback could not reach Consul either; the
    runtime's DEL finds nothing, and the write, applied late, must not hand out an address."""
    m = Mem()
    m.pool()
    stuck: list[HeldBack] = []

    def unreachable(kv: Any) -> Any:
        rollback_fails = Faulty(kv, "txn", ConsulUnavailable("no Consul server answered"))
        stuck.append(HeldBack(rollback_fails, ConsulError("no answer", doubtful=True)))
        return stuck[-1]

    m.wrap = unreachable
    add = m.call("ADD")
    assert add.code == 125
    assert add.logged(f"could not roll back {KEY10}: no Consul server answered")
    m.wrap = lambda kv: kv
    run = m.call("DEL")
    assert (run.code, run.walk) == (0, FENCED)
    assert run.logged("pool 'p': nothing of ours to release")
    assert stuck[0].kept is not None
    assert m.kv.txn(stuck[0].kept).failed == 0  # applied late: the fence check fails
    assert m.keys() == [FENCE, "ipam/p"]


def test_a_key_rewritten_by_another_container_after_our_read_is_left_alone() -> None:
    m = Mem()
    m.pool()
    m.put(KEY10, {"target": "c1", "ifname": "eth0"})

    def thief(key: str) -> None:
        if key == KEY10:
            m.kv.before_write = None
            m.put(KEY10, {"target": "thief"})

    m.kv.before_write = thief
    run = m.call("DEL")
    assert run.code == 0
    assert m.value(KEY10) == {"target": "thief"}


def test_a_key_that_keeps_changing_under_us_is_125() -> None:
    m = Mem()
    m.pool()
    m.put(KEY10, {"target": "c1", "ifname": "eth0"})
    kv = m.kv

    def churn(key: str) -> None:
        if key == KEY10:  # our own attachment's key, rewritten before every delete
            kv.before_write = None
            m.put(KEY10, {"target": "c1", "ifname": "eth0"})
            kv.before_write = churn

    kv.before_write = churn
    run = m.call("DEL")
    assert run.code == 125
    assert run.walk == ["start", "parsed", "connected", "fenced", "pool_loaded", "failed"]
    assert run.output == err(125, f"could not release {KEY10}: it kept changing under us")
    assert m.value(KEY10) == {"target": "c1", "ifname": "eth0"}


def test_with_reuse_after_the_key_stays_as_a_release_cooling_down() -> None:
    m = Mem()
    m.pool()
    add = m.call("ADD")
    run = m.call("DEL", netconf(reuse_after=30.0))
    assert run.code == 0
    tomb = m.value(KEY10)
    assert tomb is not None
    free_after = tomb.pop("free_after")
    assert 25 < free_after - time.time() <= 30.001  # stored to the millisecond, rounded
    # The holder's fields stay, for readers that know only `target`; not the call's nonce.
    assert tomb == {"target": "c1", "ifname": "eth0", "host": HOST, "network": "net"}
    assert add.code == 0


def test_a_journaled_del_redone_late_spares_keys_written_after_it() -> None:
    m = Mem()
    m.pool()
    m.put(KEY10, {"target": "c1", "ifname": "eth0", "at": 1000.0})  # before the DEL
    m.put(KEY11, {"target": "c1", "ifname": "eth0", "at": 3000.0})  # a new ADD since
    run = m.call("DEL", env={REPLAY_BEFORE: "2000.0"})
    assert run.code == 0
    assert run.logged(f"journaled DEL spares {KEY11}: written after that DEL")
    assert m.keys() == [FENCE, "ipam/p", KEY11]


def test_no_consul_is_11_and_the_helper_journals_the_del() -> None:
    m = Mem()
    m.pool()
    m.put(KEY10, {"target": "c1", "ifname": "eth0"})
    m.wrap = lambda kv: Faulty(kv, "txn", ConsulUnavailable("no Consul server answered"))
    caches = Caches()
    run = m.call("DEL", caches=caches)
    assert run.code == 11
    assert run.walk == ["start", "parsed", "connected", "failed"]
    assert run.output == err(11, "no Consul server answered; the helper journaled this DEL and "
                                 "redoes it once Consul answers")
    assert [(stdin, env["CNI_CONTAINERID"]) for stdin, env in caches.journal.records] == [
        (run.inv.inputs.stdin, "c1")]
    assert m.keys() == ["ipam/p", KEY10]


def test_without_the_helper_a_del_without_consul_is_only_11() -> None:
    m = Mem()
    m.pool()
    m.wrap = lambda kv: Faulty(kv, "txn", ConsulUnavailable("no Consul server answered"))
    run = m.call("DEL")
    assert run.output == err(11, "no Consul server answered")


def test_a_refused_fence_is_a_failed_write_125() -> None:
    m = Mem()
    m.pool()
    m.wrap = lambda kv: Faulty(kv, "txn", ConsulError("403 permission denied", status=403))
    caches = Caches()
    run = m.call("DEL", caches=caches)
    assert run.output == err(125, "403 permission denied")
    assert caches.journal.records == []  # only "try again later" is journaled


def test_a_failed_listing_after_the_fence_is_a_read_error_111() -> None:
    m = Mem()
    m.pool()
    m.wrap = lambda kv: Faulty(kv, "list", ConsulError("500 from the leader", status=500))
    run = m.call("DEL")
    assert run.output == err(111, "500 from the leader")
    assert run.walk == ["start", "parsed", "connected", "fenced", "failed"]


def test_a_failed_release_is_a_failed_write_125() -> None:
    m = Mem()
    m.pool()
    m.put(KEY10, {"target": "c1", "ifname": "eth0"})
    m.wrap = lambda kv: Faulty(kv, "delete", ConsulError("500 from the leader", status=500))
    run = m.call("DEL")
    assert run.output == err(125, "500 from the leader")
    assert run.walk == ["start", "parsed", "connected", "fenced", "pool_loaded", "failed"]
    assert m.value(KEY10) == {"target": "c1", "ifname": "eth0"}


def test_a_server_the_helper_just_used_spares_the_leader_check_and_is_remembered() -> None:
    m = Mem()
    m.pool()
    caches = Caches(server="mem://recent")
    run = m.call("DEL", caches=caches)
    assert run.code == 0 and run.store is not None
    assert run.store.selects == 0
    assert caches.remembered == ["mem://recent"]


def test_now_and_then_a_del_sweeps_its_networks_expired_fences(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    m = Mem()
    m.pool()
    old = "ipam/.fences/net/gone/eth0"
    other = "ipam/.fences/other-net/gone/eth0"
    m.kv.put(old, dump_fence(time.time() - FENCE_TTL - 10, HOST, "DEL"))
    m.kv.put(other, dump_fence(time.time() - FENCE_TTL - 10, HOST, "DEL"))
    assert m.call("DEL").code == 0
    assert m.kv.get(old) is not None  # not this time (random 0.99)
    monkeypatch.setattr(delete.random, "random", lambda: 0.0)
    assert m.call("DEL").code == 0
    assert m.kv.get(old) is None and m.kv.get(other) is not None
