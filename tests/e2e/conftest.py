"""Fixtures of the e2e tier: a real Consul dev agent per session, fresh pools and network
configs naming it. Only tests under tests/e2e see them: the unit tier never starts Consul."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support import plugin
from tests.support.agent import ConsulAgent
from tests.support.plugin import netconf

_counter = itertools.count()


@pytest.fixture(scope="session", autouse=True)
def helpers_state_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Helpers a test starts without `--state-dir` read IPAM_DA_CONSUL_STATE_DIR: never the
    machine's own /var/lib/ipam-da-consul."""
    old = os.environ.get("IPAM_DA_CONSUL_STATE_DIR")
    os.environ["IPAM_DA_CONSUL_STATE_DIR"] = str(tmp_path_factory.mktemp("helpers") / "state")
    yield
    if old is None:
        os.environ.pop("IPAM_DA_CONSUL_STATE_DIR", None)
    else:
        os.environ["IPAM_DA_CONSUL_STATE_DIR"] = old


@pytest.fixture(autouse=True)
def own_state_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Each test's in-process calls get their own state folder (cni/state.py)."""
    plugin.STATE_DIR = str(tmp_path_factory.mktemp("state") / "state")
    yield
    plugin.STATE_DIR = None


@pytest.fixture(scope="session")
def consul() -> Iterator[ConsulAgent]:
    agent = ConsulAgent("dev").start()
    yield agent
    agent.close()


@pytest.fixture
def pool_name() -> str:
    return f"pool-{os.getpid()}-{next(_counter)}"


@pytest.fixture
def make_pool(consul: ConsulAgent):
    """make_pool(ranges) -> name of a fresh pool holding those ranges."""

    def make(ranges: list[dict[str, str]] | None = None, name: str | None = None) -> str:
        name = name or f"pool-{os.getpid()}-{next(_counter)}"
        consul.create_pool(
            name,
            ranges
            or [
                {
                    "subnet": "10.0.20.0/23",
                    "rangeStart": "10.0.21.100",
                    "rangeEnd": "10.0.21.150",
                    "gateway": "10.0.20.1",
                }
            ],
        )
        return name

    return make


@pytest.fixture
def conf_for(consul: ConsulAgent):
    """conf_for(pool, version=..., **ipam) -> a network config naming the dev agent."""

    def make(
        *pools: str | dict[str, Any],
        version: str = "1.0.0",
        ips: list[dict[str, Any]] | None = None,
        **ipam: Any,
    ) -> dict[str, Any]:
        objs = [p if isinstance(p, dict) else {"name": p} for p in pools]
        return netconf([consul.url], objs, version, ips, **ipam)

    return make
