"""Names that become part of a KV path (issue 25, finding 1).

urllib3 removes `.` and `..` segments from a URL before sending it, so a key holding one is a
request for another key: a GC for a network named `..` listed `ipam/.fences/../`, which reached
Consul as `/v1/kv/ipam/?recurse`, and its sweep of "expired fences" deleted live allocations of
other hosts and networks. A key written into a pool folder as `<pool>/../../secret/x` made the
helper's watcher read `secret/x` with the plugin's token.

Against a real Consul with the installed plugin; a relay in front of Consul records every path
the plugin asks for.
"""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.agent import ConsulAgent, module_consul
from tests.support.plugin import netconf, run_plugin
from tests.support.plugin_helpers import assert_cni_error, standalone_conf
from tests.support.util_procs import Helper, LossyProxy

# Its own agent: a GC on the old code swept every key of the agent that looked like an old fence.
consul = module_consul("kvpaths")

HOST = "node-a"
HOUR_AGO = time.time() - 7200
# Each one is refused by the CNI spec's rule for network names, ^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$.
BAD_NETWORKS = ["..", ".", "a/b", "", "-net", ".net", "net work", "a%2Fb", "net?x", "../x"]


def snapshot(consul: ConsulAgent) -> tuple[int, dict[str, bytes]]:
    """Every key and value of the agent, and its index (any write anywhere moves it)."""
    return consul.kv_index(), consul.tree("")


def changes(
    before: tuple[int, dict[str, bytes]], after: tuple[int, dict[str, bytes]]
) -> dict[str, Any]:
    """What moved between two snapshots: {} when nothing did."""
    (i, old), (j, new) = before, after
    out: dict[str, Any] = {}
    if i != j:
        out["index"] = (i, j)
    if gone := sorted(old.keys() - new.keys()):
        out["deleted"] = gone
    if added := sorted(new.keys() - old.keys()):
        out["written"] = added
    if changed := sorted(k for k in old.keys() & new.keys() if old[k] != new[k]):
        out["changed"] = changed
    return out


def put_raw(consul: ConsulAgent, key: str, value: bytes) -> None:
    # Through /v1/txn: the key travels in the body, where no client or router cleans its dot
    # segments, and Consul stores it as written (a KV tenant can do the same).
    ops = [{"KV": {"Verb": "set", "Key": key, "Value": base64.b64encode(value).decode()}}]
    consul.http.put(f"{consul.url}/v1/txn", json=ops, timeout=10).raise_for_status()


def delete_raw(consul: ConsulAgent, key: str) -> None:
    ops = [{"KV": {"Verb": "delete", "Key": key}}]
    consul.http.put(f"{consul.url}/v1/txn", json=ops, timeout=10).raise_for_status()


def named(conf: dict[str, Any], network: str | None) -> dict[str, Any]:
    conf = dict(conf)
    if network is None:
        del conf["name"]
    else:
        conf["name"] = network
    return conf


def seed_others(consul: ConsulAgent, make_pool: Any) -> tuple[str, str]:
    """Two pools, each holding a live allocation of another host and network, written more
    than an hour ago: to a sweep of fences that reads the whole prefix, an expired fence."""
    a = make_pool()
    b = make_pool([{"subnet": "10.1.0.0/24", "rangeStart": "10.1.0.10", "rangeEnd": "10.1.0.90"}])
    for pool, ip in ((a, "10.0.21.120"), (b, "10.1.0.20")):
        value = {"target": f"c-{pool}", "ifname": "eth0", "host": "node-b", "network": "net-b"}
        consul.put(f"ipam/{pool}/{ip}", value | {"at": HOUR_AGO})
    return a, b


def test_gc_for_a_network_named_dot_dot_touches_nothing(
    consul: ConsulAgent, make_pool: Any
) -> None:
    a, b = seed_others(consul, make_pool)
    conf = named(standalone_conf([consul.url], [a, b], "1.1.0", host=HOST), "..")
    conf["cni.dev/valid-attachments"] = []
    before = snapshot(consul)
    out = run_plugin("GC", conf, container=None, ifname=None)
    # The old code answered 0 after deleting both allocations as expired fences.
    assert changes(before, snapshot(consul)) == {}, out
    err = assert_cni_error(out, 7, "1.1.0", "'..'")
    assert "network name" in err["msg"], err


@pytest.mark.parametrize("network", BAD_NETWORKS, ids=repr)
@pytest.mark.parametrize("command", ["GC", "DEL", "ADD", "CHECK", "STATUS"])
def test_a_network_name_outside_the_cni_rule_is_refused_before_any_request(
    consul: ConsulAgent, make_pool: Any, command: str, network: str
) -> None:
    a, b = seed_others(consul, make_pool)
    conf = named(standalone_conf([consul.url], [a, b], "1.1.0", host=HOST), network)
    conf["cni.dev/valid-attachments"] = []
    per_attachment = command in ("ADD", "DEL", "CHECK")
    proxy = LossyProxy(consul.url, drop=lambda method, path: False)
    conf["ipam"]["consul_servers"] = [proxy.url]
    before = snapshot(consul)
    try:
        out = run_plugin(
            command,
            conf,
            container="c-1" if per_attachment else None,
            ifname="eth0" if per_attachment else None,
        )
    finally:
        proxy.close()
    assert changes(before, snapshot(consul)) == {}, out
    err = assert_cni_error(out, 7, "1.1.0", repr(network))
    assert "network name" in err["msg"], err
    assert proxy.seen == []  # refused while reading the config: Consul never asked


@pytest.mark.parametrize("command", ["GC", "DEL", "ADD"])
def test_a_network_without_a_name_is_refused(
    consul: ConsulAgent, make_pool: Any, command: str
) -> None:
    pool = make_pool()
    conf = named(standalone_conf([consul.url], [pool], "1.1.0", host=HOST), None)
    conf["cni.dev/valid-attachments"] = []
    before = snapshot(consul)
    one = command != "GC"
    out = run_plugin(
        command, conf, container="c-1" if one else None, ifname="eth0" if one else None
    )
    assert changes(before, snapshot(consul)) == {}, out
    assert_cni_error(out, 7, "1.1.0", "network config has no name")


def test_network_names_the_rule_allows_work_as_before(
    consul: ConsulAgent, make_pool: Any
) -> None:
    # Dots, dashes and underscores inside a name are fine, and a fence key names the network
    # exactly as before (the quoting of the old code left such names as they were).
    pool = make_pool()
    network = "Net.v1_a-b..c"
    conf = named(standalone_conf([consul.url], [pool], "1.1.0", host=HOST), network)
    add = run_plugin("ADD", conf, container="c-ok", ifname="eth0")
    assert add.rc == 0, add
    gone = run_plugin("DEL", conf, container="c-ok", ifname="eth0")
    assert gone.rc == 0, gone
    fences = consul.tree(f"ipam/.fences/{network}/")  # DEL raised the attachment's fence
    assert list(fences) == [f"ipam/.fences/{network}/c-ok/eth0"], fences
    assert consul.allocations(pool) == {}
    conf["cni.dev/valid-attachments"] = []
    assert run_plugin("GC", conf, container=None, ifname=None).rc == 0


def test_a_key_that_climbs_out_of_the_pool_folder_is_never_followed(
    consul: ConsulAgent, make_pool: Any, tmp_path: Path
) -> None:
    pool = make_pool()
    consul.put("secret/db-password", "hunter2")
    proxy = LossyProxy(consul.url, drop=lambda method, path: False)
    helper = Helper(tmp_path, stderr=tmp_path / "helper.err")
    conf = netconf([proxy.url], [{"name": pool}])
    bad = f"ipam/{pool}/../../secret/db-password"
    try:
        first = run_plugin("ADD", conf, container="c-watch", env=helper.env)
        assert first.rc == 0, first  # the helper now holds the pool and watches its folder
        put_raw(consul, bad, b'{"target": "x"}')
        assert bad in consul.tree(f"ipam/{pool}/")  # stored as written

        inproc = run_plugin("ADD", conf, container="c-in")
        err = assert_cni_error(inproc, 117, "1.0.0", repr(bad))

        # The helper's watcher sees the new key within a refresh; until then a call may
        # still be served from the copy it holds.
        end = time.monotonic() + 15
        out = run_plugin("ADD", conf, container="c-helper", env=helper.env)
        while out.rc == 0 and time.monotonic() < end:
            time.sleep(0.3)
            out = run_plugin("ADD", conf, container="c-helper", env=helper.env)
        # The old watcher sent GET /v1/kv/secret/db-password and went on serving the pool.
        asked = [path for _, path in proxy.seen]
        assert not [p for p in asked if "secret" in p], asked
        assert_cni_error(out, 117, "1.0.0", repr(bad))
        assert out.json["msg"] == err["msg"]  # the helper and the plugin say the same

        before = snapshot(consul)
        again = run_plugin("ADD", conf, container="c-helper-2", env=helper.env)
        assert_cni_error(again, 117, "1.0.0", repr(bad))
        assert changes(before, snapshot(consul)) == {}  # nothing written, not even a fence
        assert not [p for _, p in proxy.seen if "secret" in p]
        assert helper.stats()["served"] >= 2  # the helper answered those calls itself
    finally:
        helper.close()
        proxy.close()
        delete_raw(consul, bad)


@pytest.mark.parametrize(
    "name",
    ["..", ".", "10.0.21.130/..", "10.0.21.130/", "x/10.0.21.130", "a%2Fb", "a%2fb",
     "./10.0.21.130"],
    ids=repr,
)
def test_keys_under_a_pool_folder_that_are_not_one_plain_segment_are_invalid(
    consul: ConsulAgent, make_pool: Any, tmp_path: Path, name: str
) -> None:
    pool = make_pool()
    bad = f"ipam/{pool}/{name}"
    put_raw(consul, bad, b'{"target": "x"}')
    conf = netconf([consul.url], [{"name": pool}])
    try:
        before = snapshot(consul)
        inproc = run_plugin("ADD", conf, container="c-in")
        err = assert_cni_error(inproc, 117, "1.0.0", repr(bad))
        helper = Helper(tmp_path)
        try:
            out = run_plugin("ADD", conf, container="c-in", env=helper.env)
        finally:
            helper.close()
        assert_cni_error(out, 117, "1.0.0", repr(bad))
        assert out.json["msg"] == err["msg"]
        assert changes(before, snapshot(consul)) == {}
    finally:
        delete_raw(consul, bad)


def admin(proxy: LossyProxy, prefix: str, *args: str, stdin: bytes | None = None) -> Any:
    import os
    import subprocess

    from tests.support.plugin import Outcome, executable

    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONSUL_", "CNI_"))}
    p = subprocess.run(
        [executable("ipam-da-consul-admin"), "--consul", proxy.url, "--prefix", prefix, *args],
        input=stdin,
        env=env,
        capture_output=True,
        timeout=60,
    )
    return Outcome(p.returncode, p.stdout.decode(), p.stderr.decode())


def test_the_admin_cli_never_follows_odd_names_under_the_prefix(consul: ConsulAgent) -> None:
    prefix = "adm-paths/"
    consul.create_pool("ok", [{"subnet": "10.0.20.0/23", "rangeStart": "10.0.21.100",
                               "rangeEnd": "10.0.21.150"}], prefix=prefix)
    consul.put(f"{prefix}ok/10.0.21.100", {"target": "c-ok", "host": "someone"})
    consul.put("secret/db-password", "hunter2")
    odd = [f"{prefix}..", f"{prefix}.", f"{prefix}a%2Fb", f"{prefix}../x", f"{prefix}/x"]
    climbing = f"{prefix}ok/../../secret/db-password"
    for key in [*odd, climbing]:
        put_raw(consul, key, b'[{"subnet": "10.9.0.0/24"}]')
    proxy = LossyProxy(consul.url, drop=lambda method, path: False)
    try:
        listed = admin(proxy, prefix, "list", "--json")
        assert listed.rc == 0, listed
        assert [p["pool"] for p in listed.json] == ["ok"]
        assert "skipping 'adm-paths/..': not a pool" in listed.stderr
        checked = admin(proxy, prefix, "check", "--json")
        assert checked.rc == 1, checked
        problems = {
            key for pool in checked.json["pools"] for p in pool["problems"] for key in p["keys"]
        }
        assert {f"{prefix}..", f"{prefix}.", f"{prefix}a%2Fb", climbing} <= problems, problems
        for args in (["usage"], ["who-has", "10.0.21.100"], ["allocations", "ok"],
                     ["ip-of", "c-ok"]):
            out = admin(proxy, prefix, *args)
            assert out.rc == 0, (args, out)
        dry = admin(proxy, prefix, "reconcile", "--live-ids", "-", "--host", "someone",
                    stdin=b"c-other0\n")
        assert dry.rc == 0 and "10.0.21.100" in dry.stdout, dry
        # Every KV request named a key under the prefix, spelled as it is: none was cleaned
        # into another key (the old `list` read `/v1/kv/` for `adm-paths/..`).
        kv_paths = [p for _, p in proxy.seen if p.startswith("/v1/kv/")]
        assert kv_paths and all(p.startswith(f"/v1/kv/{prefix}") for p in kv_paths), kv_paths
        assert not [p for p in kv_paths if "secret" in p or "%25" in p or "/../" in p], kv_paths
    finally:
        proxy.close()
        for key in [*odd, climbing]:
            delete_raw(consul, key)
        consul.delete_tree(prefix)
