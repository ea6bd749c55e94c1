//! libvirt provider and the lifecycle commands.
//!
//! Fast tier: domain XML golden files, `destroy`/`status` without a machine, the port check through `up`.
//! VM tier (`#[ignore = "vm: ..."]`): real libvirt + QEMU (TCG) guests driven through the binary.

use std::os::unix::process::CommandExt;
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
            extra_disks: Vec::new(),
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
        private_net: None,
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
    assert_eq!(actual, expected, "domain XML differs from {} (UPDATE_GOLDEN=1 rewrites it)", path.display());
}

#[test]
fn domain_xml_tcg_direct_kernel_boot() {
    let xml = domain_xml(
        &spec(false, true, Firmware::Bios),
        Some("5f2c1c4e-8f7e-4a55-9d43-0c3f4e0a6b21"),
        Some("+0:+0"),
    )
    .unwrap();
    golden("tcg-direct-kernel.xml", &xml);
    // The state dir round-trips through the metadata, escaped.
    assert!(xml.contains("lab &amp; co"), "{xml}");
    assert_eq!(owner_state_dir(&xml).as_deref(), Some("/home/u/lab & co/.provisioner"));
}

#[test]
fn domain_xml_kvm_disk_boot() {
    golden("kvm-disk-boot.xml", &domain_xml(&spec(true, false, Firmware::Bios), None, None).unwrap());
}

#[test]
fn domain_xml_uefi() {
    golden("uefi.xml", &domain_xml(&spec(false, false, Firmware::Uefi), None, None).unwrap());
}

/// A vagrant-libvirt v2 box with three disks: the boot disk is vda (the machine's `disk.qcow2`), the others get
/// their own overlays attached in the box's order as vdb and vdc, all virtio qcow2, before the seed.
#[test]
fn domain_xml_multi_disk_box_attaches_every_disk_in_order() {
    let mut s = spec(true, false, Firmware::Bios);
    s.base.extra_disks = vec![
        (PathBuf::from("/cache/boxes/0123abcd/data.qcow2"), "qcow2".into()),
        (PathBuf::from("/cache/boxes/0123abcd/logs.raw"), "raw".into()),
    ];
    let xml = domain_xml(&s, None, None).unwrap();
    golden("multi-disk.xml", &xml);
    let doc = roxmltree::Document::parse(&xml).unwrap();
    let disks: Vec<(String, String, String)> = doc
        .descendants()
        .filter(|n| n.has_tag_name("disk"))
        .map(|d| {
            let child = |tag: &str, attr: &str| {
                d.children()
                    .find(|c| c.has_tag_name(tag))
                    .and_then(|c| c.attribute(attr))
                    .unwrap()
                    .to_string()
            };
            (child("target", "dev"), child("source", "file"), child("driver", "type"))
        })
        .collect();
    let dir = s.state.root.display().to_string();
    let want = |dev: &str, file: String, ty: &str| (dev.to_string(), file, ty.to_string());
    assert_eq!(
        disks,
        vec![
            want("vda", format!("{dir}/disk.qcow2"), "qcow2"),
            // The overlays are qcow2 whatever the box's disk is (their backing keeps its format).
            want("vdb", format!("{dir}/disk-1.qcow2"), "qcow2"),
            want("vdc", format!("{dir}/disk-2.qcow2"), "qcow2"),
            want("sda", "/home/u/lab/.provisioner/seed.iso".into(), "raw"),
        ]
    );
}

/// The overlays of a multi-disk box: the boot disk's grown to `disk_gb`, each other disk's on that disk at its
/// own size; the box's files are not written.
#[test]
#[cfg_attr(windows, ignore = "windows: makes its disk images with qemu-img")]
fn every_disk_of_a_multi_disk_box_gets_its_own_overlay() {
    let t = tempfile::tempdir().unwrap();
    let img = |name: &str, fmt: &str, size: &str| {
        let p = t.path().join(name);
        let out = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", fmt])
            .arg(&p)
            .arg(size)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        p
    };
    let boot = img("boot.qcow2", "qcow2", "64M");
    let data = img("data.qcow2", "qcow2", "32M");
    let logs = img("logs.raw", "raw", "16M");
    let before: Vec<Vec<u8>> = [&boot, &data, &logs].iter().map(|p| std::fs::read(p).unwrap()).collect();
    let mut s = spec(false, false, Firmware::Bios);
    s.state = StateDir::at(t.path().join("proj/.provisioner"));
    s.state.ensure().unwrap();
    s.disk_gb = 1;
    s.base.disk = boot.clone();
    s.base.format = "qcow2".into();
    s.base.extra_disks = vec![(data.clone(), "qcow2".into()), (logs.clone(), "raw".into())];
    provisioner::provider::libvirt::ensure_overlays(&s).unwrap();
    let info = |p: PathBuf| -> serde_json::Value {
        let out =
            std::process::Command::new("qemu-img").args(["info", "--output=json"]).arg(&p).output().unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    };
    for (file, backing, fmt, size) in [
        ("disk.qcow2", &boot, "qcow2", 1u64 << 30),
        ("disk-1.qcow2", &data, "qcow2", 32 << 20),
        ("disk-2.qcow2", &logs, "raw", 16 << 20),
    ] {
        let i = info(s.state.path(file));
        assert_eq!(i["format"], "qcow2", "{file}: {i}");
        assert_eq!(i["backing-filename"], backing.canonicalize().unwrap().to_str().unwrap(), "{file}: {i}");
        assert_eq!(i["backing-filename-format"], fmt, "{file}: {i}");
        assert_eq!(i["virtual-size"], size, "{file}: {i}");
    }
    assert!(!s.state.path("disk-3.qcow2").exists());
    let after: Vec<Vec<u8>> = [&boot, &data, &logs].iter().map(|p| std::fs::read(p).unwrap()).collect();
    assert!(before == after, "a box disk was written");
}

fn private(isolated: bool) -> provisioner::provider::PrivateNic {
    use provisioner::provider::network::{mac_for, net_name, PrivateNet};
    provisioner::provider::PrivateNic {
        ip: "10.77.0.11".parse().unwrap(),
        prefix: 24,
        mac: mac_for("/home/u/lab & co", "web"),
        net: PrivateNet::new(&net_name("/home/u/lab & co", "private"), isolated),
    }
}

/// qemu:///session: the private NIC is a QEMU multicast socket bound to the loopback interface, the first NIC
/// gets the MAC the guest's network-config matches.
#[test]
fn domain_xml_private_network_mcast() {
    let mut s = spec(false, true, Firmware::Bios);
    s.private_net = Some(private(false));
    let xml = domain_xml(&s, None, Some("+0:+0")).unwrap();
    golden("private-mcast.xml", &xml);
    assert!(xml.contains(",localaddr=127.0.0.1'/>"), "{xml}");
    assert!(xml.contains("netdev=net0,mac=52:54:00:12:34:56,"), "{xml}");
    assert!(!xml.contains("<interface"), "no libvirt NIC (and no bridge) in session mode:\n{xml}");
}

/// qemu:///system on request: the private NIC joins the project's isolated libvirt network.
#[test]
fn domain_xml_private_network_isolated() {
    let mut s = spec(false, true, Firmware::Bios);
    s.private_net = Some(private(true));
    let xml = domain_xml(&s, None, Some("+0:+0")).unwrap();
    golden("private-isolated.xml", &xml);
    assert_eq!(
        provisioner::provider::libvirt::private_network_of(&xml).as_deref(),
        Some(private(true).net.name.as_str())
    );
    assert!(!xml.contains("mcast="), "{xml}");
    let net = provisioner::provider::network::isolated_network_xml(&private(true).net.name);
    golden("private-network.xml", &net);
}

/// A cached lab's memory image is restored in another state dir with the current forwards; nothing else changes.
#[test]
fn restore_xml_moves_the_state_dir_and_takes_the_current_forwards() {
    use provisioner::provider::libvirt::restore_xml;
    let saved =
        domain_xml(&spec(false, true, Firmware::Bios), Some("5f2c1c4e-8f7e-4a55-9d43-0c3f4e0a6b21"), None)
            .unwrap();
    let new_dir = Path::new("/srv/o'brien & co/.provisioner");
    let xml = restore_xml(&saved, new_dir, "user,id=net0,hostfwd=tcp:127.0.0.1:2999-:22").unwrap();
    assert_eq!(owner_state_dir(&xml).as_deref(), Some("/srv/o'brien & co/.provisioner"));
    assert!(!xml.contains("lab &amp; co"), "old state dir left in:\n{xml}");
    assert!(xml.contains("<source file='/srv/o&apos;brien &amp; co/.provisioner/disk.qcow2'/>"), "{xml}");
    assert!(xml.contains("<qemu:arg value='user,id=net0,hostfwd=tcp:127.0.0.1:2999-:22'/>"), "{xml}");
    assert!(!xml.contains("2222"), "old forward left in:\n{xml}");
    // Devices, uuid and the box's kernel stay as saved (libvirt checks the guest ABI).
    assert!(
        xml.contains("5f2c1c4e-8f7e-4a55-9d43-0c3f4e0a6b21") && xml.contains("/cache/boxes/0123abcd/vmlinuz")
    );
    assert_eq!(xml.lines().count(), saved.lines().count());
    assert!(restore_xml("<domain/>", new_dir, "user,id=net0").is_err());
}

#[test]
fn a_domain_without_our_metadata_has_no_owner() {
    assert_eq!(owner_state_dir("<domain type='kvm'><name>lab</name></domain>"), None);
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
    let t =
        machine_dir("refuse", support::free_port(), support::free_port(), Path::new("/nonexistent.qcow2"));
    std::fs::create_dir_all(t.path().join(".provisioner")).unwrap();
    let r = Test::new().cwd(t.path()).arg("destroy").run().failure().stderr_contains("not a terminal");
    assert!(r.stderr().contains("-f"), "{}", r.stderr());
    assert!(t.path().join(".provisioner").is_dir(), "the state dir must survive a refused destroy");
}

#[test]
fn status_without_a_machine_says_not_created() {
    let t =
        machine_dir("nothing", support::free_port(), support::free_port(), Path::new("/nonexistent.qcow2"));
    Test::new().cwd(t.path()).arg("status").run().success().stdout_contains("nothing: not created");
    let r = Test::new().cwd(t.path()).args(["--json", "status"]).run().success();
    let v: serde_json::Value = serde_json::from_str(r.stdout().trim()).unwrap();
    assert_eq!(v["state"], "not_created", "{v}");
    assert!(!t.path().join(".provisioner").exists(), "status must not create state");
}

#[test]
fn up_refuses_a_taken_port_naming_its_holder() {
    if which::which("virsh").is_err() {
        eprintln!("skipped: no virsh on this host");
        return;
    }
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let t = machine_dir("taken", support::free_port(), port, Path::new("/nonexistent.qcow2"));
    let r = Test::new().cwd(t.path()).args(["up", "--no-provision"]).run().failure();
    let err = r.stderr();
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    assert!(err.contains(&format!("PID {}", std::process::id())), "{err}");
    assert!(err.contains("hint:"), "{err}");
}

// ---------------------------------------------------------------------------------------------------------------
// VM tier: real libvirt + QEMU (TCG) guests.

/// The `[box]` table of the repo's box-config.toml (so the cached box is shared with the other VM tests), or
/// `PROVISIONER_TEST_BOX` (a TOML `[box]` table) when set.
fn test_box() -> String {
    if let Ok(b) = std::env::var("PROVISIONER_TEST_BOX") {
        return b;
    }
    let cfg = provisioner::config::Config::load(&support::repo().join("box-config.toml")).unwrap();
    let mut doc = toml::Table::new();
    doc.insert("box".into(), toml::Value::try_from(&cfg.base_box).unwrap());
    toml::to_string(&doc).unwrap()
}

/// The shipped cluster (examples/cluster) from nothing: three 1 GiB TCG machines up in parallel, every service of
/// every machine healthy, Prometheus on `monitor` scraping the app machines by name over the private network, a
/// machine reaching another by name (TCP: the minbase box has no ping) and over HTTP, an alert raised by load on
/// app1 delivered to its webhook, `destroy -f app2` leaving the others running and `destroy -f` leaving nothing.
/// Cost: ~15-25 min on an idle 2-core host the first time (three guests build their images under TCG); a few
/// minutes once the cached labs exist (`box list`).
#[test]
#[ignore = "vm: three TCG guests: the cluster example up, health, private network, verify, destroy (~15-25 min)"]
fn vm_cluster_up_health_private_network_verify_destroy() {
    let t = Test::new();
    support::copy_cluster_example(t.path());
    let text = std::fs::read_to_string(t.path().join("box-config.toml")).unwrap();
    // The test box, free host ports, the session URI and a deadline fit for TCG.
    let mut cfg = support::with_box(&text, &test_box());
    // Distinct free ports: the listeners are held until every port is picked, so none is handed out twice.
    let held: Vec<std::net::TcpListener> =
        (0..9).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    let ports = ["19090", "19093", "13000", "18001", "19101", "18081", "18002", "19102", "18082"];
    for (port, l) in ports.iter().zip(&held) {
        cfg =
            cfg.replace(&format!("host = {port}\n"), &format!("host = {}\n", l.local_addr().unwrap().port()));
    }
    drop(held);
    cfg.push_str("\n[ssh]\nconnect_timeout_secs = 1500\n\n[libvirt]\nuri = \"qemu:///session\"\n");
    t.write("box-config.toml", &cfg);
    let run = |args: &[&str]| Test::new().cwd(t.path()).args(args.iter().copied()).run();
    let ours = || -> Vec<String> {
        let out = std::process::Command::new("virsh")
            .args(["-c", "qemu:///session", "list", "--all", "--name"])
            .output()
            .unwrap();
        let id = provisioner::machine::identity::MachineId::new(t.path(), "x").unwrap();
        let hash = id.vm_name().rsplit('-').next().unwrap().to_string();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.ends_with(&hash))
            .map(str::to_string)
            .collect()
    };
    struct Cleanup<'a>(&'a Path);
    impl Drop for Cleanup<'_> {
        fn drop(&mut self) {
            let _ = Test::new().cwd(self.0).args(["destroy", "-f"]).run();
        }
    }
    let _cleanup = Cleanup(t.path());

    // `up` as docs/multi-machine.md says: the default parallelism (two machines at once on a 2-core host), so
    // the monitor's Prometheus is up while app2 is still being provisioned; its targets there are judged in the
    // final round, and every machine's lab is cached.
    let started = std::time::Instant::now();
    let up = run(&["--json", "up"]);
    let out = up.stdout();
    eprintln!("cluster up: {:.0} s", started.elapsed().as_secs_f64());
    let saved = events(&out, "lab_saved");
    // The cached labs belong to this temp project: removed at the end, whatever happens.
    struct DropLabs(Vec<String>);
    impl Drop for DropLabs {
        fn drop(&mut self) {
            for key in &self.0 {
                let _ = Test::new().args(["box", "remove", key]).run();
            }
        }
    }
    let _labs = DropLabs(saved.iter().filter_map(|e| e["key"].as_str().map(str::to_string)).collect());
    let done = events(&out, "machine_done");
    for d in &done {
        eprintln!(
            "  {}: exit {} after {:.0} s",
            d["machine"],
            d["exit_code"],
            d["seconds"].as_f64().unwrap_or(0.0)
        );
    }
    assert_eq!(done.len(), 3, "{out}\n{}", up.stderr());
    assert!(
        done.iter().all(|e| e["exit_code"] == 0),
        "{done:?}\nerrors: {:?}\nhealth reports: {:?}\n{}",
        events(&out, "error"),
        out.lines().filter(|l| l.contains("\"services\"")).collect::<Vec<_>>(),
        up.stderr()
    );
    let up = up.success();
    assert_eq!(ours().len(), 3);
    let cached: Vec<&str> = saved.iter().filter_map(|e| e["machine"].as_str()).collect();
    let mut sorted = cached.clone();
    sorted.sort_unstable();
    assert_eq!(
        sorted,
        ["app1", "app2", "monitor"],
        "every machine's lab cached: {cached:?}\n{}",
        up.stderr()
    );
    let cores = std::thread::available_parallelism().unwrap().get();
    let par = events(&out, "parallel");
    assert_eq!(par[0]["parallel"], 3.min(cores).max(2), "the default parallelism: {par:?}");
    // The monitor's own round left its targets on the app machines to the final round, which judged them.
    let monitor: Vec<serde_json::Value> =
        events(&out, "health").into_iter().filter(|d| d["machine"] == "monitor").collect();
    assert_eq!(monitor.len(), 2, "its own round, then the final one: {monitor:?}");
    let deferred = monitor[0]["deferred"].to_string();
    assert!(deferred.contains("app2:9100"), "{deferred}");
    assert!(monitor[1]["deferred"].is_null() && monitor[1]["healthy"] == true, "{:?}", monitor[1]);

    // Every service of every machine, and the monitor's Prometheus sees the app machines up.
    let health = run(&["--json", "health"]).success().stdout();
    // The health reports (one per machine, among the phase events), each all green.
    let docs: Vec<serde_json::Value> = health
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|d| d["event"] == "health")
        .collect();
    let machines: Vec<&str> = docs.iter().filter_map(|d| d["machine"].as_str()).collect();
    assert_eq!(machines, ["monitor", "app1", "app2"], "{health}");
    assert!(docs.iter().all(|d| d["healthy"] == true), "{health}");
    let status = run(&["status"]).success().stdout();
    assert_eq!(status.lines().filter(|l| l.contains("running")).count(), 3, "{status}");

    // Machine to machine over the private network: by name, TCP and HTTP.
    let probe = "getent hosts app2 && timeout 10 bash -c 'echo > /dev/tcp/app2/9100' && echo tcp-ok && \
                 python3 -c 'import urllib.request;print(urllib.request.urlopen(\"http://app1:8000/health\",timeout=10).status)'";
    let r = run(&["ssh", "monitor", "-c", probe]).success().stdout();
    assert!(r.starts_with("10.77.0.12") && r.contains("tcp-ok") && r.trim_end().ends_with("200"), "{r}");
    // Prometheus (monitor) scrapes app1 and app2 by name: `health` on monitor reports its targets.
    let targets = docs.iter().find(|d| d["machine"] == "monitor").unwrap().to_string();
    for want in ["app1:8000", "app2:8000", "app1:9100", "app2:9100"] {
        assert!(targets.contains(want), "{want} missing from the monitor's targets: {targets}");
    }

    // An alert raised by load on app1 reaches the webhook (the demo app on app1).
    run(&["verify", "app1", "--timeout", "900"]).success().stdout_contains("delivered");

    // destroy one: the others keep running.
    run(&["destroy", "-f", "app2"]).success();
    let left = ours();
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(left.iter().all(|d| !d.contains("-app2-")), "{left:?}");
    run(&["ssh", "app1", "-c", "true"]).success();
    assert!(!t.path().join(".provisioner/machines/app2").exists());

    // The reset: `up app2` restores the provisioned lab the cluster `up` cached (no boot, no provisioning), sets
    // the guest's clock from the host's, and ends green; then app2 goes again, as before.
    let reset = run(&["--json", "up", "app2"]).success().stdout();
    assert_eq!(events(&reset, "lab_restored").len(), 1, "not restored from the cached lab: {reset}");
    let phases: Vec<String> = events(&reset, "phase_start")
        .iter()
        .filter_map(|e| e["phase"].as_str().map(str::to_string))
        .collect();
    for skipped in ["boot", "docker", "forwards", "upload", "images", "compose", "cache lab"] {
        assert!(!phases.iter().any(|p| p == skipped), "a restored lab ran `{skipped}`: {phases:?}");
    }
    let judged = events(&reset, "health");
    assert!(judged.last().is_some_and(|h| h["healthy"] == true), "{judged:?}");
    let guest_now: i64 = run(&["ssh", "app2", "-c", "date +%s"]).success().stdout().trim().parse().unwrap();
    let host_now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    assert!((guest_now - host_now).abs() < 60, "the restored guest's clock is {}s off", guest_now - host_now);
    run(&["destroy", "-f", "app2"]).success();

    // destroy all: no domain, disk, socket, state or process of the project is left.
    run(&["destroy", "-f"]).success();
    assert!(ours().is_empty(), "{:?}", ours());
    assert!(!t.path().join(".provisioner").exists(), "state (disks, seeds, sockets) removed");
    let ps = std::process::Command::new("ps").args(["-eo", "args"]).output().unwrap();
    let needle = std::fs::canonicalize(t.path()).unwrap().to_string_lossy().into_owned();
    let left: Vec<String> = String::from_utf8_lossy(&ps.stdout)
        .lines()
        .filter(|l| l.contains(&needle))
        .map(str::to_string)
        .collect();
    assert!(left.is_empty(), "processes still naming the project: {left:?}");
}

/// A machine in its own temp dir with free ports; destroyed (and any background `up` killed) on drop.
struct Vm {
    t: Test,
    name: String,
    uri: String,
}

impl Vm {
    fn new(tag: &str) -> Vm {
        Vm::with_box(tag, &test_box())
    }
    /// A machine booting the `[box]` table `box_toml`.
    fn with_box(tag: &str, box_toml: &str) -> Vm {
        let t = Test::new();
        let name = format!("vm{tag}{}", std::process::id() % 100_000);
        let uri = "qemu:///session".to_string();
        t.write(
            "box-config.toml",
            format!(
                "[machine]\nname = \"{name}\"\nprovider = \"libvirt\"\ncpus = 2\nmemory_mb = 1024\ndisk_gb = 8\n\n\
                 {}\n[ssh]\nhost_port = {}\nconnect_timeout_secs = 1500\n\n[[forward]]\nname = \"web\"\nguest = 80\nhost = {}\n\n\
                 [provision]\nenabled = false\n\n[libvirt]\nuri = \"{uri}\"\n",
                box_toml,
                support::free_port(),
                support::free_port()
            ),
        );
        Vm { t, name, uri }
    }
    fn cmd(&self) -> Test {
        Test::new()
            .cwd(self.t.path())
            // The machine's OpenSSH master is closed by halt/destroy (and the drop's destroy).
            .env("PROVISIONER_SSH_REUSE", "1")
            .env("PROVISIONER_CONFIG", self.t.path().join("box-config.toml").to_string_lossy())
    }
    fn run(&self, args: &[&str]) -> support::Run {
        self.cmd().args(args.iter().copied()).run()
    }
    /// `up --no-provision` in the background.
    fn spawn_up(&self, log: &str) -> support::Proc {
        let mut c = std::process::Command::new(support::bin());
        c.args(["up", "--no-provision"])
            .current_dir(self.t.path())
            .env("PROVISIONER_CACHE_DIR", support::cache_dir());
        // A shell that started the test runner in the background may have left SIGINT ignored; `up` must see it
        // as a user's Ctrl-C would.
        // SAFETY: only async-signal-safe signal(2) between fork and exec.
        unsafe {
            c.pre_exec(|| {
                libc::signal(libc::SIGINT, libc::SIG_DFL);
                Ok(())
            });
        }
        support::Proc::spawn("up", c, self.t.path().join(log))
    }
    fn state_dir(&self) -> PathBuf {
        self.t.path().join(".provisioner")
    }
    /// Our domains in `virsh list --all --name`.
    fn domains(&self) -> Vec<String> {
        let out = std::process::Command::new("virsh")
            .args(["-c", &self.uri, "list", "--all", "--name"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains(&self.name))
            .map(str::to_string)
            .collect()
    }
    /// Qcow2 files in the state dir (the overlay and any leftover temp).
    fn disks(&self) -> Vec<String> {
        std::fs::read_dir(self.state_dir())
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.contains("qcow2"))
                    .collect()
            })
            .unwrap_or_default()
    }
    fn wait_exit(p: &mut support::Proc, timeout: std::time::Duration) -> std::process::ExitStatus {
        support::wait_until(timeout, "the background `up` to exit", || p.child.try_wait().unwrap())
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let r = self.run(&["destroy", "-f"]);
        if !r.out.status.success() {
            eprintln!("cleanup destroy failed: {}", r.stderr());
        }
    }
}

/// Generous: a TCG boot on a loaded 2-core host takes many minutes.
const BOOT: std::time::Duration = std::time::Duration::from_secs(1800);

#[test]
#[ignore = "vm: boots a TCG guest through libvirt (up, lock, ssh, status, halt, up, destroy)"]
fn vm_lifecycle_end_to_end() {
    let vm = Vm::new("life");
    // The cold `up` (box from the cache, create, boot) holds the lock: a second `up` fails fast naming its PID.
    let mut first = vm.spawn_up("up1.log");
    let lock = vm.state_dir().join("lock");
    support::wait_until(BOOT, "the lock file to name the first up's PID", || {
        std::fs::read_to_string(&lock).ok().filter(|s| s.contains(&first.child.id().to_string()))
    });
    let t = std::time::Instant::now();
    vm.run(&["up", "--no-provision"]).failure().stderr_contains(&format!("pid {}", first.child.id()));
    assert!(
        t.elapsed() < std::time::Duration::from_secs(10),
        "second up did not fail fast: {:?}",
        t.elapsed()
    );
    let st = Vm::wait_exit(&mut first, BOOT);
    assert!(st.success(), "first up failed:\n{}", first.log_text());

    let r = vm.run(&["ssh", "-c", "cat /etc/hostname"]).success();
    assert_eq!(r.stdout().trim(), vm.name);
    // The first `ssh -c` left an OpenSSH master; the second goes through it.
    let socket = vm.state_dir().join("ssh-control");
    assert!(socket.exists(), "no control socket after `ssh -c`");
    vm.run(&["ssh", "-c", "true"]).success();
    assert!(ssh_check(&socket).contains("Master running"), "{}", ssh_check(&socket));
    assert_eq!(ssh_masters(&socket).len(), 1, "one master process");
    let r = vm.run(&["status"]).success();
    assert!(r.stdout().contains(&format!("{}: running (libvirt, 127.0.0.1:", vm.name)), "{}", r.stdout());
    // The forwarded ports of a real machine, SSH first (what `vagrant port` shows), and `port --guest 22`.
    assert!(r.stdout().contains("forwarded ports:\n     22 (guest) => 127.0.0.1:"), "{}", r.stdout());
    let ssh_port = vm.run(&["port", "--guest", "22"]).success().stdout().trim().to_string();
    assert!(r.stdout().contains(&format!("127.0.0.1:{ssh_port} ")), "{ssh_port}: {}", r.stdout());
    // `global-status`, from another directory, finds the running machine by its marker, with its project.
    let elsewhere = tempfile::tempdir().unwrap();
    let r = Test::new().cwd(elsewhere.path()).args(["--json", "global-status"]).run().success();
    let doc: serde_json::Value = serde_json::from_str(r.stdout().trim()).unwrap();
    let domain = vm.domains().pop().expect("the machine's domain");
    let found = doc["machines"].as_array().unwrap().iter().find(|m| m["vm_name"] == domain.as_str()).cloned();
    let found = found.unwrap_or_else(|| panic!("{domain} not in global-status: {doc}"));
    assert_eq!(
        (&found["machine"], &found["state"], &found["project_exists"]),
        (&serde_json::json!(vm.name), &serde_json::json!("running"), &serde_json::json!(true)),
        "{found}"
    );

    vm.run(&["halt"]).success();
    assert!(ssh_masters(&socket).is_empty(), "halt left ssh masters: {:?}", ssh_masters(&socket));
    assert!(!socket.exists(), "halt left the control socket");
    vm.run(&["status"]).success().stdout_contains(&format!("{}: stopped", vm.name));
    // `up` reads state.json once, for its plan (the provider records its VM id in the plan's copy); it renders
    // nothing, provisioning being off here.
    let r = vm.run(&["up", "--no-provision", "--json"]).success();
    let counts = r.stdout().lines().find(|l| l.contains("\"run_counts\"")).map(str::to_string);
    let counts: serde_json::Value = serde_json::from_str(&counts.expect("a run_counts event")).unwrap();
    assert_eq!((counts["state_reads"].as_u64(), counts["renders"].as_u64()), (Some(1), Some(0)), "{counts}");
    vm.run(&["status"]).success().stdout_contains("running");
    vm.run(&["ssh", "-c", "true"]).success();
    assert_eq!(ssh_masters(&socket).len(), 1, "a new master after the restart");

    let disk = vm.state_dir().join("disk.qcow2");
    assert!(disk.exists());
    // Issue 8.1: the same project reached through a symlinked directory is the same machine (one canonical
    // identity): destroy there must not refuse the domain as "another provisioner machine".
    let link = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(vm.t.path(), link.path().join("proj")).unwrap();
    let via_link = link.path().join("proj/box-config.toml");
    Test::new()
        .cwd(link.path())
        .env("PROVISIONER_CONFIG", via_link.to_string_lossy())
        .args(["destroy", "-f"])
        .run()
        .success();
    assert!(vm.domains().is_empty(), "domain left behind: {:?}", vm.domains());
    assert!(!vm.state_dir().exists() && !disk.exists(), "state dir or overlay left behind");
    assert!(ssh_masters(&socket).is_empty(), "destroy left ssh masters: {:?}", ssh_masters(&socket));
}

/// `ssh -O check` on a control socket: its stderr ("Master running (pid=N)" when one answers).
fn ssh_check(socket: &std::path::Path) -> String {
    let out = std::process::Command::new("ssh")
        .args(["-F", "none", "-o"])
        .arg(format!("ControlPath=\"{}\"", socket.display()))
        .args(["-O", "check", "machine"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// PIDs of ssh master processes for a control socket (a master renames itself `ssh: PATH [mux]`).
fn ssh_masters(socket: &std::path::Path) -> Vec<u32> {
    let needle = socket.display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(&needle))
                .unwrap_or(false)
        })
        .collect()
}

#[test]
#[ignore = "vm: interrupts `up` (SIGINT, then SIGKILL) during boot and checks the next `up` recovers"]
fn vm_interrupted_up_recovers_without_leaks() {
    let vm = Vm::new("intr");
    let serial = vm.state_dir().join("serial.log");
    for (round, sig) in [(1, 2), (2, 9)] {
        let mut up = vm.spawn_up(&format!("up{round}.log"));
        // Interrupt once the guest is booting (its serial console has output).
        support::wait_until(BOOT, "the guest to start booting", || {
            if let Some(st) = up.child.try_wait().unwrap() {
                panic!("up exited before the interrupt ({st}):\n{}", up.log_text());
            }
            std::fs::metadata(&serial).ok().filter(|m| m.len() > 0)
        });
        unsafe { libc::kill(up.child.id() as i32, sig) };
        let st = Vm::wait_exit(&mut up, std::time::Duration::from_secs(30));
        assert!(!st.success(), "up survived signal {sig}");

        vm.run(&["up", "--no-provision"]).success();
        vm.run(&["status"]).success().stdout_contains("running");
        assert_eq!(vm.domains().len(), 1, "domains after signal {sig}: {:?}", vm.domains());
        assert_eq!(vm.disks(), vec!["disk.qcow2".to_string()], "disks after signal {sig}");
        // Next round starts from a stopped machine with a fresh boot.
        vm.run(&["halt", "-f"]).success();
        std::fs::write(&serial, "").unwrap();
    }
}

/// The JSON events of a `--json` run, by kind.
fn events(out: &str, kind: &str) -> Vec<serde_json::Value> {
    out.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == kind)
        .collect()
}

#[test]
#[ignore = "vm: one TCG guest: snapshot save/restore, suspend/resume, cached lab restore, cache miss on a template \
            edit, package, and a second guest booted from the packaged box (~4-8 min)"]
fn vm_snapshots_cached_lab_and_package() {
    let vm = Vm::new("snap");
    vm.t.write("provision/motd.hbs", "line one\nline two\n");

    // Cold up: nothing cached for these inputs; the machine is captured at the end.
    let r = vm.run(&["--json", "up"]).success();
    let out = r.stdout();
    assert_eq!(events(&out, "lab_cache").first().map(|e| e["hit"].clone()), Some(false.into()), "{out}");
    let saved = events(&out, "lab_saved");
    let key = saved.first().and_then(|e| e["key"].as_str()).unwrap_or_else(|| panic!("no lab_saved: {out}"));
    let key = key.to_string();
    vm.run(&["box", "list"]).success().stdout_contains(&key[..12]);

    // Snapshot: a change made after `save` is gone after `restore`, and the guest answers again.
    vm.run(&["snapshot", "save", "clean"]).success();
    vm.run(&["ssh", "-c", "echo changed > ~/marker"]).success();
    vm.run(&["snapshot", "list"]).success().stdout_contains("clean");
    let t = std::time::Instant::now();
    vm.run(&["snapshot", "restore", "clean"]).success();
    eprintln!("snapshot restore: {:.1}s", t.elapsed().as_secs_f64());
    let r = vm.run(&["ssh", "-c", "test -e ~/marker && echo present || echo gone"]).success();
    assert_eq!(r.stdout().trim(), "gone");
    vm.run(&["status"]).success().stdout_contains("running");
    vm.run(&["snapshot", "restore", "nope"]).failure().stderr_contains("hint:");
    vm.run(&["snapshot", "delete", "clean"]).success();
    assert!(!vm.run(&["snapshot", "list"]).success().stdout().contains("clean"));

    // Suspend / resume.
    vm.run(&["suspend"]).success();
    vm.run(&["status"]).success().stdout_contains("saved");
    vm.run(&["resume"]).success();
    vm.run(&["ssh", "-c", "true"]).success();

    // destroy -f && up with unchanged inputs: restored from the cache, no boot, clock set from the host.
    vm.run(&["destroy", "-f"]).success();
    let t = std::time::Instant::now();
    let r = vm.run(&["--json", "up"]).success();
    let secs = t.elapsed().as_secs_f64();
    let out = r.stdout();
    assert_eq!(events(&out, "lab_cache")[0]["hit"], true, "{out}");
    assert_eq!(events(&out, "lab_restored")[0]["key"], key.as_str(), "{out}");
    let phases: Vec<String> =
        events(&out, "phase_start").iter().map(|e| e["phase"].as_str().unwrap_or("").to_string()).collect();
    assert!(!phases.iter().any(|p| p == "boot"), "a restored lab must not boot: {phases:?}");
    eprintln!("cached up: {secs:.1}s");
    let r = vm.run(&["ssh", "-c", "cat /etc/hostname; date +%s"]).success();
    let stdout = r.stdout();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0].trim(), vm.name);
    let guest: u64 = lines[1].trim().parse().unwrap();
    let host = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    assert!(guest.abs_diff(host) < 120, "guest clock {guest} vs host {host}");

    // package: a vagrant-libvirt box of this machine.
    let boxfile = vm.t.path().join("lab.box");
    vm.run(&["package", "--out", &boxfile.to_string_lossy()]).success();
    let list = std::process::Command::new("tar").arg("tf").arg(&boxfile).output().unwrap();
    let names = String::from_utf8_lossy(&list.stdout).into_owned();
    for f in ["metadata.json", "Vagrantfile", "box.img"] {
        assert!(names.lines().any(|l| l == f), "{f} missing from the box: {names}");
    }

    // A one-line template edit: the cache misses and `up` takes the full path (interrupted once it says so).
    vm.run(&["destroy", "-f"]).success();
    vm.t.write("provision/motd.hbs", "line one\nline two edited\n");
    let mut c = std::process::Command::new(support::bin());
    c.args(["--json", "up"]).current_dir(vm.t.path()).env("PROVISIONER_CACHE_DIR", support::cache_dir());
    let mut up = support::Proc::spawn("up", c, vm.t.path().join("miss.log"));
    let line = support::wait_until(BOOT, "the lab_cache event", || {
        let text = up.log_text();
        text.lines().find(|l| l.contains("\"lab_cache\"")).map(str::to_string)
    });
    assert!(line.contains("\"hit\":false"), "{line}");
    unsafe { libc::kill(up.child.id() as i32, libc::SIGINT) };
    Vm::wait_exit(&mut up, std::time::Duration::from_secs(60));
    vm.run(&["destroy", "-f"]).success();
    Test::new().args(["box", "remove", &key]).run().success();

    // The packaged box boots with `[box] vagrant =`.
    let other = Vm::with_box("pkg", &format!("[box]\nvagrant = \"{}\"\n", boxfile.display()));
    other.run(&["up", "--no-provision"]).success();
    let box_id = provisioner::boxes::cache::sha256_file(&boxfile).unwrap();
    let r = other.run(&["ssh", "-c", "cat /etc/hostname"]).success();
    assert_eq!(r.stdout().trim(), other.name);
    other.run(&["destroy", "-f"]).success();
    Test::new().args(["box", "remove", &box_id]).run().success();
}

#[test]
#[ignore = "vm: boots a box with nothing to boot on a second libvirt host in a network namespace (tests/remote.rs)"]
fn vm_remote_unbootable_box_shows_the_far_serial_console() {
    crate::remote::vm_remote_unbootable_box_shows_the_far_serial_console();
}

#[test]
#[ignore = "vm: boots TCG guests on a second libvirt host in a network namespace (tests/remote.rs)"]
fn vm_remote_up_ssh_status_destroy() {
    crate::remote::vm_remote_up_ssh_status_destroy(&test_box());
}

// ---------------------------------------------------------------------------------------------------------------
// Private network between two guests (qemu:///session multicast socket on 127.0.0.1), through the provider API.

/// One guest of [`vm_private_network_two_guests`]; destroyed on drop.
struct NetGuest {
    lv: provisioner::provider::libvirt::Libvirt,
    vm_name: String,
    state: StateDir,
    user: String,
    port: u16,
}

impl NetGuest {
    /// `ssh` into the guest with the pinned host key; (success, stdout + stderr). A connection that fails (exit
    /// 255: the banner exchange times out on a loaded host) is tried again, up to 4 times.
    fn ssh(&self, script: &str) -> (bool, String) {
        let mut last = (false, String::new());
        for _ in 0..4 {
            last = self.ssh_once(script);
            if last.0 || !last.1.contains("Connection") {
                break;
            }
        }
        last
    }
    fn ssh_once(&self, script: &str) -> (bool, String) {
        let out = std::process::Command::new("ssh")
            .args(["-F", "/dev/null", "-i"])
            .arg(self.state.user_key())
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", self.state.known_hosts().display()))
            .args(["-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "ConnectTimeout=30", "-p"])
            .arg(self.port.to_string())
            .arg(format!("{}@127.0.0.1", self.user))
            .arg(script)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let text =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    }
    #[track_caller]
    fn must(&self, script: &str) -> String {
        let (ok, out) = self.ssh(script);
        assert!(ok, "{} `{script}` failed:\n{out}", self.vm_name);
        out
    }
}

impl Drop for NetGuest {
    fn drop(&mut self) {
        use provisioner::provider::Provider;
        if let Err(e) = self.lv.destroy(&self.vm_name, &self.state) {
            eprintln!("cleanup of {} failed: {e:#}", self.vm_name);
        }
    }
}

/// A network interface counter of the host.
fn host_counter(dev: &str, what: &str) -> u64 {
    std::fs::read_to_string(format!("/sys/class/net/{dev}/statistics/{what}"))
        .map(|s| s.trim().parse().unwrap_or(0))
        .unwrap_or(0)
}

/// The host interfaces that joined multicast `group` (/proc/net/igmp lists groups as little-endian hex).
fn igmp_devices(group: std::net::Ipv4Addr) -> Vec<String> {
    let hex = format!("{:08X}", u32::from_le_bytes(group.octets()));
    let text = std::fs::read_to_string("/proc/net/igmp").unwrap();
    let mut dev = String::new();
    let mut found = Vec::new();
    for line in text.lines().skip(1) {
        if !line.starts_with(char::is_whitespace) {
            dev = line.split_whitespace().nth(1).unwrap_or("").to_string();
        } else if line.split_whitespace().next() == Some(hex.as_str()) {
            found.push(dev.clone());
        }
    }
    found
}

/// Two 1 GiB TCG guests on one private network: static addresses, names in /etc/hosts, no wait for the private
/// NIC at boot, TCP and HTTP between them by name; the multicast group lives on the host's loopback only. Prints
/// the latency and throughput figures (docs/multi-machine.md). Costs about 2-4 min (two boots in parallel).
#[test]
#[ignore = "vm: boots two TCG guests on a private network (~2-4 min)"]
fn vm_private_network_two_guests() {
    use provisioner::provider::network::{mac_for, net_name, PrivateNet};
    use provisioner::provider::{PrivateNic, Provider};
    let t = Test::new();
    t.write(
        "box-config.toml",
        format!(
            "[machine]\nname = \"net\"\nprovider = \"libvirt\"\n\n{}\n[provision]\nenabled = false\n\n[libvirt]\n\
             uri = \"qemu:///session\"\n",
            test_box()
        ),
    );
    let cfg = provisioner::config::Config::load(&t.path().join("box-config.toml")).unwrap();
    let ui = provisioner::ui::Ui::new(false, true);
    let (base, _) = provisioner::boxes::ensure_ui(&cfg, "libvirt", false, &ui).unwrap();
    let project = std::fs::canonicalize(t.path()).unwrap().to_string_lossy().into_owned();
    let net = PrivateNet::new(&net_name(&project, "private"), false);
    let names = ["neta", "netb"];
    let ips: Vec<std::net::Ipv4Addr> = vec!["10.77.0.11".parse().unwrap(), "10.77.0.12".parse().unwrap()];
    let hosts: Vec<(String, std::net::Ipv4Addr)> =
        names.iter().map(|n| n.to_string()).zip(ips.clone()).collect();
    let started = std::time::Instant::now();
    let mut guests = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let lv = provisioner::provider::libvirt::Libvirt::new(&cfg).unwrap();
        lv.preflight().unwrap();
        let state = StateDir::at(t.path().join(name));
        state.ensure().unwrap();
        let (user_key, host_key) = provisioner::keys::ensure_machine_keys(&state, name).unwrap();
        let port = support::free_port();
        provisioner::keys::write_known_hosts(&state, "127.0.0.1", port, &host_key.public_openssh).unwrap();
        let mac = mac_for(&project, name);
        let seed = provisioner::seed::SeedSpec {
            instance_id: provisioner::seed::instance_id(name, &host_key),
            hostname: name.to_string(),
            user: cfg.ssh.user.clone(),
            user_key,
            host_key,
            hosts: hosts.clone(),
            private_nic: Some((mac.clone(), ips[i], 24)),
        };
        provisioner::seed::write_seed(&seed, &state.seed_iso()).unwrap();
        let vm_name = format!("provisioner-{name}-{}", std::process::id());
        let spec = MachineSpec {
            vm_name: vm_name.clone(),
            hostname: name.to_string(),
            cpus: 1,
            memory_mb: 1024,
            disk_gb: 8,
            base: base.clone(),
            seed_iso: state.seed_iso(),
            forwards: vec![Forward {
                guest: 22,
                host: port,
                host_ip: "127.0.0.1".into(),
                protocol: Protocol::Tcp,
                name: Some("ssh".into()),
            }],
            state: state.clone(),
            kvm: false,
            private_net: Some(PrivateNic { ip: ips[i], prefix: 24, mac, net: net.clone() }),
        };
        let g = NetGuest { lv, vm_name: vm_name.clone(), state, user: cfg.ssh.user.clone(), port };
        let mut recorded = provisioner::machine::state::MachineState::default();
        provisioner::provider::Provider::create(&g.lv, &spec, &mut recorded).unwrap();
        g.lv.start(&vm_name).unwrap();
        guests.push(g);
    }
    // The group is joined on the loopback interface only: nothing of this network is on a real interface.
    let joined = igmp_devices(net.mcast_group);
    assert!(
        !joined.is_empty() && joined.iter().all(|d| d == "lo"),
        "group {} joined on {joined:?}",
        net.mcast_group
    );

    for g in &guests {
        support::wait_until(BOOT, "SSH into the guest", || g.ssh("true").0.then_some(()));
        g.must("cloud-init status --wait >/dev/null; true");
    }
    eprintln!("two guests up (SSH + cloud-init final) in {:.0?}", started.elapsed());
    let (a, b) = (&guests[0], &guests[1]);

    for (g, ip) in guests.iter().zip(&ips) {
        let addrs = g.must("ip -4 -o addr show");
        assert!(addrs.contains(&format!("inet {ip}/24")), "{addrs}");
        let routes = g.must("ip -4 route show default");
        assert_eq!(routes.lines().count(), 1, "one default route, via the first NIC:\n{routes}");
        assert!(!routes.contains("10.77."), "{routes}");
        // networkd-wait-online did not wait for the private NIC (the box's `en*` DHCP file would make it 2 min).
        let w = g.must(
            "systemctl show systemd-networkd-wait-online -p ExecMainStartTimestampMonotonic \
             -p ExecMainExitTimestampMonotonic -p Result",
        );
        let field = |k: &str| -> u64 {
            w.lines().find_map(|l| l.strip_prefix(&format!("{k}="))).and_then(|v| v.parse().ok()).unwrap_or(0)
        };
        let waited =
            field("ExecMainExitTimestampMonotonic").saturating_sub(field("ExecMainStartTimestampMonotonic"));
        assert!(w.contains("Result=success"), "{w}");
        assert!(waited < 60_000_000, "wait-online took {} s:\n{w}", waited / 1_000_000);
        eprintln!("{}: wait-online {:.1} s", g.vm_name, waited as f64 / 1e6);
    }
    let resolved = a.must("getent hosts netb");
    assert!(resolved.starts_with("10.77.0.12"), "{resolved}");

    // Latency: TCP request/response round trips by name (no ping in a minbase box).
    b.must(
        "setsid nohup python3 -c 'import socket\ns=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
         s.bind((\"0.0.0.0\",7007));s.listen(1)\nc,_=s.accept();c.setsockopt(socket.IPPROTO_TCP,socket.TCP_NODELAY,1)\n\
         while True:\n d=c.recv(64)\n if not d: break\n c.sendall(d)' >/tmp/echo.log 2>&1 </dev/null &",
    );
    let rtt = support::wait_until(std::time::Duration::from_secs(120), "the echo server", || {
        let (ok, out) = a.ssh(
            "python3 -c 'import socket,time\nc=socket.create_connection((\"netb\",7007),5)\n\
             c.setsockopt(socket.IPPROTO_TCP,socket.TCP_NODELAY,1)\nr=[]\nfor i in range(200):\n t=time.perf_counter();\
             c.sendall(b\"x\");c.recv(64);r.append((time.perf_counter()-t)*1000)\nr.sort()\n\
             print(\"rtt_ms min %.2f median %.2f p90 %.2f max %.2f\"%(r[0],r[100],r[180],r[-1]))'",
        );
        (ok && out.contains("rtt_ms")).then_some(out)
    });
    eprintln!("private network, TCP round trip neta->netb (200 x 1 byte): {}", rtt.trim());

    // HTTP by name, and throughput: 128 MiB over HTTP (python3 http.server).
    b.must(
        // Only the server is in the background (a backgrounded `a && b` list would keep the SSH channel open).
        "head -c 128M /dev/zero >/tmp/blob; echo hello-from-netb >/tmp/hello; cd /tmp; setsid nohup \
         python3 -m http.server 8080 --bind 10.77.0.12 >/tmp/http.log 2>&1 </dev/null &",
    );
    support::wait_until(std::time::Duration::from_secs(120), "HTTP from neta to netb", || {
        let (ok, out) = a.ssh("curl -sf --max-time 10 http://netb:8080/hello");
        (ok && out.contains("hello-from-netb")).then_some(())
    });
    let (lo0, eth0) = (host_counter("lo", "tx_packets"), host_counter("eth0", "tx_packets"));
    let got = a.must(
        "curl -sf -o /dev/null -w '%{http_code} %{size_download} %{time_total} %{speed_download}' \
         http://netb:8080/blob",
    );
    let (lo1, eth1) = (host_counter("lo", "tx_packets"), host_counter("eth0", "tx_packets"));
    let f: Vec<&str> = got.split_whitespace().collect();
    assert_eq!(f.first(), Some(&"200"), "{got}");
    assert_eq!(f.get(1), Some(&"134217728"), "{got}");
    let secs: f64 = f[2].parse().unwrap();
    let mbs = 134217728.0 / secs / 1e6;
    eprintln!("private network, HTTP 128 MiB netb->neta: {secs:.1} s = {mbs:.1} MB/s");
    // The frames went over the host's loopback, not out of its real interface (~90 000 frames of 1.5 KB).
    let (lo_d, eth_d) = (lo1 - lo0, eth1.saturating_sub(eth0));
    eprintln!("host packets during the transfer: lo +{lo_d}, eth0 +{eth_d}");

    // Raw TCP throughput: 64 MiB from bash's /dev/tcp on netb to a Python reader on neta.
    a.must(
        "rm -f /tmp/tcp.out; setsid nohup python3 -c 'import socket,time\ns=socket.socket()\n\
         s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.bind((\"0.0.0.0\",7008));s.listen(1)\n\
         c,_=s.accept();n=0;t=time.perf_counter()\nwhile True:\n d=c.recv(262144)\n if not d: break\n n+=len(d)\n\
         open(\"/tmp/tcp.out\",\"w\").write(\"%d %.3f\"%(n,time.perf_counter()-t))' >/dev/null 2>&1 </dev/null &",
    );
    support::wait_until(std::time::Duration::from_secs(300), "the TCP stream", || {
        b.ssh("head -c 64M /dev/zero >/dev/tcp/neta/7008").0.then_some(())
    });
    let out = support::wait_until(std::time::Duration::from_secs(300), "the TCP reader's figures", || {
        let (ok, out) = a.ssh("cat /tmp/tcp.out");
        (ok && out.split_whitespace().count() == 2).then_some(out)
    });
    let f: Vec<f64> = out.split_whitespace().map(|x| x.parse().unwrap()).collect();
    assert_eq!(f[0] as u64, 64 << 20, "{out}");
    eprintln!("private network, raw TCP 64 MiB netb->neta: {:.1} s = {:.1} MB/s", f[1], f[0] / f[1] / 1e6);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    eprintln!(
        "host: {} cores, load average {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    assert!(lo_d > 60_000, "the transfer did not go over lo (+{lo_d} packets)");
    assert!(
        eth_d * 4 < lo_d,
        "eth0 sent {eth_d} packets during the transfer (lo {lo_d}): frames leave the host"
    );

    drop(guests);
    let left = std::process::Command::new("virsh")
        .args(["-c", "qemu:///session", "list", "--all", "--name"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&left.stdout).contains(&format!("-{}", std::process::id())),
        "domains left"
    );
    assert!(igmp_devices(net.mcast_group).is_empty(), "the group is still joined after destroy");
}

/// `virsh domstate --reason` output: a suspended (managed-saved) domain is `saved`, not merely stopped.
#[test]
fn domstate_with_its_reason_tells_a_suspended_domain_from_a_stopped_one() {
    use provisioner::provider::libvirt::parse_domstate;
    use provisioner::provider::VmState;
    assert_eq!(parse_domstate("shut off (saved)\n\n"), VmState::Saved);
    assert_eq!(parse_domstate("shut off (destroyed)\n"), VmState::Stopped);
    assert_eq!(parse_domstate("shut off (shutdown)\n"), VmState::Stopped);
    assert_eq!(parse_domstate("running (booted)\n"), VmState::Running);
    assert_eq!(parse_domstate("running (restored)\n"), VmState::Running);
    assert_eq!(parse_domstate("paused (user)\n"), VmState::Paused);
    assert_eq!(parse_domstate("shut off\n"), VmState::Stopped);
    assert_eq!(parse_domstate("blocked (unknown)\n"), VmState::Other("blocked (unknown)".into()));
}
