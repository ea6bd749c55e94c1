//! One integration test binary (faster to link than many), with shared fixtures in `support`.
//!
//! Tiers: plain tests are the fast tier (< 10 min, real sshd / promtool / live lab on loopback); tests marked
//! `#[ignore = "vm: ..."]` need a real libvirt + QEMU guest and run with `scripts/test --vm`
//! (`cargo nextest run --run-ignored only`).

mod support;

mod architecture;
mod boxes;
mod cli;
mod config;
mod guest;
mod inject;
mod lab;
mod live_stack;
mod multi;
mod registry_vm;
mod remote;
mod render;
mod seed;
mod snapshots;
mod ssh;
mod virtualbox;
mod vm;
