"""ADD through the machine over the in-memory KV: every state ADD walks, lost races, rollbacks,
in-doubt writes and static addresses, each with the exact result and KV contents after.
The same behaviours on a real Consul: tests/test_add.py, test_safety.py, test_contention.py."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from ipam_da_consul.allocator.store import Op, TxnResult
from ipam_da_consul.cni.state import StateDir
from ipam_da_consul.consul import ConsulError, ConsulUnavailable

from tests.support.machine import HOST, Faulty, Mem, netconf, ours
from tests.support.memkv import HeldBack

FIRST_CLAIM = ["start", "parsed", "connected", "pool_loaded", "ip_picked", "pool_done", "done"]
KEY10, KEY11, KEY12 = "ipam/p/10.0.0.10", "ipam/p/10.0.0.11", "ipam/p/10.0.0.12"
FENCE = "ipam/.fences/net/c1/eth0"


def result(*addresses: str, routes: list[dict[str, str]] | None = None) -> dict[str, Any]:
    return {"cniVersion": "1.1.0", "ips": [{"address": a} for a in addresses],
            "routes": routes or [], "dns": {}}


def err(code: int, msg: str) -> dict[str, Any]:
    return {"cniVersion": "1.1.0", "code": code, "msg": msg, "details": ""}


def aside(m: Mem, key: str, value: dict[str, Any]) -> None:
    """Another writer's put, from inside our write's hook (not hooked itself)."""
    hook, m.kv.before_write = m.kv.before_write, None
    try:
        m.put(key, value)
    finally:
        m.kv.before_write = hook


def test_first_add_walks_parse_connect_load_pick_write_emit() -> None:
    m = Mem()
    m.pool()
    run = m.call("ADD")
    assert (run.code, run.output) == (0, result("10.0.0.10/24"))
    assert run.walk == FIRST_CLAIM
    assert m.keys() == ["ipam/p", KEY10]  # no fence: the first write needs none
    assert m.value(KEY10) == ours(run)
    assert run.store is not None and run.store.selects == 1 and run.store.closed


def test_a_gateway_adds_the_default_route() -> None:
    m = Mem()
    m.pool(ranges=[{"subnet": "10.0.0.0/24", "rangeStart": "10.0.0.10", "gateway": "10.0.0.1"}])
    run = m.call("ADD")
    assert run.output == {"cniVersion": "1.1.0", "ips": [
        {"address": "10.0.0.10/24", "gateway": "10.0.0.1"}],
        "routes": [{"dst": "0.0.0.0/0", "gw": "10.0.0.1"}], "dns": {}}


def test_each_pool_gives_one_address_in_pool_order() -> None:
    m = Mem()
    m.pool("p")
    m.pool("v6", [{"subnet": "fd00::/64", "rangeStart": "fd00::5", "rangeEnd": "fd00::6"}])
    run = m.call("ADD", netconf([{"name": "v6"}, {"name": "p"}]))
    assert (run.code, run.output) == (0, result("fd00::5/64", "10.0.0.10/24"))
    assert run.walk == [*FIRST_CLAIM[:-1], "pool_loaded", "ip_picked", "pool_done", "done"]
    assert m.keys() == ["ipam/p", KEY10, "ipam/v6", "ipam/v6/fd00::5"]


def test_a_repeated_add_hands_back_the_same_address_without_a_write() -> None:
    m = Mem()
    m.pool()
    first = m.call("ADD")
    index, writes = m.index(KEY10), m.kv.writes
    again = m.call("ADD")
    assert (again.code, again.output) == (0, result("10.0.0.10/24"))
    assert again.walk == FIRST_CLAIM
    assert m.value(KEY10) == ours(first)
    assert (m.index(KEY10), m.kv.writes) == (index, writes)
    assert m.keys() == ["ipam/p", KEY10]


def test_another_containers_address_is_skipped() -> None:
    m = Mem()
    m.pool()
    m.put(KEY10, {"target": "other"})
    run = m.call("ADD")
    assert run.output == result("10.0.0.11/24")
    assert m.value(KEY10) == {"target": "other"}


def test_a_lost_race_goes_back_to_pool_loaded_and_picks_again() -> None:
    m = Mem()
    m.pool()

    def thief(key: str) -> None:
        if key == KEY10 and m.kv.get(KEY10) is None:
            aside(m, KEY10, {"target": "thief"})  # lands between our read and our write

    m.kv.before_write = thief
    run = m.call("ADD")
    assert (run.code, run.output) == (0, result("10.0.0.11/24"))
    assert run.walk == ["start", "parsed", "connected", "pool_loaded", "ip_picked",
                        "pool_loaded", "ip_picked", "pool_done", "done"]
    assert run.logged("lost the race for 10.0.0.10 in pool 'p'; retrying")
    assert m.value(KEY10) == {"target": "thief"}
    assert m.value(KEY11) == ours(run)


def test_races_lost_until_the_budget_ends_fail_with_125_and_write_nothing() -> None:
    m = Mem()
    m.pool()

    def thief(key: str) -> None:
        if key.startswith("ipam/p/") and m.kv.get(key) is None:
            aside(m, key, {"target": "thief"})
            m.stores[-1].deadline.end = time.monotonic() - 1  # and the budget is gone

    m.kv.before_write = thief
    run = m.call("ADD")
    assert run.code == 125
    assert run.walk == ["start", "parsed", "connected", "pool_loaded", "ip_picked", "failed"]
    assert run.output == err(125, (
        "could not write an allocation in pool 'p': lost 1 compare-and-set races to other "
        "writers before the time budget ran out"))
    assert m.keys() == ["ipam/p", KEY10]
    assert m.value(KEY10) == {"target": "thief"}


def test_a_full_pool_is_122() -> None:
    m = Mem()
    m.pool()
    for key in (KEY10, KEY11, KEY12):
        m.put(key, {"target": "other"})
    run = m.call("ADD")
    assert run.code == 122
    assert run.walk == ["start", "parsed", "connected", "pool_loaded", "failed"]
    assert run.output is not None and run.output["msg"] == (
        "pool 'p' is full: all 3 addresses are allocated")
    assert m.keys() == ["ipam/p", KEY10, KEY11, KEY12]


def test_a_failure_in_a_later_pool_rolls_back_the_earlier_claim() -> None:
    m = Mem()
    m.pool("p")
    run = m.call("ADD", netconf([{"name": "p"}, {"name": "gone"}]))
    assert run.code == 114
    assert run.walk == [*FIRST_CLAIM[:-1], "failed"]
    assert run.output == err(114, "pool 'gone' does not exist: KV key 'ipam/gone' is missing")
    assert run.logged(f"rolled back {KEY10}")
    assert m.keys() == ["ipam/p"]  # won, so no fence needed: the key is simply gone


def test_rollback_spares_a_key_someone_else_wrote_since() -> None:
    m = Mem()
    m.pool("p")
    m.pool("q")

    def rewrite(key: str) -> None:
        if key.startswith("ipam/q/"):  # the second pool's claim: p's key changes hands now
            m.put(KEY10, {"target": "admin-moved-it"})
            aside(m, key, {"target": "thief"})
            m.stores[-1].deadline.end = time.monotonic() - 1

    m.kv.before_write = rewrite
    run = m.call("ADD", netconf([{"name": "p"}, {"name": "q"}]))
    assert run.code == 125
    assert m.value(KEY10) == {"target": "admin-moved-it"}
    assert not run.logged("rolled back")


def test_an_unanswered_write_is_fenced_so_it_can_never_apply_late() -> None:
    m = Mem()
    m.pool()
    stuck: list[HeldBack] = []

    def hold(kv: Any) -> Any:
        stuck.append(HeldBack(kv, ConsulError("read timeout after sending", doubtful=True)))
        return stuck[-1]

    m.wrap = hold
    run = m.call("ADD")
    assert run.code == 125  # a Consul error while writing
    assert run.walk == ["start", "parsed", "connected", "pool_loaded", "ip_picked", "failed"]
    assert run.output == err(125, "read timeout after sending")
    fence = m.value(FENCE)
    assert fence is not None and fence["by"] == "rollback" and fence["host"] == HOST
    assert stuck[0].release().failed == 0  # Consul applies it late: the fence check fails
    assert m.keys() == ["ipam/.fences/net/c1/eth0", "ipam/p"]


def test_a_refused_write_is_not_rolled_back_or_fenced() -> None:
    m = Mem()
    m.pool()
    m.wrap = lambda kv: Faulty(kv, "txn", ConsulError("403 permission denied", status=403))
    run = m.call("ADD")
    assert run.code == 125
    assert m.keys() == ["ipam/p"]
    assert not run.logged("rolled back")


def test_a_compare_lost_in_doubt_is_fenced_before_the_result() -> None:
    """The CAS lost, but an earlier send of it went unanswered (a resend after failover): that
    send may still apply. ADD takes the next address and fences the doubtful one."""
    m = Mem()
    m.pool()

    class Doubtful:
        def __init__(self, kv: Any) -> None:
            self.kv = kv

        def __getattr__(self, name: str) -> Any:
            return getattr(self.kv, name)

        def txn(self, ops: list[Op]) -> TxnResult:
            got: TxnResult = self.kv.txn(ops)
            return got if got.ok else replace(got, doubtful=True)

    m.wrap = Doubtful
    m.put(KEY10, {"target": "other"})
    pool = m.kv.get("ipam/p")
    m.kv.data.pop(KEY10)  # the listing misses it ...
    run_kv = m.kv

    def back(key: str) -> None:
        if key == KEY10 and run_kv.get(KEY10) is None:
            aside(m, KEY10, {"target": "other"})  # ... and it is back when we write

    m.kv.before_write = back
    run = m.call("ADD")
    assert pool is not None
    assert (run.code, run.output) == (0, result("10.0.0.11/24"))
    fence = m.value(FENCE)
    assert fence is not None and fence["by"] == "in-doubt write"
    assert m.value(KEY10) == {"target": "other"}
    assert m.value(KEY11) == ours(run)


def test_a_doubt_the_call_cannot_void_stays_in_the_state_folder_and_is_voided_later(
    tmp_path: Path,
) -> None:
    """As above, but the fence cannot be raised now (Consul went away): the ADD still succeeds
    with the address it holds, and the doubt stays in the attachment's entry, durably, for the
    helper (or the host's next call) to void. It was swallowed before: rc 0 and a second key
    possible for good."""
    state = StateDir(str(tmp_path / "state"))
    m = Mem(state)
    m.pool()
    txns = iter(range(100))

    class DoubtThenGone:
        def __init__(self, kv: Any) -> None:
            self.kv = kv

        def __getattr__(self, name: str) -> Any:
            return getattr(self.kv, name)

        def txn(self, ops: list[Op]) -> TxnResult:
            n = next(txns)
            if n == 2:
                raise ConsulUnavailable("no Consul server answered")
            got: TxnResult = self.kv.txn(ops)
            return got if got.ok else replace(got, doubtful=True)

    m.wrap = DoubtThenGone
    m.put(KEY10, {"target": "other"})
    m.kv.data.pop(KEY10)
    run_kv = m.kv

    def back(key: str) -> None:
        if key == KEY10 and run_kv.get(KEY10) is None:
            aside(m, KEY10, {"target": "other"})

    m.kv.before_write = back
    run = m.call("ADD")
    assert (run.code, run.output) == (0, result("10.0.0.11/24"))
    assert run.logged(f"could not undo {KEY10} (in-doubt write)")
    assert len(state.pending()) == 1
    m.kv.before_write = None
    m.wrap = lambda kv: kv
    with state.entry(("net", "c1", "eth0"), time.monotonic() + 1) as entry:
        assert [(c.key, c.state) for c in entry.claims()] == [(KEY10, "doubt"), (KEY11, "held")]
        assert void_later(m, entry, state) == 0
    assert state.pending() == []
    assert (m.value(FENCE) or {}).get("by") == "void"
    assert m.value(KEY10) == {"target": "other"} and m.value(KEY11) == ours(run)


def void_later(m: Mem, entry: Any, state: StateDir) -> int:
    """cni/replay.py's void, through this test's in-memory store."""
    from ipam_da_consul.cni import replay

    return replay.void(entry, state, m.factory)


def test_a_conventional_static_ip_is_served_from_the_pool_that_holds_it() -> None:
    m = Mem()
    m.pool()
    run = m.call("ADD", env={"CNI_ARGS": "IP=10.0.0.12"})
    assert (run.code, run.output) == (0, result("10.0.0.12/24"))
    assert m.keys() == ["ipam/p", KEY12]


def test_a_conventional_static_ip_in_use_is_126() -> None:
    m = Mem()
    m.pool()
    m.put(KEY12, {"target": "other"})
    run = m.call("ADD", env={"CNI_ARGS": "IP=10.0.0.12"})
    assert run.code == 126
    assert run.walk == ["start", "parsed", "connected", "pool_loaded", "failed"]
    assert run.output is not None and run.output["msg"] == (
        "requested IP 10.0.0.12 in pool 'p' is allocated to container 'other'; only a Pool's "
        "own requested-ip re-allocates an address")
    assert m.value(KEY12) == {"target": "other"}


def test_a_static_ip_no_pool_holds_is_124_and_rolled_back() -> None:
    m = Mem()
    m.pool()
    run = m.call("ADD", env={"CNI_ARGS": "IP=192.168.9.9"})
    assert run.code == 124
    assert run.walk == [*FIRST_CLAIM[:-1], "failed"]  # found out at emit, after the claim
    assert run.output is not None and run.output["msg"].startswith(
        "requested IP(s) 192.168.9.9 could not be served")
    assert m.keys() == ["ipam/p"]


def test_a_pools_requested_ip_outside_its_ranges_is_124() -> None:
    m = Mem()
    m.pool()
    run = m.call("ADD", netconf([{"name": "p", "requested_ip": "10.0.0.200"}]))
    assert run.code == 124
    assert run.output is not None and run.output["msg"] == (
        "requested IP 10.0.0.200 is not in any range of pool 'p'")


def test_a_pools_requested_ip_is_taken_over_from_its_holder() -> None:
    m = Mem()
    m.pool()
    m.put(KEY11, {"target": "old"})
    run = m.call("ADD", netconf([{"name": "p", "requested_ip": "10.0.0.11"}]))
    assert (run.code, run.output) == (0, result("10.0.0.11/24"))
    assert run.logged("re-allocated requested IP 10.0.0.11 in pool 'p' from container 'old' "
                      "to 'c1'")
    assert m.value(KEY11) == ours(run)


def test_a_release_cooling_down_is_taken_until_its_key_goes() -> None:
    """Whatever its free_after says (an older version's, by its writer's clock, long past):
    no reader's clock decides, Consul deletes the key when the cool-down's session ends."""
    m = Mem()
    m.pool()
    m.put(KEY10, {"target": "gone", "free_after": time.time() + 600})
    m.put(KEY11, {"target": "gone2", "free_after": time.time() - 3600})
    run = m.call("ADD")
    assert run.output == result("10.0.0.12/24")
    assert m.value(KEY10)["target"] == "gone" and m.value(KEY11)["target"] == "gone2"  # type: ignore[index]


def test_spread_picks_by_the_calls_key() -> None:
    from ipam_da_consul.allocator.pool import spread_key

    m = Mem()
    m.pool()
    run = m.call("ADD", netconf(pick="spread"))
    expected = 10 + spread_key(HOST, "net", "c1", "eth0", "p") % 3
    assert run.output == result(f"10.0.0.{expected}/24")


def test_a_call_nobody_waits_for_writes_nothing() -> None:
    m = Mem()
    m.pool()
    run = m.call("ADD", abandoned=lambda: True)
    assert run.code == 11
    assert run.walk == ["start", "parsed", "connected", "pool_loaded", "ip_picked", "failed"]
    assert run.output is not None and run.output["msg"] == (
        "the runtime stopped waiting for this call; nothing more written")
    assert m.keys() == ["ipam/p"]


def test_no_leader_is_11_before_any_pool_is_read() -> None:
    m = Mem()
    m.pool()
    run_store: list[Any] = []

    def no_leader(
        settings: Any, budget: float, known_good: str | None, on_request: Any = None
    ) -> Any:
        store = Mem.factory(m, settings, budget, known_good)
        run_store.append(store)

        def select() -> str:
            raise ConsulUnavailable("no Consul server answered with a leader")

        store.select = select  # type: ignore[method-assign]
        return store

    m.factory = no_leader  # type: ignore[method-assign]
    run = m.call("ADD")
    assert run.code == 11
    assert run.walk == ["start", "parsed", "failed"]
    assert run.output == err(11, "no Consul server answered with a leader")
    assert run_store[0].closed


def test_the_output_is_valid_json_for_the_wire() -> None:
    m = Mem()
    m.pool()
    run = m.call("ADD", netconf(version="0.4.0"))
    assert json.loads(json.dumps(run.output)) == {
        "cniVersion": "0.4.0", "ips": [{"address": "10.0.0.10/24", "version": "4"}],
        "routes": [], "dns": {}}
