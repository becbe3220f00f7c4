"""`exclude` inside a range (operator reservations), through the installed plugin and the
operator CLI against a real Consul: never handed out, refused as a static request (124),
not counted as capacity, and reported by `check` when an allocation sits inside one."""

from __future__ import annotations

import json

from tests.e2e.test_admin import admin
from tests.support.plugin import run_plugin
from tests.support.plugin_helpers import assert_cni_error

RANGE = {"subnet": "10.0.40.0/24", "rangeStart": "10.0.40.10", "rangeEnd": "10.0.40.20",
         "exclude": ["10.0.40.10/31", "10.0.40.12"]}




def test_add_skips_exclusions_and_refuses_them_as_static(consul, make_pool, conf_for):
    pool = make_pool([RANGE])
    out = run_plugin("ADD", conf_for(pool), container="c-ex")
    assert out.rc == 0, out
    assert out.json["ips"][0]["address"] == "10.0.40.13/24"
    before = consul.kv_index()
    out = run_plugin("ADD", conf_for({"name": pool, "requested-ip": "10.0.40.11"}),
                     container="c-static")
    assert_cni_error(out, 124, "1.0.0", "10.0.40.11", "excluded")
    out = run_plugin("ADD", conf_for(pool), container="c-conv", env={"CNI_ARGS": "IP=10.0.40.12"})
    assert_cni_error(out, 124, "1.0.0", "10.0.40.12")
    assert consul.kv_index() == before


def test_a_range_whose_free_addresses_are_all_excluded_is_full(consul, make_pool, conf_for):
    pool = make_pool([{"subnet": "10.0.41.0/29", "exclude": ["10.0.41.0/30", "10.0.41.4/31"]}])
    out = run_plugin("ADD", conf_for(pool), container="c-1")
    assert out.rc == 0 and out.json["ips"][0]["address"] == "10.0.41.6/29", out
    out = run_plugin("ADD", conf_for(pool), container="c-2")
    assert_cni_error(out, 122, "1.0.0", "full")


def test_usage_and_check_know_exclusions(consul, make_pool):
    pool = make_pool([RANGE])
    consul.put(f"ipam/{pool}/10.0.40.11", {"target": "by-hand"})  # inside an exclusion
    usage = admin(consul, "usage", pool, "--json")
    assert usage.rc == 0, usage
    data = json.loads(usage.stdout)
    report = data[0] if isinstance(data, list) else data
    assert report["capacity"] == 8  # .10-.20 is 11 addresses, 3 of them excluded
    assert report["reserved"] == ["10.0.40.11"]  # held, but inside an exclusion: not counted
    assert report["ranges"][0]["exclude"] == ["10.0.40.10/31", "10.0.40.12/32"]
    check = admin(consul, "check", pool)
    assert check.rc != 0, check
    assert "10.0.40.11" in check.stdout + check.stderr and "excluded" in check.stdout + check.stderr
