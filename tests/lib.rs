//! One integration test binary (faster to link than many), with shared fixtures in `support`.
//!
//! Tiers: plain tests are the fast tier (< 10 min, real sshd / promtool / live lab on loopback); tests marked
//! `#[ignore = "vm: ..."]` need a real libvirt + QEMU guest and run with `scripts/test --vm`
//! (`cargo nextest run --run-ignored only`).

mod support;

// Modules marked `#[cfg(unix)]` cannot even compile for Windows (the Windows tier under Wine): each says why.

mod architecture;
mod boxes;
mod cli;
mod config;
// windows: builds the base image with debootstrap (root, Linux) and probes a real Prometheus binary.
#[cfg(unix)]
mod guest;
// windows: makes its disks with mkfs.ext4 and qemu-img and edits them with qemu-storage-daemon and debugfs (Linux
// tools; the disk route is libvirt-only, and libvirt is Linux-only).
#[cfg(unix)]
mod inject;
// windows: checks the rendered lab with promtool, amtool and docker-compose (Linux binaries) and Unix file modes.
#[cfg(unix)]
mod lab;
// windows: runs the live lab stack (Prometheus, Grafana, ... binaries) on a Linux host.
#[cfg(unix)]
mod live_stack;
mod multi;
// windows: the registry cases of the whole-lab VM test (a libvirt guest, Linux only).
#[cfg(unix)]
mod registry_vm;
// windows: a remote libvirt host over a Unix sshd; libvirt is Linux-only.
#[cfg(unix)]
mod remote;
mod render;
// windows: reads the seed image back with isoinfo and blkid (Linux tools).
#[cfg(unix)]
mod seed;
mod snapshots;
// windows: needs an OpenSSH sshd (Unix) for the guest session and ControlMaster (none on Windows).
#[cfg(unix)]
mod ssh;
mod virtualbox;
// windows: the VM tier: libvirt + QEMU guests (Linux only).
#[cfg(unix)]
mod vm;
// The Windows build through real parts under Wine (ed25519 SSH, console Ctrl-C, Job Objects); Windows only: their
// Unix sides are in ssh.rs and the SIGINT tests of boxes.rs and guest.rs.
#[cfg(windows)]
mod windows;
