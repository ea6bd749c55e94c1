//! Tests: guest provisioning and health.
//!
//! Fast tier: the container base image really built on the host (debootstrap; cached by input key in
//! `$PROVISIONER_CACHE_DIR/images`, so only the first run pays ~2 min), and `provisioner health` against a real
//! Prometheus and HTTP listeners on loopback. VM tier (`#[ignore = "vm: ..."]`): the whole lab in a libvirt guest.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::support::{free_port, wait_until, Proc, Test};

#[test]
fn base_image_tarball_is_built_once_trimmed_and_complete() {
    use provisioner::guest::images::BaseImage;
    let cfg = provisioner::config::Config::from_bytes(
        std::path::Path::new("box-config.toml"),
        b"[machine]\nname = \"t\"\n[box.debian]\n",
    )
    .unwrap();
    let base = BaseImage::for_config(&cfg, &provisioner::lab::PROFILE);
    let never = std::sync::atomic::AtomicBool::new(false);
    base.ensure_tarball(&|_| {}, &never).expect("build the base image");
    assert!(!base.ensure_tarball(&|_| {}, &never).unwrap(), "second call must reuse the cached tarball");
    let size = std::fs::metadata(base.tarball()).unwrap().len();
    assert!(size < 350 << 20, "base image is {} MB; trimming regressed", size >> 20);
    let mut names = std::collections::BTreeSet::new();
    let mut ar = tar::Archive::new(std::fs::File::open(base.tarball()).unwrap());
    for e in ar.entries().unwrap() {
        names.insert(e.unwrap().path().unwrap().to_string_lossy().trim_start_matches("./").to_string());
    }
    for needed in [
        "usr/bin/prometheus",
        "usr/bin/prometheus-alertmanager",
        "usr/bin/prometheus-node-exporter",
        "usr/bin/gunicorn",
        "usr/bin/curl",
        "usr/lib/python3/dist-packages/flask/__init__.py",
        "usr/lib/python3/dist-packages/prometheus_client/__init__.py",
    ] {
        assert!(names.contains(needed), "{needed} missing from the base image");
    }
    assert!(!names.iter().any(|n| n.starts_with("usr/share/doc/") && n.len() > "usr/share/doc/".len()));
    assert!(!names.iter().any(|n| n.starts_with("var/lib/apt/lists/") && n.ends_with("Packages")));
}

/// The background build `up` starts while the guest boots, with a stand-in `debootstrap` first on PATH (the real
/// build script runs; only the download is replaced). Returns the cache dir, the stand-in's pid file, and the
/// base image. Needs root (the script runs under `sudo -n` otherwise, which resets PATH): None without it.
fn host_build_bench(
    debootstrap_body: &str,
) -> Option<(tempfile::TempDir, std::path::PathBuf, provisioner::guest::images::BaseImage)> {
    use std::os::unix::fs::PermissionsExt;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: the host-side build runs the script directly only as root");
        return None;
    }
    let t = tempfile::tempdir().unwrap();
    let bin = t.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let pidfile = t.path().join("debootstrap.pid");
    let fake = bin.join("debootstrap");
    std::fs::write(&fake, format!("#!/bin/sh\necho $$ > {}\n{debootstrap_body}\n", pidfile.display()))
        .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    // Each nextest test is its own process: the environment is this test's alone.
    std::env::set_var("PATH", format!("{}:{}", bin.display(), std::env::var("PATH").unwrap()));
    std::env::set_var("PROVISIONER_CACHE_DIR", t.path().join("cache"));
    let cfg = provisioner::config::Config::from_bytes(
        Path::new("box-config.toml"),
        b"[machine]\nname = \"t\"\n[box.debian]\n",
    )
    .unwrap();
    Some((t, pidfile, provisioner::guest::images::BaseImage::for_config(&cfg, &provisioner::lab::PROFILE)))
}

fn work_dirs(base: &provisioner::guest::images::BaseImage) -> Vec<String> {
    std::fs::read_dir(base.tarball().parent().unwrap())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".work."))
        .collect()
}

#[test]
fn host_build_dropped_midway_kills_the_build_and_removes_its_work_dir() {
    use provisioner::guest::images::HostBuild;
    let Some((_t, pidfile, base)) = host_build_bench("echo downloading; sleep 600") else { return };
    let build = HostBuild::start(&base).expect("a build starts when nothing is cached");
    let pid: i32 = wait_until(Duration::from_secs(30), "the stand-in debootstrap to run", || {
        std::fs::read_to_string(&pidfile).ok().and_then(|s| s.trim().parse().ok())
    });
    assert_eq!(work_dirs(&base).len(), 1, "the script made its work dir");
    let t = std::time::Instant::now();
    drop(build); // what an error elsewhere in `up` does
    assert!(t.elapsed() < Duration::from_secs(10), "cancel took {:?}", t.elapsed());
    // Gone, or a zombie waiting for init to reap it (killed: it cannot run again).
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state =
        stat.rsplit(')').next().and_then(|r| r.split_whitespace().next()).unwrap_or("gone").to_string();
    assert!(
        state == "gone" || state == "Z",
        "debootstrap {pid} outlived the cancelled build (state {state})"
    );
    assert!(work_dirs(&base).is_empty(), "work dir left: {:?}", work_dirs(&base));
    assert!(!base.tarball().exists());
}

#[test]
fn host_build_failure_is_reported_at_the_join_with_the_output_and_a_hint() {
    use provisioner::guest::images::HostBuild;
    let Some((_t, _pid, base)) = host_build_bench("echo 'E: Failed getting release file' >&2; exit 1") else {
        return;
    };
    let build = HostBuild::start(&base).expect("a build starts");
    let ui = provisioner::ui::Ui::new(false, true);
    let e = format!("{:#}", build.join(&ui.phase("images")).unwrap_err());
    assert!(e.contains("E: Failed getting release file"), "{e}");
    assert!(e.contains("hint:") && e.contains("debootstrap"), "{e}");
    assert!(work_dirs(&base).is_empty(), "work dir left: {:?}", work_dirs(&base));
    // A cached tarball means no build at all.
    std::fs::write(base.tarball(), b"cached").unwrap();
    assert!(HostBuild::start(&base).is_none());
}

/// A loopback HTTP server answering every request with `status`; runs until the test ends.
fn http_stub(status: u16) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let mut buf = [0u8; 2048];
            let _ = s.read(&mut buf);
            let _ = write!(s, "HTTP/1.1 {status} X\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok");
        }
    });
    port
}

/// A real Prometheus on loopback scraping itself every second.
fn prometheus(t: &Test) -> (Proc, u16) {
    let port = free_port();
    t.write(
        "prom/prometheus.yml",
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: prometheus\n    static_configs:\n      \
             - targets: ['127.0.0.1:{port}']\n"
        ),
    );
    let mut cmd = Command::new("prometheus");
    cmd.arg(format!("--config.file={}", t.path().join("prom/prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", t.path().join("prom/data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"));
    let p = Proc::spawn("prometheus", cmd, t.path().join("prometheus.log"));
    wait_until(Duration::from_secs(60), "prometheus ready", || {
        ureq::get(&format!("http://127.0.0.1:{port}/-/ready")).call().ok()
    });
    (p, port)
}

/// A config whose forwards reach the given host ports, with a lab of three services (grafana offline-only).
fn health_lab(t: &Test, prom: u16, app: u16) {
    t.write(
        "box-config.toml",
        format!(
            "[machine]\nname = \"h{app}\"\n[box.debian]\n[ssh]\nhost_port = {ssh}\n\
             [[forward]]\nguest = 9090\nhost = {prom}\n[[forward]]\nguest = 8000\nhost = {app}\n\
             [provision]\nimages = \"debian\"\n",
            ssh = free_port()
        ),
    );
    t.write(
        "provision/docker-compose.yml",
        "services:\n  demo-app:\n    build: ./demo-app\n  prometheus:\n    build: ./prometheus\n  \
         grafana:\n    image: grafana/grafana\n    profiles: [registry]\n",
    );
}

#[test]
fn health_fails_on_a_dead_service_and_shows_offline_ones() {
    let t = Test::new();
    let (_prom, prom_port) = prometheus(&t);
    let dead = free_port();
    health_lab(&t, prom_port, dead);
    let run = Test::new().cwd(t.path()).args(["health", "--timeout", "12", "--json"]).run();
    assert_eq!(run.code(), Some(3), "exit code UNHEALTHY expected:\n{}\n{}", run.stdout(), run.stderr());
    let doc: serde_json::Value = run
        .stdout()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "health")
        .expect("a health document");
    let svc = |name: &str| {
        doc["services"].as_array().unwrap().iter().find(|s| s["service"] == name).unwrap().clone()
    };
    assert_eq!(svc("prometheus")["verdict"], "healthy", "{doc}");
    assert!(svc("prometheus")["detail"].as_str().unwrap().contains("targets 1/1 up"), "{doc}");
    assert_eq!(svc("demo-app")["verdict"], "unhealthy");
    assert_eq!(svc("demo-app")["probe"]["error"], "connection refused");
    assert_eq!(svc("grafana")["verdict"], "unavailable_offline");
    assert_eq!(doc["healthy"], false);
}

#[test]
fn health_table_is_green_when_every_available_service_answers() {
    let t = Test::new();
    let (_prom, prom_port) = prometheus(&t);
    health_lab(&t, prom_port, http_stub(200));
    let run = Test::new().cwd(t.path()).args(["health", "--timeout", "30"]).run().success();
    let out = run.stdout();
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("SERVICE") && lines[0].contains("LATENCY"), "{out}");
    assert!(out.contains("✓ demo-app") && out.contains("✓ prometheus"), "{out}");
    assert!(out.contains("- grafana") && out.contains("unavailable offline"), "{out}");
    assert!(out.contains("healthy: every available service is up (1 unavailable offline)"), "{out}");
    // The probe checks the status: a 500 from the app turns it red.
    health_lab(&t, prom_port, http_stub(500));
    Test::new()
        .cwd(t.path())
        .args(["health", "--timeout", "3"])
        .run()
        .failure()
        .stdout_contains("HTTP 500, expected 200");
}

/// The VM tier: from no state to a green table and a delivered alert, then the idempotence checks, then the
/// registry cases (tests/registry_vm.rs). The box is one Vagrant users bring (issue 20): the test box made into a
/// Vagrant-style box without cloud-init (user `vagrant` with Vagrant's insecure keys, cloud-init disabled), named by
/// `[box] vagrant` in the shipped config, so its keys go into the machine's disk before the first boot. The other
/// VM tests (cluster, remote, snapshots, lifecycle) run the cloud-init box.
#[test]
#[ignore = "vm: boots a libvirt guest from a Vagrant-style box and provisions the whole lab (cold: ~15-25 min under TCG)"]
fn vm_up_verify_reprovision_destroy() {
    let t = Test::with_lab();
    let cfg_path = t.path().join("box-config.toml");
    let text = std::fs::read_to_string(&cfg_path).unwrap();
    let box_src = tempfile::tempdir().unwrap();
    let box_file = crate::inject::vagrant_box_from_test_box(box_src.path());
    let box_img_sha = {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("tar -xOf '{}' box.img | sha256sum", box_file.display()))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap().to_string()
    };
    // `[box.debian]` (four lines) becomes `[box] vagrant = FILE`.
    let debian = text.find("[box.debian]\n").expect("the shipped config builds its box from Debian");
    let end = debian + text[debian..].find("\n\n").unwrap() + 1;
    let text = format!("{}[box]\nvagrant = \"{}\"\n{}", &text[..debian], box_file.display(), &text[end..]);
    // Unique free host ports per test (the repo's config uses fixed ones); free_port() may hand out the same
    // port twice, so draw until they differ.
    let mut ports = std::collections::BTreeSet::new();
    let mut port = || loop {
        let p = free_port();
        if ports.insert(p) {
            return p;
        }
    };
    let mut text = text.replace("host_port = 2222", &format!("host_port = {}", port()));
    for p in [8000, 9090, 9093, 3000, 9100, 8080] {
        text = text.replace(&format!("host = {p}\n"), &format!("host = {}\n", port()));
    }
    std::fs::write(&cfg_path, text).unwrap();
    let run = |args: &[&str]| Test::new().cwd(t.path()).args(args.iter().copied()).run();
    // Whatever fails below, the VM is destroyed (a no-op once the test's own `destroy -f` ran).
    struct Destroy<'a>(&'a Path);
    impl Drop for Destroy<'_> {
        fn drop(&mut self) {
            if self.0.join(".provisioner").exists() {
                let r = Test::new().cwd(self.0).args(["destroy", "-f"]).run();
                if !r.out.status.success() {
                    eprintln!("cleanup destroy failed: {}", r.stderr());
                }
            }
        }
    }
    let _cleanup = Destroy(t.path());

    // Ctrl-C on the first `up` once its images phase starts (the base image is being built on the host or streamed
    // into the guest's Docker): it stops with 130 within seconds, no process of that run is left (whatever ran in
    // its own process group was killed with it), and the next `up` completes from there to the green table.
    interrupt_up_in_images_phase(t.path());
    let up = run(&["up"]).success();
    let table = up.stdout();
    for svc in ["demo-app", "prometheus", "alertmanager", "node-exporter"] {
        assert!(table.contains(&format!("✓ {svc}")), "{svc} not healthy:\n{table}\n{}", up.stderr());
    }
    // The keys went in through the disk (the interrupted `up` created the machine), the insecure key is refused,
    // and the host key is the one pinned at the first connection.
    let first = std::fs::read_to_string(t.path().join("up-interrupted.log")).unwrap();
    assert!(
        first.contains("disk (cloud-init is disabled in the box): machine key written for vagrant, 2 insecure keys removed, host key set"),
        "no disk-route keys line in the first `up`:\n{first}"
    );
    let ssh_port: u16 = std::fs::read_to_string(&cfg_path)
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("host_port = "))
        .and_then(|p| p.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap();
    crate::inject::insecure_key_refused_and_host_key_pinned(t.path(), "vagrant", ssh_port);
    // `[ssh] user` is the shipped "provisioner", which this box does not have: the key went to `vagrant`, and
    // every session logs in as it (the hostname is the machine's, set without cloud-init).
    let who = run(&["ssh", "-c", "id -un; hostname"]).success();
    assert_eq!(who.stdout(), "vagrant\nlab\n");
    for svc in ["grafana", "cadvisor"] {
        assert!(table
            .lines()
            .any(|l| l.starts_with(&format!("- {svc}")) && l.contains("unavailable offline")));
    }

    run(&["verify", "--alert", "AppHighErrorRate", "--timeout", "900"])
        .success()
        .stdout_contains("delivered");

    // When each compose service's container last started, as the guest's Docker reports it.
    let started = || -> std::collections::BTreeMap<String, String> {
        let cmd = "sudo -n docker ps -q | xargs sudo -n docker inspect -f \
                   '{{index .Config.Labels \"com.docker.compose.service\"}} {{.State.StartedAt}}'";
        let out = run(&["ssh", "-c", cmd]).success();
        out.stdout()
            .lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(svc, at)| (svc.to_string(), at.trim().to_string()))
            .collect()
    };
    let before = started();
    assert!(before.contains_key("prometheus") && before.contains_key("demo-app"), "{before:?}");

    // Unchanged: nothing uploaded, built or restarted; the table again.
    let again = run(&["up", "--json"]).success();
    assert!(again.stdout().contains("\"event\":\"provision_skipped\""), "{}", again.stdout());
    assert!(again.stdout().contains("\"event\":\"health\""));
    assert_eq!(started(), before, "an unchanged `up` restarted a container");
    // ... and its checks went to the guest in one round trip: cloud-init, Docker, forwards, image mode and manifest
    // were answered by that one exec (each health round that was not green asks again). The running services and
    // the health round's container states came from the Engine API through the connection (the first `up` put
    // the SSH user in the docker group; this is a new login): the list sent ahead, then each inspect.
    let counts = again
        .stdout()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "run_counts")
        .unwrap_or_else(|| panic!("no run_counts event: {}", again.stdout()));
    let (execs, served) =
        (counts["guest_execs"].as_u64().unwrap(), counts["guest_execs_prefetched"].as_u64().unwrap());
    let not_green_rounds = again.stdout().matches("\"event\":\"health_waiting\"").count() as u64;
    let gets = counts["guest_socket_gets"].as_u64().unwrap();
    assert!(served >= 5, "{counts}");
    assert!(gets >= 2, "the container states were not read through the connection: {counts}");
    assert_eq!(
        execs,
        1 + not_green_rounds,
        "one exec, and one per health round that was not green: {counts}"
    );

    // One edited file: only it is uploaded.
    let rules = t.path().join("provision/prometheus/alert.rules.yml.hbs");
    let mut r = std::fs::read_to_string(&rules).unwrap();
    r.push_str("\n# edited by the test\n");
    std::fs::write(&rules, r).unwrap();
    let prov = run(&["provision", "--json"]).success();
    let upload = prov
        .stdout()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "upload")
        .expect("upload event");
    assert_eq!(upload["changed"], serde_json::json!(["prometheus/alert.rules.yml"]), "{upload}");
    assert_eq!(upload["added"], serde_json::json!([]));
    // Only the service that reads the rules restarted; every other container kept running untouched.
    let after = started();
    let restarted: Vec<&String> = after.keys().filter(|svc| before.get(*svc) != after.get(*svc)).collect();
    assert_eq!(restarted, ["prometheus"], "before {before:?}\nafter {after:?}");

    // images = "auto" against a real registry, on this running guest (tests/registry_vm.rs): no boot of its own.
    crate::registry_vm::registry_cases(t.path(), &run);

    run(&["destroy", "-f"]).success();
    assert!(!t.path().join(".provisioner").exists(), "destroy left the state dir");
    // The cached box is byte-identical to the box.img of the .box it came from; then it leaves the shared cache.
    let cached = std::fs::read_dir(crate::support::cache_dir().join("boxes"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|d| {
            std::fs::read_to_string(d.join("box.json"))
                .is_ok_and(|j| j.contains(&*box_file.display().to_string()))
        })
        .expect("the Vagrant-style box in the cache");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(cached.join("box.json")).unwrap()).unwrap();
    let disk = cached.join(meta["disk"].as_str().unwrap());
    assert_eq!(crate::inject::sha256_file(&disk), box_img_sha, "the cached box changed");
    let id = meta["id"].as_str().unwrap();
    run(&["box", "remove", &id[..12]]).success();
}

/// Start `up --json` in `dir`, SIGINT it when its `images` phase starts, and check it ends as a clean cancellation.
fn interrupt_up_in_images_phase(dir: &Path) {
    use std::os::unix::process::CommandExt;
    let marker = format!("PROVISIONER_TEST_RUN=guest-images-{}", std::process::id());
    let (key, value) = marker.split_once('=').unwrap();
    let mut c = Command::new(crate::support::bin());
    c.args(["--json", "up"])
        .current_dir(dir)
        .env("PROVISIONER_CACHE_DIR", crate::support::cache_dir())
        .env(key, value);
    // SAFETY: only async-signal-safe signal(2) between fork and exec: a runner started in the background may have
    // left SIGINT ignored, and `up` must see it as a user's Ctrl-C would.
    unsafe {
        c.pre_exec(|| {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            Ok(())
        });
    }
    let mut up = Proc::spawn("up (to interrupt)", c, dir.join("up-interrupted.log"));
    let started = std::time::Instant::now();
    wait_until(Duration::from_secs(1800), "the images phase of the first `up`", || {
        if let Some(st) = up.child.try_wait().unwrap() {
            panic!("`up` ended before its images phase ({st}):\n{}", up.log_text());
        }
        up.log_text().contains(r#"{"event":"phase_start","phase":"images"}"#).then_some(())
    });
    eprintln!("images phase reached after {:?}; sending SIGINT", started.elapsed());
    let signalled = std::time::Instant::now();
    // SAFETY: kill(2) on the child we started.
    unsafe { libc::kill(up.child.id() as i32, libc::SIGINT) };
    let st =
        wait_until(Duration::from_secs(60), "the interrupted `up` to exit", || up.child.try_wait().unwrap());
    eprintln!("interrupted `up` exited ({st}) {:?} after SIGINT", signalled.elapsed());
    assert_eq!(st.code(), Some(130), "{}", up.log_text());
    assert!(up.log_text().contains(r#""event":"interrupted""#), "{}", up.log_text());
    // libvirt's session daemons, when the run's first virsh call started them, inherit its environment and stay
    // by design, as does the reaper the daemon runs under (`provisioner __reap`); anything else carrying the
    // marker is an orphan of the interrupted run.
    wait_until(Duration::from_secs(15), "no orphan of the interrupted `up`", || {
        let left: Vec<String> = crate::support::processes_with_env(&marker)
            .into_iter()
            .filter(|p| {
                let (pid, comm) = p.split_once(' ').unwrap_or((p.as_str(), ""));
                let reaper = std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| c.split(|b| *b == 0).nth(1) == Some(b"__reap".as_slice()));
                !(comm.starts_with("virt") || comm == "libvirtd" || reaper)
            })
            .collect();
        left.is_empty().then_some(()).or_else(|| {
            eprintln!("still running: {left:?}");
            None
        })
    });
}
