#!/usr/bin/env bash
# Installs what is needed, then runs the linter, the type checker, the import-cycle check and
# both test tiers: the unit tier first (tests/unit: no Consul, seconds; stops at its first
# failure), then the e2e tier against real Consul and runtimes (tests/e2e) with this script's
# arguments.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/python -m mypy
.venv/bin/python scripts/import_cycles.py
.venv/bin/python -m pytest -x -q tests/unit
exec .venv/bin/python -m pytest tests/e2e "$@"
