#!/usr/bin/env bash
# Install ipam-da-consul on a host (run as root), the same way whichever build you use:
#
#   the plugins where runtimes look for them   /opt/cni/bin/ipam-da-consul, -verbose, -helper,
#                                              -admin
#   the operator commands on PATH              /usr/local/bin/ipam-da-consul-admin, -helper
#                                              (symbolic links to the ones above)
#   the socket-activated helper                /etc/systemd/system/ipam-da-consul-helper.socket
#                                              and .service, enabled (when systemd runs; a
#                                              drop-in under .service.d/ is yours to add)
#
#   deploy/examples/install.sh                 the single files of `bash scripts/build-plugin.sh`
#                                              (dist/, or DIST=FOLDER), copied
#   deploy/examples/install.sh --venv DIR      a pip install in the virtualenv DIR (docs/install.md),
#                                              linked instead of copied
#   deploy/examples/install.sh --uninstall     undo: stop and remove the units, the files and the
#                                              links it made (the state folder stays)
#   --no-systemd                               leave the units alone
#
# Running it again upgrades: the files are replaced and a running helper restarted. Folders can
# be moved with CNI_BIN_DIR, BIN_DIR and SYSTEMD_DIR (for tests and unusual hosts).
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
dist=${DIST:-$here/dist}
cni_bin=${CNI_BIN_DIR:-/opt/cni/bin}
bin=${BIN_DIR:-/usr/local/bin}
units=${SYSTEMD_DIR:-/etc/systemd/system}
names=(ipam-da-consul ipam-da-consul-verbose ipam-da-consul-helper ipam-da-consul-admin)
on_path=(ipam-da-consul-admin ipam-da-consul-helper)
venv="" uninstall="" systemd=1
while [ $# -gt 0 ]; do
  case "$1" in
    --venv) venv=${2:?--venv needs the folder of the virtualenv}; shift 2 ;;
    --uninstall) uninstall=1; shift ;;
    --no-systemd) systemd=""; shift ;;
    -h|--help) sed -n '2,21s/^# \{0,1\}//p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
with_systemd() { [ -n "$systemd" ] && [ -d /run/systemd/system ]; }

if [ -n "$uninstall" ]; then
  if with_systemd; then
    systemctl disable --now ipam-da-consul-helper.socket 2>/dev/null || true
    systemctl stop ipam-da-consul-helper.service 2>/dev/null || true
  fi
  if [ -n "$systemd" ]; then
    rm -f "$units/ipam-da-consul-helper.socket" "$units/ipam-da-consul-helper.service"
    rm -rf "$units/ipam-da-consul-helper.service.d"
    if with_systemd; then systemctl daemon-reload; fi
  fi
  for f in "${on_path[@]}"; do
    # Only the links this script made: never a file someone else put there.
    if [ -L "$bin/$f" ] && [ "$(readlink "$bin/$f")" = "$cni_bin/$f" ]; then rm -f "$bin/$f"; fi
  done
  for f in "${names[@]}"; do rm -f "$cni_bin/$f"; done
  echo "removed ipam-da-consul from $cni_bin and $bin; kept the state folder" \
    "(/var/lib/ipam-da-consul: see \`ipam-da-consul-admin journal list\` before deleting it)" \
    "and the network configs naming the plugin"
  exit 0
fi

if [ -n "$venv" ]; then
  for f in "${names[@]}"; do
    [ -x "$venv/bin/$f" ] || { echo "install.sh: $venv/bin/$f missing: pip install into $venv first" >&2; exit 1; }
  done
else
  for f in "${names[@]}"; do
    [ -f "$dist/$f" ] || { echo "install.sh: $dist/$f missing: run bash scripts/build-plugin.sh first (or set DIST)" >&2; exit 1; }
  done
  # The single files start with #!/usr/bin/python3: it must be 3.11 or newer.
  if ! /usr/bin/python3 -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
    echo "install.sh: the single files need /usr/bin/python3 >= 3.11; install from a venv instead (--venv)" >&2
    exit 1
  fi
fi

install -d -m 0755 "$cni_bin" "$bin"
for f in "${names[@]}"; do
  if [ -n "$venv" ]; then
    ln -sfn "$venv/bin/$f" "$cni_bin/$f"
  else
    # A new file renamed over the old: a call starting meanwhile runs one or the other, whole.
    install -m 0755 "$dist/$f" "$cni_bin/.$f.new"
    mv -f "$cni_bin/.$f.new" "$cni_bin/$f"
  fi
done
for f in "${on_path[@]}"; do ln -sfn "$cni_bin/$f" "$bin/$f"; done

if with_systemd; then
  install -d -m 0755 "$units"
  install -m 0644 "$here/deploy/systemd/ipam-da-consul-helper.socket" \
    "$here/deploy/systemd/ipam-da-consul-helper.service" "$units/"
  systemctl daemon-reload
  systemctl enable --now ipam-da-consul-helper.socket
  # A running helper keeps the old code: restart it after an upgrade.
  systemctl try-restart ipam-da-consul-helper.service
fi
echo "installed into $cni_bin; $bin/ipam-da-consul-admin is on PATH"
