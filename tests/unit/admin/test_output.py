"""The operator CLI's output in process: Prometheus text, fill bars, the terminal check."""

from __future__ import annotations

import io
import os
import pty

import pytest
from ipam_da_consul.admin import bars, output
from prometheus_client.parser import text_string_to_metric_families


# -- units -------------------------------------------------------------------------------------
def test_prometheus_text_escapes_labels_and_help():
    odd = 'a\\b"c\nd'
    text = output.prometheus_text(
        [("m_one", "line one\nback\\slash", "gauge", [({"pool": odd, "prefix": "p/"}, 3)]),
         ("m_two", "x", "gauge", [({}, 0.5)])]
    )
    assert 'pool="a\\\\b\\"c\\nd"' in text
    assert "# HELP m_one line one\\nback\\\\slash\n" in text
    one, two = text_string_to_metric_families(text)
    assert one.documentation == "line one\nback\\slash"
    assert one.samples[0].labels == {"pool": odd, "prefix": "p/"}
    assert (one.samples[0].value, two.samples[0].value) == (3, 0.5)
    assert output.prometheus_text([]) == ""


@pytest.mark.parametrize(
    ("allocated", "size", "cells"),
    [(0, 20, 0), (1, 1000, 1), (999, 1000, 19), (20, 20, 20), (10, 20, 10), (5, 0, 0)],
)
def test_bar_cells(allocated, size, cells):
    assert bars.bar_cells(allocated, size, 20) == cells


def test_fancy_only_on_a_terminal(monkeypatch):
    for name in ("NO_COLOR", "TERM"):
        monkeypatch.delenv(name, raising=False)
    main, secondary = pty.openpty()
    with open(secondary, "w") as terminal:
        assert output.fancy(terminal)
        monkeypatch.setenv("NO_COLOR", "1")
        assert not output.fancy(terminal)
        monkeypatch.setenv("NO_COLOR", "")
        monkeypatch.setenv("TERM", "dumb")
        assert not output.fancy(terminal)
    os.close(main)
    assert not output.fancy(io.StringIO())
    assert bars.fill_style(80) == "green" and bars.fill_style(80.1) == "yellow"
    assert bars.fill_style(95.1) == "red"


# -- rich tables at a fixed width ----------------------------------------------------------------
USAGE_HEADERS = ["POOL", "RANGE", "GATEWAY", "SIZE", "ALLOCATED", "FREE", "USED"]
WIDE_ROWS = [
    ["blue", "10.177.0.0/24 10.177.0.1-10.177.0.254", "-", "254", "0", "254", "0.0%"],
    ["wide", "fd00:177:0:1234::/64 fd00:177:0:1234::10-fd00:177:0:1234::ffff",
     "fd00:177:0:1234::1", "65520", "0", "65520", "0.0%"],
    ["wide", "total", "", "65773", "3", "65770", "0.0%"],
]
WORDS = [
    "10.177.0.0/24", "10.177.0.1-", "10.177.0.254", "fd00:177:0:1234::/64",
    "fd00:177:0:1234::10-", "fd00:177:0:1234::ffff", "fd00:177:0:1234::1", *USAGE_HEADERS,
]


def drawn(width: int, rows=WIDE_ROWS, headers=USAGE_HEADERS) -> list[str]:
    from ipam_da_consul.admin import fancy

    buf = io.StringIO()
    fancy.print_table(buf, headers, rows, {3, 4, 5, 6},
                      fills=[(0, 254), (0, 65520), (3, 65773)][: len(rows)], bold_rows=[2],
                      width=width)
    return buf.getvalue().splitlines()


@pytest.mark.parametrize("width", [200, 100, 80, 60, 40])
def test_tables_never_break_an_address_or_a_header(width):
    """Issue 22, finding 9: on 80 columns rich folded `10.177.0.0/24` into `10.177 / .0.0/2 /
    4` and the header into `ALLOCA / TED`. Now every address, range end and header is whole on
    one line, whatever the width: columns as wide as their longest word, cells broken at spaces
    or after a range's dash, then the fill bars dropped, then a block per row."""
    lines = drawn(width)
    assert all(len(line) <= width for line in lines), "\n".join(lines)
    text = "\n".join(lines)
    for word in WORDS:
        assert any(word in line for line in lines), (word, text)


def test_the_layouts_by_width():
    wide, narrow, records = drawn(120), drawn(80), drawn(60)
    assert wide[0].split() == [*USAGE_HEADERS, "FILL"] and "░" in wide[2]
    # 80 columns: the table without its bars, the range on two lines.
    assert narrow[0].split() == USAGE_HEADERS and "░" not in "".join(narrow)
    assert narrow[2].split()[:2] == ["blue", "10.177.0.0/24"]
    assert narrow[3].split() == ["10.177.0.1-10.177.0.254"]
    # Too narrow for the columns: HEADER value lines, the bar beside USED.
    assert records[:2] == [
        "POOL       blue", "RANGE      10.177.0.0/24 10.177.0.1-10.177.0.254",
    ]
    assert records[6].startswith("USED       0.0%  ░░░")


def test_a_table_without_bars_fits_80_columns():
    headers = ["IP", "TARGET", "IFNAME", "NETWORK", "HOST", "NAME"]
    row = ["fd00:177:0:1234::ffff", "0f3c9a2b7d11e4f5" * 4, "eth0", "podman-net",
           "node-7#3fa2c01b", "web"]
    from ipam_da_consul.admin import fancy

    buf = io.StringIO()
    fancy.print_table(buf, headers, [row], set(), width=80)
    lines = buf.getvalue().splitlines()
    # A 64-character container ID does not fit beside the rest: a block, the ID whole.
    assert any(row[1] in line for line in lines), lines
    assert all(len(line) <= 80 for line in lines), lines
