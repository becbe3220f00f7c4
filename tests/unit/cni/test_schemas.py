"""Unit tests of the wire schemas: KV objects (allocator/schemas.py), the network config, Pool,
result and error objects (cni/schemas.py, cni/config.py, cni/result.py)."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

import pytest
from ipam_da_consul.allocator.ranges import IPRange
from ipam_da_consul.allocator.schemas import dump_allocation, load_allocation, load_ranges
from ipam_da_consul.cni import config, result, stdin
from ipam_da_consul.cni.errors import CNIError, Code
from ipam_da_consul.cni.schemas import (
    SUPPORTED_VERSIONS,
    ErrorSchema,
    IpamSchema,
    PoolSchema,
    VersionSchema,
)
from marshmallow import ValidationError

ip = ipaddress.ip_address


def ranges_json(value: Any) -> bytes:
    return json.dumps(value).encode()


# -- IP Range (the ipam/<pool> key) --------------------------------------------------------------
def test_ranges_seed_example() -> None:
    [r] = load_ranges(ranges_json([{"subnet": "10.0.20.0/23", "rangeStart": "10.0.21.100",
                                    "rangeEnd": "10.0.21.150", "gateway": "10.0.20.1"}]))
    assert r == IPRange(ipaddress.ip_network("10.0.20.0/23"), ip("10.0.21.100"),
                        ip("10.0.21.150"), ip("10.0.20.1"))


def test_ranges_keep_pool_order_and_fill_defaults() -> None:
    rs = load_ranges(ranges_json([{"subnet": "10.9.0.0/24"}, {"subnet": "fd00::/120"},
                                  {"subnet": "10.1.0.0/24", "unknownField": 1}]))
    assert [str(r.subnet) for r in rs] == ["10.9.0.0/24", "fd00::/120", "10.1.0.0/24"]
    assert (rs[0].start, rs[0].end) == (ip("10.9.0.1"), ip("10.9.0.254"))
    assert (rs[1].start, rs[1].end) == (ip("fd00::1"), ip("fd00::ff"))


def test_ranges_subnet_host_bits_are_cleared() -> None:
    [r] = load_ranges(ranges_json([{"subnet": "10.0.20.7/23"}]))
    assert str(r.subnet) == "10.0.20.0/23"


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b"not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[]", "non-empty JSON array"),
        (b"{}", "non-empty JSON array"),
        (b'{"subnet": "10.0.0.0/24"}', "non-empty JSON array"),
        (b'"10.0.0.0/24"', "non-empty JSON array"),
        (b"[{}]", "[0].subnet: Missing data for required field"),
        (b'[{"subnet": "10.0.0.0"}]', "[0].subnet: Not a valid subnet"),
        (b'[{"subnet": "banana/24"}]', "[0].subnet: Not a valid subnet"),
        (b'[{"subnet": 10}]', "[0].subnet: Not a valid subnet"),
        (b'[{"subnet": "10.0.0.0/24", "rangeStart": "10.0.0.300"}]', "rangeStart: Not a valid IP"),
        (b'[{"subnet": "10.0.0.0/24", "gateway": 5}]', "gateway: Not a valid IP"),
        (b'[{"subnet": "10.0.0.0/24", "rangeStart": "10.0.1.1"}]', "outside subnet"),
        (b'[{"subnet": "10.0.0.0/24", "rangeStart": "10.0.0.9", "rangeEnd": "10.0.0.8"}]',
         "after rangeEnd"),
        (b'[{"subnet": "10.0.0.0/24", "gateway": "fd00::1"}]', "not the IP version"),
        (b'[{"subnet": "10.0.0.0/24"}, {"subnet": "10.1.0.0/32"}]', "[1]"),
    ],
)
def test_ranges_invalid(raw: bytes, needle: str) -> None:
    with pytest.raises(ValueError) as info:
        load_ranges(raw)
    assert needle in str(info.value)


# -- Allocation (the ipam/<pool>/<ip> keys) ------------------------------------------------------
def test_allocation_target_only_as_upstream_writes_it() -> None:
    assert load_allocation(b'{"target": "abc"}') == {
        "target": "abc", "ifname": None, "host": None, "network": None, "call": None,
        "runtime": None, "free_after": None,
        "at": None}


def test_allocation_extra_and_optional_fields() -> None:
    raw = b'{"target": "abc", "ifname": "eth1", "host": "node-7", "comment": "by hand"}'
    assert load_allocation(raw) == {
        "target": "abc", "ifname": "eth1", "host": "node-7", "network": None, "call": None,
        "runtime": None, "free_after": None,
        "at": None}
    raw = b'{"target": "abc", "network": "net-a", "call": "0a1b"}'
    assert load_allocation(raw)["network"] == "net-a"
    assert load_allocation(raw)["call"] == "0a1b"


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b"", "not valid JSON"),
        (b"garbage", "not valid JSON"),
        (b'"abc"', "JSON object"),
        (b'["abc"]', "JSON object"),
        (b"{}", "target: Missing data"),
        (b'{"target": ""}', "target"),
        (b'{"target": 7}', "target: Not a valid string"),
        (b'{"target": "abc", "ifname": 3}', "ifname"),
        (b'{"target": "abc", "network": ["a"]}', "network"),
        (b'{"target": "abc", "call": 7}', "call"),
        (b'{"target": "abc", "runtime": {"K8S_POD_NAME": 7}}', "runtime"),
        (b'{"target": "abc", "runtime": "web-0"}', "runtime"),
        (b'{"target": "abc", "free_after": "soon"}', "free_after"),
    ],
)
def test_allocation_invalid(raw: bytes, needle: str) -> None:
    with pytest.raises(ValueError) as info:
        load_allocation(raw)
    assert needle in str(info.value)


def test_dump_allocation_round_trips_and_always_has_target() -> None:
    assert json.loads(dump_allocation("abc")) == {"target": "abc"}
    names = {"K8S_POD_NAMESPACE": "prod", "K8S_POD_NAME": "web-0"}
    full = dump_allocation("abc", "eth0", "node-1", "net-a", "c0ffee", names)
    fields = {"target": "abc", "ifname": "eth0", "host": "node-1", "network": "net-a"}
    assert json.loads(full) == fields | {"call": "c0ffee", "runtime": names}
    loaded = load_allocation(full)
    assert loaded == fields | {"call": "c0ffee", "runtime": names, "free_after": None, "at": None}


@pytest.mark.parametrize("value", ["fd00:9::10%x", "fe80::1%eth0"])
def test_scoped_addresses_are_never_addresses(value: str) -> None:
    # A zone ID names a link: as a KV key it would be a second spelling of a held address.
    with pytest.raises(ValidationError) as info:
        PoolSchema().load({"name": "p", "requested-ip": value})
    assert "zone ID" in str(info.value)


# -- Pool ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["requested-ip", "requested_ip"])
def test_pool_requested_ip_both_spellings(key: str) -> None:
    assert PoolSchema().load({"name": "p", key: "10.0.21.123"}) == {
        "name": "p", "requested_ip": ip("10.0.21.123")}


def test_pool_both_spellings_agreeing_is_fine() -> None:
    loaded = PoolSchema().load({"name": "p", "requested-ip": "fd00::5", "requested_ip": "fd00::5"})
    assert loaded["requested_ip"] == ip("fd00::5")


def test_pool_both_spellings_disagreeing_is_an_error() -> None:
    with pytest.raises(ValidationError) as info:
        PoolSchema().load({"name": "p", "requested-ip": "10.0.0.1", "requested_ip": "10.0.0.2"})
    assert "requested_ip" in info.value.messages


def test_pool_without_requested_ip() -> None:
    assert PoolSchema().load({"name": "p"}) == {"name": "p", "requested_ip": None}


@pytest.mark.parametrize(
    "name", ["", "a/b", "/", "..", ".", "a?b", "a#b", "a%2Fb", " ", "a b", "a\tb", "a\n"]
)
def test_pool_name_must_be_one_safe_segment(name: str) -> None:
    with pytest.raises(ValidationError) as info:
        PoolSchema().load({"name": name})
    assert "name" in info.value.messages


@pytest.mark.parametrize("name", ["pool-name", "p_1.v2", "Pool.A", "10.0.20.0-23"])
def test_pool_name_ordinary_names(name: str) -> None:
    assert PoolSchema().load({"name": name})["name"] == name


@pytest.mark.parametrize(
    "pool", [{}, {"name": 5}, {"name": None}, {"name": "p", "requested-ip": "10.0.0.999"},
             {"name": "p", "requested_ip": "pool-ip"}],
)
def test_pool_invalid_objects(pool: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        PoolSchema().load(pool)


# -- network config: ipam section and the whole thing via cni/config.py --------------------------
def netconf(**over: Any) -> dict[str, Any]:
    conf: dict[str, Any] = {
        "cniVersion": "1.0.0",
        "name": "net",
        "ipam": {"type": "ipam-delegated", "consul_servers": ["http://127.0.0.1:8500"]},
        "prevResult": {"cniVersion": "1.0.0", "ips": [], "pools": [{"name": "p"}]},
    }
    conf.update(over)
    return conf


def load_error(conf: dict[str, Any]) -> CNIError:
    with pytest.raises(CNIError) as info:
        config.load(conf, "ADD", {})
    return info.value


def test_config_defaults() -> None:
    conf = config.load(netconf(), "ADD", {})
    assert conf.cni_version == "1.0.0"
    assert conf.pools == [config.PoolRequest("p", None)]
    assert conf.consul.servers == ["http://127.0.0.1:8500"]
    assert conf.consul.token is None
    assert conf.consul.kv_prefix == "ipam/"
    assert 0 < conf.consul.connect_timeout <= 10 and 0 < conf.consul.read_timeout <= 10
    assert conf.prev_ips == []


def test_config_timeouts_are_configurable() -> None:
    ipam = {"consul_servers": ["http://a:1"], "consul_connect_timeout": 0.2,
            "consul_read_timeout": 0.3, "timeout": 1}
    conf = config.load(netconf(ipam=ipam), "ADD", {})
    assert (conf.consul.connect_timeout, conf.consul.read_timeout, conf.consul.timeout) == (
        0.2, 0.3, 1.0)


def test_config_every_pool_in_order_with_both_spellings() -> None:
    prev = {"pools": [{"name": "b", "requested-ip": "10.0.0.5"}, {"name": "a"},
                      {"name": "c", "requested_ip": "fd00::9"}]}
    conf = config.load(netconf(prevResult=prev), "ADD", {})
    assert conf.pools == [config.PoolRequest("b", ip("10.0.0.5")), config.PoolRequest("a"),
                          config.PoolRequest("c", ip("fd00::9"))]


def test_config_prev_ips_are_read() -> None:
    prev = {"ips": [{"address": "10.0.21.100/23", "gateway": "10.0.20.1"}],
            "pools": [{"name": "p"}]}
    conf = config.load(netconf(prevResult=prev), "ADD", {})
    assert [str(i) for i in conf.prev_ips] == ["10.0.21.100/23"]


@pytest.mark.parametrize(
    ("ipam", "needle"),
    [
        ({}, "consul_servers: Missing data"),
        ({"consul_servers": []}, "consul_servers"),
        ({"consul_servers": None}, "consul_servers"),
        ({"consul_servers": "http://127.0.0.1:8500"}, "consul_servers"),
        ({"consul_servers": ["10.20.30.40:8500"]}, "consul_servers[0]: not an http(s) URL"),
        ({"consul_servers": ["http://"]}, "consul_servers[0]: not an http(s) URL"),
        ({"consul_servers": ["http://h:99999"]}, "consul_servers[0]: not an http(s) URL"),
        ({"consul_servers": ["http://h:8500/?x=1"]}, "consul_servers[0]: a Consul server URL"),
        ({"consul_servers": ["http://h st:8500"]}, "consul_servers[0]"),
        ({"consul_servers": ["ftp://10.20.30.40"]}, "consul_servers[0]"),
        ({"consul_servers": ["http://ok:1", ""]}, "consul_servers[1]"),
        ({"consul_servers": [8500]}, "consul_servers[0]"),
        ({"consul_servers": ["http://a:1"], "timeout": -1}, "timeout"),
        ({"consul_servers": ["http://a:1"], "consul_read_timeout": "soon"}, "consul_read_timeout"),
    ],
)
def test_config_bad_consul_servers_and_timeouts(ipam: dict[str, Any], needle: str) -> None:
    err = load_error(netconf(ipam=ipam))
    assert err.code == Code.INVALID_CONFIG
    assert needle in err.msg


@pytest.mark.parametrize(
    ("prev", "needle"),
    [
        (None, "pools"),
        ({}, "pools"),
        ({"pools": []}, "pools"),
        ({"pools": "p"}, "pools"),
        ({"pools": [{}]}, "pools[0].name"),
        ({"pools": [{"name": "ok"}, {"name": "a/b"}]}, "pools[1].name"),
        ({"pools": [{"name": ".."}]}, "pools[0].name"),
        ({"pools": [{"name": "p", "requested-ip": "x"}]}, "pools[0].requested_ip"),
        ({"pools": [{"name": "p", "requested-ip": "10.0.0.1", "requested_ip": "10.0.0.2"}]},
         "disagree"),
        ({"pools": [{"name": "p"}, {"name": "p"}]}, "more than once"),
        ({"ips": [{"address": "10.0.0.1"}], "pools": [{"name": "p"}]}, "ips[0].address"),
    ],
)
def test_config_bad_pools(prev: dict[str, Any] | None, needle: str) -> None:
    err = load_error(netconf(prevResult=prev))
    assert err.code == Code.INVALID_CONFIG
    assert needle in err.msg


def test_config_missing_ipam_is_invalid() -> None:
    conf = netconf()
    del conf["ipam"]
    err = load_error(conf)
    assert (err.code, "ipam" in err.msg) == (Code.INVALID_CONFIG, True)


@pytest.mark.parametrize("version", ["0.3.1", "0.2.0", "2.0.0", "1.0"])
def test_config_unsupported_version(version: str) -> None:
    err = load_error(netconf(cniVersion=version))
    assert err.code == Code.INCOMPATIBLE_VERSION
    assert version in err.msg and "0.4.0" in err.msg and "1.0.0" in err.msg


@pytest.mark.parametrize("version", [None, "", 1])
def test_config_missing_version(version: Any) -> None:
    err = load_error(netconf(cniVersion=version))
    assert err.code == Code.INVALID_CONFIG
    assert "cniVersion" in err.msg


def test_supported_versions() -> None:
    assert {"0.4.0", "1.0.0"} <= set(SUPPORTED_VERSIONS)


@pytest.mark.parametrize(
    ("raw", "code"), [(b"{", Code.DECODE_FAILURE), (b"", Code.DECODE_FAILURE),
                      (b"\xff", Code.DECODE_FAILURE), (b"[]", Code.INVALID_CONFIG),
                      (b'"x"', Code.INVALID_CONFIG)],
)
def test_decode(raw: bytes, code: Code) -> None:
    with pytest.raises(CNIError) as info:
        stdin.decode(raw)
    assert info.value.code == code


def test_ipam_schema_ignores_unknown_keys() -> None:
    loaded = IpamSchema().load({"consul_servers": ["https://consul.example:8501"],
                                "type": "ipam-delegated", "delegates": ["x"]})
    assert loaded["consul_servers"] == ["https://consul.example:8501"]


def test_redact_hides_token_keeps_the_rest() -> None:
    data = netconf(ipam={"consul_servers": ["http://a:1"], "consul_token": "s3cret",
                         "consul_token_file": "/etc/token"})
    red = config.redact(data)
    assert "s3cret" not in json.dumps(red)
    assert red["ipam"]["consul_token_file"] == "/etc/token"
    assert red["ipam"]["consul_servers"] == ["http://a:1"]
    assert data["ipam"]["consul_token"] == "s3cret"  # the original is untouched


# -- result per version --------------------------------------------------------------------------
def assigned(addr: str, subnet: str, gateway: str | None = None) -> result.Assigned:
    rng = IPRange.build(ipaddress.ip_network(subnet), None, None,
                        ip(gateway) if gateway else None)
    return result.Assigned("p", ip(addr), rng)


def test_result_0_4_0_has_ip_versions() -> None:
    out = result.build("0.4.0", None, [assigned("10.0.21.100", "10.0.20.0/23", "10.0.20.1"),
                                       assigned("fd00::5", "fd00::/64", "fd00::1")])
    assert out == {
        "cniVersion": "0.4.0",
        "ips": [{"version": "4", "address": "10.0.21.100/23", "gateway": "10.0.20.1"},
                {"version": "6", "address": "fd00::5/64", "gateway": "fd00::1"}],
        "routes": [{"dst": "0.0.0.0/0", "gw": "10.0.20.1"}, {"dst": "::/0", "gw": "fd00::1"}],
        "dns": {},
    }


def test_result_1_0_0_has_no_ip_versions() -> None:
    out = result.build("1.0.0", None, [assigned("10.0.21.100", "10.0.20.0/23", "10.0.20.1")])
    assert out == {
        "cniVersion": "1.0.0",
        "ips": [{"address": "10.0.21.100/23", "gateway": "10.0.20.1"}],
        "routes": [{"dst": "0.0.0.0/0", "gw": "10.0.20.1"}],
        "dns": {},
    }


@pytest.mark.parametrize("version", ["0.4.0", "1.0.0"])
def test_result_without_gateway_has_no_route(version: str) -> None:
    out = result.build(version, None, [assigned("10.3.0.1", "10.3.0.0/30")])
    assert out["routes"] == []
    assert "gateway" not in out["ips"][0]


def test_result_keeps_prev_ips_and_one_default_route_per_family() -> None:
    prev = {"cniVersion": "1.0.0",
            "ips": [{"address": "192.168.5.5/24", "gateway": "192.168.5.1"}],
            "routes": [{"dst": "0.0.0.0/0", "gw": "192.168.5.1"}],
            "dns": {"nameservers": ["1.1.1.1"]}, "pools": [{"name": "p"}]}
    out = result.build("1.0.0", prev, [assigned("10.0.0.2", "10.0.0.0/24", "10.0.0.1")])
    assert out["ips"] == [{"address": "192.168.5.5/24", "gateway": "192.168.5.1"},
                          {"address": "10.0.0.2/24", "gateway": "10.0.0.1"}]
    assert out["routes"] == [{"dst": "0.0.0.0/0", "gw": "192.168.5.1"}]
    assert out["dns"] == {"nameservers": ["1.1.1.1"]}
    assert "pools" not in out


def test_result_does_not_repeat_an_address_already_in_prev() -> None:
    prev = {"ips": [{"address": "10.0.0.2/24", "gateway": "10.0.0.1"}]}
    out = result.build("1.0.0", prev, [assigned("10.0.0.2", "10.0.0.0/24", "10.0.0.1")])
    assert out["ips"] == [{"address": "10.0.0.2/24", "gateway": "10.0.0.1"}]


# -- error and version objects -------------------------------------------------------------------
@pytest.mark.parametrize("version", ["0.4.0", "1.0.0"])
def test_cni_error_wire_shape(version: str) -> None:
    err = CNIError(Code.POOL_FULL, "pool 'p' is full", "try another pool")
    assert err.to_wire(version) == {"cniVersion": version, "code": 122,
                                    "msg": "pool 'p' is full", "details": "try another pool"}
    assert ErrorSchema().dump(err.to_wire(version)) == err.to_wire(version)


def test_error_codes_match_the_spec_and_upstream() -> None:
    assert {c.name: int(c) for c in Code if c in {
        Code.INCOMPATIBLE_VERSION, Code.INVALID_ENV, Code.DECODE_FAILURE, Code.INVALID_CONFIG,
        Code.TRY_AGAIN_LATER, Code.HTTP, Code.MISSING_RESOURCE, Code.INVALID_RESOURCE,
        Code.POOL_FULL, Code.NOT_IN_POOL, Code.KV_WRITE_FAILED}} == {
        "INCOMPATIBLE_VERSION": 1, "INVALID_ENV": 4, "DECODE_FAILURE": 6, "INVALID_CONFIG": 7,
        "TRY_AGAIN_LATER": 11, "HTTP": 111, "MISSING_RESOURCE": 114, "INVALID_RESOURCE": 117,
        "POOL_FULL": 122, "NOT_IN_POOL": 124, "KV_WRITE_FAILED": 125}


def test_version_object() -> None:
    assert VersionSchema().dump({"cniVersion": "1.0.0", "supportedVersions": ["0.4.0"]}) == {
        "cniVersion": "1.0.0", "supportedVersions": ["0.4.0"]}


# -- names that become part of a KV path (issue 25, finding 1) -----------------------------------
@pytest.mark.parametrize(
    "name",
    ["..", ".", "a/b", "", "-net", ".net", "_net", "net work", "a%2Fb", "net?x", "../x",
     "net\n", "n\u00e9t", "net/", "a\\b"],
    ids=repr,
)
@pytest.mark.parametrize("command", ["ADD", "DEL", "CHECK", "GC", "STATUS"])
def test_a_network_name_outside_the_cni_rule_is_an_invalid_config(
    name: str, command: str
) -> None:
    conf = netconf(name=name, **{"cni.dev/valid-attachments": []})
    with pytest.raises(CNIError) as info:
        config.load(conf, command, {})
    assert info.value.code == Code.INVALID_CONFIG
    assert info.value.msg == (
        f"invalid network config: name: network name {name!r} is not valid: the CNI spec asks "
        "for a letter or digit, then letters, digits, '_', '.' or '-'"
    )


@pytest.mark.parametrize("name", ["net", "n", "0", "Net.v1_a-b", "a..b", "a.", "x" * 300])
def test_network_names_the_cni_rule_allows(name: str) -> None:
    assert config.load(netconf(name=name), "ADD", {}).name == name


def test_a_network_config_without_a_name_is_invalid() -> None:
    conf = netconf()
    del conf["name"]
    err = load_error(conf)
    assert err.code == Code.INVALID_CONFIG
    assert err.msg == (
        "invalid network config: name: the network config has no name (the CNI spec requires one)"
    )


@pytest.mark.parametrize(
    ("ifname", "valid"),
    [("eth0", True), ("e" * 15, True), ("e" * 16, False), ("\u00e9" * 7, True),
     ("\u00e9" * 8, False), ("%x", True), ("a?b#", True), (".", False), ("..", False),
     ("...", True), ("a/b", False), ("a:b", False), ("a b", False), ("", False)],
)
def test_interface_names_follow_the_kernels_rule(ifname: str, valid: bool) -> None:
    from ipam_da_consul.cni.env import read_env

    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_IFNAME": ifname}
    if valid:
        assert read_env(env).ifname == ifname
        return
    with pytest.raises(CNIError) as info:
        read_env(env)
    assert info.value.code == Code.INVALID_ENV
    assert info.value.msg.startswith(f"CNI_IFNAME {ifname!r} is not a valid interface name")


@pytest.mark.parametrize(
    ("cid", "valid"),
    [("c1", True), ("a..b", True), ("a.", True), ("0_x-y.z", True), ("..", False),
     (".", False), (".x", False), ("-x", False), ("a/b", False), ("a%2Fb", False),
     ("a b", False), ("", False), ("x\n", False)],
)
def test_container_ids_follow_the_cni_rule(cid: str, valid: bool) -> None:
    # The ID is a segment of fence keys, taken as it is: none may be '.' or '..'.
    from ipam_da_consul.cni.env import read_env

    env = {"CNI_COMMAND": "DEL", "CNI_CONTAINERID": cid, "CNI_IFNAME": "eth0"}
    if valid:
        assert read_env(env).container_id == cid
        return
    with pytest.raises(CNIError) as info:
        read_env(env)
    assert info.value.code == Code.INVALID_ENV
    assert info.value.msg.startswith(f"CNI_CONTAINERID {cid!r} is not valid")


# -- what a pool's keys may hold (issue 25, finding 5) -------------------------------------------
def test_an_add_leaves_out_runtime_names_that_would_make_its_allocation_too_large() -> None:
    from ipam_da_consul.allocator.schemas import MAX_ALLOCATION_BYTES

    env = {"CNI_CONTAINERID": "c" * 64, "CNI_IFNAME": "eth0"}
    usual = {"K8S_POD_NAMESPACE": "n" * 63, "K8S_POD_NAME": "p" * 253}
    conf = config.load(netconf(ipam={**netconf()["ipam"], "host": "h"}), "ADD", env, usual)
    assert conf.runtime == usual
    huge = {"K8S_POD_NAME": "p" * MAX_ALLOCATION_BYTES}
    conf = config.load(netconf(ipam={**netconf()["ipam"], "host": "h"}), "ADD", env, huge)
    assert conf.runtime == {}
    # DEL writes no allocation: nothing to leave out.
    assert config.load(netconf(), "DEL", env, huge).runtime == huge


def test_an_add_whose_allocation_would_be_too_large_is_refused() -> None:
    env = {"CNI_CONTAINERID": "c" * 5000, "CNI_IFNAME": "eth0"}
    err = load_error_env(netconf(), env)
    assert err.code == Code.INVALID_CONFIG
    assert "more than the 4096 a pool accepts" in err.msg and "container ID" in err.msg


def load_error_env(conf: dict[str, Any], env: dict[str, str]) -> CNIError:
    with pytest.raises(CNIError) as info:
        config.load(conf, "ADD", env)
    return info.value


def test_the_largest_legitimate_allocation_fits() -> None:
    from ipam_da_consul.allocator.schemas import MAX_ALLOCATION_BYTES, dump_tombstone

    longest = {"K8S_POD_NAMESPACE": 63, "K8S_POD_NAME": 253, "K8S_POD_INFRA_CONTAINER_ID": 64,
               "K8S_POD_UID": 36, "NOMAD_ALLOC_ID": 36}
    runtime = {k: "x" * longest.get(k, 253) for k in config.RUNTIME_KEYS}
    value = dump_allocation("c" * 64, "e" * 15, "h" * 253, "n" * 253, "0" * 12, runtime, 2e9)
    assert len(value) < MAX_ALLOCATION_BYTES * 0.6
    load_allocation(value)
    load_allocation(dump_tombstone(value))


def test_a_release_of_a_value_near_the_limit_stays_readable() -> None:
    from ipam_da_consul.allocator.schemas import (
        COOLING_UNTIL_DELETED,
        MAX_ALLOCATION_BYTES,
        dump_tombstone,
    )

    body = {"target": "t", "ifname": "eth0", "other": "x" * (MAX_ALLOCATION_BYTES - 60)}
    value = json.dumps(body).encode()
    assert len(value) <= MAX_ALLOCATION_BYTES
    tomb = dump_tombstone(value)
    assert load_allocation(tomb)["free_after"] == COOLING_UNTIL_DELETED
    assert json.loads(tomb) == {"target": "t", "ifname": "eth0", "free_after": 4102444800.0}
    small = dump_tombstone(b'{"target": "t", "call": "c", "x": 1}')
    assert json.loads(small) == {"target": "t", "x": 1, "free_after": 4102444800.0}


def excluded(n: int, v6: bool = False) -> dict[str, Any]:
    if v6:
        return {"subnet": "fd00::/64", "exclude": [f"fd00::{i:x}" for i in range(2, n + 2)]}
    return {"subnet": "10.0.0.0/16", "exclude": [str(ip("10.0.0.2") + 2 * i) for i in range(n)]}


def test_ranges_at_each_limit_load() -> None:
    from ipam_da_consul.allocator.schemas import MAX_EXCLUSIONS, MAX_RANGES, MAX_RANGES_BYTES

    [r] = load_ranges(ranges_json([excluded(MAX_EXCLUSIONS)]))
    assert len(r.excluded) == MAX_EXCLUSIONS
    many = [{"subnet": f"10.{i}.0.0/24"} for i in range(MAX_RANGES)]
    assert len(load_ranges(ranges_json(many))) == MAX_RANGES
    full = ranges_json([excluded(MAX_EXCLUSIONS, v6=True)] * 2)
    assert len(full) < MAX_RANGES_BYTES


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([excluded(1025)], "[0].exclude: 1025 exclusions, more than the 1024 a range may have"),
        ([{"subnet": "10.9.0.0/24"}, excluded(3000)], "[1].exclude: 3000 exclusions"),
        ([{"subnet": f"10.{i}.0.0/24"} for i in range(65)], "65 ranges, more than the 64 a pool"),
        ([{"subnet": "10.0.0.0/24", "x": "y" * 131072}], "more than the 131072 a pool key may"),
    ],
)
def test_ranges_past_a_limit_are_refused_before_they_are_parsed(
    value: list[Any], message: str
) -> None:
    with pytest.raises(ValueError) as info:
        load_ranges(ranges_json(value))
    assert message in str(info.value)


def test_an_allocation_too_large_is_refused_before_it_is_parsed() -> None:
    raw = json.dumps({"target": "a", "pad": "x" * 5000}).encode()
    with pytest.raises(ValueError, match=f"the value is {len(raw)} bytes, more than the 4096"):
        load_allocation(raw)
    with pytest.raises(ValueError, match="more than the 4096"):
        load_allocation(b"not json at all, " * 300)  # judged by size, not as JSON


def test_every_kv_value_is_written_through_its_schema() -> None:
    from ipam_da_consul.allocator.schemas import (
        COOLING_UNTIL_DELETED,
        FenceSchema,
        TombstoneSchema,
        dump_fence,
        dump_tombstone,
    )

    assert json.loads(dump_fence("node-1", "DEL")) == {"host": "node-1", "by": "DEL"}
    assert FenceSchema().load(json.loads(dump_fence(None, "GC"))) == {"host": None, "by": "GC"}
    # Another tool's fields stay; its nulls read as they did (absent is null); the call's go.
    tomb = dump_tombstone(b'{"target": "t", "ifname": null, "call": "c", "at": 5, "x": [1]}')
    assert json.loads(tomb) == {"target": "t", "x": [1], "free_after": COOLING_UNTIL_DELETED}
    assert load_allocation(tomb)["ifname"] is None
    assert TombstoneSchema().validate(json.loads(tomb)) == {}
    # Never a value the plugin would refuse to read back.
    with pytest.raises(ValueError, match="target"):
        dump_allocation("")
    with pytest.raises(ValueError, match="by"):
        dump_fence("node-1", None)  # type: ignore[arg-type]
