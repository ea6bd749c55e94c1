#!/bin/sh
# Turns a debootstrapped Debian rootfs into a cloud-style image that boots without a bootloader.
# Run by provisioner as `chroot ROOTFS /bin/sh /provisioner-configure.sh [EXTRA_PACKAGE...]` (as root, on the host).
# Nothing here starts a service: units are enabled by symlink, no systemctl (the host has no systemd).
set -eu
export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 PATH=/usr/sbin:/usr/bin:/sbin:/bin

if [ "$#" -gt 0 ]; then
    echo "== installing extra packages: $*"
    # Keep package scripts from starting daemons in the chroot.
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 0755 /usr/sbin/policy-rc.d
    apt-get update -o Acquire::Languages=none
    apt-get install -y --no-install-recommends -o Dpkg::Options::=--force-confold "$@"
    rm -f /usr/sbin/policy-rc.d
fi

echo "== network: systemd-networkd (DHCP on en* eth*) + systemd-resolved"
mkdir -p /etc/systemd/network
cat >/etc/systemd/network/20-provisioner-dhcp.network <<'EOF'
[Match]
Name=en* eth*

[Network]
DHCP=yes
EOF
enable() { # enable UNIT-FILE WANTED-BY-DIR [LINK-NAME]
    [ -e "/lib/systemd/system/$1" ] || { echo "missing unit $1" >&2; exit 1; }
    mkdir -p "/etc/systemd/system/$2"
    ln -sf "/lib/systemd/system/$1" "/etc/systemd/system/$2/${3:-$1}"
}
enable systemd-networkd.service multi-user.target.wants
enable systemd-networkd.socket sockets.target.wants
enable systemd-networkd-wait-online.service network-online.target.wants
enable systemd-resolved.service multi-user.target.wants
enable serial-getty@.service getty.target.wants serial-getty@ttyS0.service
ln -sf /lib/systemd/system/systemd-networkd.service /etc/systemd/system/dbus-org.freedesktop.network1.service
ln -sf /lib/systemd/system/systemd-resolved.service /etc/systemd/system/dbus-org.freedesktop.resolve1.service
ln -sf ../run/systemd/resolve/stub-resolv.conf /etc/resolv.conf

echo "== cloud-init: NoCloud seed, else nothing"
mkdir -p /etc/cloud/cloud.cfg.d
# After 90_dpkg.cfg (which sets the list Debian's debconf chose), so this one wins.
cat >/etc/cloud/cloud.cfg.d/99-provisioner.cfg <<'EOF'
datasource_list: [ NoCloud, None ]
EOF

echo "== fstab, hostname, machine-id, host keys"
cat >/etc/fstab <<'EOF'
LABEL=rootfs / ext4 defaults,errors=remount-ro 0 1
EOF
echo localhost >/etc/hostname
: >/etc/machine-id
mkdir -p /var/lib/dbus && rm -f /var/lib/dbus/machine-id
ln -s /etc/machine-id /var/lib/dbus/machine-id
# Every machine gets its own host key from its cloud-init seed: none may be baked into the box.
rm -f /etc/ssh/ssh_host_*

echo "== sshd: the message of the day from sshd (interactive logins), not from PAM (every session)"
# Debian's PAM stack runs /etc/update-motd.d (run-parts, a shell, uname) whenever an SSH session opens, one that
# only runs a command included: three process starts on every connection, 0.1 s of a TCG guest's time (more on a
# guest just restored from memory, where every program runs cold). sshd's own PrintMotd shows /etc/motd to
# interactive logins only. (The listing's Include comes first in Debian's sshd_config, so this value wins.)
sed -i 's/^session[[:space:]]*optional[[:space:]]*pam_motd\.so/# provisioner: sshd PrintMotd instead: &/' /etc/pam.d/sshd
grep -q '^session[[:space:]]*optional[[:space:]]*pam_motd' /etc/pam.d/sshd && { echo "pam_motd still in /etc/pam.d/sshd" >&2; exit 1; }
mkdir -p /etc/ssh/sshd_config.d
echo 'PrintMotd yes' >/etc/ssh/sshd_config.d/10-provisioner.conf

echo "== cleaning apt"
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/*.log /var/log/apt/* /tmp/* /var/tmp/*
echo "== configured"
