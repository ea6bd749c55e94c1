#!/usr/bin/env bash
# Makes (once) the Windows build-and-test environment of ../shared/DESIGN.md §9: a Debian 13 chroot with Debian's
# rustc-web + rust-web-src (builds the Windows std with -Zbuild-std; no Rust target can be downloaded here),
# mingw-w64 (links), Wine 10 (runs the .exe; Debian 12's Wine 8 cannot load a current Rust std) and OpenSSH's sshd
# (the tier's ed25519 SSH test: provisioner.exe's own SSH code against a real server on 127.0.0.1).
# Idempotent: a complete chroot (marker file) is kept, like an installed package. Prints the chroot's path.
#   PROVISIONER_WINDOWS_CHROOT   where it lives (default /var/cache/provisioner/windows-trixie)
set -euo pipefail

root="${PROVISIONER_WINDOWS_CHROOT:-/var/cache/provisioner/windows-trixie}"
marker="$root/.provisioner-windows-env-v4"
if [ -f "$marker" ]; then echo "$root"; exit 0; fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
command -v debootstrap >/dev/null || { $SUDO apt-get update -qq; $SUDO apt-get install -y -qq debootstrap; }

mirror=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
mirror=${mirror:-http://deb.debian.org/debian}

if [ ! -x "$root/usr/bin/apt-get" ] || [ ! -f "$root/.debootstrap-done" ]; then
  $SUDO rm -rf "$root"
  $SUDO mkdir -p "$(dirname "$root")"
  echo "windows-env: debootstrap trixie into $root (about 3 min)" >&2
  $SUDO debootstrap --variant=minbase --include=ca-certificates trixie "$root" "$mirror" >&2
  $SUDO touch "$root/.debootstrap-done"
fi

# DNS and the host's CA bundle (the registries are reached through the host's proxy settings, if any).
$SUDO cp -L /etc/resolv.conf "$root/etc/resolv.conf" 2>/dev/null || true
if [ -n "${SSL_CERT_FILE:-}" ] && [ -f "$SSL_CERT_FILE" ]; then
  $SUDO cp -L "$SSL_CERT_FILE" "$root/etc/host-ca.pem"
else
  $SUDO cp -L /etc/ssl/certs/ca-certificates.crt "$root/etc/host-ca.pem"
fi

env_pass=()
for v in http_proxy https_proxy HTTP_PROXY HTTPS_PROXY no_proxy NO_PROXY; do
  [ -n "${!v:-}" ] && env_pass+=("$v=${!v}")
done
echo "windows-env: installing rustc-web, rust-web-src, mingw-w64, wine, openssh-server (about 355 MB)" >&2
# Packages never start services here (the chroot shares the host's network: no sshd on port 22); the tier starts
# its own sshd on 127.0.0.1 and stops it.
printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$root/usr/sbin/policy-rc.d" >/dev/null
$SUDO chmod 755 "$root/usr/sbin/policy-rc.d"
$SUDO chroot "$root" env DEBIAN_FRONTEND=noninteractive "${env_pass[@]}" sh -c '
  apt-get update -qq &&
  apt-get install -y -qq --no-install-recommends rustc-web cargo-web rust-web-src rust-web-clippy gcc-mingw-w64-x86-64 \
    wine wine64 perl make python3 ca-certificates openssh-server systemd-standalone-sysusers >/dev/null' >&2
$SUDO touch "$marker"
echo "$root"
