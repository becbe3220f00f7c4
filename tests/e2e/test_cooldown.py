"""`reuse_after`: a released address is not handed out again until its cool-down is over
(stale ARP and conntrack entries, firewall rules and DNS still naming the old holder).

The released key stays, with the holder's fields and `free_after` (unix time): readers that
know only `target` see it taken. Past it, the next ADD replaces the key (CAS on its index), and
GC deletes it. Through the installed plugin, in-process and through the helper, on real Consul.
"""

from __future__ import annotations

import time

import pytest

from tests.support.plugin import run_plugin
from tests.support.plugin_helpers import assert_cni_error
from tests.support.util_procs import Helper

TWO = [{"subnet": "10.0.42.0/24", "rangeStart": "10.0.42.10", "rangeEnd": "10.0.42.11"}]


@pytest.fixture(params=["in-process", "helper"])
def mode_env(request, tmp_path):
    if request.param == "in-process":
        yield {}
        return
    helper = Helper(tmp_path)
    try:
        yield helper.env
    finally:
        helper.close()


def test_a_released_address_cools_down_then_is_reused(consul, make_pool, conf_for, mode_env):
    pool = make_pool(TWO)
    conf = conf_for(pool, reuse_after=10.0)  # longer than the calls before the check, if loaded
    first = run_plugin("ADD", conf, container="c-old", env=mode_env)
    assert first.rc == 0 and first.json["ips"][0]["address"] == "10.0.42.10/24", first
    assert run_plugin("DEL", conf, container="c-old", env=mode_env).rc == 0
    tomb = consul.get_json(f"ipam/{pool}/10.0.42.10")
    assert tomb["target"] == "c-old" and tomb["free_after"] > time.time()  # still "taken"
    out = run_plugin("ADD", conf, container="c-new", env=mode_env)
    assert out.rc == 0 and out.json["ips"][0]["address"] == "10.0.42.11/24", out
    out = run_plugin("ADD", conf, container="c-third", env=mode_env)
    assert_cni_error(out, 122, "1.0.0", "full")  # the cooling address is not free yet
    time.sleep(max(0.0, tomb["free_after"] - time.time()) + 0.2)
    out = run_plugin("ADD", conf, container="c-third", env=mode_env)
    assert out.rc == 0 and out.json["ips"][0]["address"] == "10.0.42.10/24", out
    assert consul.allocations(pool) == {"10.0.42.10": "c-third", "10.0.42.11": "c-new"}
    assert "free_after" not in consul.get_json(f"ipam/{pool}/10.0.42.10")


def test_a_cooling_address_is_refused_as_a_conventional_static_ip(consul, make_pool, conf_for):
    pool = make_pool(TWO)
    conf = conf_for(pool, reuse_after=60.0)
    assert run_plugin("ADD", conf, container="c-old").rc == 0
    assert run_plugin("DEL", conf, container="c-old").rc == 0
    out = run_plugin("ADD", conf, container="c-new", env={"CNI_ARGS": "IP=10.0.42.10"})
    assert_cni_error(out, 126, "1.0.0", "10.0.42.10", "cooling down")
    # DEL of the old container again, and CHECK-like reads, leave the release alone.
    assert run_plugin("DEL", conf, container="c-old").rc == 0
    assert consul.get_json(f"ipam/{pool}/10.0.42.10")["free_after"] > time.time()


def test_default_behaviour_deletes_at_once(consul, make_pool, conf_for):
    pool = make_pool(TWO)
    assert run_plugin("ADD", conf_for(pool), container="c-old").rc == 0
    assert run_plugin("DEL", conf_for(pool), container="c-old").rc == 0
    assert consul.get(f"ipam/{pool}/10.0.42.10") is None


def test_gc_removes_cooled_down_releases_of_its_network(consul, make_pool):
    from tests.e2e.test_cni11 import HOST, conf11, gc

    pool = make_pool(TWO)
    now = time.time()
    base = {"ifname": "eth0", "host": HOST, "network": "n"}
    consul.put(f"ipam/{pool}/10.0.42.10", base | {"target": "a", "free_after": now - 1})
    consul.put(f"ipam/{pool}/10.0.42.11", base | {"target": "b", "free_after": now + 600})
    out = gc(conf11(consul, pool, **{"cni.dev/valid-attachments": []}))
    assert out.rc == 0, out
    assert consul.allocations(pool) == {"10.0.42.11": "b"}
