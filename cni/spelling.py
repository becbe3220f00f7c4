"""Keys of the `ipam` section this plugin does not know, and the known key each was probably
meant to be.

Why it matters: every setting has a default, so a misspelled one is silently the default. A
`reuse_afer` turns the cool-down off, a `consul_token_flie` sends no token (a 403 later, with no
hint), a `timout` leaves the 15 s budget. host-local ignores unknown keys, and so must a plugin
behind `ipam-delegated`, whose ipam section also carries its sibling delegates' settings; but a
key that is one slip away from one of ours is ours, misspelled.

So (cni/config.py applies it):
- a *near miss* (close to a known key by spelling, or a known key without its `consul_`) fails
  ADD, CHECK and STATUS with error 7, naming it and the key it is near: such a config would
  run with a safety setting silently off. DEL and GC only warn: refusing a release over a typo
  would leave the address allocated, and a config with the typo never got an ADD through;
- any other unknown key is a warning on stderr (standalone, where every key of the section is
  the plugin's), or a debug line in the verbose log (behind ipam-delegated, where it is
  likely a sibling delegate's);
- a required key that is missing is named with its near miss, if there is one.
"""

from __future__ import annotations

import difflib
from collections.abc import Collection, Iterable
from dataclasses import dataclass

# Keys the ipam section may hold besides this plugin's settings: `type` (the CNI plugin to
# run) and ipam-delegated's `delegates`.
CNI_KEYS = frozenset({"type", "delegates"})
# How alike (difflib's ratio, after folding case and '-') a key must be to a known one to be
# taken for it: 0.8 catches one or two letters off in keys of 5 or more letters ("timout",
# "reuse_afer", "consul_token_flie", "consul_server", "kv-prefix", "consulServers"), and no
# key of the conventions the spec and host-local use ("ranges", "routes", "dataDir", "subnet").
NEAR = 0.8
# Below NEAR, a known key this close is still worth naming in the warning.
HINT = 0.6
_SHOWN = 60


@dataclass(frozen=True)
class Unknown:
    key: str
    # The known key it most likely was meant to be, if any.
    closest: str | None
    # Close enough to be taken for a misspelling of `closest` (see NEAR).
    near: bool

    def describe(self) -> str:
        hint = f" (did you mean `{self.closest}`?)" if self.closest else ""
        return f"`{shown(self.key)}`{hint}"

    def warning(self) -> str:
        hint = f"; did you mean `{self.closest}`?" if self.closest else ""
        key = shown(self.key)
        return f"ipam key `{key}` is not a setting of ipam-da-consul and is ignored{hint}"


def shown(key: str) -> str:
    """A key as a message shows it: as written when short and printable, else quoted, cut."""
    if len(key) <= _SHOWN and key.isprintable():
        return key
    return repr(key[:_SHOWN]) + ("…" if len(key) > _SHOWN else "")


def _folded(key: str) -> str:
    return key.lower().replace("-", "_")


def closest(key: str, known: Iterable[str]) -> tuple[str | None, float]:
    """The known key `key` is most like, and how alike they are (1.0: the same once case and
    '-' are folded, or the known key is `key` with its `consul_` prefix)."""
    folded = _folded(key)
    best: tuple[str | None, float] = (None, 0.0)
    for name in sorted(known):
        if folded == name or name == f"consul_{folded}":
            return name, 1.0
        ratio = difflib.SequenceMatcher(None, folded, name).ratio()
        if ratio > best[1]:
            best = (name, ratio)
    return best


def unknown_keys(section: Iterable[object], settings: Collection[str]) -> list[Unknown]:
    """The keys of an ipam section (a JSON object) that are neither `settings` nor CNI_KEYS,
    in order."""
    out = []
    for key in section:
        if not isinstance(key, str) or key in settings or key in CNI_KEYS:
            continue
        name, ratio = closest(key, settings)
        out.append(Unknown(key, name if ratio >= HINT else None, ratio >= NEAR))
    return out


def missing_hints(
    missing: Iterable[str], unknown: Iterable[Unknown]
) -> dict[str, Unknown]:
    """For each missing required key, the unknown key that was near it, if one was."""
    near = {u.closest: u for u in unknown if u.near and u.closest}
    return {name: near[name] for name in missing if name in near}
