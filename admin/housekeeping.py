"""`fences` and `journal`: what the plugin keeps besides allocations, for an operator to see and
tidy.

- Fences (`<prefix>.fences/<network>/<container>/<ifname>`) void late writes of a deleted
  attachment; each is tied to a Consul session, which Consul ends an hour later at the
  earliest, deleting it. Fences without a session (an older version's, or a token that may not
  create sessions) stay: `fences --expire` ties them to a session of that lifetime.
- The journal is this host's state folder (cni/state.py): attachments with work left (a DEL the
  helper took over while Consul was away, writes left in doubt). `journal list` shows it,
  `journal retry` does the work now, `journal drop` forgets an entry (its keys stay allocated).
"""

from __future__ import annotations

import argparse
import base64
import os
import time
from typing import TYPE_CHECKING, Any

from ..allocator.allocate import FENCE_LIFETIME
from ..allocator.store import Check, Lock, Op
from ..cni.state import SESSION_PERIOD, StateDir, StateError, open_state, state_dir_path
from .errors import OK, STATE, UsageError
from .output import print_json

if TYPE_CHECKING:
    from .commands import Context


# -- fences --------------------------------------------------------------------------------
def fences(ctx: Context, args: argparse.Namespace) -> int:
    layout = ctx.settings.layout
    folder = layout.fences(args.network) if args.network else layout.fences()
    resp = ctx.kv.client.request("GET", "/v1/kv/" + folder, {"recurse": "true"})
    found: list[dict[str, Any]] = [] if resp.status == 404 else list(resp.json() or [])
    loose = [e for e in found if not e.get("Session") and not str(e["Key"]).endswith("/")]
    expired = 0
    if args.expire and loose:
        session = ctx.kv.create_session(
            "ipam-da-consul fences (admin)", FENCE_LIFETIME + SESSION_PERIOD
        )
        for e in loose:
            value = base64.b64decode(e.get("Value") or "")
            ops: list[Op] = [
                Check(e["Key"], int(e["ModifyIndex"])),
                Lock(e["Key"], value, session),
            ]
            expired += ctx.kv.txn(ops).ok
    summary = {
        "fences": len(found),
        "withSession": len(found) - len(loose),
        "withoutSession": len(loose),
        "handedToASession": expired,
    }
    if args.json:
        print_json({**summary, "keys": [e["Key"] for e in loose][:1000]})
    else:
        print(
            f"{summary['fences']} fence(s) under {folder}: {summary['withSession']} end with "
            f"their session (Consul deletes them), {summary['withoutSession']} without one"
            + (f"; {expired} handed to a session now" if args.expire else
               "; `fences --expire` hands them to one (an hour at least)" if loose else "")
        )
    return OK


# -- journal -------------------------------------------------------------------------------
def _state(args: argparse.Namespace) -> StateDir:
    try:
        return open_state(args.state_dir or state_dir_path(os.environ))
    except StateError as exc:
        raise UsageError(str(exc)) from None


def _describe(entry: Any) -> dict[str, Any]:
    network, container, ifname = entry.attachment
    owed = "DEL" if entry.deleting is not None else "void of writes in doubt"
    return {
        "entry": entry.name,
        "network": network,
        "container": container,
        "ifname": ifname,
        "owes": owed if entry.has_work else "nothing",
        "attempts": entry.attempts,
        "keys": [c.key for c in entry.kept],
        "inDoubt": [c.key for c in entry.kept if c.state != "held"],
        "unreadable": entry.unreadable,
    }


def journal(ctx: Context, args: argparse.Namespace) -> int:
    state = _state(args)
    try:
        names = state.pending() if args.action != "drop" or not args.entries else args.entries
        if args.entries and args.action != "list":
            unknown = sorted(set(args.entries) - set(state.names()))
            if unknown:
                raise UsageError(f"no journal entry {', '.join(unknown)}; see `journal list`")
            names = list(args.entries)
        rows, failed = [], 0
        for name in names:
            entry = state.entry_by_name(name, time.monotonic() + 5)
            if entry is None:
                raise UsageError(f"journal entry {name} is in use by a call; try again")
            with entry:
                if args.action == "retry":
                    from ..cni import replay
                    from ..cni.compose import consul_store

                    entry.attempts = 0
                    code = replay.finish(entry, state, consul_store)
                    failed += code != 0 and entry.has_work
                elif args.action == "drop":
                    entry.done()
                rows.append(_describe(entry) | ({"dropped": True} if args.action == "drop" else {}))
    finally:
        state.close()
    if args.json:
        print_json(rows)
    else:
        for r in rows:
            what = "dropped (its keys stay allocated)" if r.get("dropped") else r["owes"]
            keys = ", ".join(r["keys"]) or "none known"
            print(f"{r['entry']}  {r['network']}/{r['container']}/{r['ifname']}: {what}; "
                  f"{r['attempts']} attempt(s); keys {keys}")
        if not rows:
            print("nothing pending in the journal")
    return STATE if failed else OK
