//! `destroy -f && up` with the cached lab against the same rebuild without it, in one run, with the ratio.
//!
//! 1. `up` of a fresh machine: the full path (boot, cloud-init, provisioning, health), then the `cache lab` capture;
//! 2. `destroy -f && up` with unchanged inputs: restored from the cache (no boot, no provisioning), then health.
//!
//! The "without" figure is (1) minus its capture phase, i.e. what `destroy -f && up` costs with
//! `[machine] cache_lab = false`.
//!
//! Run: `cargo bench --bench lab_cache` (the whole lab, the target: cached rebuild <= 30 s under TCG), or
//! `LAB_CACHE_BENCH=boot cargo bench --bench lab_cache` for a machine without provisioning (boot + cloud-init
//! only: a few minutes instead of ~10). Needs libvirt + QEMU and the cached box; the machine and its cache entry are
//! removed at the end however the bench ends. Skips with a message when no VM can be made.

use std::path::Path;
use std::time::{Duration, Instant};

mod common;
use common::run;

/// Destroys the machine and drops its cached lab when the bench ends.
struct Guard<'a> {
    dir: &'a Path,
    key: Option<String>,
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        let _ = run(self.dir, &["destroy", "-f"]);
        if let Some(k) = &self.key {
            let _ = run(self.dir, &["box", "remove", k]);
        }
    }
}

fn events(stdout: &[u8], kind: &str) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == kind)
        .collect()
}

fn phase_secs(stdout: &[u8], phase: &str) -> f64 {
    events(stdout, "phase_end")
        .iter()
        .filter(|e| e["phase"] == phase)
        .filter_map(|e| e["seconds"].as_f64())
        .sum()
}

fn timed(dir: &Path, args: &[&str]) -> (std::process::Output, Duration) {
    let t = Instant::now();
    let out = run(dir, args);
    (out, t.elapsed())
}

fn main() {
    let boot_only = std::env::var("LAB_CACHE_BENCH").is_ok_and(|v| v == "boot");
    let (dir, mut cfg) = common::lab_project(&format!("labc{}", std::process::id()));
    if boot_only {
        cfg = cfg.replace("[provision]\n", "[provision]\nenabled = false\n");
    }
    std::fs::write(dir.path().join("box-config.toml"), cfg).expect("write config");
    let what = if boot_only { "machine without provisioning" } else { "whole lab" };

    let mut guard = Guard { dir: dir.path(), key: None };
    let (first, first_wall) = timed(dir.path(), &["--json", "up"]);
    guard.key =
        events(&first.stdout, "lab_saved").first().and_then(|e| e["key"].as_str()).map(str::to_string);
    if guard.key.is_none() {
        println!(
            "lab_cache: skipped, the first up did not cache the lab (exit {:?}):\n{}",
            first.status.code(),
            String::from_utf8_lossy(&first.stderr)
        );
        return;
    }
    let capture = phase_secs(&first.stdout, "cache lab");
    let without = first_wall.as_secs_f64() - capture;

    let (d1, d1_wall) = timed(dir.path(), &["destroy", "-f"]);
    assert!(d1.status.success(), "destroy failed: {}", String::from_utf8_lossy(&d1.stderr));
    let (cached, cached_wall) = timed(dir.path(), &["--json", "up"]);
    let hit = events(&cached.stdout, "lab_restored").len() == 1;
    let with = d1_wall.as_secs_f64() + cached_wall.as_secs_f64();

    println!("lab_cache ({what}, {}):", if hit { "restored from the cache" } else { "CACHE MISSED" });
    println!("  up, full path         {:>8.1} s  (exit {:?})", without, first.status.code());
    println!("  cache lab (capture)   {:>8.1} s  (once, after the full path)", capture);
    println!("  destroy -f            {:>8.1} s", d1_wall.as_secs_f64());
    println!(
        "  up from the cache     {:>8.1} s  (exit {:?})",
        cached_wall.as_secs_f64(),
        cached.status.code()
    );
    for phase in ["restore lab", "ssh", "cloud-init", "health"] {
        println!("    {phase:<19} {:>8.1} s", phase_secs(&cached.stdout, phase));
    }
    // What the health phase waited for after the restore, round by round.
    for (i, e) in events(&cached.stdout, "health_waiting").iter().enumerate() {
        println!("      health round {}: waiting for {}", i + 1, e["services"]);
    }
    println!(
        "destroy -f && up: with the cache {with:.1} s, without {without:.1} s; with / without = {:.3} ({:.1}x faster)",
        with / without,
        without / with
    );
}
