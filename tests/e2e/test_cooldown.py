"""`reuse_after`: a released address is not handed out again until its cool-down is over
(stale ARP and conntrack entries, firewall rules and DNS still naming the old holder).

The released key stays, with the holder's fields and a `free_after` no clock reaches, tied to
a Consul session whose TTL covers the cool-down: Consul's leader, not any host's clock, ends it,
and with it deletes the key. Readers that know only `target` (older versions, upstream) see the
address taken meanwhile. Through the installed plugin, in-process and through the helper, on
real Consul; a session's end is brought forward here with Consul's own API, and its TTL checked.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.agent import ConsulAgent
from tests.support.plugin import run_plugin
from tests.support.plugin_helpers import assert_cni_error
from tests.support.util_procs import Helper

TWO = [{"subnet": "10.0.42.0/24", "rangeStart": "10.0.42.10", "rangeEnd": "10.0.42.11"}]
COOLING = 4102444800.0


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


def session_of(consul: ConsulAgent, key: str) -> dict[str, Any]:
    [entry] = consul.http.get(f"{consul.url}/v1/kv/{key}", timeout=10).json()
    assert entry.get("Session"), entry
    [info] = consul.http.get(f"{consul.url}/v1/session/info/{entry['Session']}", timeout=10).json()
    return dict(info)


def end(consul: ConsulAgent, session: str) -> None:
    """What Consul does once the TTL is over (up to twice the TTL, its leader's count)."""
    resp = consul.http.put(f"{consul.url}/v1/session/destroy/{session}", timeout=10)
    resp.raise_for_status()


def test_a_released_address_cools_down_then_is_reused(consul, make_pool, conf_for, mode_env):
    pool = make_pool(TWO)
    conf = conf_for(pool, reuse_after=120.0)
    first = run_plugin("ADD", conf, container="c-old", env=mode_env)
    assert first.rc == 0 and first.json["ips"][0]["address"] == "10.0.42.10/24", first
    assert run_plugin("DEL", conf, container="c-old", env=mode_env).rc == 0
    key = f"ipam/{pool}/10.0.42.10"
    tomb = consul.get_json(key)
    assert tomb["target"] == "c-old" and tomb["free_after"] == COOLING  # "taken" for all
    session = session_of(consul, key)
    assert session["Behavior"] == "delete" and session["NodeChecks"] == []
    assert float(session["TTL"].rstrip("s")) >= 120.0  # the cool-down at least
    out = run_plugin("ADD", conf, container="c-new", env=mode_env)
    assert out.rc == 0 and out.json["ips"][0]["address"] == "10.0.42.11/24", out
    out = run_plugin("ADD", conf, container="c-third", env=mode_env)
    assert_cni_error(out, 122, "1.0.0", "full")  # the cooling address is not free yet
    end(consul, session["ID"])
    assert consul.get(key) is None
    out = run_plugin("ADD", conf, container="c-third", env=mode_env)
    assert out.rc == 0 and out.json["ips"][0]["address"] == "10.0.42.10/24", out
    assert consul.allocations(pool) == {"10.0.42.10": "c-third", "10.0.42.11": "c-new"}
    fresh = consul.http.get(f"{consul.url}/v1/kv/{key}", timeout=10).json()[0]
    assert not fresh.get("Session")  # a live allocation is never tied to a session


def test_a_cooling_address_is_refused_as_a_static_ip_and_taken_over_unlocked(
    consul, make_pool, conf_for
):
    pool = make_pool(TWO)
    conf = conf_for(pool, reuse_after=60.0)
    assert run_plugin("ADD", conf, container="c-old").rc == 0
    assert run_plugin("DEL", conf, container="c-old").rc == 0
    out = run_plugin("ADD", conf, container="c-new", env={"CNI_ARGS": "IP=10.0.42.10"})
    assert_cni_error(out, 126, "1.0.0", "10.0.42.10", "cooling down")
    # DEL of the old container again leaves the release alone.
    assert run_plugin("DEL", conf, container="c-old").rc == 0
    key = f"ipam/{pool}/10.0.42.10"
    assert consul.get_json(key)["free_after"] == COOLING
    # A Pool's own requested IP takes it over: a key made anew, which the cool-down's session
    # ending must never delete.
    session = session_of(consul, key)
    out = run_plugin("ADD", conf_for({"name": pool, "requested_ip": "10.0.42.10"},
                                     reuse_after=60.0), container="c-taker")
    assert out.rc == 0, out
    end(consul, session["ID"])
    assert consul.allocations(pool) == {"10.0.42.10": "c-taker"}


def test_default_behaviour_deletes_at_once(consul, make_pool, conf_for):
    pool = make_pool(TWO)
    assert run_plugin("ADD", conf_for(pool), container="c-old").rc == 0
    assert run_plugin("DEL", conf_for(pool), container="c-old").rc == 0
    assert consul.get(f"ipam/{pool}/10.0.42.10") is None


def test_gc_hands_an_older_versions_releases_to_a_session(consul, make_pool):
    """An older version's release cools down until a time by its writer's clock (`free_after`):
    GC ties it to a session of its own cool-down, so Consul, not a clock, ends it."""
    from tests.e2e.test_cni11 import HOST, conf11, gc

    pool = make_pool(TWO)
    base = {"ifname": "eth0", "host": HOST, "network": "n"}
    consul.put(f"ipam/{pool}/10.0.42.10", base | {"target": "a", "free_after": 1.0})
    consul.put(f"ipam/{pool}/10.0.42.11", base | {"target": "b", "free_after": 9e9})
    out = gc(conf11(consul, pool, ipam_reuse_after=30, **{"cni.dev/valid-attachments": []}))
    assert out.rc == 0, out
    for ip in ("10.0.42.10", "10.0.42.11"):
        info = session_of(consul, f"ipam/{pool}/{ip}")
        assert float(info["TTL"].rstrip("s")) >= 30
