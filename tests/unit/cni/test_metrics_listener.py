"""The helper's metrics listener (issue 25, finding 4), in this process with short limits: what
it answers, and what a client that is slow, silent, too big or one too many gets. The same
listener under a real flood, with a real helper and calls: tests/e2e/test_metrics_flood.py."""

from __future__ import annotations

import contextlib
import errno
import gzip
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from ipam_da_consul.cni.helper.metrics import MAX_REQUEST, Metrics, Sources, connection_cap
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

SOURCES = Sources(stats=lambda: {"served": 3, "pools": 1}, active=lambda: 0, pools=lambda: [])
TIMEOUT = 0.3


@pytest.fixture
def served() -> Iterator[tuple[Metrics, str, int]]:
    metrics = Metrics()
    url = metrics.serve(
        ("127.0.0.1", 0), SOURCES, max_connections=2, request_timeout=TIMEOUT,
        answer_timeout=TIMEOUT,
    )
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    yield metrics, url, port
    metrics.close()


def dropped(metrics: Metrics, reason: str) -> float:
    value = metrics.registry.get_sample_value(
        "ipam_da_consul_metrics_connections_dropped_total", {"reason": reason}
    )
    assert value is not None
    return value


def exchange(port: int, data: bytes, timeout: float = 5) -> bytes:
    """Send `data`, then read until the listener closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        got = b""
        while chunk := sock.recv(65536):
            got += chunk
        return got


def closed_by_listener(sock: socket.socket, within: float) -> float:
    """Seconds until the listener closed `sock` (EOF or reset); fails after `within`."""
    began = time.monotonic()
    sock.settimeout(within)
    with contextlib.suppress(ConnectionResetError):
        assert sock.recv(1) == b""
    return time.monotonic() - began


def test_metrics_are_negotiated_as_prometheus_client_did(served: tuple[Metrics, str, int]):
    _, url, port = served
    plain = requests.get(url, headers={"Accept-Encoding": "identity"}, timeout=5)
    assert plain.status_code == 200
    assert plain.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert plain.headers["Connection"] == "close"
    names = {f.name for f in text_string_to_metric_families(plain.text)}
    assert {"ipam_da_consul_helper_requests", "ipam_da_consul_metrics_connections_dropped",
            "process_open_fds"} <= names
    assert "ipam_da_consul_helper_requests_total{outcome=\"served\"} 3.0" in plain.text

    zipped = exchange(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\n\r\n")
    head, body = zipped.split(b"\r\n\r\n", 1)
    assert b"Content-Encoding: gzip" in head and gzip.decompress(body).startswith(b"# HELP")

    om = requests.get(url, headers={"Accept": "application/openmetrics-text"}, timeout=5)
    assert om.headers["Content-Type"].startswith("application/openmetrics-text")
    assert om.text.endswith("# EOF\n")

    one = requests.get(url, params={"name[]": "ipam_da_consul_cache_refreshes_total"}, timeout=5)
    assert [f.name for f in text_string_to_metric_families(one.text)] == [
        "ipam_da_consul_cache_refreshes"
    ]

    headed = exchange(port, b"HEAD /metrics HTTP/1.0\r\n\r\n")
    head, body = headed.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 ") and body == b""
    assert b"Content-Length: 0" not in head


def test_only_get_of_metrics_or_the_root(served: tuple[Metrics, str, int]):
    _, url, port = served
    root = url.removesuffix("metrics")
    assert requests.get(root, timeout=5).text == "ipam-da-consul helper: metrics at /metrics\n"
    assert requests.get(root + "other", timeout=5).status_code == 404
    posted = requests.post(url, data=b"x", timeout=5)
    assert posted.status_code == 405 and posted.headers["Allow"] == "GET, HEAD"
    # A hand-typed request with bare line feeds is still a request.
    assert exchange(port, b"GET /metrics HTTP/1.0\n\n").startswith(b"HTTP/1.1 200 OK\r\n")


def test_oversized_and_malformed_requests(served: tuple[Metrics, str, int]):
    metrics, _, port = served
    huge = b"GET /metrics HTTP/1.1\r\nX-Pad: " + b"a" * MAX_REQUEST
    assert exchange(port, huge).startswith(b"HTTP/1.1 431 ")
    assert exchange(port, b"hello there\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert exchange(port, b"GET /metrics HTTP/1.1\r\nno colon\r\n\r\n").startswith(
        b"HTTP/1.1 400 "
    )
    assert dropped(metrics, "invalid") == 3


def test_silent_and_slow_clients_are_dropped_at_the_deadline(
    served: tuple[Metrics, str, int],
):
    metrics, _, port = served
    with socket.create_connection(("127.0.0.1", port)) as idle:
        assert TIMEOUT * 0.8 < closed_by_listener(idle, 3) < TIMEOUT + 1
    # A byte at a time never extends the deadline: it counts from the accept.
    with socket.create_connection(("127.0.0.1", port)) as slow:
        began = time.monotonic()
        with pytest.raises(OSError):  # sends until the listener hangs up
            for byte in b"GET /metrics HTTP/1.1\r\nHost: " + b"x" * 1000:
                slow.send(bytes([byte]))
                time.sleep(0.02)
        assert time.monotonic() - began < TIMEOUT + 1
    assert dropped(metrics, "timeout") == 2
    assert not metrics.listener or not metrics.listener.connections


def test_connections_beyond_the_cap_are_closed_at_once(served: tuple[Metrics, str, int]):
    metrics, url, port = served
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
    try:
        end = time.monotonic() + 5
        while not metrics.listener or len(metrics.listener.connections) < 2:  # the cap
            assert time.monotonic() < end
            time.sleep(0.01)
        with socket.create_connection(("127.0.0.1", port)) as third:
            assert closed_by_listener(third, 3) < TIMEOUT / 2
        assert dropped(metrics, "over_cap") == 1
        # Once the held ones time out, a scrape gets through again.
        time.sleep(TIMEOUT + 0.2)
        assert requests.get(url, timeout=5).status_code == 200
    finally:
        for sock in held:
            sock.close()


class _Big(Collector):
    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("big", "an answer larger than the socket buffers", labels=["v"])
        family.add_metric(["x" * 16_000_000], 1)
        yield family


def test_a_reader_that_stops_reading_is_dropped(served: tuple[Metrics, str, int]):
    metrics, _, port = served
    metrics.registry.register(_Big())
    with socket.socket() as reader:
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        reader.connect(("127.0.0.1", port))
        reader.sendall(b"GET /metrics HTTP/1.1\r\nAccept-Encoding: identity\r\n\r\n")
        end = time.monotonic() + 10
        while dropped(metrics, "timeout") < 1:
            assert time.monotonic() < end, "a reader that never reads was never dropped"
            time.sleep(0.05)
    assert metrics.listener is not None and not metrics.listener.connections


class _Failing(Collector):
    def collect(self) -> Iterator[Metric]:
        raise RuntimeError("a collector bug")


def test_a_failing_collection_costs_one_scrape(served: tuple[Metrics, str, int]):
    metrics, url, _ = served
    failing = _Failing()
    metrics.registry.register(failing)
    assert requests.get(url, timeout=5).status_code == 500
    metrics.registry.unregister(failing)
    assert requests.get(url, timeout=5).status_code == 200


class _Exhausted:
    """The listening socket, as when the process has no descriptor left: accept() fails with
    EMFILE while the connection stays queued, so the socket stays readable."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.calls = 0
        self.failing = True

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept(self) -> Any:
        self.calls += 1
        if self.failing:
            raise OSError(errno.EMFILE, "Too many open files")
        return self.sock.accept()

    def close(self) -> None:
        self.sock.close()


def test_out_of_descriptors_backs_off_instead_of_spinning(served: tuple[Metrics, str, int]):
    metrics, url, port = served
    listener = metrics.listener
    assert listener is not None
    exhausted = _Exhausted(listener.sock)
    listener.sock = exhausted  # type: ignore[assignment]
    with socket.create_connection(("127.0.0.1", port)) as waiting:
        time.sleep(1.5)
        # 50 ms, doubling to 1 s: 0, .05, .15, .35, .75, 1.35 s. Spinning: thousands.
        assert 3 <= exhausted.calls <= 8, exhausted.calls
        exhausted.failing = False
        # The queued connection is taken as soon as accept() works again (within 1 s).
        waiting.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        waiting.settimeout(5)
        assert waiting.recv(12) == b"HTTP/1.1 200"
    assert requests.get(url, timeout=5).status_code == 200


@pytest.mark.parametrize(
    ("soft", "cap"), [(1024, 32), (524288, 32), (-1, 32), (256, 8), (40, 1), (3, 1)]
)
def test_the_cap_leaves_most_descriptors_to_the_calls(soft: int, cap: int):
    assert connection_cap(soft) == cap
