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
