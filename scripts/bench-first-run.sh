#!/usr/bin/env bash
# The first-run rows of issue 21 (scripts/bench first_run), each measured within this one run:
#   1. a clean `cargo build --release --locked` (its own CARGO_TARGET_DIR): wall and CPU seconds, and the crates
#      in the build graph (`cargo tree | wc -l`);
#   2. the lab's box built from the Debian mirror with mmdebstrap and with debootstrap (PROVISIONER_BOX_BOOTSTRAP),
#      each into a cache of its own (the shared box cache is not touched), back to back: phase times and ratio.
# Needs root (the box build) and the host packages; about 20-60 min on a 2-core host, most of it the two builds.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d "${TMPDIR:-/var/tmp}/provisioner-bench-first-run.XXXXXX")
trap 'rm -rf "$work"' EXIT
load() { cut -d' ' -f1-3 /proc/loadavg; }

echo "-- clean cargo build --release (load average $(load))"
crates=$(cargo tree --locked 2>/dev/null | wc -l)
TIMEFORMAT='%R %U %S'
{ time CARGO_TARGET_DIR="$work/target" cargo build --release --locked --quiet 2>"$work/build.err"; } 2>"$work/time" ||
  { cat "$work/build.err" >&2; exit 1; }
read -r wall user sys <"$work/time"
echo "cargo build --release: ${wall} s wall, $(awk "BEGIN{print $user + $sys}") s CPU; cargo tree: $crates lines (load average $(load))"

bin="$work/target/release/provisioner"
mkdir -p "$work/lab"
cp -r box-config.toml provision "$work/lab/"
declare -A took
for tool in mmdebstrap debootstrap; do
  echo "-- box build with $tool (load average $(load))"
  start=$EPOCHREALTIME
  (cd "$work/lab" && PROVISIONER_CACHE_DIR="$work/cache-$tool" PROVISIONER_BOX_BOOTSTRAP=$tool \
    "$bin" --json box build >"$work/$tool.json")
  took[$tool]=$(awk "BEGIN{print $EPOCHREALTIME - $start}")
  # The phase lines of the build: where its time went.
  python3 - "$work/$tool.json" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    try:
        e = json.loads(line)
    except ValueError:
        continue
    if e.get("event") == "phase_end":
        print(f"  {e['phase']}: {e['seconds']:.1f} s")
PY
  printf 'box build with %s: %.1f s\n' "$tool" "${took[$tool]}"
done
printf 'box build mmdebstrap / debootstrap = %.2f (load average %s)\n' \
  "$(awk "BEGIN{print ${took[mmdebstrap]} / ${took[debootstrap]}}")" "$(load)"
