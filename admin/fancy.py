"""The terminal side of admin/output.py: rich tables, fill bars, colour and progress.

Imported only when output goes to a terminal (see output.fancy), so rich's import never slows
a pipe, a script or `--help`; without rich (the optional `cli` extra) this import fails and
output.py prints the plain text. Every cell is rich `Text`, never markup: pool names, targets
and hosts come from KV and must print as they are, brackets included.
"""

from __future__ import annotations

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


def _console(out: TextIO) -> Console:
    # highlight=False: rich would otherwise colour numbers and addresses in its own way.
    return Console(file=out, highlight=False)


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
) -> None:
    table = Table(box=box.SIMPLE_HEAD, header_style="bold", show_edge=False, pad_edge=False)
    for i, header in enumerate(headers):
        # fold, never the default ellipsis: a cut container ID or address cannot be copied.
        table.add_column(header, justify="right" if i in right else "left", overflow="fold")
    if fills is not None:
        table.add_column("FILL", no_wrap=True)
    for n, row in enumerate(rows):
        cells: list[Text] = [Text("" if c is None else str(c)) for c in row]
        fill = fills[n] if fills is not None else None
        if fill is not None:
            allocated, size = fill
            percent = 100.0 * allocated / size if size else 0.0
            # The USED cell (last) takes the bar's colour, so the number agrees with the bar.
            cells[-1].stylize(fill_style(percent))
            cells.append(_bar(allocated, size, percent))
        elif fills is not None:
            cells.append(Text(""))
        table.add_row(*cells, style="bold" if n in bold_rows else None)
    _console(out).print(table)


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
