"""CHECK through the installed executable against a real Consul dev agent."""

from __future__ import annotations

import pytest

from tests.support.plugin import run_plugin
from tests.support.plugin_helpers import VERSIONS, assert_cni_error, put_alloc


@pytest.mark.parametrize("version", VERSIONS)
def test_check_success_prints_nothing(consul, make_pool, conf_for, version):
    p1, p2 = make_pool(), make_pool([{"subnet": "fd00:4::/64", "gateway": "fd00:4::1"}])
    added = run_plugin("ADD", conf_for(p1, p2, version=version), container="checked")
    assert added.rc == 0, added
    index = consul.kv_index()
    out = run_plugin("CHECK", conf_for(p1, p2, version=version, ips=added.json["ips"]),
                     container="checked")
    assert (out.rc, out.stdout, out.stderr) == (0, "", ""), out
    assert consul.kv_index() == index


@pytest.mark.parametrize("version", VERSIONS)
def test_check_fails_when_the_address_was_released(consul, make_pool, conf_for, version):
    pool = make_pool()
    added = run_plugin("ADD", conf_for(pool, version=version), container="checked")
    assert added.rc == 0, added
    consul.delete_tree(f"ipam/{pool}/10.0.21.100")
    index = consul.kv_index()
    out = run_plugin("CHECK", conf_for(pool, version=version, ips=added.json["ips"]),
                     container="checked")
    assert_cni_error(out, 114, version, "10.0.21.100", "no longer allocated", pool)
    assert consul.kv_index() == index


def test_check_fails_when_the_address_was_reallocated(consul, make_pool, conf_for):
    pool = make_pool()
    added = run_plugin("ADD", conf_for(pool), container="checked")
    assert added.rc == 0, added
    put_alloc(consul, pool, "10.0.21.100", "usurper")
    index = consul.kv_index()
    out = run_plugin("CHECK", conf_for(pool, ips=added.json["ips"]), container="checked")
    assert_cni_error(out, 114, "1.0.0", "10.0.21.100", "usurper")
    assert consul.kv_index() == index
    assert consul.allocations(pool) == {"10.0.21.100": "usurper"}  # CHECK never repairs


def test_check_fails_when_prev_result_has_no_address_of_the_pool(consul, make_pool, conf_for):
    pool = make_pool()
    assert run_plugin("ADD", conf_for(pool), container="checked").rc == 0
    ips = [{"address": "192.168.5.5/24"}]
    out = run_plugin("CHECK", conf_for(pool, ips=ips), container="checked")
    assert_cni_error(out, 114, "1.0.0", pool)


def test_check_of_a_missing_pool_fails(consul, conf_for):
    ips = [{"address": "10.0.21.100/23"}]
    out = run_plugin("CHECK", conf_for("no-such-pool-for-check", ips=ips), container="checked")
    assert_cni_error(out, 114, "1.0.0", "no-such-pool-for-check")
