"""CNI 1.1.0: the version itself, GC (release this host's stale allocations) and STATUS (could an
ADD be served now). Runs the installed plugin against the real dev agent; allocations of other
hosts and of tools that record no host are seeded straight into KV, as they would appear in a
pool shared by many hosts."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.agent import free_ports
from tests.support.plugin import run_plugin
from tests.support.plugin_helpers import standalone_conf

HOST = "node-a"  # this host's identity in every config here, so "ours" is known exactly
POOL_B_RANGES = [{"subnet": "10.1.0.0/24", "rangeStart": "10.1.0.10", "rangeEnd": "10.1.0.90"}]


def conf11(
    consul: Any, *pools: str, version: str = "1.1.0", servers: list[str] | None = None, **top: Any
) -> dict[str, Any]:
    ipam = {k[len("ipam_"):]: top.pop(k) for k in list(top) if k.startswith("ipam_")}
    conf = standalone_conf(servers or [consul.url], list(pools), version, host=HOST, **ipam)
    conf.update(top)
    return conf


def gc(conf: dict[str, Any]) -> Any:
    # GC and STATUS are not about one attachment: the runtime sets no container or ifname.
    return run_plugin("GC", conf, container=None, ifname=None)


def status(conf: dict[str, Any], timeout: float = 60) -> Any:
    return run_plugin("STATUS", conf, container=None, ifname=None, timeout=timeout)


def attachments(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"containerID": c, "ifname": i} for c, i in pairs]


NET = "n"  # the network name of every config here (standalone_conf)


def seed(
    consul: Any,
    pool: str,
    ip: str,
    target: str,
    ifname: str | None,
    host: str | None,
    network: str | None = NET,
):
    body = {"target": target, "ifname": ifname, "host": host, "network": network}
    consul.put(f"ipam/{pool}/{ip}", {k: v for k, v in body.items() if v is not None})


def seed_mix(consul: Any, pool: str) -> None:
    """One allocation of each kind GC must tell apart."""
    seed(consul, pool, "10.0.21.101", "c-valid", "eth0", HOST)  # ours, still attached
    seed(consul, pool, "10.0.21.102", "c-stale", "eth0", HOST)  # ours, gone from the runtime
    seed(consul, pool, "10.0.21.103", "c-whole", None, HOST)  # ours, no ifname, container valid
    seed(consul, pool, "10.0.21.104", "c-other", "eth0", "node-b")  # another host's, stale
    seed(consul, pool, "10.0.21.105", "c-nohost", "eth0", None)  # no host recorded, stale
    seed(consul, pool, "10.0.21.106", "c-net-b", "eth1", HOST, "net-b")  # another network's
    seed(consul, pool, "10.0.21.107", "c-old", "eth0", HOST, None)  # an older version's


VALID = attachments(("c-valid", "eth0"), ("c-whole", "net1"))
MIX_AFTER_GC = {
    "10.0.21.101": "c-valid",
    "10.0.21.103": "c-whole",
    "10.0.21.104": "c-other",
    "10.0.21.105": "c-nohost",
    "10.0.21.106": "c-net-b",
    "10.0.21.107": "c-old",
}


def assert_error(out: Any, code: int, *words: str) -> None:
    assert out.rc == code, out
    body = out.json
    assert body["code"] == code, out
    assert body["cniVersion"] == "1.1.0" or code == 1, out
    for word in words:
        assert word.lower() in body["msg"].lower(), out
    assert "Traceback" not in out.stdout


# -- version ----------------------------------------------------------------------------------


def test_version_lists_1_1_0():
    out = run_plugin("VERSION", {"cniVersion": "1.1.0"}, container=None, ifname=None)
    assert out.rc == 0, out
    assert out.json == {"cniVersion": "1.1.0", "supportedVersions": ["0.4.0", "1.0.0", "1.1.0"]}


def test_add_records_this_host(consul, make_pool):
    pool = make_pool()
    out = run_plugin("ADD", conf11(consul, pool), container="c-add", ifname="eth1")
    assert out.rc == 0, out
    assert out.json["cniVersion"] == "1.1.0"
    assert "version" not in out.json["ips"][0]
    value = consul.get_json(f"ipam/{pool}/10.0.21.100")
    assert value.pop("call")  # this call's nonce: its rollback removes only its own write
    assert value == {"target": "c-add", "ifname": "eth1", "host": HOST, "network": NET}


# -- GC ----------------------------------------------------------------------------------------


def test_gc_releases_only_this_hosts_stale_allocations(consul, make_pool):
    pool = make_pool()
    seed_mix(consul, pool)
    ranges = consul.get(f"ipam/{pool}")
    out = gc(conf11(consul, pool, **{"cni.dev/valid-attachments": VALID}))
    assert out.rc == 0 and out.stdout == "", out
    assert consul.allocations(pool) == MIX_AFTER_GC
    assert consul.get(f"ipam/{pool}") == ranges
    assert consul.get(f"ipam/{pool}/") == b""


def test_gc_matches_container_and_interface(consul, make_pool):
    # The same container on another interface is a different attachment.
    pool = make_pool()
    seed(consul, pool, "10.0.21.110", "c-multi", "eth0", HOST)
    seed(consul, pool, "10.0.21.111", "c-multi", "eth1", HOST)
    out = gc(
        conf11(consul, pool, **{"cni.dev/valid-attachments": attachments(("c-multi", "eth0"))})
    )
    assert out.rc == 0 and out.stdout == "", out
    assert consul.allocations(pool) == {"10.0.21.110": "c-multi"}


def test_gc_releases_what_add_wrote(consul, make_pool):
    pool = make_pool()
    conf = conf11(consul, pool)
    for cid in ("c-keep", "c-drop"):
        assert run_plugin("ADD", conf, container=cid).rc == 0
    out = gc({**conf, "cni.dev/valid-attachments": attachments(("c-keep", "eth0"))})
    assert out.rc == 0 and out.stdout == "", out
    assert consul.allocations(pool) == {"10.0.21.100": "c-keep"}


def test_gc_reads_the_older_attachments_name(consul, make_pool):
    pool = make_pool()
    seed_mix(consul, pool)
    out = gc(conf11(consul, pool, **{"cni.dev/attachments": VALID}))
    assert out.rc == 0 and out.stdout == "", out
    assert consul.allocations(pool) == MIX_AFTER_GC


@pytest.mark.parametrize("listing", ["missing", "null", "old-null"])
def test_gc_without_a_list_releases_nothing(consul, make_pool, listing):
    pool = make_pool()
    seed_mix(consul, pool)
    top: dict[str, Any] = {}
    if listing == "null":
        top["cni.dev/valid-attachments"] = None
    elif listing == "old-null":
        top["cni.dev/attachments"] = None
    before = consul.kv_index()
    out = gc(conf11(consul, pool, **top))
    assert_error(out, 7, "cni.dev/valid-attachments")
    assert consul.kv_index() == before
    assert len(consul.allocations(pool)) == 7


def test_gc_with_an_empty_list_releases_all_of_this_host(consul, make_pool):
    pool = make_pool()
    seed_mix(consul, pool)
    out = gc(conf11(consul, pool, **{"cni.dev/valid-attachments": []}))
    assert out.rc == 0 and out.stdout == "", out
    assert consul.allocations(pool) == {
        "10.0.21.104": "c-other",
        "10.0.21.105": "c-nohost",
        "10.0.21.106": "c-net-b",
        "10.0.21.107": "c-old",
    }


def test_gc_host_defaults_to_the_hostname(consul, make_pool):
    # Without ipam.host, ADD records the hostname tagged with a hash of /etc/machine-id, and GC
    # of another identity must leave it alone.
    import socket

    from ipam_da_consul.cni.config import default_host

    assert default_host().partition("#")[0] == socket.gethostname()
    pool = make_pool()
    conf = conf11(consul, pool)
    del conf["ipam"]["host"]
    assert run_plugin("ADD", conf, container="c-hn").rc == 0
    assert consul.get_json(f"ipam/{pool}/10.0.21.100")["host"] == default_host()
    out = gc(conf11(consul, pool, **{"cni.dev/valid-attachments": []}))  # host node-a
    assert out.rc == 0, out
    assert consul.allocations(pool) == {"10.0.21.100": "c-hn"}
    out = gc({**conf, "cni.dev/valid-attachments": []})
    assert out.rc == 0, out
    assert consul.allocations(pool) == {}


@pytest.mark.parametrize("version", ["0.4.0", "1.0.0"])
def test_gc_needs_1_1_0(consul, make_pool, version):
    pool = make_pool()
    seed_mix(consul, pool)
    before = consul.kv_index()
    out = gc(conf11(consul, pool, version=version, **{"cni.dev/valid-attachments": []}))
    assert_error(out, 1, "1.1.0")
    assert out.json["cniVersion"] == version
    assert consul.kv_index() == before


def test_gc_invalid_attachment_entry_is_invalid_config(consul, make_pool):
    pool = make_pool()
    seed_mix(consul, pool)
    before = consul.kv_index()
    out = gc(conf11(consul, pool, **{"cni.dev/valid-attachments": [{"ifname": "eth0"}]}))
    assert_error(out, 7)
    assert consul.kv_index() == before


def test_gc_keeps_going_past_a_missing_pool(consul, make_pool):
    a, b = make_pool(), make_pool(POOL_B_RANGES)
    missing = f"{a}-missing"
    seed(consul, a, "10.0.21.102", "c-stale", "eth0", HOST)
    seed(consul, b, "10.1.0.20", "c-stale", "eth0", HOST)
    seed(consul, b, "10.1.0.21", "c-valid", "eth0", HOST)
    conf = conf11(consul, a, missing, b, **{"cni.dev/valid-attachments": VALID})
    out = gc(conf)
    assert_error(out, 125, missing)
    assert consul.allocations(a) == {}
    assert consul.allocations(b) == {"10.1.0.21": "c-valid"}


def test_gc_keeps_going_past_bad_keys_and_reports_them_all(consul, make_pool):
    a, b = make_pool(), make_pool(POOL_B_RANGES)
    consul.put(f"ipam/{a}/not-an-ip", {"target": "x"})
    consul.put(f"ipam/{b}/10.1.0.30", "this is not JSON")
    seed(consul, a, "10.0.21.102", "c-stale", "eth0", HOST)
    seed(consul, b, "10.1.0.20", "c-stale", "eth0", HOST)
    out = gc(conf11(consul, a, b, **{"cni.dev/valid-attachments": []}))
    assert_error(out, 125, f"ipam/{a}/not-an-ip", f"ipam/{b}/10.1.0.30")
    # The readable stale keys were released anyway; the unreadable ones are left for a human.
    assert consul.get(f"ipam/{a}/10.0.21.102") is None
    assert consul.get(f"ipam/{b}/10.1.0.20") is None
    assert consul.get(f"ipam/{a}/not-an-ip") is not None
    assert consul.get(f"ipam/{b}/10.1.0.30") == b"this is not JSON"


def test_gc_without_pools_does_nothing(consul, make_pool):
    # Behind ipam-delegated the pools are not in the config: GC cannot know them.
    pool = make_pool()
    seed_mix(consul, pool)
    conf = conf11(consul, **{"cni.dev/valid-attachments": []})
    del conf["ipam"]["pools"]
    before = consul.kv_index()
    out = gc(conf)
    assert out.rc == 0 and out.stdout == "", out
    assert consul.kv_index() == before


# -- STATUS ------------------------------------------------------------------------------------


def test_status_ok(consul, make_pool):
    a, b = make_pool(), make_pool(POOL_B_RANGES)
    out = status(conf11(consul, a, b))
    assert out.rc == 0 and out.stdout == "", out


def test_status_no_server(consul, make_pool):
    pool = make_pool()
    port = free_ports(1)[0]
    conf = conf11(consul, pool, servers=[f"http://127.0.0.1:{port}"])
    conf["ipam"]["timeout"] = 1.0
    conf["ipam"]["consul_connect_timeout"] = 0.3
    out = status(conf, timeout=20)
    assert_error(out, 50, "no Consul server could be reached", f"127.0.0.1:{port}")


def test_status_missing_pool(consul, make_pool):
    pool = make_pool()
    missing = f"{pool}-missing"
    out = status(conf11(consul, pool, missing))
    assert_error(out, 50, missing, "does not exist")


@pytest.mark.parametrize(
    "value",
    [
        "not json",
        [],
        [{"subnet": "10.9.0.0/24", "rangeStart": "10.8.0.1"}],
    ],
)
def test_status_broken_ranges(consul, make_pool, value):
    pool = make_pool()
    consul.put(f"ipam/{pool}", value)
    out = status(conf11(consul, pool))
    assert_error(out, 50, f"ipam/{pool}", "valid IP Ranges")


def test_status_full_pool(consul, make_pool):
    pool = make_pool(
        [{"subnet": "10.3.0.0/24", "rangeStart": "10.3.0.10", "rangeEnd": "10.3.0.11"}]
    )
    seed(consul, pool, "10.3.0.10", "c-1", "eth0", HOST)
    assert status(conf11(consul, pool)).rc == 0
    seed(consul, pool, "10.3.0.11", "c-2", "eth0", "node-b")
    out = status(conf11(consul, pool))
    assert_error(out, 50, pool, "full")
    # And ADD agrees: it could not be served.
    add = run_plugin("ADD", conf11(consul, pool), container="c-3")
    assert add.rc == 122, add


def test_status_warns_below_min_free(consul, make_pool):
    pool = make_pool(
        [{"subnet": "10.3.1.0/24", "rangeStart": "10.3.1.10", "rangeEnd": "10.3.1.13",
          "exclude": ["10.3.1.13"]}]
    )  # three addresses
    seed(consul, pool, "10.3.1.10", "c-1", "eth0", HOST)
    seed(consul, pool, "10.3.1.99", "c-out", "eth0", HOST)  # outside the range: costs none
    assert status(conf11(consul, pool, ipam_min_free=2)).rc == 0
    seed(consul, pool, "10.3.1.11", "c-2", "eth0", HOST)
    out = status(conf11(consul, pool, ipam_min_free=2))
    assert_error(out, 50, pool, "1 free", "min_free (2)")
    assert status(conf11(consul, pool)).rc == 0  # without the setting: one free is ready
    before = consul.kv_index()
    out = status(conf11(consul, pool, ipam_min_free=-1))
    assert_error(out, 7, "min_free")
    assert consul.kv_index() == before


@pytest.mark.parametrize("version", ["0.4.0", "1.0.0"])
def test_status_needs_1_1_0(consul, make_pool, version):
    out = status(conf11(consul, make_pool(), version=version))
    assert_error(out, 1, "1.1.0")


def test_status_input_errors_keep_their_codes(consul, make_pool):
    conf = conf11(consul, make_pool())
    del conf["ipam"]["consul_servers"]
    assert_error(status(conf), 7, "consul_servers")
    assert_error(status(b"{not json"), 6)
