"""reconcile's target rules and live-list parsing."""

from __future__ import annotations

import pytest
from ipam_da_consul.admin.errors import UsageError
from ipam_da_consul.admin.ids import parse_live_ids, resolve_target

A = "a1b2c3d4e5f6" + "0" * 52  # podman-style 64-hex IDs


B = "b1b2c3d4e5f6" + "1" * 52


# -- short IDs ---------------------------------------------------------------------------------
def test_resolve_target_rules():
    targets = [A, B, "c-1", "c-10", A[:12] + "f" * 52]
    assert resolve_target(B[:6], targets) == B
    assert resolve_target("c-1", targets) == "c-1"  # exact wins over being a prefix
    assert resolve_target("zzzzzz", targets) is None
    assert resolve_target("old", targets) is None  # short and names nothing: no match
    with pytest.raises(UsageError, match="ambiguous: 2 targets") as err:
        resolve_target(A[:8], targets)
    assert A in str(err.value)
    with pytest.raises(UsageError, match="shorter than 6"):
        resolve_target("b1b2", targets)


def test_live_list_parsing():
    live = parse_live_ids(f"  {A}  \n# c\n\n{B[:6]} # short\nc-1\n", "x")
    assert live.ids == {A, B[:6], "c-1"}
    assert live.keeps(A) and live.keeps(B) and live.keeps("c-1")
    assert not live.keeps("c-10")  # a short entry counts in full only
    with pytest.raises(UsageError, match="line 2"):
        parse_live_ids(f"{A}\n{A} {B}\n", "x")
