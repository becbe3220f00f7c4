"""A pool folder of 60,000 allocations holding one malformed key: an in-process ADD fails with
the error the schema always gave (CNI code 117, the same words), and writes nothing.

Against a real Consul, with the installed plugin run as a runtime runs it. The unit tier
(tests/unit/test_folder_validation.py) covers every case against the reference reading; here
each kind of malformed key goes through the whole path: Consul's listing, base64, the plugin.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from ipam_da_consul.allocator.store import KVEntry

from tests.support.agent import ConsulAgent, module_consul
from tests.support.plugin import netconf, run_plugin
from tests.support.plugin_helpers import assert_cni_error
from tests.unit.allocator.test_folder_validation import outcome, reference_held

consul = module_consul("folder60k")

POOL = "big"
FIRST = ipaddress.IPv4Address("10.40.0.2")
SIZE = 60_000
MIDDLE = str(FIRST + SIZE // 2)  # a fill key, rewritten by each case and put back after


@pytest.fixture(scope="module")
def big_pool(consul: ConsulAgent) -> str:
    consul.create_pool(POOL, [{"subnet": "10.40.0.0/16", "gateway": "10.40.0.1"}])
    consul.fill_pool(POOL, FIRST, SIZE)
    return POOL


@pytest.fixture
def folder(consul: ConsulAgent, big_pool: str) -> Iterator[str]:
    yield big_pool
    # Back to 60,000 well-formed keys for the next case.
    consul.put(f"ipam/{big_pool}/{MIDDLE}", {"target": f"fill-{SIZE // 2}"})
    for name in BAD_NAMES:
        kv(consul, "DELETE", f"ipam/{big_pool}/{name}")


def kv(consul: ConsulAgent, method: str, key: str, raw: bytes | None = None) -> None:
    # Quoted: a key name holding '%' must reach Consul as written.
    url = f"{consul.url}/v1/kv/{quote(key, safe='/:')}"
    consul.http.request(method, url, data=raw, timeout=10).raise_for_status()


def conf(consul: ConsulAgent, pool: str) -> dict[str, object]:
    return netconf([consul.url], [{"name": pool}])


BAD_VALUES = [
    b"garbage",  # not JSON
    b"\xff\xfe{",  # not UTF-8
    b'["abc"]',  # not an object
    b"null",
    b"{}",  # no target
    b'{"target": ""}',
    b'{"target": 7}',
    b'{"target": "a", "ifname": 3}',
    b'{"target": "a", "host": ["n1"]}',
    b'{"target": "a", "network": {"a": "b"}}',
    b'{"target": "a", "call": true}',
    b'{"target": "a", "runtime": "web-0"}',
    b'{"target": "a", "runtime": {"K8S_POD_NAME": 7}}',
    b'{"target": "a", "free_after": "soon"}',
    b'{"target": "a", "free_after": NaN}',
    b'{"target": "a", "free_after": true}',
    b'{"target": "a", "at": Infinity}',
    b'{"target": "a", "at": 1' + b"0" * 400 + b"}",
]
# Deeper than json's recursion allows (the reading before rows failed on it with code 100),
# within the size an allocation may have (allocator/schemas.py MAX_ALLOCATION_BYTES).
DEEP = b'{"target": "a", "runtime": ' + b"[" * 2_000 + b"]" * 2_000 + b"}"
# Larger than an allocation may be: refused before it is parsed (issue 25).
LARGE = b'{"target": "a", "pad": "' + b"x" * (400 * 1024) + b'"}'


def short(raw: bytes) -> str:
    return repr(raw) if len(raw) < 60 else f"{raw[:40]!r}...({len(raw)} bytes)"


BAD_NAMES = ["not-an-ip", "10.40.1.256", "010.40.1.7", "fd00::1%eth0", "fd00::g"]


@pytest.mark.parametrize("raw", BAD_VALUES, ids=short)
def test_malformed_value_among_60000(consul: ConsulAgent, folder: str, raw: bytes) -> None:
    key = f"ipam/{folder}/{MIDDLE}"
    kv(consul, "PUT", key, raw)
    expected = outcome(reference_held, KVEntry(key, raw, 0), f"ipam/{folder}/")
    assert expected[0] == "InvalidPool", expected
    index = consul.kv_index()
    out = run_plugin("ADD", conf(consul, folder), container="c-bad-value")
    err = assert_cni_error(out, 117, "1.0.0", key)
    assert err["msg"] == expected[1]
    assert consul.kv_index() == index  # nothing written, not even a fence


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_malformed_key_name_among_60000(consul: ConsulAgent, folder: str, name: str) -> None:
    key = f"ipam/{folder}/{name}"
    kv(consul, "PUT", key, b'{"target": "a"}')
    expected = outcome(reference_held, KVEntry(key, b'{"target": "a"}', 0), f"ipam/{folder}/")
    assert expected[0] == "InvalidPool", expected
    index = consul.kv_index()
    out = run_plugin("ADD", conf(consul, folder), container="c-bad-name")
    err = assert_cni_error(out, 117, "1.0.0", key)
    assert err["msg"] == expected[1]
    assert consul.kv_index() == index


def test_a_value_nested_too_deeply_among_60000(consul: ConsulAgent, folder: str) -> None:
    key = f"ipam/{folder}/{MIDDLE}"
    kv(consul, "PUT", key, DEEP)
    index = consul.kv_index()
    out = run_plugin("ADD", conf(consul, folder), container="c-deep")
    err = assert_cni_error(out, 117, "1.0.0", key)
    assert "nested too deeply" in err["msg"], err
    assert consul.kv_index() == index


def test_a_value_too_large_among_60000(consul: ConsulAgent, folder: str) -> None:
    key = f"ipam/{folder}/{MIDDLE}"
    kv(consul, "PUT", key, LARGE)
    expected = outcome(reference_held, KVEntry(key, LARGE, 0), f"ipam/{folder}/")
    index = consul.kv_index()
    out = run_plugin("ADD", conf(consul, folder), container="c-large")
    err = assert_cni_error(out, 117, "1.0.0", key, "more than the 4096")
    assert err["msg"] == expected[1]
    assert consul.kv_index() == index


def no_orjson(folder: Path) -> dict[str, str]:
    """The plugin's environment with orjson missing, as in the single-file build: a module of
    that name first on the path refuses to load, and leaves a file to say it was asked for."""
    (folder / "orjson.py").write_text(
        f"open({str(folder / 'asked')!r}, 'w').close()\nraise ImportError('no orjson here')\n"
    )
    return {"PYTHONPATH": str(folder)}


def test_without_orjson_a_malformed_value_fails_alike(
    consul: ConsulAgent, folder: str, tmp_path: Path
) -> None:
    key, raw = f"ipam/{folder}/{MIDDLE}", b'{"target": 7}'
    kv(consul, "PUT", key, raw)
    expected = outcome(reference_held, KVEntry(key, raw, 0), f"ipam/{folder}/")
    index = consul.kv_index()
    out = run_plugin("ADD", conf(consul, folder), container="c-bad", env=no_orjson(tmp_path))
    assert assert_cni_error(out, 117, "1.0.0", key)["msg"] == expected[1]
    assert consul.kv_index() == index
    assert (tmp_path / "asked").exists()  # a listing large enough to want it, read by json


def test_without_orjson_60000_still_allocate(
    consul: ConsulAgent, folder: str, tmp_path: Path
) -> None:
    env = no_orjson(tmp_path)
    out = run_plugin("ADD", conf(consul, folder), container="c-json", env=env)
    assert out.rc == 0, out
    assert (tmp_path / "asked").exists()
    assert out.json["ips"][0]["address"] == f"{FIRST + SIZE}/16"  # the lowest free one
    again = run_plugin("ADD", conf(consul, folder), container="c-json", env=env)
    assert again.json["ips"] == out.json["ips"]
    del_conf = netconf([consul.url], [{"name": folder}], ips=out.json["ips"])
    assert run_plugin("DEL", del_conf, container="c-json", env=env).rc == 0


def test_well_formed_60000_still_allocate(consul: ConsulAgent, folder: str) -> None:
    # Keys the schema accepts, though no call of ours writes them, are taken as before:
    # outside the ranges, a numeric string for free_after, unknown fields.
    consul.put(f"ipam/{folder}/192.168.0.1", {"target": "outside"})
    consul.put(f"ipam/{folder}/{MIDDLE}", {"target": "x", "free_after": "1.5", "more": [1]})
    try:
        out = run_plugin("ADD", conf(consul, folder), container="c-good")
        assert out.rc == 0, out
        # An older version's release (a time in `free_after`) counts as taken: no reader
        # compares that time with its clock; GC hands it to a cool-down session
        # (docs/safety.md). So the lowest free address is the first past the fill.
        assert out.json["ips"][0]["address"] == f"{FIRST + SIZE}/16"
        again = run_plugin("ADD", conf(consul, folder), container="c-good")
        assert again.json["ips"] == out.json["ips"]  # found as ours among 60,000
    finally:
        kv(consul, "DELETE", f"ipam/{folder}/192.168.0.1")
        consul.put(f"ipam/{folder}/{MIDDLE}", {"target": f"fill-{SIZE // 2}"})
    del_conf = netconf([consul.url], [{"name": folder}], ips=out.json["ips"])
    assert run_plugin("DEL", del_conf, container="c-good").rc == 0
