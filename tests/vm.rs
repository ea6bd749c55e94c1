//! libvirt provider and the lifecycle commands.
//!
//! Fast tier: domain XML golden files, `destroy`/`status` without a machine, the port check through `up`.
//! VM tier (`#[ignore = "vm: ..."]`): real libvirt + QEMU (TCG) guests driven through the binary.

use std::path::{Path, PathBuf};

use provisioner::config::{Firmware, Forward, Protocol};
use provisioner::machine::StateDir;
use provisioner::provider::libvirt::{domain_xml, owner_state_dir};
use provisioner::provider::{BoxImage, MachineSpec};

use crate::support::{self, Test};

fn spec(kvm: bool, kernel: bool, firmware: Firmware) -> MachineSpec {
    let cache = PathBuf::from("/cache/boxes/0123abcd");
    MachineSpec {
        vm_name: "provisioner-lab-1a2b3c4d".into(),
        hostname: "lab".into(),
        cpus: 2,
        memory_mb: 2048,
        disk_gb: 20,
        base: BoxImage {
            id: "0123abcd".into(),
            disk: cache.join("disk.qcow2"),
            format: "qcow2".into(),
            kernel: kernel.then(|| cache.join("vmlinuz")),
            initrd: kernel.then(|| cache.join("initrd.img")),
            cmdline: kernel.then(|| "root=/dev/vda rw console=ttyS0 net.ifnames=0".into()),
            firmware,
        },
        seed_iso: PathBuf::from("/home/u/lab/.provisioner/seed.iso"),
        forwards: vec![
            Forward {
                guest: 22,
                host: 2222,
                host_ip: "127.0.0.1".into(),
                protocol: Protocol::Tcp,
                name: Some("ssh".into()),
            },
            Forward {
                guest: 9090,
                host: 9090,
                host_ip: "127.0.0.1".into(),
                protocol: Protocol::Tcp,
                name: None,
            },
            Forward {
                guest: 514,
                host: 5514,
                host_ip: "127.0.0.1".into(),
                protocol: Protocol::Udp,
                name: None,
            },
        ],
        state: StateDir::at("/home/u/lab & co/.provisioner"),
        kvm,
    }
}

/// Compare with tests/golden/vm/NAME; `UPDATE_GOLDEN=1` rewrites the file.
#[track_caller]
fn golden(name: &str, actual: &str) {
    let path = support::repo().join("tests/golden/vm").join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_GOLDEN=1 writes it)", path.display()));
    assert_eq!(
        actual,
        expected,
        "domain XML differs from {} (UPDATE_GOLDEN=1 rewrites it)",
        path.display()
    );
}

#[test]
fn domain_xml_tcg_direct_kernel_boot() {
    let xml = domain_xml(&spec(false, true, Firmware::Bios), Some("+0:+0")).unwrap();
    golden("tcg-direct-kernel.xml", &xml);
    // The state dir round-trips through the metadata, escaped.
    assert!(xml.contains("lab &amp; co"), "{xml}");
    assert_eq!(
        owner_state_dir(&xml).as_deref(),
        Some("/home/u/lab & co/.provisioner")
    );
}

#[test]
fn domain_xml_kvm_disk_boot() {
    golden(
        "kvm-disk-boot.xml",
        &domain_xml(&spec(true, false, Firmware::Bios), None).unwrap(),
    );
}

#[test]
fn domain_xml_uefi() {
    golden(
        "uefi.xml",
        &domain_xml(&spec(false, false, Firmware::Uefi), None).unwrap(),
    );
}

#[test]
fn a_domain_without_our_metadata_has_no_owner() {
    assert_eq!(
        owner_state_dir("<domain type='kvm'><name>lab</name></domain>"),
        None
    );
}

/// A test dir with a minimal libvirt config: local image box, SSH and one extra forward on the given ports.
fn machine_dir(name: &str, ssh_port: u16, extra_port: u16, image: &Path) -> Test {
    let t = Test::new();
    t.write(
        "box-config.toml",
        format!(
            "[machine]\nname = \"{name}\"\nprovider = \"libvirt\"\ncpus = 1\nmemory_mb = 1024\ndisk_gb = 4\naccel = \"tcg\"\n\n\
             [box]\nimage = \"{}\"\n\n[ssh]\nhost_port = {ssh_port}\nconnect_timeout_secs = 300\n\n\
             [[forward]]\nname = \"web\"\nguest = 80\nhost = {extra_port}\n\n[provision]\nenabled = false\n\n\
             [libvirt]\nuri = \"qemu:///session\"\n",
            image.display()
        ),
    );
    t
}

#[test]
fn destroy_without_tty_and_without_force_refuses() {
    let t = machine_dir(
        "refuse",
        support::free_port(),
        support::free_port(),
        Path::new("/nonexistent.qcow2"),
    );
    std::fs::create_dir_all(t.path().join(".provisioner")).unwrap();
    let r = Test::new()
        .cwd(t.path())
        .arg("destroy")
        .run()
        .failure()
        .stderr_contains("not a terminal");
    assert!(r.stderr().contains("-f"), "{}", r.stderr());
    assert!(
        t.path().join(".provisioner").is_dir(),
        "the state dir must survive a refused destroy"
    );
}

#[test]
fn status_without_a_machine_says_not_created() {
    let t = machine_dir(
        "nothing",
        support::free_port(),
        support::free_port(),
        Path::new("/nonexistent.qcow2"),
    );
    Test::new()
        .cwd(t.path())
        .arg("status")
        .run()
        .success()
        .stdout_contains("nothing: not created");
    let r = Test::new()
        .cwd(t.path())
        .args(["--json", "status"])
        .run()
        .success();
    let v: serde_json::Value = serde_json::from_str(r.stdout().trim()).unwrap();
    assert_eq!(v["state"], "not_created", "{v}");
    assert!(
        !t.path().join(".provisioner").exists(),
        "status must not create state"
    );
}

#[test]
fn up_refuses_a_taken_port_naming_its_holder() {
    if which::which("virsh").is_err() {
        eprintln!("skipped: no virsh on this host");
        return;
    }
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let t = machine_dir(
        "taken",
        support::free_port(),
        port,
        Path::new("/nonexistent.qcow2"),
    );
    let r = Test::new()
        .cwd(t.path())
        .args(["up", "--no-provision"])
        .run()
        .failure();
    let err = r.stderr();
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    assert!(
        err.contains(&format!("PID {}", std::process::id())),
        "{err}"
    );
    assert!(err.contains("hint:"), "{err}");
}
