#!/usr/bin/env bash
# Installs what is needed, then runs the linter and the whole test suite against real Consul.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/python -m mypy
exec .venv/bin/python -m pytest "$@"
