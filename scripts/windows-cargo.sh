#!/usr/bin/env bash
# Runs cargo for x86_64-pc-windows-gnu inside the Windows environment (scripts/windows-env.sh makes it once):
# Debian 13's rustc-web builds the Windows std from source (-Zbuild-std), mingw-w64 links, Wine 10 runs tests.
#   scripts/windows-cargo.sh build|check|clippy|test|nextest ... [cargo args]
# The project is bind-mounted at its own path in a private mount namespace (nothing stays mounted afterwards);
# the build goes to target/windows. Needs root (chroot, mount).
set -euo pipefail
proj="$(cd "$(dirname "$0")/.." && pwd)"
root="$(bash "$proj/scripts/windows-env.sh")"
[ $# -ge 1 ] || { echo "usage: scripts/windows-cargo.sh <cargo subcommand> [args]" >&2; exit 2; }
sub="$1"; shift
std_crates="std,panic_abort"
case "$sub" in test|nextest) std_crates="std,panic_abort,test" ;; esac

export WIN_ROOT="$root" WIN_PROJ="$proj" WIN_SUB="$sub" WIN_STD="$std_crates"
exec unshare -m --propagation private bash -s -- "$@" <<'INNER'
set -euo pipefail
mkdir -p "$WIN_ROOT$WIN_PROJ" "$WIN_ROOT/proc" "$WIN_ROOT/dev" "$WIN_ROOT/tmp"
mount --bind "$WIN_PROJ" "$WIN_ROOT$WIN_PROJ"
mount -t proc proc "$WIN_ROOT/proc"
mount --rbind /dev "$WIN_ROOT/dev"
# Anything the tests share with the host side (a double's state, logs) lives under the project's target dir.
cd "$WIN_PROJ"
exec chroot "$WIN_ROOT" /usr/bin/env -i \
  HOME=/root PATH=/usr/bin:/bin TERM="${TERM:-dumb}" \
  RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1 RUSTDOC=/usr/bin/rustdoc \
  CARGO_HTTP_CAINFO=/etc/host-ca.pem SSL_CERT_FILE=/etc/host-ca.pem \
  CARGO_TARGET_DIR="$WIN_PROJ/target/windows" \
  CARGO_TARGET_X86_64_PC_WINDOWS_GNU_LINKER=x86_64-w64-mingw32-gcc \
  CARGO_TARGET_X86_64_PC_WINDOWS_GNU_RUNNER=wine \
  WINEDEBUG=-all WINEPREFIX=/root/.wine WINEDLLOVERRIDES="mscoree,mshtml=" \
  ${http_proxy:+http_proxy=$http_proxy} ${https_proxy:+https_proxy=$https_proxy} \
  ${HTTP_PROXY:+HTTP_PROXY=$HTTP_PROXY} ${HTTPS_PROXY:+HTTPS_PROXY=$HTTPS_PROXY} \
  ${NO_PROXY:+NO_PROXY=$NO_PROXY} ${no_proxy:+no_proxy=$no_proxy} \
  PROVISIONER_WINDOWS_TIER=1 \
  sh -c 'cd "$0" && sub="$1" std="$2" && shift 2 && exec /usr/bin/cargo "$sub" -Zbuild-std="$std" --target x86_64-pc-windows-gnu "$@"' \
  "$WIN_PROJ" "$WIN_SUB" "$WIN_STD" "$@"
INNER
