#!/usr/bin/env bash
# Jepsen-style partition test (tests/e2e/test_partition.py): a 3-server Consul cluster in network
# namespaces, simulated hosts running the plugin in-process and through the helper, a nemesis
# on the leader (isolate, clients-only, asym-in, asym-out, kill, pause-4, pause-15, no-quorum)
# and on the hosts' wall clocks (libfaketime: hours ahead, behind, stepped back, strobed), a
# workload with take-overs and skipped cleanup DELs, then a checker and an availability table
# per fault. Needs root (namespaces, a bridge, iptables inside the namespaces only; all removed
# at the end, a killed run's leftovers at the next start); Debian's faketime and a C compiler
# for the clock nemesis (without them it runs without clocks and says so).
#
#   bash scripts/partition.sh                 # short: isolate, pause-15, no-quorum (~3 min)
#   bash scripts/partition.sh --long          # every fault, 2 rounds, 30 s each (~23 min)
#   bash scripts/partition.sh --long -k helper   # extra arguments go to pytest
#
# Knobs (env): IPAM_PARTITION_ROUNDS, IPAM_PARTITION_FAULT_SECONDS, IPAM_PARTITION_FAULTS=a,b,
# IPAM_PARTITION_SEED, IPAM_PARTITION_CLOCKS=0 (no clock nemesis), IPAM_PARTITION_OVERHEAD
# (what a call may take on top of `timeout`, default 0.5), IPAM_PARTITION_VERBOSE=0 (no per-call
# debug logs). Each mode's history is written as JSON next to its per-call logs under pytest's
# basetemp (the report names it).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
if [ "${1:-}" = "--long" ]; then export IPAM_PARTITION_LONG=1; shift; fi
[ -x .venv/bin/python ] || bash scripts/setup.sh
exec .venv/bin/python -m pytest -s --tb=short -p no:cacheprovider tests/e2e/test_partition.py "$@"
