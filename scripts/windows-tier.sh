#!/usr/bin/env bash
# The Windows tier, run INSIDE the Windows environment by `scripts/test --windows` (through scripts/windows-run.sh):
# cross-builds provisioner for x86_64-pc-windows-gnu, lints it for that target with warnings denied, and runs the
# unit tests and the non-VM integration tests under Wine. Tests that cannot run under Wine are ignored with a
# "windows: <reason>" and counted as skipped, never as passed; the VM tier's tests are ignored here as on Linux.
set -euo pipefail
target=x86_64-pc-windows-gnu
xcargo() { local sub=$1; shift; cargo "$sub" -Zbuild-std="$std" --target "$target" "$@"; }
t0=$(date +%s)

std=std,panic_abort
echo "== windows: the VBoxManage.exe shim (std from source and vendored OpenSSL come next: slow the first time)"
xcargo build --locked --manifest-path tests/fixtures/vbox/winshim/Cargo.toml
t_build=$(date +%s)

echo "== windows: clippy for $target (warnings denied)"
xcargo clippy --locked --all-targets --quiet -- -D warnings
t_lint=$(date +%s)

echo "== windows: tests under Wine"
std=std,panic_abort,test
xcargo test --locked --no-run 2>&1 | tail -3   # builds provisioner.exe too (the integration tests run it)
# The VBoxManage double's Windows side: the shim forwards to this server, which runs the Python double.
portfile=$(mktemp -u /tmp/winserver.XXXXXX)
python3 tests/fixtures/vbox/winserver.py "$portfile" &
server=$!
trap 'kill "$server" 2>/dev/null || true; rm -f "$portfile"' EXIT
for _ in $(seq 100); do [ -s "$portfile" ] && break; kill -0 "$server" || exit 1; sleep 0.1; done
[ -s "$portfile" ] || { echo "windows tier: the double's server did not start" >&2; exit 1; }
shim="Z:$(echo "$CARGO_TARGET_DIR" | tr / '\\')\\$target\\debug\\vboxmanage-winshim.exe"
log=$(mktemp /tmp/windows-tier.XXXXXX.log)
set +e
VBOXDOUBLE_SERVER="127.0.0.1:$(cat "$portfile")" PROVISIONER_VBOX_SHIM="$shim" \
  xcargo test --locked --no-fail-fast -- --test-threads=2 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
t_test=$(date +%s)

# The count, from libtest's own result lines; skips by reason.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i;
                        if ($(i+1) ~ /^ignored/) ig += $i } }
     END { printf "windows tier: %d tests passed under Wine, %d failed, %d skipped\n", p, f, ig }' "$log"
grep -o 'ignored, windows: .*' "$log" | sed 's/^ignored, //' | sort | uniq -c | sort -rn | sed 's/^/  skipped: /' || true
echo "  skipped as VM tier (run on Linux by scripts/test --vm): $(grep -c 'ignored, vm:' "$log" || true)"
echo "windows tier: build $((t_build - t0)) s, clippy $((t_lint - t_build)) s, tests $((t_test - t_lint)) s"
exit "$rc"
