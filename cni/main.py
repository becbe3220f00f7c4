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

    from .events import Observer
    from .machine import Invocation
    from .state import StateDir
    from .stores import Caches


def main() -> None:
    sys.exit(run(verbose=False))


def main_verbose() -> None:
    sys.exit(run(verbose=True))


def process_started() -> float:
    """When this process started, on the monotonic clock: `ipam.timeout` caps the call as the
    runtime sees it, the interpreter's own start-up included. /proc's start time is in clock
    ticks since boot (CLOCK_BOOTTIME, as Linux counts it since 5.3)."""
    now = time.monotonic()
    try:
        with open("/proc/self/stat", "rb") as fh:
            ticks = int(fh.read().rsplit(b")", 1)[1].split()[19])
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return now
    return now - min(max(age, 0.0), 5.0)  # a bound, should /proc disagree with the clocks


def run(verbose: bool) -> int:
    # The call's deadline counts from the process's start, whoever runs it (see
    # cni/helper/client.py).
    started = process_started()
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
        state = open_state(os.environ)
        call = invocation(stdin, os.environ, started=started, state=state)
        code = call.run()
        sys.stdout.write(output(call))
        if code == 0 and state is not None and call.call_end is not None and state.pending():
            finish_others(state, started, call.call_end)
        return code
    except Exception as exc:  # last resort: stdout still gets CNI JSON, never a traceback
        return _internal_error(exc)


def execute(
    stdin: bytes,
    environ: Mapping[str, str],
    caches: Caches | None = None,
    started: float | None = None,
    abandoned: Callable[[], bool] | None = None,
    state: StateDir | None = None,
    observer: Observer | None = None,
) -> tuple[str, int]:
    """Run one call; returns what goes to stdout and the exit code. `started` is the caller's
    `time.monotonic()` at its start: the call ends by `started` + `ipam.timeout`, rollback
    included. `abandoned` says the caller hung up: the call then stops before any write.
    `observer` is told what the call did once it has ended (cni/events.py CallRecord)."""
    call = invocation(stdin, environ, caches, started, abandoned, state, observer)
    code = call.run()
    return output(call), code


def invocation(
    stdin: bytes,
    environ: Mapping[str, str],
    caches: Caches | None = None,
    started: float | None = None,
    abandoned: Callable[[], bool] | None = None,
    state: StateDir | None = None,
    observer: Observer | None = None,
) -> Invocation:
    """One call, over Consul's store, ready to run."""
    from .compose import consul_store
    from .machine import Invocation

    return Invocation(
        stdin,
        environ,
        caches,
        started=started,
        abandoned=abandoned,
        store_factory=consul_store,
        state=state,
        observer=observer,
    )


def output(call: Invocation) -> str:
    """What a call that has run prints on stdout."""
    import json

    return json.dumps(call.output) + "\n" if call.output is not None else ""


def open_state(environ: Mapping[str, str]) -> StateDir | None:
    """The host's state folder for an in-process call; None (with a warning) when unusable."""
    from loguru import logger

    from .state import StateError, state_dir_path
    from .state import open_state as open_folder

    try:
        return open_folder(state_dir_path(environ))
    except StateError as exc:
        logger.warning("{}; this call keeps its writes in memory only", exc)
        return None


def finish_others(state: StateDir, started: float, call_end: float) -> None:
    """This call reached Consul: finish what other attachments' entries still owe, without
    waiting for their own next call (a host may run no helper). A second at most, and only
    entries nobody holds; all of it within the call's own end (`call_end`, monotonic), as the
    runtime waits for the process to exit, not only for its answer."""
    from . import replay
    from .compose import consul_store

    try:
        until = min(time.monotonic() + 1.0, started + 30.0, call_end)
        replay.some(state, consul_store, None, limit=4, until=until)
    except Exception as exc:  # housekeeping: never the call's outcome
        from loguru import logger

        logger.warning("could not finish other attachments' pending work: {}", exc)


def _internal_error(exc: Exception) -> int:
    import json

    msg = f"internal error: {type(exc).__name__}: {exc}"
    sys.stderr.write(f"ipam-da-consul: {msg}\n")
    sys.stdout.write(json.dumps({"cniVersion": "1.0.0", "code": 100, "msg": msg}) + "\n")
    return 100
