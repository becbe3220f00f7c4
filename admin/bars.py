"""How full a pool looks: the colour of its fill level and the cells of its bar. Shared by the
plain and the rich output, so neither imports the other."""

from __future__ import annotations

import math

# Fill levels at which a pool's bar and percentage turn yellow, then red.
WARN_PERCENT = 80.0
FULL_PERCENT = 95.0


def fill_style(percent: float) -> str:
    if percent > FULL_PERCENT:
        return "red"
    if percent > WARN_PERCENT:
        return "yellow"
    return "green"


def bar_cells(allocated: int, size: int, width: int) -> int:
    """Cells of a `width`-cell bar to fill: any allocation shows at least one, and only a full
    range fills them all, so neither 0.4% nor 99.6% reads as its neighbour."""
    if size <= 0 or allocated <= 0:
        return 0
    if allocated >= size:
        return width
    return min(width - 1, max(1, math.floor(width * allocated / size)))
