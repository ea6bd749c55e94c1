//! Issue 20, Vagrant boxes without cloud-init: `up --no-provision` (to SSH ready) on the Vagrant-style box the VM
//! tier builds (user `vagrant`, Vagrant's insecure keys, cloud-init disabled: the disk route, keys written into the
//! machine's disk before its first boot), on the same box with `keys = "insecure-once"` (one login with the
//! insecure key, keys replaced in it), and on the same box with cloud-init enabled (the NoCloud seed). Printed: the
//! key-injection step's time (the disk route's `keys` phase; goal <= 10 s on this machine), the insecure-once swap,
//! and each `up`'s wall time and phases. One machine at a time, each destroyed before the next.
//!
//! Run: `cargo bench --bench vagrant_box` (needs libvirt + QEMU and the cached test box, as `scripts/test` leaves
//! it). About 25 s to derive each box, then one TCG boot per row. `VAGRANT_BOX_ROWS=disk,cloud-init` runs only the
//! named rows (of `disk`, `insecure-once`, `cloud-init`).

use std::path::Path;
use std::time::Instant;

mod common;
use common::run;

#[allow(dead_code)]
#[path = "../tests/support/vagrant_box.rs"]
mod vagrant_box;

/// Destroys the machine when dropped.
struct Guard<'a>(&'a Path);

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        let _ = run(self.0, &["destroy", "-f"]);
    }
}

/// (phase, seconds, detail) of each `--json` phase_end event.
fn phases(stdout: &str) -> Vec<(String, f64, String)> {
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == "phase_end")
        .map(|v| {
            (
                v["phase"].as_str().unwrap_or("?").to_string(),
                v["seconds"].as_f64().unwrap_or(0.0),
                format!("{} {}", v["status"].as_str().unwrap_or("?"), v["summary"].as_str().unwrap_or("")),
            )
        })
        .collect()
}

/// One row: a project for `box_file` with `keys`, `up --no-provision --json`, its figures; destroyed after.
fn row(title: &str, box_file: &Path, keys: &str, cache: &Path) -> Option<f64> {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = format!(
        "[machine]\nname = \"vbench\"\nprovider = \"libvirt\"\ncpus = 1\nmemory_mb = 1024\ndisk_gb = 4\naccel = \
         \"tcg\"\n\n[box]\nvagrant = \"{}\"\nkeys = \"{keys}\"\n\n[ssh]\nhost_port = {}\nconnect_timeout_secs = 600\n\n\
         [provision]\nenabled = false\n\n[libvirt]\nuri = \"qemu:///session\"\n",
        box_file.display(),
        common::free_port()
    );
    std::fs::write(dir.path().join("box-config.toml"), cfg).expect("write config");
    std::env::set_var("PROVISIONER_CACHE_DIR", cache);
    let build = run(dir.path(), &["box", "build"]);
    if !build.status.success() {
        println!("{title}: skipped, `box build` failed:\n{}", String::from_utf8_lossy(&build.stderr));
        return None;
    }
    let _guard = Guard(dir.path());
    let t = Instant::now();
    let up = run(dir.path(), &["up", "--no-provision", "--json"]);
    let wall = t.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&up.stdout);
    println!("{title}: up to SSH ready {wall:.1} s wall, exit {:?}", up.status.code());
    if !up.status.success() {
        println!("  {}", String::from_utf8_lossy(&up.stderr).trim());
    }
    for (phase, secs, detail) in phases(&stdout) {
        println!("  {phase:<12} {secs:>7.1} s  {detail}");
    }
    up.status.success().then_some(wall)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let work = tempfile::tempdir().expect("tempdir");
    let cache = work.path().join("cache");
    let derive = |name: &str, cloud_init: bool| {
        let d = work.path().join(name);
        std::fs::create_dir_all(&d).expect("mkdir");
        let t = Instant::now();
        let b = vagrant_box::vagrant_box_with(&d, cloud_init);
        println!("box {name} derived from the test box in {:.1} s", t.elapsed().as_secs_f64());
        b
    };
    let rows = std::env::var("VAGRANT_BOX_ROWS").unwrap_or_else(|_| "disk,insecure-once,cloud-init".into());
    let on = |name: &str| rows.split(',').any(|r| r.trim() == name);
    let vagrant = (on("disk") || on("insecure-once")).then(|| derive("vagrant", false));
    let with_cloud_init = on("cloud-init").then(|| derive("cloud-init", true));
    let disk = vagrant
        .as_ref()
        .filter(|_| on("disk"))
        .and_then(|b| row("disk route (Vagrant-style box, keys written into its disk)", b, "auto", &cache));
    let once = vagrant.as_ref().filter(|_| on("insecure-once")).and_then(|b| {
        row("insecure-once (same box, one login with the insecure key)", b, "insecure-once", &cache)
    });
    let seed = with_cloud_init
        .as_ref()
        .and_then(|b| row("cloud-init (same box with cloud-init enabled, NoCloud seed)", b, "auto", &cache));
    match (disk, seed) {
        (Some(d), Some(s)) => println!("disk route / cloud-init up = {:.2}", d / s),
        _ => println!("disk route / cloud-init up: not measured (a row failed)"),
    }
    if let (Some(o), Some(s)) = (once, seed) {
        println!("insecure-once / cloud-init up = {:.2}", o / s);
    }
}
