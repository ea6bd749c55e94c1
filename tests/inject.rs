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

fn sha256_file(p: &Path) -> String {
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
