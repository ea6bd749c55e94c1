#!/usr/bin/env bash
# The first-run rows of issue 21 (scripts/bench first_run), each measured within this one run:
#   1. a clean `cargo build --release --locked` (its own CARGO_TARGET_DIR): wall and CPU seconds, and the crates
#      in the build graph (`cargo tree | wc -l`);
#   2. the lab's box built from the Debian mirror with mmdebstrap and with debootstrap (PROVISIONER_BOX_BOOTSTRAP),
#      each into a cache of its own (the shared box cache is not touched), back to back: phase times and ratio;
#   3. (opt-in: FIRST_RUN_ROWS="... up") the whole first run: README's scripts/up in a scratch copy of the repo (no
#      target/, so cargo builds from nothing), an empty PROVISIONER_CACHE_DIR and PREFIX, to the health table; the
#      phase times, then `destroy -f`. About 10-20 min more.
# FIRST_RUN_ROWS picks rows (default "build box"; "up" alone, or "build box up" for all three).
# Needs root (the box build) and the host packages; about 20-60 min on a 2-core host, most of it the two builds.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d "${TMPDIR:-/var/tmp}/provisioner-bench-first-run.XXXXXX")
trap 'rm -rf "$work"' EXIT
load() { cut -d' ' -f1-3 /proc/loadavg; }
rows=" ${FIRST_RUN_ROWS:-build box} "
for row in $rows; do
  case "$row" in
    build | box | up) ;;
    *) echo "bench-first-run: no row named $row in FIRST_RUN_ROWS; rows: build box up" >&2; exit 2 ;;
  esac
done
# The phase lines of a `--json` run: where its time went.
phases() {
  python3 - "$1" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    try:
        e = json.loads(line)
    except ValueError:
        continue
    if e.get("event") == "phase_end":
        print(f"  {e['phase']}: {e['seconds']:.1f} s")
PY
}

if [[ $rows == *" up "* ]]; then
  echo "-- first run: scripts/up in a scratch copy, empty cache (load average $(load))"
  repo="$work/up-repo"
  mkdir -p "$repo"
  tar --exclude=./target --exclude=./.git --exclude=./.provisioner -cf - . | tar -C "$repo" -xf -
  # Free host ports instead of the fixed ones, so a lab already running here does not collide.
  python3 - "$repo/box-config.toml" <<'PY'
import re, socket, sys
def free():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
p = sys.argv[1]
text = re.sub(r"^host_port = \d+", "host_port = 0", open(p).read(), flags=re.M)
text = re.sub(r"^host = \d+", lambda m: f"host = {free()}", text, flags=re.M)
open(p, "w").write(text)
PY
  start=$EPOCHREALTIME
  rc=0
  (cd "$repo" && env -u CARGO_TARGET_DIR PROVISIONER_CACHE_DIR="$work/up-cache" PREFIX="$work/up-prefix" \
    bash scripts/up --json >"$work/up.json" 2>"$work/up.err") || rc=$?
  took=$(awk "BEGIN{print $EPOCHREALTIME - $start}")
  grep -h '^up: \(cargo build took\|waited\)' "$work/up.json" | sed 's/^/  /' || true
  phases "$work/up.json"
  # The lab's capture (`cache lab`) runs after the table is printed: the user has the table that much sooner.
  capture=$(phases "$work/up.json" | awk '$1 == "cache" && $2 == "lab:" {s += $3} END {print s + 0}')
  printf 'first run, scripts/up: %.1f s to the health table, %.1f s with the lab capture after it, exit %s (load average %s)\n' \
    "$(awk "BEGIN{print $took - $capture}")" "$took" "$rc" "$(load)"
  (cd "$repo" && PROVISIONER_CACHE_DIR="$work/up-cache" "$work/up-prefix/bin/provisioner" destroy -f >/dev/null) ||
    echo "bench-first-run: destroy -f failed in $repo" >&2
  if [ "$rc" -ne 0 ]; then
    tail -25 "$work/up.err" >&2
    exit 1
  fi
fi
[[ $rows == *" build "* || $rows == *" box "* ]] || exit 0

if [[ $rows == *" build "* ]]; then
  echo "-- clean cargo build --release (load average $(load))"
  crates=$(cargo tree --locked 2>/dev/null | wc -l)
  TIMEFORMAT='%R %U %S'
  { time CARGO_TARGET_DIR="$work/target" cargo build --release --locked --quiet 2>"$work/build.err"; } 2>"$work/time" ||
    { cat "$work/build.err" >&2; exit 1; }
  read -r wall user sys <"$work/time"
  echo "cargo build --release: ${wall} s wall, $(awk "BEGIN{print $user + $sys}") s CPU; cargo tree: $crates lines (load average $(load))"
  bin="$work/target/release/provisioner"
else
  cargo build --release --locked --quiet
  bin="$(pwd)/${CARGO_TARGET_DIR:-target}/release/provisioner"
fi
[[ $rows == *" box "* ]] || exit 0

mkdir -p "$work/lab"
cp -r box-config.toml provision "$work/lab/"
declare -A took
for tool in mmdebstrap debootstrap; do
  echo "-- box build with $tool (load average $(load))"
  start=$EPOCHREALTIME
  (cd "$work/lab" && PROVISIONER_CACHE_DIR="$work/cache-$tool" PROVISIONER_BOX_BOOTSTRAP=$tool \
    "$bin" --json box build >"$work/$tool.json")
  took[$tool]=$(awk "BEGIN{print $EPOCHREALTIME - $start}")
  phases "$work/$tool.json"
  printf 'box build with %s: %.1f s\n' "$tool" "${took[$tool]}"
done
printf 'box build mmdebstrap / debootstrap = %.2f (load average %s)\n' \
  "$(awk "BEGIN{print ${took[mmdebstrap]} / ${took[debootstrap]}}")" "$(load)"
