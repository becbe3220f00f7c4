#!/usr/bin/env bash
# Fetches a real Consul binary (Debian bullseye's package, 1.8.7) into .cache/consul
# without touching the system's apt configuration. Prints the binary's path.
# Bookworm has no consul package, so we borrow bullseye's archive from the same mirror.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
d="$root/.cache/consul"
bin="$d/x/usr/bin/consul"
if [ -x "$bin" ]; then echo "$bin"; exit 0; fi
if command -v consul >/dev/null 2>&1; then command -v consul; exit 0; fi
mkdir -p "$d/lists/partial"
mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
if [ -z "$mirror" ]; then
  mirror=$(awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) { print $i; exit } }' /etc/apt/sources.list 2>/dev/null)
fi
mirror=${mirror:-http://deb.debian.org/debian}
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] ${mirror%/} bullseye main" > "$d/sources.list"
o=(-o "Dir::Etc::sourcelist=$d/sources.list" -o "Dir::Etc::sourceparts=-" -o "Dir::State::Lists=$d/lists")
apt-get "${o[@]}" -qq update >&2
(cd "$d" && apt-get "${o[@]}" -qq download consul >&2)
dpkg -x "$d"/consul_*.deb "$d/x"
"$bin" version >&2
echo "$bin"
