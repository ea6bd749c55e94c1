#!/usr/bin/env bash
# Runs a command in the Windows build-and-test environment (scripts/windows-env.sh makes it once), in the project
# directory, with what Debian 13's rustc-web needs to cross-build for Windows and Wine to run the result:
#   scripts/windows-run.sh <command> [args]
# The project is bind-mounted at its own path in a private mount namespace: nothing stays mounted afterwards, and
# the chroot sees only this project. Needs root (chroot, mount).
# Cargo's build dir is kept in the environment, like the box cache (/var/cache/provisioner-target in the chroot;
# PROVISIONER_WINDOWS_TARGET_DIR sets another): the Windows std and the vendored OpenSSL are built once per
# machine, not once per clone. Several clones share it (cargo locks it; scripts/windows-tier.sh rebuilds the
# project's own crates when the last build came from another clone).
set -euo pipefail
proj="$(cd "$(dirname "$0")/.." && pwd)"
root="$(bash "$proj/scripts/windows-env.sh")"
[ $# -ge 1 ] || { echo "usage: scripts/windows-run.sh <command> [args]" >&2; exit 2; }

export WIN_ROOT="$root" WIN_PROJ="$proj" WIN_TARGET="${PROVISIONER_WINDOWS_TARGET_DIR:-/var/cache/provisioner-target}"
exec unshare -m --propagation private bash -s -- "$@" <<'INNER'
set -euo pipefail
mkdir -p "$WIN_ROOT$WIN_PROJ" "$WIN_ROOT/proc" "$WIN_ROOT/dev" "$WIN_ROOT$WIN_TARGET"
mount --bind "$WIN_PROJ" "$WIN_ROOT$WIN_PROJ"
mount -t proc proc "$WIN_ROOT/proc"
mount --rbind /dev "$WIN_ROOT/dev"
proxy=()
for v in http_proxy https_proxy HTTP_PROXY HTTPS_PROXY no_proxy NO_PROXY; do
  [ -n "${!v:-}" ] && proxy+=("$v=${!v}")
done
exec chroot "$WIN_ROOT" /usr/bin/env -i "${proxy[@]}" \
  HOME=/root PATH=/usr/bin:/bin TERM="${TERM:-dumb}" \
  RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc RUSTC_BOOTSTRAP=1 \
  CARGO_HTTP_CAINFO=/etc/host-ca.pem SSL_CERT_FILE=/etc/host-ca.pem \
  CARGO_TARGET_DIR="$WIN_TARGET" \
  CARGO_TARGET_X86_64_PC_WINDOWS_GNU_LINKER=x86_64-w64-mingw32-gcc \
  CARGO_TARGET_X86_64_PC_WINDOWS_GNU_RUNNER=wine \
  WINEDEBUG=-all WINEPREFIX=/root/.wine WINEDLLOVERRIDES="mscoree,mshtml=" \
  sh -c 'cd "$0" && exec "$@"' "$WIN_PROJ" "$@"
INNER
