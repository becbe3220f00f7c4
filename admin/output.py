"""Tables, JSON and terminal-only progress: results on stdout, everything else on stderr."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO


def print_json(data: Any, out: TextIO | None = None) -> None:
    out = out or sys.stdout
    out.write(json.dumps(data, indent=2) + "\n")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: set[int]) -> str:
    """Columns padded to their widest cell; indexes in `right` are right-aligned (numbers)."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines) + "\n"


def note(message: str) -> None:
    """A remark beside the results (skipped keys, hints): stderr, so stdout stays parseable."""
    sys.stderr.write(f"ipam-da-consul-admin: {message}\n")


class Progress:
    """A one-line status on stderr, redrawn in place; silent unless stderr is a terminal so
    logs and pipes never collect carriage returns."""

    INTERVAL = 0.1

    def __init__(self, stream: TextIO | None = None, enabled: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.shown = False
        self.last = 0.0

    def status(self, text: str) -> None:
        if self.enabled:
            self.stream.write("\r\x1b[K" + text)
            self.stream.flush()
            self.shown = True
            self.last = time.monotonic()

    def count(self, label: str, done: int, total: int) -> None:
        # Redraw at most every INTERVAL seconds: a terminal write per key would slow big scans.
        if self.enabled and (done == total or time.monotonic() - self.last >= self.INTERVAL):
            self.status(f"{label} {done}/{total}")

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = False
