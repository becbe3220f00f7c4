"""The unit tier runs in the test process: no Consul agent, no container runtime, no plugin or
helper process. The Consul fixtures live in tests/e2e/conftest.py, out of this tier's sight; the
guard below also fails a test here that starts one of those processes by other means."""

from __future__ import annotations

import os
import subprocess
from typing import Any

import pytest

# Process names that belong to the e2e tier: a Consul agent, a container runtime, the plugin, its
# helper and the operator CLI (all run as a runtime or an operator runs them).
E2E_PROGRAMS = ("consul", "podman", "ip", "ipam-da-consul")


def e2e_program(args: Any) -> str | None:
    argv0 = args if isinstance(args, str | bytes | os.PathLike) else next(iter(args), "")
    name = os.path.basename(os.fsdecode(argv0)).split()[0] if argv0 else ""
    if name in E2E_PROGRAMS or name.startswith("ipam-da-consul"):
        return name
    return None


class UnitPopen(subprocess.Popen[bytes]):
    def __init__(self, args: Any, *rest: Any, **kwargs: Any) -> None:
        name = e2e_program(args)
        if name:
            raise AssertionError(f"the unit tier starts no {name!r}: move this test to tests/e2e")
        super().__init__(args, *rest, **kwargs)


@pytest.fixture(autouse=True)
def _no_e2e_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(subprocess, "Popen", UnitPopen)
