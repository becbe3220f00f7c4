"""`ipam-da-consul-admin reconcile` / `check --live-ids` and short container IDs, against the
session's real Consul dev agent: the installed CLI as a subprocess, the plugin writing real
allocations, and the release path driven directly where a race has to be slipped in.

Every test works under its own KV prefix, so other tests' allocations never count."""

from __future__ import annotations

import ipaddress
import itertools
import json
import os
import sys
from typing import Any

import pytest
from ipam_da_consul.admin import commands
from ipam_da_consul.admin import reconcile as rec
from ipam_da_consul.admin.errors import PROBLEMS, STATE, USAGE
from ipam_da_consul.admin.ids import parse_live_ids
from ipam_da_consul.admin.output import Progress
from ipam_da_consul.admin.settings import Settings, connect
from ipam_da_consul.allocator.allocate import Allocator, Attachment
from ipam_da_consul.allocator.layout import Layout
from ipam_da_consul.allocator.pool import parse_held
from ipam_da_consul.allocator.store import Cas, Check
from ipam_da_consul.cni.config import default_host

from tests.e2e.test_admin import admin, assert_fails, create
from tests.support.agent import ConsulAgent
from tests.support.plugin import netconf, run_plugin
from tests.unit.admin.test_reconcile import A, B

HOST = "node-a#00000001"
OTHER = "node-b#00000002"
C = "c1b2c3d4e5f6" + "2" * 52
D = "d1b2c3d4e5f6" + "3" * 52
_prefixes = itertools.count()


@pytest.fixture
def prefix() -> str:
    return f"rec-{os.getpid()}-{next(_prefixes)}/"


def put_alloc(
    consul: ConsulAgent,
    prefix: str,
    pool: str,
    ip: str,
    target: str,
    host: str | None = HOST,
    network: str | None = "net1",
    ifname: str | None = "eth0",
) -> str:
    value: dict[str, Any] = {"target": target}
    if ifname is not None:
        value["ifname"] = ifname
    if host is not None:
        value["host"] = host
    if network is not None:
        value["network"] = network
    key = f"{prefix}{pool}/{ip}"
    consul.put(key, value)
    return key


def held(consul: ConsulAgent, prefix: str, pool: str) -> dict[str, str]:
    """ip -> target of the pool's valid allocations (seed() adds a key that is none)."""
    folder = f"{prefix}{pool}/"
    out = {}
    for key, raw in consul.tree(folder).items():
        try:
            out[key[len(folder) :]] = json.loads(raw)["target"]
        except ValueError:
            continue
    return out


def seed(consul: ConsulAgent, prefix: str) -> None:
    """Pool p1: live A, live B (named by a prefix), dead C, dead D on another network, a dead
    container of another host, an upstream key without host; pool p2: dead C's second
    interface. Plus one key that is no allocation."""
    create(consul, "p1", "10.0.50.0/24", prefix=prefix)
    create(consul, "p2", "10.0.51.0/24", prefix=prefix)
    put_alloc(consul, prefix, "p1", "10.0.50.10", A)
    put_alloc(consul, prefix, "p1", "10.0.50.11", B)
    put_alloc(consul, prefix, "p1", "10.0.50.12", C)
    put_alloc(consul, prefix, "p1", "10.0.50.13", D, network="net2")
    put_alloc(consul, prefix, "p1", "10.0.50.14", "gone-elsewhere", host=OTHER)
    put_alloc(consul, prefix, "p1", "10.0.50.15", "upstream", host=None, network=None, ifname=None)
    consul.put(f"{prefix}p1/junk", "x")
    put_alloc(consul, prefix, "p2", "10.0.51.10", C, ifname="net1")


LIVE = f"# podman ps -a -q --no-trunc\n{A}\n\n{B[:12]}  # shown short\n"


def primed(consul: ConsulAgent, prefix: str, *args: str) -> None:
    """An earlier run that records Consul's state: with --live-ids, only what an earlier run
    saw is judged (the list cannot be dated)."""
    out = admin(consul, "--prefix", prefix, *args, "--settle", "0", stdin=A.encode())
    assert out.rc in (0, PROBLEMS), out


def reconcile(consul: ConsulAgent, prefix: str, *args: str, live: str = LIVE) -> Any:
    primed(consul, prefix, "reconcile", "--live-ids", "-", "--host", HOST)
    return admin(
        consul,
        "--prefix",
        prefix,
        "reconcile",
        "--live-ids",
        "-",
        "--host",
        HOST,
        "--settle",
        "0",
        *args,
        stdin=live.encode(),
    )


def test_dry_run_names_this_hosts_orphans_and_writes_nothing(consul, prefix):
    seed(consul, prefix)
    before = consul.kv_index()
    out = reconcile(consul, prefix)
    assert out.rc == 0, out
    assert out.stdout == (
        f"would release p1 10.0.50.12 (target {C}, ifname eth0, network net1)\n"
        f"would release p1 10.0.50.13 (target {D}, ifname eth0, network net2)\n"
        f"would release p2 10.0.51.10 (target {C}, ifname net1, network net1)\n"
        f"dry run: 3 to release; 2 kept (container live) [host {HOST}, 2 pool(s)]; "
        "add --apply to release\n"
    )
    assert "1 key(s) are not valid allocations" in out.stderr
    assert consul.kv_index() == before

    out = reconcile(consul, prefix, "--json")
    assert out.rc == 0, out
    body = out.json
    assert body["applied"] is False and body["host"] == HOST
    assert (body["kept"], body["otherHosts"], body["invalidKeys"]) == (2, 2, 1)
    assert body["counts"] == {"would-release": 3}
    assert [(o["pool"], o["ip"], o["action"]) for o in body["orphans"]] == [
        ("p1", "10.0.50.12", "would-release"),
        ("p1", "10.0.50.13", "would-release"),
        ("p2", "10.0.51.10", "would-release"),
    ]
    assert consul.kv_index() == before


def test_apply_fences_then_releases_only_the_orphans(consul, prefix):
    seed(consul, prefix)
    out = reconcile(consul, prefix, "--apply", "--json")
    assert out.rc == 0, out
    assert out.json["counts"] == {"released": 3}
    assert held(consul, prefix, "p1") == {
        "10.0.50.10": A,
        "10.0.50.11": B,
        "10.0.50.14": "gone-elsewhere",
        "10.0.50.15": "upstream",
    }
    assert held(consul, prefix, "p2") == {}
    # Each released attachment's fence is up, saying who raised it and why.
    for network, target, ifname in (("net1", C, "eth0"), ("net2", D, "eth0"), ("net1", C, "net1")):
        fence = consul.get_json(f"{prefix}.fences/{network}/{target}/{ifname}")
        assert fence["by"] == "reconcile" and fence["host"] == HOST, fence
    # A second run has nothing left to do; `check` does not take the fences for a pool.
    again = reconcile(consul, prefix, "--apply")
    assert again.rc == 0, again
    summary = f"nothing to release; 2 kept (container live) [host {HOST}, 2 pool(s)]\n"
    assert again.stdout.endswith(summary)
    assert ".fences" not in admin(consul, "--prefix", prefix, "check").stdout


def test_a_late_write_of_a_released_attachment_can_never_land(consul, prefix):
    """The fence at work: the transaction a plugin call sent before reconcile ran (checking
    the attachment's fence absent, as it was then), applied by Consul only afterwards, is void."""
    seed(consul, prefix)
    layout = Layout(prefix)
    client, kv = connect(Settings([consul.url], layout, 5.0))
    late = Allocator(kv, layout, host=HOST, attachment=Attachment("net1", C, "net1"))
    key = layout.allocation_key("p2", ipaddress.ip_address("10.0.51.10"))
    in_flight = [Check(layout.fence_key("net1", C, "net1"), 0), Cas(key, late.value(), 0)]
    assert reconcile(consul, prefix, "--apply").rc == 0
    result = kv.txn(in_flight)
    client.close()
    assert result.failed == 0  # the fence check
    assert held(consul, prefix, "p2") == {}


def test_network_and_pool_narrow_what_is_released(consul, prefix):
    seed(consul, prefix)
    out = reconcile(consul, prefix, "--apply", "--network", "net2", "--json")
    assert out.rc == 0, out
    assert [o["ip"] for o in out.json["orphans"]] == ["10.0.50.13"]
    assert out.json["otherNetworks"] == 4  # A, B and C's two on net1: not looked at
    out = reconcile(consul, prefix, "--apply", "--pool", "p2", "--json")
    assert [o["ip"] for o in out.json["orphans"]] == ["10.0.51.10"]
    assert "10.0.50.12" in held(consul, prefix, "p1")
    assert_fails(reconcile(consul, prefix, "--pool", "nope"), STATE, "does not exist")
    assert_fails(reconcile(consul, prefix, "--pool", ".fences"), USAGE, "reserved")


def test_an_empty_or_unreadable_live_list_is_refused(consul, prefix, tmp_path):
    seed(consul, prefix)
    before = consul.kv_index()
    for live in ("", "\n# nothing here\n\n"):
        out = reconcile(consul, prefix, "--apply", live=live)
        assert_fails(out, USAGE, "names no container", "--allow-empty")
    # `podman ps` without -q: its header is no container ID.
    out = reconcile(consul, prefix, "--apply", live=f"CONTAINER ID  IMAGE\n{A}\n")
    assert_fails(out, USAGE, "line 1", "not a container ID", "nothing done")
    # An entry shorter than 6 characters is a full ID, never a prefix: it keeps nothing here.
    out = reconcile(consul, prefix, "--json", live=f"{A}\n{B[:12]}\n{C[:5]}\n")
    assert [o["target"] for o in out.json["orphans"]] == [C, D, C]
    out = admin(consul, "reconcile", "--live-ids", "-", "--host", " ", stdin=A.encode())
    assert_fails(out, USAGE, "--host cannot be empty")
    missing = tmp_path / "missing"
    out = admin(consul, "reconcile", "--live-ids", str(missing))
    assert_fails(out, USAGE, "cannot read --live-ids")
    assert consul.kv_index() == before
    # Said explicitly, an empty host releases everything of it, and only of it.
    out = reconcile(consul, prefix, "--apply", "--allow-empty", "--json", live="")
    assert out.rc == 0, out
    assert out.json["counts"] == {"released": 5}
    assert held(consul, prefix, "p1") == {
        "10.0.50.14": "gone-elsewhere",
        "10.0.50.15": "upstream",
    }


def test_an_ambiguous_live_prefix_keeps_every_match(consul, prefix):
    create(consul, "p", "10.0.52.0/24", prefix=prefix)
    twin = A[:12] + "f" * 52
    put_alloc(consul, prefix, "p", "10.0.52.10", A)
    put_alloc(consul, prefix, "p", "10.0.52.11", twin)
    put_alloc(consul, prefix, "p", "10.0.52.12", B)
    out = reconcile(consul, prefix, "--apply", "--json", live=f"{A[:12]}\n")
    assert out.rc == 0, out
    assert [o["target"] for o in out.json["orphans"]] == [B]
    assert held(consul, prefix, "p") == {"10.0.52.10": A, "10.0.52.11": twin}


def test_the_plugins_default_host_is_reconciles_default(consul, prefix, tmp_path):
    """Real allocations, written by the plugin with no ipam.host; reconcile without --host."""
    create(consul, "p", "10.0.53.0/24,10.0.53.10-10.0.53.20", prefix=prefix)
    conf = netconf([consul.url], [{"name": "p"}], kv_prefix=prefix)
    for cid in ("live-container-1", "dead-container-1"):
        assert run_plugin("ADD", conf, container=cid).rc == 0
    live = tmp_path / "live"
    live.write_text("live-container-1\n")
    primed(consul, prefix, "reconcile", "--live-ids", str(live))
    out = admin(consul, "--prefix", prefix, "reconcile", "--live-ids", str(live), "--settle", "0",
                "--apply")
    assert out.rc == 0, out
    assert out.stdout.startswith("released p 10.0.53.11 (target dead-container-1, ifname eth0")
    assert f"[host {default_host()}, 1 pool(s)]" in out.stdout
    assert held(consul, prefix, "p") == {"10.0.53.10": "live-container-1"}
    # The runtime's DEL of the released container, should it ever come, still succeeds.
    assert run_plugin("DEL", conf, container="dead-container-1").rc == 0
    assert held(consul, prefix, "p") == {"10.0.53.10": "live-container-1"}


def test_check_reports_orphans_without_touching_them(consul, prefix):
    seed(consul, prefix)
    before = consul.kv_index()
    args = ["--prefix", prefix, "check", "--live-ids", "-", "--host", HOST, "--json"]
    primed(consul, prefix, "check", "--live-ids", "-", "--host", HOST)
    out = admin(consul, *args, "--settle", "0", stdin=LIVE.encode())
    assert out.rc == PROBLEMS, out
    orphans = [
        (r["pool"], p["keys"])
        for r in out.json["pools"]
        for p in r["problems"]
        if p["kind"] == "orphaned-allocation"
    ]
    assert orphans == [
        ("p1", [f"{prefix}p1/10.0.50.12"]),
        ("p1", [f"{prefix}p1/10.0.50.13"]),
        ("p2", [f"{prefix}p2/10.0.51.10"]),
    ]
    assert consul.kv_index() == before
    every = LIVE + f"{C}\n{D}\n"
    out = admin(
        consul,
        "--prefix",
        prefix,
        "check",
        "p2",
        "--live-ids",
        "-",
        "--host",
        HOST,
        "--settle",
        "0",
        stdin=every.encode(),
    )
    assert out.rc == 0, out
    assert_fails(
        admin(consul, "--prefix", prefix, "check", "--live-ids", "-", stdin=b""),
        USAGE,
        "names no container",
    )


def test_live_ids_judge_only_what_an_earlier_run_saw(consul, prefix):
    """`podman ps | reconcile --live-ids -`: the listing runs while reconcile starts up, so a
    container started meanwhile is not in the list but its key is in KV. Only allocations an
    earlier run saw are judged (Consul's index, recorded in the state folder): the first run
    judges none; one written since the last run is skipped, not released."""
    seed(consul, prefix)
    first = admin(consul, "--prefix", prefix, "reconcile", "--live-ids", "-", "--host", HOST,
                  "--settle", "0", "--apply", "--json", stdin=LIVE.encode())
    assert first.rc == 0, first
    assert {o["action"] for o in first.json["orphans"]} == {"recent"}
    assert "judged from the next run" in first.stderr
    put_alloc(consul, prefix, "p1", "10.0.50.20", "started-during-start-up")
    second = admin(consul, "--prefix", prefix, "reconcile", "--live-ids", "-", "--host", HOST,
                   "--settle", "0", "--apply", "--json", stdin=LIVE.encode())
    assert second.rc == 0, second
    actions = {o["target"]: o["action"] for o in second.json["orphans"]}
    assert actions["started-during-start-up"] == "recent"
    assert {actions[C], actions[D]} == {"released"}
    assert held(consul, prefix, "p1").get("10.0.50.20") == "started-during-start-up"


def test_reconcile_releases_with_the_networks_cool_down(consul, prefix):
    seed(consul, prefix)
    out = reconcile(consul, prefix, "--apply", "--pool", "p2", "--reuse-after", "60")
    assert out.rc == 0, out
    tomb = consul.get_json(f"{prefix}p2/10.0.51.10")
    assert tomb["target"] == C and tomb["free_after"] == 4102444800.0
    [entry] = consul.http.get(f"{consul.url}/v1/kv/{prefix}p2/10.0.51.10", timeout=10).json()
    assert entry.get("Session")  # Consul ends the cool-down, and deletes the key


# -- the release path, with races slipped in --------------------------------------------------
def context(consul: ConsulAgent, prefix: str) -> commands.Context:
    return commands.Context(Settings([consul.url], Layout(prefix), 5.0), Progress(enabled=False))


def orphan_of(consul: ConsulAgent, prefix: str, pool: str, ip: str) -> rec.Orphan:
    ctx = context(consul, prefix)
    try:
        entry = ctx.kv.get(f"{prefix}{pool}/{ip}")
        assert entry is not None
        return rec.Orphan(pool, parse_held(entry, f"{prefix}{pool}/"))
    finally:
        ctx.close()


def test_a_key_reallocated_after_the_read_is_left_alone(consul, prefix):
    create(consul, "p", "10.0.54.0/24", prefix=prefix)
    key = put_alloc(consul, prefix, "p", "10.0.54.10", C)
    orphan = orphan_of(consul, prefix, "p", "10.0.54.10")
    # Meanwhile the dead container's address went back to the pool and to a new container.
    put_alloc(consul, prefix, "p", "10.0.54.10", A)
    ctx = context(consul, prefix)
    rec.release(ctx, HOST, orphan)
    ctx.close()
    assert orphan.action == "changed" and repr(A) in orphan.reason
    assert consul.get_json(key)["target"] == A


def test_a_late_rewrite_of_the_same_dead_attachment_is_released_behind_its_fence(consul, prefix):
    create(consul, "p", "10.0.54.0/24", prefix=prefix)
    key = put_alloc(consul, prefix, "p", "10.0.54.11", C)
    orphan = orphan_of(consul, prefix, "p", "10.0.54.11")
    consul.put(key, {"target": C, "ifname": "eth0", "host": HOST, "network": "net1", "call": "x"})
    ctx = context(consul, prefix)
    rec.release(ctx, HOST, orphan)
    ctx.close()
    assert orphan.action == "released"
    assert consul.get(key) is None


def test_a_key_released_meanwhile_is_no_error(consul, prefix):
    create(consul, "p", "10.0.54.0/24", prefix=prefix)
    key = put_alloc(consul, prefix, "p", "10.0.54.12", C)
    orphan = orphan_of(consul, prefix, "p", "10.0.54.12")
    consul._req("DELETE", key).raise_for_status()
    ctx = context(consul, prefix)
    rec.release(ctx, HOST, orphan)
    ctx.close()
    # Consul answers a compare-and-set delete of a missing key with success.
    assert orphan.action in ("released", "gone")
    assert consul.get(key) is None


def test_allocations_newer_than_the_run_are_not_judged(consul, prefix):
    """A container created after the runtime listed its containers may hold an address
    already: anything written after reconcile first looked at KV waits for the next run."""
    create(consul, "p", "10.0.55.0/24", prefix=prefix)
    put_alloc(consul, prefix, "p", "10.0.55.10", C)
    put_alloc(consul, prefix, "p", "10.0.55.11", D)
    ctx = context(consul, prefix)
    newer = consul.modify_index(f"{prefix}p/10.0.55.11")
    found = rec.Survey(HOST, parse_live_ids(A, "test"), ["p"], watermark=newer - 1)
    rec.survey_pool(found, "p", f"{prefix}p/", ctx.reader.folder("p"))
    ctx.close()
    assert [(o.held.target, o.action) for o in found.orphans] == [
        (C, "would-release"),
        (D, "recent"),
    ]


def test_short_ids_for_allocations_and_release(consul, prefix):
    create(consul, "p", "10.0.56.0/24", prefix=prefix)
    twin = A[:12] + "f" * 52
    for ip, target in (("10.0.56.10", A), ("10.0.56.11", twin), ("10.0.56.12", B)):
        put_alloc(consul, prefix, "p", ip, target)
    base = ["--prefix", prefix]
    out = admin(consul, *base, "allocations", "p", "--target", B[:6], "--json")
    assert out.rc == 0, out
    assert [a["ip"] for a in out.json] == ["10.0.56.12"]
    out = admin(consul, *base, "allocations", "p", "--target", A[:12])
    assert_fails(out, USAGE, "ambiguous", A, twin)
    assert_fails(admin(consul, *base, "allocations", "p", "--target", "b1b2"), USAGE, "shorter")
    # release: the prefix must name the key's holder, and only it.
    out = admin(consul, *base, "release", "p", "10.0.56.10", "--target", A[:12])
    assert_fails(out, USAGE, "ambiguous")
    out = admin(consul, *base, "release", "p", "10.0.56.10", "--target", B[:8])
    assert_fails(out, STATE, f"not by {B!r}")
    out = admin(consul, *base, "release", "p", "10.0.56.12", "--target", B[:8])
    assert out.rc == 0, out
    assert held(consul, prefix, "p") == {"10.0.56.10": A, "10.0.56.11": twin}


def test_help_documents_reconcile():
    out = admin(None, "--help")
    assert "    reconcile " in out.stdout and "unique prefix of at least 6" in out.stdout
    sub = admin(None, "reconcile", "--help")
    assert sub.rc == 0 and "--live-ids" in sub.stdout and "podman ps -a -q" in sub.stdout
    assert_fails(admin(None, "reconcile"), USAGE, "--live-ids")


def test_json_is_parseable_by_scripts(consul, prefix):
    seed(consul, prefix)
    out = reconcile(consul, prefix, "--json")
    assert json.loads(out.stdout)["liveIds"] == 2


# -- --live-cmd ---------------------------------------------------------------------------------
def test_live_cmd_lists_after_reading_kv_and_its_failure_stops_the_run(consul, prefix, tmp_path):
    seed(consul, prefix)
    before = consul.kv_index()
    base = ["--prefix", prefix, "reconcile", "--host", HOST, "--settle", "0"]
    out = admin(consul, *base, "--live-cmd", "exit 3")
    assert_fails(out, USAGE, "'exit 3' failed (exit status 3)", "nothing done")
    out = admin(consul, *base, "--live-cmd", "echo 'podman: cannot connect' >&2; false")
    assert_fails(out, USAGE, "cannot connect")
    out = admin(consul, *base, "--live-cmd", "true")
    assert_fails(out, USAGE, "names no container")
    assert consul.kv_index() == before
    # While the runtime lists its containers, a new one gets an address (a KV write during
    # the command) and is not in the list: written after reconcile read KV, it is not judged.
    newcomer = "e1b2c3d4e5f6" + "4" * 52
    value = {"target": newcomer, "ifname": "eth0", "host": HOST, "network": "net1"}
    script = tmp_path / "list.py"
    script.write_text(
        "import requests\n"
        f"requests.put({consul.url + '/v1/kv/' + prefix + 'p1/10.0.50.20'!r}, "
        f"data={json.dumps(value)!r}).raise_for_status()\n"
        f"print({A!r}); print({B[:12]!r})\n"
    )
    cmd = f"{sys.executable} {script}"
    out = admin(consul, *base, "--settle", "0.2", "--live-cmd", cmd, "--apply", "--json")
    assert out.rc == 0, out
    actions = {o["ip"]: o["action"] for o in out.json["orphans"]}
    assert actions == {
        "10.0.50.12": "released",
        "10.0.50.13": "released",
        "10.0.51.10": "released",
        "10.0.50.20": "recent",
    }
    assert held(consul, prefix, "p1")["10.0.50.20"] == newcomer


def test_settle_and_listing_time_do_not_eat_the_consul_budget(consul, prefix):
    seed(consul, prefix)
    out = admin(
        consul,
        *["--prefix", prefix, "--timeout", "1", "reconcile", "--host", HOST],
        *["--settle", "1.2", "--live-cmd", f"sleep 0.5; echo {A}; echo {B}", "--apply"],
    )
    assert out.rc == 0, out
    assert "3 released" in out.stdout
