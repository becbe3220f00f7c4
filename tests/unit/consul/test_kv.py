"""Reading Consul's KV answers (consul/kv.py): listings kept as columns, and a large listing
parsed by orjson when installed, with the same result as json gives."""

from __future__ import annotations

import base64
import http.server
import json
import threading
from binascii import a2b_base64
from itertools import repeat
from operator import itemgetter
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ipam_da_consul.allocator.store import (
    Cas,
    Check,
    Columns,
    KVEntry,
    Op,
    StoreError,
    TxnResult,
    UnsafeKey,
)
from ipam_da_consul.consul import kv
from ipam_da_consul.consul import requests_transport as rt
from ipam_da_consul.consul.client import ConsulClient, Response
from ipam_da_consul.consul.errors import ConsulError

from tests.support.properties import examples

FOLDER = "ipam/p/"


def listing_body(n: int, flags: str = "0") -> bytes:
    """A compact listing as Consul sends it, `n` entries (6,500 pass the 1 MB mark)."""
    rows = []
    for i in range(n):
        value = base64.b64encode(json.dumps({"target": f"c-{i}", "ifname": "eth0"}).encode())
        rows.append(
            f'{{"LockIndex":0,"Key":"{FOLDER}10.{i >> 16}.{(i >> 8) & 255}.{i & 255}",'
            f'"Flags":{flags},"Value":"{value.decode()}","CreateIndex":{i},"ModifyIndex":{i + 7}}}'
        )
    return ("[" + ",".join(rows) + "]").encode()


def read(body: bytes) -> Columns:
    return kv._entries(Response(200, body, {}), FOLDER)


def columns(listing: Columns) -> tuple[list[str], list[bytes], list[int]]:
    return listing.keys, listing.values, listing.indexes


@pytest.fixture
def stdlib_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kv, "_orjson_loads", json.loads)


def test_a_large_listing_reads_as_json_reads_it(monkeypatch: pytest.MonkeyPatch) -> None:
    body = listing_body(7_000)
    assert len(body) > kv._LARGE_LISTING
    fast = read(body)
    monkeypatch.setattr(kv, "_orjson_loads", json.loads)
    assert columns(fast) == columns(read(body))
    assert fast[3] == KVEntry(
        f"{FOLDER}10.0.0.3", json.dumps({"target": "c-3", "ifname": "eth0"}).encode(), 10
    )


def test_orjson_parses_a_large_listing_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    orjson = pytest.importorskip("orjson")
    monkeypatch.setattr(kv, "_orjson_loads", None)
    read(listing_body(7_000))
    assert kv._orjson_loads is orjson.loads


def test_what_orjson_refuses_json_still_reads() -> None:
    # NaN is not JSON by the RFC; Python's json takes it, orjson refuses it. Consul never
    # sends it: whatever either parser would make of an odd answer, json has the last word.
    body = listing_body(7_000, flags="NaN")
    assert len(body) > kv._LARGE_LISTING
    got = read(body)
    assert len(got) == 7_000 and got.indexes[-1] == 7_006


@pytest.mark.parametrize("size", [3, 7_000])
@pytest.mark.usefixtures("stdlib_only")
def test_a_key_that_is_not_text_is_a_consul_error(size: int) -> None:
    data: list[dict[str, Any]] = json.loads(listing_body(size))
    data[1]["Key"] = 17
    with pytest.raises(ConsulError, match="not text"):
        read(json.dumps(data).encode())


def test_a_listing_is_a_sequence_of_entries() -> None:
    got = read(listing_body(4))
    assert len(got) == 4 and isinstance(got, Columns)
    assert list(got) == [got[0], got[1], got[2], got[3]] and got[-1] == got[3]
    assert got[1:3] == [got[1], got[2]] and isinstance(got[1:3], Columns)
    both = Columns.of([KVEntry("ipam/p", b"[]", 1)]) + got
    assert [e.key for e in both] == ["ipam/p", *got.keys]
    assert Columns.of(list(got)) == got and Columns.of(got) is got


def test_servers_on_this_host_answer_uncompressed() -> None:
    seen: list[str | None] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("Accept-Encoding"))
            body = b'"127.0.0.1:8300"' if self.path.startswith("/v1/status/leader") else b"[]"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = ConsulClient([f"http://127.0.0.1:{server.server_address[1]}"])
        client.request("GET", "/v1/kv/ipam/p/", {"recurse": "true"})
    finally:
        server.shutdown()
    assert seen and set(seen) == {"identity"}


@pytest.mark.parametrize(
    ("url", "plain"),
    [
        ("http://127.0.0.1:8500", True),
        ("http://127.3.0.1:8500", True),
        ("https://[::1]:8501", True),
        ("http://localhost:8500", True),
        ("http://10.0.0.5:8500", False),
        ("https://[fd00::5]:8501", False),
        ("http://consul.service.consul:8500", False),
    ],
)
def test_only_servers_on_this_host_are_asked_for_plain_answers(url: str, plain: bool) -> None:
    assert rt._on_this_host(url) is plain
    transport = ConsulClient([url]).transport
    assert isinstance(transport, rt.RequestsTransport) and transport.plain(url) is plain


# -- a large listing parsed a piece at a time ---------------------------------------------
def before(body: bytes) -> tuple[str, Any]:
    """The reference: `_entries` as it read every listing, whole, before pieces (b395410)."""
    try:
        data = kv._listing_json(body)
        keys = list(map(itemgetter("Key"), data))
        indexes = list(map(itemgetter("ModifyIndex"), data))
        if not set(map(type, indexes)) <= {int}:
            indexes = [int(i) for i in indexes]
        raw: list[Any] = list(map(dict.get, data, repeat("Value")))
        if None in raw:
            raw = [v or "" for v in raw]
        values = list(map(a2b_base64, raw))
    # OverflowError escaped then (an index of 1e400): it is a ConsulError now.
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError):
        return ("error", None)
    if not set(map(type, keys)) <= {str}:
        return ("error", None)
    return ("ok", (keys, values, indexes))


def in_pieces(body: bytes) -> tuple[str, Any]:
    try:
        return ("ok", columns(read(body)))
    except ConsulError:
        return ("error", None)


def test_a_large_listing_is_read_in_pieces_as_a_whole_read_gives_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    body = listing_body(7_000)
    pieces = list(kv._pieces(body))
    assert len(pieces) == len(body) // kv._PIECE + 1 > 10
    # Each cut drops a comma and adds `]` and `[`.
    assert sum(map(len, pieces)) == len(body) + len(pieces) - 1
    assert in_pieces(body) == before(body)
    parsed: list[int] = []
    real = kv._listing_json_large

    def counted(piece: bytes) -> list[Any]:
        parsed.append(len(piece))
        return real(piece)

    monkeypatch.setattr(kv, "_listing_json_large", counted)
    read(body)
    assert len(parsed) == len(pieces)


# Keys and values built to put `},{` where a cut would fall inside a string, or inside an
# entry that is not flat: every such cut must send the body to the whole reading.
_tricky = st.sampled_from(["},{", '"},{"', "}", "{", ",", "[", "]", "\\", '"', "a", "é", "\\u0041"])
_texts = st.lists(_tricky, max_size=6).map("".join)
# Written into the body as they stand: tokens json reads and orjson refuses, or reads otherwise.
_RAW = {
    '"@BIG@"': "18446744073709551617",
    '"@NAN@"': "NaN",
    '"@INF@"': "1e400",
    '"@SURR@"': '"\\ud800"',
}
_raw = st.sampled_from([k.strip('"') for k in _RAW])
_entry = st.fixed_dictionaries(
    {"LockIndex": st.just(0), "Key": _texts, "Flags": st.just(0)},
    optional={
        "Value": st.one_of(
            st.none(), st.binary(max_size=12).map(lambda b: base64.b64encode(b).decode())
        ),
        "CreateIndex": st.integers(0, 99),
        "ModifyIndex": st.one_of(st.integers(0, 99), st.just("7"), _raw),
        "Extra": st.recursive(
            st.one_of(st.none(), st.integers(0, 9), _texts, _raw),
            lambda inner: st.one_of(
                st.lists(inner, max_size=3), st.dictionaries(_texts, inner, max_size=3)
            ),
            max_leaves=6,
        ),
    },
)


@st.composite
def _bodies(draw: st.DrawFn) -> bytes:
    entries = draw(st.lists(_entry, max_size=8))
    text = json.dumps(entries, separators=(",", ":"), ensure_ascii=draw(st.booleans()))
    for token, raw in _RAW.items():
        text = text.replace(token, raw)
    body = text.encode("utf-8", "surrogatepass")
    if draw(st.integers(0, 9)) == 0:
        body = b"\xef\xbb\xbf" + body  # json takes a byte order mark, orjson does not
    if draw(st.booleans()):
        # Damage: a byte dropped, changed or added somewhere.
        at = draw(st.integers(0, len(body)))
        what = draw(st.sampled_from([b"", b"}", b"{", b",", b'"', b"]", b"},{"]))
        body = body[:at] + what + body[at + draw(st.integers(0, 1)) :]
    return body


@settings(max_examples=examples(1500), deadline=None)
@given(_bodies(), st.integers(0, 40))
def test_any_listing_reads_in_pieces_as_it_was_read_whole(body: bytes, piece: int) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kv, "_LARGE_LISTING", 0)
        mp.setattr(kv, "_PIECE", piece)
        assert in_pieces(body) == before(body)


def test_a_listing_is_never_read_partly_by_orjson_and_partly_by_json(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("orjson")
    monkeypatch.setattr(kv, "_LARGE_LISTING", 0)
    monkeypatch.setattr(kv, "_PIECE", 0)
    # orjson reads an integer beyond 64 bits as a float; the NaN (which orjson refuses) in
    # the next piece sends the whole body to json, which reads the integer exactly.
    body = b'[{"Key":"a","ModifyIndex":18446744073709551617},{"Key":"b","ModifyIndex":1,"X":NaN}]'
    assert len(list(kv._pieces(body))) == 2
    assert read(body).indexes == [18446744073709551617, 1]


# -- which keys a request may be built from (issue 25, finding 1) -------------------------------
class Recorder:
    """A ConsulClient stand-in that answers 404 to everything and remembers what was asked."""

    read_timeout = 5.0

    def __init__(self) -> None:
        self.asked: list[tuple[str, str]] = []

    def request(self, method: str, path: str, *args: Any, **kwargs: Any) -> Response:
        self.asked.append((method, path))
        return Response(404, b"", {"X-Consul-Index": "7"})


UNSAFE_KEYS = [
    "ipam/.fences/../",  # the GC of a network named `..`: all of ipam/ once urllib3 cleans it
    "ipam/.fences/./",
    "ipam/p/../../secret/db-password",
    "ipam/p/..",
    "..",
    ".",
    "./ipam",
    "ipam//x",
    "ipam/p//",
    "/ipam/p",
    "/",
    "//",
    "ipam/a%2Fb",
    "ipam/a%2fb/",
    "ipam/%2F",
]
SAFE_KEYS = [
    "",  # the KV root
    "ipam/",
    "ipam/p",
    "ipam/p/",
    "ipam/p/10.0.0.1",
    "ipam/p/fd00::1",
    "ipam/.fences/net.v1/c-1/eth0",
    "ipam/.fences/a..b/c.d/%25x",  # '..' inside a segment, a quoted '%' (an ifname of '%x')
    "ipam/p/...",
    "ipam/p/.hidden",
    "ipam/p/a%2",
]


@pytest.mark.parametrize("key", UNSAFE_KEYS, ids=repr)
def test_no_request_is_built_from_a_key_a_client_would_clean(key: str) -> None:
    with pytest.raises(kv.UnsafeKey) as info:
        kv._path(key)
    # The store's own kind of error (allocator/store.py): the machine maps it without Consul.
    assert isinstance(info.value, UnsafeKey) and isinstance(info.value, StoreError)
    assert f"KV key {key!r} cannot be sent to Consul" in str(info.value)
    client = Recorder()
    store = kv.ConsulKV(client)  # type: ignore[arg-type]
    calls = [
        lambda: store.get(key),
        lambda: store.list(key),
        lambda: store.list_after(key, 5, 1.0),
        lambda: store.keys_after(key),
        lambda: store.names(key, separator="/"),
        lambda: store.create(key, b"x"),
        lambda: store.replace(key, b"x", 3),
        lambda: store.delete(key, 3),
    ]
    for call in calls:
        with pytest.raises(kv.UnsafeKey, match="cannot be sent to Consul"):
            call()
    assert client.asked == []  # refused before anything was sent


@pytest.mark.parametrize("key", SAFE_KEYS, ids=repr)
def test_keys_whose_path_stays_as_it_is_are_sent(key: str) -> None:
    client = Recorder()
    store = kv.ConsulKV(client)  # type: ignore[arg-type]
    assert store.get(key) is None
    assert client.asked == [("GET", kv._path(key))]
    assert kv._path(key).startswith("/v1/kv/")


@settings(max_examples=examples(500), deadline=None)
@given(st.lists(st.sampled_from(["", ".", "..", "a", "a.b", "%2F", "%2f", "%", "x y"]), max_size=5))
def test_a_path_that_is_sent_is_the_key_a_server_reads(segments: list[str]) -> None:
    # What a server that cleans dot segments and decodes the path once would read: the key.
    from posixpath import normpath
    from urllib.parse import unquote

    key = "/".join(segments)
    try:
        path = kv._path(key)
    except kv.UnsafeKey:
        return
    read = unquote(path.removeprefix("/v1/kv/"))
    assert read == key
    if key:
        stem = key.removesuffix("/")
        assert normpath("/" + stem) == "/" + stem  # no segment a client would remove or merge
        assert "%2f" not in read.lower()


# -- Consul's small answers, read through their schemas (consul/answers.py) ---------------------
class Answers:
    """A ConsulClient stand-in that answers each request with the next scripted answer."""

    read_timeout = 5.0

    def __init__(self, *answers: Response) -> None:
        self.answers = list(answers)

    def request(self, *args: Any, **kwargs: Any) -> Response:
        return self.answers.pop(0)


def consul_kv(*answers: Response) -> kv.ConsulKV:
    return kv.ConsulKV(Answers(*answers))  # type: ignore[arg-type]


def test_a_transaction_answer_reads_as_its_schema_says() -> None:
    ops: list[Op] = [Check("ipam/.fences/n/c/eth0", 0), Cas("ipam/p/10.0.0.1", b"v", 0)]
    applied = json.dumps({"Results": [{"KV": {"Key": "ipam/p/10.0.0.1", "ModifyIndex": 12}}]})
    assert consul_kv(Response(200, applied.encode(), {})).txn(ops) == TxnResult(
        None, {"ipam/p/10.0.0.1": 12})
    refused = {"Errors": [{"OpIndex": 1, "What": "failed to cas"}, {"OpIndex": 0, "What": ""}]}
    assert consul_kv(Response(409, json.dumps(refused).encode(), {})).txn(ops) == TxnResult(
        0, {}, False, "failed to cas")
    denied = {"Errors": [{"OpIndex": 0, "What": "Permission denied"}]}
    with pytest.raises(ConsulError, match="Permission denied") as info:
        consul_kv(Response(409, json.dumps(denied).encode(), {})).txn(ops)
    assert info.value.status == 403


@pytest.mark.parametrize(
    "body", [b"not json", b'{"Results": [{"KV": {"ModifyIndex": 3}}]}', b'{"Results": 7}'],
)
def test_an_applied_transaction_whose_answer_cannot_be_read_is_in_doubt(body: bytes) -> None:
    with pytest.raises(ConsulError) as info:
        consul_kv(Response(200, body, {})).txn([Cas("ipam/p/10.0.0.1", b"v", 0)])
    assert info.value.doubtful  # Consul applied it: never taken for a write that did not


def test_a_session_answer_and_a_key_list_read_as_their_schemas_say() -> None:
    assert consul_kv(Response(200, b'{"ID": "s-1"}', {})).create_session("n", 10) == "s-1"
    for body in (b"{}", b'{"ID": ""}', b'{"ID": 7}', b"[]"):
        with pytest.raises(ConsulError, match="without a session ID"):
            consul_kv(Response(200, body, {})).create_session("n", 10)
    names = Response(200, b'["ipam/p", "ipam/p/"]', {"X-Consul-Index": "4"})
    assert consul_kv(names).keys_after("ipam/p", 0) == (["ipam/p", "ipam/p/"], 4)
    with pytest.raises(ConsulError, match="key list"):
        consul_kv(Response(200, b'["ipam/p", 7]', {})).names("ipam/")
