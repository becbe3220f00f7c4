#!/usr/bin/env bash
# Builds the Debian package dist/ipam-da-consul_<version>_all.deb from the single-file build
# (scripts/build-plugin.sh), then runs lintian on it (errors and warnings fail the build).
# Options go to scripts/build_deb.py: --version (default: the project's), --out (default
# dist/), --single-file DIR (reuse a build), --python (the hosts' interpreter), --no-lintian.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
# The virtualenv only, as build-plugin.sh: no system package (a missing lintian is said, not
# installed; `bash scripts/setup.sh` installs it).
[ -x .venv/bin/python ] || bash scripts/setup.sh --plugin-only >/dev/null
exec .venv/bin/python scripts/build_deb.py "$@"
