"""Failure paths against a real Consul dev agent: rollback of a partly served ADD, lost replies,
and calls when no Consul server can be reached.

The promise: KV never keeps an allocation for an ADD that returned an error, and a DEL that
could not reach Consul says so (11, try again later) instead of silently leaking."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.agent import ConsulAgent, free_ports, module_consul
from tests.support.plugin import Outcome, run_plugin
from tests.support.util_procs import LossyProxy, Unresponsive, drop_first

GOOD = [{"subnet": "10.5.0.0/24", "rangeStart": "10.5.0.10", "rangeEnd": "10.5.0.20",
         "gateway": "10.5.0.1"}]
OTHER = [{"subnet": "10.6.0.0/24", "rangeStart": "10.6.0.10", "rangeEnd": "10.6.0.20",
          "gateway": "10.6.0.1"}]
TINY = [{"subnet": "10.7.0.0/24", "rangeStart": "10.7.0.10", "rangeEnd": "10.7.0.11"}]


consul = module_consul("faults")


@pytest.fixture
def unresponsive() -> Iterator[Unresponsive]:
    hung = Unresponsive()
    yield hung
    hung.close()


def dead_url() -> str:
    """A loopback port with nothing listening: connection refused."""
    return f"http://127.0.0.1:{free_ports(1)[0]}"


def assert_error(out: Outcome, code: int) -> dict:
    assert out.rc == code, out
    err = out.json
    assert err["code"] == code and isinstance(err["msg"], str) and err["msg"], out
    assert "Traceback" not in out.stdout
    return err


# -- rollback: a failure after some pools were served leaves KV exactly as it was ------------


@pytest.mark.parametrize(
    "second, code",
    [
        ("missing", 114),
        ("full", 122),
        ("outside", 124),
    ],
)
def test_failing_second_pool_rolls_back_the_first(consul, make_pool, conf_for, second, code):
    first = make_pool(GOOD)
    consul.put(f"ipam/{first}/10.5.0.10", {"target": "neighbour"})
    if second == "missing":
        pool2: dict = {"name": f"{first}-nowhere"}
    elif second == "full":
        full = make_pool(TINY)
        consul.put(f"ipam/{full}/10.7.0.10", {"target": "x"})
        consul.put(f"ipam/{full}/10.7.0.11", {"target": "y"})
        pool2 = {"name": full}
    else:
        pool2 = {"name": make_pool(OTHER), "requested-ip": "10.9.9.9"}
    before = consul.tree("")
    index = consul.kv_index()
    out = run_plugin("ADD", conf_for(first, pool2), container="half")
    assert_error(out, code)
    assert consul.tree("") == before
    # The first pool really was served, and then undone: rollback, not a pre-check.
    assert consul.kv_index() > index


def test_rollback_restores_a_taken_over_address(consul, make_pool, conf_for):
    """A static request re-allocates an address from another container; when a later pool
    fails, the address goes back to that container with its original value."""
    first = make_pool(GOOD)
    original = json.dumps({"target": "previous-owner", "ifname": "eth1", "host": "elsewhere"})
    consul.put(f"ipam/{first}/10.5.0.15", original)
    second = make_pool(OTHER)
    before = consul.tree("")
    conf = conf_for({"name": first, "requested-ip": "10.5.0.15"}, second,
                    {"name": f"{first}-gone"})
    out = run_plugin("ADD", conf, container="grabber")
    assert_error(out, 114)
    assert consul.tree("") == before
    assert consul.get(f"ipam/{first}/10.5.0.15") == original.encode()


def test_unplaced_conventional_ip_rolls_back_every_pool(consul, make_pool, conf_for):
    """CNI_ARGS IP= that fits none of the pools fails after all pools were served."""
    p1, p2 = make_pool(GOOD), make_pool(OTHER)
    before = consul.tree("")
    out = run_plugin("ADD", conf_for(p1, p2), container="conv",
                     env={"CNI_ARGS": "IP=192.0.2.7"})
    assert_error(out, 124)
    assert consul.tree("") == before


def test_failure_keeps_what_a_previous_add_gave(consul, make_pool, conf_for):
    """A repeated ADD that fails on a new pool does not take away the address the earlier,
    successful ADD handed out (the runtime still has it, and DEL releases it)."""
    p1 = make_pool(GOOD)
    ok = run_plugin("ADD", conf_for(p1), container="keep")
    assert ok.rc == 0, ok
    out = run_plugin("ADD", conf_for(p1, {"name": f"{p1}-gone"}), container="keep")
    assert_error(out, 114)
    assert consul.allocations(p1) == {"10.5.0.10": "keep"}
    assert run_plugin("DEL", conf_for(p1), container="keep").rc == 0
    assert consul.allocations(p1) == {}


# -- lost replies: Consul applied the write, the answer never arrived -------------------------


def lossy_conf(conf: dict, proxy: LossyProxy, consul: ConsulAgent) -> dict:
    conf["ipam"]["consul_servers"] = [proxy.url, consul.url]
    return conf


def test_lost_add_reply_is_retried_safely(consul, make_pool, conf_for):
    pool = make_pool(GOOD)
    proxy = LossyProxy(consul.url, drop_first("PUT"))
    try:
        out = run_plugin("ADD", lossy_conf(conf_for(pool), proxy, consul), container="lossy")
    finally:
        proxy.close()
    assert len(proxy.dropped) == 1
    assert out.rc == 0, out
    assert out.json["ips"][0]["address"] == "10.5.0.10/24"
    assert consul.allocations(pool) == {"10.5.0.10": "lossy"}


def test_lost_add_reply_then_failure_rolls_back(consul, make_pool, conf_for):
    """The write whose reply was lost is this call's own: when the call then fails, it is
    rolled back like any other write of the call, behind the attachment's fence (the write went
    out twice: the first send could still land after the key is deleted)."""
    pool = make_pool(GOOD)

    def allocations() -> dict[str, Any]:
        return {k: v for k, v in consul.tree("").items() if ".fences/" not in k}

    before = allocations()
    proxy = LossyProxy(consul.url, drop_first("PUT"))
    try:
        conf = lossy_conf(conf_for(pool, {"name": f"{pool}-gone"}), proxy, consul)
        out = run_plugin("ADD", conf, container="lossy2")
    finally:
        proxy.close()
    assert len(proxy.dropped) == 1
    assert_error(out, 114)
    assert allocations() == before
    assert consul.get("ipam/.fences/testnet/lossy2/eth0") is not None


def test_lost_del_reply_is_retried_safely(consul, make_pool, conf_for):
    pool = make_pool(GOOD)
    assert run_plugin("ADD", conf_for(pool), container="lossy-del").rc == 0
    proxy = LossyProxy(consul.url, drop_first("DELETE"))
    try:
        out = run_plugin("DEL", lossy_conf(conf_for(pool), proxy, consul), container="lossy-del")
    finally:
        proxy.close()
    assert len(proxy.dropped) == 1
    assert out.rc == 0 and out.stdout == "", out
    assert consul.allocations(pool) == {}


# -- no Consul server reachable ---------------------------------------------------------------


def unreachable(conf: dict, hung: Unresponsive) -> dict:
    conf["ipam"].update(
        consul_servers=[dead_url(), hung.url, dead_url()],
        timeout=2,
        consul_connect_timeout=0.5,
        consul_read_timeout=0.5,
    )
    return conf


def test_del_without_any_server_is_try_again_later(consul, make_pool, conf_for, unresponsive):
    pool = make_pool(GOOD)
    assert run_plugin("ADD", conf_for(pool), container="stranded").rc == 0
    started = time.monotonic()
    out = run_plugin("DEL", unreachable(conf_for(pool), unresponsive), container="stranded")
    took = time.monotonic() - started
    err = assert_error(out, 11)
    assert "Consul" in err["msg"]
    assert took < 2 + 5, took  # the budget, plus interpreter start on a busy machine
    # Nothing silently lost: the allocation is still there for the runtime's retry.
    assert consul.allocations(pool) == {"10.5.0.10": "stranded"}

    # The retry, with Consul back, releases it; and a DEL of keys already gone succeeds.
    out = run_plugin("DEL", conf_for(pool), container="stranded")
    assert out.rc == 0 and out.stdout == "", out
    assert consul.allocations(pool) == {}
    out = run_plugin("DEL", conf_for(pool), container="stranded")
    assert out.rc == 0 and out.stdout == "", out


def test_add_without_any_server_writes_nothing(consul, make_pool, conf_for, unresponsive):
    pool = make_pool(GOOD)
    index = consul.kv_index()
    out = run_plugin("ADD", unreachable(conf_for(pool), unresponsive), container="nowhere")
    assert_error(out, 11)
    assert consul.kv_index() == index


def test_del_of_keys_already_gone(consul, make_pool, conf_for):
    """prevResult names an address that is no longer allocated (or now someone else's)."""
    pool = make_pool(GOOD)
    consul.put(f"ipam/{pool}/10.5.0.11", {"target": "new-owner"})
    before = consul.tree(f"ipam/{pool}")
    ips = [{"address": "10.5.0.10/24"}, {"address": "10.5.0.11/24"}]
    out = run_plugin("DEL", conf_for(pool, ips=ips), container="departed")
    assert out.rc == 0 and out.stdout == "", out
    assert consul.allocations(pool) == {"10.5.0.11": "new-owner"}
    assert consul.tree(f"ipam/{pool}") == before  # only the attachment's fence was written
