"""Hostile input, fuzzed with hypothesis, against the installed plugin and a real Consul.

Every input yields either a valid result or a CNI error JSON object (int code, str msg) with a
non-zero exit; never a traceback on stdout, never an internal error, and a rejected input
writes nothing to KV (Consul's KV index does not move). Each example runs a real process
(~0.3 s), so example counts are modest and the runs are derandomized: CI sees the same inputs
every time."""

from __future__ import annotations

import copy
import ipaddress
import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.agent import ConsulAgent, module_consul
from tests.support.plugin import Outcome, netconf, run_plugin

RANGES = [{"subnet": "10.9.0.0/24", "rangeStart": "10.9.0.10", "rangeEnd": "10.9.0.40",
           "gateway": "10.9.0.1"}]
POOL_NET = ipaddress.ip_network("10.9.0.0/24")
# A conventional static IP (CNI_ARGS IP=...) is matched to the pools while they are served, so
# "none of the pools could serve it" is known only after the others were written: that one
# error is rolled back (KV as before) rather than refused before any write (KV index still).
SERVED_THEN_FAILED = {124}
COMMANDS = ["ADD", "DEL", "CHECK", "VERSION", "GC", "STATUS"]
FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Text the OS can carry in an environment variable: no NUL, no lone surrogates.
env_text = st.text(
    st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), max_size=40
)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)


consul = module_consul("fuzz")


class Fuzzed:
    """The dev agent, a pool of our own, and a valid config to start from."""

    def __init__(self, consul: ConsulAgent) -> None:
        self.consul = consul
        self.pool = consul.create_pool(f"fuzz-{id(self)}", RANGES)
        self.codes: Counter[int] = Counter()
        self.valid = netconf([consul.url], [{"name": self.pool}], timeout=3,
                             consul_connect_timeout=1, consul_read_timeout=1,
                             host="fuzz-host")

    def run(self, command: str | None, stdin: bytes, env: dict[str, str | None]) -> Outcome:
        """Run once and check the outcome; undo a successful ADD so the pool never fills."""
        index, before = self.consul.kv_index(), self.consul.tree("")
        base = {"CNI_COMMAND": command, "CNI_CONTAINERID": "fuzz-c", "CNI_IFNAME": "eth0"}
        base.update(env)
        # run_plugin sets container/ifname itself; None there means "leave unset".
        out = run_plugin(
            base.pop("CNI_COMMAND") or "",
            stdin,
            container=base.pop("CNI_CONTAINERID"),
            ifname=base.pop("CNI_IFNAME"),
            env={k: v for k, v in base.items() if v is not None},
            timeout=30,
        )
        self.codes[out.rc] += 1
        assert "Traceback" not in out.stdout, out
        assert "Traceback" not in out.stderr, out
        if out.rc == 0:
            self.check_success(out, env.get("CNI_COMMAND", command), stdin)
        else:
            code = self.check_error(out)
            # Nothing is left behind, whatever the error.
            assert self.consul.tree("") == before, f"a failed call changed KV: {out!r}"
            if code not in SERVED_THEN_FAILED:
                assert self.consul.kv_index() == index, f"a rejected input wrote to KV: {out!r}"
        return out

    def check_error(self, out: Outcome) -> int:
        lines = out.stdout.splitlines()
        assert len(lines) == 1, out
        err = json.loads(lines[0])
        assert isinstance(err, dict), out
        assert type(err.get("code")) is int and isinstance(err.get("msg"), str), out
        assert err["msg"], out
        assert err["code"] != 100, f"internal error (a bug): {out!r}"
        assert out.rc == err["code"], out
        return int(err["code"])

    def check_success(self, out: Outcome, command: str | None, stdin: bytes) -> None:
        if command in ("DEL", "CHECK", "GC", "STATUS"):
            assert out.stdout == "", out
            return
        data = json.loads(out.stdout)
        assert isinstance(data, dict) and isinstance(data.get("cniVersion"), str), out
        if command == "VERSION":
            assert isinstance(data["supportedVersions"], list), out
            return
        assert command == "ADD", out
        try:
            sent = json.loads(stdin)
            assert data["cniVersion"] == sent["cniVersion"], out
        except ValueError:
            pytest.fail(f"ADD succeeded on stdin that is not JSON: {out!r}")
        assert isinstance(data["ips"], list) and data["ips"], out
        for ip in data["ips"]:
            assert ipaddress.ip_interface(ip["address"]).ip in POOL_NET, out
        self.release_all()

    def release_all(self) -> None:
        folder = f"ipam/{self.pool}/"
        for key in self.consul.tree(folder):
            if key != folder:
                self.consul._req("DELETE", key).raise_for_status()


@pytest.fixture(scope="module")
def fuzzed(consul: ConsulAgent) -> Iterator[Fuzzed]:
    f = Fuzzed(consul)
    yield f
    print(f"\n[fuzz] exit codes over all examples: {dict(sorted(f.codes.items()))}")
    assert f.consul.allocations(f.pool) == {}


def dump(value: Any) -> bytes:
    return json.dumps(value).encode()


# -- stdin -------------------------------------------------------------------------------------


@settings(FUZZ, max_examples=30)  # almost all end at the JSON decoder
@given(command=st.sampled_from(COMMANDS), stdin=st.binary(max_size=400))
def test_arbitrary_bytes(fuzzed: Fuzzed, command: str, stdin: bytes):
    fuzzed.run(command, stdin, {})


@settings(FUZZ, max_examples=40)
@given(command=st.sampled_from(COMMANDS), value=json_values)
def test_arbitrary_json(fuzzed: Fuzzed, command: str, value: Any):
    fuzzed.run(command, dump(value), {})


def paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every place in a JSON value: dict keys and list indices, the root excluded."""
    out = []
    items = value.items() if isinstance(value, dict) else enumerate(value) \
        if isinstance(value, list) else []
    for key, sub in items:
        out.append((*prefix, key))
        out.extend(paths(sub, (*prefix, key)))
    return out


def same_type(old: Any) -> st.SearchStrategy[Any]:
    if isinstance(old, bool):
        return st.booleans()
    if isinstance(old, int | float):
        # NaN and infinities too: Python's json reads them, and they must not reach a timeout.
        return st.floats() | st.integers(-(2**40), 2**40) | st.sampled_from([0, -1, 1e-9, 1e9])
    if isinstance(old, str):
        return st.text(max_size=30) | st.sampled_from(
            [old.upper(), old + "/x", " " + old, old[:-1], "http://127.0.0.1:1", "10.9.0.20"]
        )
    if isinstance(old, list):
        return st.just(old[:-1]) | st.just(old * 2) | st.just([])
    if isinstance(old, dict):
        return st.just({}) | st.just({**old, "extra": 1})
    return json_values


@st.composite
def mutated_configs(draw: st.DrawFn, valid: dict) -> dict:
    conf = copy.deepcopy(valid)
    for _ in range(draw(st.integers(1, 3))):
        places = paths(conf)
        if not places:
            break
        path = draw(st.sampled_from(places))
        parent = conf
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["delete", "replace", "same-type", "same-type", "retype"]))
        old = parent[path[-1]]
        if action == "delete":
            del parent[path[-1]]
        elif action == "replace":
            parent[path[-1]] = draw(json_values)
        elif action == "same-type":  # plausible but odd: most of these pass the schema
            parent[path[-1]] = draw(same_type(old))
        else:  # the same value as another JSON type: "1.0" for 1.0, ["x"] for "x"...
            parent[path[-1]] = draw(st.sampled_from([str(old), [old], {"v": old}, None, 0]))
    return conf


@settings(FUZZ, max_examples=70)
@given(data=st.data(), command=st.sampled_from(["ADD", "DEL", "CHECK", "STATUS"]))
def test_mutated_valid_config(fuzzed: Fuzzed, data: st.DataObject, command: str):
    conf = data.draw(mutated_configs(fuzzed.valid))
    fuzzed.run(command, dump(conf), {})


# -- environment -------------------------------------------------------------------------------


def mostly(valid: list[Any]) -> st.SearchStrategy[Any]:
    """Valid values two times in three, so the other variables' checks get reached too."""
    return st.one_of(st.sampled_from(valid), st.sampled_from(valid), env_text | st.none())


@FUZZ
@given(
    command=mostly(["ADD", "DEL", "CHECK", "VERSION", "STATUS", "add", ""]),
    container=mostly(["fuzz-c", "F.u_z-z9", "a" * 200, "-lead", "has space", "x/y"]),
    ifname=mostly(["eth0", "net1", "eth0.100", "a" * 15, "a" * 16, "..", "e:1"]),
    args=mostly(["", "IgnoreUnknown=1;K8S_POD_NAME=x", "IP=10.9.0.33", "IP=not-an-ip",
                 "K8S_POD_NAME=x", "IP=10.9.0.34,10.9.0.35", "IP=192.0.2.1", "=x;;"]),
)
def test_environment(fuzzed: Fuzzed, command: str | None, container: str | None,
                     ifname: str | None, args: str | None):
    env = {"CNI_CONTAINERID": container, "CNI_IFNAME": ifname, "CNI_ARGS": args}
    fuzzed.run(command, dump(fuzzed.valid), env)
