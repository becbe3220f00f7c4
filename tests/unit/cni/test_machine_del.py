"""DEL through the machine over the in-memory KV: the fence first (connected -> fenced), then
each pool's keys of the attachment released, exactly the versions read; late writes voided, DELs
the helper takes over while Consul is away (and finished before the attachment's next ADD),
cool-downs, and the error codes of a DEL that cannot finish. On a real Consul:
tests/e2e/test_del.py, test_safety.py, test_journal.py, test_cooldown.py."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from ipam_da_consul.cni.state import StateDir, entry_name
from ipam_da_consul.consul import ConsulError, ConsulUnavailable

from tests.support.machine import HOST, Caches, Faulty, Mem, netconf
from tests.support.memkv import HeldBack

FENCED = ["start", "parsed", "connected", "fenced", "pool_loaded", "pool_done", "done"]
KEY10, KEY11, KEY12 = "ipam/p/10.0.0.10", "ipam/p/10.0.0.11", "ipam/p/10.0.0.12"
FENCE = "ipam/.fences/net/c1/eth0"


def err(code: int, msg: str) -> dict[str, Any]:
    return {"cniVersion": "1.1.0", "code": code, "msg": msg, "details": ""}


@pytest.fixture
def state(tmp_path: Path) -> StateDir:
    return StateDir(str(tmp_path / "state"))


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
    assert add.logged(f"could not undo {KEY10} (rollback): no Consul server answered")
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


def test_a_key_written_again_for_the_attachment_after_the_fence_is_kept() -> None:
    """Only the version read after the fence is deleted: a version written since passed the
    raised fence, so a call that started after this DEL wrote it (a re-ADD)."""
    m = Mem()
    m.pool()
    m.put(KEY10, {"target": "c1", "ifname": "eth0"})
    kv = m.kv

    def rewrite(key: str) -> None:
        if key == KEY10:  # our own attachment's key, rewritten just before the delete
            kv.before_write = None
            m.put(KEY10, {"target": "c1", "ifname": "eth0", "call": "newer"})

    kv.before_write = rewrite
    run = m.call("DEL")
    assert run.code == 0
    assert run.logged(f"{KEY10} was written again for its attachment since: kept")
    assert m.value(KEY10) == {"target": "c1", "ifname": "eth0", "call": "newer"}


def test_with_reuse_after_the_key_stays_until_its_cool_down_session_ends() -> None:
    m = Mem()
    m.pool()
    add = m.call("ADD")
    run = m.call("DEL", netconf(reuse_after=30.0))
    assert run.code == 0 and add.code == 0
    tomb = m.value(KEY10)
    assert tomb is not None
    # No time any clock reaches: every reader, old versions too, sees it taken until Consul
    # deletes it. The holder's fields stay, for readers that know only `target`.
    assert tomb == {"target": "c1", "ifname": "eth0", "host": HOST, "network": "net",
                    "free_after": 4102444800.0}
    session = m.kv.locked[KEY10]
    assert m.kv.sessions[session] >= 30.0  # its TTL: at least the cool-down
    assert m.call("ADD", container="c2").output["ips"][0]["address"] != "10.0.0.10/24"  # type: ignore[index]
    assert KEY10 in m.kv.expire_session(session)  # the TTL runs out: the address is free
    again = m.call("ADD", container="c3")
    assert again.output["ips"][0]["address"] == "10.0.0.10/24"  # type: ignore[index]


def test_no_consul_the_helper_takes_the_del_over_and_answers_done(state: StateDir) -> None:
    m = Mem(state)
    m.pool()
    m.put(KEY10, {"target": "c1", "ifname": "eth0", "network": "net"})
    m.wrap = lambda kv: Faulty(kv, "txn", ConsulUnavailable("no Consul server answered"))
    run = m.call("DEL", caches=Caches())
    assert (run.code, run.output) == (0, None)
    assert run.walk == ["start", "parsed", "connected", "done"]
    assert run.logged("the helper finishes this DEL of net/c1/eth0 once it can")
    assert m.keys() == ["ipam/p", KEY10]  # the address stays reserved meanwhile
    assert state.pending() == [entry_name(("net", "c1", "eth0"))]
    with state.entry(("net", "c1", "eth0"), time.monotonic() + 1) as entry:
        assert entry.deleting is not None and entry.deleting.stdin == run.inv.inputs.stdin


def test_the_next_add_of_the_attachment_finishes_the_taken_over_del_first(
    state: StateDir,
) -> None:
    """The runtime was told the DEL is done and starts the attachment again: the DEL is
    finished before the ADD writes, so it can never release the new address."""
    m = Mem(state)
    m.pool()
    assert m.call("ADD").code == 0
    m.wrap = lambda kv: Faulty(kv, "txn", ConsulUnavailable("no Consul server answered"))
    assert m.call("DEL", caches=Caches()).code == 0
    m.wrap = lambda kv: kv  # Consul is back
    add = m.call("ADD", caches=None)
    assert add.code == 0
    assert add.output is not None and add.output["ips"][0]["address"] == "10.0.0.10/24"
    assert m.value(KEY10) == {"target": "c1", "ifname": "eth0", "host": HOST,
                              "network": "net", "call": add.inv.inputs.call_id}
    assert state.pending() == []


def test_an_add_while_the_taken_over_del_cannot_finish_is_11(state: StateDir) -> None:
    m = Mem(state)
    m.pool()
    assert m.call("ADD").code == 0
    m.wrap = lambda kv: Faulty(kv, "txn", ConsulUnavailable("no Consul server answered"))
    assert m.call("DEL", caches=Caches()).code == 0
    add = m.call("ADD")
    assert add.code == 11
    assert add.output is not None and "is not finished yet" in add.output["msg"]
    assert state.pending()  # still owed


def test_without_the_helper_a_del_without_consul_is_only_11() -> None:
    m = Mem()
    m.pool()
    m.wrap = lambda kv: Faulty(kv, "txn", ConsulUnavailable("no Consul server answered"))
    run = m.call("DEL")
    assert run.output == err(11, "no Consul server answered")


def test_a_refused_fence_is_a_failed_write_125(state: StateDir) -> None:
    m = Mem(state)
    m.pool()
    m.wrap = lambda kv: Faulty(kv, "txn", ConsulError("403 permission denied", status=403))
    run = m.call("DEL", caches=Caches())
    assert run.output == err(125, "403 permission denied")
    assert state.pending() == []  # only "try again later" is taken over


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
