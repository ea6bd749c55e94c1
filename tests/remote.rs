//! Remote libvirt hosts (docs/remote.md) against a real second host: a network namespace with its own sshd and
//! libvirtd and private storage ([`crate::support::nethost::NetHost`]). Fast tier: the host key check (unknown and
//! changed keys refused by the real sshd's key), the box uploaded into the host's pool once (0 bytes the second
//! time), an interrupted upload redone, `box remove --host`. The VM test is `vm::vm_remote_up_ssh_destroy`.

use std::path::Path;
use std::process::Command;

use crate::support::nethost::{self, NetHost};
use crate::support::Test;

/// A small bootable-looking box (ext4 at its start, some MiB of data): `tiny.qcow2` in `dir`.
pub fn tiny_box(dir: &Path) {
    let raw = dir.join("tiny.raw");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let bytes: Vec<u8> = (0..6u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    std::fs::write(data.join("payload"), bytes).unwrap();
    let ok = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "rootfs", "-d"])
        .arg(&data)
        .arg(&raw)
        .arg("16M")
        .status()
        .unwrap();
    assert!(ok.success(), "mkfs.ext4");
    let ok = Command::new("qemu-img")
        .args(["convert", "-q", "-O", "qcow2"])
        .arg(&raw)
        .arg(dir.join("tiny.qcow2"))
        .status()
        .unwrap();
    assert!(ok.success(), "qemu-img convert");
}

/// A project on the remote host with the tiny box, its own HOME (known_hosts) and box cache.
fn project(host: &NetHost) -> Test {
    let t = Test::new();
    tiny_box(t.path());
    t.write(
        "box-config.toml",
        format!(
            "[machine]\nname = \"far\"\nprovider = \"libvirt\"\n[box]\nimage = \"tiny.qcow2\"\n[provision]\nenabled = false\n[libvirt]\nuri = \
             \"{}\"\npool = \"provtest\"\n",
            host.uri()
        ),
    );
    std::fs::create_dir_all(t.path().join("home/.ssh")).unwrap();
    std::fs::create_dir_all(t.path().join("provision")).unwrap();
    t
}

fn run(t: &Test, args: &[&str]) -> crate::support::Run {
    Test::new()
        .cwd(t.path())
        .env("HOME", t.path().join("home").to_string_lossy())
        .env("PROVISIONER_CACHE_DIR", t.path().join("cache").to_string_lossy())
        .args(args.iter().copied())
        .run()
}

#[test]
fn remote_host_key_unknown_or_changed_is_refused() {
    if !nethost::available() {
        panic!("the remote-host fixture needs root, libvirtd, virtlogd, sshd and virt-ssh-helper");
    }
    let host = NetHost::start();
    let t = project(&host);
    // Unknown: refused before any connection, with the command that adds it.
    let keyscan = format!("ssh-keyscan {} ", host.addr);
    run(&t, &["validate"])
        .failure()
        .stderr_contains("is not in")
        .stderr_contains(&keyscan)
        .stderr_contains("hint:");
    run(&t, &["box", "upload"]).failure().stderr_contains("never accepts an unknown host key");
    // Known under a different key: the real sshd's key does not match, and OpenSSH (through the tool's
    // wrapper) refuses; nothing was uploaded.
    let other = tempfile::tempdir().unwrap();
    let k = other.path().join("k");
    assert!(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", ""])
        .arg("-f")
        .arg(&k)
        .status()
        .unwrap()
        .success());
    let wrong = std::fs::read_to_string(k.with_extension("pub")).unwrap();
    let wrong: Vec<&str> = wrong.split_whitespace().take(2).collect();
    t.write("home/.ssh/known_hosts", format!("{} {}\n", host.addr, wrong.join(" ")));
    run(&t, &["validate"]).success();
    run(&t, &["box", "upload"]).failure().stderr_contains("has CHANGED").stderr_contains("ssh-keygen -R");
    assert!(host.volumes("provtest").is_empty(), "nothing reached the host: {:?}", host.volumes("provtest"));
    // The right key (hashed, as `ssh-keyscan -H` writes it): accepted.
    t.write("home/.ssh/known_hosts", host.known_hosts_line());
    let kh = t.path().join("home/.ssh/known_hosts");
    assert!(Command::new("ssh-keygen").arg("-H").arg("-f").arg(&kh).output().unwrap().status.success());
    assert!(!std::fs::read_to_string(&kh).unwrap().contains(&host.addr), "hashed");
    run(&t, &["box", "upload"]).success().stdout_contains("bytes sent");
}

/// `box upload` interrupted mid-stream (a slow link): the partial volume is deleted on the host within the
/// deadline and the message says so; with the link gone it cannot be, and the message says it stays and that the
/// next upload replaces it, which it does.
#[test]
fn remote_box_upload_interrupted_says_what_stays_on_the_host() {
    if !nethost::available() {
        panic!("the remote-host fixture needs root, libvirtd, virtlogd, sshd and virt-ssh-helper");
    }
    let host = NetHost::start();
    let t = project(&host);
    t.write("home/.ssh/known_hosts", host.known_hosts_line());
    let bytes = std::fs::read(t.path().join("tiny.qcow2")).unwrap();
    let id = {
        use sha2::{Digest, Sha256};
        hex::encode(Sha256::digest(&bytes))
    };
    let vol = format!("box-{id}.qcow2");
    // Interrupt `box upload` once its volume exists on the host (the stream has begun); `cut` runs just before.
    let interrupted = |round: &str, cut: &dyn Fn()| -> (Option<i32>, String) {
        let mut c = Command::new(crate::support::bin());
        c.args(["box", "upload"])
            .current_dir(t.path())
            .env("HOME", t.path().join("home"))
            .env("PROVISIONER_CACHE_DIR", t.path().join("cache"));
        // SAFETY: only async-signal-safe signal(2) between fork and exec (a background runner may ignore SIGINT).
        unsafe {
            use std::os::unix::process::CommandExt;
            c.pre_exec(|| {
                libc::signal(libc::SIGINT, libc::SIG_DFL);
                Ok(())
            });
        }
        let mut p =
            crate::support::Proc::spawn("box upload", c, t.path().join(format!("upload-{round}.log")));
        crate::support::wait_until(std::time::Duration::from_secs(60), "the upload to start", || {
            if let Some(st) = p.child.try_wait().unwrap() {
                panic!("box upload ended before the interrupt ({st}):\n{}", p.log_text());
            }
            host.volumes("provtest").contains(&vol).then_some(())
        });
        cut();
        // SAFETY: kill(2) on the child we started.
        unsafe { libc::kill(p.child.id() as i32, libc::SIGINT) };
        let st = crate::support::wait_until(std::time::Duration::from_secs(30), "box upload to exit", || {
            p.child.try_wait().unwrap()
        });
        (st.code(), p.log_text())
    };
    host.throttle(Some("16mbit"));
    let (code, log) = interrupted("deleted", &|| {});
    assert_eq!(code, Some(130), "{log}");
    let last: Vec<&str> = log.lines().rev().take(2).collect();
    assert_eq!(
        last,
        [
            "hint: run the same command again; it continues from the last consistent state",
            &*format!(
                "error: interrupted by SIGINT: child processes were stopped and the partial volume {vol} was deleted \
                 from the pool provtest on root@{}",
                host.addr
            ),
        ],
        "{log}"
    );
    assert!(!host.volumes("provtest").contains(&vol), "{:?}", host.volumes("provtest"));

    // The link goes down mid-stream: the partial volume cannot be deleted, and the message says it stays.
    let (code, log) = interrupted("kept", &|| host.link(false));
    assert_eq!(code, Some(130), "{log}");
    let err = log.lines().rev().nth(1).unwrap_or_default();
    assert!(
        err.starts_with(&format!(
            "error: interrupted by SIGINT: child processes were stopped and the partial volume {vol} stays in the \
             pool provtest on root@{} (deleting it within 10 s failed: ",
            host.addr
        )) && err.ends_with("); the next `box upload` or `up` deletes it and sends the box again"),
        "{log}"
    );
    host.link(true);
    host.throttle(None);
    let vols = host.volumes("provtest");
    assert!(
        vols.contains(&vol) && !vols.contains(&format!("box-{id}.done")),
        "the partial volume stays: {vols:?}"
    );
    let redo = run(&t, &["--json", "box", "upload"]).success();
    let doc: serde_json::Value = serde_json::from_str(redo.stdout().lines().last().unwrap()).unwrap();
    assert_eq!(doc["bytes_sent"], bytes.len(), "{}", redo.stdout());
    let path = host.virsh(&["vol-path", "--pool", "provtest", &vol]).unwrap();
    assert!(
        host.exec(&["sha256sum", path.trim()]).unwrap().starts_with(&id),
        "the next upload replaced it whole"
    );
}

#[test]
fn remote_box_upload_once_per_host_then_remove() {
    if !nethost::available() {
        panic!("the remote-host fixture needs root, libvirtd, virtlogd, sshd and virt-ssh-helper");
    }
    let host = NetHost::start();
    let t = project(&host);
    t.write("home/.ssh/known_hosts", host.known_hosts_line());
    run(&t, &["validate"]).success();
    let size = std::fs::metadata(t.path().join("tiny.qcow2")).unwrap().len();
    let first = run(&t, &["--json", "box", "upload"]).success();
    let doc: serde_json::Value = serde_json::from_str(first.stdout().lines().last().unwrap()).unwrap();
    assert_eq!(doc["bytes_sent"], size, "{}", first.stdout());
    let id = doc["id"].as_str().unwrap().to_string();
    let vols = host.volumes("provtest");
    assert!(
        vols.contains(&format!("box-{id}.qcow2")) && vols.contains(&format!("box-{id}.done")),
        "{vols:?}"
    );
    // The volume holds the box's bytes (read on the host, not through the tool).
    let path = host.virsh(&["vol-path", "--pool", "provtest", &format!("box-{id}.qcow2")]).unwrap();
    let there = host.exec(&["sha256sum", path.trim()]).unwrap();
    assert!(there.starts_with(&id), "the volume holds the box's bytes: {there} vs {id}");
    assert!(
        !Path::new(path.trim()).exists(),
        "the pool is in the host's private storage, not on this filesystem"
    );

    // Second time: nothing sent.
    let again = run(&t, &["--json", "box", "upload"]).success();
    let doc: serde_json::Value = serde_json::from_str(again.stdout().lines().last().unwrap()).unwrap();
    assert_eq!(doc["bytes_sent"], 0, "{}", again.stdout());

    // An interrupted upload (data volume without its completion marker) is sent again, whole.
    host.virsh(&["vol-delete", "--pool", "provtest", &format!("box-{id}.done")]).unwrap();
    let redo = run(&t, &["--json", "box", "upload"]).success();
    let doc: serde_json::Value = serde_json::from_str(redo.stdout().lines().last().unwrap()).unwrap();
    assert_eq!(doc["bytes_sent"], size, "{}", redo.stdout());

    // A lost connection: a clear error, then the next run completes (the incomplete box is sent again).
    host.virsh(&["vol-delete", "--pool", "provtest", &format!("box-{id}.done")]).unwrap();
    host.link(false);
    let t0 = std::time::Instant::now();
    run(&t, &["box", "upload"])
        .failure()
        .stderr_contains("is not reachable over SSH")
        .stderr_contains("hint:");
    assert!(t0.elapsed() < std::time::Duration::from_secs(60), "a dead host must fail within a minute");
    host.link(true);
    let redo = run(&t, &["--json", "box", "upload"]).success();
    let doc: serde_json::Value = serde_json::from_str(redo.stdout().lines().last().unwrap()).unwrap();
    assert_eq!(doc["bytes_sent"], size, "{}", redo.stdout());

    // A box a machine's disk is backed by is not removed: the volume is named, nothing is deleted.
    let backing = format!("box-{id}.qcow2");
    host.virsh(&[
        "vol-create-as",
        "--pool",
        "provtest",
        "--name",
        "m-disk.qcow2",
        "--capacity",
        "1G",
        "--format",
        "qcow2",
        "--backing-vol",
        &backing,
        "--backing-vol-format",
        "qcow2",
    ])
    .unwrap();
    run(&t, &["box", "remove", &id[..12], "--host", &host.uri()])
        .failure()
        .stderr_contains("is in use by the volume m-disk.qcow2")
        .stderr_contains("hint:");
    assert!(host.volumes("provtest").contains(&backing), "the box stays while used");
    host.virsh(&["vol-delete", "--pool", "provtest", "m-disk.qcow2"]).unwrap();

    // `box remove --host` removes it from the pool (the local cache keeps it).
    run(&t, &["box", "remove", &id[..12], "--host", &host.uri()]).success();
    let left: Vec<String> = host.volumes("provtest").into_iter().filter(|v| v.starts_with("box-")).collect();
    assert!(left.is_empty(), "{left:?}");
    run(&t, &["box", "list"]).success().stdout_contains(&id[..12]);
    // A local URI is not a host to upload to.
    run(&t, &["box", "upload", "--host", "qemu:///session"])
        .failure()
        .stderr_contains("not a remote libvirt host");
}

/// A machine project on `host` booting the `[box]` table `box_toml`, with free ports (mirrored locally too).
fn remote_machine(host: &NetHost, name: &str, box_toml: &str) -> Test {
    let t = Test::new();
    t.write(
        "box-config.toml",
        format!(
            "[machine]\nname = \"{name}\"\nprovider = \"libvirt\"\ncpus = 2\nmemory_mb = 1024\ndisk_gb = 8\naccel = \
             \"tcg\"\n\n{box_toml}\n[ssh]\nhost_port = {}\nconnect_timeout_secs = 1500\n\n[[forward]]\nname = \
             \"web\"\nguest = 80\nhost = {}\n\n[provision]\nenabled = false\n\n[libvirt]\nuri = \"{}\"\n",
            crate::support::free_port(),
            crate::support::free_port(),
            host.uri()
        ),
    );
    std::fs::create_dir_all(t.path().join("provision")).unwrap();
    t
}

/// The repo's lab (box-config.toml and provision/) as a machine on `host`, booting the `[box]` table `box_toml`,
/// with free host ports (bound on the far host's 127.0.0.1, reached through the SSH tunnel).
fn remote_lab(host: &NetHost, name: &str, box_toml: &str) -> Test {
    let t = Test::with_lab();
    let mut cfg = std::fs::read_to_string(t.path().join("box-config.toml")).unwrap();
    cfg = crate::support::with_box(&cfg, box_toml);
    cfg = cfg
        .replace("name = \"lab\"", &format!("name = \"{name}\""))
        .replace("accel = \"auto\"", "accel = \"tcg\"");
    let held: Vec<std::net::TcpListener> =
        (0..7).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    let mut ports = held.iter().map(|l| l.local_addr().unwrap().port());
    cfg = cfg.replace(
        "host_port = 2222",
        &format!("host_port = {}\nconnect_timeout_secs = 1500", ports.next().unwrap()),
    );
    for p in [8000, 9090, 9093, 3000, 9100, 8080] {
        cfg = cfg.replace(&format!("host = {p}\n"), &format!("host = {}\n", ports.next().unwrap()));
    }
    drop(held);
    assert!(cfg.contains("uri = \"qemu:///session\""));
    cfg = cfg.replace("uri = \"qemu:///session\"", &format!("uri = \"{}\"", host.uri()));
    t.write("box-config.toml", cfg);
    t
}

fn in_dir(t: &Test, home: &Path, args: &[&str]) -> crate::support::Run {
    Test::new()
        .cwd(t.path())
        .env("HOME", home.to_string_lossy())
        .env("PROVISIONER_CONFIG", t.path().join("box-config.toml").to_string_lossy())
        .args(args.iter().copied())
        .run()
}

/// The VM test (called from `vm::vm_remote_up_ssh_status_destroy`): the repo's lab from nothing on the far host to
/// a green health table (box uploaded, base image built here and sent through the tunnel, every probe through the
/// tunnel), `ssh -c`, `status`, `health`, a second machine reusing the uploaded box (0 bytes), `destroy -f` leaving
/// only the box volumes.
pub fn vm_remote_up_ssh_status_destroy(box_toml: &str) {
    assert!(
        nethost::available(),
        "the remote-host fixture needs root, libvirtd, virtlogd, sshd, virt-ssh-helper"
    );
    let host = NetHost::start();
    let home = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(home.path().join(".ssh")).unwrap();
    std::fs::write(home.path().join(".ssh/known_hosts"), host.known_hosts_line()).unwrap();
    let pid = std::process::id() % 100_000;
    let (n1, n2) = (format!("far{pid}"), format!("near{pid}"));
    let m1 = remote_lab(&host, &n1, box_toml);
    let m2 = remote_machine(&host, &n2, box_toml);
    // Whatever happens, the machines go (the fixture then stops the host).
    struct Cleanup<'a>(&'a [&'a Test], &'a Path);
    impl Drop for Cleanup<'_> {
        fn drop(&mut self) {
            for t in self.0 {
                let _ = in_dir(t, self.1, &["destroy", "-f"]);
            }
        }
    }
    let _cleanup = Cleanup(&[&m1, &m2], home.path());

    let t0 = std::time::Instant::now();
    let up = in_dir(&m1, home.path(), &["up"]);
    eprintln!("remote up (upload, boot, provision, health): {:.1} s", t0.elapsed().as_secs_f64());
    let up = up.success();
    // The health table: every available service of the lab up, its probe answered through the tunnel.
    for svc in ["demo-app", "prometheus", "alertmanager", "node-exporter"] {
        assert!(up.stdout().contains(&format!("✓ {svc} ")), "{svc} in the health table:\n{}", up.stdout());
    }
    assert!(up.stdout().contains("healthy: every available service is up"), "{}", up.stdout());
    in_dir(&m1, home.path(), &["health"]).success().stdout_contains("✓ demo-app ");
    assert!(
        up.stderr().contains("uploaded to root@") && !up.stderr().contains(" 0 bytes sent"),
        "{}",
        up.stderr()
    );
    let r = in_dir(&m1, home.path(), &["ssh", "-c", "cat /etc/hostname"]).success();
    assert_eq!(r.stdout().trim(), n1);
    assert_eq!(in_dir(&m1, home.path(), &["ssh", "-c", "exit 7"]).code(), Some(7));
    in_dir(&m1, home.path(), &["status"]).success().stdout_contains("running");
    let cfg = in_dir(&m1, home.path(), &["ssh-config"]).success();
    assert!(
        cfg.stdout().contains("ProxyCommand ssh ") && cfg.stdout().contains("-W %h:%p"),
        "{}",
        cfg.stdout()
    );
    // The domain names only paths on the far host (its pool), none of this machine's state dir or cache.
    let xml = host.virsh(&["dumpxml", &vm_name_of(&m1)]).unwrap();
    assert!(xml.contains("/var/lib/libvirt/images/provisioner/"), "{xml}");
    assert!(
        !xml.contains(".cache/provisioner")
            && !xml.contains(&*m1.path().join(".provisioner/disk").to_string_lossy()),
        "{xml}"
    );

    // A second machine on the same host: the box is there already.
    let up2 = in_dir(&m2, home.path(), &["up", "--no-provision"]).success();
    assert!(up2.stderr().contains(": 0 bytes sent"), "{}", up2.stderr());
    in_dir(&m2, home.path(), &["ssh", "-c", "true"]).success();

    in_dir(&m1, home.path(), &["destroy", "-f"]).success();
    in_dir(&m2, home.path(), &["destroy", "-f"]).success();
    let left = host.volumes("provisioner");
    assert!(!left.is_empty() && left.iter().all(|v| v.starts_with("box-")), "only the box stays: {left:?}");
    let domains = host.virsh(&["list", "--all", "--name"]).unwrap();
    assert!(domains.trim().is_empty(), "domains left: {domains}");
}

/// The VM test (called from `vm::vm_remote_unbootable_box_shows_the_far_serial_console`): a box with nothing to
/// boot on the far host; the SSH timeout explains it from the serial console QEMU wrote on that host (downloaded
/// from its pool), and names where it lives there, not the empty local serial.log.
pub fn vm_remote_unbootable_box_shows_the_far_serial_console() {
    assert!(
        nethost::available(),
        "the remote-host fixture needs root, libvirtd, virtlogd, sshd, virt-ssh-helper"
    );
    let host = NetHost::start();
    let t = project(&host);
    std::fs::write(t.path().join("home/.ssh/known_hosts"), host.known_hosts_line()).unwrap();
    let cfg = std::fs::read_to_string(t.path().join("box-config.toml")).unwrap();
    let cfg = cfg.replace(
        "provider = \"libvirt\"\n",
        &format!(
            "provider = \"libvirt\"\ncpus = 1\nmemory_mb = 512\ndisk_gb = 2\naccel = \"tcg\"\n[ssh]\nhost_port = {}\n",
            crate::support::free_port()
        ),
    );
    t.write("box-config.toml", cfg);
    struct Destroy<'a>(&'a Test);
    impl Drop for Destroy<'_> {
        fn drop(&mut self) {
            let _ = run(self.0, &["destroy", "-f"]);
        }
    }
    let _cleanup = Destroy(&t);
    let r = run(&t, &["up", "--boot-timeout", "45"]).failure();
    assert!(r.stderr().contains("SeaBIOS"), "the far host's serial console in the error:\n{}", r.stderr());
    r.stderr_contains("the firmware found nothing to boot on the disk")
        .stderr_contains("vol-download --pool provtest");
}

/// The domain name of a machine (from its state.json).
fn vm_name_of(t: &Test) -> String {
    let st: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.path().join(".provisioner/state.json")).unwrap())
            .unwrap();
    st["vm_name"].as_str().unwrap().to_string()
}

/// The tunnel to a remote machine's forwards (src/ssh/tunnel.rs), against the real namespaced sshd: an HTTP server
/// on the far host's 127.0.0.1 is reached on the local 127.0.0.1 at the same port, several requests at once and a
/// 4 MiB body intact; a host key that does not match known_hosts is refused before anything is forwarded.
#[test]
fn remote_tunnel_reaches_the_hosts_loopback_with_its_key_checked() {
    if !nethost::available() {
        panic!("the remote-host fixture needs root, libvirtd, virtlogd, sshd and virt-ssh-helper");
    }
    let host = NetHost::start();
    let dir = tempfile::tempdir().unwrap();
    let body: Vec<u8> = (0..4u32 << 20).map(|i| (i.wrapping_mul(40503) >> 7) as u8).collect();
    std::fs::write(dir.path().join("known_hosts"), "").unwrap();
    let port = crate::support::free_port();
    // The server runs in the host's namespaces and serves a file that exists only there (its /tmp is private).
    host.exec(&["sh", "-c", "mkdir -p /tmp/www && head -c 0 /dev/null > /tmp/www/empty"]).unwrap();
    let local_body = dir.path().join("body");
    std::fs::write(&local_body, &body).unwrap();
    // The test dir is hidden there: pipe the body in.
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "nsenter -t {} -m -n sh -c 'cat > /tmp/www/body' < {}",
            host_pid(&host),
            local_body.display()
        ))
        .status()
        .unwrap();
    assert!(ok.success());
    let mut server = Command::new("nsenter");
    server
        .args(["-t", &host_pid(&host), "-m", "-n", "python3", "-m", "http.server", "--bind", "127.0.0.1"])
        .arg(port.to_string())
        .args(["--directory", "/tmp/www"]);
    let _server = crate::support::Proc::spawn("http", server, dir.path().join("http.log"));
    crate::support::wait_until(std::time::Duration::from_secs(20), "the far HTTP server", || {
        host.exec(&["bash", "-c", &format!("exec 3<>/dev/tcp/127.0.0.1/{port}")]).ok()
    });

    let uri = |kh: &Path| {
        format!(
            "qemu+ssh://root@{}/system?keyfile={}&known_hosts={}",
            host.addr,
            host.key.display(),
            kh.display()
        )
    };
    // Unknown key: refused, nothing listens locally.
    let far = provisioner::host::remote::parse(&uri(&dir.path().join("known_hosts"))).unwrap();
    let e = provisioner::host::tunnel::ensure(&far, &[port]).unwrap_err();
    assert!(format!("{e:#}").contains("never accepts an unknown host key"), "{e:#}");
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err(), "nothing may listen after a refusal");

    std::fs::write(dir.path().join("known_hosts"), host.known_hosts_line()).unwrap();
    provisioner::host::tunnel::ensure(&far, &[port]).unwrap();
    let threads: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(move || {
                let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
                s.set_read_timeout(Some(std::time::Duration::from_secs(60))).unwrap();
                use std::io::{Read, Write};
                s.write_all(b"GET /body HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
                let mut all = Vec::new();
                s.read_to_end(&mut all).unwrap();
                all
            })
        })
        .collect();
    for t in threads {
        let all = t.join().unwrap();
        let split = all.windows(4).position(|w| w == b"\r\n\r\n").expect("an HTTP response") + 4;
        assert!(all.starts_with(b"HTTP/1.0 200"), "{}", String::from_utf8_lossy(&all[..split]));
        assert!(all[split..] == body[..], "body differs: {} bytes vs {}", all.len() - split, body.len());
    }
}

fn host_pid(host: &NetHost) -> String {
    host.libvirtd_pid().to_string()
}

/// A remote machine's virsh calls share one SSH connection to the host (ControlMaster under the cache dir, the
/// tool's wrapper): three `status` calls in a row make ONE sshd login; `destroy -f` closes that master (no socket,
/// no ssh process answering on it afterwards).
#[test]
fn remote_status_calls_share_one_ssh_connection_and_destroy_closes_it() {
    if !nethost::available() {
        panic!("the remote-host fixture needs root, libvirtd, virtlogd, sshd and virt-ssh-helper");
    }
    let host = NetHost::start();
    let t = project(&host);
    t.write("home/.ssh/known_hosts", host.known_hosts_line());
    // A machine recorded on that host (its domain is not there: status asks the host and says so).
    let state = serde_json::json!({"provider": "libvirt", "vm_name": "provisioner-far-reuse", "ssh_host": "127.0.0.1",
                                   "ssh_port": 2299, "libvirt_uri": host.uri()});
    t.write(".provisioner/state.json", state.to_string());
    let status = |reuse: &str| {
        let r = Test::new()
            .cwd(t.path())
            .env("HOME", t.path().join("home").to_string_lossy())
            .env("PROVISIONER_CACHE_DIR", t.path().join("cache").to_string_lossy())
            .env("PROVISIONER_SSH_REUSE", reuse)
            .args(["status"])
            .run();
        assert!(r.code() == Some(0), "status: {}{}", r.stdout(), r.stderr());
        assert!(r.stdout().contains("not created"), "{}", r.stdout());
    };
    // Without reuse (the switch off), every call logs in anew: the count below sees the difference.
    let before = host.sshd_logins();
    (0..3).for_each(|_| status("0"));
    assert_eq!(host.sshd_logins() - before, 3, "without reuse every status logs in");
    let before = host.sshd_logins();
    (0..3).for_each(|_| status("1"));
    let logins = host.sshd_logins() - before;
    assert_eq!(logins, 1, "three remote `status` calls make one SSH login to the host, not {logins}");
    let far = provisioner::host::remote::parse(&host.uri()).unwrap();
    // The control path depends on the cache dir the runs used (this test runs in its own process).
    std::env::set_var("PROVISIONER_CACHE_DIR", t.path().join("cache"));
    let socket = far.control_path();
    assert!(far.master_alive(), "the master stays up between commands ({})", socket.display());
    // The guest's ProxyCommand (`ssh-config`, `provisioner ssh`) rides the same master: its `-W` is a channel, not
    // a login. Here the "guest" is the host's own sshd, reached through the host: one login (the inner ssh's).
    let kh = t.path().join("home/.ssh/known_hosts");
    let via =
        provisioner::host::remote::parse(&format!("{}&known_hosts={}", host.uri(), kh.display())).unwrap();
    assert_eq!(via.control_path(), socket, "one master per login, whatever the known_hosts file");
    let before = host.sshd_logins();
    let out = Command::new("ssh")
        .args(["-F", "none", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o"])
        .arg(format!("UserKnownHostsFile={}", kh.display()))
        .arg("-o")
        .arg(format!("ProxyCommand={}", via.proxy_command()))
        .arg("-i")
        .arg(&host.key)
        .arg(format!("root@{}", host.addr))
        .arg("true")
        .output()
        .unwrap();
    assert!(out.status.success(), "ssh through the ProxyCommand: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        host.sshd_logins() - before,
        1,
        "the ProxyCommand's -W rode the master (one login: the inner ssh)"
    );
    Test::new()
        .cwd(t.path())
        .env("HOME", t.path().join("home").to_string_lossy())
        .env("PROVISIONER_CACHE_DIR", t.path().join("cache").to_string_lossy())
        .env("PROVISIONER_SSH_REUSE", "1")
        .args(["destroy", "-f"])
        .run()
        .success();
    assert!(!far.master_alive() && !socket.exists(), "destroy closed the master ({})", socket.display());
}

/// A hardened host (its sshd has `AllowTcpForwarding no`): the tunnel to a remote machine's forwards stops at the
/// first channel with the cause and the sshd setting that fixes it, in seconds (not the 600 s SSH deadline), and
/// nothing is left listening here.
#[test]
fn remote_host_without_tcp_forwarding_is_a_clear_error_at_once() {
    if !nethost::available() {
        panic!("the remote-host fixture needs root, libvirtd, virtlogd, sshd and virt-ssh-helper");
    }
    let host = NetHost::start_with("AllowTcpForwarding no\n");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("known_hosts"), host.known_hosts_line()).unwrap();
    let far = provisioner::host::remote::parse(&format!(
        "qemu+ssh://root@{}/system?keyfile={}&known_hosts={}",
        host.addr,
        host.key.display(),
        dir.path().join("known_hosts").display()
    ))
    .unwrap();
    let port = crate::support::free_port();
    let started = std::time::Instant::now();
    let e = format!("{:#}", provisioner::host::tunnel::ensure(&far, &[port]).unwrap_err());
    let took = started.elapsed();
    assert!(took < std::time::Duration::from_secs(5), "took {took:?}: {e}");
    assert!(
        e.contains(&format!("the libvirt host root@{} refuses to forward TCP connections", host.addr)),
        "{e}"
    );
    assert!(e.contains("administratively prohibited"), "{e}");
    assert!(!e.contains("  "), "one line of prose, no runs of spaces: {e}");
    assert!(
        e.contains("\nhint: ") && e.contains("AllowTcpForwarding yes") && e.contains("Match User root"),
        "{e}"
    );
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err(), "nothing may listen after a refusal");
}

/// `up` on a hardened host stops in its preflight with the same error, before a box is sent or a VM made there:
/// the host's domains and pools are as they were, and nothing here claims a machine.
#[test]
fn remote_up_on_a_host_without_tcp_forwarding_stops_before_anything_is_made_there() {
    if !nethost::available() {
        panic!("the remote-host fixture needs root, libvirtd, virtlogd, sshd and virt-ssh-helper");
    }
    let host = NetHost::start_with("AllowTcpForwarding no\n");
    let t = project(&host);
    t.write("home/.ssh/known_hosts", host.known_hosts_line());
    let pools = host.virsh(&["pool-list", "--all", "--name"]).unwrap();
    let started = std::time::Instant::now();
    let r = run(&t, &["up"]);
    let took = started.elapsed();
    assert_eq!(r.code(), Some(1), "{}{}", r.stdout(), r.stderr());
    assert!(took < std::time::Duration::from_secs(5), "took {took:?}: {}", r.stderr());
    let e = r.stderr();
    assert!(
        e.contains(&format!("the libvirt host root@{} refuses to forward TCP connections", host.addr)),
        "{e}"
    );
    assert!(e.contains("\nhint: ") && e.contains("AllowTcpForwarding yes"), "{e}");
    assert!(!e.contains("==> box"), "the error comes before the box phase: {e}");
    assert_eq!(
        host.virsh(&["list", "--all", "--name"]).unwrap().trim(),
        "",
        "no domain was made on the host"
    );
    assert_eq!(host.virsh(&["pool-list", "--all", "--name"]).unwrap(), pools, "no pool was made on the host");
    let status = run(&t, &["status"]);
    assert!(status.stdout().contains("not created"), "{}{}", status.stdout(), status.stderr());
}

/// A machine recorded on `host` whose domain (`vm`) is defined there, powered off, with this project's marker: what
/// `status` reads from the host is a real domain of ours, not only "not created".
fn recorded_stopped_machine(host: &NetHost, vm: &str) -> Test {
    let t = project(host);
    t.write("home/.ssh/known_hosts", host.known_hosts_line());
    let state = serde_json::json!({"provider": "libvirt", "vm_name": vm, "ssh_host": "127.0.0.1", "ssh_port": 2299,
                                   "libvirt_uri": host.uri()});
    t.write(".provisioner/state.json", state.to_string());
    let xml = format!(
        "<domain type='qemu'><name>{vm}</name><metadata><p:machine xmlns:p='{}'><p:state-dir>{}</p:state-dir>\
         </p:machine></metadata><memory unit='MiB'>64</memory><os><type arch='x86_64'>hvm</type></os></domain>",
        provisioner::provider::libvirt::METADATA_NS,
        t.path().join(".provisioner").display()
    );
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("nsenter -t {} -m -n virsh -q -c qemu:///system define /dev/stdin", host_pid(host)))
        .stdin(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(xml.as_bytes())?;
            c.wait()
        })
        .unwrap();
    assert!(ok.success(), "define the stopped domain on the host");
    t
}

/// `status` of this project with `env`, `-v`, the host's shared connection on: (stdout, the child commands it
/// ran).
fn status_v(t: &Test, env: &[(&str, &str)]) -> (String, Vec<String>) {
    let mut run = Test::new()
        .cwd(t.path())
        .env("HOME", t.path().join("home").to_string_lossy())
        .env("PROVISIONER_CACHE_DIR", t.path().join("cache").to_string_lossy())
        .env("PROVISIONER_SSH_REUSE", "1");
    for (k, v) in env {
        run = run.env(k, *v);
    }
    let r = run.args(["-v", "status"]).run();
    assert_eq!(r.code(), Some(0), "status: {}{}", r.stdout(), r.stderr());
    let cmds = traced_commands(&r.stderr());
    (r.stdout(), cmds)
}

/// On a `qemu+ssh://` host `status` runs the host's own virsh through the shared connection: one `ssh ... virsh
/// -c qemu:///system` exec and no virsh here, with exactly the output of libvirt's remote driver
/// (`PROVISIONER_REMOTE_EXEC=0`, the way before) for a domain of ours and for one that is not there; every call
/// rides the one master (one login for all of them).
#[test]
fn remote_status_runs_virsh_on_the_host_with_the_remote_drivers_output() {
    if !nethost::available() {
        panic!("the remote-host fixture needs root, libvirtd, virtlogd, sshd and virt-ssh-helper");
    }
    let host = NetHost::start();
    let t = recorded_stopped_machine(&host, "provisioner-far-exec");
    let logins = host.sshd_logins();
    let (exec_out, exec_cmds) = status_v(&t, &[]);
    let (driver_out, driver_cmds) = status_v(&t, &[("PROVISIONER_REMOTE_EXEC", "0")]);
    assert_eq!(
        exec_out,
        "far: stopped (libvirt)\nforwarded ports:\n     22 (guest) => 127.0.0.1:2299        (host)  tcp  ssh\n"
    );
    assert_eq!(exec_out, driver_out);
    assert_eq!(exec_cmds.len(), 1, "one child process: {exec_cmds:?}");
    assert!(
        exec_cmds[0].starts_with("ssh ")
            && exec_cmds[0].contains(&format!(" -T -- {} sh -c ", host.addr))
            && exec_cmds[0].contains("exec virsh -q -c qemu:///system "),
        "{exec_cmds:?}"
    );
    assert!(
        driver_cmds.len() == 1 && driver_cmds[0].starts_with("virsh -q -c qemu+ssh://"),
        "{driver_cmds:?}"
    );
    assert_eq!(host.sshd_logins() - logins, 1, "the exec and the remote driver ride one master");

    // Not there: the same "not created" both ways.
    host.virsh(&["undefine", "provisioner-far-exec"]).unwrap();
    let (exec_out, _) = status_v(&t, &[]);
    assert_eq!(exec_out, "far: not created\n");
    assert_eq!(status_v(&t, &[("PROVISIONER_REMOTE_EXEC", "0")]).0, exec_out);
    run(&t, &["destroy", "-f"]).success();
}

/// A host whose logins do not find virsh (not on their PATH): the exec answers 127 and `status` asks through
/// libvirt's remote driver instead (virt-ssh-helper), with the same output; once per command.
#[test]
fn remote_host_without_virsh_on_its_path_is_asked_through_the_remote_driver() {
    if !nethost::available() {
        panic!("the remote-host fixture needs root, libvirtd, virtlogd, sshd and virt-ssh-helper");
    }
    let host = NetHost::start_with(&format!("SetEnv PATH={}\n", nethost::PATH_WITHOUT_VIRSH));
    let t = recorded_stopped_machine(&host, "provisioner-far-noexec");
    let (out, cmds) = status_v(&t, &[]);
    assert_eq!(out, "far: stopped (libvirt)\nforwarded ports:\n     22 (guest) => 127.0.0.1:2299        (host)  tcp  ssh\n");
    assert_eq!(cmds.len(), 2, "the exec, then the remote driver: {cmds:?}");
    assert!(cmds[0].starts_with("ssh ") && cmds[0].contains("exec virsh"), "{cmds:?}");
    assert!(cmds[1].starts_with("virsh -q -c qemu+ssh://"), "{cmds:?}");
    host.virsh(&["undefine", "provisioner-far-noexec"]).unwrap();
    run(&t, &["destroy", "-f"]).success();
}

/// A sparse raw box (1 GiB, a few MiB of data) goes to the host without its holes: the cache keeps them, the
/// upload reports the data bytes, fewer than a tenth of the size cross the wire, and the volume on the host reads
/// back as the same 1 GiB (holes as zeros). A box with few holes streams whole into the host's own virsh instead.
#[test]
fn remote_box_upload_of_a_sparse_raw_box_sends_only_its_data() {
    if !nethost::available() {
        panic!("the remote-host fixture needs root, libvirtd, virtlogd, sshd and virt-ssh-helper");
    }
    let host = NetHost::start();
    let t = project(&host);
    t.write("home/.ssh/known_hosts", host.known_hosts_line());
    let data = t.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let bytes: Vec<u8> = (0..6u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 11) as u8).collect();
    std::fs::write(data.join("payload"), bytes).unwrap();
    let raw = t.path().join("sparse.raw");
    let ok = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "rootfs", "-d"])
        .arg(&data)
        .arg(&raw)
        .arg("1G")
        .status()
        .unwrap();
    assert!(ok.success(), "mkfs.ext4");
    let cfg = std::fs::read_to_string(t.path().join("box-config.toml")).unwrap();
    t.write("box-config.toml", cfg.replace("tiny.qcow2", "sparse.raw"));
    let size = std::fs::metadata(&raw).unwrap().len();
    let id = {
        use sha2::{Digest, Sha256};
        hex::encode(Sha256::digest(std::fs::read(&raw).unwrap()))
    };
    let before = host.bytes_sent_to_host();
    let up = run(&t, &["--json", "box", "upload"]).success();
    let wire = host.bytes_sent_to_host() - before;
    let doc: serde_json::Value = serde_json::from_str(up.stdout().lines().last().unwrap()).unwrap();
    let sent = doc["bytes_sent"].as_u64().unwrap();
    assert_eq!(doc["id"], id.as_str());
    assert!(sent > 0 && sent < size / 10, "the data only: {sent} of {size} bytes");
    assert!(wire < size / 10, "{wire} bytes crossed the wire for a box of {size} bytes ({sent} of data)");
    assert!(wire >= sent, "{wire} bytes on the wire, {sent} of data");
    let vol = format!("box-{id}.raw");
    let path = host.virsh(&["vol-path", "--pool", "provtest", &vol]).unwrap();
    let info = host.virsh(&["vol-info", "--bytes", "--pool", "provtest", &vol]).unwrap();
    assert!(info.contains(&format!("Capacity:       {size} bytes")), "{info}");
    assert!(
        host.exec(&["sha256sum", path.trim()]).unwrap().starts_with(&id),
        "the volume holds the box whole"
    );

    // A box with few holes (the tiny qcow2) streams into the host's own virsh as ssh's stdin, whole, no virsh
    // here.
    t.write("box-config.toml", cfg);
    let dense = run(&t, &["-v", "--json", "box", "upload"]).success();
    let doc: serde_json::Value = serde_json::from_str(dense.stdout().lines().last().unwrap()).unwrap();
    assert_eq!(doc["bytes_sent"], std::fs::metadata(t.path().join("tiny.qcow2")).unwrap().len());
    let stderr = dense.stderr();
    let cmds = traced_commands(&stderr);
    assert!(
        cmds.iter()
            .any(|c| c.starts_with("ssh ") && c.contains("vol-upload") && c.contains("--file /dev/stdin")),
        "{cmds:?}"
    );
    assert!(!cmds.iter().any(|c| c.starts_with("virsh ")), "no virsh here: {cmds:?}");
}

/// The child commands a `-v` run printed (`+ 12 ms: virsh ...`, once each ended), in order; not guest commands.
fn traced_commands(stderr: &str) -> Vec<String> {
    stderr
        .lines()
        .filter_map(|l| l.strip_prefix("+ ")?.split_once(" ms: "))
        .filter(|(ms, _)| ms.parse::<u64>().is_ok())
        .map(|(_, cmd)| cmd.to_string())
        .collect()
}

/// `-v` lines of commands run through the host's master in-process (no `ssh` process): `[ssh master] HOST ...`.
fn through_master(cmds: &[String]) -> usize {
    cmds.iter().filter(|c| c.starts_with(provisioner::host::remote::MASTER_TRACE)).count()
}

/// A command on the host through its live master in-process (OpenSSH's mux protocol on the control socket, no
/// `ssh` started) gives exactly what the `ssh` process gives through the same master: stdout, stderr and exit
/// status of a success (quoting, non-ASCII text, no final newline), a failing command (exit 3, its stderr kept), a
/// missing program (127), more output than a pipe holds on both streams, and a file as stdin. A stale control
/// socket (nobody listening) is left to ssh (None: the command did not run).
#[test]
fn remote_exec_through_the_master_in_process_gives_the_ssh_process_output() {
    if !nethost::available() {
        panic!("the remote-host fixture needs root, libvirtd, virtlogd, sshd and virt-ssh-helper");
    }
    let host = NetHost::start();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("known_hosts"), host.known_hosts_line()).unwrap();
    std::env::set_var("PROVISIONER_CACHE_DIR", dir.path().join("cache"));
    std::env::remove_var("PROVISIONER_SSH_REUSE");
    std::env::remove_var("PROVISIONER_REMOTE_EXEC");
    let far = provisioner::host::remote::parse(&format!(
        "{}&known_hosts={}",
        host.uri(),
        dir.path().join("known_hosts").display()
    ))
    .unwrap();
    let t = std::time::Duration::from_secs(30);
    // No master yet: nothing in-process; the ssh process opens the master.
    assert!(far.through_master(&["true"], None, t).unwrap().is_none(), "no master, no in-process run");
    let logins = host.sshd_logins();
    let first = far.run(&["true"], None, t).unwrap();
    assert!(first.success(), "{}", first.stderr);
    assert!(far.master_alive(), "the first call left the master up");
    let input = dir.path().join("input");
    std::fs::write(&input, "line one\nzwei – drei").unwrap();
    let cases: &[(&[&str], Option<&Path>, i32)] = &[
        (&["printf", "%s|%s", "it's; $HOME `x` ü", "no newline"], None, 0),
        (&["virsh", "-q", "-c", "qemu:///system", "list", "--all", "--name"], None, 0),
        (&["sh", "-c", "echo partial; echo 'it failed' >&2; exit 3"], None, 3),
        (&["no-such-program-h22m", "arg"], None, 127),
        (
            &["sh", "-c", "head -c 300000 /dev/zero | tr '\\0' x; head -c 200000 /dev/zero | tr '\\0' y >&2"],
            None,
            0,
        ),
        (&["cat"], Some(input.as_path()), 0),
    ];
    for (argv, stdin, code) in cases {
        let inproc = far.through_master(argv, *stdin, t).unwrap().expect("the live master took the command");
        let mut cmd = far.exec(argv).timeout(t);
        if let Some(f) = stdin {
            cmd = cmd.stdin_file(f);
        }
        let ssh = cmd.output().unwrap();
        assert_eq!(inproc.code(), Some(*code), "{argv:?}: {}", inproc.stderr);
        assert_eq!(
            (inproc.code(), &inproc.stdout, &inproc.stderr),
            (ssh.code(), &ssh.stdout, &ssh.stderr),
            "{argv:?}: in-process vs the ssh process"
        );
    }
    let runs = far.through_master(&["printf", "%s", "it's; $HOME `x` ü"], None, t).unwrap().unwrap();
    assert_eq!(runs.stdout, "it's; $HOME `x` ü");
    let big = far.through_master(cases[4].0, None, t).unwrap().unwrap();
    assert!(
        big.stdout.len() == 300_000 && big.stderr.len() == 200_000,
        "{} {}",
        big.stdout.len(),
        big.stderr.len()
    );
    assert_eq!(
        far.through_master(&["cat"], Some(&input), t).unwrap().unwrap().stdout,
        "line one\nzwei – drei"
    );
    assert_eq!(
        far.through_master(&["no-such-program-h22m"], None, t).unwrap().unwrap().stderr,
        "sh: 1: exec: no-such-program-h22m: not found\n"
    );
    assert_eq!(host.sshd_logins() - logins, 1, "every call rode the one master");

    // A stale socket (the master gone, its file left): not taken in-process, and `run` falls back to ssh, which
    // replaces it with a new master.
    far.close_master().unwrap();
    let socket = far.control_path();
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists() && !far.master_alive(), "a stale socket: {}", socket.display());
    assert!(far.through_master(&["true"], None, t).unwrap().is_none(), "a stale socket is left to ssh");
    let out = far.run(&["sh", "-c", "echo back"], None, t).unwrap();
    assert_eq!((out.code(), out.stdout.as_str()), (Some(0), "back\n"), "{}", out.stderr);
    assert!(far.master_alive(), "ssh made a new master on the stale socket's path");
    assert!(far.through_master(&["true"], None, t).unwrap().is_some(), "the new master is used in-process");
    far.close_master().unwrap();
}

/// A master that accepts on its control socket but never answers (hung) does not hang the tool: the in-process
/// call ends at its deadline with an error that says how to close the master.
#[test]
fn a_hung_ssh_master_is_an_error_at_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    std::env::set_var("PROVISIONER_CACHE_DIR", dir.path().join("cache"));
    std::env::remove_var("PROVISIONER_SSH_REUSE");
    std::env::remove_var("PROVISIONER_REMOTE_EXEC");
    let far = provisioner::host::remote::parse("qemu+ssh://lab@hv.invalid:2222/system").unwrap();
    let socket = far.control_path();
    std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
    let _hung = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let started = std::time::Instant::now();
    let e = far.through_master(&["virsh", "list"], None, std::time::Duration::from_secs(1)).unwrap_err();
    let took = started.elapsed();
    assert!(took < std::time::Duration::from_secs(3), "took {took:?}");
    let e = format!("{e:#}");
    assert!(e.contains("on the libvirt host lab@hv.invalid through its shared SSH connection"), "{e}");
    assert!(e.contains("did not finish within 1s"), "{e}");
    assert!(e.contains("\nhint: ") && e.contains("ssh -O exit -o ControlPath="), "{e}");
}

/// Three `status` calls to a remote machine: the first runs `ssh` (it opens the master), the next two run through
/// the master in-process (`-v` shows no `ssh` process for them), all with the same output and one sshd login;
/// `PROVISIONER_REMOTE_EXEC=ssh` runs the ssh process again; a stale control socket falls back to ssh.
#[test]
fn remote_status_after_the_first_runs_through_the_master_in_process() {
    if !nethost::available() {
        panic!("the remote-host fixture needs root, libvirtd, virtlogd, sshd and virt-ssh-helper");
    }
    let host = NetHost::start();
    let t = recorded_stopped_machine(&host, "provisioner-far-mux");
    let want = "far: stopped (libvirt)\nforwarded ports:\n     22 (guest) => 127.0.0.1:2299        (host)  tcp  ssh\n";
    let logins = host.sshd_logins();
    let runs: Vec<(String, Vec<String>)> = (0..3).map(|_| status_v(&t, &[])).collect();
    assert_eq!(host.sshd_logins() - logins, 1, "three status calls, one SSH login");
    for (i, (out, cmds)) in runs.iter().enumerate() {
        assert_eq!(out, want, "call {i}");
        assert_eq!(cmds.len(), 1, "call {i}: one command: {cmds:?}");
        let far = format!("{} root@{} sh -c ", provisioner::host::remote::MASTER_TRACE, host.addr);
        if i == 0 {
            assert!(
                cmds[0].starts_with("ssh ") && through_master(cmds) == 0,
                "the first opens the master: {cmds:?}"
            );
        } else {
            assert!(
                cmds[0].starts_with(&far) && cmds[0].contains("exec virsh -q -c qemu:///system "),
                "call {i} through the master in-process: {cmds:?}"
            );
        }
    }
    let (out, cmds) = status_v(&t, &[("PROVISIONER_REMOTE_EXEC", "ssh")]);
    assert_eq!(out, want);
    assert!(cmds.len() == 1 && cmds[0].starts_with("ssh "), "the ssh process when asked: {cmds:?}");

    // The master gone, its socket left behind: ssh runs (and opens a new master), the next call is in-process.
    std::env::set_var("PROVISIONER_CACHE_DIR", t.path().join("cache"));
    let far = provisioner::host::remote::parse(&host.uri()).unwrap();
    far.close_master().unwrap();
    drop(std::os::unix::net::UnixListener::bind(far.control_path()).unwrap());
    let (out, cmds) = status_v(&t, &[]);
    assert_eq!(out, want);
    assert!(cmds.len() == 1 && cmds[0].starts_with("ssh "), "a stale socket: ssh: {cmds:?}");
    let (out, cmds) = status_v(&t, &[]);
    assert_eq!(out, want);
    assert_eq!(through_master(&cmds), 1, "{cmds:?}");
    host.virsh(&["undefine", "provisioner-far-mux"]).unwrap();
    run(&t, &["destroy", "-f"]).success();
}
