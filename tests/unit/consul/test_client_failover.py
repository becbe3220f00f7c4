"""The client's failover against refusing ports and black holes: no Consul needed."""

from __future__ import annotations

import time

from ipam_da_consul.consul import ConsulClient, ConsulError, ConsulUnavailable, Deadline

from tests.support.agent import free_ports


def dead_url() -> str:
    return f"http://127.0.0.1:{free_ports(1)[0]}"


def timed(fn) -> tuple[float, object]:
    started = time.monotonic()
    try:
        result: object = fn()
    except ConsulError as exc:
        result = exc
    return time.monotonic() - started, result


def test_all_refusing_fails_fast_and_names_each_server():
    servers = [dead_url(), dead_url(), dead_url()]
    client = ConsulClient(servers, deadline=Deadline(15))
    took, err = timed(client.select)
    assert isinstance(err, ConsulUnavailable), err
    assert took < 2.5, took
    # A few retries happened within the grace, not a single round.
    assert client.requests_sent >= 2 * len(servers), client.requests_sent
    for server in servers:
        assert f"{server}: connection failed (refused or unreachable)" in str(err)


def test_grace_is_configurable_and_request_fails_fast_too():
    servers = [dead_url(), dead_url()]
    client = ConsulClient(servers, deadline=Deadline(15), unreachable_grace=0.5)
    took, err = timed(lambda: client.request("GET", "/v1/kv/x"))
    assert isinstance(err, ConsulUnavailable) and not err.doubtful, err
    assert took < 1.0, took


def test_black_holes_and_refusals_alone_fail_within_the_grace(hole):
    servers = [hole.url, dead_url()]
    client = ConsulClient(servers, connect_timeout=0.5, deadline=Deadline(15))
    took, err = timed(client.select)
    assert isinstance(err, ConsulUnavailable), err
    assert took < 2.0 + 0.5 + 0.5, took
    assert f"{hole.url}: connect timed out" in str(err)
    assert f"{servers[1]}: connection failed (refused or unreachable)" in str(err)
