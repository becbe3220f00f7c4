"""The helper's steady state against a real Consul (issue 10): what a watched pool costs once it
is loaded. A recording relay sits between the helper's watcher and the agent and notes, per TCP
connection, every request; the watcher is the helper's own (cni/compose.py watch_kv). The module has
its own agent: one test restores a snapshot, which rewinds the agent's whole KV."""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from ipam_da_consul.allocator.layout import Layout
from ipam_da_consul.allocator.pool import list_pool
from ipam_da_consul.cni.compose import watch_kv
from ipam_da_consul.cni.config import ConsulSettings
from ipam_da_consul.cni.helper import cache as cache_module
from ipam_da_consul.cni.helper.cache import PoolCache
from ipam_da_consul.consul import ConsulClient, ConsulKV, Deadline

from tests.support.agent import module_consul
from tests.support.plugin import netconf, run_plugin
from tests.support.util_procs import Helper

consul = module_consul("helper-steady")

RANGES = [{"subnet": "10.5.0.0/24"}]


@dataclass(frozen=True)
class Seen:
    peer: int  # the client's port: one per TCP connection
    method: str
    path: str
    query: dict[str, list[str]]

    @property
    def blocking(self) -> bool:
        return "index" in self.query


class RecordingRelay:
    """An HTTP/1.1 relay (keep-alive both ways) that records each request (GET, PUT, DELETE)
    with the connection it came on; `rewrite` may change the headers of an answer before it
    goes back."""

    def __init__(
        self, upstream: str, rewrite: Callable[[Seen, dict[str, str]], None] | None = None
    ) -> None:
        self.seen: list[Seen] = []
        self.lock = threading.Lock()
        relay = self
        upstream_session = threading.local()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self.relay()

            def do_PUT(self) -> None:
                self.relay()

            def do_DELETE(self) -> None:
                self.relay()

            def relay(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                parts = urlsplit(self.path)
                seen = Seen(self.client_address[1], self.command, parts.path, parse_qs(parts.query))
                with relay.lock:
                    relay.seen.append(seen)
                if not hasattr(upstream_session, "s"):
                    upstream_session.s = requests.Session()
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                try:
                    resp = upstream_session.s.request(
                        self.command, upstream + self.path, headers=headers, data=body,
                        timeout=60,
                    )
                except requests.RequestException:
                    upstream_session.s = requests.Session()
                    self.send_response(502)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                out = {
                    k: v
                    for k, v in resp.headers.items()
                    if k.lower()
                    not in ("content-length", "transfer-encoding", "connection", "content-encoding")
                }
                if rewrite is not None:
                    rewrite(seen, out)
                self.send_response(resp.status_code)
                for k, v in out.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(resp.content)))
                self.end_headers()
                self.wfile.write(resp.content)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def requests(self) -> list[Seen]:
        with self.lock:
            return list(self.seen)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def relay_for(consul) -> Iterator[Callable[..., RecordingRelay]]:
    made: list[RecordingRelay] = []

    def make(rewrite: Callable[[Seen, dict[str, str]], None] | None = None) -> RecordingRelay:
        made.append(RecordingRelay(consul.url, rewrite))
        return made[-1]

    yield make
    for r in made:
        r.close()


def settings(url: str) -> ConsulSettings:
    return ConsulSettings([url], connect_timeout=2.0, read_timeout=5.0, timeout=15.0)


def direct(consul) -> ConsulKV:
    return ConsulKV(ConsulClient([consul.url], deadline=Deadline(60)))


def watched_cache(consul, relay: RecordingRelay, pool: str, interval: float) -> PoolCache:
    """A PoolCache reading through `relay` as the helper's do; the first load goes straight to
    the agent, so the relay sees the watcher alone."""
    layout = Layout()
    cache = PoolCache(lambda: watch_kv(settings(relay.url)), layout, refresh_interval=interval)
    cache.get(pool, lambda: list_pool(direct(consul), layout, pool))
    return cache


def wait_for(check: Callable[[], bool], within: float = 15.0) -> bool:
    end = time.monotonic() + within
    while not check():
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


def held(cache: PoolCache, pool: str) -> set[str]:
    current = cache.peek(pool)
    return {str(ip) for ip in current.held} if current is not None else set()


def write_and_follow(consul, cache: PoolCache, pool: str, pause: float = 0.0) -> None:
    """Six writes to the pool's folder, each seen by the watcher (one round each)."""
    for ip in (f"10.5.0.{i}" for i in range(2, 8)):
        consul.put(f"ipam/{pool}/{ip}", {"target": f"t-{ip}"})
        assert wait_for(functools.partial(followed, cache, pool, ip)), ip
        time.sleep(pause)


def followed(cache: PoolCache, pool: str, ip: str) -> bool:
    return ip in held(cache, pool)


def test_a_watcher_keeps_one_connection_and_checks_the_leader_once(consul, make_pool, relay_for):
    """Steady state items 1 and 2: one blocking query per round, all on one kept-alive
    connection, and the leader check only when the watcher starts, not every round."""
    pool = make_pool(RANGES)
    relay = relay_for()
    cache = watched_cache(consul, relay, pool, interval=0.01)
    try:
        write_and_follow(consul, cache, pool)
        # The round after the last change is under way: its blocking query has gone out.
        assert wait_for(lambda: sum(s.blocking for s in relay.requests()) >= 7)
        seen = relay.requests()
    finally:
        cache.close()
    folder = f"/v1/kv/ipam/{pool}/"
    blocking = [s for s in seen if s.blocking]
    assert all(s.path == folder and "keys" in s.query for s in blocking), blocking
    # One blocking query per change (Consul may wake a query once more for the same write).
    assert 7 <= len(blocking) <= 14, blocking
    assert len({s.peer for s in seen}) == 1, sorted({s.peer for s in seen})
    assert [s.path for s in seen].count("/v1/status/leader") == 1, [s.path for s in seen]


def test_a_watcher_renews_its_client_so_a_failover_is_not_for_ever(
    consul, make_pool, relay_for, monkeypatch
):
    """The kept client is renewed every few minutes (here 1 s): a new connection and a new
    leader check, so a watcher that failed over gets back to the first-listed server."""
    monkeypatch.setattr(cache_module, "_RENEW_KV_AFTER", 1.0)
    pool = make_pool(RANGES)
    relay = relay_for()
    cache = watched_cache(consul, relay, pool, interval=0.01)
    try:
        write_and_follow(consul, cache, pool, pause=0.5)
        seen = relay.requests()
    finally:
        cache.close()
    leader_checks = [s for s in seen if s.path == "/v1/status/leader"]
    # About 3 s of rounds with a renewal past each second: 2 to 4 clients, each on its own
    # connection and each starting with its leader check.
    assert 2 <= len(leader_checks) <= 5, [s.path for s in seen]
    assert len({s.peer for s in seen}) == len(leader_checks), seen


def test_a_pool_watcher_ignores_a_pool_that_shares_its_name_as_a_prefix(
    consul, make_pool, relay_for
):
    """Item 3, through the relay: the watcher of `blue` queries the folder `blue/`, reads the
    key `blue`, and wakes for no write to `blue-v6`."""
    blue = make_pool(RANGES)
    other = make_pool([{"subnet": "10.6.0.0/24"}], name=f"{blue}-v6")
    relay = relay_for()
    cache = watched_cache(consul, relay, blue, interval=0.01)
    try:
        assert wait_for(lambda: any(s.blocking for s in relay.requests()))
        for i in range(2, 12):
            consul.put(f"ipam/{other}/10.6.0.{i}", {"target": f"o{i}"})
        time.sleep(0.5)
        quiet = relay.requests()
        consul.put(f"ipam/{blue}/10.5.0.9", {"target": "b"})
        assert wait_for(lambda: "10.5.0.9" in held(cache, blue))
        seen = relay.requests()
    finally:
        cache.close()
    assert sum(s.blocking for s in quiet) == 1, quiet  # still the first query, not woken
    kv_paths = {s.path for s in seen if s.path.startswith("/v1/kv/")}
    # The folder (blocking), the pool key (ranges) and the one new key: nothing of `blue-v6`.
    assert kv_paths == {
        f"/v1/kv/ipam/{blue}/",
        f"/v1/kv/ipam/{blue}",
        f"/v1/kv/ipam/{blue}/10.5.0.9",
    }, seen


def test_index_going_backwards_starts_over_from_zero(consul, make_pool, relay_for):
    """Item 5: a restored snapshot moves the folder's X-Consul-Index back; the watcher then
    lists from index 0 (no `index` parameter), and goes on blocking from the new index."""
    pool = make_pool(RANGES)
    consul.put(f"ipam/{pool}/10.5.0.2", {"target": "kept"})
    snapshot = requests.get(f"{consul.url}/v1/snapshot", timeout=30)
    snapshot.raise_for_status()
    relay = relay_for()
    cache = watched_cache(consul, relay, pool, interval=0.01)
    try:
        for i in range(3, 6):
            consul.put(f"ipam/{pool}/10.5.0.{i}", {"target": f"gone{i}"})
        assert wait_for(lambda: held(cache, pool) == {f"10.5.0.{i}" for i in range(2, 6)})
        before = len(relay.requests())
        requests.put(
            f"{consul.url}/v1/snapshot", data=snapshot.content, timeout=30
        ).raise_for_status()
        # Consul keeps a query blocked on an index above its own until the wait (30 s) ends.
        assert wait_for(lambda: held(cache, pool) == {"10.5.0.2"}, within=45)
        # Writes after the restore are followed as before.
        consul.put(f"ipam/{pool}/10.5.0.7", {"target": "after"})
        assert wait_for(lambda: held(cache, pool) == {"10.5.0.2", "10.5.0.7"})
        seen = relay.requests()[before:]
    finally:
        cache.close()
    folder = [s for s in seen if s.path == f"/v1/kv/ipam/{pool}/"]
    indexes = [int(s.query["index"][0]) if s.blocking else 0 for s in folder]
    restart = indexes.index(0)  # the listing from 0, right after the answer that went back
    assert restart >= 1 and all(i > 0 for i in indexes[restart + 1 :]), indexes
    assert indexes[restart + 1] < indexes[restart - 1], indexes


def test_no_index_from_consul_makes_the_watcher_back_off(consul, make_pool, relay_for):
    """Item 5: an answer without X-Consul-Index (0) cannot be blocked on; the watcher does not
    poll at its refresh interval then but waits longer and longer, and still follows changes."""
    pool = make_pool(RANGES)

    def drop_index(seen: Seen, headers: dict[str, str]) -> None:
        if seen.path == f"/v1/kv/ipam/{pool}/":
            headers.pop("X-Consul-Index", None)

    relay = relay_for(drop_index)
    cache = watched_cache(consul, relay, pool, interval=0.05)
    try:
        # The first query blocks on the loaded index; a write ends it, without an index.
        assert wait_for(lambda: any(s.blocking for s in relay.requests()))
        consul.put(f"ipam/{pool}/10.5.0.3", {"target": "first"})
        assert wait_for(lambda: "10.5.0.3" in held(cache, pool))
        start = len(relay.requests())
        time.sleep(3.0)
        folder = [s for s in relay.requests()[start:] if s.path == f"/v1/kv/ipam/{pool}/"]
        consul.put(f"ipam/{pool}/10.5.0.4", {"target": "late"})
        assert wait_for(lambda: "10.5.0.4" in held(cache, pool), within=20)
    finally:
        cache.close()
    # At the refresh interval that would be some 60 listings; backing off from 0.05 s,
    # doubling: 0.05 + 0.1 + 0.2 + 0.4 + 0.8 + 1.6 > 3 s, so at most 7.
    assert 2 <= len(folder) <= 7, folder


def test_status_through_the_helper_reads_one_key_per_pool(consul, make_pool, relay_for, tmp_path):
    """Item 4: STATUS, which runtimes poll, costs one small read per watched pool while nothing
    changed (no leader check, no listing); "no room" and changed ranges get a fresh listing."""
    a = make_pool(RANGES)
    b = make_pool([{"subnet": "10.6.1.0/24", "rangeStart": "10.6.1.10", "rangeEnd": "10.6.1.13"}])
    relay = relay_for()
    conf = netconf([relay.url], [{"name": a}, {"name": b}], "1.1.0")
    helper = Helper(tmp_path)

    def status(**ipam: object) -> tuple[object, list[Seen]]:
        mark = len(relay.requests())
        out = run_plugin(
            "STATUS", {**conf, "ipam": {**conf["ipam"], **ipam}}, container=None, ifname=None,
            env=helper.env,
        )
        seen = relay.requests()
        # The pools' watchers read through the relay too, each on its own kept-alive connection
        # that blocks: leave their requests out.
        watchers = {x.peer for x in seen if x.blocking}
        return out, [x for x in seen[mark:] if x.peer not in watchers]

    def listed(seen: list[Seen]) -> set[str]:
        return {s.path for s in seen if "recurse" in s.query or "keys" in s.query}

    try:
        add = run_plugin("ADD", conf, container="st-1", env=helper.env)  # loads both: watched
        assert add.rc == 0, add
        out, seen = status()
        assert out.rc == 0 and out.stdout == "", out
        assert sorted((s.method, s.path, sorted(s.query)) for s in seen) == [
            ("GET", f"/v1/kv/ipam/{a}", []),
            ("GET", f"/v1/kv/ipam/{b}", []),
        ], seen
        # Four addresses in b, one held by st-1: the watched copy says 3 < 4, and that is
        # only said after a fresh listing of b.
        out, seen = status(min_free=4)
        assert out.rc == 50 and "3 free" in out.stdout, out
        assert listed(seen) == {f"/v1/kv/ipam/{b}/"}, seen
        # Wider ranges: the key's ModifyIndex no longer matches the watched copy's, so b is
        # read afresh at once (its watcher would see the change only after its wait ends).
        consul.put(
            f"ipam/{b}",
            [{"subnet": "10.6.1.0/24", "rangeStart": "10.6.1.10", "rangeEnd": "10.6.1.20"}],
        )
        out, seen = status(min_free=4)
        assert out.rc == 0, out
        assert listed(seen) == {f"/v1/kv/ipam/{b}/"}, seen
        assert "/v1/status/leader" not in {s.path for s in seen}, seen
    finally:
        helper.close()
