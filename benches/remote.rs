//! Remote libvirt hosts, measured against a second host made here (a network namespace with its own sshd and
//! libvirtd, tests/support/nethost.rs), in one run:
//! - box upload throughput (`provisioner box upload`: vol-create-as + vol-upload --sparse over the host's shared
//!   SSH connection, AES-GCM first on a CPU with AES instructions) vs `scp` of the same file to the same host (its
//!   default cipher, and AES-GCM), and the second upload (0 bytes); the bare virsh primitive over a plain ssh
//!   wrapper (OpenSSH's default cipher: the upload before the cipher choice);
//! - `status` of a machine recorded on that host (its domain absent) with the host's own virsh run through the
//!   shared connection in-process (the default: OpenSSH's mux protocol on the master's socket), through an `ssh`
//!   process on it (`PROVISIONER_REMOTE_EXEC=ssh`), through libvirt's remote driver (`PROVISIONER_REMOTE_EXEC=0`)
//!   and without the shared connection (`PROVISIONER_SSH_REUSE=0`), vs the same on a machine recorded on
//!   qemu:///session, as ratios;
//! - `up` of a new machine on a second such host whose sshd has `AllowTcpForwarding no`: the seconds to its error;
//! - with `PROVISIONER_BENCH_VM=1` (boots two TCG guests): `status` and `ssh -c true` on a machine on that host vs
//!   the same on a local machine (qemu:///session), and remote `status` through the remote driver.
//!
//! The last lines (`issue 21 remote rows`) are the rows of the table as measured in this run.
//!
//! `REMOTE_BENCH_ROWS=status` runs the status rows only.
//!
//! Run: `cargo bench --bench remote` as root (needs ip, unshare, libvirtd, sshd). Skips with a message otherwise.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

#[path = "../tests/support/mod.rs"]
#[allow(unused_imports)]
mod support;

use support::nethost::{self, NetHost};

const ROUNDS: usize = 11;
/// Rounds of the upload / scp comparison (each sends the 193 MiB box once per tool).
const UPLOAD_ROUNDS: usize = 5;
/// Rounds of the `status` comparison on a recorded machine (tens of ms each: more rounds, steadier medians on a
/// loaded host).
const STATUS_ROUNDS: usize = 31;

fn median(name: &str, mut f: impl FnMut() -> bool) -> Duration {
    let mut t = Vec::new();
    for _ in 0..ROUNDS {
        let s = Instant::now();
        assert!(f(), "{name} failed");
        t.push(s.elapsed());
    }
    t.sort();
    println!("{name:<34} median {:>8.1} ms   min {:>8.1} ms", ms(t[ROUNDS / 2]), ms(t[0]));
    t[ROUNDS / 2]
}

/// The medians of several commands run round-robin, ROUNDS each (load drifts on a shared host: interleaving
/// exposes every command to the same drift).
fn medians(cmds: &mut [(&str, &mut dyn FnMut() -> bool)]) -> Vec<Duration> {
    medians_of(ROUNDS, cmds)
}

/// [`medians`] of `rounds` rounds.
fn medians_of(rounds: usize, cmds: &mut [(&str, &mut dyn FnMut() -> bool)]) -> Vec<Duration> {
    let mut t = vec![Vec::new(); cmds.len()];
    for _ in 0..rounds {
        for (i, (name, f)) in cmds.iter_mut().enumerate() {
            let s = Instant::now();
            assert!(f(), "{name} failed");
            t[i].push(s.elapsed());
        }
    }
    cmds.iter()
        .zip(t.iter_mut())
        .map(|((name, _), t)| {
            t.sort();
            println!("{name:<34} median {:>8.1} ms   min {:>8.1} ms", ms(t[rounds / 2]), ms(t[0]));
            t[rounds / 2]
        })
        .collect()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn prov(dir: &Path, home: &Path, args: &[&str]) -> std::process::Output {
    Command::new(support::bin())
        .args(args)
        .current_dir(dir)
        .env("HOME", home)
        .env("PROVISIONER_CACHE_DIR", dir.join("cache"))
        .output()
        .expect("run provisioner")
}

fn main() {
    if !nethost::available() || which::which("virsh").is_err() {
        println!("remote: skipped (needs root, libvirtd, virtlogd, sshd, virt-ssh-helper, virsh)");
        return;
    }
    let host = NetHost::start();
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir_all(home.join(".ssh")).unwrap();
    std::fs::write(home.join(".ssh/known_hosts"), host.known_hosts_line()).unwrap();
    std::fs::create_dir_all(dir.path().join("provision")).unwrap();
    if std::env::var("REMOTE_BENCH_ROWS").as_deref() == Ok("status") {
        // The status rows alone (seconds, where the upload rows take minutes).
        let (status, driver) = status_on_recorded_machines(&host, &home);
        println!("issue 21 remote row (goal <= 1.5x):");
        println!("  remote `status` vs local            {status:.2}x  (through libvirt's remote driver: {driver:.2}x)");
        return;
    }
    // A 192 MiB box of incompressible data in an ext4 image (what `box upload` accepts), as qcow2.
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mut bytes = vec![0u8; 192 << 20];
    let mut x: u64 = 0x9E3779B97F4A7C15;
    for b in bytes.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(data.join("payload"), &bytes).unwrap();
    drop(bytes);
    let raw = dir.path().join("big.raw");
    assert!(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&data)
        .arg(&raw)
        .arg("256M")
        .status()
        .unwrap()
        .success());
    let img = dir.path().join("big.qcow2");
    assert!(Command::new("qemu-img")
        .args(["convert", "-q", "-O", "qcow2"])
        .arg(&raw)
        .arg(&img)
        .status()
        .unwrap()
        .success());
    std::fs::remove_dir_all(&data).unwrap();
    std::fs::remove_file(&raw).unwrap();
    let size = std::fs::metadata(&img).unwrap().len();
    std::fs::write(
        dir.path().join("box-config.toml"),
        format!(
            "[machine]\nname = \"bench\"\nprovider = \"libvirt\"\n[box]\nimage = \"big.qcow2\"\n[provision]\nenabled = \
             false\n[libvirt]\nuri = \"{}\"\n",
            host.uri()
        ),
    )
    .unwrap();

    // Import into the (bench's own) cache first, so the upload timing is the upload only.
    let out = prov(dir.path(), &home, &["box", "build"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    println!(
        "remote: box of {:.1} MiB, libvirt host {} (network namespace, veth)",
        size as f64 / 1048576.0,
        host.addr
    );

    let t = Instant::now();
    let out = prov(dir.path(), &home, &["--json", "box", "upload"]);
    let up = t.elapsed();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();
    let secs = doc["secs"].as_f64().unwrap();
    let rate = size as f64 / 1048576.0 / secs;
    println!("box upload data bytes sent          {} of {size}", doc["bytes_sent"]);
    println!(
        "box upload, first (pool made)     {:>8.2} s  {rate:>7.1} MiB/s  (command total {:.2} s)",
        secs,
        up.as_secs_f64()
    );

    let t = Instant::now();
    let out = prov(dir.path(), &home, &["--json", "box", "upload"]);
    let again = t.elapsed();
    let doc2: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();
    println!(
        "second box upload                  {:>8.2} s  {} bytes sent",
        again.as_secs_f64(),
        doc2["bytes_sent"]
    );

    // The primitive alone: one virsh vol-upload (sparse and not) into a fresh volume, same connection kind.
    let wrapper = dir.path().join("ssh-wrapper");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec ssh -o UserKnownHostsFile={} -o StrictHostKeyChecking=yes -o BatchMode=yes \"$@\"\n",
            home.join(".ssh/known_hosts").display()
        ),
    )
    .unwrap();
    assert!(Command::new("chmod").arg("700").arg(&wrapper).status().unwrap().success());
    let conn = format!("{}&command={}&no_tty=1", host.uri(), wrapper.display());
    for sparse in [true, false] {
        let name = format!("raw-{sparse}");
        let mut batch = format!(
            "vol-create-as --pool provisioner --name {name} --capacity {size} --format raw; vol-upload --pool \
             provisioner --vol {name} --file {}",
            img.display()
        );
        if sparse {
            batch.push_str(" --sparse");
        }
        let t = Instant::now();
        let out = Command::new("virsh").args(["-q", "-c", &conn, &batch]).output().unwrap();
        let d = t.elapsed();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        println!(
            "virsh create+vol-upload{}   {:>8.2} s  {:>7.1} MiB/s",
            if sparse { " --sparse" } else { "         " },
            d.as_secs_f64(),
            size as f64 / 1048576.0 / d.as_secs_f64()
        );
        let _ = host.virsh(&["vol-delete", "--pool", "provisioner", &name]);
    }

    // Upload and scp, interleaved (the host is shared: load drifts), median of UPLOAD_ROUNDS each. Each upload
    // round sends the whole box again: its marker is deleted first, so `box upload` replaces the volume.
    let scp = |cipher: Option<&str>| {
        let t = Instant::now();
        let mut c = Command::new("scp");
        c.args(["-q", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o"])
            .arg(format!("UserKnownHostsFile={}", home.join(".ssh/known_hosts").display()));
        if let Some(c2) = cipher {
            c.args(["-c", c2]);
        }
        let st = c
            .arg("-i")
            .arg(&host.key)
            .arg(&img)
            .arg(format!("root@{}:/var/tmp/scp-copy", host.addr))
            .status();
        let d = t.elapsed().as_secs_f64();
        assert!(st.unwrap().success(), "scp");
        let _ = host.exec(&["rm", "-f", "/var/tmp/scp-copy"]);
        d
    };
    let id = doc["id"].as_str().unwrap().to_string();
    let (mut ups, mut scps, mut gcms) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..UPLOAD_ROUNDS {
        host.virsh(&["vol-delete", "--pool", "provisioner", &format!("box-{id}.done")]).unwrap();
        let out = prov(dir.path(), &home, &["--json", "box", "upload"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let d: serde_json::Value =
            serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();
        ups.push(d["secs"].as_f64().unwrap());
        scps.push(scp(None));
        gcms.push(scp(Some("aes128-gcm@openssh.com")));
    }
    let mid = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (up_s, scp_s, gcm_s) = (mid(&mut ups), mid(&mut scps), mid(&mut gcms));
    let mib = size as f64 / 1048576.0;
    let rate = mib / up_s;
    let scp_rate = mib / scp_s;
    println!("box upload again (median of {UPLOAD_ROUNDS})      {up_s:>8.2} s  {rate:>7.1} MiB/s");
    println!("scp of the same file (its default)  {scp_s:>8.2} s  {:>7.1} MiB/s", scp_rate);
    println!("scp of the same file (aes128-gcm)   {gcm_s:>8.2} s  {:>7.1} MiB/s", mib / gcm_s);
    println!(
        "ratio upload/scp throughput        {:>8.2}  (against scp with AES-GCM: {:.2})",
        scp_s / up_s,
        gcm_s / up_s
    );

    let (status_ratio, status_before) = status_on_recorded_machines(&host, &home);
    let hardened = hardened_up(&img);
    println!("up on a host with AllowTcpForwarding no   {hardened:>6.2} s to its error (nothing made there)");

    let rows = |status: f64, before: f64, ssh: Option<f64>| {
        println!("issue 21 remote rows (goals: <= 1.5x, <= 1.5x, >= 0.9, <= 5 s):");
        println!("  remote `status` vs local            {status:.2}x  (through libvirt's remote driver: {before:.2}x)");
        match ssh {
            Some(r) => println!("  remote `ssh -c true` vs local       {r:.2}x"),
            None => println!("  remote `ssh -c true` vs local       (PROVISIONER_BENCH_VM=1)"),
        }
        println!("  `box upload` vs `scp` throughput    {:.2}", rate / scp_rate);
        println!(
            "  `up` on a hardened host             {hardened:.2} s to the error that names the sshd setting"
        );
    };
    if std::env::var("PROVISIONER_BENCH_VM").as_deref() != Ok("1") {
        println!("remote: status / ssh -c true skipped (set PROVISIONER_BENCH_VM=1: two more TCG boots)");
        rows(status_ratio, status_before, None);
        return;
    }
    // The repo's box (cached by the VM tier), unless another is given.
    let boxdef = std::env::var("PROVISIONER_BENCH_BOX").unwrap_or_else(|_| {
        let main = std::fs::read_to_string(support::repo().join("box-config.toml")).expect("box-config.toml");
        main[support::box_table(&main)].to_string()
    });
    let shared_cache =
        std::env::var("PROVISIONER_CACHE_DIR").map(std::path::PathBuf::from).unwrap_or_else(|_| {
            std::path::PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/provisioner")
        });
    let mut dirs = Vec::new();
    for (tag, uri) in [("remote", host.uri()), ("local", "qemu:///session".to_string())] {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("provision")).unwrap();
        std::fs::write(
            d.path().join("box-config.toml"),
            format!(
                "[machine]\nname = \"b{tag}{}\"\nprovider = \"libvirt\"\ncpus = 1\nmemory_mb = 1024\ndisk_gb = 4\naccel \
                 = \"tcg\"\n\n{boxdef}\n\n[ssh]\nhost_port = {}\nconnect_timeout_secs = 1500\n\n[[forward]]\nguest = \
                 80\nhost = {}\n\n[provision]\nenabled = false\n\n[libvirt]\nuri = \"{uri}\"\n",
                std::process::id() % 100_000,
                support::free_port(),
                support::free_port()
            ),
        )
        .unwrap();
        dirs.push((tag, d));
    }
    let run = |d: &Path, args: &[&str]| {
        Command::new(support::bin())
            .args(args)
            .current_dir(d)
            .env("HOME", &home)
            .env("PROVISIONER_CACHE_DIR", &shared_cache)
            .output()
            .expect("run provisioner")
    };
    struct Destroy<'a>(Vec<&'a Path>, &'a dyn Fn(&Path, &[&str]) -> std::process::Output);
    impl Drop for Destroy<'_> {
        fn drop(&mut self) {
            for d in &self.0 {
                let _ = (self.1)(d, &["destroy", "-f"]);
            }
        }
    }
    let _g = Destroy(dirs.iter().map(|(_, d)| d.path()).collect(), &run);
    for (tag, d) in &dirs {
        let t = Instant::now();
        let out = run(d.path(), &["up", "--no-provision"]);
        assert!(out.status.success(), "{tag} up: {}", String::from_utf8_lossy(&out.stderr));
        println!("{tag} up --no-provision (cold)      {:>8.1} s", t.elapsed().as_secs_f64());
    }
    let (far, near) = (dirs[0].1.path(), dirs[1].1.path());
    let m = medians(&mut [
        ("remote status", &mut || run(far, &["status"]).status.success()),
        ("local status", &mut || run(near, &["status"]).status.success()),
        ("remote ssh -c true", &mut || run(far, &["ssh", "-c", "true"]).status.success()),
        ("local ssh -c true", &mut || run(near, &["ssh", "-c", "true"]).status.success()),
        ("remote status, remote driver", &mut || {
            Command::new(support::bin())
                .arg("status")
                .current_dir(far)
                .env("HOME", &home)
                .env("PROVISIONER_CACHE_DIR", &shared_cache)
                .env("PROVISIONER_REMOTE_EXEC", "0")
                .output()
                .expect("run provisioner")
                .status
                .success()
        }),
        ("remote status, ssh process", &mut || {
            Command::new(support::bin())
                .arg("status")
                .current_dir(far)
                .env("HOME", &home)
                .env("PROVISIONER_CACHE_DIR", &shared_cache)
                .env("PROVISIONER_REMOTE_EXEC", "ssh")
                .output()
                .expect("run provisioner")
                .status
                .success()
        }),
    ]);
    println!(
        "running machines: remote status {:.2}x local in-process, {:.2}x through an ssh process on the master",
        m[0].as_secs_f64() / m[1].as_secs_f64(),
        m[5].as_secs_f64() / m[1].as_secs_f64()
    );
    let (s, c) = (m[0].as_secs_f64() / m[1].as_secs_f64(), m[2].as_secs_f64() / m[3].as_secs_f64());
    let driver = m[4];
    let res = [(m[0], m[2]), (m[1], m[3])];
    println!(
        "remote/local: status {s:.2}x (remote driver {:.2}x), ssh -c true {c:.2}x",
        driver.as_secs_f64() / res[1].0.as_secs_f64()
    );
    rows(s, driver.as_secs_f64() / res[1].0.as_secs_f64(), Some(c));
}

/// `up` of a new machine on a second host whose sshd has `AllowTcpForwarding no` (a hardened hypervisor host), with
/// the box `image`: the seconds to its error, which must name the setting; no domain may be left on that host.
fn hardened_up(image: &Path) -> f64 {
    let host = NetHost::start_with("AllowTcpForwarding no\n");
    let d = tempfile::tempdir().unwrap();
    let home = d.path().join("home");
    std::fs::create_dir_all(home.join(".ssh")).unwrap();
    std::fs::write(home.join(".ssh/known_hosts"), host.known_hosts_line()).unwrap();
    std::fs::create_dir_all(d.path().join("provision")).unwrap();
    std::fs::write(
        d.path().join("box-config.toml"),
        format!(
            "[machine]\nname = \"hardened\"\nprovider = \"libvirt\"\n[box]\nimage = \"{}\"\n[provision]\nenabled = \
             false\n[libvirt]\nuri = \"{}\"\n",
            image.display(),
            host.uri()
        ),
    )
    .unwrap();
    let t = Instant::now();
    let out = prov(d.path(), &home, &["up"]);
    let secs = t.elapsed().as_secs_f64();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("AllowTcpForwarding yes"),
        "up on the hardened host: {err}"
    );
    assert_eq!(
        host.virsh(&["list", "--all", "--name"]).unwrap().trim(),
        "",
        "a domain was left on the hardened host"
    );
    secs
}

/// `status` of a machine recorded on the far host (its domain absent, so no guest is booted: the cost is the virsh
/// call over SSH) through the host's own virsh and through the remote driver, with and without the shared
/// connection, against the same on this machine's qemu:///session. Returns (remote/local, remote driver/local).
fn status_on_recorded_machines(host: &NetHost, home: &Path) -> (f64, f64) {
    let mut dirs = Vec::new();
    for (tag, uri) in [("remote", host.uri()), ("local", "qemu:///session".to_string())] {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("provision")).unwrap();
        std::fs::create_dir_all(d.path().join(".provisioner")).unwrap();
        std::fs::write(
            d.path().join("box-config.toml"),
            format!(
                "[machine]\nname = \"s{tag}\"\nprovider = \"libvirt\"\n[box]\nimage = \"none.qcow2\"\n[provision]\n\
                 enabled = false\n[libvirt]\nuri = \"{uri}\"\n"
            ),
        )
        .unwrap();
        let state = serde_json::json!({"provider": "libvirt", "vm_name": format!("provisioner-bench-absent-{tag}"),
                                       "ssh_host": "127.0.0.1", "ssh_port": 2299, "libvirt_uri": uri});
        std::fs::write(d.path().join(".provisioner/state.json"), state.to_string()).unwrap();
        dirs.push((tag, d));
    }
    let status_with = |d: &Path, reuse: &str, exec: &str| {
        Command::new(support::bin())
            .arg("status")
            .current_dir(d)
            .env("HOME", home)
            .env("PROVISIONER_CACHE_DIR", d.join("cache"))
            .env("PROVISIONER_SSH_REUSE", reuse)
            .env("PROVISIONER_REMOTE_EXEC", exec)
            .output()
            .expect("run provisioner")
            .status
            .success()
    };
    let status = |d: &Path, reuse: &str| status_with(d, reuse, "1");
    let (remote, local) = (dirs[0].1.path(), dirs[1].1.path());
    let logins = host.sshd_logins();
    let cold = median("remote status, no reuse", || status(remote, "0"));
    let without = host.sshd_logins() - logins;
    let logins = host.sshd_logins();
    // Before and after, round-robin: libvirt's remote driver (virt-ssh-helper) on the shared connection, the
    // host's own virsh through an `ssh` process on the master (`PROVISIONER_REMOTE_EXEC=ssh`), then in-process
    // through the master's control socket (the default).
    let m = medians_of(
        STATUS_ROUNDS,
        &mut [
            ("remote status, remote driver", &mut || status_with(remote, "1", "0")),
            ("remote status, ssh process", &mut || status_with(remote, "1", "ssh")),
            ("remote status, shared connection", &mut || status(remote, "1")),
            ("local status (qemu:///session)", &mut || status(local, "1")),
        ],
    );
    let (driver, ssh, warm, here) = (m[0], m[1], m[2], m[3]);
    let with = host.sshd_logins() - logins;
    // Where a call's time goes: one command on the host through the master in this process (the host's session:
    // sshd's fork, the login shell, sh) and through a plain `ssh` process on the master (+ the client's start).
    std::env::set_var("PROVISIONER_CACHE_DIR", remote.join("cache"));
    let far = provisioner::host::remote::parse(&format!(
        "{}&known_hosts={}",
        host.uri(),
        home.join(".ssh/known_hosts").display()
    ))
    .unwrap();
    let t = Duration::from_secs(30);
    medians_of(
        STATUS_ROUNDS,
        &mut [
            ("  `true` on the host, in-process", &mut || {
                far.through_master(&["true"], None, t).unwrap().is_some_and(|o| o.success())
            }),
            ("  `true` on the host, ssh process", &mut || {
                far.exec(&["true"]).timeout(t).output().unwrap().success()
            }),
            ("  `virsh` on the host, in-process", &mut || {
                far.through_master(
                    &["virsh", "-q", "-c", "qemu:///system", "domstate", "--", "absent"],
                    None,
                    t,
                )
                .unwrap()
                .is_some()
            }),
        ],
    );
    println!(
        "remote/local status: {:.2}x with the shared connection in-process (ssh process {:.2}x, remote driver \
         {:.2}x; {with} SSH logins for {} calls), {:.2}x without ({without} logins)",
        warm.as_secs_f64() / here.as_secs_f64(),
        ssh.as_secs_f64() / here.as_secs_f64(),
        driver.as_secs_f64() / here.as_secs_f64(),
        3 * STATUS_ROUNDS,
        cold.as_secs_f64() / here.as_secs_f64()
    );
    // The master would outlive the bench for ControlPersist: close it.
    let out = Command::new(support::bin())
        .args(["destroy", "-f"])
        .current_dir(remote)
        .env("HOME", home)
        .env("PROVISIONER_CACHE_DIR", remote.join("cache"))
        .output()
        .expect("run provisioner");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    (warm.as_secs_f64() / here.as_secs_f64(), driver.as_secs_f64() / here.as_secs_f64())
}
