"""Unknown keys in the ipam section (cni/spelling.py, applied by cni/config.py load): a near miss
of a setting fails ADD, CHECK and STATUS (7) and is a warning for DEL and GC; other unknown keys
are warnings standalone and debug lines behind ipam-delegated; a missing required key is named
with its near miss. Through the installed plugin: tests/e2e/test_errors.py."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from ipam_da_consul.cni import config, spelling
from ipam_da_consul.cni.errors import CNIError, Code
from ipam_da_consul.cni.schemas import IpamSchema
from loguru import logger

SETTINGS = frozenset(IpamSchema().fields)
ENV = {"CNI_CONTAINERID": "ctr", "CNI_IFNAME": "eth0"}


def standalone(**extra: Any) -> dict[str, Any]:
    ipam = {
        "type": "ipam-da-consul",
        "consul_servers": ["http://127.0.0.1:8500"],
        "pools": [{"name": "blue"}],
        **extra,
    }
    return {"cniVersion": "1.0.0", "name": "net", "ipam": ipam}


def delegated(**extra: Any) -> dict[str, Any]:
    c = standalone(**extra)
    del c["ipam"]["pools"]
    c["ipam"].update(type="ipam-delegated", delegates=["ipam-dx-another", "ipam-da-consul"])
    c["prevResult"] = {"cniVersion": "1.0.0", "ips": [], "pools": [{"name": "blue"}]}
    return c


@pytest.fixture
def logged() -> Iterator[list[tuple[str, str]]]:
    lines: list[tuple[str, str]] = []
    sink = logger.add(lambda m: lines.append((m.record["level"].name, m.record["message"])),
                      level="DEBUG")
    yield lines
    logger.remove(sink)


@pytest.mark.parametrize(
    ("typo", "meant"),
    [
        ("timout", "timeout"),
        ("reuse_afer", "reuse_after"),
        ("consul_token_flie", "consul_token_file"),
        ("kv-prefix", "kv_prefix"),
        ("Timeout", "timeout"),
        ("reuseAfter", "reuse_after"),
        ("token", "consul_token"),  # a setting without its consul_
        ("datacenter", "consul_datacenter"),
        ("min-free", "min_free"),
        ("picks", "pick"),
    ],
)
def test_a_near_miss_is_taken_for_the_setting(typo: str, meant: str) -> None:
    [u] = spelling.unknown_keys({typo: 1}, SETTINGS)
    assert (u.closest, u.near) == (meant, True)


@pytest.mark.parametrize(
    "key", ["ranges", "routes", "dataDir", "subnet", "gateway", "resolvConf", "name", "ipMasq"]
)
def test_the_conventions_keys_are_no_near_miss(key: str) -> None:
    """host-local's and the spec's keys may sit in a shared section: never refused."""
    [u] = spelling.unknown_keys({key: 1}, SETTINGS)
    assert not u.near, u


def test_every_setting_and_the_cni_keys_are_known() -> None:
    assert spelling.unknown_keys({k: 1 for k in [*SETTINGS, "type", "delegates"]}, SETTINGS) == []


@pytest.mark.parametrize("command", ["ADD", "CHECK", "STATUS"])
def test_a_near_miss_fails_the_commands_that_would_run_with_it_off(command: str) -> None:
    with pytest.raises(CNIError) as caught:
        config.load(standalone(timout=5, reuse_afer=60), command, ENV)
    err = caught.value
    assert err.code == Code.INVALID_CONFIG
    assert "`timout` (did you mean `timeout`?)" in err.msg, err.msg
    assert "`reuse_afer` (did you mean `reuse_after`?)" in err.msg, err.msg
    assert f"so {command} is refused" in err.msg


@pytest.mark.parametrize("command", ["DEL", "GC"])
def test_a_near_miss_is_a_warning_where_refusing_would_leak(
    command: str, logged: list[tuple[str, str]]
) -> None:
    c = standalone(consul_token_flie="/etc/cni/token")
    c["cni.dev/valid-attachments"] = []
    conf = config.load(c, command, ENV)
    assert conf.consul.token is None  # the default, as the warning says
    assert (
        "WARNING",
        "ipam key `consul_token_flie` is not a setting of ipam-da-consul and is ignored; "
        "did you mean `consul_token_file`?",
    ) in logged


def test_standalone_every_unknown_key_is_a_warning(logged: list[tuple[str, str]]) -> None:
    config.load(standalone(dataDir="/var/lib/cni"), "ADD", ENV)
    assert (
        "WARNING", "ipam key `dataDir` is not a setting of ipam-da-consul and is ignored"
    ) in logged


def test_behind_ipam_delegated_a_siblings_key_is_only_a_debug_line(
    logged: list[tuple[str, str]],
) -> None:
    config.load(delegated(another_setting="x"), "ADD", ENV)
    assert [level for level, m in logged if "another_setting" in m] == ["DEBUG"]
    # A near miss is ours wherever it is.
    with pytest.raises(CNIError, match="did you mean `timeout`"):
        config.load(delegated(timout=3), "ADD", ENV)


def test_a_missing_required_key_is_named_with_its_near_miss() -> None:
    c = standalone()
    c["ipam"]["consul_server"] = c["ipam"].pop("consul_servers")
    with pytest.raises(CNIError) as add:
        config.load(c, "ADD", ENV)
    assert "`consul_server` (did you mean `consul_servers`?)" in add.value.msg
    with pytest.raises(CNIError) as delete:
        config.load(c, "DEL", ENV)
    assert delete.value.msg == (
        "invalid network config: ipam.consul_servers: Missing data for required field. "
        "(the ipam section has `consul_server`: did you mean `consul_servers`?)"
    )


def test_an_odd_key_is_shown_quoted_and_cut() -> None:
    [u] = spelling.unknown_keys({"x\n" * 100: 1}, SETTINGS)
    assert u.describe().startswith("`'x\\nx\\n") and u.describe().endswith("…`")
    assert len(u.describe()) < 100
