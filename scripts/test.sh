#!/usr/bin/env bash
# Installs what is needed, then runs the linter, the type checker, the layers' import contracts
# (lint-imports, [tool.importlinter] in pyproject.toml), the complexity bound (radon), the
# import-cycle check and both test tiers: the unit tier first (tests/unit: no Consul, seconds;
# stops at its first failure), then the e2e tier against real Consul and runtimes (tests/e2e)
# with this script's arguments.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/python -m mypy
# No cache (it costs ~0.5 s): grimp's cache, keyed on file times, once served the graph of
# files that git had restored moments after they were changed.
.venv/bin/lint-imports --no-cache
# No function above cyclomatic complexity 15 in the layers (radon, pinned in the test extra):
# `-n C` lists those of 11 and more, each line ending in its number.
over=$(.venv/bin/radon cc -n C -s consul allocator cni | grep -E '\((1[6-9]|[2-9][0-9]|[0-9]{3,})\)$' || true)
if [ -n "$over" ]; then
    printf 'functions above complexity 15 (split them):\n%s\n' "$over" >&2
    exit 1
fi
.venv/bin/python scripts/import_cycles.py
# The property tests' short profile (under 30 s on 2 cores); IPAM_PROPERTIES=long runs every
# example they name (tests/support/properties.py): after changing what they prove.
.venv/bin/python -m pytest -x -q tests/unit
exec .venv/bin/python -m pytest tests/e2e "$@"
