"""CHECK, GC, STATUS and VERSION through the machine over the in-memory KV: each command's walk
through the states, its result, and the KV after. On a real Consul: tests/test_check.py,
test_cni11.py, test_version.py, test_cooldown.py."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

from ipam_da_consul.allocator.layout import Layout
from ipam_da_consul.allocator.pool import Pool, parse_pool
from ipam_da_consul.cni.config import ConsulSettings
from ipam_da_consul.cni.schemas import SUPPORTED_VERSIONS
from ipam_da_consul.consul import ConsulError, ConsulUnavailable

from tests.support.machine import HOST, Caches, Faulty, Mem, netconf

ONE_POOL = ["start", "parsed", "connected", "pool_loaded", "pool_done", "done"]
KEY10, KEY11, KEY12 = "ipam/p/10.0.0.10", "ipam/p/10.0.0.11", "ipam/p/10.0.0.12"


def err(code: int, msg: str, version: str = "1.1.0") -> dict[str, Any]:
    return {"cniVersion": version, "code": code, "msg": msg, "details": ""}


# -- CHECK ---------------------------------------------------------------------------------------
def checked(m: Mem, *addresses: str) -> dict[str, Any]:
    conf = netconf()
    conf["prevResult"] = {"cniVersion": "1.1.0", "ips": [{"address": a} for a in addresses]}
    return conf


def test_check_verifies_our_addresses_and_writes_nothing() -> None:
    m = Mem()
    m.pool()
    assert m.call("ADD").code == 0
    writes = m.kv.writes
    run = m.call("CHECK", checked(m, "10.0.0.10/24", "192.168.1.5/24"))  # one not ours to judge
    assert (run.code, run.output, run.walk) == (0, None, ONE_POOL)
    assert m.kv.writes == writes


def test_check_of_an_address_gone_or_taken_is_114() -> None:
    m = Mem()
    m.pool()
    gone = m.call("CHECK", checked(m, "10.0.0.10/24"))
    assert gone.output == err(114, "10.0.0.10 is no longer allocated in pool 'p'")
    assert gone.walk == ["start", "parsed", "connected", "pool_loaded", "failed"]
    m.put(KEY10, {"target": "other"})
    taken = m.call("CHECK", checked(m, "10.0.0.10/24"))
    assert taken.output == err(114, "10.0.0.10 in pool 'p' is now allocated to container 'other'")
    none = m.call("CHECK", checked(m, "192.168.1.5/24"))
    assert none.output == err(114, "prevResult holds no address from pool 'p'")


def test_check_without_prev_result_is_7() -> None:
    m = Mem()
    m.pool()
    run = m.call("CHECK")
    assert run.output == err(7, "CHECK needs the prevResult of the ADD")


def test_check_reads_only_the_ranges_and_our_keys() -> None:
    m = Mem()
    m.pool()
    m.kv.put(KEY12, b"not json")  # a full listing would fail on it
    m.put(KEY10, {"target": "c1", "ifname": "eth0"})
    run = m.call("CHECK", checked(m, "10.0.0.10/24"))
    assert run.code == 0


# -- GC ------------------------------------------------------------------------------------------
def gc_conf(*attachments: tuple[str, str], version: str = "1.1.0") -> dict[str, Any]:
    conf = netconf(version=version)
    conf["cni.dev/valid-attachments"] = [{"containerID": c, "ifname": i} for c, i in attachments]
    return conf


def mine(target: str, ifname: str | None = "eth0", **extra: Any) -> dict[str, Any]:
    value = {"target": target, "host": HOST, "network": "net", **extra}
    return value if ifname is None else value | {"ifname": ifname}


def test_gc_releases_exactly_this_hosts_stale_attachments_of_this_network() -> None:
    m = Mem()
    m.pool()
    m.pool("q", [{"subnet": "10.1.0.0/24"}])
    m.put(KEY10, mine("live"))
    m.put(KEY11, mine("dead"))
    m.put(KEY12, mine("dead", ifname=None, host="host-b"))  # another host's
    m.put("ipam/p/10.0.0.13", mine("dead", network="other-net"))
    m.put("ipam/p/10.0.0.14", {"target": "dead"})  # written by a tool: no host, no network
    m.put("ipam/p/10.0.0.15", mine("live", ifname=None))  # the whole container's
    m.put("ipam/q/10.1.0.1", mine("dead", ifname="eth1"))
    run = m.call("GC", gc_conf(("live", "eth0")) | {
        "ipam": netconf()["ipam"] | {"pools": [{"name": "p"}, {"name": "q"}]}})
    assert (run.code, run.output) == (0, None)
    assert run.walk == [*ONE_POOL[:-1], "pool_loaded", "pool_done", "done"]
    assert m.keys("ipam/p") == ["ipam/p", KEY10, KEY12, "ipam/p/10.0.0.13", "ipam/p/10.0.0.14",
                                "ipam/p/10.0.0.15"]
    assert m.keys("ipam/q") == ["ipam/q"]
    # Each released attachment's fence went up first: a late write of it never applies.
    fences = {k: (m.value(k) or {}).get("by") for k in m.keys("ipam/.fences/")}
    assert fences == {"ipam/.fences/net/dead/eth0": "GC", "ipam/.fences/net/dead/eth1": "GC"}


def test_gc_hands_an_older_versions_releases_to_a_cool_down_session() -> None:
    """A release an older version left cools down until a time by its writer's clock: GC
    ties it to a session of its own cool-down instead (no clock compared), or, without a
    cool-down configured, removes it; the plugin's own releases are left to their session."""
    m = Mem()
    m.pool()
    m.put(KEY10, mine("gone", free_after=time.time() - 1))
    m.put(KEY11, mine("gone", free_after=time.time() + 600))
    m.put(KEY12, mine("gone", free_after=4102444800.0))  # this version's: already timed
    conf = gc_conf()
    conf["ipam"]["reuse_after"] = 60
    assert m.call("GC", conf).code == 0
    assert {m.kv.locked.get(k) is not None for k in (KEY10, KEY11)} == {True}
    assert KEY12 not in m.kv.locked
    assert (m.value(KEY10) or {}).get("free_after") == 4102444800.0
    m.put("ipam/p/10.0.0.13", mine("gone", free_after=time.time() + 600))
    assert m.call("GC", gc_conf()).code == 0  # no cool-down configured: released at once
    assert m.value("ipam/p/10.0.0.13") is None


def test_gc_reports_every_problem_and_still_serves_the_other_pools() -> None:
    m = Mem()
    m.pool()
    m.put(KEY10, mine("dead"))
    m.kv.put(KEY11, b"not json")
    conf = gc_conf()
    conf["ipam"]["pools"] = [{"name": "gone"}, {"name": "p"}]
    run = m.call("GC", conf)
    assert run.code == 125
    assert run.walk == [*ONE_POOL[:-1], "pool_loaded", "pool_done", "failed"]
    assert run.output == err(125, "GC finished with problems: pool 'gone' does not exist; KV key "
                             "'ipam/p/10.0.0.11' does not hold a valid Allocation: not valid JSON "
                             "(Expecting value: line 1 column 1 (char 0))")
    assert m.keys("ipam/p") == ["ipam/p", KEY11]


def test_gc_needs_cni_1_1_and_its_attachments() -> None:
    m = Mem()
    m.pool()
    old = m.call("GC", gc_conf(version="1.0.0"))
    assert old.output == err(1, "GC needs cniVersion 1.1.0, got 1.0.0", "1.0.0")
    assert old.walk == ["start", "failed"] and m.stores == []  # no store was even opened
    bare = m.call("GC")
    assert bare.code == 7 and bare.output is not None
    assert bare.output["msg"].startswith("GC needs cni.dev/valid-attachments")


def test_gc_stops_when_consul_is_gone_and_a_failed_delete_is_125() -> None:
    m = Mem()
    m.pool()
    m.put(KEY10, mine("gone", free_after=time.time() - 1))
    m.wrap = lambda kv: Faulty(kv, "list", ConsulUnavailable("no Consul server answered"))
    assert m.call("GC", gc_conf()).output == err(11, "no Consul server answered")
    m.wrap = lambda kv: Faulty(kv, "delete", ConsulError("500 from the leader", status=500))
    run = m.call("GC", gc_conf())
    assert run.output == err(125, "500 from the leader")
    assert run.walk == ["start", "parsed", "connected", "pool_loaded", "failed"]


# -- STATUS --------------------------------------------------------------------------------------
def test_status_without_a_watched_copy_reads_every_pool_fresh() -> None:
    m = Mem()
    m.pool()
    m.wrap = Recording
    caches = Caches(server="mem://recent")
    run = m.call("STATUS", caches=caches)
    assert (run.code, run.output, run.walk) == (0, None, ONE_POOL)
    # The remembered server is used: the pool read itself goes through the leader.
    assert run.store is not None and run.store.selects == 0
    assert run.store.kv.calls == [("get", "ipam/p"), ("list", "ipam/p/")], run.store.kv.calls
    assert caches.remembered == ["mem://recent"]


class Recording:
    """The KV a call gets, noting each read and write it makes."""

    def __init__(self, kv: Any) -> None:
        self.kv = kv
        self.calls: list[tuple[str, str]] = []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.kv, name)

        def call(*args: Any) -> Any:
            self.calls.append((name, str(args[0]) if args else ""))
            return method(*args)

        return call


class Watched(Caches):
    """A helper that keeps a watched copy of pool `p`, as it was when `watch` was called."""

    def __init__(self, m: Mem) -> None:
        super().__init__(server="mem://recent")
        self.m = m
        self.copies: dict[str, Pool] = {}

    def watch(self, name: str = "p") -> None:
        entries = [*self.m.kv.list(f"ipam/{name}/"), self.m.kv.get(f"ipam/{name}")]
        self.copies[name] = parse_pool(Layout(), name, [e for e in entries if e]).cache_copy()

    def peek(self, settings: ConsulSettings) -> Any:
        return SimpleNamespace(peek=self.copies.get)


def status_with(m: Mem, caches: Watched, **ipam: Any) -> tuple[int, Any, list[tuple[str, str]]]:
    m.wrap = Recording
    run = m.call("STATUS", netconf(**ipam), caches=caches)
    assert run.store is not None
    return run.code, run.output, run.store.kv.calls


def test_status_with_a_watched_copy_reads_the_pool_key_alone() -> None:
    m = Mem()
    m.pool()
    m.put(KEY10, {"target": "a"})
    caches = Watched(m)
    caches.watch()
    code, output, calls = status_with(m, caches)
    assert (code, output, calls) == (0, None, [("get", "ipam/p")])


def test_status_reads_afresh_when_the_ranges_changed_or_the_copy_has_no_room() -> None:
    m = Mem()
    m.pool()
    m.put(KEY10, {"target": "a"})
    caches = Watched(m)
    caches.watch()
    # Three addresses, one held: below min_free 3 in the copy, so a fresh listing decides.
    code, output, calls = status_with(m, caches, min_free=3)
    assert code == 50 and output == err(
        50, "not ready to serve ADD: pool 'p' has 2 free address(es), fewer than "
        "ipam.min_free (3)")
    assert calls == [("get", "ipam/p"), ("get", "ipam/p"), ("list", "ipam/p/")]
    # The copy is behind a release: the fresh listing finds the room the copy lacks.
    m.kv.delete(KEY10, m.index(KEY10))
    code, output, calls = status_with(m, caches, min_free=3)
    assert (code, output) == (0, None) and ("list", "ipam/p/") in calls
    # New ranges: the key's ModifyIndex differs from the copy's, so the copy is not used.
    m.pool(ranges=[{"subnet": "10.0.0.0/24", "rangeStart": "10.0.0.10",
                    "rangeEnd": "10.0.0.20"}])
    code, output, calls = status_with(m, caches)
    assert (code, output) == (0, None)
    assert calls == [("get", "ipam/p"), ("get", "ipam/p"), ("list", "ipam/p/")]


def test_status_of_a_full_pool_or_below_min_free_is_not_ready() -> None:
    m = Mem()
    m.pool()
    m.put(KEY10, {"target": "a"})
    m.put(KEY11, {"target": "b"})
    low = m.call("STATUS", netconf(min_free=2))
    assert low.output == err(50, "not ready to serve ADD: pool 'p' has 1 free address(es), "
                             "fewer than ipam.min_free (2)")
    assert m.call("STATUS", netconf(min_free=1)).code == 0
    m.put(KEY12, {"target": "c"})
    full = m.call("STATUS")
    assert full.output == err(50, "not ready to serve ADD: pool 'p' is full: all 3 addresses "
                              "are allocated")


def test_status_without_consul_is_not_ready_but_a_wrong_call_keeps_its_code() -> None:
    m = Mem()
    m.pool()
    m.wrap = lambda kv: Faulty(kv, "get", ConsulUnavailable("no Consul server answered"))
    assert m.call("STATUS").output == err(50, "not ready to serve ADD: no Consul server answered")
    assert m.call("STATUS", netconf(version="1.0.0")).output == err(
        1, "STATUS needs cniVersion 1.1.0, got 1.0.0", "1.0.0")


def test_status_without_pools_only_checks_for_a_leader() -> None:
    m = Mem()
    run = m.call("STATUS", netconf(pools=[]))
    assert (run.code, run.walk) == (0, ["start", "parsed", "connected", "done"])
    assert run.store is not None and run.store.selects == 1
    # Through the helper too: a server it remembers does not spare the only check there is.
    caches = Caches(server="mem://recent")
    run = m.call("STATUS", netconf(pools=[]), caches=caches)
    assert run.store is not None and run.store.selects == 1
    assert caches.remembered == ["mem://leader"]



# -- VERSION -------------------------------------------------------------------------------------
def test_version_answers_without_a_store() -> None:
    m = Mem()
    run = m.call("VERSION", stdin=b'{"cniVersion": "0.4.0"}', env={"CNI_CONTAINERID": ""})
    assert run.output == {"cniVersion": "0.4.0", "supportedVersions": list(SUPPORTED_VERSIONS)}
    assert (run.code, run.walk) == (0, ["start", "parsed", "done"])
    assert m.stores == []


def test_version_with_an_empty_stdin_names_the_newest_version() -> None:
    run = Mem().call("VERSION", stdin=b"")
    assert run.output == {"cniVersion": SUPPORTED_VERSIONS[-1],
                          "supportedVersions": list(SUPPORTED_VERSIONS)}
