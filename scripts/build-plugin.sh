#!/usr/bin/env bash
# Builds the single-file plugin: dist/ipam-da-consul, -verbose, -admin and -helper, each one
# executable zipapp that needs only the host's Python 3.11+ (installing = copying the file into
# /opt/cni/bin). Options go to scripts/build_plugin.py: --python (the hosts' interpreter, default
# /usr/bin/python3), --out (default dist/).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
[ -x .venv/bin/python ] || bash scripts/setup.sh --plugin-only >/dev/null
exec .venv/bin/python scripts/build_plugin.py "$@"
