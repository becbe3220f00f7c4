"""Tables, JSON and terminal-only progress: results on stdout, everything else on stderr.

Plain text unless a person is watching: `rich` (tables, fill bars, colour, the progress display)
is used only when the stream is a terminal, neither NO_COLOR nor TERM=dumb asks otherwise and
rich is installed (the `cli` extra), and is imported only then (admin/fancy.py), so pipes,
scripts and `--help` never pay for it and the plain tables stay byte for byte what scripts
already parse.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from types import ModuleType

    from .fancy import RichProgress


def print_json(data: Any, out: TextIO | None = None) -> None:
    out = out or sys.stdout
    out.write(json.dumps(data, indent=2) + "\n")


def fancy(stream: TextIO) -> bool:
    """Whether `stream` gets rich output: a terminal, and no NO_COLOR (no-color.org: set and not
    empty) nor TERM=dumb. NO_COLOR gives the plain tables, not merely uncoloured rich ones: what
    those users asked for is output that reads the same everywhere."""
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


@functools.cache
def _fancy_module() -> ModuleType | None:
    """admin/fancy.py, or None when rich is not installed (it is the optional `cli` extra, and
    the single-file build leaves it out): then a terminal gets the plain output too."""
    try:
        from . import fancy as module
    except ImportError:
        return None
    return module


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


def write_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[Any]],
    right: set[int],
    *,
    fills: Sequence[tuple[int, int] | None] | None = None,
    bold_rows: Collection[int] = (),
    out: TextIO | None = None,
) -> None:
    """A table on `out` (stdout): plain, or drawn by rich on a terminal. `fills` gives each row
    an (allocated, size) fill bar, and `bold_rows` marks totals; both show on a terminal only,
    so the plain table keeps its columns."""
    out = out or sys.stdout
    module = _fancy_module() if fancy(out) else None
    if module is None:
        out.write(format_table(headers, rows, right))
        return
    module.print_table(out, headers, rows, right, fills=fills, bold_rows=bold_rows)


def write_check_line(pool: str, kind: str | None, message: str, out: TextIO | None = None) -> None:
    """One line of `check`: `pool: kind: message` (kind None: a summary). Coloured on a terminal
    only; the words are the same."""
    out = out or sys.stdout
    module = _fancy_module() if fancy(out) else None
    if module is None:
        out.write(f"{pool}: {kind}: {message}\n" if kind else f"{pool}: {message}\n")
        return
    module.print_check_line(out, pool, kind, message)


def note(message: str) -> None:
    """A remark beside the results (skipped keys, hints): stderr, so stdout stays parseable."""
    sys.stderr.write(f"ipam-da-consul-admin: {message}\n")


# -- Prometheus text exposition ----------------------------------------------------------------
def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int) or (math.isfinite(value) and value == int(value)):
        return str(int(value))
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def prometheus_text(
    families: Iterable[tuple[str, str, str, Iterable[tuple[Mapping[str, str], float]]]],
) -> str:
    """Families of (name, help, type, samples) in the text exposition format 0.0.4.

    Written here rather than with prometheus_client's formatter: importing that library costs
    more than the rest of the CLI, and gauges without timestamps need only the escaping of label
    values (backslash, double quote, newline) and HELP text (backslash, newline)."""
    lines: list[str] = []
    for name, help_text, kind, samples in families:
        lines.append(f"# HELP {name} {_escape_help(help_text)}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            pairs = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items())
            series = f"{name}{{{pairs}}}" if pairs else name
            lines.append(f"{series} {_number(value)}")
    return "\n".join(lines) + "\n" if lines else ""


# -- progress ----------------------------------------------------------------------------------
class Progress:
    """A status on stderr, redrawn in place; silent unless stderr is a terminal so logs and pipes
    never collect carriage returns. rich's display (spinner, bar, count, elapsed time) on a
    terminal; the hand-written one-line status under NO_COLOR or TERM=dumb."""

    INTERVAL = 0.1

    def __init__(self, stream: TextIO | None = None, enabled: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        # Decided now, while `stream` is the real stderr: rich swaps sys.stderr while it draws.
        self.rich = self.enabled and fancy(self.stream)
        self.display: RichProgress | None = None
        self.shown = False
        self.last = 0.0

    def _rich(self) -> RichProgress | None:
        if self.display is None and self.rich:
            module = _fancy_module()
            if module is None:
                self.rich = False  # the plain status line from now on
            else:
                self.display = module.RichProgress(self.stream)
        return self.display

    def status(self, text: str) -> None:
        if not self.enabled:
            return
        display = self._rich()
        if display is not None:
            display.show(text, None, None)
        else:
            self.stream.write("\r\x1b[K" + text)
            self.stream.flush()
        self.shown = True
        self.last = time.monotonic()

    def count(self, label: str, done: int, total: int) -> None:
        # Redraw at most every INTERVAL seconds: a terminal write per key would slow big scans.
        if not self.enabled or (done != total and time.monotonic() - self.last < self.INTERVAL):
            return
        display = self._rich()
        if display is not None:
            display.show(label, done, total)
            self.shown = True
            self.last = time.monotonic()
        else:
            self.status(f"{label} {done}/{total}")

    def clear(self) -> None:
        if not self.shown:
            return
        if self.display is not None:
            self.display.stop()
        else:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
        self.shown = False
