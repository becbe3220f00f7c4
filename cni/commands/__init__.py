"""One module per CNI command, each with the handlers of the states it goes through (the
table in cni/machine.py); what they share (parse, select a server, load a pool) is in `base`."""

from __future__ import annotations

from .add import Add
from .base import Command, Inputs, PoolCommand, Session
from .check import Check
from .delete import Del
from .gc import Gc
from .status import Status
from .version import Version

KINDS: dict[str, type[Command]] = {
    kind.name: kind for kind in (Add, Del, Check, Gc, Status, Version)
}

__all__ = ["KINDS", "Command", "Inputs", "PoolCommand", "Session"]
