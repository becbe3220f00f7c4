"""Contention and idempotency against a real Consul: many real plugin processes allocating from
one pool at once, repeated ADDs, and writes whose reply was lost.

The promise under test: no address is ever handed to two containers, no address leaks, and a
loser gets a clear error ("pool full" only when the pool really is full)."""

from __future__ import annotations

import ipaddress
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.support.agent import ConsulAgent
from tests.support.plugin import run_plugin
from tests.support.util_procs import Call, Done, Helper, consul_requests, run_many

PROCESSES = 45
# The time budget (ipam.timeout) for the crowded tests: 45 Python processes starting at once on
# 2 cores can take seconds just to import, and a budget spent there would turn a deserved
# "pool full" into "try again" on a slow CI machine. The budget itself is tested elsewhere.
BUDGET = 60
# 10.1.0.10 .. 10.1.0.34: 25 addresses, fewer than the processes asking for one.
SMALL = [{"subnet": "10.1.0.0/24", "rangeStart": "10.1.0.10", "rangeEnd": "10.1.0.34",
          "gateway": "10.1.0.1"}]
SMALL_ADDRESSES = {f"10.1.0.{i}" for i in range(10, 35)}
LARGE = [{"subnet": "10.2.0.0/24", "rangeStart": "10.2.0.10", "rangeEnd": "10.2.0.200",
          "gateway": "10.2.0.1"}]


def check_unique(consul: ConsulAgent, pool: str, done: list[Done]) -> dict[str, str]:
    """KV owners == containers whose ADD succeeded, each at the address it printed."""
    held = consul.allocations(pool)
    owners = Counter(held.values())
    assert [c for c, n in owners.items() if n > 1] == [], held
    winners = {d.call.container: d.address for d in done if d.rc == 0}
    assert {target: ip for ip, target in held.items()} == winners
    return held


def delete_all(conf: dict, done: list[Done]) -> list[Done]:
    return run_many(Call("DEL", d.call.container, conf) for d in done)


def test_more_processes_than_addresses(consul, make_pool, conf_for, tmp_path):
    pool = make_pool(SMALL)
    conf = conf_for(pool, timeout=BUDGET)
    done = run_many(Call("ADD", f"race-{i}", conf) for i in range(PROCESSES))
    wall = max(d.started + d.elapsed for d in done) - min(d.started for d in done)

    winners = [d for d in done if d.rc == 0]
    losers = [d for d in done if d.rc != 0]
    assert len(winners) == len(SMALL_ADDRESSES), done
    # Every loser lost because the pool is full, not because it gave up on a race.
    for d in losers:
        assert d.rc == 122, d
        err = d.json
        assert err["code"] == 122 and "full" in err["msg"], d
        assert "Traceback" not in d.stdout
    held = check_unique(consul, pool, done)
    assert set(held) == SMALL_ADDRESSES  # every free address ended up allocated
    print(
        f"\n[contention] {PROCESSES} processes, {len(SMALL_ADDRESSES)} addresses: "
        f"{len(winners)} allocations in {wall:.2f}s = {len(winners) / wall:.1f}/s; "
        f"slowest ADD {max(d.elapsed for d in done):.2f}s"
    )

    dels = delete_all(conf, done)
    assert [d for d in dels if d.rc != 0 or d.stdout != ""] == []
    assert consul.tree(f"ipam/{pool}/") == {f"ipam/{pool}/": b""}


@pytest.fixture
def helpers(tmp_path: Path):
    """Three helpers: three hosts, each with its own cached copy of the pools."""
    started = [Helper(tmp_path / f"host{i}") for i in range(3)]
    yield started
    for h in started:
        h.close()


def test_hosts_with_helpers_and_without(consul, make_pool, conf_for, helpers):
    """The same race, with most calls served by three helpers (cached pools, shared between
    concurrent calls) and the rest in-process: still no duplicate and no leak."""
    pool = make_pool(SMALL)
    conf = conf_for(pool, timeout=BUDGET)
    routes = [h.env for h in helpers] + [{}]
    done = run_many(Call("ADD", f"mixed-{i}", conf, env=routes[i % 4]) for i in range(PROCESSES))
    wall = max(d.started + d.elapsed for d in done) - min(d.started for d in done)
    winners = [d for d in done if d.rc == 0]
    assert len(winners) == len(SMALL_ADDRESSES), done
    print(f"\n[contention] 3 helpers + in-process, {PROCESSES} calls, {len(SMALL_ADDRESSES)} "
          f"addresses: {len(winners) / wall:.1f} allocations/s")
    assert [d for d in done if d.rc != 0 and (d.rc != 122 or d.json["code"] != 122)] == []
    assert set(check_unique(consul, pool, done)) == SMALL_ADDRESSES

    dels = run_many(Call("DEL", d.call.container, conf, env=d.call.env) for d in done)
    assert [d for d in dels if d.rc != 0] == []
    assert consul.allocations(pool) == {}


def test_cached_pool_not_full_after_release_elsewhere(consul, make_pool, conf_for, tmp_path):
    """A helper's cached pool lags behind a release made elsewhere: "pool full" must come from
    a fresh read, not from the cache (a slow refresh makes the lag certain here)."""
    helper = Helper(tmp_path / "slow", refresh_interval=30)
    try:
        pool = make_pool([{"subnet": "10.1.0.0/24", "rangeStart": "10.1.0.10",
                           "rangeEnd": "10.1.0.11"}])
        conf = conf_for(pool)
        for c in ("a", "b"):
            assert run_plugin("ADD", conf, container=c, env=helper.env).rc == 0
        full = run_plugin("ADD", conf, container="c", env=helper.env)
        assert full.rc == 122, full
        assert run_plugin("DEL", conf, container="a").rc == 0  # another host
        out = run_plugin("ADD", conf, container="c", env=helper.env)
        assert out.rc == 0, out
        assert out.json["ips"][0]["address"] == "10.1.0.10/24"
        assert consul.allocations(pool) == {"10.1.0.10": "c", "10.1.0.11": "b"}
    finally:
        helper.close()


def test_room_for_everyone(consul, make_pool, conf_for):
    pool = make_pool(LARGE)
    conf = conf_for(pool, timeout=BUDGET)
    done = run_many(Call("ADD", f"roomy-{i}", conf) for i in range(PROCESSES))
    wall = max(d.started + d.elapsed for d in done) - min(d.started for d in done)
    assert [d for d in done if d.rc != 0] == []
    addresses = [d.address for d in done]
    assert len(set(addresses)) == PROCESSES
    # Lowest-free allocation packs the pool from its start: no gaps, no address skipped.
    assert set(addresses) == {f"10.2.0.{i}" for i in range(10, 10 + PROCESSES)}
    check_unique(consul, pool, done)
    print(f"\n[contention] {PROCESSES} processes, room for all: "
          f"{PROCESSES / wall:.1f} allocations/s")

    dels = delete_all(conf, done)
    assert [d for d in dels if d.rc != 0] == []
    assert consul.allocations(pool) == {}


def test_requests_per_add(consul, make_pool, conf_for, tmp_path: Path):
    """Consul requests per ADD, counted from the verbose flavour's log: uncontended ADDs one
    after another, then 40 at once on one pool."""
    conf = conf_for(make_pool(LARGE))
    alone = []
    for i in range(5):
        log = tmp_path / f"alone-{i}.log"
        out = run_plugin("ADD", conf, container=f"alone-{i}", verbose=True,
                         env={"IPAM_DA_CONSUL_LOG_FILE": str(log)})
        assert out.rc == 0, out
        alone.append(consul_requests(log))
    # Select a server (status/leader), read the pool key, list its folder (two reads, so a
    # pool never lists another whose name starts with its own: blue, blue-v6), one CAS write.
    assert alone == [4] * 5

    pool = make_pool(LARGE)
    conf = conf_for(pool, timeout=BUDGET)
    calls = [Call("ADD", f"busy-{i}", conf, log_file=str(tmp_path / f"busy-{i}.log"))
             for i in range(40)]
    done = run_many(calls)
    assert [d for d in done if d.rc != 0] == []
    check_unique(consul, pool, [*done])
    counts = sorted(consul_requests(c.log_file) for c in calls if c.log_file)
    assert min(counts) == 4
    mean = sum(counts) / len(counts)
    print(f"\n[requests/ADD] uncontended {alone[0]}; contended (40 at once) mean {mean:.1f}, "
          f"median {counts[len(counts) // 2]}, max {counts[-1]}")


def assert_handed_back(consul: Any, key: str, index: int) -> None:
    """The same key handed back, not a second address, and not written again: a repeated ADD
    costs no Raft entry."""
    assert consul.modify_index(key) == index


def test_repeated_add_is_idempotent(consul, make_pool, conf_for):
    pool = make_pool()
    conf = conf_for(pool)
    first = run_plugin("ADD", conf, container="idem")
    assert first.rc == 0, first
    index = consul.modify_index(f"ipam/{pool}/10.0.21.100")
    again = run_plugin("ADD", conf, container="idem")
    assert again.rc == 0, again
    assert again.json == first.json
    # No second key, and the one there was not even rewritten.
    assert consul.allocations(pool) == {"10.0.21.100": "idem"}
    assert_handed_back(consul, f"ipam/{pool}/10.0.21.100", index)
    assert consul.get_json(f"ipam/{pool}/10.0.21.100")["ifname"] == "eth0"

    # Another interface of the same container is another attachment: a second address.
    other = run_plugin("ADD", conf, container="idem", ifname="net1")
    assert other.rc == 0, other
    assert other.json["ips"][0]["address"] == "10.0.21.101/23"
    assert consul.allocations(pool) == {"10.0.21.100": "idem", "10.0.21.101": "idem"}
    assert run_plugin("ADD", conf, container="idem", ifname="net1").json == other.json

    # DEL of one interface releases only that interface's address.
    out = run_plugin("DEL", conf, container="idem", ifname="eth0")
    assert out.rc == 0, out
    assert consul.allocations(pool) == {"10.0.21.101": "idem"}
    out = run_plugin("DEL", conf, container="idem", ifname="net1")
    assert out.rc == 0, out
    assert consul.allocations(pool) == {}


def test_repeated_add_with_requested_ip(consul, make_pool, conf_for):
    pool = make_pool()
    conf = conf_for({"name": pool, "requested-ip": "10.0.21.120"})
    first = run_plugin("ADD", conf, container="static")
    assert first.rc == 0, first
    index = consul.modify_index(f"ipam/{pool}/10.0.21.120")
    again = run_plugin("ADD", conf, container="static")
    assert again.rc == 0 and again.json == first.json, again
    assert_handed_back(consul, f"ipam/{pool}/10.0.21.120", index)
    assert consul.allocations(pool) == {"10.0.21.120": "static"}


def test_lost_reply_key_counts_as_ours(consul, make_pool, conf_for):
    """A write that Consul applied but whose reply never came back leaves a key holding our
    container: the retried ADD returns that address instead of treating it as a conflict."""
    pool = make_pool()
    conf = conf_for(pool)
    # Someone else's key first, then ours (as our own lost write would have left it).
    consul.put(f"ipam/{pool}/10.0.21.100", {"target": "someone-else", "ifname": "eth0"})
    ours = json.dumps({"target": "lost", "ifname": "eth0", "host": "h1"})
    consul.put(f"ipam/{pool}/10.0.21.103", ours)
    index = consul.modify_index(f"ipam/{pool}/10.0.21.103")
    out = run_plugin("ADD", conf, container="lost")
    assert out.rc == 0, out
    assert out.json["ips"] == [{"address": "10.0.21.103/23", "gateway": "10.0.20.1"}]
    assert consul.allocations(pool) == {"10.0.21.100": "someone-else", "10.0.21.103": "lost"}
    assert_handed_back(consul, f"ipam/{pool}/10.0.21.103", index)


def test_lost_reply_target_only_key(consul, make_pool, conf_for):
    """A key written by a target-only writer (upstream, other tools) belongs to the whole
    container: an ADD of that container gets it back rather than a second address."""
    pool = make_pool()
    consul.put(f"ipam/{pool}/10.0.21.105", {"target": "legacy"})
    out = run_plugin("ADD", conf_for(pool), container="legacy")
    assert out.rc == 0, out
    assert ipaddress.ip_interface(out.json["ips"][0]["address"]).ip == ipaddress.ip_address(
        "10.0.21.105"
    )
    assert consul.allocations(pool) == {"10.0.21.105": "legacy"}


def test_lost_reply_on_requested_ip(consul, make_pool, conf_for):
    pool = make_pool()
    consul.put(f"ipam/{pool}/10.0.21.130", {"target": "mine", "ifname": "eth0"})
    index = consul.modify_index(f"ipam/{pool}/10.0.21.130")
    conf = conf_for({"name": pool, "requested-ip": "10.0.21.130"})
    out = run_plugin("ADD", conf, container="mine")
    assert out.rc == 0, out
    assert out.json["ips"][0]["address"] == "10.0.21.130/23"
    assert_handed_back(consul, f"ipam/{pool}/10.0.21.130", index)
    assert consul.allocations(pool) == {"10.0.21.130": "mine"}
