//! Helpers shared by the benchmarks that drive the real binary.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_provisioner"))
}

/// A free TCP port on 127.0.0.1 (bound then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Run the binary in `dir` and capture its output.
pub fn run(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(bin()).args(args).current_dir(dir).output().expect("run provisioner")
}
