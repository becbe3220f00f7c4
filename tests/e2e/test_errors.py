"""Every error of the seed's list, and bad input, through the installed executable: a CNI error
JSON on stdout, exit status = code, a readable message, and nothing written to KV."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.agent import ConsulAgent
from tests.support.plugin import BIN_DIR, NO_HELPER, executable, netconf, run_plugin
from tests.support.plugin_helpers import FAST, VERSIONS, assert_cni_error, dead_url

# -- fixtures: extra real agents and a silent TCP listener ---------------------------------------


@pytest.fixture(scope="module")
def leaderless() -> Iterator[ConsulAgent]:
    """A server waiting for two peers that never come: answers HTTP, has no raft leader."""
    agent = ConsulAgent("leaderless", dev=False, extra=["-bootstrap-expect", "3"])
    agent.start(wait_leader=False)
    yield agent
    agent.close()


ROOT_TOKEN = "root-token-for-tests"


@pytest.fixture(scope="module")
def acl_agent() -> Iterator[tuple[ConsulAgent, str]]:
    """A dev agent with ACLs on (default deny) and a token that may read KV but not write it."""
    hcl = f'acl {{ enabled = true  default_policy = "deny"  tokens {{ master = "{ROOT_TOKEN}" }} }}'
    agent = ConsulAgent("acl", extra=["-hcl", hcl], token=ROOT_TOKEN).start()
    try:
        r = agent.http.put(agent.url + "/v1/acl/policy", timeout=10, json={
            "Name": "kv-read", "Rules": 'key_prefix "" { policy = "read" }'})
        r.raise_for_status()
        r = agent.http.put(agent.url + "/v1/acl/token", timeout=10,
                           json={"Policies": [{"Name": "kv-read"}]})
        r.raise_for_status()
        yield agent, r.json()["SecretID"]
    finally:
        agent.close()


@pytest.fixture
def silent_server() -> Iterator[tuple[str, socket.socket]]:
    """A TCP listener that never answers: connections queue in its backlog, unaccepted."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", sock
    sock.close()


def was_contacted(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        conn, _ = sock.accept()
    except BlockingIOError:
        return False
    conn.close()
    return True


# -- bad environment: 4 --------------------------------------------------------------------------


def run_raw(env: dict[str, str], stdin: bytes) -> Any:
    """Run the plugin with exactly `env` (plus PATH), for variables run_plugin always sets."""
    full = {"PATH": os.environ.get("PATH", ""), "CNI_PATH": str(BIN_DIR),
            "IPAM_DA_CONSUL_SOCKET": NO_HELPER, **env}
    return subprocess.run([executable("ipam-da-consul")], input=stdin, env=full,
                          capture_output=True, timeout=60)


@pytest.mark.parametrize("version", VERSIONS)
def test_cni_command_missing(consul, make_pool, conf_for, version):
    pool = make_pool()
    index = consul.kv_index()
    p = run_raw({"CNI_CONTAINERID": "c1", "CNI_IFNAME": "eth0"},
                json.dumps(conf_for(pool, version=version)).encode())
    assert p.returncode == 4, p
    err = json.loads(p.stdout)
    assert err["code"] == 4 and "CNI_COMMAND" in err["msg"], err
    assert err["cniVersion"] == version, err
    assert consul.kv_index() == index


@pytest.mark.parametrize(
    ("command", "env", "needle", "version"),
    [
        ("FROB", {}, "CNI_COMMAND", "0.4.0"),
        ("add", {}, "CNI_COMMAND", "1.0.0"),
        ("ADD", {"CNI_CONTAINERID": ""}, "CNI_CONTAINERID", "1.0.0"),
        ("ADD", {"CNI_CONTAINERID": "-starts-with-dash"}, "CNI_CONTAINERID", "0.4.0"),
        ("ADD", {"CNI_CONTAINERID": "has/slash"}, "CNI_CONTAINERID", "1.0.0"),
        ("ADD", {"CNI_CONTAINERID": "trailing-newline\n"}, "CNI_CONTAINERID", "1.0.0"),
        ("DEL", {"CNI_CONTAINERID": "ünïcode"}, "CNI_CONTAINERID", "1.0.0"),
        ("CHECK", {"CNI_IFNAME": "a/b"}, "CNI_IFNAME", "0.4.0"),
        ("ADD", {"CNI_IFNAME": "x" * 16}, "CNI_IFNAME", "1.0.0"),
    ],
)
def test_bad_environment(consul, make_pool, conf_for, command, env, needle, version):
    pool = make_pool()
    index = consul.kv_index()
    out = run_plugin(command, conf_for(pool, version=version), env=env)
    assert_cni_error(out, 4, version, needle)  # the input's cniVersion is echoed
    assert consul.kv_index() == index


@pytest.mark.parametrize("missing", ["container", "ifname"])
def test_container_or_ifname_missing(consul, make_pool, conf_for, missing):
    pool = make_pool()
    index = consul.kv_index()
    kw = {"container": None} if missing == "container" else {"ifname": None}
    out = run_plugin("ADD", conf_for(pool), **kw)
    assert_cni_error(out, 4, "1.0.0", "CNI_CONTAINERID" if missing == "container" else "CNI_IFNAME")
    assert consul.kv_index() == index


# -- undecodable stdin: 6; unsupported version: 1 ------------------------------------------------


@pytest.mark.parametrize("stdin", [b"{", b"\xff\xfe\x00"])
def test_stdin_not_json(stdin):
    out = run_plugin("ADD", stdin)
    assert out.rc == 6, out
    err = out.json
    assert err["code"] == 6 and "not valid JSON" in err["msg"], err
    assert "Traceback" not in out.stdout + out.stderr


@pytest.mark.parametrize("stdin", [b"[]"])
def test_stdin_json_but_not_an_object(stdin):
    out = run_plugin("ADD", stdin)
    assert out.rc == 7, out
    assert out.json["code"] == 7


@pytest.mark.parametrize("version", ["0.3.1", "2.0.0"])
def test_unsupported_cni_version(consul, make_pool, conf_for, version):
    pool = make_pool()
    index = consul.kv_index()
    out = run_plugin("ADD", conf_for(pool, version=version))
    assert_cni_error(out, 1, version, version, "0.4.0", "1.0.0")
    assert consul.kv_index() == index


# -- invalid network config: 7, before any request -----------------------------------------------


def conf_with(server: str, pools: list[dict[str, Any]] | None, version: str = "1.0.0",
              **ipam: Any) -> dict[str, Any]:
    return netconf([server], pools, version, **ipam)


@pytest.mark.parametrize(
    ("pools", "needle"),
    [
        (None, "pools"),
        ([], "pools"),
        ([{}], "name"),
        ([{"name": "a/b"}], "a/b"),
        ([{"name": ".."}], ".."),
        ([{"name": "a%2e"}], "a%2e"),
        ([{"name": "a b"}], "a b"),
        ([{"name": "p", "requested-ip": "10.0.21.1", "requested_ip": "10.0.21.2"}], "disagree"),
    ],
)
def test_invalid_pools_fail_before_any_request(silent_server, pools, needle):
    url, sock = silent_server
    out = run_plugin("ADD", conf_with(url, pools, **FAST))
    assert_cni_error(out, 7, "1.0.0", needle)
    assert not was_contacted(sock)


@pytest.mark.parametrize("version", VERSIONS)
def test_prev_result_missing(silent_server, version):
    url, sock = silent_server
    conf = conf_with(url, [{"name": "p"}], version, **FAST)
    del conf["prevResult"]
    out = run_plugin("ADD", conf)
    assert_cni_error(out, 7, version, "pools")
    assert not was_contacted(sock)


@pytest.mark.parametrize(
    ("servers", "needle"),
    [
        ("missing", "consul_servers"),
        ([], "consul_servers"),
        (["10.20.30.40:8500"], "consul_servers[0]"),
    ],
)
def test_invalid_consul_servers(consul, make_pool, servers, needle):
    pool = make_pool()
    conf = netconf([], [{"name": pool}])
    if servers == "missing":
        del conf["ipam"]["consul_servers"]
    else:
        conf["ipam"]["consul_servers"] = servers
    index = consul.kv_index()
    out = run_plugin("ADD", conf)
    assert_cni_error(out, 7, "1.0.0", needle)
    assert consul.kv_index() == index


def standalone_conf(consul: ConsulAgent, pool: str, **ipam: Any) -> dict[str, Any]:
    """The config a Podman or Nomad user writes: the pools in `ipam.pools`."""
    return {
        "cniVersion": "1.0.0",
        "name": "typonet",
        "ipam": {
            "type": "ipam-da-consul",
            "consul_servers": [consul.url],
            "pools": [{"name": pool}],
            **ipam,
        },
    }


def test_misspelled_settings_fail_add_and_are_named(consul, make_pool, tmp_path):
    """Issue 22, finding 3: `timout`, `reuse_afer`, `consul_token_flie` were accepted without a
    word (the cool-down silently off, no token sent). ADD is refused naming each and the setting
    it is near; DEL goes on, warning about each on stderr and in the verbose log."""
    pool = make_pool()
    conf = standalone_conf(
        consul, pool, timout=5, reuse_afer=60, consul_token_flie="/etc/cni/token"
    )
    index = consul.kv_index()
    out = run_plugin("ADD", conf)
    err = assert_cni_error(
        out, 7, "1.0.0",
        "`timout` (did you mean `timeout`?)",
        "`reuse_afer` (did you mean `reuse_after`?)",
        "`consul_token_flie` (did you mean `consul_token_file`?)",
        "so ADD is refused",
    )
    assert err["msg"] in out.stderr
    assert consul.kv_index() == index
    log = tmp_path / "verbose.log"
    gone = run_plugin("DEL", conf, verbose=True, env={"IPAM_DA_CONSUL_LOG_FILE": str(log)})
    assert gone.rc == 0 and gone.stdout == "", gone
    for typo, meant in [("timout", "timeout"), ("reuse_afer", "reuse_after")]:
        line = (
            f"ipam key `{typo}` is not a setting of ipam-da-consul and is ignored; did you mean "
            f"`{meant}`?"
        )
        assert line in gone.stderr and line in log.read_text(), (line, gone)


def test_a_misspelled_required_key_is_named(consul, make_pool):
    pool = make_pool()
    conf = standalone_conf(consul, pool)
    conf["ipam"]["consul_server"] = conf["ipam"].pop("consul_servers")
    assert_cni_error(
        run_plugin("ADD", conf), 7, "1.0.0", "`consul_server` (did you mean `consul_servers`?)"
    )
    assert_cni_error(
        run_plugin("DEL", conf), 7, "1.0.0", "ipam.consul_servers: Missing data",
        "the ipam section has `consul_server`: did you mean `consul_servers`?",
    )


def test_another_unknown_key_is_a_warning_only(consul, make_pool):
    pool = make_pool()
    out = run_plugin("ADD", standalone_conf(consul, pool, dataDir="/var/lib/cni/networks"))
    assert out.rc == 0, out
    assert "ipam key `dataDir` is not a setting of ipam-da-consul and is ignored" in out.stderr
    # Behind ipam-delegated the section is shared with sibling delegates: not even a warning.
    out = run_plugin("ADD", netconf([consul.url], [{"name": pool}], another_delegates_key=1),
                     container="c-2")
    assert out.rc == 0 and "another_delegates_key" not in out.stderr, out


def test_ipam_section_missing(silent_server):
    conf = conf_with(silent_server[0], [{"name": "p"}])
    del conf["ipam"]
    assert_cni_error(run_plugin("ADD", conf), 7, "1.0.0", "ipam")


# -- server choice -------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_no_server_reachable(version):
    dead = [dead_url(), dead_url()]
    out = run_plugin("ADD", netconf(dead, [{"name": "p"}], version, **FAST))
    err = assert_cni_error(out, 11, version)
    assert all(url in err["msg"] for url in dead), err


def test_first_server_dead_second_used(consul, make_pool):
    pool = make_pool()
    out = run_plugin("ADD", netconf([dead_url(), consul.url], [{"name": pool}]), container="ha")
    assert out.rc == 0, out
    assert consul.allocations(pool) == {"10.0.21.100": "ha"}


def test_server_without_leader_is_skipped(consul, make_pool, leaderless):
    assert leaderless.leader() == ""
    pool = make_pool()
    out = run_plugin("ADD", netconf([leaderless.url, consul.url], [{"name": pool}]),
                     container="ha")
    assert out.rc == 0, out
    assert consul.allocations(pool) == {"10.0.21.100": "ha"}


def test_only_leaderless_server_is_unreachable(leaderless):
    out = run_plugin("ADD", netconf([leaderless.url], [{"name": "p"}], **FAST))
    assert_cni_error(out, 11, "1.0.0", leaderless.url, "leader")


def test_silent_server_times_out_and_next_is_used(consul, make_pool, silent_server):
    pool = make_pool()
    conf = netconf([silent_server[0], consul.url], [{"name": pool}],
                   consul_connect_timeout=0.3, consul_read_timeout=0.5, timeout=10)
    out = run_plugin("ADD", conf, container="patient")
    assert out.rc == 0, out
    assert consul.allocations(pool) == {"10.0.21.100": "patient"}


# -- pool contents -------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_pool_missing(consul, conf_for, version):
    index = consul.kv_index()
    out = run_plugin("ADD", conf_for("pool-that-does-not-exist", version=version))
    assert_cni_error(out, 114, version, "pool-that-does-not-exist")
    assert consul.kv_index() == index


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("not json", "not valid JSON"),
        ('{"subnet": "10.0.20.0/23"}', "non-empty"),
        ('[{"subnet": "10.0.20.0/23"}, {"subnet": "10.1.0.0/24", "rangeStart": "10.2.0.1"}]',
         "[1]"),
    ],
)
def test_invalid_ranges_key(consul, make_pool, conf_for, value, needle):
    pool = make_pool()
    consul.put(f"ipam/{pool}", value)
    index = consul.kv_index()
    out = run_plugin("ADD", conf_for(pool))
    assert_cni_error(out, 117, "1.0.0", f"ipam/{pool}", needle)
    assert consul.kv_index() == index


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("10.0.21.100", "garbage", "Allocation"),
        ("10.0.21.101", '{"owner": "x"}', "target"),
        ("not-an-ip", '{"target": "x"}', "IP address"),
    ],
)
def test_invalid_allocation_in_folder(consul, make_pool, conf_for, key, value, needle):
    pool = make_pool()
    consul.put(f"ipam/{pool}/{key}", value)
    index = consul.kv_index()
    out = run_plugin("ADD", conf_for(pool))
    assert_cni_error(out, 117, "1.0.0", f"ipam/{pool}/{key}", needle)
    assert consul.kv_index() == index


# -- KV reads and writes refused (ACL) -----------------------------------------------------------


def test_kv_write_refused(acl_agent):
    agent, read_only = acl_agent
    agent.create_pool("acl-pool", [{"subnet": "10.0.20.0/23"}])
    before = agent.tree("ipam/")
    conf = netconf([agent.url], [{"name": "acl-pool"}], consul_token=read_only)
    out = run_plugin("ADD", conf)
    err = assert_cni_error(out, 125, "1.0.0", "ipam/acl-pool/10.0.20.1", "403")
    assert "ipam/.fences/" in err["msg"]  # the write is fenced: the token must cover both
    assert read_only not in out.stdout + out.stderr, err
    assert agent.tree("ipam/") == before


def test_kv_read_refused(acl_agent):
    agent, _ = acl_agent
    agent.create_pool("acl-pool-2", [{"subnet": "10.0.20.0/23"}])
    agent.put("ipam/acl-pool-2/10.0.20.1", {"target": "c-1"})
    before = agent.tree("ipam/")
    # No token: the anonymous token may not write the fence DEL raises first.
    conf = netconf([agent.url], [{"name": "acl-pool-2"}], ips=[{"address": "10.0.20.1/23"}])
    out = run_plugin("DEL", conf)
    assert_cni_error(out, 125, "1.0.0", "ipam/.fences/", "403")
    assert agent.tree("ipam/") == before
