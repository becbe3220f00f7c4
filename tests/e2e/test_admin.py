"""The operator CLI `ipam-da-consul-admin`, run installed as a subprocess against real Consul:
the session's dev agent, and a TLS + ACL (default deny) agent for the access tests.

Pools that `list` / `check` / `usage` see as a whole live under a per-test KV prefix so other
tests' pools (and the problems seeded here) never leak into an exact assertion."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pty
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from ipam_da_consul.admin import commands
from ipam_da_consul.admin.errors import CONSUL, PROBLEMS, STATE, USAGE, StateError
from ipam_da_consul.admin.output import Progress
from ipam_da_consul.admin.settings import Settings
from ipam_da_consul.allocator.layout import Layout
from ipam_da_consul.cni.config import default_host
from ipam_da_consul.consul import ConsulClient, ConsulKV

from tests.support.agent import ConsulAgent, SecureConsulAgent, free_ports
from tests.support.plugin import Outcome, executable, netconf, run_plugin
from tests.support.util_procs import drain_pty

PROG = "ipam-da-consul-admin"
_prefixes = itertools.count()

BLUE = [
    {
        "subnet": "10.0.20.0/23",
        "rangeStart": "10.0.21.100",
        "rangeEnd": "10.0.21.150",
        "gateway": "10.0.20.1",
    }
]


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("CONSUL_", "CNI_"))}


def admin(
    consul: ConsulAgent | None,
    *args: str,
    env: dict[str, str] | None = None,
    stdin: bytes | None = None,
) -> Outcome:
    """Run the installed CLI; the agent is found through CONSUL_HTTP_ADDR given without a
    scheme, as operators usually set it."""
    full_env = clean_env()
    if consul is not None:
        full_env["CONSUL_HTTP_ADDR"] = consul.url.removeprefix("http://")
    full_env.update(env or {})
    p = subprocess.run(
        [executable(PROG), *args], input=stdin, env=full_env, capture_output=True, timeout=60
    )
    return Outcome(p.returncode, p.stdout.decode(), p.stderr.decode())


def assert_fails(out: Outcome, status: int, *words: str) -> None:
    """An expected failure: its status, nothing on stdout, one `error:` line on stderr."""
    assert out.rc == status, out
    assert out.stdout == "", out
    assert "Traceback" not in out.stderr, out
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{PROG}: error: "), out
    for word in words:
        assert word in out.stderr, out


@pytest.fixture
def prefix() -> str:
    return f"admin-{os.getpid()}-{next(_prefixes)}/"


# The session's agent holds every test's pools under ipam/, many with the seed's example ranges:
# pools that share addresses, which `create` refuses unless told (tested with their own prefix).
SHARED = ["--allow-overlap"]


def create(consul: ConsulAgent, pool: str, *specs: str, prefix: str = "ipam/") -> None:
    args = [arg for spec in specs for arg in ("--range", spec)]
    shared = SHARED if prefix == "ipam/" else []
    out = admin(consul, "--prefix", prefix, "create", pool, *args, *shared)
    assert out.rc == 0, out


# -- create ------------------------------------------------------------------------------------
def test_create_writes_the_seed_layout_the_plugin_reads(consul, pool_name):
    out = admin(
        consul,
        "create",
        pool_name,
        "--range",
        "10.0.20.0/23,10.0.21.100-10.0.21.150,gw=10.0.20.1",
        "--range",
        "fd00:20::/120,start=fd00:20::10,gw=fd00:20::1",
        *SHARED,
    )
    assert out.rc == 0, out
    assert out.stdout == f"created pool {pool_name}: 2 range(s), 291 allocatable addresses\n"
    assert consul.tree(f"ipam/{pool_name}") == {
        f"ipam/{pool_name}": json.dumps(
            [
                BLUE[0],
                {
                    "subnet": "fd00:20::/120",
                    "rangeStart": "fd00:20::10",
                    "rangeEnd": "fd00:20::ff",
                    "gateway": "fd00:20::1",
                },
            ]
        ).encode(),
        f"ipam/{pool_name}/": b"",
    }
    assert consul.get("ipam/") == b""  # the seed's top folder, for upstream readers
    # The real plugin allocates from it.
    add = run_plugin("ADD", netconf([consul.url], [{"name": pool_name}]), container="c-new")
    assert add.rc == 0, add
    assert add.json["ips"] == [{"address": "10.0.21.100/23", "gateway": "10.0.20.1"}]


def test_create_from_json_normalises_what_it_writes(consul, pool_name, tmp_path):
    ranges = [{"subnet": "10.0.33.77/24", "gateway": "10.0.33.1", "comment": "dropped"}]
    out = admin(
        consul, "create", pool_name, "--ranges-json", "-", *SHARED,
        stdin=json.dumps(ranges).encode(),
    )
    assert out.rc == 0, out
    expected = [
        {
            "subnet": "10.0.33.0/24",
            "rangeStart": "10.0.33.1",
            "rangeEnd": "10.0.33.254",
            "gateway": "10.0.33.1",
        }
    ]
    assert consul.get_json(f"ipam/{pool_name}") == expected
    # From a file, and --dry-run prints the value without writing it.
    path = tmp_path / "ranges.json"
    path.write_text(json.dumps(BLUE))
    dry = admin(consul, "create", f"{pool_name}-x", "--ranges-json", str(path), "--dry-run")
    assert dry.rc == 0, dry
    assert json.loads(dry.stdout) == BLUE
    assert consul.tree(f"ipam/{pool_name}-x") == {}


def test_create_refuses_an_existing_pool_unless_forced(consul, pool_name):
    create(consul, pool_name, "10.0.20.0/23,10.0.21.100-10.0.21.150,gw=10.0.20.1")
    key = f"ipam/{pool_name}"
    add = run_plugin("ADD", netconf([consul.url], [{"name": pool_name}]), container="keep")
    assert add.rc == 0, add
    before = consul.modify_index(key)
    out = admin(consul, "create", pool_name, "--range", "10.0.50.0/24")
    assert_fails(out, STATE, "already exists", "--force")
    assert consul.modify_index(key) == before
    assert consul.get_json(key) == BLUE
    # --force replaces the ranges (CAS on the index just read) and keeps the allocations,
    # warning that one of them no longer fits.
    out = admin(consul, "create", pool_name, "--range", "10.0.50.0/24", "--force", *SHARED)
    assert out.rc == 0, out
    assert (
        out.stdout
        == f"replaced ranges of pool {pool_name}: 1 range(s), 254 allocatable addresses\n"
    )
    assert "1 allocation(s)" in out.stderr and f"check {pool_name}" in out.stderr
    assert consul.get_json(key) == [
        {"subnet": "10.0.50.0/24", "rangeStart": "10.0.50.1", "rangeEnd": "10.0.50.254"}
    ]
    assert consul.allocations(pool_name) == {"10.0.21.100": "keep"}


BAD_CREATES = [
    (["--range", "10.0.0.0"], "Not a valid subnet"),
    (["--range", "10.0.0.0/24,10.1.0.1-10.1.0.9"], "outside subnet"),
    (["--range", "10.0.0.0/24,10.0.0.9-10.0.0.1"], "after rangeEnd"),
    (["--range", "10.0.0.0/24,gw=fd00::1"], "IP version"),
    (["--range", "10.0.0.0/24,mask=1"], "unknown item"),
    (["--range", "10.0.0.0/31"], "too small"),
    (["--range", "10.0.0.0/24", "--range", "10.0.0.128/25"], "overlap"),
]


@pytest.mark.parametrize(("args", "words"), BAD_CREATES)
def test_bad_ranges_are_refused_and_nothing_is_written(consul, pool_name, args, words):
    index = consul.kv_index()
    out = admin(consul, "create", pool_name, *args)
    assert_fails(out, USAGE, words)
    assert consul.kv_index() == index  # no write anywhere in KV


@pytest.mark.parametrize(
    ("stdin", "words"),
    [
        (b"[]", "non-empty JSON array"),
        (b"{", "not valid JSON"),
        (b'{"subnet": "10.0.0.0/24"}', "JSON array"),
        (b'[{"subnet": "10.0.0.0/24"}, {"rangeStart": "10.0.0.1"}]', "[1].subnet"),
    ],
)
def test_bad_ranges_json_is_refused_and_nothing_is_written(consul, pool_name, stdin, words):
    index = consul.kv_index()
    out = admin(consul, "create", pool_name, "--ranges-json", "-", stdin=stdin)
    assert_fails(out, USAGE, words)
    assert consul.kv_index() == index


def test_bad_pool_names_and_missing_ranges_are_usage_errors(consul):
    index = consul.kv_index()
    assert_fails(admin(consul, "create", "a/b", "--range", "10.0.0.0/24"), USAGE, "one KV path")
    out = admin(consul, "create", "p")  # neither --range nor --ranges-json: argparse says so
    assert (
        out.rc == USAGE and "one of the arguments --range --ranges-json is required" in out.stderr
    )
    assert consul.kv_index() == index


# -- list, usage, allocations ------------------------------------------------------------------
def test_list_shows_pools_under_the_prefix(consul, prefix):
    create(consul, "a", "10.0.60.0/24", prefix=prefix)
    create(consul, "b", "10.0.61.0/29,gw=10.0.61.1", "fd00:61::/120", prefix=prefix)
    consul.put(f"{prefix}notes", "not ranges")
    out = admin(consul, "list", "--prefix", prefix)
    assert out.rc == 0, out
    assert out.stdout == (
        "POOL  RANGES  CAPACITY  SUBNETS\n"
        "a          1       254  10.0.60.0/24\n"
        "b          2       260  10.0.61.0/29, fd00:61::/120\n"
    )
    assert f"skipping '{prefix}notes': not a pool" in out.stderr
    out = admin(consul, "--prefix", prefix, "list", "--json")  # global option before the command
    assert out.rc == 0, out
    assert [(p["pool"], len(p["ranges"]), p["capacity"]) for p in out.json] == [
        ("a", 1, 254),
        ("b", 2, 260),
    ]
    assert out.json[0]["ranges"] == [
        {"subnet": "10.0.60.0/24", "rangeStart": "10.0.60.1", "rangeEnd": "10.0.60.254"}
    ]
    empty = admin(consul, "list", "--prefix", f"{prefix}nothing/")
    assert (empty.rc, empty.stdout) == (0, "")


def test_usage_counts_what_the_plugin_allocated(consul, prefix):
    create(
        consul,
        "p",
        "10.0.70.0/29,gw=10.0.70.1",
        "10.0.71.0/24,10.0.71.10-10.0.71.19",
        prefix=prefix,
    )
    create(consul, "q", "10.0.72.0/24", prefix=prefix)
    conf = netconf([consul.url], [{"name": "p"}], kv_prefix=prefix)
    for cid in ("c1", "c2", "c3", "c4", "c5", "c6", "c7"):
        out = run_plugin("ADD", conf, container=cid)
        assert out.rc == 0, out
    out = admin(consul, "--prefix", prefix, "usage", "p", "--json")
    assert out.rc == 0, out
    assert out.json == [
        {
            "pool": "p",
            "capacity": 15,
            "allocated": 7,
            "free": 8,
            "percent": 46.67,
            "outside": [],
            "reserved": [],
            "invalidKeys": 0,
            "ranges": [
                {
                    "subnet": "10.0.70.0/29",
                    "rangeStart": "10.0.70.1",
                    "rangeEnd": "10.0.70.6",
                    "gateway": "10.0.70.1",
                    "size": 5,
                    "allocated": 5,
                    "free": 0,
                    "percent": 100.0,
                },
                {
                    "subnet": "10.0.71.0/24",
                    "rangeStart": "10.0.71.10",
                    "rangeEnd": "10.0.71.19",
                    "size": 10,
                    "allocated": 2,
                    "free": 8,
                    "percent": 20.0,
                },
            ],
        }
    ]
    # Without a pool: every pool under the prefix, as an aligned table.
    out = admin(consul, "--prefix", prefix, "usage")
    assert out.rc == 0, out
    assert out.stdout == (
        "POOL  RANGE                               GATEWAY    SIZE  ALLOCATED  FREE    USED\n"
        "p     10.0.70.0/29 10.0.70.1-10.0.70.6    10.0.70.1     5          5     0  100.0%\n"
        "p     10.0.71.0/24 10.0.71.10-10.0.71.19  -            10          2     8   20.0%\n"
        "p     total                                            15          7     8   46.7%\n"
        "q     10.0.72.0/24 10.0.72.1-10.0.72.254  -           254          0   254    0.0%\n"
    )
    assert out.stderr == ""
    # DEL gives the address back; usage follows.
    assert run_plugin("DEL", conf, container="c1").rc == 0
    out = admin(consul, "--prefix", prefix, "usage", "p", "--json")
    assert [r["allocated"] for r in out.json[0]["ranges"]] == [4, 2]


def test_usage_of_missing_or_broken_pools(consul, pool_name):
    assert_fails(admin(consul, "usage", pool_name), STATE, "does not exist")
    consul.put(f"ipam/{pool_name}", "[]")
    assert_fails(admin(consul, "usage", pool_name), STATE, "does not hold valid IP ranges")


def test_allocations_lists_targets_interfaces_and_hosts(consul, pool_name):
    create(consul, pool_name, "10.0.20.0/23,10.0.21.100-10.0.21.150,gw=10.0.20.1")
    conf = netconf([consul.url], [{"name": pool_name}])
    assert run_plugin("ADD", conf, container="c-a", ifname="eth0").rc == 0
    assert run_plugin("ADD", conf, container="c-b", ifname="net1").rc == 0
    # Written by upstream or another tool: target only. And a key that is no allocation.
    consul.put(f"ipam/{pool_name}/10.0.21.140", {"target": "legacy"})
    consul.put(f"ipam/{pool_name}/junk", "x")
    host = default_host()
    out = admin(consul, "allocations", pool_name, "--json")
    assert out.rc == 0, out
    ours = {"network": "testnet", "runtime": None}
    assert out.json == [
        {"ip": "10.0.21.100", "target": "c-a", "ifname": "eth0", "host": host} | ours,
        {"ip": "10.0.21.101", "target": "c-b", "ifname": "net1", "host": host} | ours,
        {"ip": "10.0.21.140", "target": "legacy", "ifname": None, "host": None, "network": None,
         "runtime": None},
    ]
    assert "1 key(s)" in out.stderr and f"check {pool_name}" in out.stderr
    out = admin(consul, "allocations", pool_name)
    pad = " " * (len(host) - 4)
    assert out.stdout == (
        f"IP           TARGET  IFNAME  NETWORK  HOST{pad}  NAME\n"
        f"10.0.21.100  c-a     eth0    testnet  {host}  -\n"
        f"10.0.21.101  c-b     net1    testnet  {host}  -\n"
        f"10.0.21.140  legacy  -       -        -{pad}     -\n"
    )
    out = admin(consul, "allocations", pool_name, "--target", "c-b", "--json")
    assert [a["ip"] for a in out.json] == ["10.0.21.101"]
    assert_fails(admin(consul, "allocations", f"{pool_name}-none"), STATE, "does not exist")


# -- release -----------------------------------------------------------------------------------
def test_release_with_and_without_target(consul, pool_name):
    create(consul, pool_name, "10.0.20.0/23,10.0.21.100-10.0.21.150,gw=10.0.20.1")
    conf = netconf([consul.url], [{"name": pool_name}])
    for cid in ("c-1", "c-2"):
        assert run_plugin("ADD", conf, container=cid).rc == 0
    key = f"ipam/{pool_name}/10.0.21.100"
    # Wrong target: refused, key untouched.
    index = consul.modify_index(key)
    out = admin(consul, "release", pool_name, "10.0.21.100", "--target", "c-2")
    assert_fails(out, STATE, "held by 'c-1', not by 'c-2'", "nothing released")
    assert consul.modify_index(key) == index
    # Right target: gone, and only that key.
    out = admin(consul, "release", pool_name, "10.0.21.100", "--target", "c-1")
    assert out.rc == 0, out
    assert out.stdout == f"released 10.0.21.100 from pool {pool_name} (was held by 'c-1')\n"
    assert consul.allocations(pool_name) == {"10.0.21.101": "c-2"}
    # Again: absent.
    out = admin(consul, "release", pool_name, "10.0.21.100", "--target", "c-1")
    assert_fails(out, STATE, "not allocated", "nothing released")
    # Held by a container: not without --target or --force (issue 22, finding 4: a running
    # container's address went to the next container on the same bridge).
    key = f"ipam/{pool_name}/10.0.21.101"
    index = consul.modify_index(key)
    out = admin(consul, "release", pool_name, "10.0.21.101")
    assert_fails(
        out, STATE, "10.0.21.101 in pool", "is held by container 'c-2' (interface eth0, network "
        "testnet, host", "nothing released", "--target c-2", "or --force",
    )
    assert consul.modify_index(key) == index
    # --force: whoever holds it, and the output says so.
    out = admin(consul, "release", pool_name, "10.0.21.101", "--force")
    assert out.rc == 0, out
    assert out.stdout == (
        f"released 10.0.21.101 from pool {pool_name} (was held by 'c-2'; --force: released "
        "without checking that it is gone)\n"
    )
    assert consul.allocations(pool_name) == {}
    out = admin(consul, "release", pool_name, "10.0.21.101", "--force", "--target", "c-2")
    assert out.rc == USAGE and "not allowed with" in out.stderr, out
    # The plugin's DEL of a released container still succeeds.
    assert run_plugin("DEL", conf, container="c-2").rc == 0
    assert_fails(admin(consul, "release", pool_name, "10.0.21.999"), USAGE, "not an IP address")


def test_release_refuses_an_address_reallocated_to_another_target(consul, pool_name):
    create(consul, pool_name, "10.0.20.0/23,10.0.21.100-10.0.21.150,gw=10.0.20.1")
    conf = netconf([consul.url], [{"name": pool_name}])
    assert run_plugin("ADD", conf, container="old").rc == 0
    key = f"ipam/{pool_name}/10.0.21.100"
    # The operator saw `old` holding it; meanwhile it was released and given to `new`.
    assert run_plugin("DEL", conf, container="old").rc == 0
    assert run_plugin("ADD", conf, container="new").rc == 0
    out = admin(consul, "release", pool_name, "10.0.21.100", "--target", "old")
    assert_fails(out, STATE, "held by 'new', not by 'old'")
    assert consul.get_json(key)["target"] == "new"
    # A value that is no allocation cannot match a target either.
    consul.put(key, "garbage")
    assert_fails(
        admin(consul, "release", pool_name, "10.0.21.100", "--target", "new"),
        STATE,
        "does not hold a valid allocation",
    )
    assert consul.get(key) == b"garbage"
    # Without --target it goes, whatever it holds: no container holds it.
    out = admin(consul, "release", pool_name, "10.0.21.100")
    assert out.rc == 0, out
    assert (
        out.stdout == f"released 10.0.21.100 from pool {pool_name} (was not a valid allocation)\n"
    )
    assert consul.get(key) is None


def test_release_never_deletes_a_key_that_changed_after_it_was_read(consul, pool_name):
    """The CAS itself: the key is re-allocated between release's read and its delete (a real
    write to the real agent, slipped in right after the read); the delete must lose."""
    create(consul, pool_name, "10.0.20.0/23,10.0.21.100-10.0.21.150,gw=10.0.20.1")
    key = f"ipam/{pool_name}/10.0.21.100"
    consul.put(key, {"target": "c-1"})

    class RacingKV(ConsulKV):
        raced = False

        def get(self, k: str, consistent: bool = False) -> Any:
            entry = super().get(k, consistent)
            if not self.raced:
                self.raced = True
                consul.put(k, {"target": "newcomer"})
            return entry

    settings = Settings([consul.url], Layout(), 5.0)
    ctx = commands.Context(settings, Progress(enabled=False))
    client = ConsulClient([consul.url])
    ctx.__dict__["_conn"] = (client, RacingKV(client))  # the cached connection, pre-filled
    args = argparse.Namespace(pool=pool_name, ip="10.0.21.100", target="c-1")
    with pytest.raises(
        StateError, match="changed while releasing it and is now held by 'newcomer'"
    ):
        commands.release(ctx, args)
    ctx.close()
    assert consul.get_json(key) == {"target": "newcomer"}


# -- check -------------------------------------------------------------------------------------
def seed_problems(consul: ConsulAgent, prefix: str) -> str:
    """Pool `bad` with one key of each per-key problem, plus pool-level problems in others."""
    create(
        consul,
        "bad",
        "10.0.40.0/24,10.0.40.10-10.0.40.50,gw=10.0.40.20",
        "fd00:40::/120",
        prefix=prefix,
    )
    conf = netconf([consul.url], [{"name": "bad"}], kv_prefix=prefix)
    assert run_plugin("ADD", conf, container="fine").rc == 0  # 10.0.40.10, no problem
    f = f"{prefix}bad/"
    consul.put(f + "foo", {"target": "x"})  # invalid-key
    consul.put(f + "FD00:40::0011", {"target": "x"})  # invalid-key (not canonical)
    consul.put(f + "10.0.40.12", "not json")  # invalid-value
    consul.put(f + "10.0.40.13", {"host": "h"})  # invalid-value (no target)
    consul.put(f + "10.0.40.200", {"target": "out"})  # outside-ranges
    consul.put(f + "10.0.40.20", {"target": "gw"})  # reserved-address (gateway)
    consul.put(f + "10.0.40.255", {"target": "bc"})  # reserved-address (broadcast)
    consul.put(f + "10.0.40.30", {"target": "dup", "ifname": "eth0"})  # duplicate-target
    consul.put(f + "10.0.40.31", {"target": "dup", "ifname": "eth0"})
    consul.put(f + "10.0.40.32", {"target": "two", "ifname": "eth0"})  # two ifnames: fine
    consul.put(f + "10.0.40.33", {"target": "two", "ifname": "eth1"})
    consul.put(f + "10.0.40.34", {"target": "old"})  # no ifname: the whole container
    consul.put(f + "10.0.40.35", {"target": "old", "ifname": "eth0"})  # duplicate-target
    consul.put(f"{prefix}nofolder", [{"subnet": "10.0.41.0/24"}])  # missing-folder
    consul.put(f"{prefix}broken", "{}")  # invalid-ranges
    consul.put(f"{prefix}broken/", "")
    ranges = [{"subnet": "10.0.42.0/24"}, {"subnet": "10.0.42.0/25"}]
    consul.create_pool("overlap", ranges, prefix=prefix)  # overlapping-ranges
    consul.put(f"{prefix}orphan/10.0.43.5", {"target": "lost"})  # missing-pool
    create(consul, "clean", "10.0.44.0/24", prefix=prefix)
    return f


def test_check_finds_each_kind_of_problem(consul, prefix):
    f = seed_problems(consul, prefix)
    out = admin(consul, "--prefix", prefix, "check", "--json")
    assert out.rc == PROBLEMS, out
    found = {
        (pool["pool"], p["kind"], tuple(p["keys"]))
        for pool in out.json["pools"]
        for p in pool["problems"]
    }
    assert found == {
        ("bad", "invalid-key", (f + "FD00:40::0011",)),
        ("bad", "invalid-key", (f + "foo",)),
        ("bad", "invalid-value", (f + "10.0.40.12",)),
        ("bad", "invalid-value", (f + "10.0.40.13",)),
        ("bad", "outside-ranges", (f + "10.0.40.200",)),
        ("bad", "reserved-address", (f + "10.0.40.20",)),
        ("bad", "reserved-address", (f + "10.0.40.255",)),
        ("bad", "duplicate-target", (f + "10.0.40.30", f + "10.0.40.31")),
        ("bad", "duplicate-target", (f + "10.0.40.34", f + "10.0.40.35")),
        ("broken", "invalid-ranges", (f"{prefix}broken",)),
        ("nofolder", "missing-folder", (f"{prefix}nofolder/",)),
        ("orphan", "missing-pool", (f"{prefix}orphan",)),
        ("overlap", "overlapping-ranges", (f"{prefix}overlap",)),
    }
    assert out.json["problems"] == 13
    assert [p["pool"] for p in out.json["pools"]] == [
        "bad",
        "broken",
        "clean",
        "nofolder",
        "orphan",
        "overlap",
    ]
    bad = out.json["pools"][0]
    assert bad["allocations"] == 10  # valid allocation objects under canonical IP names
    assert json.dumps(out.json).count("gateway address of 10.0.40.0/24") == 1
    assert json.dumps(out.json).count("broadcast address of 10.0.40.0/24") == 1
    # One pool: human report, exit 1; a clean pool: exit 0.
    out = admin(consul, "--prefix", prefix, "check", "bad")
    assert out.rc == PROBLEMS, out
    lines = out.stdout.splitlines()
    assert len(lines) == 10 and lines[-1] == "bad: 9 problem(s), 10 valid allocation(s)"
    assert "bad: duplicate-target: target 'dup' ifname 'eth0' holds 2 addresses" in out.stdout
    out = admin(consul, "--prefix", prefix, "check", "clean")
    assert (out.rc, out.stdout, out.stderr) == (0, "clean: ok, 0 allocation(s)\n", "")
    assert_fails(admin(consul, "--prefix", prefix, "check", "nope"), STATE, "does not exist")
    # usage agrees with check on what is not counted.
    out = admin(consul, "--prefix", prefix, "usage", "bad", "--json")
    u = out.json[0]
    assert (u["outside"], u["reserved"], u["invalidKeys"]) == (
        ["10.0.40.200"],
        ["10.0.40.20", "10.0.40.255"],
        1,
    )


def test_check_of_a_clean_prefix_exits_zero(consul, prefix):
    create(consul, "one", "10.0.45.0/24", prefix=prefix)
    conf = netconf([consul.url], [{"name": "one"}], kv_prefix=prefix)
    assert run_plugin("ADD", conf, container="c").rc == 0
    out = admin(consul, "--prefix", prefix, "check", "--json")
    assert out.rc == 0, out
    assert out.json == {"problems": 0, "pools": [{"pool": "one", "allocations": 1, "problems": []}]}


def test_pools_that_share_addresses_are_refused_and_reported(consul, prefix):
    """Issue 22, finding 5: a second pool with the same subnet was accepted without a word, and
    `check` said ok: on one bridge both hand out the same address. Pools that split a subnet
    (by range or by `exclude`) share nothing and are fine."""
    create(consul, "first", "10.0.47.0/24,gw=10.0.47.1", prefix=prefix)
    base = ["--prefix", prefix]
    index = consul.kv_index()
    out = admin(consul, *base, "create", "second", "--range", "10.0.47.0/24")
    assert_fails(
        out, STATE, "pool 'second' would hand out addresses another pool hands out",
        "range 1 (10.0.47.1-10.0.47.254) shares 253 address(es), from 10.0.47.2, with pool "
        "'first' (its range 1, 10.0.47.1-10.0.47.254)",
        "Nothing written", "--allow-overlap",
    )
    assert consul.kv_index() == index
    out = admin(consul, *base, "create", "second", "--range", "10.0.47.0/24", "--allow-overlap")
    assert out.rc == 0 and "warning: pool 'second'" in out.stderr, out
    # Halves of one subnet: by range, and by exclusion.
    create(consul, "low", "10.0.48.0/24,10.0.48.1-10.0.48.127", prefix=prefix)
    create(consul, "high", "10.0.48.0/24,10.0.48.128-10.0.48.254", prefix=prefix)
    ranges = [{"subnet": "10.0.49.0/24", "exclude": ["10.0.49.0/25"]}]
    out = admin(consul, *base, "create", "upper", "--ranges-json", "-",
                stdin=json.dumps(ranges).encode())
    assert out.rc == 0, out
    create(consul, "lower", "10.0.49.0/24,10.0.49.1-10.0.49.127", prefix=prefix)
    out = admin(consul, *base, "check", "--json")
    assert out.rc == PROBLEMS, out
    found = {
        (pool["pool"], p["kind"], tuple(p["keys"]))
        for pool in out.json["pools"]
        for p in pool["problems"]
    }
    assert found == {
        ("first", "overlapping-pools", (f"{prefix}first", f"{prefix}second")),
        ("second", "overlapping-pools", (f"{prefix}second", f"{prefix}first")),
    }
    # One pool checked: compared with every pool under the prefix.
    out = admin(consul, *base, "check", "second")
    assert out.rc == PROBLEMS, out
    assert out.stdout == (
        "second: overlapping-pools: range 1 (10.0.47.1-10.0.47.254) shares 253 address(es), from "
        "10.0.47.2, with pool 'first' (its range 1, 10.0.47.1-10.0.47.254): on one network "
        "segment both would hand out one address\n"
        "second: 1 problem(s), 0 valid allocation(s)\n"
    )
    assert admin(consul, *base, "check", "low").rc == 0


# -- progress ----------------------------------------------------------------------------------
def run_on_tty(
    consul: ConsulAgent, *args: str, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """Run with stderr on a pseudo-terminal; return status, stdout, what the terminal got."""
    env = clean_env() | {"CONSUL_HTTP_ADDR": consul.url} | (env or {})
    main, secondary = pty.openpty()
    try:
        p = subprocess.Popen(
            [executable(PROG), *args], stdout=subprocess.PIPE, stderr=secondary, env=env
        )
    finally:
        os.close(secondary)
    try:
        tty = drain_pty(main)
    finally:
        os.close(main)
    stdout = p.stdout.read().decode() if p.stdout else ""
    return p.wait(30), stdout, tty.decode(errors="replace")


def test_progress_only_on_a_terminal(consul, prefix):
    create(consul, "p", "10.0.46.0/24", prefix=prefix)
    for i in range(1, 4):
        consul.put(f"{prefix}p/10.0.46.{i}", {"target": f"c{i}"})
    # NO_COLOR: the plain one-line status (rich's display: tests/e2e/test_admin_output.py).
    rc, stdout, tty = run_on_tty(consul, "--prefix", prefix, "check", "p", env={"NO_COLOR": "1"})
    assert (rc, stdout) == (0, "p: ok, 3 allocation(s)\n")
    assert f"reading {prefix}p/ from Consul" in tty and "checking p 3/3" in tty
    assert tty.endswith("\r\x1b[K")  # the status line is wiped before exit
    out = admin(consul, "--prefix", prefix, "check", "p")
    assert (out.rc, out.stdout, out.stderr) == (0, stdout, "")


# -- connection, errors ------------------------------------------------------------------------
def test_unreachable_consul_is_one_line_and_exit_3(consul):
    dead = f"http://127.0.0.1:{free_ports(1)[0]}"
    out = admin(None, "--consul", dead, "--timeout", "1", "list")
    assert_fails(out, CONSUL, "no Consul server could be reached", dead, "--consul")
    # Repeated --consul: tried in order, the live one serves.
    out = admin(None, "--consul", dead, "--consul", consul.url, "list", "--prefix", "none/")
    assert out.rc == 0, out


def test_bad_connection_options_are_usage_errors(consul, tmp_path):
    assert_fails(admin(None, "--consul", "unix:///tmp/consul.sock", "list"), USAGE, "http(s)://")
    assert_fails(admin(consul, "--ca-file", str(tmp_path / "no.pem"), "list"), USAGE, "--ca-file")
    assert_fails(admin(consul, "--token-file", str(tmp_path / "no"), "list"), USAGE, "--token-file")
    (tmp_path / "empty").write_text("\n")
    assert_fails(admin(consul, "--token-file", str(tmp_path / "empty"), "list"), USAGE, "empty")
    assert_fails(admin(consul, "--timeout", "0", "list"), USAGE, "more than 0")
    out = admin(consul, "list", "--datacenter", "nowhere", "--timeout", "2")
    assert_fails(out, CONSUL, "nowhere")


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureConsulAgent]:
    agent = SecureConsulAgent(tmp_path_factory.mktemp("admin-secure")).start()
    try:
        yield agent
    finally:
        agent.close()


def test_tls_and_acl_tokens(secure, tmp_path):
    tls = secure.tls
    rules = 'key_prefix "ipam/" { policy = "write" }'
    write_token = secure.create_token("admin-write", rules)
    read_token = secure.create_token("admin-read", 'key_prefix "ipam/" { policy = "read" }')
    certs = ["--ca-file", tls.ca, "--cert-file", tls.client_cert, "--key-file", tls.client_key]
    base = ["--consul", secure.url, *certs]
    pool = f"sec-{os.getpid()}"
    secrets = (write_token, read_token, secure.master_token)

    def run(*args: str, env: dict[str, str] | None = None) -> Outcome:
        out = admin(None, *args, env=env)
        for secret in secrets:
            assert secret not in out.stdout + out.stderr
        return out

    # No token: KV denies; the empty-looking listing is turned into the 403 it hides.
    assert_fails(run(*base, "list"), CONSUL, "403", "--token-file")
    out = admin(None, *base, "--token-file", "-", "create", pool, "--range", "10.0.0.0/24",
                stdin=b"0000\n")
    assert_fails(out, CONSUL, "403")
    # A read-only token cannot create (-v logs requests, never the token); --token still
    # works, with a warning that it shows the token in the process list.
    out = run(*base, "--token", read_token, "-v", "create", pool, "--range", "10.0.0.0/24")
    assert_fails_verbose(out, CONSUL, "403")
    assert "warning: --token" in out.stderr.splitlines()[0], out
    # The write token from a file creates; from the environment it reads; TLS from env too.
    token_file = tmp_path / "token"
    token_file.write_text(write_token + "\n")
    out = run(*base, "--token-file", str(token_file), "create", pool, "--range", "10.0.0.0/24")
    assert out.rc == 0, out
    assert secure.get_json(f"ipam/{pool}") == [
        {"subnet": "10.0.0.0/24", "rangeStart": "10.0.0.1", "rangeEnd": "10.0.0.254"}
    ]
    env = {
        "CONSUL_HTTP_ADDR": secure.url,
        "CONSUL_HTTP_TOKEN": read_token,
        "CONSUL_CACERT": tls.ca,
        "CONSUL_CLIENT_CERT": tls.client_cert,
        "CONSUL_CLIENT_KEY": tls.client_key,
    }
    out = run("usage", pool, "--json", env=env)
    assert out.rc == 0, out
    assert out.json[0]["capacity"] == 254
    # Without the client certificate, HTTPS refuses: a TLS error, not a traceback.
    out = run("--consul", secure.url, "--ca-file", tls.ca, "--timeout", "1", "list")
    assert_fails(out, CONSUL, "TLS")


def assert_fails_verbose(out: Outcome, status: int, *words: str) -> None:
    """Like assert_fails, with -v debug lines allowed before the error line."""
    assert out.rc == status, out
    assert out.stdout == "" and "Traceback" not in out.stderr, out
    assert out.stderr.splitlines()[-1].startswith(f"{PROG}: error: "), out
    for word in words:
        assert word in out.stderr.splitlines()[-1], out


def test_help_documents_every_command():
    out = admin(None, "--help")
    assert out.rc == 0
    for command in ("create", "list", "usage", "allocations", "release", "check"):
        assert f"    {command} " in out.stdout
    for command in ("create", "check"):  # each subcommand also takes the connection options
        sub = admin(None, command, "--help")
        assert sub.rc == 0 and "--consul" in sub.stdout, sub
    assert "Exit status" in out.stdout and "CONSUL_HTTP_ADDR" in out.stdout


def test_check_and_list_ignore_the_fence_folder(consul, pool_name):
    # DEL leaves the attachment's fence under <prefix>.fences/: no pool, no orphaned folder.
    create(consul, pool_name, "10.0.20.0/23,10.0.21.100-10.0.21.150,gw=10.0.20.1")
    conf = netconf([consul.url], [{"name": pool_name}])
    assert run_plugin("ADD", conf, container="c-fenced").rc == 0
    assert run_plugin("DEL", conf, container="c-fenced").rc == 0
    assert consul.get("ipam/.fences/testnet/c-fenced/eth0") is not None
    out = admin(consul, "check")
    assert ".fences" not in out.stdout + out.stderr, out
    out = admin(consul, "list", "--json")
    assert all(".fences" not in json.dumps(p) for p in out.json), out


def test_fences_are_counted_and_those_without_a_session_handed_to_one(consul, conf_for,
                                                                     make_pool):
    """An older version's fence has no session and would stay for good: `fences --expire`
    ties it to one of an hour at least; the plugin's own fences already end with theirs."""
    pool = make_pool()
    assert run_plugin("ADD", conf_for(pool), container="c-fence").rc == 0
    assert run_plugin("DEL", conf_for(pool), container="c-fence").rc == 0  # a sessioned fence
    legacy = "ipam/.fences/testnet/c-old/eth0"
    consul.put(legacy, {"at": 1700000000.0, "host": "old", "by": "DEL"})
    out = admin(consul, "fences", "--network", "testnet", "--json")
    assert out.rc == 0, out
    counted = json.loads(out.stdout)
    assert counted["withoutSession"] == 1 and counted["withSession"] >= 1, counted
    out = admin(consul, "fences", "--network", "testnet", "--expire")
    assert out.rc == 0 and "1 handed to a session now" in out.stdout, out
    [entry] = consul.http.get(f"{consul.url}/v1/kv/{legacy}", timeout=10).json()
    info = consul.http.get(f"{consul.url}/v1/session/info/{entry['Session']}", timeout=10).json()
    assert float(info[0]["TTL"].rstrip("s")) >= 3600
