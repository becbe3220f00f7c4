#!/usr/bin/env bash
# End to end on a fresh machine: install, start a local Consul dev agent, create a pool,
# run ADD -> CHECK -> DEL through the installed plugin, stop the agent.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
