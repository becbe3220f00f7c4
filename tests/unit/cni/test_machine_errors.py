"""Every failure ends in the `failed` state with one CNI error on stdout: the mapping from the
allocator's and the Consul client's exceptions to CNI codes (cni/machine.py), and the parse
errors before any store is opened. On a real Consul: tests/test_errors.py."""

from __future__ import annotations

from typing import Any

import pytest
from ipam_da_consul.consul import ConsulError, ConsulUnavailable

from tests.support.machine import Faulty, Mem, netconf

KEY10 = "ipam/p/10.0.0.10"


def err(code: int, msg: str, version: str = "1.1.0", details: str = "") -> dict[str, Any]:
    return {"cniVersion": version, "code": code, "msg": msg, "details": details}


def test_a_bad_environment_is_4_and_echoes_the_stdin_version() -> None:
    m = Mem()
    run = m.call("ADD", netconf(version="0.4.0"), container="-bad")
    assert run.code == 4
    assert run.walk == ["start", "failed"]
    assert run.output is not None and run.output["cniVersion"] == "0.4.0"
    assert run.output["msg"].startswith("CNI_CONTAINERID '-bad' is not valid")
    unknown = m.call("NOPE")
    assert unknown.output == err(4, "CNI_COMMAND is 'NOPE': expected one of ADD, DEL, CHECK, "
                                 "VERSION, GC, STATUS")
    assert m.stores == []


@pytest.mark.parametrize(
    ("stdin", "code"),
    [(b"{not json", 6), (b"[1]", 7), (b'{"cniVersion": "9.9.9", "ipam": {}}', 1),
     (b'{"cniVersion": "1.1.0", "ipam": {"consul_servers": []}}', 7)],
)
def test_a_bad_config_fails_from_start_without_a_store(stdin: bytes, code: int) -> None:
    m = Mem()
    run = m.call("ADD", stdin=stdin)
    assert run.code == code
    assert run.walk == ["start", "failed"]
    assert run.output is not None and run.output["code"] == code
    assert m.stores == []


def test_an_unknown_cni_args_key_is_4() -> None:
    run = Mem().call("ADD", env={"CNI_ARGS": "FOO=1"})
    assert run.output == err(4, "CNI_ARGS has unknown key(s) FOO; set IgnoreUnknown=1 to allow "
                                "them")


@pytest.mark.parametrize(
    ("method", "error", "code"),
    [("get", ConsulError("500 from the leader", status=500), 111),
     ("get", ConsulUnavailable("no Consul server answered"), 11),
     ("list", ConsulError("403 permission denied", status=403), 111)],
)
def test_consul_errors_while_reading_a_pool(method: str, error: Exception, code: int) -> None:
    m = Mem()
    m.pool()
    m.wrap = lambda kv: Faulty(kv, method, error)
    run = m.call("ADD")
    assert run.output == err(code, str(error))
    assert run.walk == ["start", "parsed", "connected", "failed"]
    assert m.keys() == ["ipam/p"]


def test_broken_ranges_or_allocations_are_117() -> None:
    m = Mem()
    m.kv.put("ipam/p", b'{"subnet": "10.0.0.0/24"}')
    run = m.call("ADD")
    assert run.output == err(117, "KV key 'ipam/p' does not hold valid IP Ranges: expected a "
                                  "non-empty JSON array of IP Range objects")
    m.pool()
    m.kv.put("ipam/p/not-an-ip", b'{"target": "x"}')
    bad_key = m.call("ADD")
    assert bad_key.output == err(117, "KV key 'ipam/p/not-an-ip' in the pool folder is not named "
                                      "after a plain IP address")


def test_a_bug_is_100_with_a_pointer_to_the_verbose_log() -> None:
    m = Mem()
    m.pool()
    m.wrap = lambda kv: Faulty(kv, "list", KeyError("boom"))
    run = m.call("ADD")
    assert run.output == err(100, "internal error: KeyError: 'boom'", details=(
        "this is a bug in ipam-da-consul; the verbose log has the traceback"))
    assert run.logged("internal error")
    assert run.logged("ADD failed (code 100)")


def test_every_call_closes_its_store_whatever_happened() -> None:
    m = Mem()
    m.pool()
    m.wrap = lambda kv: Faulty(kv, "list", KeyError("boom"))
    m.call("ADD")
    m.wrap = lambda kv: kv
    m.call("ADD")
    m.call("DEL")
    assert [s.closed for s in m.stores] == [True, True, True]
