"""What a pool's keys may make the plugin hold or compute (issue 25, finding 5).

Anyone who may write a pool could make every call reading it hold or parse as much as they
liked: 60 allocations carrying 400 KiB each made an in-process ADD peak at 156 MB, and the
helper keep them; 30,000 exclusions in one range cost ~1 s per `spread` ADD. Each limit is
checked before the value is parsed: a key past it is an invalid pool (117, naming the key) for
the plugin and the helper alike, and nothing is written.

Against a real Consul with the installed plugin. The limits are allocator/schemas.py's.
"""

from __future__ import annotations

import ipaddress
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ipam_da_consul.allocator.schemas import (
    MAX_ALLOCATION_BYTES,
    MAX_EXCLUSIONS,
    MAX_RANGES,
    MAX_RANGES_BYTES,
)

from tests.support.agent import ConsulAgent, module_consul
from tests.support.plugin import Outcome, netconf, run_plugin
from tests.support.plugin_helpers import assert_cni_error
from tests.support.util_procs import Helper

consul = module_consul("kvlimits")

RANGE = {"subnet": "10.0.20.0/23", "rangeStart": "10.0.21.100", "rangeEnd": "10.0.21.150"}


@pytest.fixture
def helper(tmp_path: Path) -> Iterator[Helper]:
    h = Helper(tmp_path, stderr=tmp_path / "helper.err")
    yield h
    h.close()


def both(conf: dict[str, Any], helper: Helper, container: str) -> tuple[Outcome, Outcome]:
    """The same ADD in-process and through the helper."""
    return (
        run_plugin("ADD", conf, container=container),
        run_plugin("ADD", conf, container=container, env=helper.env),
    )


def assert_117_both(
    consul: ConsulAgent, conf: dict[str, Any], helper: Helper, key: str, *words: str
) -> str:
    index = consul.kv_index()
    inproc, served = both(conf, helper, "c-limit")
    err = assert_cni_error(inproc, 117, "1.0.0", repr(key), *words)
    assert assert_cni_error(served, 117, "1.0.0", repr(key), *words) == err
    assert consul.kv_index() == index  # nothing written, not even a fence
    assert helper.stats()["pools"] == 0  # the helper keeps nothing of such a pool
    return str(err["msg"])


def padded(size: int) -> dict[str, Any]:
    """An allocation of another container padded with an unknown field to `size` bytes."""
    value = {"target": "c-other", "pad": ""}
    value["pad"] = "x" * (size - len(json.dumps(value)))
    assert len(json.dumps(value)) == size
    return value


@pytest.mark.parametrize("size", [MAX_ALLOCATION_BYTES + 1, 400 * 1024])
def test_an_allocation_too_large_is_an_invalid_pool(
    consul: ConsulAgent, make_pool: Any, helper: Helper, size: int
) -> None:
    pool = make_pool([RANGE])
    key = f"ipam/{pool}/10.0.21.120"
    consul.put(key, padded(size))
    msg = assert_117_both(consul, netconf([consul.url], [{"name": pool}]), helper, key)
    assert msg == (
        f"KV key {key!r} does not hold a valid Allocation: the value is {size} bytes, more than "
        f"the {MAX_ALLOCATION_BYTES} an allocation may hold"
    )


def test_an_allocation_at_the_limit_is_taken(
    consul: ConsulAgent, make_pool: Any, helper: Helper
) -> None:
    pool = make_pool([RANGE])
    consul.put(f"ipam/{pool}/10.0.21.100", padded(MAX_ALLOCATION_BYTES))
    inproc, served = both(netconf([consul.url], [{"name": pool}]), helper, "c-at-limit")
    assert inproc.rc == 0 and served.rc == 0, (inproc, served)
    assert inproc.json["ips"] == served.json["ips"]
    assert inproc.json["ips"][0]["address"] == "10.0.21.101/23"


def test_an_allocation_too_large_written_later_stops_the_helper_serving_the_pool(
    consul: ConsulAgent, make_pool: Any, helper: Helper
) -> None:
    pool = make_pool([RANGE])
    conf = netconf([consul.url], [{"name": pool}])
    first = run_plugin("ADD", conf, container="c-first", env=helper.env)
    assert first.rc == 0, first  # cached and watched
    key = f"ipam/{pool}/10.0.21.140"
    consul.put(key, padded(400 * 1024))
    helper.wait_stderr(f"stopped watching pool {pool!r}: KV key {key!r} does not hold")
    assert_117_both(consul, conf, helper, key, "more than the 4096")


def excluded(n: int) -> dict[str, Any]:
    """A /16 with every other address excluded from .2 on: n separate exclusions."""
    base = int(ipaddress.IPv4Address("10.60.0.0"))
    exclude = [str(ipaddress.IPv4Address(base + 2 + 2 * i)) for i in range(n)]
    return {"subnet": "10.60.0.0/16", "gateway": "10.60.0.1", "exclude": exclude}


@pytest.mark.parametrize(
    ("ranges", "words"),
    [
        ([excluded(MAX_EXCLUSIONS + 1)], [f"[0].exclude: {MAX_EXCLUSIONS + 1} exclusions"]),
        ([excluded(30_000)], ["the value is", f"more than the {MAX_RANGES_BYTES} a pool key"]),
        (
            [{"subnet": f"10.{i}.0.0/24"} for i in range(MAX_RANGES + 1)],
            [f"{MAX_RANGES + 1} ranges, more than the {MAX_RANGES}"],
        ),
        (
            [{**RANGE, "comment": "x" * MAX_RANGES_BYTES}],
            [f"more than the {MAX_RANGES_BYTES} a pool key may hold"],
        ),
    ],
    ids=["exclusions", "30000-exclusions", "ranges", "bytes"],
)
def test_a_pool_key_past_a_limit_is_an_invalid_pool(
    consul: ConsulAgent, make_pool: Any, helper: Helper, ranges: list[Any], words: list[str]
) -> None:
    pool = make_pool(ranges)
    conf = netconf([consul.url], [{"name": pool}], pick="spread")
    msg = assert_117_both(consul, conf, helper, f"ipam/{pool}", "does not hold valid IP Ranges")
    for word in words:
        assert word in msg, msg


def test_spread_with_exclusions_at_the_limit_picks_a_free_address(
    consul: ConsulAgent, make_pool: Any, helper: Helper
) -> None:
    pool = make_pool([excluded(MAX_EXCLUSIONS)])
    conf = netconf([consul.url], [{"name": pool}], pick="spread")
    got = []
    for i in range(6):
        began = time.monotonic()
        out = run_plugin("ADD", conf, container=f"c-{i}", env=helper.env if i % 2 else None)
        assert out.rc == 0, out
        assert time.monotonic() - began < 10
        ip = ipaddress.ip_interface(out.json["ips"][0]["address"]).ip
        offset = int(ip) - int(ipaddress.IPv4Address("10.60.0.0"))
        assert offset % 2 == 1 or offset > 2 * MAX_EXCLUSIONS, ip  # never an excluded one
        got.append(ip)
    assert len(set(got)) == len(got)


def test_an_add_whose_allocation_would_be_too_large_writes_nothing(
    consul: ConsulAgent, make_pool: Any
) -> None:
    pool = make_pool([RANGE])
    conf = netconf([consul.url], [{"name": pool}])
    index = consul.kv_index()
    out = run_plugin("ADD", conf, container="c" * 5000)
    assert_cni_error(out, 7, "1.0.0", "more than the 4096 a pool accepts", "container ID")
    assert consul.kv_index() == index


def test_runtime_names_that_would_not_fit_are_left_out(
    consul: ConsulAgent, make_pool: Any
) -> None:
    pool = make_pool([RANGE])
    conf = netconf([consul.url], [{"name": pool}])
    args = {"CNI_ARGS": f"K8S_POD_NAMESPACE=default;K8S_POD_NAME={'p' * MAX_ALLOCATION_BYTES}"}
    out = run_plugin("ADD", conf, container="c-long-pod", env=args)
    assert out.rc == 0, out
    raw = consul.get(f"ipam/{pool}/10.0.21.100")
    assert raw is not None and len(raw) <= MAX_ALLOCATION_BYTES
    value = json.loads(raw)
    assert value["target"] == "c-long-pod" and "runtime" not in value
    assert "left out of the allocation" in out.stderr
    again = run_plugin("ADD", conf, container="c-long-pod", env=args)
    assert again.json["ips"] == out.json["ips"]  # the pool reads as before
