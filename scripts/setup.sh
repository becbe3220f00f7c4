#!/usr/bin/env bash
# Installs what the tests and benchmark need on a fresh Debian 12 machine: a virtualenv with
# the plugin and its test tools, the Consul binary, and (as root) the containernetworking-plugins
# package for the bridge end-to-end tests, Podman and containerd for the real-runtime tests,
# systemd's systemd-socket-activate and faketime.
#
#   --plugin-only   only what scripts/demo.sh and scripts/build-plugin.sh need: the virtualenv
#                   with the plugin, and the Consul binary (unpacked under .cache/consul; no
#                   root, no system package)
#
# Quiet: pip's, apt's and the Consul download's own output goes to .cache/setup.log, shown
# when a step fails.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
demo=""
[ "${1:-}" = "--plugin-only" ] && demo=1
mkdir -p .cache
log=.cache/setup.log
: > "$log"
say() { echo "setup: $*"; }
quietly() {  # run a step with its output in the log; on failure show the log's end
  if ! "$@" >>"$log" 2>&1; then
    echo "setup: failed: $*" >&2
    tail -n 30 "$log" >&2
    return 1
  fi
}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi; }
apt_ready=""
apt_install() {
  command -v apt-get >/dev/null || return 1
  if [ -z "$apt_ready" ]; then as_root apt-get update -qq >>"$log" 2>&1 || return 1; apt_ready=1; fi
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@" >>"$log" 2>&1
}

py=${PYTHON:-python3}
if ! "$py" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
  echo "setup: Python 3.11 or newer is needed (set PYTHON=...)" >&2; exit 1
fi
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv >>"$log" 2>&1 || { apt_install python3-venv && quietly "$py" -m venv .venv; }
fi
if [ -n "$demo" ] && [ -x .venv/bin/ipam-da-consul ] && [ -x .venv/bin/ipam-da-consul-admin ]; then
  say "virtualenv .venv already holds the plugin"
else
  quietly .venv/bin/python -m pip install --upgrade pip
  # Editable: the tests and the executables always run the code in this tree, never a stale copy.
  if [ -n "$demo" ]; then
    quietly .venv/bin/python -m pip install -e .
  else
    quietly .venv/bin/python -m pip install -e ".[test,fast]"
  fi
  # setuptools' editable install adds an import finder that imports pathlib and more at every
  # interpreter start: ~25 ms on each plugin call, the helper's fast path included. The whole
  # package is under src/ (the layer folders are symlinked there), so a plain path entry imports
  # the very same files at no cost; the console scripts and metadata pip wrote stay as they are.
  site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  rm -f "$site"/__editable__.ipam_da_consul-*.pth "$site"/__editable___ipam_da_consul_*_finder.py
  echo "$root/src" > "$site/ipam_da_consul-src.pth"
  say "virtualenv .venv with the plugin$([ -n "$demo" ] || echo " and the test tools") (editable)"
fi

consul=$(bash scripts/fetch-consul.sh 2>>"$log") || { tail -n 30 "$log" >&2; exit 1; }
say "Consul $("$consul" version 2>/dev/null | head -1 | cut -d' ' -f2) at $consul"
[ -n "$demo" ] && exit 0

# The bridge and host-local plugins (Debian package) for the runtime-path tests and benchmark.
if [ ! -x /usr/lib/cni/bridge ]; then
  apt_install containernetworking-plugins iproute2 \
    || echo "setup: containernetworking-plugins not installed; bridge tests will be skipped" >&2
fi
[ -x /usr/sbin/iptables ] || apt_install iptables || echo "setup: iptables not installed; the partition test will be skipped" >&2
# libfaketime (Debian's faketime) for the partition test's clock nemesis (per-host clocks ahead,
# behind, stepped back); without it that test runs without the clock nemesis and says so.
dpkg -s libfaketime >/dev/null 2>&1 || apt_install faketime \
  || echo "setup: faketime not installed; the partition test runs without its clock nemesis" >&2
# Podman (CNI backend, runc) and a static busybox for the real-runtime test (tests/e2e/test_podman.py);
# without them that test skips and says why.
if ! command -v podman >/dev/null || ! command -v runc >/dev/null \
  || ! dpkg -s busybox-static >/dev/null 2>&1; then
  apt_install podman runc busybox-static \
    || echo "setup: podman/runc/busybox-static not installed; the podman test will be skipped" >&2
fi
# containerd 1.6 with its CRI plugin, ctr and the runc shim, for the Kubernetes-path test
# (tests/e2e/test_containerd.py, which runs an instance of its own and never the machine's
# service); without it that test skips and says why. grpcio and grpcio-tools (its CRI client)
# come with the venv's test extra.
if ! command -v containerd >/dev/null || ! command -v containerd-shim-runc-v2 >/dev/null \
  || ! command -v runc >/dev/null; then
  apt_install containerd runc busybox-static \
    || echo "setup: containerd not installed; the containerd test will be skipped" >&2
fi
# systemd-socket-activate (Debian's systemd package) for the socket-activation tests; no running
# systemd is needed.
if ! command -v systemd-socket-activate >/dev/null; then
  apt_install systemd \
    || echo "setup: systemd-socket-activate not installed; socket-activation tests will be skipped" >&2
fi
# libfaketime (Debian's faketime) for the model test's per-host clocks that skew and step;
# without it that test leaves its clock rule out and says so.
if [ ! -e /usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1 ]; then
  apt_install faketime \
    || echo "setup: faketime not installed; the model test runs without per-host clocks" >&2
fi
# lintian and dpkg-dev (the Debian package's checks: scripts/build-deb.sh, tests/e2e/test_deb.py),
# Debian's prometheus (promtool for the alert rules' unit tests, and the server the
# real-Prometheus test starts on loopback) and logrotate (the package's rule, rotated while calls
# append). Without recommends: prometheus would pull node-exporter and its collectors.
if ! command -v lintian >/dev/null || ! command -v promtool >/dev/null \
  || ! command -v prometheus >/dev/null || ! command -v logrotate >/dev/null \
  || ! command -v dpkg-architecture >/dev/null; then
  apt_install --no-install-recommends lintian dpkg-dev prometheus logrotate \
    || echo "setup: lintian/dpkg-dev/prometheus/logrotate not installed; the package, rules, Prometheus and log rotation tests will be skipped" >&2
fi
say "ready (the full log: $log)"
