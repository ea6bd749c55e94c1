#!/usr/bin/env bash
# Installs the Debian packages provisioner's tests and the lab need on a fresh Debian 12 host.
# Idempotent: a package already installed is not fetched again. Needs root (or sudo).
#   scripts/host-deps.sh          every package
#   scripts/host-deps.sh --build  only what `cargo build` needs (scripts/up installs the rest while it builds)
set -euo pipefail
only_build=0
[ "${1:-}" = "--build" ] && only_build=1

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

# qemu-system-x86 and libvirt come from bookworm-backports: the preinstalled qemu-utils 10.0 (backports)
# conflicts with bookworm's qemu-system 7.2, and libvirt and QEMU must come from the same suite.
BPO_LIST=/etc/apt/sources.list.d/provisioner-backports.sources
if [ ! -f "$BPO_LIST" ]; then
  mirror=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  mirror=${mirror:-http://deb.debian.org/debian}
  $SUDO tee "$BPO_LIST" >/dev/null <<SRC
Types: deb
URIs: $mirror
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi
# Pin only the hypervisor packages to backports; everything else (openssh, e2fsprogs, ...) stays on bookworm.
PIN=/etc/apt/preferences.d/provisioner-backports
if [ ! -f "$PIN" ]; then
  $SUDO tee "$PIN" >/dev/null <<PREF
Package: qemu-system* qemu-utils qemu-block-extra libvirt* seabios ipxe-qemu
Pin: release n=bookworm-backports
Pin-Priority: 990
PREF
fi

base_pkgs=(
  pkg-config libssl-dev                      # ssh2 -> libssh2 -> OpenSSL
  openssh-server openssh-client              # real sshd for transport tests, `provisioner ssh`
  prometheus prometheus-alertmanager prometheus-node-exporter   # live lab on loopback, promtool, amtool
  python3-flask python3-prometheus-client gunicorn               # the demo app on the host
  mmdebstrap debootstrap e2fsprogs           # box built from a Debian mirror (mmdebstrap: one apt run; debootstrap: the lab's base image); debugfs: keys into a Vagrant box disk
  genisoimage util-linux                     # isoinfo/blkid to read seeds back in tests
  python3-yaml                               # tests/seed.rs loads network-config with PyYAML, as cloud-init does
  curl ca-certificates iproute2 procps psmisc
  docker-compose                             # v1 1.29 as in the guest: tests/lab.rs parses the rendered compose file (no engine needed)
  docker-registry apache2-utils openssl      # tests/vm.rs: a real registry (Distribution 2.8) with TLS and htpasswd auth
)
bpo_pkgs=(
  qemu-system-x86 qemu-system-common qemu-system-data qemu-block-extra qemu-utils   # qemu-img: overlays, box checks; qemu-storage-daemon: keys into a Vagrant box disk
  libvirt-daemon-system libvirt-clients libvirt-daemon-driver-qemu libvirt-daemon
)

build_pkgs=(pkg-config libssl-dev)
what="packages"
if [ "$only_build" = 1 ]; then base_pkgs=("${build_pkgs[@]}"); bpo_pkgs=(); what="build packages"; fi
missing=()
for p in "${base_pkgs[@]}" "${bpo_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  $SUDO rm -f /etc/libvirt/qemu/networks/autostart/default.xml
  echo "host-deps: all $what present"; exit 0
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends -o Dpkg::Options::=--force-confold "${missing[@]}"
echo "host-deps: installed ${#missing[@]} package(s): ${missing[*]}"
# The libvirt packages define a "default" NAT network (virbr0, 192.168.122.0/24) that a system libvirtd would
# autostart. provisioner never uses it (user-mode networking, forwards on 127.0.0.1): keep it from starting.
$SUDO rm -f /etc/libvirt/qemu/networks/autostart/default.xml
