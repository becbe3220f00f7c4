"""The helper's metrics listen address (--metrics-address). Scraped after real calls:
tests/e2e/test_metrics.py."""

from __future__ import annotations

import pytest
from ipam_da_consul.cni.helper.cli import parse_address


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("9101", ("127.0.0.1", 9101)),
        (":9101", ("127.0.0.1", 9101)),
        ("0.0.0.0:9101", ("0.0.0.0", 9101)),
        ("[::1]:9101", ("::1", 9101)),
        ("localhost:0", ("localhost", 0)),
    ],
)
def test_metrics_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["", "host:", "host:http", "1:65536", "1.2.3.4"])
def test_bad_metrics_address(text: str) -> None:
    with pytest.raises(ValueError):
        parse_address(text)
