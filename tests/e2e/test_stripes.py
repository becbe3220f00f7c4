"""The default `pick: stripe` against a real Consul, seen from a relay that records every
request: an in-process ADD reads its pool key and its home stripe (never the pool's other
keys), the helper watches its stripe alone (a write elsewhere in the pool wakes nothing), DEL
lists nothing it does not need, and a small pool still fills completely."""

from __future__ import annotations

import ipaddress
import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from ipam_da_consul.allocator.schemas import load_ranges
from ipam_da_consul.allocator.stripes import Stripes

from tests.support.agent import ConsulAgent
from tests.support.plugin import netconf, run_plugin
from tests.support.util_procs import Helper, LossyProxy

WIDE = [{"subnet": "10.40.0.0/16"}]
HOST = "stripe-host-1"


def conf(url: str, pool: str) -> dict[str, Any]:
    return netconf([url], [{"name": pool}], pick=None, host=HOST)


def walk(pool: str) -> list[str]:
    return [s.prefix for s in Stripes(load_ranges(json.dumps(WIDE).encode())).walk(HOST, pool)]


def paths(relay: LossyProxy) -> list[str]:
    return [f"{m} {unquote(p)}" for m, p in relay.seen]


def test_an_add_reads_its_home_stripe_and_nothing_else_of_the_pool(consul: ConsulAgent) -> None:
    pool = consul.create_pool("stripes-read", WIDE)
    consul.fill_pool(pool, ipaddress.IPv4Address("10.40.0.1"), 2000)  # the first 8 stripes
    home = walk(pool)[0]
    relay = LossyProxy(consul.url, lambda m, p: False)
    try:
        add = run_plugin("ADD", conf(relay.url, pool), container="reader")
        assert add.rc == 0, add
        seen = paths(relay)
    finally:
        relay.close()
    folder = f"/v1/kv/ipam/{pool}/"
    listings = [p for p in seen if p.startswith(f"GET {folder}")]
    assert listings == [f"GET {folder}{home}?recurse=true"], seen
    assert add.json["ips"][0]["address"].startswith(home)


def test_the_helper_watches_its_stripe_alone(consul: ConsulAgent, tmp_path: Path) -> None:
    """A write in another stripe of the pool wakes no watcher of this host; one in its own
    stripe does."""
    pool = consul.create_pool("stripes-watch", WIDE)
    home = walk(pool)[0]
    relay = LossyProxy(consul.url, lambda m, p: False)
    helper = Helper(tmp_path)
    try:
        env = {**helper.env, "IPAM_DA_CONSUL_HELPER_ACK_TIMEOUT": "30"}
        add = run_plugin("ADD", conf(relay.url, pool), container="watcher", env=env)
        assert add.rc == 0, add
        time.sleep(1.5)  # the watcher's first blocking query is out
        watches = [p for p in paths(relay) if "index=" in p]
        assert watches and all(f"/ipam/{pool}/{home}?" in p for p in watches), watches
        before = len(watches)
        other = "10.40.200." if home != "10.40.200." else "10.40.201."
        for i in range(5):
            consul.put(f"ipam/{pool}/{other}{i + 1}", {"target": f"elsewhere-{i}"})
        time.sleep(2.0)
        assert len([p for p in paths(relay) if "index=" in p]) == before  # nothing woke
        consul.put(f"ipam/{pool}/{home}250", {"target": "neighbour"})
        time.sleep(2.0)
        assert len([p for p in paths(relay) if "index=" in p]) > before
    finally:
        helper.close()
        relay.close()


def test_a_small_pool_fills_completely_through_the_helper_and_in_process(
    consul: ConsulAgent, tmp_path: Path
) -> None:
    pool = consul.create_pool("stripes-small", [{"subnet": "10.41.0.0/28"}])
    helper = Helper(tmp_path)
    try:
        env = {**helper.env, "IPAM_DA_CONSUL_HELPER_ACK_TIMEOUT": "30"}
        got = set()
        for i in range(14):
            out = run_plugin("ADD", conf(consul.url, pool), container=f"c{i}",
                             env=env if i % 2 else helper.host_env)
            assert out.rc == 0, (i, out)
            got.add(out.json["ips"][0]["address"])
        assert len(got) == 14
        full = run_plugin("ADD", conf(consul.url, pool), container="extra", env=env)
        assert full.rc == 122, full
        assert len(consul.allocations(pool)) == 14
    finally:
        helper.close()


def test_del_reads_only_the_keys_it_knows(consul: ConsulAgent) -> None:
    pool = consul.create_pool("stripes-del", WIDE)
    add = run_plugin("ADD", conf(consul.url, pool), container="leaver")
    assert add.rc == 0, add
    relay = LossyProxy(consul.url, lambda m, p: False)
    try:
        gone = run_plugin("DEL", conf(relay.url, pool), container="leaver")
        assert (gone.rc, gone.stdout) == (0, ""), gone
        seen = paths(relay)
    finally:
        relay.close()
    assert not any("recurse" in p or "keys=" in p for p in seen), seen
    assert consul.allocations(pool) == {}


def test_a_packed_pool_costs_one_names_listing_then_none(
    consul: ConsulAgent, tmp_path: Path
) -> None:
    """The first 30 stripes full (a pool `lowest` or an older version packed from its start),
    this host's among them: the first ADD lists the pool's key names once to find room; the
    next ones, in-process (the hint is in the state folder) and through the helper (in its
    memory), go straight to that stripe."""
    name = next(f"stripes-packed-{i}" for i in range(10_000)
                if all(int(p.split(".")[2]) < 30 for p in walk(f"stripes-packed-{i}")))
    pool = consul.create_pool(name, WIDE)
    consul.fill_pool(pool, ipaddress.IPv4Address("10.40.0.0"), 30 * 256)  # the walk is full
    relay = LossyProxy(consul.url, lambda m, p: False)
    helper = Helper(tmp_path)
    try:
        for n, env in enumerate([helper.host_env, helper.host_env,
                                 {**helper.env, "IPAM_DA_CONSUL_HELPER_ACK_TIMEOUT": "30"},
                                 {**helper.env, "IPAM_DA_CONSUL_HELPER_ACK_TIMEOUT": "30"}]):
            before = len(relay.seen)
            out = run_plugin("ADD", conf(relay.url, pool), container=f"packed-{n}", env=env)
            assert out.rc == 0, out
            names = [p for p in paths(relay)[before:]
                     if p.startswith(f"GET /v1/kv/ipam/{pool}/?keys")]  # the whole pool's
            assert len(names) == (1 if n in (0, 2) else 0), (n, paths(relay)[before:])
    finally:
        helper.close()
        relay.close()
