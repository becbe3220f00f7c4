"""Entry points: read stdin and the environment, run the machine, print JSON, exit."""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    sys.exit(run(verbose=False))


def main_verbose() -> None:
    sys.exit(run(verbose=True))


def run(verbose: bool) -> int:
    try:
        from . import logs
        from .machine import Invocation

        logs.configure(verbose)
        stdin = sys.stdin.buffer.read() if sys.stdin is not None else b""
        call = Invocation(stdin, os.environ)
        code = call.run()
        if call.output is not None:
            sys.stdout.write(json.dumps(call.output) + "\n")
        return code
    except Exception as exc:  # last resort: stdout still gets CNI JSON, never a traceback
        sys.stderr.write(f"ipam-da-consul: internal error: {type(exc).__name__}: {exc}\n")
        sys.stdout.write(
            json.dumps(
                {
                    "cniVersion": "1.0.0",
                    "code": 100,
                    "msg": f"internal error: {type(exc).__name__}: {exc}",
                }
            )
            + "\n"
        )
        return 100
