//! Where `up` spends its time: the phase breakdown of a cold `up` (from the `--json` phase events), the overlap of
//! the host-side base image build with the guest's boot (the time it saved), and the time of a warm `up` on the
//! running, unchanged machine (which must only check and print the health table); then issue 21's warm floors in
//! the same run, each a median against its floor: warm `up` vs `health` alone, `snapshot restore` of the running
//! lab to a green table, the rebuild `destroy -f && up` from the cached lab (captured by the cold `up`), and
//! `ssh -c true` vs plain OpenSSH through the same master.
//!
//! Run: `cargo bench --bench up_phases` (needs libvirt + QEMU; boxes and the container base image come from the
//! cache like `up`, so delete `$PROVISIONER_CACHE_DIR/images` first to include the host-side base image build).
//! The machine is destroyed at the end however the bench ends. Skips with a message when no VM can be made.

use std::path::Path;
use std::time::{Duration, Instant};

mod common;
use common::run;

/// Destroys the machine when the bench ends.
struct Guard<'a>(&'a Path);

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        let _ = run(self.0, &["destroy", "-f"]);
    }
}

/// (phase, seconds, status) from `--json` event lines.
fn phases(stdout: &str) -> Vec<(String, f64, String)> {
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == "phase_end")
        .map(|v| {
            (
                v["phase"].as_str().unwrap_or("?").to_string(),
                v["seconds"].as_f64().unwrap_or(0.0),
                v["status"].as_str().unwrap_or("?").to_string(),
            )
        })
        .collect()
}

/// The first `--json` event of a kind.
fn event(stdout: &str, kind: &str) -> Option<serde_json::Value> {
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == kind)
}

fn report(title: &str, out: &std::process::Output, wall: Duration) {
    println!("{title}: {:.1} s wall, exit {:?}", wall.as_secs_f64(), out.status.code());
    let stdout = String::from_utf8_lossy(&out.stdout);
    if let Some(o) = event(&stdout, "base_image_overlap") {
        let f = |k: &str| o[k].as_f64().unwrap_or(0.0);
        println!(
            "  overlap: base image built on the host in {:.1} s while the guest booted; the images phase waited \
             {:.1} s for it; saved {:.1} s (sequential up would take ~{:.1} s, ratio {:.2})",
            f("build_seconds"),
            f("waited_seconds"),
            f("saved_seconds"),
            wall.as_secs_f64() + f("saved_seconds"),
            wall.as_secs_f64() / (wall.as_secs_f64() + f("saved_seconds"))
        );
    } else if event(&stdout, "base_image_build_started").is_none() {
        println!("  overlap: none (the base image tarball was cached; delete $PROVISIONER_CACHE_DIR/images to see it)");
    }
    if let Some(c) = event(&stdout, "run_counts") {
        println!(
            "  computed once: {} render(s) of the provision tree, {} read(s) of state.json",
            c["renders"], c["state_reads"]
        );
    }
    let phases = phases(&stdout);
    for (phase, secs, status) in &phases {
        println!("  {phase:<12} {secs:>8.1} s  {status}");
    }
    let in_phases: f64 = phases.iter().map(|(_, s, _)| s).sum();
    // Phases wait on the guest (boot, cloud-init, builds); what is left is the tool's own start-up and glue.
    println!(
        "  {:<12} {:>8.1} s  (wall minus phases: process start, config, rendering, glue)",
        "outside",
        wall.as_secs_f64() - in_phases
    );
}

fn main() {
    let (dir, cfg) = common::lab_project(&format!("bench{}", std::process::id()));
    std::fs::write(dir.path().join("box-config.toml"), cfg).expect("write config");

    let _guard = Guard(dir.path());
    let t = Instant::now();
    let cold = run(dir.path(), &["up", "--json"]);
    let cold_wall = t.elapsed();
    if cold.status.code() == Some(1) && phases(&String::from_utf8_lossy(&cold.stdout)).is_empty() {
        println!("up_phases: skipped, no VM could be made:\n{}", String::from_utf8_lossy(&cold.stderr));
        return;
    }
    report("cold up", &cold, cold_wall);

    let t = Instant::now();
    let warm = run(dir.path(), &["up", "--json"]);
    let warm_wall = t.elapsed();
    report("warm up (running, unchanged)", &warm, warm_wall);
    if let Some(c) = event(&String::from_utf8_lossy(&warm.stdout), "run_counts") {
        println!(
            "  guest round trips: {} exec(s), {} answer(s) taken from the one prefetch, {} GET(s) on the Engine's socket \
             through the connection",
            c["guest_execs"], c["guest_execs_prefetched"], c["guest_socket_gets"]
        );
    }

    // The floors, each the median of a few runs measured back to back in this run.
    let load = || {
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split(' ')
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!("-- warm floors (load average {})", load());
    let warm_up = median(5, || run(dir.path(), &["up", "-q"]).status.code() == Some(0));
    // The floor a warm `up` stands on: the health check it ends with, alone, in the same run.
    let health = median(5, || run(dir.path(), &["health"]).status.code() == Some(0));
    println!(
        "warm up {:.2} s (median of 5) / health alone {:.2} s = {:.2} (goal: warm up <= 1.5 s)",
        warm_up,
        health,
        warm_up / health
    );
    ssh_floor(dir.path(), "on the settled lab");
    assert_eq!(run(dir.path(), &["snapshot", "save", "bench"]).status.code(), Some(0), "snapshot save");
    // `snapshot restore` ends with the health table of the restored lab (exit 0 when green).
    let restore = median(3, || run(dir.path(), &["snapshot", "restore", "bench"]).status.code() == Some(0));
    println!(
        "snapshot restore of the running lab to a green table: {restore:.2} s (median of 3; goal <= 5 s)"
    );
    let _ = run(dir.path(), &["snapshot", "delete", "bench"]);
    ssh_floor(dir.path(), "just after three restores: the guest runs cold code");
    let rebuild = median(5, || {
        let t = Instant::now();
        let destroyed = run(dir.path(), &["destroy", "-f"]).status.code() == Some(0);
        let d = t.elapsed().as_secs_f64();
        let up = run(dir.path(), &["up", "--json"]);
        let restored = event(&String::from_utf8_lossy(&up.stdout), "lab_restored").is_some();
        println!(
            "  destroy -f {d:.2} s + cached up {:.2} s (restored: {restored})",
            t.elapsed().as_secs_f64() - d
        );
        destroyed && up.status.code() == Some(0) && restored
    });
    println!("rebuild destroy -f && up from the cached lab: {rebuild:.2} s (median of 5; goal <= 3 s) (load average {})", load());
}

/// `ssh -c true` through the master a first one leaves, against plain OpenSSH through the same master: the median
/// of 15 each, measured back to back (`when` says the guest's state).
fn ssh_floor(dir: &std::path::Path, when: &str) {
    let ssh = median(15, || run(dir, &["ssh", "-c", "true"]).status.code() == Some(0));
    let socket = dir.join(".provisioner/ssh-control");
    let plain = median(15, || {
        std::process::Command::new("ssh")
            .args(["-F", "none", "-o", "ControlMaster=no", "-S"])
            .arg(&socket)
            .args(["provisioner-machine", "true"])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    println!(
        "ssh -c true {:.0} ms vs plain ssh through the same master {:.0} ms, {when} (median of 15; the tool's own part {:.0} ms; goal <= 25 ms)",
        ssh * 1000.0,
        plain * 1000.0,
        (ssh - plain) * 1000.0
    );
}

/// The median wall time in seconds of `n` runs of `f`, which must succeed.
fn median(n: usize, mut f: impl FnMut() -> bool) -> f64 {
    let mut t: Vec<f64> = (0..n)
        .map(|_| {
            let s = Instant::now();
            assert!(f(), "a measured command failed");
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[n / 2]
}
