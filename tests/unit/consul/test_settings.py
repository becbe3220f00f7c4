"""Each rule of consul/settings.py, the one home of the Consul connection settings, and how the
plugin (cni/config.py, cni/schemas.py) and the admin CLI (admin/settings.py) turn its errors
into their own. No Consul: the real-Consul tests of the same behaviour are in
tests/e2e/test_tls_acl.py, tests/e2e/test_admin.py and tests/e2e/test_consul_settings.py."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import pytest
import requests
from ipam_da_consul.admin import settings as admin_settings
from ipam_da_consul.admin.errors import UsageError
from ipam_da_consul.allocator.layout import Layout
from ipam_da_consul.cni import config
from ipam_da_consul.cni.errors import CNIError, Code
from ipam_da_consul.cni.schemas import IpamSchema
from ipam_da_consul.consul import ConsulSettings, SettingsError, TLSConfig, build_client
from ipam_da_consul.consul import settings as cs
from ipam_da_consul.consul.client import ConsulClient
from ipam_da_consul.consul.requests_transport import RequestsTransport
from marshmallow import ValidationError

TOKEN = "5ec2e7-70ce-4a11-b0d5-0000dead0001"


# -- server URLs ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:8500", "https://consul.example:8501", "http://[fd00::1]:8500",
     "http://h", "http://h:8500/", "http://h:8500/consul"],
)
def test_a_server_url_is_http_or_https_with_a_host(url: str) -> None:
    assert cs.check_server_url(url) == url


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("10.20.30.40:8500", "not an http(s) URL of a Consul server"),
        ("ftp://h:21", "not an http(s) URL of a Consul server"),
        ("unix:///tmp/consul.sock", "not an http(s) URL of a Consul server"),
        ("http://", "not an http(s) URL of a Consul server"),
        ("http://h:99999", "not an http(s) URL of a Consul server"),
        ("http://h:port", "not an http(s) URL of a Consul server"),
        ("", "not an http(s) URL of a Consul server"),
        ("http://h:8500/?x=1", "a Consul server URL has no spaces, query or fragment"),
        ("http://h:8500/#top", "a Consul server URL has no spaces, query or fragment"),
        ("http://h st:8500", "a Consul server URL has no spaces, query or fragment"),
        ("http://h:8500/a b", "a Consul server URL has no spaces, query or fragment"),
    ],
)
def test_a_server_url_is_refused_with_its_problem(url: str, problem: str) -> None:
    with pytest.raises(SettingsError) as info:
        cs.check_server_url(url)
    assert str(info.value) == f"{problem}: {url!r}"


def test_settings_error_is_a_value_error_not_a_consul_error() -> None:
    # The admin CLI maps ConsulError to exit 3 ("Consul said no"): a bad setting is exit 2.
    from ipam_da_consul.consul import ConsulError

    assert issubclass(SettingsError, ValueError)
    assert not issubclass(SettingsError, ConsulError)


@pytest.mark.parametrize(
    ("raw", "ssl", "url"),
    [
        ("127.0.0.1:8500", False, "http://127.0.0.1:8500"),
        ("127.0.0.1:8501", True, "https://127.0.0.1:8501"),
        ("  consul.service:8500/ ", False, "http://consul.service:8500"),
        ("http://h:8500", True, "http://h:8500"),  # a scheme given is kept
        ("https://h:8501///", False, "https://h:8501"),
    ],
)
def test_a_consul_cli_address_gets_a_scheme_and_loses_its_slash(
    raw: str, ssl: bool, url: str
) -> None:
    assert cs.server_address(raw, "--consul", ssl) == url


@pytest.mark.parametrize("raw", ["unix:///tmp/consul.sock", "ftp://h", "http://", "h:99999",
                                 "http://h:8500/?dc=x"])
def test_a_bad_consul_cli_address_names_its_source(raw: str) -> None:
    with pytest.raises(SettingsError) as info:
        cs.server_address(raw, "CONSUL_HTTP_ADDR")
    assert str(info.value) == (
        f"CONSUL_HTTP_ADDR {raw!r} is not a Consul HTTP address: give http(s)://HOST:PORT"
    )


def test_servers_come_from_the_option_then_the_environment_then_the_local_agent() -> None:
    env = {"CONSUL_HTTP_ADDR": "10.0.0.9:8500"}
    assert cs.servers_from(["http://a:1/", "b:2"], "--consul", env) == ["http://a:1", "http://b:2"]
    assert cs.servers_from(None, "--consul", env) == ["http://10.0.0.9:8500"]
    assert cs.servers_from([], "--consul", env) == ["http://10.0.0.9:8500"]
    assert cs.servers_from(None, "--consul", {}) == [cs.DEFAULT_ADDR] == ["http://127.0.0.1:8500"]
    assert cs.servers_from(None, "--consul", {"CONSUL_HTTP_ADDR": ""}) == [cs.DEFAULT_ADDR]


@pytest.mark.parametrize(("value", "https"), [("1", True), ("true", True), ("TRUE", True),
                                               ("yes", True), ("0", False), ("", False),
                                               ("false", False), ("on", False)])
def test_consul_http_ssl_makes_a_bare_address_https(value: str, https: bool) -> None:
    env = {"CONSUL_HTTP_ADDR": "h:8501", "CONSUL_HTTP_SSL": value}
    assert cs.servers_from(None, "--consul", env) == [("https" if https else "http") + "://h:8501"]
    # It only completes a bare address; an option's address keeps http.
    assert cs.servers_from(["h:1"], "--consul", env) == ["http://h:1"]


def test_a_bad_option_address_names_the_option() -> None:
    with pytest.raises(SettingsError, match=r"^--consul 'ftp://h' is not a Consul HTTP"):
        cs.servers_from(["http://ok:1", "ftp://h"], "--consul", {})


# -- ACL token -----------------------------------------------------------------------------------
@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(f"  {TOKEN}\n")  # files usually end in a newline
    return path


def test_token_order_inline_then_file_then_env_file_then_env(
    token_file: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    other.write_text("from-env-file\n")
    env = {"CONSUL_HTTP_TOKEN_FILE": str(other), "CONSUL_HTTP_TOKEN": "from-env"}
    resolve = cs.resolve_token
    assert resolve("inline", str(token_file), env, file_source="f") == "inline"
    assert resolve(None, str(token_file), env, file_source="f") == TOKEN
    assert resolve("", str(token_file), env, file_source="f") == TOKEN
    assert resolve(None, None, env, file_source="f") == "from-env-file"
    assert resolve(None, "", env, file_source="f") == "from-env-file"
    assert resolve(None, None, {"CONSUL_HTTP_TOKEN": "from-env"}, file_source="f") == "from-env"
    assert resolve(None, None, {"CONSUL_HTTP_TOKEN": ""}, file_source="f") is None
    assert resolve(None, None, {}, file_source="f") is None


def test_an_empty_token_file_is_an_error_or_the_anonymous_token(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text(" \n")
    env = {"CONSUL_HTTP_TOKEN": "from-env"}
    with pytest.raises(SettingsError) as info:
        cs.resolve_token(None, str(empty), env, file_source="--token-file")
    assert str(info.value) == f"--token-file {str(empty)!r} is empty: put the ACL token in it"
    # The plugin's rule: anonymous, and the environment's token is not tried instead.
    got = cs.resolve_token(
        None, str(empty), env, file_source="f", empty_file_is_anonymous=True
    )
    assert got is None
    env_file = {"CONSUL_HTTP_TOKEN_FILE": str(empty)}
    with pytest.raises(SettingsError, match=r"^CONSUL_HTTP_TOKEN_FILE .* is empty"):
        cs.resolve_token(None, None, env_file, file_source="--token-file")


def test_an_unreadable_token_file_names_the_setting_it_came_from(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing")
    with pytest.raises(SettingsError) as info:
        cs.resolve_token(None, missing, {}, file_source="--token-file")
    assert str(info.value) == f"cannot read --token-file {missing!r}: No such file or directory"
    with pytest.raises(SettingsError) as info:
        cs.resolve_token(None, None, {"CONSUL_HTTP_TOKEN_FILE": missing}, file_source="x")
    assert str(info.value).startswith(f"cannot read CONSUL_HTTP_TOKEN_FILE {missing!r}: ")
    with pytest.raises(SettingsError, match=r"^cannot read x .*: Is a directory"):
        cs.read_token_file(str(tmp_path), "x")


def test_a_token_file_that_is_not_text_is_refused_without_echoing_it(tmp_path: Path) -> None:
    binary = tmp_path / "binary"
    binary.write_bytes(TOKEN.encode() + b"\xff\xfe")
    with pytest.raises(SettingsError) as info:
        cs.read_token_file(str(binary), "--token-file")
    assert str(info.value) == (
        f"--token-file {str(binary)!r} is not UTF-8 text: an ACL token is a UUID or text"
    )
    assert TOKEN not in str(info.value)


def test_a_token_is_in_no_repr() -> None:
    settings = ConsulSettings(["http://a:1"], token=TOKEN)
    assert TOKEN not in repr(settings)
    assert TOKEN not in repr(admin_settings.Settings(["http://a:1"], Layout(), 1.0, token=TOKEN))


# -- TLS -----------------------------------------------------------------------------------------
def test_tls_files_as_given_else_from_the_consul_variables() -> None:
    env = {"CONSUL_CACERT": "/env/ca", "CONSUL_CLIENT_CERT": "/env/cert",
           "CONSUL_CLIENT_KEY": "/env/key"}
    assert cs.tls_config(None, None, None, {}) == TLSConfig(None, None, None)
    assert cs.tls_config(None, None, None, env) == TLSConfig("/env/ca", "/env/cert", "/env/key")
    assert cs.tls_config("/ca", "", None, env) == TLSConfig("/ca", "/env/cert", "/env/key")
    # Unchecked without check_as (the plugin's way): the files need not exist, a key may be
    # given alone.
    assert cs.tls_config(None, None, "/no/key", {}) == TLSConfig(None, None, "/no/key")


def test_tls_files_checked_now_name_the_option_or_variable(tmp_path: Path) -> None:
    names = ("--ca-file", "--cert-file", "--key-file")
    readable = tmp_path / "ca.pem"
    readable.write_text("x")
    ok = cs.tls_config(str(readable), str(readable), str(readable), {}, check_as=names)
    assert ok == TLSConfig(str(readable), str(readable), str(readable))
    missing = str(tmp_path / "no.pem")
    with pytest.raises(SettingsError) as info:
        cs.tls_config(missing, None, None, {}, check_as=names)
    assert str(info.value) == f"cannot read --ca-file {missing!r}: check the path and permissions"
    with pytest.raises(SettingsError, match=r"^cannot read CONSUL_CLIENT_KEY "):
        cs.tls_config(None, str(readable), None, {"CONSUL_CLIENT_KEY": missing}, check_as=names)
    with pytest.raises(SettingsError) as info:
        cs.tls_config(None, None, str(readable), {}, check_as=names)
    assert str(info.value) == (
        "a client key needs its certificate: add --cert-file or CONSUL_CLIENT_CERT"
    )


# -- datacenter, KV prefix -------------------------------------------------------------------------
def test_an_empty_datacenter_is_the_agents_own() -> None:
    assert cs.datacenter(None) is None
    assert cs.datacenter("") is None
    assert cs.datacenter("dc2") == "dc2"


@pytest.mark.parametrize(
    ("raw", "prefix"),
    [("ipam/", "ipam/"), ("ipam", "ipam/"), ("/ipam/", "ipam/"), ("//a/b//", "a/b/"),
     ("", ""), ("/", ""), ("custom/ipam/", "custom/ipam/"), ("a.b/..c/", "a.b/..c/")],
)
def test_kv_prefix_ends_in_one_slash_or_is_the_root(raw: str, prefix: str) -> None:
    assert cs.kv_prefix(raw) == prefix


@pytest.mark.parametrize("raw", ["a//b", "ipam/../x", "./ipam", "ipam/.", "a/./b/", ".."])
def test_kv_prefix_has_no_segment_a_client_would_clean_away(raw: str) -> None:
    # Keys under such a prefix are refused by consul/kv.py (each would reach another key).
    with pytest.raises(SettingsError) as info:
        cs.kv_prefix(raw)
    assert str(info.value) == (
        f"a KV prefix cannot have an empty, '.' or '..' segment (keys go into URLs): {raw!r}"
    )


@pytest.mark.parametrize("raw", ["a?b", "a#", "50%/", "a b/", "a\tb", "ipam/\n", "a\u00a0b"])
def test_kv_prefix_has_nothing_that_changes_a_url(raw: str) -> None:
    with pytest.raises(SettingsError) as info:
        cs.kv_prefix(raw)
    assert str(info.value) == (
        f"a KV prefix cannot hold '?', '#', '%' or whitespace (keys go into URLs): {raw!r}"
    )
    with pytest.raises(SettingsError, match=r"^--prefix cannot hold"):
        cs.kv_prefix(raw, "--prefix")


# -- time limits ---------------------------------------------------------------------------------
LIMITS = {
    "consul_connect_timeout": cs.CONNECT_TIMEOUT,
    "consul_read_timeout": cs.READ_TIMEOUT,
    "consul_unreachable_grace": cs.UNREACHABLE_GRACE,
    "consul_attempt_timeout": cs.ATTEMPT_TIMEOUT,
    "timeout": cs.CALL_TIMEOUT,
}


def test_the_time_limits_keep_their_values() -> None:
    assert [(lim.default, lim.low, lim.high) for lim in LIMITS.values()] == [
        (2.0, 0.01, 60), (5.0, 0.01, 300), (2.0, 0, 600), (2.0, 0.01, 300), (15.0, 0.1, 600)
    ]
    defaults = ConsulSettings(["http://a:1"])
    assert (defaults.connect_timeout, defaults.read_timeout, defaults.unreachable_grace,
            defaults.attempt_timeout, defaults.timeout) == (2.0, 5.0, 2.0, 2.0, 15.0)
    assert defaults.kv_prefix == "ipam/" and defaults.token is None


@pytest.mark.parametrize("name", sorted(LIMITS))
def test_the_plugin_schema_takes_its_defaults_and_bounds_from_the_limits(name: str) -> None:
    limit = LIMITS[name]
    base: dict[str, Any] = {"consul_servers": ["http://a:1"]}
    assert IpamSchema().load(base)[name] == limit.default
    assert IpamSchema().load(base | {name: limit.low})[name] == limit.low
    assert IpamSchema().load(base | {name: limit.high})[name] == limit.high
    for outside in (limit.low - 0.001, limit.high + 0.001):
        with pytest.raises(ValidationError) as info:
            IpamSchema().load(base | {name: outside})
        assert name in info.value.messages


# -- the one client builder ----------------------------------------------------------------------
def session_of(client: ConsulClient) -> requests.Session:
    """The requests session of the client's transport, where the token and TLS files go."""
    assert isinstance(client.transport, RequestsTransport)
    return client.transport.session


def test_build_client_carries_every_setting(tmp_path: Path) -> None:
    settings = ConsulSettings(
        ["http://a:1/", "http://b:2"], connect_timeout=0.5, read_timeout=7.0, timeout=9.0,
        unreachable_grace=3.0, attempt_timeout=1.5, token=TOKEN, ca_file="/ca", cert_file="/c",
        key_file="/k", datacenter="dc2", kv_prefix="x/",
    )
    client = build_client(settings)
    try:
        assert client.servers == ["http://a:1", "http://b:2"]
        assert (client.connect_timeout, client.read_timeout, client.unreachable_grace,
                client.attempt_timeout) == (0.5, 7.0, 3.0, 1.5)
        assert 8.5 < client.deadline.remaining() <= 9.0
        assert session_of(client).headers["X-Consul-Token"] == TOKEN
        assert session_of(client).verify == "/ca"
        assert session_of(client).cert == ("/c", "/k")
        assert client.datacenter == "dc2"
        assert client.current is None
    finally:
        client.close()
    client = build_client(settings, budget=1.0, known_good="http://b:2")
    try:
        assert client.deadline.remaining() <= 1.0 and client.current == "http://b:2"
    finally:
        client.close()
    # No token: no header at all (not an empty one, which Consul would take as a token).
    anonymous = build_client(ConsulSettings(["http://a:1"]))
    try:
        assert "X-Consul-Token" not in session_of(anonymous).headers
        assert session_of(anonymous).cert is None
    finally:
        anonymous.close()


def test_the_admin_cli_builds_through_the_same_builder() -> None:
    settings = admin_settings.Settings(
        ["http://a:1"], Layout("p/"), 1.5, token=TOKEN, tls=TLSConfig("/ca"), datacenter="dc3"
    )
    # One budget for the whole command: connect within min(2, budget), reads may use it all.
    assert settings.consul() == ConsulSettings(
        ["http://a:1"], connect_timeout=1.5, read_timeout=1.5, timeout=1.5, token=TOKEN,
        ca_file="/ca", datacenter="dc3", kv_prefix="p/",
    )
    assert admin_settings.Settings(["http://a:1"], Layout(), 30.0).consul().connect_timeout == 2.0
    client, kv = admin_settings.connect(settings)
    try:
        assert kv.client is client
        assert session_of(client).headers["X-Consul-Token"] == TOKEN
        assert (client.read_timeout, client.unreachable_grace, client.attempt_timeout) == (
            1.5, 2.0, 2.0)
    finally:
        client.close()


# -- the plugin and the admin CLI map SettingsError to their own errors -------------------------
def netconf(**ipam: Any) -> dict[str, Any]:
    return {
        "cniVersion": "1.0.0",
        "name": "net",
        "ipam": {"consul_servers": ["http://127.0.0.1:8500"], "pools": [{"name": "p"}], **ipam},
    }


def test_the_plugin_reports_a_bad_setting_as_invalid_config(tmp_path: Path) -> None:
    missing = str(tmp_path / "token")
    with pytest.raises(CNIError) as info:
        config.load(netconf(consul_token_file=missing), "ADD", {})
    assert info.value.code == Code.INVALID_CONFIG
    assert info.value.msg == (
        f"cannot read ipam.consul_token_file {missing!r}: No such file or directory"
    )
    with pytest.raises(CNIError) as info:
        config.load(netconf(), "ADD", {"CONSUL_HTTP_TOKEN_FILE": missing})
    assert info.value.code == Code.INVALID_CONFIG
    assert info.value.msg.startswith(f"cannot read CONSUL_HTTP_TOKEN_FILE {missing!r}")
    with pytest.raises(CNIError) as info:
        config.load(netconf(kv_prefix="a b"), "ADD", {})
    assert info.value.code == Code.INVALID_CONFIG
    assert info.value.msg == (
        "invalid network config: ipam.kv_prefix: a KV prefix cannot hold '?', '#', '%' or "
        "whitespace "
        "(keys go into URLs): 'a b'"
    )


def test_the_plugin_resolves_its_settings_by_the_shared_rules(token_file: Path) -> None:
    env = {"CONSUL_HTTP_TOKEN": "env-token", "CONSUL_CACERT": "/env/ca",
           "CONSUL_CLIENT_KEY": "/env/key"}
    conf = config.load(
        netconf(consul_token_file=str(token_file), consul_cert_file="/cert", kv_prefix="/x/y",
                consul_datacenter=""),
        "ADD", env,
    )
    assert conf.consul == ConsulSettings(
        ["http://127.0.0.1:8500"], token=TOKEN, ca_file="/env/ca", cert_file="/cert",
        key_file="/env/key", kv_prefix="x/y/",
    )
    empty = token_file.parent / "empty"
    empty.write_text("")
    conf = config.load(netconf(consul_token_file=str(empty)), "ADD", env)
    assert conf.consul.token is None  # an empty file is the anonymous token, as ever


def args(**given: Any) -> argparse.Namespace:
    return argparse.Namespace(**given)


def test_the_admin_cli_reports_a_bad_setting_as_a_usage_error(tmp_path: Path) -> None:
    cases: list[tuple[dict[str, Any], dict[str, str], str]] = [
        ({"consul": ["unix:///s"]}, {}, "--consul 'unix:///s' is not a Consul HTTP address"),
        ({}, {"CONSUL_HTTP_ADDR": "h:0x"}, "CONSUL_HTTP_ADDR 'h:0x' is not a Consul HTTP"),
        ({"token_file": str(tmp_path / "no")}, {}, "cannot read --token-file"),
        ({"ca_file": str(tmp_path / "no")}, {}, "cannot read --ca-file"),
        ({"prefix": "a?"}, {}, "--prefix cannot hold '?'"),
    ]
    for given, env, message in cases:
        with pytest.raises(UsageError) as info:
            admin_settings.resolve(args(**given), env)
        assert info.value.message.startswith(message), info.value.message
        assert info.value.status == 2


def test_the_admin_cli_resolves_its_settings_by_the_shared_rules(token_file: Path) -> None:
    env = {"CONSUL_HTTP_ADDR": "h:8501", "CONSUL_HTTP_SSL": "true",
           "CONSUL_HTTP_TOKEN_FILE": str(token_file), "CONSUL_CACERT": str(token_file)}
    got = admin_settings.resolve(args(prefix="pools", datacenter=""), env)
    assert got == admin_settings.Settings(
        ["https://h:8501"], Layout("pools/"), admin_settings.DEFAULT_TIMEOUT, token=TOKEN,
        tls=TLSConfig(str(token_file)), datacenter=None,
    )
    assert admin_settings.resolve(args(), {}) == admin_settings.Settings(
        ["http://127.0.0.1:8500"], Layout("ipam/"), 10.0
    )
    # The first bad setting wins, in the order servers, TLS, prefix, token.
    with pytest.raises(UsageError, match=r"^--consul"):
        admin_settings.resolve(args(consul=["ftp://x"], ca_file="/no", prefix="a b"), {})
    with pytest.raises(UsageError, match=r"^cannot read --ca-file"):
        admin_settings.resolve(args(ca_file="/no", prefix="a b", token_file="/no"), {})


def test_no_setting_reads_the_process_environment_behind_the_callers_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "from-process-env")
    monkeypatch.setenv("CONSUL_HTTP_ADDR", "elsewhere:1")
    assert cs.resolve_token(None, None, {}, file_source="f") is None
    assert cs.servers_from(None, "--consul", {}) == [cs.DEFAULT_ADDR]
    conf = config.load(netconf(), "ADD", {})
    assert conf.consul.token is None
    assert os.environ["CONSUL_HTTP_TOKEN"] == "from-process-env"
