"""The shared Consul settings (consul/settings.py) against real Consul: the plugin and the
admin CLI, run installed, apply the same prefix, token and address rules; ConsulKV.names, which
the admin CLI's pool listing now reads through, on a real KV."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from ipam_da_consul.consul import ConsulKV, ConsulSettings, build_client

from tests.e2e.test_admin import admin, assert_fails
from tests.support.agent import ConsulAgent
from tests.support.plugin import Outcome, netconf, run_plugin

ROOT_TOKEN = "root-token-for-settings-tests"
RANGES = [{"subnet": "10.0.60.0/24", "rangeStart": "10.0.60.10", "rangeEnd": "10.0.60.20"}]


def unique(stem: str) -> str:
    return f"{stem}-{os.getpid()}-{os.urandom(3).hex()}"


@contextmanager
def kv_for(consul: ConsulAgent) -> Iterator[ConsulKV]:
    client = build_client(ConsulSettings([consul.url], timeout=10.0))
    try:
        yield ConsulKV(client)
    finally:
        client.close()


def test_names_lists_keys_each_folder_once_and_the_index(consul: ConsulAgent) -> None:
    prefix = unique("names") + "/"
    consul.put(f"{prefix}a", "1")
    consul.put(f"{prefix}b/1", "1")
    consul.put(f"{prefix}b/2", "1")
    consul.put(f"{prefix}c/", "")
    with kv_for(consul) as kv:
        folded = kv.names(prefix, separator="/")
        assert folded.keys == [f"{prefix}a", f"{prefix}b/", f"{prefix}c/"]
        assert not folded.acl_filtered
        every = kv.names(prefix)
        assert every.keys == [f"{prefix}a", f"{prefix}b/1", f"{prefix}b/2", f"{prefix}c/"]
        assert every.index == folded.index > 0
        consul.put(f"{prefix}b/3", "1")
        assert kv.names(prefix, "/").index > folded.index
        missing = kv.names(unique("nothing") + "/", "/")
        assert missing.keys == [] and missing.index > 0


def test_plugin_and_admin_spell_one_prefix_many_ways(consul: ConsulAgent) -> None:
    top = unique("spelled")
    pool = "p"
    created = admin(consul, "--prefix", f"/{top}/sub", "create", pool, "--range", "10.0.60.0/24")
    assert created.rc == 0, created
    conf = netconf([consul.url], [{"name": pool}], kv_prefix=f"{top}/sub/")
    add = run_plugin("ADD", conf, container="c-spelled")
    assert add.rc == 0, add
    assert consul.allocations(pool, f"{top}/sub/") == {"10.0.60.1": "c-spelled"}
    listed = admin(consul, "--prefix", f"{top}/sub//", "allocations", pool, "--json")
    assert listed.rc == 0, listed
    assert "c-spelled" in json.dumps(listed.json)


def test_admin_refuses_the_prefixes_the_plugin_refuses(consul: ConsulAgent) -> None:
    for bad in ("a b/", "50%/", "x?y"):
        out = admin(consul, "--prefix", bad, "list")
        assert_fails(out, 2, "--prefix cannot hold", repr(bad))
        plugin = run_plugin("ADD", netconf([consul.url], [{"name": "p"}], kv_prefix=bad))
        assert plugin.rc == 7, plugin
        assert "ipam.kv_prefix: a KV prefix cannot hold" in plugin.json["msg"]


def test_admin_refuses_a_server_url_the_plugin_refuses(consul: ConsulAgent) -> None:
    url = f"{consul.url}/?dc=dc1"
    assert_fails(admin(None, "--consul", url, "list"), 2, "is not a Consul HTTP address")
    plugin = run_plugin("ADD", netconf([url], [{"name": "p"}]))
    assert plugin.rc == 7, plugin
    assert "a Consul server URL has no spaces, query or fragment" in plugin.json["msg"]


@pytest.fixture(scope="module")
def acl_consul() -> Iterator[ConsulAgent]:
    hcl = f'acl {{ enabled = true  default_policy = "deny"  tokens {{ master = "{ROOT_TOKEN}" }} }}'
    agent = ConsulAgent("settings-acl", extra=["-hcl", hcl], token=ROOT_TOKEN).start()
    try:
        yield agent
    finally:
        agent.close()


def add_with_token_file(agent: ConsulAgent, pool: str, path: Path, container: str) -> Outcome:
    conf = netconf([agent.url], [{"name": pool}], consul_token_file=str(path))
    # CONSUL_HTTP_TOKEN would be good enough; the file named in the config wins over it.
    return run_plugin("ADD", conf, container=container, env={"CONSUL_HTTP_TOKEN": ROOT_TOKEN})


def test_token_files_plugin_empty_is_anonymous_admin_empty_is_refused(
    acl_consul: ConsulAgent, tmp_path: Path
) -> None:
    pool = unique("tok")
    acl_consul.create_pool(pool, RANGES)
    empty, good = tmp_path / "empty", tmp_path / "good"
    empty.write_text("\n")
    good.write_text(ROOT_TOKEN + "\n")
    before = acl_consul.kv_index()
    out = add_with_token_file(acl_consul, pool, empty, "c-anon")
    assert out.rc in (111, 125), out
    assert "403" in out.json["msg"] and ROOT_TOKEN not in out.stdout + out.stderr
    assert acl_consul.kv_index() == before
    out = add_with_token_file(acl_consul, pool, good, "c-file")
    assert out.rc == 0, out
    assert acl_consul.allocations(pool) == {"10.0.60.10": "c-file"}

    env = {"CONSUL_HTTP_TOKEN": ROOT_TOKEN}
    out = admin(acl_consul, "--token-file", str(empty), "usage", pool, env=env)
    assert_fails(out, 2, "--token-file", "is empty")
    out = admin(acl_consul, "usage", pool, "--json", env={"CONSUL_HTTP_TOKEN_FILE": str(good)})
    assert out.rc == 0, out
    assert out.json[0]["allocated"] == 1
    assert ROOT_TOKEN not in out.stdout + out.stderr
