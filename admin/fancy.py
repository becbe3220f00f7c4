"""The terminal side of admin/output.py: rich tables, fill bars, colour and progress.

Imported only when output goes to a terminal (see output.fancy), so rich's import never slows
a pipe, a script or `--help`; without rich (the optional `cli` extra) this import fails and
output.py prints the plain text. Every cell is rich `Text`, never markup: pool names, targets
and hosts come from KV and must print as they are, brackets included.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from typing import Any, TextIO

from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from .bars import bar_cells, fill_style

BAR_WIDTH = 20
# Between two columns: the padding the two cells share (collapse_padding) and the blank
# divider of the SIMPLE_HEAD box.
_GAP = 2
# Where a cell may be broken: after white space, and after the dash of an address range
# (`10.0.0.1-10.0.0.254`), never inside an address, a word or an ID.
_PIECES = re.compile(r"\S+?(?:-(?=[0-9A-Fa-f:.]+(?:\s|$))|\s+|$)|\s+")


def _console(out: TextIO, width: int | None = None) -> Console:
    # highlight=False: rich would otherwise colour numbers and addresses in its own way.
    return Console(file=out, highlight=False, width=width)


def _pieces(text: str) -> list[str]:
    """`text` cut where it may be broken; joined they give `text` back."""
    return [p for p in _PIECES.findall(text) if p]


def _wrap(text: str, width: int) -> list[str]:
    """Lines of at most `width` characters, broken only between pieces; a piece longer than
    `width` alone on its line (it is never cut)."""
    lines: list[str] = []
    line = ""
    for piece in _pieces(text):
        if line and len((line + piece).rstrip()) > width:
            lines.append(line.rstrip())
            line = piece.lstrip()
        else:
            line += piece
    lines.append(line.rstrip())
    return lines


def _longest_piece(text: str) -> int:
    return max((len(p.strip()) for p in _pieces(text)), default=0)


def column_widths(
    headers: Sequence[str], cells: Sequence[Sequence[str]], width: int
) -> list[int] | None:
    """Widths that fit the table in `width` columns without breaking a word, an address or
    an ID (nor a header): each column at least its longest piece, room left shared by the
    columns that want more, widest wishes first. None when even that does not fit."""
    n = len(headers)
    least = [max([len(headers[i]), *(_longest_piece(r[i]) for r in cells)]) for i in range(n)]
    most = [max([len(headers[i]), *(len(r[i]) for r in cells)]) for i in range(n)]
    room = width - _GAP * (n - 1)
    if sum(least) > room:
        return None
    widths = list(least)
    spare = room - sum(widths)
    while spare > 0:
        wanting = [i for i in range(n) if widths[i] < most[i]]
        if not wanting:
            break
        share = max(1, spare // len(wanting))
        for i in sorted(wanting, key=lambda i: most[i] - widths[i]):
            step = min(share, most[i] - widths[i], spare)
            widths[i] += step
            spare -= step
    return widths


def _bar(allocated: int, size: int, percent: float) -> Text:
    filled = bar_cells(allocated, size, BAR_WIDTH)
    bar = Text("█" * filled, style=fill_style(percent))
    bar.append("░" * (BAR_WIDTH - filled), style="bright_black")
    return bar


def print_table(
    out: TextIO,
    headers: Sequence[str],
    rows: Sequence[Sequence[Any]],
    right: set[int],
    *,
    fills: Sequence[tuple[int, int] | None] | None = None,
    bold_rows: Collection[int] = (),
    width: int | None = None,
) -> None:
    """A table that never breaks a word, an address or an ID, whatever the terminal's width:
    columns get the widths they need (column_widths) and cells are broken only where a
    person would; when the fill bars do not fit they go, and when the columns do not fit
    either, each row is printed as a block of `HEADER value` lines."""
    console = _console(out, width)
    cells = [["" if c is None else str(c) for c in row] for row in rows]
    bars: list[Text | None] = []
    for n in range(len(cells)):
        fill = fills[n] if fills is not None else None
        if fill is None:
            bars.append(None)
            continue
        allocated, size = fill
        percent = 100.0 * allocated / size if size else 0.0
        bars.append(_bar(allocated, size, percent))
    headers = list(headers)
    widths = None
    if fills is not None:
        widths = column_widths([*headers, "FILL"], [[*r, "x" * BAR_WIDTH] for r in cells],
                               console.width)
    with_bars = widths is not None
    if widths is None:
        widths = column_widths(headers, cells, console.width)
    if widths is None:
        _print_records(console, headers, cells, bars, bold_rows)
        return
    table = Table(
        box=box.SIMPLE_HEAD, header_style="bold", show_edge=False, pad_edge=False,
        collapse_padding=True,
    )
    for i, header in enumerate(headers):
        table.add_column(
            header, justify="right" if i in right else "left", width=widths[i], no_wrap=True
        )
    if with_bars:
        table.add_column("FILL", width=BAR_WIDTH, no_wrap=True)
    for n, row in enumerate(cells):
        texts = [Text("\n".join(_wrap(c, widths[i]))) for i, c in enumerate(row)]
        bar = bars[n]
        fill = fills[n] if fills is not None else None
        if fill is not None:
            # The USED cell (last) takes the bar's colour, so the number agrees with the bar.
            allocated, size = fill
            texts[-1].stylize(fill_style(100.0 * allocated / size if size else 0.0))
        if with_bars:
            texts.append(bar if bar is not None else Text(""))
        table.add_row(*texts, style="bold" if n in bold_rows else None)
    console.print(table)


def _print_records(
    console: Console,
    headers: Sequence[str],
    cells: Sequence[Sequence[str]],
    bars: Sequence[Text | None],
    bold_rows: Collection[int],
) -> None:
    """Too narrow for the columns: a block per row, `HEADER  value` a line, a blank line
    between rows. A value too long for the line goes on, broken as in a table, under it."""
    label = max(len(h) for h in headers) + 2
    room = max(console.width - label, 1)
    for n, row in enumerate(cells):
        if n:
            console.print()
        for i, (header, value) in enumerate(zip(headers, row, strict=True)):
            lines = _wrap(value, room)
            if max(len(line) for line in lines) > room:
                lines = ["", *_wrap(value, max(console.width - 2, 1))]
            bar = bars[n] if i == len(headers) - 1 else None
            if bar is not None and len(lines[-1]) + 2 + BAR_WIDTH <= room:
                # The fill bar beside the last value (USED), as in the table.
                lines[-1] = lines[-1].ljust(len(lines[-1]) + 2)
            elif bar is not None:
                lines.append("")
            line = Text(header.ljust(label), style="bold")
            line.append(lines[0], style="bold" if n in bold_rows else "")
            if bar is not None and len(lines) == 1:
                line.append_text(bar)
            console.print(line, soft_wrap=True)
            pad = "  " if lines[0] == "" else " " * label
            for k, more in enumerate(lines[1:], 2):
                text = Text(pad + more)
                if bar is not None and k == len(lines):
                    text.append_text(bar)
                console.print(text, soft_wrap=True)


_KIND_STYLE = {"ok": "green"}


def print_check_line(out: TextIO, pool: str, kind: str | None, message: str) -> None:
    line = Text()
    line.append(pool, style="bold")
    line.append(": ")
    if kind:
        line.append(kind, style="red")
        line.append(": ")
        line.append(message)
    elif message.startswith("ok"):
        line.append("ok", style="green")
        line.append(message[2:])
    else:
        line.append(message, style="red")
    _console(out).print(line, soft_wrap=True)


class RichProgress:
    """One rich progress display on `stream`: a spinner, what is being done, a bar (pulsing when
    the total is unknown), done/total and the time taken; gone once stopped."""

    def __init__(self, stream: TextIO) -> None:
        self.console = Console(file=stream, highlight=False)
        self.progress: Progress | None = None
        self.task: TaskID | None = None
        self.label = ""

    def show(self, label: str, done: int | None, total: int | None) -> None:
        if self.progress is None:
            # redirect_stdout=False: results on a piped stdout must never be routed to the
            # terminal; notes on stderr print above the display (redirect_stderr).
            self.progress = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=self.console,
                transient=True,
                redirect_stdout=False,
            )
            self.progress.start()
        if self.task is None or label != self.label:
            if self.task is not None:
                self.progress.remove_task(self.task)
            self.task = self.progress.add_task(label, total=total)
            self.label = label
        self.progress.update(self.task, completed=done or 0, total=total)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        self.progress = None
        self.task = None
        self.label = ""
