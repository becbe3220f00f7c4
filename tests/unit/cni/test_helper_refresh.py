"""What the helper's background refresh (cni/helper/cache.py `refreshed`) does with the names
and values Consul hands it (issue 25): a key named to climb out of the pool folder is never read
by its name, and a value too large is dropped as soon as it is read. Unit level with a KV that
records what is asked; the real helper behind a recording relay is tests/e2e/test_kv_paths.py."""

from __future__ import annotations

import json

import pytest
from ipam_da_consul.allocator.errors import InvalidPool
from ipam_da_consul.allocator.layout import Layout
from ipam_da_consul.allocator.pool import parse_pool
from ipam_da_consul.allocator.schemas import MAX_ALLOCATION_BYTES
from ipam_da_consul.allocator.store import KVEntry
from ipam_da_consul.cni.helper.cache import refreshed

from tests.support.memkv import MemKV

LAYOUT = Layout()
RANGES = json.dumps([{"subnet": "10.1.0.0/24"}]).encode()


class Recording(MemKV):
    def __init__(self) -> None:
        super().__init__()
        self.asked: list[str] = []

    def get(self, key: str, consistent: bool = False) -> KVEntry | None:
        self.asked.append(key)
        return super().get(key)


def pool_with(kv: Recording, *keys: str) -> tuple[list[str], object]:
    kv.put("ipam/p", RANGES)
    kv.put("ipam/p/", b"")
    kv.put("ipam/p/10.1.0.5", b'{"target": "a"}')
    old = parse_pool(LAYOUT, "p", kv.list("ipam/p"))
    for key in keys:
        kv.put(key, b'{"target": "b"}')
    return [e.key for e in kv.list("ipam/p/")], old


@pytest.mark.parametrize(
    "name", ["../../secret/db-password", "..", "./10.1.0.6", "10.1.0.6/", "x/10.1.0.6", "a%2Fb"]
)
def test_a_new_key_that_is_not_one_address_fails_the_pool_unread(name: str) -> None:
    kv = Recording()
    kv.put("secret/db-password", b"hunter2")
    key = f"ipam/p/{name}"
    keys, old = pool_with(kv, "ipam/p/10.1.0.7", key)
    with pytest.raises(InvalidPool) as info:
        refreshed(LAYOUT, old, keys, kv)  # type: ignore[arg-type]
    assert str(info.value) == (
        f"KV key {key!r} in the pool folder is not named after a plain IP address"
    )
    assert kv.asked == []  # not even the ranges: the names are judged first


def test_a_new_value_too_large_is_dropped_as_it_is_read() -> None:
    kv = Recording()
    keys, old = pool_with(kv, "ipam/p/10.1.0.7", "ipam/p/10.1.0.8", "ipam/p/10.1.0.9")
    big = json.dumps({"target": "b", "pad": "x" * MAX_ALLOCATION_BYTES}).encode()
    kv.put("ipam/p/10.1.0.8", big)
    with pytest.raises(InvalidPool, match=r"'ipam/p/10\.1\.0\.8' does not hold a valid Allocation"):
        refreshed(LAYOUT, old, keys, kv)  # type: ignore[arg-type]
    assert kv.asked == ["ipam/p", "ipam/p/10.1.0.7", "ipam/p/10.1.0.8"]  # no read past it


def test_new_keys_are_read_and_known_ones_kept() -> None:
    kv = Recording()
    keys, old = pool_with(kv, "ipam/p/10.1.0.7")
    new = refreshed(LAYOUT, old, keys, kv)  # type: ignore[arg-type]
    assert sorted(str(ip) for ip in new.held) == ["10.1.0.5", "10.1.0.7"]
    assert kv.asked == ["ipam/p", "ipam/p/10.1.0.7"]
