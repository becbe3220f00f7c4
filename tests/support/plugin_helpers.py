"""Small helpers shared by the behaviour tests (test_add, test_del, test_check, test_errors...)."""

from __future__ import annotations

import json
from typing import Any

from tests.support.agent import ConsulAgent, free_ports
from tests.support.plugin import Outcome

VERSIONS = ["0.4.0", "1.0.0"]
# Keep failures against dead or leaderless servers quick.
FAST = {"consul_connect_timeout": 0.3, "consul_read_timeout": 0.5, "timeout": 1.0}


def standalone_conf(
    servers: list[str], pools: list[str], version: str = "1.0.0", **ipam: Any
) -> dict[str, Any]:
    """A network config with ipam-da-consul directly as bridge's `ipam`, pools in the section.
    Strict lowest-first picking unless a test says otherwise (`pick=None`: the default)."""
    ipam.setdefault("pick", "lowest")
    if ipam["pick"] is None:
        del ipam["pick"]
    return {
        "cniVersion": version,
        "name": "n",
        "type": "bridge",
        "ipam": {
            "type": "ipam-da-consul",
            "consul_servers": servers,
            "pools": [{"name": p} for p in pools],
            **ipam,
        },
    }


def dead_url() -> str:
    """A loopback URL nothing listens on (connection refused)."""
    return f"http://127.0.0.1:{free_ports(1)[0]}"


def assert_cni_error(out: Outcome, code: int, version: str, *needles: str) -> dict[str, Any]:
    """A CNI error: exit status = code, one JSON object on stdout, a readable message."""
    assert out.rc == code, out
    assert "Traceback" not in out.stdout and "Traceback" not in out.stderr, out
    err = json.loads(out.stdout)
    assert set(err) <= {"cniVersion", "code", "msg", "details"}, err
    assert err["code"] == code and err["cniVersion"] == version, err
    assert isinstance(err["msg"], str) and err["msg"], err
    for needle in needles:
        assert needle in err["msg"], (needle, err)
    return err


def put_alloc(consul: ConsulAgent, pool: str, ip: str, target: str) -> None:
    """An allocation written by someone else, as upstream writes it."""
    consul.put(f"ipam/{pool}/{ip}", {"target": target})


def alloc(consul: ConsulAgent, pool: str, ip: str) -> dict[str, Any] | None:
    return consul.get_json(f"ipam/{pool}/{ip}")
