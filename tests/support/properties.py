"""How hard the unit tier's property tests (Hypothesis) try.

Short, the default (scripts/test.sh, CI): each tries a tenth of its examples, at least 25, so
the unit tier stays under 30 s on 2 cores. Long: every example each test names. Run the long
profile after changing what they prove: the fast reading of a pool folder (allocator/fastpath.py,
whose contract is tests/unit/allocator/test_folder_validation.py), consul/kv.py's reading of a
listing in pieces, the range arithmetic and the stripes:

    IPAM_PROPERTIES=long .venv/bin/python -m pytest tests/unit

(a few minutes on 2 cores). A failure either profile finds is kept in Hypothesis's example
database (.hypothesis/) and tried first on the next run, whichever profile it uses.
"""

from __future__ import annotations

import os

LONG = os.environ.get("IPAM_PROPERTIES", "short") == "long"


def examples(full: int) -> int:
    """`full` in the long profile; a tenth of it, at least 25, in the short one."""
    return full if LONG else min(full, max(25, full // 10))
