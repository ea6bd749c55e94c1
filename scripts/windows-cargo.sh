#!/usr/bin/env bash
# cargo for x86_64-pc-windows-gnu in the Windows environment (scripts/windows-run.sh): Debian's rustc-web builds
# the Windows std from source (-Zbuild-std; no Rust target can be downloaded here), mingw-w64 links, Wine runs tests.
#   scripts/windows-cargo.sh build|check|clippy|test ... [cargo args]      (build dir: see windows-run.sh)
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: scripts/windows-cargo.sh <cargo subcommand> [args]" >&2; exit 2; }
sub="$1"; shift
std_crates="std,panic_abort"
[ "$sub" = test ] && std_crates="std,panic_abort,test"
exec bash "$(dirname "$0")/windows-run.sh" /usr/bin/cargo "$sub" -Zbuild-std="$std_crates" \
  --target x86_64-pc-windows-gnu "$@"
