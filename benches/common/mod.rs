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

/// A temp project with the repo's lab: `provision/` copied and box-config.toml's text with the machine renamed to
/// `name` and every host port (SSH and the lab's forwards) replaced by a distinct free one. The caller may edit the
/// text further, then writes it to `dir/box-config.toml`.
pub fn lab_project(name: &str) -> (tempfile::TempDir, String) {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().expect("tempdir");
    let status = Command::new("cp").arg("-r").arg(repo.join("provision")).arg(dir.path()).status();
    assert!(status.map(|s| s.success()).unwrap_or(false), "copy provision/");
    let mut cfg = std::fs::read_to_string(repo.join("box-config.toml")).expect("box-config.toml");
    // Listeners held until every port is picked, so no port is handed out twice.
    let held: Vec<std::net::TcpListener> =
        (0..7).map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0")).collect();
    let mut ports = held.iter().map(|l| l.local_addr().expect("local addr").port());
    cfg = cfg.replace("host_port = 2222", &format!("host_port = {}", ports.next().unwrap()));
    for p in [8000, 9090, 9093, 3000, 9100, 8080] {
        cfg = cfg.replace(&format!("host = {p}\n"), &format!("host = {}\n", ports.next().unwrap()));
    }
    drop(held);
    cfg = cfg.replace("name = \"lab\"", &format!("name = \"{name}\""));
    (dir, cfg)
}
