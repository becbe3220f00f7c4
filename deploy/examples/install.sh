#!/usr/bin/env bash
# Install the single-file plugin and the on-demand helper on a host (run as root, from the
# repository after `bash scripts/build-plugin.sh`, or with the four files next to deploy/).
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
dist=${DIST:-$here/dist}
install -d -m 0755 /opt/cni/bin
for f in ipam-da-consul ipam-da-consul-verbose ipam-da-consul-admin ipam-da-consul-helper; do
  install -m 0755 "$dist/$f" "/opt/cni/bin/$f"
done
if [ -d /run/systemd/system ]; then
  install -m 0644 "$here/deploy/systemd/ipam-da-consul-helper.socket" \
    "$here/deploy/systemd/ipam-da-consul-helper.service" /etc/systemd/system/
  systemctl daemon-reload
  systemctl enable --now ipam-da-consul-helper.socket
  # A running helper keeps the old code: restart it after an upgrade.
  systemctl try-restart ipam-da-consul-helper.service
fi
echo "installed into /opt/cni/bin"
