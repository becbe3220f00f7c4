#!/usr/bin/env bash
# Installs everything the demo, tests and benchmark need on a fresh Debian 12 machine:
# a virtualenv with the plugin and its test tools, the Consul binary, and (as root) the
# containernetworking-plugins package for the bridge end-to-end tests and systemd's
# systemd-socket-activate for the socket-activation tests.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi; }
apt_ready=""
apt_install() {
  command -v apt-get >/dev/null || return 1
  if [ -z "$apt_ready" ]; then as_root apt-get update -qq || return 1; apt_ready=1; fi
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@" >/dev/null
}

py=${PYTHON:-python3}
if ! "$py" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
  echo "setup: Python 3.11 or newer is needed (set PYTHON=...)" >&2; exit 1
fi
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv 2>/dev/null || { apt_install python3-venv && "$py" -m venv .venv; }
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
# Editable: the tests and the executables always run the code in this tree, never a stale copy.
.venv/bin/python -m pip install -q -e ".[test,fast]"
# setuptools' editable install adds an import finder that imports pathlib and more at every
# interpreter start: ~25 ms on each plugin call, the helper's fast path included. The whole
# package is under src/ (the layer folders are symlinked there), so a plain path entry imports
# the very same files at no cost; the console scripts and metadata pip wrote stay as they are.
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
rm -f "$site"/__editable__.ipam_da_consul-*.pth "$site"/__editable___ipam_da_consul_*_finder.py
echo "$root/src" > "$site/ipam_da_consul-src.pth"

bash scripts/fetch-consul.sh >/dev/null

# The bridge and host-local plugins (Debian package) for the runtime-path tests and benchmark.
if [ ! -x /usr/lib/cni/bridge ]; then
  apt_install containernetworking-plugins iproute2 \
    || echo "setup: containernetworking-plugins not installed; bridge tests will be skipped" >&2
fi
[ -x /usr/sbin/iptables ] || apt_install iptables || echo "setup: iptables not installed; the partition test will be skipped" >&2
# Podman (CNI backend, runc) and a static busybox for the real-runtime test (tests/e2e/test_podman.py);
# without them that test skips and says why.
if ! command -v podman >/dev/null || ! command -v runc >/dev/null \
  || ! dpkg -s busybox-static >/dev/null 2>&1; then
  apt_install podman runc busybox-static \
    || echo "setup: podman/runc/busybox-static not installed; the podman test will be skipped" >&2
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
# lintian (the Debian package's checks: scripts/build-deb.sh, tests/e2e/test_deb.py), Debian's
# prometheus (promtool for the alert rules' unit tests, and the server the real-Prometheus test
# starts on loopback) and logrotate (the package's rule, rotated while calls append). Without
# recommends: prometheus would pull node-exporter and its collectors.
if ! command -v lintian >/dev/null || ! command -v promtool >/dev/null \
  || ! command -v logrotate >/dev/null; then
  apt_install --no-install-recommends lintian prometheus logrotate \
    || echo "setup: lintian/prometheus/logrotate not installed; the package, rules, Prometheus and log rotation tests will be skipped" >&2
fi
echo "setup: ready (.venv, $(bash scripts/fetch-consul.sh 2>/dev/null))"
