//! Several machines at once: wall time of `up` for 3 machines in parallel (`--parallel 3`) vs the same 3 one after
//! another (`--parallel 1`) vs a single machine, with the host's cores printed (TCG guests compete for them).
//! Machines boot to SSH and cloud-init done (`[provision] enabled = false`, `cache_lab = false` so every run is
//! cold), 1 vCPU and 1 GiB each, with the private network between them.
//!
//! Run: `cargo bench --bench multi_up` (needs libvirt + QEMU and the cached box; about 8-12 min on this 2-core
//! machine, so `scripts/test` does not run it). Every machine is destroyed at the end however the bench ends.

use std::path::Path;
use std::time::{Duration, Instant};

mod common;
use common::run;

struct Guard<'a>(&'a Path);

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        let _ = run(self.0, &["destroy", "-f"]);
    }
}

/// A project of `n` machines using the repo's box.
fn project(n: usize) -> tempfile::TempDir {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let main = std::fs::read_to_string(repo.join("box-config.toml")).expect("box-config.toml");
    // The table itself, not its mention in the comment above it.
    let start = main.find("\n[box.debian]\n").expect("the repo's box") + 1;
    let end = start + main[start..].find("\n\n").expect("end of [box.debian]");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = format!(
        "[defaults]\nprovider = \"libvirt\"\ncpus = 1\nmemory_mb = 1024\ndisk_gb = 8\ncache_lab = false\n\n{}\n\n\
         [provision]\nenabled = false\n\n[ssh]\nconnect_timeout_secs = 1800\n\n[libvirt]\nuri = \"qemu:///session\"\n",
        &main[start..end]
    );
    for i in 1..=n {
        cfg += &format!("\n[[machine]]\nname = \"bench{i}\"\n");
    }
    std::fs::write(dir.path().join("box-config.toml"), cfg).expect("write config");
    dir
}

/// `up` with these flags; the wall time, or None (with the reason printed) when it failed.
fn up(dir: &Path, args: &[&str]) -> Option<Duration> {
    let t = Instant::now();
    let out = run(dir, &[&["up"], args].concat());
    let wall = t.elapsed();
    if !out.status.success() {
        println!("  up {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    let _ = run(dir, &["destroy", "-f"]);
    Some(wall)
}

fn main() {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    println!("multi_up: {cores} host core(s); TCG guests, 1 vCPU / 1 GiB each, boot to cloud-init done");
    let one = project(1);
    let _g1 = Guard(one.path());
    let Some(single) = up(one.path(), &[]) else {
        println!("multi_up: skipped, no VM could be made");
        return;
    };
    println!("  1 machine:                 {:>7.1} s", single.as_secs_f64());
    let three = project(3);
    let _g3 = Guard(three.path());
    let Some(par) = up(three.path(), &["--parallel", "3"]) else { return };
    println!("  3 machines in parallel:    {:>7.1} s", par.as_secs_f64());
    let Some(seq) = up(three.path(), &["--parallel", "1"]) else { return };
    println!("  3 machines one by one:     {:>7.1} s", seq.as_secs_f64());
    println!(
        "  parallel / one-by-one = {:.2} (goal <= 0.60), parallel / one machine = {:.2}",
        par.as_secs_f64() / seq.as_secs_f64(),
        par.as_secs_f64() / single.as_secs_f64()
    );
}
