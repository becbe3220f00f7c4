"""Entry points: read stdin and the environment, run the call, print JSON, exit.

Heavy modules (requests, marshmallow, transitions, loguru) are imported only when the call is
done in this process; a running helper (`ipam-da-consul-helper`) spares the import entirely.
"""

from __future__ import annotations

import os
import sys
import time

# Not typing.TYPE_CHECKING: importing typing costs ~10 ms, too much for the helper's fast path.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from .stores import Caches


def main() -> None:
    sys.exit(run(verbose=False))


def main_verbose() -> None:
    sys.exit(run(verbose=True))


def run(verbose: bool) -> int:
    # The call's deadline counts from here, whoever runs it (see cni/helper/client.py).
    started = time.monotonic()
    try:
        from .hardening import no_core_dumps

        no_core_dumps()  # before stdin, which may hold the ACL token, is read
        stdin = sys.stdin.buffer.read() if sys.stdin is not None else b""
        from .helper.client import via_helper

        answer = via_helper(stdin, verbose, started)
        if answer is not None:
            out, err, code = answer
            sys.stderr.write(err)
            sys.stdout.write(out)
            return code
        import gc

        from . import logs
        from .hardening import not_dumpable

        not_dumpable()  # this path imports far more than ctypes costs

        # This process lives for one call. Reading a large pool makes hundreds of thousands of
        # objects, none of them in cycles, and the cyclic collector would walk them again and
        # again as they pile up (~15% of an ADD in a 60,000-key pool). The helper, which lives
        # on, keeps its collector.
        gc.disable()
        logs.configure(verbose)
        out, code = execute(stdin, os.environ, started=started)
        sys.stdout.write(out)
        return code
    except Exception as exc:  # last resort: stdout still gets CNI JSON, never a traceback
        return _internal_error(exc)


def execute(
    stdin: bytes,
    environ: Mapping[str, str],
    caches: Caches | None = None,
    started: float | None = None,
    abandoned: Callable[[], bool] | None = None,
) -> tuple[str, int]:
    """Run one call; returns what goes to stdout and the exit code. `started` is the caller's
    `time.monotonic()` at its start: the call ends by `started` + `ipam.timeout`, rollback
    included. `abandoned` says the caller hung up: the call then stops before any write."""
    import json

    from .machine import Invocation

    call = Invocation(stdin, environ, caches, started=started, abandoned=abandoned)
    code = call.run()
    out = json.dumps(call.output) + "\n" if call.output is not None else ""
    return out, code


def _internal_error(exc: Exception) -> int:
    import json

    msg = f"internal error: {type(exc).__name__}: {exc}"
    sys.stderr.write(f"ipam-da-consul: {msg}\n")
    sys.stdout.write(json.dumps({"cniVersion": "1.0.0", "code": 100, "msg": msg}) + "\n")
    return 100
