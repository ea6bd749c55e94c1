#!/usr/bin/env bash
# The Windows tier, run INSIDE the Windows environment by `scripts/test --windows` (through scripts/windows-run.sh):
# cross-builds provisioner for x86_64-pc-windows-gnu, lints it for that target with warnings denied, and runs the
# unit tests and the non-VM integration tests under Wine. Tests that cannot run under Wine are ignored with a
# "windows: <reason>" and counted as skipped, never as passed; the VM tier's tests are ignored here as on Linux.
# Beside the tests run the VBoxManage double's server and a real OpenSSH sshd on 127.0.0.1 (tests/windows.rs: ed25519
# SSH through provisioner's own session), both stopped by their pids at the end.
set -euo pipefail
target=x86_64-pc-windows-gnu
xcargo() { local sub=$1; shift; cargo "$sub" -Zbuild-std="$std" --target "$target" "$@"; }
t0=$(date +%s)

# Cargo's build dir is shared by every clone on this machine (scripts/windows-run.sh), and cargo keeps a crate's
# build while no source file is newer than it, wherever the sources are: a clone whose files are older than another
# clone's last build would run that build, whose CARGO_MANIFEST_DIR is the other clone's (its tests then miss their
# fixtures: seen at stop 30). When the last build came from another directory, this project's sources are touched,
# so its crates are built again (the Windows std and the dependencies stay built).
stamp="$CARGO_TARGET_DIR/last-project"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$PWD" ]; then
  find src tests benches examples -name '*.rs' -exec touch {} + 2>/dev/null || true
  mkdir -p "$CARGO_TARGET_DIR"
  echo "$PWD" >"$stamp"
fi

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
sshdir=$(mktemp -d /tmp/winsshd.XXXXXX)
server="" sshd=""
cleanup() {
  for pid in $server $sshd; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$portfile" "$sshdir"
}
trap cleanup EXIT
python3 tests/fixtures/vbox/winserver.py "$portfile" &
server=$!
# A real OpenSSH sshd on 127.0.0.1 for the ed25519 SSH test (tests/windows.rs): host and user keys ed25519, made
# here; only ssh-ed25519 host keys, ed25519 user keys and curve25519 key exchange offered; stopped by its pid.
ssh-keygen -q -t ed25519 -N '' -C windows-tier-host -f "$sshdir/host_ed25519"
ssh-keygen -q -t ed25519 -N '' -C windows-tier-user -f "$sshdir/id_ed25519"
cp "$sshdir/id_ed25519.pub" "$sshdir/authorized_keys"
sshport=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat > "$sshdir/sshd_config" <<EOF
Port $sshport
ListenAddress 127.0.0.1
HostKey $sshdir/host_ed25519
HostKeyAlgorithms ssh-ed25519
KexAlgorithms curve25519-sha256,curve25519-sha256@libssh.org
PubkeyAcceptedAlgorithms ssh-ed25519
AuthorizedKeysFile $sshdir/authorized_keys
PidFile $sshdir/sshd.pid
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
AllowUsers $(id -un)
EOF
mkdir -p /run/sshd
/usr/sbin/sshd -D -e -f "$sshdir/sshd_config" 2>"$sshdir/sshd.log" &
sshd=$!
for _ in $(seq 100); do [ -s "$portfile" ] && break; kill -0 "$server" || exit 1; sleep 0.1; done
[ -s "$portfile" ] || { echo "windows tier: the double's server did not start" >&2; exit 1; }
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$sshport") 2>/dev/null && break; kill -0 "$sshd" || break; sleep 0.1; done
(exec 3<>"/dev/tcp/127.0.0.1/$sshport") 2>/dev/null ||
  { echo "windows tier: sshd did not start:" >&2; cat "$sshdir/sshd.log" >&2; exit 1; }
winpath() { echo "Z:$(echo "$1" | tr / '\\')"; }
shim="$(winpath "$CARGO_TARGET_DIR/$target/debug/vboxmanage-winshim.exe")"
log=$(mktemp /tmp/windows-tier.XXXXXX.log)
set +e
VBOXDOUBLE_SERVER="127.0.0.1:$(cat "$portfile")" PROVISIONER_VBOX_SHIM="$shim" \
  PROVISIONER_TEST_SSHD="127.0.0.1:$sshport" PROVISIONER_TEST_SSHD_USER="$(id -un)" \
  PROVISIONER_TEST_SSHD_KEY="$(winpath "$sshdir/id_ed25519")" \
  PROVISIONER_TEST_SSHD_PIN="$(cut -d' ' -f1,2 "$sshdir/host_ed25519.pub")" \
  xcargo test --locked --no-fail-fast -- --test-threads=2 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
[ "$rc" -eq 0 ] || { echo "--- sshd log (tail)"; tail -20 "$sshdir/sshd.log"; }
t_test=$(date +%s)

# The count, from libtest's own result lines; skips by reason.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i;
                        if ($(i+1) ~ /^ignored/) ig += $i } }
     END { printf "windows tier: %d tests passed under Wine, %d failed, %d skipped\n", p, f, ig }' "$log"
grep -o 'ignored, windows: .*' "$log" | sed 's/^ignored, //' | sort | uniq -c | sort -rn | sed 's/^/  skipped: /' || true
echo "  skipped as VM tier (run on Linux by scripts/test --vm): $(grep -c 'ignored, vm:' "$log" || true)"
echo "  Windows-only checks (ed25519 SSH to a real sshd, console Ctrl-C, Job Objects):"
grep -E '^test windows::' "$log" | sed 's/^test /    /' || echo "    none ran"
echo "windows tier: build $((t_build - t0)) s, clippy $((t_lint - t_build)) s, tests $((t_test - t_lint)) s"
exit "$rc"
