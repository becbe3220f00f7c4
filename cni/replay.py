"""Finishing what an attachment's state entry still owes (cni/state.py): a DEL the helper took
over while Consul was away, or writes left in doubt by a call that could not undo them.

The helper's replay thread runs this as soon as Consul answers again, and so does the plugin
in-process after a call that reached Consul (a host without the helper is never left waiting
for a call of the same attachment). Each entry is worked on under its lock, so never beside a
call of its attachment; what cannot be done now stays for the next pass. The store is the
caller's to give (cni/compose.py consul_store), as it is for any call.
"""

from __future__ import annotations

import os
import time

from loguru import logger

from .commands.base import Inputs
from .commands.delete import REPLAY_MARK, Del
from .config import load
from .env import read_env
from .errors import INPUT_CODES, CNIError
from .events import CallRecord, Observer
from .machine import Invocation
from .state import Entry, StateDir
from .stdin import decode
from .stores import Caches, StoreFactory


def finish(
    entry: Entry,
    state: StateDir,
    store_factory: StoreFactory,
    caches: Caches | None = None,
    until: float | None = None,
    observer: Observer | None = None,
) -> int:
    """Do what the entry owes; the exit code of the attempt (0: nothing is left). `until`
    (monotonic): when the process doing it must be done, whatever the entry's own settings
    give it (an in-process call's remaining time); None: they decide. `observer` hears what
    each attempt did (the helper's metrics)."""
    if entry.deleting is not None:
        deleting = entry.deleting
        call = Invocation(
            deleting.stdin,
            {**deleting.env, REPLAY_MARK: "1"},
            caches,
            store_factory=store_factory,
            state=state,
            entry=entry,
            until=until,
            observer=observer,
        )
        code = call.run()
        if code in INPUT_CODES:
            # It can never succeed, and the runtime was told it did: nothing to redo, but the
            # operator must hear of the addresses it leaves.
            logger.error(
                "a DEL of {} taken over by the helper can never be finished (code {}: {}); its "
                "addresses stay allocated until released by hand",
                "/".join(entry.attachment),
                code,
                call.error.msg if call.error else "",
            )
            entry.deleting = None
            entry.write()
        return code
    if entry.has_work:
        return void(entry, state, store_factory, until, observer)
    return 0


def void(
    entry: Entry,
    state: StateDir,
    store_factory: StoreFactory,
    until: float | None = None,
    observer: Observer | None = None,
) -> int:
    """Void the entry's claims in doubt (allocator.void): with the settings of the call that
    left them, through the same store and allocator a DEL of the attachment would use."""
    context = entry.context
    if context is None:
        logger.error("state entry of {} has writes in doubt but no settings to reach Consul",
                     "/".join(entry.attachment))
        return 7
    try:
        env = read_env({**context.env, "CNI_COMMAND": "DEL"})
        conf = load(decode(context.stdin), "DEL", context.env, env.args)
        call_id = os.urandom(6).hex()
        record = CallRecord(call_id, "DEL")
        inputs = Inputs(
            context.stdin, context.env, None, time.monotonic(), None, call_id,
            store_factory, state, None, entry, until, on_request=record.request,
        )
        session = Del.open(inputs, env, conf, conf.cni_version)
    except CNIError as exc:
        logger.error("cannot void the writes in doubt of {}: {}", "/".join(entry.attachment), exc)
        return 7
    allocator = session.allocator
    try:
        session.store.select()
        allocator.void(allocator.unsettled(), "void")
    except Exception as exc:
        logger.info("writes in doubt of {} not voided yet: {}", "/".join(entry.attachment), exc)
        return 11
    finally:
        session.store.close()
        if observer is not None:
            observer(record)
    logger.warning("voided the writes in doubt of {}", "/".join(entry.attachment))
    return 0


def some(
    state: StateDir, store_factory: StoreFactory, caches: Caches | None, limit: int, until: float
) -> int:
    """Finish up to `limit` entries that have work left and that nobody holds, all of it over
    by monotonic `until`; how many are done."""
    done = 0
    for name in state.pending()[:limit]:
        if time.monotonic() >= until:
            break
        entry = state.try_entry(name)
        if entry is None:
            continue
        with entry:
            if entry.unreadable:
                continue
            done += finish(entry, state, store_factory, caches, until) == 0
    return done
