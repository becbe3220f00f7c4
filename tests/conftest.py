"""Fixtures shared by both tiers. The Consul fixtures are in tests/e2e/conftest.py: the unit
tier (tests/unit) never sees them."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.util_procs import BlackHole


@pytest.fixture
def hole() -> Iterator[BlackHole]:
    h = BlackHole()
    yield h
    h.close()
