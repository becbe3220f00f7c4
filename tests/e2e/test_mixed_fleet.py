"""A fleet mid-upgrade stays duplicate-free (issue 20's constraint): hosts running the version
before stripes, ledgers and sessions (`pick: lowest`, fences without a session, its own DEL)
beside new hosts with the default `pick: stripe`, new hosts with `lowest`, and a new host's
helper, all allocating at once from one small pool that spans two stripes. Every address
ends up held once, the pool fills completely, and DELs by any version, of allocations made by
any version, leave nothing behind.

The old version is the commit the fleet ran before (OLD), taken from this repository's history
and run from its source with the same interpreter and dependencies.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.support.agent import ConsulAgent
from tests.support.plugin import Outcome, base_env, executable, netconf
from tests.support.util_procs import Helper

# The last version without stripes, ledgers and session-tied fences and cool-downs.
OLD = "31c75b2"
ROOT = Path(__file__).resolve().parents[2]
RANGES = [
    {"subnet": "10.77.0.0/16", "rangeStart": "10.77.0.10", "rangeEnd": "10.77.0.29",
     "gateway": "10.77.0.1"},
    {"subnet": "10.77.0.0/16", "rangeStart": "10.77.1.10", "rangeEnd": "10.77.1.29",
     "gateway": "10.77.0.1"},
]
SIZE = 40
KINDS = ("old", "stripe", "lowest", "helper")


@pytest.fixture(scope="module")
def old_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    have = subprocess.run(
        ["git", "-C", str(ROOT), "cat-file", "-e", f"{OLD}^{{commit}}"], capture_output=True
    )
    if have.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"commit {OLD} is not in this clone's history (a shallow clone?)")
        pytest.skip(f"commit {OLD} is not in this clone's history")
    dest = tmp_path_factory.mktemp("old-version")
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", OLD], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest / "src"


@pytest.fixture
def helper(tmp_path: Path) -> Iterator[Helper]:
    h = Helper(tmp_path / "helper-host")
    yield h
    h.close()


def call(kind: str, command: str, consul: ConsulAgent, pool: str, n: int, old_src: Path,
         helper: Helper, ips: list[dict[str, Any]] | None = None) -> Outcome:
    """Container `m-<n>` on its own host (`h<n>`, whose state folder is the helper's), through
    the version and path `kind`. `ips`: the prevResult a runtime hands a DEL (libcni's cached
    result of the ADD)."""
    ipam: dict[str, Any] = {"host": f"h{n}", "timeout": 20}
    if kind in ("stripe", "helper"):
        ipam["pick"] = None  # the default
    conf = netconf([consul.url], [{"name": pool}], ips=ips, **ipam)
    env = {**base_env(), **helper.host_env, "CNI_COMMAND": command,
           "CNI_CONTAINERID": f"m-{n}", "CNI_IFNAME": "eth0",
           "CNI_NETNS": "/var/run/netns/test", "CNI_PATH": "/usr/lib/cni"}
    argv = [executable("ipam-da-consul")]
    if kind == "old":
        env["PYTHONPATH"] = str(old_src)
        argv = [sys.executable, "-c", "from ipam_da_consul.cni.main import main; main()"]
    elif kind == "helper":
        env.update(helper.env)
    p = subprocess.run(argv, input=json.dumps(conf).encode(), env=env, capture_output=True,
                       timeout=60)
    return Outcome(p.returncode, p.stdout.decode(errors="replace"),
                   p.stderr.decode(errors="replace"))


def test_old_and_new_hosts_allocating_at_once_never_share_an_address(
    consul: ConsulAgent, make_pool: Any, old_src: Path, helper: Helper
) -> None:
    pool = make_pool(RANGES)
    wanted = SIZE + 8
    kind = {n: KINDS[n % len(KINDS)] for n in range(wanted)}

    def add(n: int) -> tuple[int, Outcome]:
        return n, call(kind[n], "ADD", consul, pool, n, old_src, helper)

    with ThreadPoolExecutor(16) as ex:
        first = dict(ex.map(add, range(wanted)))
    for n, out in first.items():
        assert out.rc == 0 or out.json["code"] in (122, 125), (kind[n], out)
        assert "Traceback" not in out.stdout, out

    # Whoever lost a race or found the pool full tries again, one at a time, until every
    # address is allocated: a small pool fills completely whatever the mix.
    results = {n: o.json for n, o in first.items() if o.rc == 0}
    for n in sorted(set(range(wanted)) - set(results)):
        again = call(kind[n], "ADD", consul, pool, n, old_src, helper)
        if again.rc == 0:
            results[n] = again.json
        else:
            assert again.json["code"] == 122, (kind[n], again)
    done = {n: r["ips"][0]["address"].split("/")[0] for n, r in results.items()}

    assert len(done) == SIZE, done
    assert len(set(done.values())) == SIZE, f"an address handed out twice: {done}"
    held = consul.allocations(pool)
    assert held == {ip: f"m-{n}" for n, ip in done.items()}, held

    # Every DEL by a version or path other than the one that allocated (the host was upgraded
    # or downgraded in between), with the prevResult a runtime keeps; the containers whose ADD
    # failed get a DEL too, without one, as runtimes clean up after a failed ADD.
    def delete(n: int) -> Outcome:
        other = KINDS[(KINDS.index(kind[n]) + 1) % len(KINDS)]
        ips = results[n]["ips"] if n in results else None
        return call(other, "DEL", consul, pool, n, old_src, helper, ips)

    with ThreadPoolExecutor(8) as ex:
        gone = list(ex.map(delete, range(wanted)))
    assert all(out.rc == 0 for out in gone), [o for o in gone if o.rc]
    assert consul.allocations(pool) == {}
