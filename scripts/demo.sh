#!/usr/bin/env bash
# The plugin end to end in a minute, as the README's first screen says: a virtualenv with the
# plugin and the Consul binary (scripts/setup.sh --plugin-only: no root, nothing outside this folder),
# a Consul dev agent (in memory, stopped at the end), a pool created with the admin CLI, the
# network config a runtime would read, and ADD -> CHECK -> DEL through the installed plugin.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/setup.sh --plugin-only
exec .venv/bin/python scripts/demo.py "$@"
