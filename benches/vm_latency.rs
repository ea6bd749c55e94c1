//! Latency of the everyday commands against the primitives they wrap, measured in the same run:
//! `status` vs one `virsh domstate`, `ssh -c true` vs plain OpenSSH `ssh ... true` (a new connection each time),
//! both with connection reuse off and through the OpenSSH master a first `ssh -c` leaves, plus `ssh-config` and
//! `destroy -f`. Goals: `status` within 2x of one virsh call; a second `ssh -c true` at most 1/5 of plain ssh.
//!
//! Run: `cargo bench --bench vm_latency` (needs libvirt + QEMU; the box comes from the cache like `up`).
//! Box: `PROVISIONER_BENCH_BOX` = a box-config.toml `[box]` table body (default: `[box.debian]` bookworm).
//! Skips with a message when no VM can be made.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const ROUNDS: usize = 15;

mod common;
use common::{free_port, run};

/// Median and minimum of `ROUNDS` runs of `f`, which must succeed.
fn measure(name: &str, mut f: impl FnMut() -> bool) -> Duration {
    let mut times = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let t = Instant::now();
        assert!(f(), "{name} failed");
        times.push(t.elapsed());
    }
    times.sort();
    let median = times[ROUNDS / 2];
    println!("{name:<28} median {:>8.1} ms   min {:>8.1} ms", ms(median), ms(times[0]));
    median
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Destroys the machine when the bench ends, however it ends.
struct Guard<'a>(&'a Path);

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        let _ = run(self.0, &["destroy", "-f"]);
    }
}

fn main() {
    if which::which("virsh").is_err() {
        println!("vm_latency: skipped (no virsh on PATH)");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let name = format!("bench{}", std::process::id() % 100_000);
    let boxdef = std::env::var("PROVISIONER_BENCH_BOX")
        .unwrap_or_else(|_| "[box.debian]\nsuite = \"bookworm\"\n".to_string());
    std::fs::write(
        dir.path().join("box-config.toml"),
        format!(
            "[machine]\nname = \"{name}\"\nprovider = \"libvirt\"\ncpus = 1\nmemory_mb = 1024\ndisk_gb = 4\n\n{boxdef}\n\n\
             [ssh]\nhost_port = {}\n\n[provision]\nenabled = false\n",
            free_port()
        ),
    )
    .unwrap();
    let t = Instant::now();
    let _guard = Guard(dir.path());
    let up = run(dir.path(), &["up", "--no-provision"]);
    if !up.status.success() {
        println!("vm_latency: skipped (no VM could be made):\n{}", String::from_utf8_lossy(&up.stderr));
        return;
    }
    println!("up --no-provision (cold)     {:>8.1} s", t.elapsed().as_secs_f64());

    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join(".provisioner/state.json")).unwrap()).unwrap();
    let vm = state["vm_name"].as_str().unwrap().to_string();
    let uri = state["libvirt_uri"].as_str().unwrap_or("qemu:///session").to_string();
    let port = state["ssh_port"].as_u64().unwrap().to_string();
    let sd = dir.path().join(".provisioner");

    let virsh = measure("virsh domstate", || {
        Command::new("virsh").args(["-c", &uri, "domstate", &vm]).output().is_ok_and(|o| o.status.success())
    });
    let status = measure("provisioner status", || run(dir.path(), &["status"]).status.success());
    measure("provisioner ssh-config", || run(dir.path(), &["ssh-config"]).status.success());
    let plain = measure("plain ssh true", || {
        Command::new("ssh")
            .args(["-i", &sd.join("id_ed25519").to_string_lossy(), "-p", &port])
            .args(["-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=yes", "-o", "LogLevel=ERROR"])
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", sd.join("known_hosts").display()))
            .args(["provisioner@127.0.0.1", "true"])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    let no_reuse = measure("ssh -c true (reuse off)", || {
        Command::new(common::bin())
            .args(["ssh", "-c", "true"])
            .current_dir(dir.path())
            .env("PROVISIONER_SSH_REUSE", "0")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    // The first call opens the master (a full login); every later one is a channel on its connection.
    let t = Instant::now();
    assert!(run(dir.path(), &["ssh", "-c", "true"]).status.success(), "first ssh -c failed");
    println!("ssh -c true (first, opens master) {:>8.1} ms", ms(t.elapsed()));
    let ours =
        measure("ssh -c true (via master)", || run(dir.path(), &["ssh", "-c", "true"]).status.success());
    let t = Instant::now();
    assert!(run(dir.path(), &["destroy", "-f"]).status.success(), "destroy -f failed");
    println!("provisioner destroy -f       {:>8.1} ms", ms(t.elapsed()));
    println!(
        "ratios: status / virsh domstate = {:.2} (goal <= 2); ssh -c true via master / plain ssh = {:.2} (goal <= \
         0.20); ssh -c true without reuse / plain ssh = {:.2}",
        status.as_secs_f64() / virsh.as_secs_f64(),
        ours.as_secs_f64() / plain.as_secs_f64(),
        no_reuse.as_secs_f64() / plain.as_secs_f64()
    );
}
