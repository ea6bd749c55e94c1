#!/bin/sh
# Build the lab's container base image rootfs on the HOST and write it as a tarball for `docker import`.
# Usage: base-image.sh SUITE MIRROR OUT.tar SETUP PACKAGE...
# SETUP: shell commands (the profile's) run as root inside the rootfs once the packages are in: the users, dirs and
# ownership the Dockerfiles would otherwise make in RUN steps, each a container started in the TCG guest. Empty: none.
# Runs as root (debootstrap needs it). The rootfs is trimmed (docs, man pages, locales, apt lists) to keep the
# import into the guest short: `docker import` cost there is bound by the size.
set -eu
suite=$1 mirror=$2 out=$3 setup=$4
shift 4
pkgs=$(echo "$@" | tr ' ' ',')
work=$(mktemp -d "${out}.work.XXXXXX")
trap 'rm -rf "$work"' EXIT
root="$work/rootfs"
debootstrap --variant=minbase --include="$pkgs" "$suite" "$root" "$mirror"
# Python byte-code caches, before the setup: Debian's postinst compiled every installed module (tens of MB, and
# `docker import` in the guest costs by the size); a setup that wants some compiled ahead (what its services import)
# does so itself, and what it writes stays.
find "$root/usr/lib" -name '__pycache__' -type d -prune -exec rm -rf {} +
if [ -n "$setup" ]; then
  # With the rootfs' own environment, not the caller's (a PYTHONDONTWRITEBYTECODE there compiled nothing).
  chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LC_ALL=C.UTF-8 /bin/sh -eu -c "$setup"
fi
# Trim what a container never needs.
rm -rf "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/* \
  "$root"/usr/share/lintian "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
  "$root"/var/cache/debconf/*-old "$root"/var/lib/dpkg/*-old "$root"/var/log/* "$root"/tmp/* "$root"/root/.bash_history
# 212 MB of raw time-zone data the Prometheus web UI never loads (it uses moment-timezone-with-data.min.js).
rm -rf "$root"/usr/share/javascript/moment-timezone/data
# Services run in containers, never through init scripts.
rm -f "$root"/etc/machine-id
: > "$root"/etc/machine-id
tar --numeric-owner --xattrs -C "$root" -cf "$work/rootfs.tar" .
mv "$work/rootfs.tar" "$out"
