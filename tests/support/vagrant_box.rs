//! The Vagrant-style box the VM tier and the issue 20 benchmark build from the project's cached Debian box (the
//! way public Vagrant boxes are made). Included by path from tests/inject.rs and benches/vagrant_box.rs, so it uses
//! nothing of either crate but the library.

use std::path::{Path, PathBuf};

use provisioner::boxes::inject::{self, Route, VAGRANT_INSECURE_ED25519, VAGRANT_INSECURE_RSA};

fn run_ok(cmd: &mut std::process::Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {out:?}");
}

/// A Vagrant-style box made offline from the VM tests' cached Debian box (`box_dir/box.box`): user `vagrant`
/// (passwd, shadow, group, home) with Vagrant's insecure keys (the last line without a newline), password-less
/// sudo, cloud-init disabled, an ed25519 host key of its own (every copy of a public box shares it; its public half
/// is left in `box_dir/box_host_ed25519.pub`); packaged as a vagrant-libvirt box (v1: box.img + the kernel the box
/// boots).
pub fn vagrant_box_from_test_box(box_dir: &Path) -> PathBuf {
    vagrant_box_with(box_dir, false)
}

/// The same box; with `cloud_init` its cloud-init stays enabled (the seed route: the benchmark's comparison).
pub fn vagrant_box_with(box_dir: &Path, cloud_init: bool) -> PathBuf {
    build(box_dir, cloud_init, false)
}

/// The same box (cloud-init disabled) as a vagrant-libvirt v2 box with two disks: `box.img`, then a blank 8 MiB
/// `data.qcow2` (metadata `disks: [...]`).
#[allow(dead_code)] // used by tests/inject.rs, not by the benchmark
pub fn vagrant_box_two_disks(box_dir: &Path) -> PathBuf {
    build(box_dir, false, true)
}

fn build(box_dir: &Path, cloud_init: bool, data_disk: bool) -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let repo_cfg = provisioner::config::Config::load(&repo.join("box-config.toml")).unwrap();
    let cache = provisioner::boxes::Cache::open().unwrap();
    let (base, _) = provisioner::boxes::ensure_in(
        &cache,
        &repo_cfg,
        "libvirt",
        false,
        &provisioner::ui::Ui::new(false, true),
    )
    .unwrap();
    let img = box_dir.join("box.img");
    run_ok(std::process::Command::new("cp").arg("--reflink=auto").arg(&base.disk).arg(&img));
    std::fs::copy(base.kernel.as_ref().unwrap(), box_dir.join("vmlinuz")).unwrap();
    std::fs::copy(base.initrd.as_ref().unwrap(), box_dir.join("initrd.img")).unwrap();
    let work = box_dir.join("work");
    let read = |p: &str| inject::read_file(&img, "qcow2", &work, p).unwrap().unwrap_or_default();
    let (passwd, shadow, group) = (read("/etc/passwd"), read("/etc/shadow"), read("/etc/group"));
    assert!(!passwd.contains("\nvagrant:"), "the test box already has a vagrant user");
    let shadow_gid =
        group.lines().find(|l| l.starts_with("shadow:")).and_then(|l| l.split(':').nth(2)).unwrap();
    let files = box_dir.join("files");
    std::fs::create_dir_all(&files).unwrap();
    let local = |name: &str, body: &str| {
        std::fs::write(files.join(name), body).unwrap();
        files.join(name).display().to_string()
    };
    let nl = |s: &str| if s.ends_with('\n') || s.is_empty() { s.to_string() } else { format!("{s}\n") };
    let passwd =
        local("passwd", &format!("{}vagrant:x:1000:1000:vagrant,,,:/home/vagrant:/bin/bash\n", nl(&passwd)));
    let shadow = local("shadow", &format!("{}vagrant:*:19700:0:99999:7:::\n", nl(&shadow)));
    let group = local("group", &format!("{}vagrant:x:1000:\n", nl(&group)));
    let ak = local("ak", &format!("{VAGRANT_INSECURE_RSA}\n{VAGRANT_INSECURE_ED25519}"));
    let sudo = local("sudo", "vagrant ALL=(ALL) NOPASSWD: ALL\n");
    let empty = local("empty", "");
    let box_host = provisioner::keys::generate("root@vagrant-box").unwrap();
    std::fs::write(box_dir.join("box_host_ed25519.pub"), &box_host.public_openssh).unwrap();
    let host_priv = local("host", &box_host.private_openssh);
    let host_pub = local("host.pub", &format!("{}\n", box_host.public_openssh));
    let put = |dest: &str, src: &str, mode: &str, uid: u32, gid: &str| {
        format!("rm {dest}\nwrite {src} {dest}\nsif {dest} mode {mode}\nsif {dest} uid {uid}\nsif {dest} gid {gid}\n")
    };
    let cmds = [
        put("/etc/passwd", &passwd, "0100644", 0, "0"),
        put("/etc/shadow", &shadow, "0100640", 0, shadow_gid),
        put("/etc/group", &group, "0100644", 0, "0"),
        "mkdir /home/vagrant\nsif /home/vagrant mode 040755\nsif /home/vagrant uid 1000\nsif /home/vagrant gid 1000\n"
            .into(),
        "mkdir /home/vagrant/.ssh\nsif /home/vagrant/.ssh mode 040700\nsif /home/vagrant/.ssh uid 1000\n\
         sif /home/vagrant/.ssh gid 1000\n"
            .into(),
        put("/home/vagrant/.ssh/authorized_keys", &ak, "0100600", 1000, "1000"),
        put("/etc/sudoers.d/vagrant", &sudo, "0100440", 0, "0"),
        if cloud_init {
            String::new()
        } else {
            ["mkdir /etc/cloud\n".into(), put("/etc/cloud/cloud-init.disabled", &empty, "0100644", 0, "0")].concat()
        },
        put("/etc/ssh/ssh_host_ed25519_key", &host_priv, "0100600", 0, "0"),
        put("/etc/ssh/ssh_host_ed25519_key.pub", &host_pub, "0100644", 0, "0"),
    ]
    .concat();
    inject::edit(&img, "qcow2", &work, &cmds).unwrap();
    assert!(read("/etc/passwd").contains("\nvagrant:x:1000:1000:"));
    assert!(read("/home/vagrant/.ssh/authorized_keys").ends_with("vagrant insecure public key"));
    assert_eq!(read("/etc/sudoers.d/vagrant"), "vagrant ALL=(ALL) NOPASSWD: ALL\n");
    let want = if cloud_init { Route::CloudInit } else { Route::Disk };
    assert_eq!(inject::detect(&img, "qcow2", &work).unwrap().0, want);
    let mut files = vec!["metadata.json", "Vagrantfile", "box.img", "vmlinuz", "initrd.img"];
    let metadata = if data_disk {
        run_ok(
            std::process::Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2"])
                .arg(box_dir.join("data.qcow2"))
                .arg("8M"),
        );
        files.push("data.qcow2");
        r#"{"provider": "libvirt", "format": "qcow2", "disks": [{"path": "box.img", "format": "qcow2"}, {"path": "data.qcow2", "format": "qcow2"}]}"#
    } else {
        r#"{"provider": "libvirt", "format": "qcow2", "virtual_size": 4}"#
    };
    std::fs::write(box_dir.join("metadata.json"), metadata).unwrap();
    std::fs::write(box_dir.join("Vagrantfile"), "Vagrant.configure(\"2\") do |config|\nend\n").unwrap();
    let out = box_dir.join("vagrant-test.box");
    run_ok(std::process::Command::new("tar").arg("-cf").arg(&out).arg("-C").arg(box_dir).args(&files));
    for f in &files[2..] {
        std::fs::remove_file(box_dir.join(f)).unwrap();
    }
    out
}
