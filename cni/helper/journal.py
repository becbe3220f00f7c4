"""The helper's replay thread: finishes what attachments' state entries still owe (cni/state.py,
cni/replay.py) as soon as Consul answers again.

Why in the helper: a DEL that finds no Consul is taken over by the helper (kept in the
attachment's entry, fsynced, and answered done), and a failed ADD may leave a write in doubt
that no runtime DEL will ever void (dockershim, CRI-O after a reboot). The helper outlives the
call, so it finishes both.

A pass looks at the entries marked pending, each under its lock (an entry whose attachment is
in a call is skipped, and that call finishes the work itself), at start-up, when woken (a DEL
taken over, a call that reached Consul), and otherwise with a backoff per entry that grows to
`_MAX_BACKOFF`. An entry is given up on (kept, never retried on its own, said once with every
name an operator needs; `ipam-da-consul-admin journal` lists, retries or drops it) after
`GIVE_UP_AFTER` attempts: with the backoff, about a day of Consul being unreachable.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from loguru import logger

from ..state import Entry, StateDir

_FIRST_BACKOFF = 0.5
# A DEL waiting here holds its addresses; a pass while Consul is away costs one failed
# connection per entry.
_MAX_BACKOFF = 60.0
GIVE_UP_AFTER = 1500


class Replayer:
    def __init__(self, state: StateDir, finish: Callable[[Entry], int]) -> None:
        self.state = state
        self.finish = finish
        # Set by a DEL taken over, or a call that reached Consul: worth a pass now.
        self.wake = threading.Event()
        self.stopped = False
        # Per entry: when it may be tried again (monotonic), and its current backoff.
        self.next_try: dict[str, tuple[float, float]] = {}
        # What the passes did, for the helper's stats and metrics (PoolCaches.counts): DELs
        # finished, writes in doubt voided, and entries given up on (after GIVE_UP_AFTER, or
        # because they can never succeed), which stay for an operator.
        self.replayed = self.voided = self.expired = 0

    def poke(self, code: int = 0) -> None:
        if code == 0 and not self.wake.is_set():
            self.wake.set()

    def pass_once(self, now: float | None = None) -> float | None:
        """Try every due pending entry once; seconds until the next one is due (None: no
        entry is pending)."""
        names = self.state.pending()
        for gone in set(self.next_try) - set(names):
            del self.next_try[gone]
        soonest: float | None = None
        for name in names:
            if self.stopped:
                return None
            now = time.monotonic()
            due, backoff = self.next_try.get(name, (0.0, _FIRST_BACKOFF))
            if due > now:
                soonest = _min(soonest, due - now)
                continue
            left = self._try(name)
            if left is None:
                self.next_try.pop(name, None)
            else:
                self.next_try[name] = (now + backoff, min(backoff * 2, _MAX_BACKOFF))
                soonest = _min(soonest, backoff)
        return soonest

    def _try(self, name: str) -> int | None:
        """None when the entry has nothing left (or was given up on)."""
        entry = self.state.try_entry(name)
        if entry is None:
            return 1  # its attachment is in a call, which finishes the work itself
        with entry:
            if entry.unreadable:
                logger.error("helper: {}; left for an operator", entry.unreadable)
                return None
            if entry.attempts >= GIVE_UP_AFTER:
                return None
            was_del, had_work = entry.deleting is not None, entry.has_work
            code = self.finish(entry)
            if code == 0:
                if was_del:
                    self.replayed += 1
                elif had_work:
                    self.voided += 1
                return None
            if not entry.has_work:
                self.expired += 1  # a DEL that can never succeed (replay.finish says so)
                return None
            entry.attempts += 1
            entry.write()
            if entry.attempts >= GIVE_UP_AFTER:
                self.expired += 1
                network, container, ifname = entry.attachment
                what = "DEL" if entry.deleting is not None else "void of writes in doubt"
                logger.error(
                    "helper: gave up finishing the {} of network {!r}, container {!r}, "
                    "interface {!r} after {} attempts (last code {}); its keys ({}) stay "
                    "allocated: `ipam-da-consul-admin journal retry` tries again",
                    what, network, container, ifname, entry.attempts, code,
                    ", ".join(c.key for c in entry.kept) or "none known",
                )
            return code

    def run_forever(self) -> None:
        while not self.stopped:
            self.wake.clear()  # before the pass: a poke during it brings on the next one
            try:
                wait = self.pass_once()
            except Exception as exc:  # the thread must outlive any one bad pass
                logger.opt(exception=exc).error("helper: replay pass failed")
                wait = _MAX_BACKOFF
            if self.stopped:
                return
            self.wake.wait(wait)

    def counts(self) -> dict[str, int]:
        return {
            "journal_replayed": self.replayed,
            "journal_voided": self.voided,
            "journal_expired": self.expired,
        }

    def stop(self) -> None:
        self.stopped = True
        self.wake.set()


def _min(a: float | None, b: float) -> float:
    return b if a is None else min(a, b)
