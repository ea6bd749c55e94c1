//! Boxes without cloud-init (issue 20): keys written into a machine's qcow2 overlay before its first boot, with
//! test disks made here without root (`mkfs.ext4 -d` at an offset behind an MBR written by the test), detection of
//! the route, and the refusals (a root filesystem debugfs cannot edit, a box with no user to log in as).

use std::path::{Path, PathBuf};

use provisioner::boxes::inject::{self, Route, VAGRANT_INSECURE_ED25519, VAGRANT_INSECURE_RSA};

const PART_OFFSET: u64 = 1024 * 1024;

fn run_ok(cmd: &mut std::process::Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {out:?}");
}

pub(crate) fn sha256_file(p: &Path) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(std::fs::read(p).unwrap()))
}

/// A 64 MiB disk with an MBR whose one Linux partition (at 1 MiB) holds an ext4 filesystem made from `files`
/// (path, contents; uid/gid as the test runs), as qcow2 at `dir/base.qcow2`.
fn disk(dir: &Path, files: &[(&str, &str)]) -> PathBuf {
    let src = dir.join("src");
    for (path, body) in files {
        let p = src.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, body).unwrap();
    }
    std::fs::create_dir_all(&src).unwrap();
    let raw = dir.join("disk.raw");
    std::fs::File::create(&raw).unwrap().set_len(64 << 20).unwrap();
    run_ok(
        std::process::Command::new(which("mkfs.ext4"))
            .args(["-q", "-F", "-d"])
            .arg(&src)
            .arg("-E")
            .arg(format!("offset={PART_OFFSET}"))
            .arg(&raw)
            .arg("60M"),
    );
    mbr(&raw, 0x83);
    let base = dir.join("base.qcow2");
    run_ok(std::process::Command::new("qemu-img").args(["convert", "-O", "qcow2"]).arg(&raw).arg(&base));
    std::fs::remove_file(&raw).unwrap();
    base
}

/// One primary partition of type `kind` from 1 MiB to 61 MiB.
fn mbr(raw: &Path, kind: u8) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new().write(true).open(raw).unwrap();
    let mut e = [0u8; 16];
    e[4] = kind;
    e[8..12].copy_from_slice(&((PART_OFFSET / 512) as u32).to_le_bytes());
    e[12..16].copy_from_slice(&(60u32 * 2048).to_le_bytes());
    f.seek(SeekFrom::Start(0x1BE)).unwrap();
    f.write_all(&e).unwrap();
    f.seek(SeekFrom::Start(510)).unwrap();
    f.write_all(&[0x55, 0xAA]).unwrap();
}

fn which(name: &str) -> PathBuf {
    ["/usr/sbin", "/sbin", "/usr/bin"].iter().map(|d| Path::new(d).join(name)).find(|p| p.exists()).unwrap()
}

fn overlay(dir: &Path, base: &Path) -> PathBuf {
    let ov = dir.join("overlay.qcow2");
    run_ok(
        std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(base)
            .arg(&ov),
    );
    ov
}

const PASSWD: &str =
    "root:x:0:0:root:/root:/bin/bash\nvagrant:x:1000:1000:vagrant,,,:/home/vagrant:/bin/bash\n";

fn vagrant_box(dir: &Path, extra: &[(&str, &str)]) -> PathBuf {
    // No final newline after the second key: hashicorp/vagrant#8362.
    let ak = format!("{VAGRANT_INSECURE_RSA}\n{VAGRANT_INSECURE_ED25519}");
    let mut files = vec![
        ("/etc/passwd", PASSWD),
        ("/etc/os-release", "ID=debian\n"),
        ("/etc/ssh/ssh_host_rsa_key", "the box's shared host key"),
        ("/home/vagrant/.ssh/authorized_keys", ak.as_str()),
    ];
    files.extend_from_slice(extra);
    disk(dir, &files)
}

#[test]
fn injection_leaves_only_the_machine_key_in_the_overlay_and_the_base_untouched() {
    let t = tempfile::tempdir().unwrap();
    let base = vagrant_box(t.path(), &[]);
    let before = sha256_file(&base);
    let ov = overlay(t.path(), &base);
    let user = provisioner::keys::generate("provisioner@lab").unwrap();
    let host = provisioner::keys::generate("root@lab").unwrap();
    let done = inject::inject(
        &ov,
        &t.path().join("work"),
        &inject::Injection {
            users: vec!["provisioner".into(), "vagrant".into()],
            user_key: &user.public_openssh,
            host_key: &host,
            hostname: "lab",
        },
    )
    .unwrap();
    eprintln!("injection: {:.2} s", done.seconds);
    assert_eq!(done.user, "vagrant");
    assert_eq!(done.insecure_removed, 2);
    assert!(done.seconds < 10.0, "{done:?}");
    let work = t.path().join("read");
    let read = |img: &Path, path: &str| inject::read_file(img, "qcow2", &work, path).unwrap();
    let ak = read(&ov, "/home/vagrant/.ssh/authorized_keys").unwrap();
    assert_eq!(ak, format!("{}\n", user.public_openssh));
    assert!(!ak.contains("vagrant insecure public key"));
    let st = |img: &Path, path: &str| inject::stat_file(img, "qcow2", &work, path).unwrap().unwrap();
    assert_eq!(st(&ov, "/home/vagrant/.ssh/authorized_keys"), (0o600, 1000, 1000));
    assert_eq!(st(&ov, "/home/vagrant/.ssh"), (0o700, 1000, 1000));
    assert_eq!(read(&ov, "/etc/ssh/ssh_host_ed25519_key").unwrap(), host.private_openssh);
    assert_eq!(st(&ov, "/etc/ssh/ssh_host_ed25519_key"), (0o600, 0, 0));
    assert_eq!(read(&ov, "/etc/ssh/ssh_host_ed25519_key.pub").unwrap().trim(), host.public_openssh.trim());
    assert_eq!(read(&ov, "/etc/ssh/ssh_host_rsa_key"), None, "the box's shared host key is gone");
    assert_eq!(read(&ov, "/etc/hostname").unwrap(), "lab\n");
    // The box itself: byte-identical, insecure keys still in it.
    assert_eq!(sha256_file(&base), before);
    assert!(read(&base, "/home/vagrant/.ssh/authorized_keys")
        .unwrap()
        .contains("vagrant insecure public key"));
    // No qemu-storage-daemon left behind: the overlay opens for writing again.
    inject::edit(&ov, "qcow2", &work, "stat /etc/passwd\n").unwrap();
}

#[test]
fn injection_makes_a_missing_ssh_dir_for_the_configured_user() {
    let t = tempfile::tempdir().unwrap();
    let passwd = "root:x:0:0:root:/root:/bin/bash\nops:x:1001:1002::/srv/ops:/bin/sh\n";
    let base = disk(t.path(), &[("/etc/passwd", passwd), ("/srv/ops/.profile", "")]);
    let ov = overlay(t.path(), &base);
    let user = provisioner::keys::generate("u").unwrap();
    let host = provisioner::keys::generate("h").unwrap();
    let inj = inject::Injection {
        users: vec!["ops".into(), "vagrant".into()],
        user_key: &user.public_openssh,
        host_key: &host,
        hostname: "h1",
    };
    let done = inject::inject(&ov, &t.path().join("work"), &inj).unwrap();
    assert_eq!((done.user.as_str(), done.insecure_removed), ("ops", 0));
    let work = t.path().join("read");
    assert_eq!(
        inject::read_file(&ov, "qcow2", &work, "/srv/ops/.ssh/authorized_keys").unwrap().unwrap(),
        format!("{}\n", user.public_openssh)
    );
    assert_eq!(
        inject::stat_file(&ov, "qcow2", &work, "/srv/ops/.ssh/authorized_keys").unwrap().unwrap(),
        (0o600, 1001, 1002)
    );
}

#[test]
fn a_box_with_no_known_user_is_refused_with_the_hint() {
    let t = tempfile::tempdir().unwrap();
    let base = disk(t.path(), &[("/etc/passwd", "root:x:0:0:root:/root:/bin/bash\n")]);
    let ov = overlay(t.path(), &base);
    let k = provisioner::keys::generate("k").unwrap();
    let inj = inject::Injection {
        users: vec!["provisioner".into(), "vagrant".into()],
        user_key: &k.public_openssh,
        host_key: &k,
        hostname: "h",
    };
    let e = format!("{:#}", inject::inject(&ov, &t.path().join("work"), &inj).unwrap_err());
    assert!(e.contains("none of the users provisioner, vagrant"), "{e}");
    assert!(e.contains("hint: set [ssh] user"), "{e}");
}

#[test]
fn detection_tells_cloud_init_boxes_from_vagrant_boxes() {
    let work = tempfile::tempdir().unwrap();
    let route = |extra: &[(&str, &str)]| {
        let t = tempfile::tempdir().unwrap();
        let base = vagrant_box(t.path(), extra);
        let before = sha256_file(&base);
        let r = inject::detect(&base, "qcow2", &work.path().join("w")).unwrap();
        assert_eq!(sha256_file(&base), before, "detection only reads");
        r
    };
    assert_eq!(route(&[]), (Route::Disk, "no cloud-init in the box".to_string()));
    assert_eq!(route(&[("/usr/bin/cloud-init", "#!/usr/bin/python3\n")]).0, Route::CloudInit);
    assert_eq!(
        route(&[("/usr/bin/cloud-init", "#!"), ("/etc/cloud/cloud-init.disabled", "")]),
        (Route::Disk, "cloud-init is disabled in the box".to_string())
    );
}

/// A disk with no root to read (an empty filesystem, no /etc/passwd) and nothing known to be uneditable: `auto`
/// keeps the seed route, as every box had before detection (the VM tier's unbootable-box test boots such a disk
/// and expects the firmware's own error, not a refusal).
#[test]
fn a_disk_with_no_root_to_read_keeps_the_seed_route() {
    let t = tempfile::tempdir().unwrap();
    let base = disk(t.path(), &[("/boot/placeholder", "")]);
    let r = inject::detect(&base, "qcow2", &t.path().join("w")).unwrap();
    assert_eq!(r, (Route::CloudInit, "no root filesystem found to read: the seed route".to_string()));
}

#[test]
fn an_xfs_root_is_refused_before_boot_with_the_reason_and_the_choices() {
    let t = tempfile::tempdir().unwrap();
    let raw = t.path().join("disk.raw");
    std::fs::File::create(&raw).unwrap().set_len(64 << 20).unwrap();
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
        f.seek(SeekFrom::Start(PART_OFFSET)).unwrap();
        f.write_all(b"XFSB\0\0\x10\0").unwrap();
    }
    mbr(&raw, 0x83);
    let base = t.path().join("base.qcow2");
    run_ok(std::process::Command::new("qemu-img").args(["convert", "-O", "qcow2"]).arg(&raw).arg(&base));
    for image in [&base, &raw] {
        let format = if image == &raw { "raw" } else { "qcow2" };
        let e = format!("{:#}", inject::detect(image, format, &t.path().join("w")).unwrap_err());
        assert!(e.contains("found: xfs at byte 1048576"), "{e}");
        assert!(e.contains("xfs cannot be edited offline"), "{e}");
        assert!(e.contains("hint: use a box that runs cloud-init"), "{e}");
        assert!(e.contains("insecure-once"), "{e}");
    }
}

// ---------------------------------------------------------------------------------------------------------------
// VM tier.

/// The Vagrant-style box builder, shared with benches/vagrant_box.rs.
#[path = "support/vagrant_box.rs"]
mod vagrant_box;
pub(crate) use vagrant_box::{vagrant_box_from_test_box, vagrant_box_two_disks};

/// The cached boxes' disks (`box.img`, and `data.qcow2` of a two-disk box), for the byte-identical check.
fn cached_disks(cache: &Path) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(cache.join("boxes")).unwrap().flatten() {
        for name in ["box.img", "data.qcow2"] {
            let img = e.path().join(name);
            if img.is_file() {
                out.push((img.clone(), sha256_file(&img)));
            }
        }
    }
    out.sort();
    out
}

/// After `up` on a Vagrant-style box in `dir` (SSH forwarded to 127.0.0.1:`port`): a login as `user` with
/// Vagrant's insecure private key is refused, and the host key sshd offers is the one pinned from the first
/// connection (`.provisioner/host_ed25519.pub`).
pub(crate) fn insecure_key_refused_and_host_key_pinned(dir: &Path, user: &str, port: u16) {
    let key = dir.join("insecure");
    std::fs::write(&key, provisioner::lifecycle::insecure_once::VAGRANT_INSECURE_ED25519_PRIVATE).unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let (ok, err) = login_with(&key, user, port);
    assert!(!ok, "the insecure key logged in");
    assert!(err.contains("Permission denied"), "{err}");
    std::fs::remove_file(&key).unwrap();
    // The host key sshd offers is the one pinned from the first connection.
    let scan = std::process::Command::new("ssh-keyscan")
        .args(["-t", "ed25519", "-p", &port.to_string(), "127.0.0.1"])
        .output()
        .unwrap();
    let pinned = std::fs::read_to_string(dir.join(".provisioner/host_ed25519.pub")).unwrap();
    let blob = pinned.split_whitespace().nth(1).unwrap();
    assert!(String::from_utf8_lossy(&scan.stdout).contains(blob), "{scan:?} vs {pinned}");
}

/// `ssh -i KEY USER@127.0.0.1 -p PORT true` with nothing but that key: (succeeded, stderr).
fn login_with(key_file: &Path, user: &str, port: u16) -> (bool, String) {
    let out = std::process::Command::new("ssh")
        .args(["-F", "/dev/null", "-i"])
        .arg(key_file)
        .args([
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "ConnectTimeout=30",
            "-p",
            &port.to_string(),
            &format!("{user}@127.0.0.1"),
            "true",
        ])
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).to_string())
}

/// `[box] keys = "insecure-once"` on the same Vagrant-style box: the disk is not edited; `up --no-provision` logs
/// in once as vagrant with Vagrant's insecure ed25519 key over 127.0.0.1 and replaces the keys in that session
/// (the phase line says so); afterwards neither insecure private key logs in, the guest presents the pinned host
/// key (not the box's own), authorized_keys holds the machine key alone, a second `up` offers no insecure key,
/// and the cached box is byte-identical. The box is a v2 box with two disks: both are attached, in order, each on
/// its own overlay. (The disk route is proven with the whole lab, `guest::vm_up_verify_reprovision_destroy`.)
#[test]
#[ignore = "vm: one TCG guest from a two-disk Vagrant-style box: one login with the insecure key, keys replaced, \
            both disks attached (~2-4 min)"]
fn vm_vagrant_box_insecure_once_replaces_the_keys_in_its_first_session() {
    use provisioner::lifecycle::insecure_once::{
        VAGRANT_INSECURE_ED25519_PRIVATE, VAGRANT_INSECURE_RSA_PRIVATE,
    };
    crate::support::session_libvirt();
    let started = std::time::Instant::now();
    let t = crate::support::Test::new();
    let cache = t.path().join("cache");
    let src = t.path().join("boxsrc");
    std::fs::create_dir_all(&src).unwrap();
    let box_file = vagrant_box_two_disks(&src);
    let box_host = std::fs::read_to_string(src.join("box_host_ed25519.pub")).unwrap();
    eprintln!("box derived in {:.1} s", started.elapsed().as_secs_f64());
    let port = crate::support::free_port();
    t.write(
        "box-config.toml",
        format!(
            "[machine]\nname = \"vonce\"\nprovider = \"libvirt\"\ncpus = 1\nmemory_mb = 1024\ndisk_gb = 4\n\
             accel = \"tcg\"\n\n[box]\nvagrant = \"{}\"\nkeys = \"insecure-once\"\n\n[ssh]\nhost_port = {port}\n\
             connect_timeout_secs = 300\n\n[provision]\nenabled = false\n\n[libvirt]\nuri = \"qemu:///session\"\n",
            box_file.display()
        ),
    );
    let run = |args: &[&str]| {
        crate::support::Test::new()
            .cwd(t.path())
            .env("PROVISIONER_CACHE_DIR", cache.display().to_string())
            .args(args.iter().copied())
            .run()
    };
    run(&["box", "build"]).success();
    let before = cached_disks(&cache);
    assert_eq!(before.len(), 2, "box.img and data.qcow2: {before:?}");
    let up_started = std::time::Instant::now();
    let up = run(&["up", "--no-provision"]);
    let up_secs = up_started.elapsed().as_secs_f64();
    let guard = scopeguard(&run);
    let text = format!("{}{}", up.stdout(), up.stderr());
    drop(up.success());
    eprintln!("up: {up_secs:.1} s\n{text}");
    let keys_line = text.lines().find(|l| l.contains("insecure-once ([box] keys)"));
    let keys_line = keys_line.unwrap_or_else(|| panic!("no insecure-once phase line:\n{text}"));
    assert!(
        keys_line.contains(&format!(
            "one login as vagrant with Vagrant's insecure ed25519 key on 127.0.0.1:{port}"
        )),
        "{keys_line}"
    );
    assert!(
        keys_line.contains(
            "machine key written for vagrant, 2 insecure keys removed, host key set, sshd reloaded"
        ),
        "{keys_line}"
    );
    let box_fp = provisioner::keys::fingerprint_openssh(&box_host).unwrap();
    assert!(
        keys_line.contains(&format!("box host key {box_fp} accepted for that session only")),
        "{keys_line}"
    );
    assert!(
        !text.contains("machine key written for vagrant, 2 insecure keys removed, host key set ("),
        "disk route ran"
    );

    let me = run(&["ssh", "-c", "id -un; cat ~/.ssh/authorized_keys"]).success();
    let machine_key = std::fs::read_to_string(t.path().join(".provisioner/id_ed25519.pub")).unwrap();
    assert_eq!(me.stdout(), format!("vagrant\n{}\n", machine_key.trim()));

    // Neither published insecure private key logs in any more.
    for (name, pem) in [("ed25519", VAGRANT_INSECURE_ED25519_PRIVATE), ("rsa", VAGRANT_INSECURE_RSA_PRIVATE)]
    {
        let key = t.path().join(format!("insecure-{name}"));
        std::fs::write(&key, pem).unwrap();
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let (ok, err) = login_with(&key, "vagrant", port);
        assert!(!ok, "the insecure {name} key logged in");
        assert!(err.contains("Permission denied"), "{name}: {err}");
    }
    // The guest presents the pinned host key, and no longer the box's own.
    let scan = std::process::Command::new("ssh-keyscan")
        .args(["-T", "60", "-t", "ed25519,rsa,ecdsa", "-p", &port.to_string(), "127.0.0.1"])
        .output()
        .unwrap();
    let scanned = String::from_utf8_lossy(&scan.stdout).to_string();
    let pinned = std::fs::read_to_string(t.path().join(".provisioner/host_ed25519.pub")).unwrap();
    assert!(scanned.contains(pinned.split_whitespace().nth(1).unwrap()), "{scan:?} vs {pinned}");
    assert!(
        !scanned.contains(box_host.split_whitespace().nth(1).unwrap()),
        "the box's host key still answers"
    );
    let state = std::fs::read_to_string(t.path().join(".provisioner/state.json")).unwrap();
    assert!(
        state.contains("\"keys_route\": \"insecure-once\"") && !state.contains("first_login_pending"),
        "{state}"
    );

    // A second `up` (running) connects pinned at once: no insecure login again.
    let again = run(&["up", "--no-provision"]).success();
    let again = format!("{}{}", again.stdout(), again.stderr());
    assert!(!again.contains("insecure"), "{again}");

    // The box is a v2 box with two disks (issue 20, box formats): the guest sees vda and the 8 MiB vdb, and a
    // write to vdb lands in the machine's own overlay `disk-1.qcow2`, not in the cached data disk.
    let r = run(&[
        "ssh",
        "-c",
        "ls /sys/block; cat /sys/block/vdb/size; sudo -n dd if=/dev/urandom of=/dev/vdb bs=1M count=4 \
         oflag=direct status=none && echo written",
    ])
    .success();
    let out = r.stdout();
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines.contains(&"vda") && lines.contains(&"vdb"), "{out}");
    assert!(lines.contains(&"16384"), "vdb is not the 8 MiB data disk: {out}");
    assert!(lines.contains(&"written"), "{out}");
    let overlay = t.path().join(".provisioner/disk-1.qcow2");
    let info = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(&overlay)
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert!(
        info["actual-size"].as_u64().unwrap() >= 4 << 20,
        "the write did not land in the overlay: {info}"
    );

    assert_eq!(cached_disks(&cache), before, "the cached box changed");
    drop(guard);
    assert!(!overlay.exists(), "destroy left the data disk's overlay");
    eprintln!("vm test: {:.1} s", started.elapsed().as_secs_f64());
}

/// `destroy -f` when dropped (also when an assertion fails).
fn scopeguard<'a>(run: &'a dyn Fn(&[&str]) -> crate::support::Run) -> impl Drop + 'a {
    struct G<'a>(&'a dyn Fn(&[&str]) -> crate::support::Run);
    impl Drop for G<'_> {
        fn drop(&mut self) {
            let r = (self.0)(&["destroy", "-f"]);
            if !std::thread::panicking() {
                r.success();
            }
        }
    }
    G(run)
}

/// `up` on a box whose root filesystem cannot be edited offline (here XFS) stops before anything is created,
/// with the reason and the choices; no VM and no seed are made.
#[test]
fn up_refuses_an_xfs_box_before_boot() {
    if which::which("virsh").is_err() {
        eprintln!("skipped: no virsh on this host");
        return;
    }
    let t = crate::support::Test::new();
    let raw = t.path().join("xfs.raw");
    std::fs::File::create(&raw).unwrap().set_len(64 << 20).unwrap();
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
        f.seek(SeekFrom::Start(PART_OFFSET)).unwrap();
        // An XFS superblock: 4 KiB blocks, 15360 blocks (60 MiB).
        f.write_all(b"XFSB\0\0\x10\0\0\0\0\0\0\0\x3c\0").unwrap();
    }
    mbr(&raw, 0x83);
    let img = t.path().join("xfs.qcow2");
    run_ok(std::process::Command::new("qemu-img").args(["convert", "-O", "qcow2"]).arg(&raw).arg(&img));
    t.write(
        "box-config.toml",
        format!(
            "[machine]\nname = \"xfsbox\"\nprovider = \"libvirt\"\ncpus = 1\nmemory_mb = 512\ndisk_gb = 2\n\n[box]\n\
             image = \"{}\"\n\n[ssh]\nhost_port = {}\n\n[provision]\nenabled = false\n\n[libvirt]\n\
             uri = \"qemu:///session\"\n",
            img.display(),
            crate::support::free_port()
        ),
    );
    let cache = t.path().join("cache").display().to_string();
    let r = crate::support::Test::new()
        .cwd(t.path())
        .env("PROVISIONER_CACHE_DIR", cache.clone())
        .args(["up", "--no-provision"])
        .run()
        .failure();
    let err = r.stderr();
    assert!(
        err.contains("found: xfs at byte 1048576") && err.contains("xfs cannot be edited offline"),
        "{err}"
    );
    assert!(err.contains("hint: use a box that runs cloud-init"), "{err}");
    assert!(!t.path().join(".provisioner/seed.iso").exists());
    assert!(!t.path().join(".provisioner/disk.qcow2").exists());
    crate::support::Test::new()
        .cwd(t.path())
        .env("PROVISIONER_CACHE_DIR", cache)
        .arg("status")
        .run()
        .success()
        .stdout_contains("not created");
}

/// `keys = "insecure-once"` with the SSH forward on an address that is not loopback: `up` stops before anything is
/// created (no VM, no overlay, no state), with the reason and what to do.
#[test]
fn up_refuses_insecure_once_off_loopback_before_anything_is_created() {
    if which::which("virsh").is_err() {
        eprintln!("skipped: no virsh on this host");
        return;
    }
    let t = crate::support::Test::new();
    let base = vagrant_box(t.path(), &[]);
    t.write(
        "box-config.toml",
        format!(
            "[machine]\nname = \"oncebox\"\nprovider = \"libvirt\"\ncpus = 1\nmemory_mb = 512\ndisk_gb = 2\n\n[box]\n\
             image = \"{}\"\nkeys = \"insecure-once\"\n\n[ssh]\nhost_ip = \"0.0.0.0\"\nhost_port = {}\n\n\
             [provision]\nenabled = false\n\n[libvirt]\nuri = \"qemu:///session\"\n",
            base.display(),
            crate::support::free_port()
        ),
    );
    let cache = t.path().join("cache").display().to_string();
    let r = crate::support::Test::new()
        .cwd(t.path())
        .env("PROVISIONER_CACHE_DIR", cache.clone())
        .args(["up", "--no-provision"])
        .run()
        .failure();
    let err = r.stderr();
    assert!(
        err.contains(
            "[box] keys = \"insecure-once\" is refused with the guest's SSH port forwarded on 0.0.0.0"
        ),
        "{err}"
    );
    assert!(err.contains("hint: set [ssh] host_ip = \"127.0.0.1\""), "{err}");
    assert!(!t.path().join(".provisioner/disk.qcow2").exists());
    assert!(!t.path().join(".provisioner/state.json").exists());
    crate::support::Test::new()
        .cwd(t.path())
        .env("PROVISIONER_CACHE_DIR", cache)
        .arg("status")
        .run()
        .success()
        .stdout_contains("not created");
}
