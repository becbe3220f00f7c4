"""The composition root (cni/compose.py): what the plugin's calls and the helper's watchers get
as their store, built from a call's settings, and the only module of cni/ that knows Consul."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
from ipam_da_consul.cni import compose
from ipam_da_consul.cni.config import ConsulSettings
from ipam_da_consul.consul import ConsulKV


def test_a_calls_store_has_the_calls_deadline_and_the_helpers_server() -> None:
    settings = ConsulSettings(["http://a:1", "http://b:2"], timeout=9.0, token="t")
    store = compose.consul_store(settings, 2.0, "http://b:2")
    try:
        # The work's seconds, not the settings' timeout: the rollback's reserve is kept out.
        assert 1.5 < store.deadline.remaining() <= 2.0  # type: ignore[attr-defined]
        assert store.current == "http://b:2" and store.requests_sent == 0
        assert isinstance(store.kv, ConsulKV) and store.kv.client is store.client  # type: ignore[attr-defined]
    finally:
        store.close()
    fresh = compose.consul_store(settings, 2.0, None)
    try:
        assert fresh.current is None  # it chooses a server itself
    finally:
        fresh.close()


def test_a_watcher_gets_a_fresh_deadline_for_each_blocking_query(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[float] = []

    def blocking(self: ConsulKV, prefix: str, index: int = 0, wait: float = 0.0) -> Any:
        seen.append(self.client.deadline.remaining())
        self.client.deadline.end = 0.0  # the round spent it all
        return [], index

    monkeypatch.setattr(ConsulKV, "keys_after", blocking)
    kv = compose.WatchKV(ConsulSettings(["http://a:1"]), 0.5)
    try:
        for _ in range(2):
            assert kv.keys_after("ipam/p/", 3, 0.01) == ([], 3)
        assert len(seen) == 2 and all(0.4 < left <= 0.5 for left in seen), seen
    finally:
        kv.close()


def test_the_machine_and_the_commands_load_no_consul_client() -> None:
    code = (
        "import sys, ipam_da_consul.cni.machine, ipam_da_consul.cni.replay; "
        "print(sorted(m for m in sys.modules if m.startswith(('ipam_da_consul.cni.helper', "
        "'ipam_da_consul.consul.client', 'ipam_da_consul.consul.kv', 'ipam_da_consul.cni.compose'"
        ", 'requests'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

