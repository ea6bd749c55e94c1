//! Wall time of the commands people run in their edit loop, on the shipped box-config.toml and provision/ tree:
//! `provisioner validate` (parse, rules, render in memory, compose cross-check) and `provisioner render --out`.
//!
//! `cargo bench --bench cli_latency` (runs: `BENCH_RUNS`, default 40). Prints median / p95 / max against the goal
//! (< 50 ms each); with `BENCH_ENFORCE=1` it exits 1 when a median misses the goal.
//!
//! Children are run with `std::process::Command` and waited on directly: `process::Cmd` polls with a backoff,
//! which would round these few-millisecond timings up.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const GOAL: Duration = Duration::from_millis(50);

fn copy_dir(from: &Path, to: &Path) {
    for e in walkdir::WalkDir::new(from) {
        let e = e.expect("walk");
        let dest = to.join(e.path().strip_prefix(from).expect("under root"));
        if e.file_type().is_dir() {
            std::fs::create_dir_all(&dest).expect("mkdir");
        } else {
            std::fs::copy(e.path(), &dest).expect("copy");
        }
    }
}

fn time_once(bin: &Path, dir: &Path, args: &[&str]) -> Duration {
    let start = Instant::now();
    let out = Command::new(bin)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("run provisioner");
    let took = start.elapsed();
    assert!(out.status.success(), "provisioner {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    took
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn main() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_provisioner"));
    let runs: usize = std::env::var("BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(40).max(1);
    let dir = tempfile::tempdir().expect("tempdir");
    copy_dir(&repo.join("provision"), &dir.path().join("provision"));
    std::fs::copy(repo.join("box-config.toml"), dir.path().join("box-config.toml")).expect("copy config");

    println!("provisioner CLI latency: {runs} runs each, goal < {}", ms(GOAL));
    println!("{:<36} {:>10} {:>10} {:>10}  verdict", "command", "median", "p95", "max");
    let mut missed = false;
    // `--version` is the floor: process start and exit, no work.
    for args in [&["--version"][..], &["validate"][..], &["render", "--out", "rendered"][..]] {
        for _ in 0..3 {
            time_once(&bin, dir.path(), args); // warm the page cache
        }
        let mut t: Vec<Duration> = (0..runs).map(|_| time_once(&bin, dir.path(), args)).collect();
        t.sort();
        let median = t[t.len() / 2];
        let p95 = t[((t.len() * 95).div_ceil(100)).saturating_sub(1)];
        let ok = median < GOAL && p95 < GOAL;
        missed |= median >= GOAL && args[0] != "--version";
        let verdict = if ok { "ok" } else { "OVER GOAL" };
        println!(
            "{:<36} {:>10} {:>10} {:>10}  {verdict}",
            format!("provisioner {}", args.join(" ")),
            ms(median),
            ms(p95),
            ms(*t.last().expect("runs >= 1"))
        );
    }
    if missed && std::env::var_os("BENCH_ENFORCE").is_some_and(|v| v == "1") {
        std::process::exit(1);
    }
}
