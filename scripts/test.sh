#!/usr/bin/env bash
# Installs what is needed, then runs the linter, the type checker, the layers' import contracts
# (lint-imports, [tool.importlinter] in pyproject.toml), the import-cycle check and both test
# tiers: the unit tier first (tests/unit: no Consul, seconds; stops at its first
# failure), then the e2e tier against real Consul and runtimes (tests/e2e) with this script's
# arguments.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/python -m mypy
# No cache (it costs ~0.5 s): grimp's cache, keyed on file times, once served the graph of
# files that git had restored moments after they were changed.
.venv/bin/lint-imports --no-cache
.venv/bin/python scripts/import_cycles.py
# The property tests' short profile (under 30 s on 2 cores); IPAM_PROPERTIES=long runs every
# example they name (tests/support/properties.py): after changing what they prove.
.venv/bin/python -m pytest -x -q tests/unit
exec .venv/bin/python -m pytest tests/e2e "$@"
