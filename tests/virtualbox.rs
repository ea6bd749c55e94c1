//! Tests: the VirtualBox provider against the VBoxManage test double (`tests/fixtures/vbox/VBoxManage`), which
//! checks every call against the manual's grammar and keeps VM state like the real tool. Command sequences are
//! compared with golden files (`tests/fixtures/vbox/golden/`; regenerate with `VBOX_GOLDEN_UPDATE=1`).
//! A real VirtualBox is only used by the opt-in `e2e_real_virtualbox` (`PROVISIONER_TEST_VIRTUALBOX=1`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use provisioner::config::{Config, Firmware, Forward, Protocol};
use provisioner::machine::state::MachineState;
use provisioner::machine::StateDir;
use provisioner::provider::virtualbox::{self, VirtualBox};
use provisioner::provider::{BoxImage, MachineSpec, Provider, VmState};

use crate::support;

const BOX_ID: &str = "0f1e2d3c4b5a6978";
const MASTER: &str = "provisioner-master-0f1e2d3c4b5a6978";
const WEB: &str = "provisioner-web-1a2b3c4d";
const DB: &str = "provisioner-db-5e6f7a8b";

fn fixtures() -> PathBuf {
    support::repo().join("tests/fixtures/vbox")
}

/// A temp "host": the double reachable as `<tmp>/Program Files/VirtualBox/VBoxManage` (a path with a space), its
/// state beside it, and a box cache holding the fixture OVF.
struct Bench {
    dir: tempfile::TempDir,
    vbox: VirtualBox,
    base: BoxImage,
}

impl Bench {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("Program Files/VirtualBox");
        let exe = support::vboxmanage_double(&bin);
        let cache = dir.path().join("cache/boxes").join(BOX_ID);
        std::fs::create_dir_all(&cache).unwrap();
        std::fs::copy(fixtures().join("box.ovf"), cache.join("box.ovf")).unwrap();
        std::fs::write(cache.join("box-disk001.vmdk"), b"vmdk").unwrap();
        let base = BoxImage {
            id: BOX_ID.into(),
            disk: cache.join("box.ovf"),
            format: "ovf".into(),
            kernel: None,
            initrd: None,
            cmdline: None,
            firmware: Firmware::Bios,
            extra_disks: Vec::new(),
        };
        Bench { vbox: VirtualBox::at(exe), base, dir }
    }

    fn bin_dir(&self) -> PathBuf {
        self.dir.path().join("Program Files/VirtualBox")
    }

    fn double_dir(&self) -> PathBuf {
        self.bin_dir().join("vboxdouble")
    }

    /// Double settings (`fail`, `die_after`, `version`, `acpi`), as the env vars would set them.
    fn settings(&self, json: serde_json::Value) {
        std::fs::create_dir_all(self.double_dir()).unwrap();
        std::fs::write(self.double_dir().join("double.json"), json.to_string()).unwrap();
    }

    /// A machine spec with its own state dir `<tmp>/<machine> project/.provisioner` and a seed ISO in it; SSH on
    /// `ssh_port`, Grafana on `ssh_port + 1`. (The double listens on nothing: fixed numbers keep goldens stable.)
    fn spec(&self, machine: &str, vm_name: &str, ssh_port: u16) -> MachineSpec {
        let state = StateDir::at(self.dir.path().join(format!("{machine} project/.provisioner")));
        state.ensure().unwrap();
        std::fs::write(state.seed_iso(), b"not really an ISO").unwrap();
        let fwd = |guest, host, name: &str| Forward {
            guest,
            host,
            host_ip: "127.0.0.1".into(),
            protocol: Protocol::Tcp,
            name: Some(name.into()),
        };
        MachineSpec {
            vm_name: vm_name.into(),
            hostname: machine.into(),
            cpus: 2,
            memory_mb: 2048,
            disk_gb: 20,
            base: self.base.clone(),
            seed_iso: state.seed_iso(),
            forwards: vec![fwd(22, ssh_port, "ssh"), fwd(3000, ssh_port + 1, "grafana dashboards")],
            state,
            kvm: false,
            private_net: None,
        }
    }

    /// Calls since the last `take_calls`, with the temp dir shown as `$TMP`.
    fn take_calls(&self) -> Vec<String> {
        let log = self.double_dir().join("calls.log");
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if log.exists() {
            std::fs::write(&log, "").unwrap();
        }
        let tmp = support::double_path(self.dir.path());
        // Under Wine an argument the double does not map (the VM description) keeps the Windows spelling of the
        // temp dir: replace that too and turn its separators into `/`, so the same golden files match.
        let win = self.dir.path().to_string_lossy().trim_start_matches(r"\\?\").to_string();
        text.lines()
            .map(|l| {
                let l = l.replace(&tmp, "$TMP");
                let l = if cfg!(windows) { l.replace(&win, "$TMP").replace('\\', "/") } else { l };
                uuids_as_names(&l, &self.vms())
            })
            .collect()
    }

    /// The double's registry.
    fn vms(&self) -> Vec<serde_json::Value> {
        let st: serde_json::Value =
            serde_json::from_slice(&std::fs::read(self.double_dir().join("state.json")).unwrap()).unwrap();
        st["vms"].as_array().unwrap().clone()
    }

    fn vm(&self, name: &str) -> Option<serde_json::Value> {
        self.vms().into_iter().find(|v| v["name"] == name)
    }
}

/// A VM's UUID in a call shown as `{NAME}` (the UUIDs are random; the names are stable), other UUIDs as `{uuid}`.
fn uuids_as_names(line: &str, vms: &[serde_json::Value]) -> String {
    line.split(' ')
        .map(|w| {
            let is_uuid = w.len() == 36
                && w.char_indices().all(|(i, c)| {
                    if [8, 13, 18, 23].contains(&i) {
                        c == '-'
                    } else {
                        c.is_ascii_hexdigit()
                    }
                });
            match vms.iter().find(|v| v["uuid"] == w) {
                Some(v) if is_uuid => format!("{{{}}}", v["name"].as_str().unwrap_or("?")),
                None if is_uuid => "{uuid}".to_string(),
                _ => w.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Compare a call sequence with `tests/fixtures/vbox/golden/<name>.txt` (or write it with VBOX_GOLDEN_UPDATE=1).
#[track_caller]
fn golden(name: &str, calls: &[String]) {
    let path = fixtures().join("golden").join(format!("{name}.txt"));
    let got = calls.join("\n") + "\n";
    if std::env::var_os("VBOX_GOLDEN_UPDATE").is_some() {
        std::fs::write(&path, &got).unwrap();
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (VBOX_GOLDEN_UPDATE=1 writes it)", path.display()));
    assert_eq!(got, want, "VBoxManage calls differ from {}", path.display());
}

/// `Provider::create` as `up` calls it: with the machine's recorded state (state.json, where VirtualBox keeps the
/// VM's UUID between runs).
fn create(p: &impl Provider, spec: &MachineSpec) -> anyhow::Result<()> {
    let mut st = MachineState::load(&spec.state).unwrap().unwrap_or_else(|| MachineState {
        provider: "virtualbox".into(),
        vm_name: spec.vm_name.clone(),
        ..Default::default()
    });
    p.create(spec, &mut st)
}

fn err_text(e: anyhow::Error) -> String {
    format!("{e:#}")
}

#[test]
fn first_machine_imports_the_box_once_snapshots_and_links_a_clone() {
    let b = Bench::new();
    let spec = b.spec("web", WEB, 2222);
    create(&b.vbox, &spec).unwrap();
    b.vbox.start(WEB).unwrap();
    golden("first_create_start", &b.take_calls());

    let master = b.vm(MASTER).expect("master registered");
    assert_eq!(master["snapshots"][0]["name"], "base");
    let web = b.vm(WEB).expect("clone registered");
    assert_eq!(web["parent"], master["uuid"], "a linked clone of the master");
    assert_eq!(web["state"], "running");
    assert_eq!(b.vbox.state(WEB).unwrap(), VmState::Running);
    // SSH is forwarded from 127.0.0.1:2222 (the state.json endpoint `up` records from the spec's first forward).
    assert_eq!(web["natpf"]["1"][0], "ssh,tcp,127.0.0.1,2222,,22");
    let serial = std::fs::read_to_string(spec.state.serial_log()).unwrap();
    assert!(serial.contains(WEB), "serial console goes to the state dir: {serial:?}");

    // create again while running: nothing is changed, nothing imported or cloned.
    b.take_calls();
    create(&b.vbox, &spec).unwrap();
    let again = b.take_calls();
    assert_eq!(
        again,
        [format!("showvminfo {MASTER} --machinereadable"), format!("showvminfo {{{WEB}}} --machinereadable")],
        "found by the UUID recorded in state.json"
    );
}

#[test]
fn second_machine_is_only_a_clone() {
    let b = Bench::new();
    create(&b.vbox, &b.spec("web", WEB, 2222)).unwrap();
    b.take_calls();
    let db = b.spec("db", DB, 2224);
    create(&b.vbox, &db).unwrap();
    b.vbox.start(DB).unwrap();
    let calls = b.take_calls();
    golden("second_create_start", &calls);
    assert!(!calls.iter().any(|c| c.starts_with("import") || c.starts_with("snapshot")), "{calls:#?}");
    assert_eq!(b.vms().len(), 3, "master + two clones");
}

/// `global-status` on VirtualBox: the provider lists the clones its machines made, with their states and the
/// state dirs their markers name, and not the box's master (no marker).
#[test]
fn machines_lists_every_marked_clone_and_not_the_master() {
    let b = Bench::new();
    let (web, db) = (b.spec("web", WEB, 2222), b.spec("db", DB, 2224));
    create(&b.vbox, &web).unwrap();
    create(&b.vbox, &db).unwrap();
    b.vbox.start(WEB).unwrap();
    let mut found = b.vbox.machines().unwrap();
    found.sort_by(|a, b| a.name.cmp(&b.name));
    let got: Vec<(&str, VmState, &Path)> =
        found.iter().map(|f| (f.name.as_str(), f.state.clone(), f.state_dir.as_path())).collect();
    assert_eq!(
        got,
        [(DB, VmState::Stopped, db.state.root.as_path()), (WEB, VmState::Running, web.state.root.as_path())],
        "{:?}",
        b.vms()
    );
}

#[test]
fn stopped_machine_gets_config_changes_on_create() {
    let b = Bench::new();
    let mut spec = b.spec("web", WEB, 2222);
    create(&b.vbox, &spec).unwrap();
    b.take_calls();
    spec.cpus = 4;
    spec.forwards[1].host = 3300;
    create(&b.vbox, &spec).unwrap();
    golden("recreate_stopped", &b.take_calls());
    let web = b.vm(WEB).unwrap();
    assert_eq!(web["cpus"], 4);
    assert_eq!(web["natpf"]["1"][1], "grafana_dashboards-tcp-3300,tcp,127.0.0.1,3300,,3000");
    assert_eq!(web["natpf"]["1"].as_array().unwrap().len(), 2, "old rules were deleted");
}

#[test]
fn halt_presses_the_power_button_and_waits_then_forces() {
    let b = Bench::new();
    let spec = b.spec("web", WEB, 2222);
    create(&b.vbox, &spec).unwrap();
    b.vbox.start(WEB).unwrap();
    b.take_calls();
    b.vbox.halt(WEB, Duration::from_secs(30), false).unwrap();
    golden("halt", &b.take_calls());
    assert_eq!(b.vbox.state(WEB).unwrap(), VmState::Stopped);
    b.vbox.halt(WEB, Duration::from_secs(30), false).unwrap(); // already off: no-op

    // A guest that ignores ACPI is powered off at the deadline.
    b.settings(serde_json::json!({"acpi": "ignore"}));
    b.vbox.start(WEB).unwrap();
    b.take_calls();
    b.vbox.halt(WEB, Duration::from_millis(300), false).unwrap();
    let calls = b.take_calls();
    assert_eq!(
        calls.first().map(String::as_str),
        Some(format!("showvminfo {WEB} --machinereadable").as_str())
    );
    assert_eq!(calls[1], format!("controlvm {WEB} acpipowerbutton"));
    assert_eq!(calls.last().unwrap(), &format!("controlvm {WEB} poweroff"));
    assert_eq!(b.vbox.state(WEB).unwrap(), VmState::Stopped);

    // --force skips ACPI.
    b.vbox.start(WEB).unwrap();
    b.take_calls();
    b.vbox.halt(WEB, Duration::from_secs(30), true).unwrap();
    assert_eq!(
        b.take_calls(),
        [format!("showvminfo {WEB} --machinereadable"), format!("controlvm {WEB} poweroff")]
    );
}

#[test]
fn destroy_removes_the_clone_and_its_disks_and_keeps_the_master() {
    let b = Bench::new();
    let spec = b.spec("web", WEB, 2222);
    create(&b.vbox, &spec).unwrap();
    b.vbox.start(WEB).unwrap();
    let clone_dir = b.double_dir().join("VirtualBox VMs").join(WEB);
    assert!(clone_dir.join("Snapshots").is_dir());
    // The session of a just-powered-off VM is briefly locked on real hosts: the first unregistervm fails.
    b.settings(serde_json::json!({"fail": "unregistervm:locked:1"}));
    b.take_calls();
    b.vbox.destroy(WEB, &spec.state).unwrap();
    golden("destroy", &b.take_calls());
    assert!(b.vm(WEB).is_none());
    assert!(!clone_dir.exists(), "clone folder and differencing disk removed");
    assert!(b.vm(MASTER).is_some(), "the master stays for the next machine");
    assert_eq!(b.vbox.state(WEB).unwrap(), VmState::NotCreated);
    b.vbox.destroy(WEB, &spec.state).unwrap();
    assert_eq!(b.take_calls(), vec![format!("showvminfo {WEB} --machinereadable"); 2]);
}

#[test]
fn destroy_on_virtualbox_6_falls_back_to_delete() {
    let b = Bench::new();
    b.settings(serde_json::json!({"version": "6.1.50r161033"}));
    let spec = b.spec("web", WEB, 2222);
    b.vbox.preflight().unwrap();
    create(&b.vbox, &spec).unwrap();
    b.take_calls();
    b.vbox.destroy(WEB, &spec.state).unwrap();
    let calls = b.take_calls();
    // The flag comes from the version (asked once), not from a failed first try.
    assert_eq!(calls[1..], [format!("unregistervm {WEB} --delete")]);
    assert!(b.vm(WEB).is_none());
}

#[test]
fn preflight_checks_the_version() {
    let b = Bench::new();
    b.vbox.preflight().unwrap();
    // The version is asked once per run: a new provider per host setting.
    b.settings(serde_json::json!({"version": "5.2.44r139111"}));
    let e = err_text(VirtualBox::at(&b.vbox.vboxmanage).preflight().unwrap_err());
    assert!(e.contains("5.2.44r139111") && e.contains("hint: install VirtualBox 6.1 or newer"), "{e}");
    b.settings(serde_json::json!({"driver": "missing"}));
    let e = err_text(VirtualBox::at(&b.vbox.vboxmanage).preflight().unwrap_err());
    assert!(e.contains("kernel driver is not usable") && e.contains("sudo /sbin/vboxconfig"), "{e}");
}

#[test]
fn import_killed_midway_says_which_folder_to_delete() {
    let b = Bench::new();
    let spec = b.spec("web", WEB, 2222);
    b.settings(serde_json::json!({"die_during": "import"}));
    assert!(create(&b.vbox, &spec).is_err());
    b.settings(serde_json::json!({}));
    let e = err_text(create(&b.vbox, &spec).unwrap_err());
    assert!(e.contains("already exists") && e.contains("delete the folder named in the message"), "{e}");
    assert!(e.contains("import the box"), "{e}");
}

/// VirtualBox refusing a box's files (exit 1, a text we have no advice for) removes the box's cache entry, and the
/// error says so: the next `up` unpacks it again instead of failing on the same files. A killed import (exit 137,
/// above) and a leftover VM folder keep it.
#[test]
fn failed_import_removes_the_box_from_the_cache() {
    let b = Bench::new();
    let spec = b.spec("web", WEB, 2222);
    let entry = b.base.disk.parent().unwrap().to_path_buf();
    b.settings(serde_json::json!({"fail": "import:generic"}));
    let e = err_text(create(&b.vbox, &spec).unwrap_err());
    assert!(e.contains("Something the double was told to fail"), "{e}");
    assert!(
        e.contains(&format!(
            "(the box was removed from the box cache, {}: the next `up` unpacks or downloads it again; if VirtualBox \
             refuses it again, the box itself is damaged: get it again or use another box)",
            entry.display()
        )),
        "{e}"
    );
    assert!(!entry.exists(), "the box the import refused stays cached");
    let left: Vec<_> =
        std::fs::read_dir(entry.parent().unwrap()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(left.is_empty(), "{left:?}");
    assert!(b.vm(MASTER).is_none());
}

#[test]
fn known_failures_carry_advice() {
    let b = Bench::new();
    create(&b.vbox, &b.spec("web", WEB, 2222)).unwrap();
    for (kind, want) in [
        ("vtx", "bcdedit /set hypervisorlaunchtype off"),
        ("amdv", "Hyper-V"),
        ("hyperv", "WSL2"),
        ("vtx-bios", "BIOS/UEFI setup"),
        ("inaccessible", "unregistervm <uuid>"),
        ("networks", "/etc/vbox/networks.conf"),
    ] {
        b.settings(serde_json::json!({"fail": format!("startvm:{kind}")}));
        let e = err_text(b.vbox.start(WEB).unwrap_err());
        assert!(e.contains("startvm provisioner-web-1a2b3c4d --type headless"), "{kind}: {e}");
        assert!(e.contains("VBoxManage: error:") && e.contains(want), "{kind}: {e}");
        assert_eq!(b.vbox.state(WEB).unwrap(), VmState::Stopped, "{kind}");
    }
    // Unknown failures still say what ran and where to look.
    b.settings(serde_json::json!({"fail": "startvm:generic"}));
    let e = err_text(b.vbox.start(WEB).unwrap_err());
    assert!(e.contains("Something the double was told to fail") && e.contains("hint: "), "{e}");
}

#[test]
fn interrupted_import_is_completed_not_repeated() {
    let b = Bench::new();
    let spec = b.spec("web", WEB, 2222);
    b.settings(serde_json::json!({"die_after": "import"}));
    let e = err_text(create(&b.vbox, &spec).unwrap_err());
    assert!(e.contains("exit code 137"), "{e}");
    assert!(b.vm(MASTER).is_some() && b.vm(MASTER).unwrap()["snapshots"].as_array().unwrap().is_empty());
    create(&b.vbox, &spec).unwrap();
    let calls = b.take_calls();
    assert_eq!(calls.iter().filter(|c| c.starts_with("import ")).count(), 1, "{calls:#?}");
    assert_eq!(calls.iter().filter(|c| c.starts_with("snapshot ")).count(), 1, "{calls:#?}");
    assert_eq!(b.vms().len(), 2, "master + one clone");
}

#[test]
fn half_made_clone_is_recreated_not_leaked() {
    let b = Bench::new();
    let spec = b.spec("web", WEB, 2222);
    b.settings(serde_json::json!({"die_after": "clonevm"}));
    assert!(create(&b.vbox, &spec).is_err());
    let half = b.vm(WEB).expect("clone registered before the kill");
    assert_eq!(half["description"], "", "no completion marker");
    b.take_calls();
    create(&b.vbox, &spec).unwrap();
    golden("resume_half_made_clone", &b.take_calls());
    let names: Vec<String> = b.vms().iter().map(|v| v["name"].as_str().unwrap().to_string()).collect();
    assert_eq!(names, [MASTER, WEB]);
    // The UUID recorded before the first clonevm is reused: the VM keeps one identity across the retry.
    assert_eq!(b.vm(WEB).unwrap()["uuid"], half["uuid"]);
    let snapshots = b.double_dir().join("VirtualBox VMs").join(WEB).join("Snapshots");
    assert_eq!(std::fs::read_dir(snapshots).unwrap().count(), 1, "the half-made clone's disk was deleted");
    b.vbox.start(WEB).unwrap();
}

#[test]
fn parallel_creates_import_the_box_once() {
    let b = Bench::new();
    let (web, db) = (b.spec("web", WEB, 2222), b.spec("db", DB, 2224));
    std::thread::scope(|s| {
        let one = s.spawn(|| create(&b.vbox, &web));
        let two = s.spawn(|| create(&b.vbox, &db));
        one.join().unwrap().unwrap();
        two.join().unwrap().unwrap();
    });
    let calls = b.take_calls();
    assert_eq!(calls.iter().filter(|c| c.starts_with("import ")).count(), 1, "{calls:#?}");
    assert_eq!(b.vms().len(), 3);
}

#[test]
fn non_ovf_box_is_refused_with_advice() {
    let b = Bench::new();
    let mut spec = b.spec("web", WEB, 2222);
    spec.base.format = "qcow2".into();
    let e = err_text(create(&b.vbox, &spec).unwrap_err());
    assert!(e.contains("needs an OVF box") && e.contains("provider = \"libvirt\""), "{e}");
    assert!(b.take_calls().is_empty(), "nothing run");
}

#[test]
fn the_double_rejects_what_the_manual_does_not_allow() {
    let b = Bench::new();
    create(&b.vbox, &b.spec("web", WEB, 2222)).unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(&b.vbox.vboxmanage).args(args).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    for (args, code, text) in [
        (&["startvm", WEB, "--type", "fullscreen"][..], 1, "Invalid session type"),
        (&["modifyvm", WEB, "--natpf1", "ssh,tcp,127.0.0.1,2222,22"], 2, "Invalid NAT port-forwarding rule"),
        (
            &["modifyvm", WEB, "--natpf1", "ssh,tcp,127.0.0.1,2223,,22"],
            1,
            "A NAT rule of this name already exists",
        ),
        (&["modifyvm", WEB, "--uart1", "0x3F8"], 2, "--uart1"),
        (&["import", "x.ovf", "--vmname", "y"], 2, "requires preceding --vsys"),
        (&["clonevm", MASTER, "--options", "link", "--name", "z"], 1, "only be created from a snapshot"),
        (
            &["storageattach", WEB, "--storagectl", "SATA Controller", "--port", "5", "--device", "0"],
            1,
            "out of range",
        ),
        (&["showvminfo", "nope", "--machinereadable"], 1, "VBOX_E_OBJECT_NOT_FOUND"),
        (&["controlvm", WEB, "poweroff"], 1, "is not currently running"),
        (&["frobnicate"], 2, "Invalid command"),
    ] {
        let (got, stderr) = run(args);
        assert_eq!(got, Some(code), "{args:?}: {stderr}");
        assert!(stderr.contains(text), "{args:?}: {stderr}");
    }
}

#[test]
fn configured_vboxmanage_path_with_spaces_is_used() {
    let b = Bench::new();
    let cfg = config(b.dir.path(), Some(&b.vbox.vboxmanage));
    assert_eq!(virtualbox::find_vboxmanage(&cfg).unwrap(), b.vbox.vboxmanage);
    let vb = VirtualBox::new(&cfg).unwrap();
    vb.preflight().unwrap();

    let missing = b.dir.path().join("no such dir/VBoxManage");
    let e = err_text(VirtualBox::new(&config(b.dir.path(), Some(&missing))).err().unwrap());
    assert!(e.contains("no such dir/VBoxManage") && e.contains("hint: fix `[virtualbox] vboxmanage`"), "{e}");
}

#[test]
fn find_vboxmanage_on_windows_uses_the_msi_install_path() {
    let env = |k: &str| match k {
        "PATH" => Some(r"C:\Windows\system32;C:\Windows".into()),
        "VBOX_MSI_INSTALL_PATH" => Some(r"C:\Program Files\Oracle\VirtualBox\".into()),
        _ => None,
    };
    let want = Path::new(virtualbox::WINDOWS_DEFAULT);
    let got = virtualbox::locate(None, true, env, |p| p == want);
    assert_eq!(got.as_deref(), Some(want));
    assert_eq!(virtualbox::locate(None, true, env, |_| false), None);
}

/// `auto` picks VirtualBox when only VBoxManage is on PATH. PATH is process-wide, so the check runs in a child
/// copy of this test binary whose PATH holds only the double.
#[test]
fn auto_picks_virtualbox_when_only_vboxmanage_is_on_path() {
    if let Some(dir) = std::env::var_os("VBOX_AUTO_CHILD") {
        let cfg = config(Path::new(&dir), None);
        let p = provisioner::provider::select(&cfg).unwrap();
        assert_eq!(p.name(), "virtualbox");
        p.preflight().unwrap();
        return;
    }
    let b = Bench::new();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["virtualbox::auto_picks_virtualbox_when_only_vboxmanage_is_on_path", "--exact", "--nocapture"])
        .env("PATH", b.bin_dir())
        .env("VBOX_AUTO_CHILD", b.dir.path())
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("1 passed"), "child run failed:\n{text}");
    assert!(!b.take_calls().is_empty(), "the child reached the double through PATH");
}

/// The whole binary on the double: `up` gets as far as the SSH wait (the double boots no guest) and shows the
/// serial console; `status`, `halt` and `destroy` then drive the same VM.
#[test]
fn up_status_halt_destroy_through_the_binary() {
    let b = Bench::new();
    let proj = b.dir.path().join("my project");
    std::fs::create_dir_all(proj.join("box")).unwrap();
    // `up` validates the provision tree before it touches the hypervisor; an empty one is enough here.
    std::fs::create_dir_all(proj.join("provision")).unwrap();
    std::fs::copy(fixtures().join("box.ovf"), proj.join("box/box.ovf")).unwrap();
    std::fs::copy(fixtures().join("box-disk001.vmdk"), proj.join("box/box-disk001.vmdk")).unwrap();
    let port = support::free_port();
    let toml = format!(
        "[machine]\nname = \"vb\"\nprovider = \"virtualbox\"\ncpus = 1\nmemory_mb = 1024\n\n[box]\n\
         vagrant = \"box/box.ovf\"\n\n[ssh]\nhost_port = {port}\n\n[virtualbox]\nvboxmanage = {:?}\n",
        b.vbox.vboxmanage.to_str().unwrap()
    );
    std::fs::write(proj.join("box-config.toml"), toml).unwrap();
    let cache = b.dir.path().join("binary cache");
    let run = |args: &[&str]| {
        support::Test::new()
            .cwd(&proj)
            .env("PROVISIONER_CACHE_DIR", cache.to_str().unwrap())
            .args(args.iter().copied())
            .run()
    };
    run(&["up", "--boot-timeout", "2"])
        .failure()
        .stderr_contains("did not answer SSH")
        .stderr_contains("[vboxdouble] provisioner-vb-");
    let calls = b.take_calls();
    assert_eq!(calls.iter().filter(|c| c.starts_with("import ")).count(), 1, "{calls:#?}");
    let vm = b.vms().into_iter().find(|v| v["parent"].is_string()).expect("a linked clone");
    let name = vm["name"].as_str().unwrap().to_string();
    // After `clonevm --uuid`, the VM is addressed by the UUID recorded in state.json (shown as {NAME}).
    assert!(calls.contains(&format!("startvm {{{name}}} --type headless")), "{calls:#?}");
    let st: serde_json::Value =
        serde_json::from_slice(&std::fs::read(proj.join(".provisioner/state.json")).unwrap()).unwrap();
    assert_eq!(st["vm_id"], vm["uuid"], "the UUID is recorded in state.json");
    assert_eq!(vm["natpf"]["1"][0], format!("ssh,tcp,127.0.0.1,{port},,22"));

    run(&["status"]).success().stdout_contains("running").stdout_contains("virtualbox");
    // A broken edit must not lock the user out: status, halt and destroy go on from the recorded state (the
    // VBoxManage path still reads from the file), with the errors as a warning; `up` stays strict.
    let good = std::fs::read_to_string(proj.join("box-config.toml")).unwrap();
    std::fs::write(proj.join("box-config.toml"), good.replace("cpus = 1", "cpus = 1\nhaunted = true"))
        .unwrap();
    run(&["up"]).failure().stderr_contains("box-config.toml:5:1").stderr_contains("haunted");
    run(&["status"])
        .success()
        .stdout_contains("running")
        .stderr_contains("does not validate")
        .stderr_contains("box-config.toml:5:1");
    run(&["halt", "--timeout", "30"]).success();
    assert!(b.take_calls().contains(&format!("controlvm {{{name}}} acpipowerbutton")));
    assert_eq!(b.vm(&name).unwrap()["state"], "poweroff");
    // Even a file that no longer parses as TOML: the machine name comes from the recorded VM name.
    std::fs::write(proj.join("box-config.toml"), format!("{good}\n[[[")).unwrap();
    run(&["status"]).failure().stderr_contains("VBoxManage");
    std::fs::write(proj.join("box-config.toml"), good.replace("cpus = 1", "cpus = \"one\"")).unwrap();
    run(&["destroy", "-f"]).success().stderr_contains("does not validate");
    assert!(b.vm(&name).is_none(), "clone unregistered");
    assert_eq!(b.vms().len(), 1, "only the master is left");
}

/// A project for the binary: `<tmp>/<dir>/box-config.toml` on the double, with the fixture box, an empty
/// provision tree, SSH on a free port and `extra` forwards (guest ports) after it.
struct Project {
    dir: PathBuf,
    cache: PathBuf,
    port: u16,
}

impl Project {
    fn new(b: &Bench, dir: &str, extra: &[u16]) -> Project {
        let proj = b.dir.path().join(dir);
        std::fs::create_dir_all(proj.join("box")).unwrap();
        std::fs::create_dir_all(proj.join("provision")).unwrap();
        std::fs::copy(fixtures().join("box.ovf"), proj.join("box/box.ovf")).unwrap();
        std::fs::copy(fixtures().join("box-disk001.vmdk"), proj.join("box/box-disk001.vmdk")).unwrap();
        let port = support::free_port();
        let mut toml = format!(
            "[machine]\nname = \"vb\"\nprovider = \"virtualbox\"\ncpus = 1\nmemory_mb = 1024\n\n[box]\n\
             vagrant = \"box/box.ovf\"\n\n[ssh]\nhost_port = {port}\n\n[virtualbox]\nvboxmanage = {:?}\n",
            b.vbox.vboxmanage.to_str().unwrap()
        );
        for (i, guest) in extra.iter().enumerate() {
            toml += &format!(
                "\n[[forward]]\nname = \"svc{i}\"\nguest = {guest}\nhost = {}\n",
                support::free_port()
            );
        }
        std::fs::write(proj.join("box-config.toml"), toml).unwrap();
        Project { dir: proj, cache: b.dir.path().join("binary cache"), port }
    }

    /// Run the binary in `cwd` with `args` (which may carry `--config`).
    fn run(&self, cwd: &Path, args: &[&str]) -> support::Run {
        support::Test::new()
            .cwd(cwd)
            .env("PROVISIONER_CACHE_DIR", self.cache.to_str().unwrap())
            .args(args.iter().copied())
            .run()
    }

    fn here(&self, args: &[&str]) -> support::Run {
        self.run(&self.dir, args)
    }

    /// `up` gets as far as the SSH wait (the double boots no guest): everything before it worked.
    fn up_reaches_ssh(&self, cwd: &Path, extra: &[&str]) -> support::Run {
        let mut args = extra.to_vec();
        args.extend(["up", "--boot-timeout", "1"]);
        self.run(cwd, &args).failure().stderr_contains("did not answer SSH")
    }

    fn state(&self) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(self.dir.join(".provisioner/state.json")).unwrap()).unwrap()
    }
}

impl Bench {
    /// The clone (the one VM with a parent).
    fn clone_vm(&self) -> serde_json::Value {
        self.vms().into_iter().find(|v| v["parent"].is_string()).expect("a linked clone")
    }

    /// Put a VM of the double into a state no VBoxManage call of ours produces (a crash, a host sleep).
    fn force_state(&self, uuid: &str, state: &str) {
        let path = self.double_dir().join("state.json");
        let mut st: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        for vm in st["vms"].as_array_mut().unwrap() {
            if vm["uuid"] == uuid {
                vm["state"] = state.into();
            }
        }
        std::fs::write(&path, st.to_string()).unwrap();
    }

    fn raw(&self, args: &[&str]) {
        let out = std::process::Command::new(&self.vbox.vboxmanage).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// Issue 8.1: the same project reached as `../proj` from another directory, or through a symlinked directory,
/// is the same machine: a stopped, complete VM is started, never unregistered and re-cloned (that deleted its disk).
#[test]
#[cfg_attr(windows, ignore = "windows: making a symbolic link needs developer mode or elevation")]
fn another_spelling_of_the_project_path_keeps_the_vm() {
    let b = Bench::new();
    let p = Project::new(&b, "proj", &[]);
    p.up_reaches_ssh(&p.dir, &[]);
    let first = b.clone_vm();
    assert_eq!(p.state()["vm_id"], first["uuid"], "the UUID is recorded in state.json");
    p.here(&["halt", "--force"]).success();
    let other = b.dir.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink(&p.dir, b.dir.path().join("link")).unwrap();
    #[cfg(windows)]
    std::os::windows::fs::symlink_dir(&p.dir, b.dir.path().join("link")).unwrap();
    let via_link = b.dir.path().join("link/box-config.toml");
    for (cwd, config) in [(&other, "../proj/box-config.toml"), (&other, via_link.to_str().unwrap())] {
        b.take_calls();
        p.up_reaches_ssh(cwd, &["--config", config]);
        let calls = b.take_calls();
        assert!(
            !calls.iter().any(|c| c.starts_with("unregistervm") || c.starts_with("clonevm")),
            "--config {config}: the VM was recreated: {calls:#?}"
        );
        assert!(calls.iter().any(|c| c.starts_with("startvm")), "{calls:#?}");
        let now = b.clone_vm();
        assert_eq!(now["uuid"], first["uuid"], "same VM");
        assert_eq!(now["description"], first["description"], "marker unchanged");
        p.run(cwd, &["--config", config, "halt", "--force"]).success();
    }
    // The marker names the canonical state dir; `status` and `destroy` through the symlink work too.
    let canonical = std::fs::canonicalize(&p.dir).unwrap().join(".provisioner");
    assert_eq!(first["description"], format!("provisioner machine; state dir: {}", canonical.display()));
    p.run(&other, &["--config", via_link.to_str().unwrap(), "status"]).success().stdout_contains("stopped");
    p.run(&other, &["--config", via_link.to_str().unwrap(), "destroy", "-f"]).success();
    assert!(b.vms().iter().all(|v| v["uuid"] != first["uuid"]), "destroyed");
}

/// Issue 8.2: every VirtualBox state through `status`, `up` and `halt`, as Vagrant's driver treats them.
#[test]
fn saved_aborted_saved_and_paused_vms_resume_and_halt_cleanly() {
    let b = Bench::new();
    let p = Project::new(&b, "proj", &[]);
    p.up_reaches_ssh(&p.dir, &[]);
    let uuid = b.clone_vm()["uuid"].as_str().unwrap().to_string();
    let name = b.clone_vm()["name"].as_str().unwrap().to_string();
    for (state, shown, resume) in [
        ("saved", "saved", "startvm"),
        ("aborted-saved", "aborted-saved", "startvm"),
        ("paused", "paused", "controlvm"),
    ] {
        b.force_state(&uuid, state);
        p.here(&["status"]).success().stdout_contains(&format!("vb: {shown} (virtualbox)"));
        p.here(&["status", "--json"])
            .success()
            .stdout_contains(&format!("\"state\":\"{}\"", shown.replace('-', "_")));
        b.take_calls();
        // up resumes it as it is: no modifyvm/storage change (a saved VM is not mutable), no re-clone.
        p.up_reaches_ssh(&p.dir, &[]);
        let calls = b.take_calls();
        let changing: Vec<_> = calls
            .iter()
            .filter(|c| {
                ["modifyvm", "storage", "clonevm", "unregistervm", "discardstate"]
                    .iter()
                    .any(|k| c.starts_with(k))
            })
            .collect();
        assert!(changing.is_empty(), "{state}: {changing:#?}");
        let want = if resume == "startvm" {
            format!("startvm {{{name}}} --type headless")
        } else {
            format!("controlvm {{{name}}} resume")
        };
        assert!(calls.contains(&want), "{state}: {calls:#?}");
        assert_eq!(b.clone_vm()["state"], "running", "{state}");
    }
    // halt on saved discards the saved state (Vagrant's DiscardState): afterwards it is off, not saved.
    for (state, after) in [("saved", "poweroff"), ("aborted-saved", "aborted")] {
        b.force_state(&uuid, state);
        b.take_calls();
        p.here(&["halt"]).success();
        assert_eq!(b.take_calls().last().unwrap(), &format!("discardstate {{{name}}}"), "{state}");
        assert_eq!(b.clone_vm()["state"], after, "{state}");
        p.here(&["status"])
            .success()
            .stdout_contains(&format!("vb: {}", if after == "poweroff" { "stopped" } else { "aborted" }));
    }
    // An aborted VM is off: up reconfigures and boots it.
    b.take_calls();
    p.up_reaches_ssh(&p.dir, &[]);
    assert!(b.take_calls().iter().any(|c| c.starts_with("modifyvm")), "aborted is mutable");
    // halt on paused: resume, then the power button.
    b.force_state(&uuid, "paused");
    b.take_calls();
    p.here(&["halt", "--timeout", "30"]).success();
    let calls = b.take_calls();
    let i = calls.iter().position(|c| c == &format!("controlvm {{{name}}} resume")).expect("resumed");
    assert_eq!(calls[i + 1], format!("controlvm {{{name}}} acpipowerbutton"), "{calls:#?}");
    assert_eq!(b.clone_vm()["state"], "poweroff");
}

/// Issue 8.1/8.2: a VM whose settings file is gone is inaccessible; a lookup by name would not find it at all
/// (and `up` would try to clone over it). By UUID it is found and reported with the fix, and destroy clears it.
#[test]
fn inaccessible_vm_gets_a_clear_error_and_destroy_clears_it() {
    let b = Bench::new();
    let p = Project::new(&b, "proj", &[]);
    p.up_reaches_ssh(&p.dir, &[]);
    p.here(&["halt", "--force"]).success();
    let vm = b.clone_vm();
    std::fs::remove_file(vm["cfg"].as_str().unwrap()).unwrap();
    p.here(&["status"]).success().stdout_contains("vb: inaccessible (virtualbox)");
    b.take_calls();
    p.here(&["up"])
        .failure()
        .stderr_contains("inaccessible")
        .stderr_contains("hint:")
        .stderr_contains("provisioner destroy -f");
    let calls = b.take_calls();
    assert!(!calls.iter().any(|c| c.starts_with("clonevm") || c.starts_with("modifyvm")), "{calls:#?}");
    p.here(&["halt"]).failure().stderr_contains("inaccessible");
    p.here(&["destroy", "-f"]).success();
    assert!(
        b.take_calls().contains(&"unregistervm {uuid}".to_string())
            || b.vms().iter().all(|v| v["uuid"] != vm["uuid"])
    );
    assert!(b.vms().iter().all(|v| v["uuid"] != vm["uuid"]), "the dead entry is unregistered");
}

/// Issue 8.3: several NAT rules on every release the double models (7.0.0 shows them only in the settings file),
/// and rules of another NAT adapter (`Forwarding(N)` restarts per NIC) are not taken for ours: `up` finds the
/// ssh rule, and a second `up` on the stopped VM re-applies the rules without "already exists".
#[test]
fn several_nat_rules_on_every_release_and_per_adapter() {
    for version in ["6.1.50r161033", "7.0.0r153978", "7.0.20r163906", "7.1.4r165100"] {
        let b = Bench::new();
        b.settings(serde_json::json!({ "version": version }));
        let p = Project::new(&b, "proj", &[3000, 9090]);
        let first = p.up_reaches_ssh(&p.dir, &[]);
        assert!(!first.stderr().contains("no NAT rule"), "{version}: {}", first.stderr());
        let vm = b.clone_vm();
        assert_eq!(vm["natpf"]["1"].as_array().unwrap().len(), 3, "{version}");
        p.here(&["halt", "--force"]).success();
        // A second NAT adapter with a rule of the same name, on a different host port.
        let uuid = vm["uuid"].as_str().unwrap();
        b.raw(&["modifyvm", uuid, "--nic2", "nat", "--natpf2", "ssh,tcp,127.0.0.1,2299,,22"]);
        b.take_calls();
        let second = p.up_reaches_ssh(&p.dir, &[]);
        assert!(!second.stderr().contains("already exists"), "{version}: {}", second.stderr());
        assert!(
            second.stderr().contains(&p.port.to_string()),
            "{version}: SSH tried nic1's port: {}",
            second.stderr()
        );
        let vm = b.clone_vm();
        assert_eq!(vm["natpf"]["2"][0], "ssh,tcp,127.0.0.1,2299,,22", "{version}: nic2's rule untouched");
        assert_eq!(vm["natpf"]["1"].as_array().unwrap().len(), 3, "{version}");
        if version.starts_with("7.0.0") {
            // Read from the settings file there; everywhere else from showvminfo.
            let out = std::process::Command::new(&b.vbox.vboxmanage)
                .args(["showvminfo", uuid, "--machinereadable"])
                .output()
                .unwrap();
            assert!(
                !String::from_utf8_lossy(&out.stdout).contains("Forwarding(0)=\"grafana"),
                "7.0.0 defect modelled"
            );
        }
    }
}

/// A config for `provider = "virtualbox"` or `auto`, with an optional VBoxManage path.
fn config(dir: &Path, vboxmanage: Option<&Path>) -> Config {
    let provider = if vboxmanage.is_some() { "virtualbox" } else { "auto" };
    let mut toml =
        format!("[machine]\nname = \"web\"\nprovider = \"{provider}\"\n\n[box]\nvagrant = \"debian.box\"\n");
    if let Some(p) = vboxmanage {
        toml += &format!("\n[virtualbox]\nvboxmanage = {:?}\n", p.to_str().unwrap());
    }
    std::fs::write(dir.join("debian.box"), b"box").unwrap();
    let path = dir.join("box-config.toml");
    std::fs::write(&path, &toml).unwrap();
    Config::load(&path).unwrap()
}

/// The lifecycle against a real VirtualBox: create, start, SSH banner on the forwarded port, halt, destroy.
/// Opt-in: `PROVISIONER_TEST_VIRTUALBOX=1 PROVISIONER_TEST_VIRTUALBOX_BOX=/path/box.ovf` on a host with VirtualBox.
#[test]
#[ignore = "vm: needs a real VirtualBox (PROVISIONER_TEST_VIRTUALBOX=1); never available on this host"]
fn e2e_real_virtualbox() {
    if std::env::var_os("PROVISIONER_TEST_VIRTUALBOX").is_none() {
        eprintln!("skipped: set PROVISIONER_TEST_VIRTUALBOX=1 (and PROVISIONER_TEST_VIRTUALBOX_BOX) to run");
        return;
    }
    let vbox = match which::which("VBoxManage") {
        Ok(p) => VirtualBox::at(p),
        Err(e) => {
            eprintln!("skipped: VBoxManage not on PATH ({e})");
            return;
        }
    };
    if let Err(e) = vbox.preflight() {
        eprintln!("skipped: `VBoxManage --version` does not work here: {e:#}");
        return;
    }
    let ovf = PathBuf::from(
        std::env::var_os("PROVISIONER_TEST_VIRTUALBOX_BOX").expect("set PROVISIONER_TEST_VIRTUALBOX_BOX"),
    );
    let b = Bench::new();
    let mut spec = b.spec("e2e", &format!("provisioner-e2e-{}", std::process::id()), 0);
    spec.base = BoxImage { id: format!("e2e-{}", std::process::id()), disk: ovf, ..b.base.clone() };
    let port = support::free_port();
    spec.forwards.truncate(1);
    spec.forwards[0].host = port;
    let vm = spec.vm_name.clone();
    create(&vbox, &spec).unwrap();
    vbox.start(&vm).unwrap();
    let ssh = provisioner::provider::virtualbox::nat_rules(&spec)
        .unwrap()
        .into_iter()
        .find(|r| r.name == "ssh")
        .unwrap();
    let addr = std::net::SocketAddr::new(ssh.host_ip.parse().unwrap(), ssh.host_port);
    assert_eq!(addr.port(), port);
    let banner = support::wait_until(Duration::from_secs(300), "the SSH banner", || {
        use std::io::Read;
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).ok()?;
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        text.starts_with("SSH-").then_some(text)
    });
    assert!(banner.starts_with("SSH-2.0"), "{banner}");
    vbox.halt(&vm, Duration::from_secs(120), false).unwrap();
    assert_eq!(vbox.state(&vm).unwrap(), VmState::Stopped);
    vbox.destroy(&vm, &spec.state).unwrap();
    assert_eq!(vbox.state(&vm).unwrap(), VmState::NotCreated);
    let master = virtualbox::master_name(&spec.base);
    let _ = provisioner::process::Cmd::new(&vbox.vboxmanage)
        .args(["unregistervm", &master, "--delete-all"])
        .run();
}

// ---------------------------------------------------------------------------------------------------------------
// Snapshots, suspend and resume (issue 11).

#[test]
fn snapshot_restore_powers_off_a_running_vm_restores_and_starts_it_again() {
    let b = Bench::new();
    let spec = b.spec("web", WEB, 2222);
    create(&b.vbox, &spec).unwrap();
    b.vbox.start(WEB).unwrap();
    b.take_calls();
    b.vbox.snapshot_save(WEB, "clean").unwrap();
    let err = err_text(b.vbox.snapshot_save(WEB, "clean").unwrap_err());
    assert!(err.contains("already has a snapshot named \"clean\"") && err.contains("hint:"), "{err}");
    assert_eq!(b.vbox.snapshot_list(WEB).unwrap(), ["clean"]);
    b.vbox.snapshot_restore(WEB, "clean").unwrap();
    golden("snapshot_save_restore_running", &b.take_calls());
    assert_eq!(b.vm(WEB).unwrap()["state"], "running", "a running machine is running again after restore");
    // The master's `base` snapshot is not the machine's.
    assert!(!b.vbox.snapshot_list(WEB).unwrap().contains(&"base".to_string()));
}

#[test]
fn snapshot_restore_of_a_stopped_vm_leaves_it_as_the_snapshot_was() {
    let b = Bench::new();
    create(&b.vbox, &b.spec("web", WEB, 2222)).unwrap();
    b.vbox.snapshot_save(WEB, "off").unwrap();
    b.vbox.start(WEB).unwrap();
    b.vbox.snapshot_save(WEB, "on").unwrap();
    b.vbox.halt(WEB, Duration::ZERO, true).unwrap();
    b.vbox.snapshot_restore(WEB, "on").unwrap();
    assert_eq!(b.vm(WEB).unwrap()["state"], "saved", "an online snapshot comes back with its memory");
    b.vbox.snapshot_restore(WEB, "off").unwrap();
    assert_eq!(b.vm(WEB).unwrap()["state"], "poweroff");
    b.vbox.snapshot_delete(WEB, "on").unwrap();
    assert_eq!(b.vbox.snapshot_list(WEB).unwrap(), ["off"]);
    let err = err_text(b.vbox.snapshot_delete(WEB, "on").unwrap_err());
    assert!(err.contains("no snapshot named \"on\" (it has: off)") && err.contains("hint:"), "{err}");
}

#[test]
fn the_double_refuses_a_restore_while_running_as_virtualbox_does() {
    let b = Bench::new();
    create(&b.vbox, &b.spec("web", WEB, 2222)).unwrap();
    b.vbox.start(WEB).unwrap();
    b.vbox.snapshot_save(WEB, "s").unwrap();
    let out = std::process::Command::new(&b.vbox.vboxmanage)
        .args(["snapshot", WEB, "restore", "s"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Cannot delete the current state of the running machine (machine state: Running)"),
        "{err}"
    );
    assert!(err.contains("VBOX_E_INVALID_VM_STATE"), "{err}");
}

#[test]
fn suspend_saves_state_and_resume_starts_from_it() {
    let b = Bench::new();
    create(&b.vbox, &b.spec("web", WEB, 2222)).unwrap();
    let err = err_text(b.vbox.suspend(WEB).unwrap_err());
    assert!(err.contains("only a running machine can be suspended") && err.contains("hint:"), "{err}");
    let err = err_text(b.vbox.resume(WEB).unwrap_err());
    assert!(err.contains("not suspended") && err.contains("hint:"), "{err}");
    b.vbox.start(WEB).unwrap();
    b.take_calls();
    b.vbox.suspend(WEB).unwrap();
    assert_eq!(b.vm(WEB).unwrap()["state"], "saved");
    b.vbox.resume(WEB).unwrap();
    assert_eq!(b.vm(WEB).unwrap()["state"], "running");
    golden("suspend_resume", &b.take_calls());
}

/// The private network: both machines' NIC 2 on one internal network with their own MACs, NIC 1 with the MAC the
/// guests' network-config matches; showvminfo reads it back; removing the network detaches NIC 2.
#[test]
fn private_network_is_an_internal_network_on_nic2() {
    use provisioner::provider::network::{mac_for, net_name, PrivateNet, PRIMARY_MAC};
    use provisioner::provider::PrivateNic;
    let b = Bench::new();
    let net = PrivateNet::new(&net_name("/home/u/cluster", "private"), false);
    let nic = |name: &str, ip: &str| PrivateNic {
        ip: ip.parse().unwrap(),
        prefix: 24,
        mac: mac_for("/home/u/cluster", name),
        net: net.clone(),
    };
    let mut web = b.spec("web", WEB, 2222);
    web.private_net = Some(nic("web", "10.77.0.11"));
    let mut db = b.spec("db", DB, 2224);
    db.private_net = Some(nic("db", "10.77.0.12"));
    create(&b.vbox, &web).unwrap();
    create(&b.vbox, &db).unwrap();
    let calls = b.take_calls();
    let hex = |m: &str| m.replace(':', "").to_uppercase();
    for (vm, spec) in [(WEB, &web), (DB, &db)] {
        let modify = calls
            .iter()
            .find(|c| c.starts_with(&format!("modifyvm {{{vm}}} --cpus")))
            .unwrap_or_else(|| panic!("{calls:#?}"));
        let mac = hex(&spec.private_net.as_ref().unwrap().mac);
        assert!(
            modify.contains(&format!("--nic2 intnet --intnet2 {} --macaddress2 {mac}", net.name)),
            "{modify}"
        );
        assert!(modify.contains(&format!("--macaddress1 {}", hex(PRIMARY_MAC))), "{modify}");
        let v = b.vm(vm).unwrap();
        assert_eq!(v["nics"]["2"], "intnet");
        assert_eq!(v["intnet"]["2"], net.name.as_str());
        assert_eq!(v["macs"]["2"], mac.as_str());
        // NAT and its forwards stay on NIC 1.
        assert_eq!(v["nics"]["1"], "nat");
        assert_eq!(v["natpf"]["1"].as_array().unwrap().len(), 2);
    }
    assert_ne!(b.vm(WEB).unwrap()["macs"]["2"], b.vm(DB).unwrap()["macs"]["2"]);

    // The network removed from the config: NIC 2 goes on the next create of the stopped machine.
    web.private_net = None;
    create(&b.vbox, &web).unwrap();
    let again = b.take_calls();
    assert!(again.iter().any(|c| c.contains("--nic2 none")), "{again:#?}");
    assert_eq!(b.vm(WEB).unwrap()["nics"]["2"], "none");
}

/// Issue 16.1: a copied project (`cp -a proj projcopy`, `.provisioner/` included) never acts on the original
/// project's VM: every command that acts on a VM refuses in the copy, naming the other project, with only
/// read-only VBoxManage calls; `status` says the recorded VM belongs to another project; `up` in the copy makes
/// the copy's own VM and `destroy -f` there removes only that one; a copy's `destroy -f` forgets a copied record.
#[test]
fn a_copied_project_never_acts_on_the_original_vm() {
    let b = Bench::new();
    let p = Project::new(&b, "proj", &[]);
    p.up_reaches_ssh(&p.dir, &[]);
    p.here(&["snapshot", "save", "s1"]).success();
    let original = b.clone_vm();
    assert_eq!(original["state"], "running");
    let copy = b.dir.path().join("projcopy");
    if cfg!(windows) {
        support::copy_dir(&p.dir, &copy); // no `cp` there
    } else {
        let cp = std::process::Command::new("cp").arg("-a").arg(&p.dir).arg(&copy).status().unwrap();
        assert!(cp.success());
    }
    let uuid = original["uuid"].as_str().unwrap();
    let theirs = support::canonical(&p.dir);
    let ours = support::canonical(&copy).join(".provisioner");
    let refusal = format!(
        "error: the VirtualBox VM {uuid} recorded in {}/state.json belongs to another project (state dir {}), not \
         to this one; it was left untouched\nhint: this project's .provisioner/ is a copy of that project's: manage \
         that VM from {}; `provisioner up` here creates this project's own VM, `provisioner destroy -f` here \
         forgets the copied state (the other VM stays)\n",
        ours.display(),
        theirs.join(".provisioner").display(),
        theirs.display()
    );
    b.take_calls();
    let out = copy.join("copy.box");
    let commands = crate::support::vm_commands(out.to_str().unwrap(), &["--url", "http://127.0.0.1:1"]);
    for args in &commands {
        let r = p.run(&copy, args).failure();
        if args[0] == "load" {
            // `load --url` names its target itself: nothing of the machine is used.
            continue;
        }
        assert_eq!(r.stderr(), refusal, "{args:?}");
    }
    let calls = b.take_calls();
    assert!(calls.iter().all(|c| c.starts_with("showvminfo ") || c == "--version"), "{calls:#?}");
    let now = b.clone_vm();
    assert_eq!((&now["uuid"], &now["state"]), (&original["uuid"], &original["state"]), "original untouched");
    assert_eq!(now["snapshots"], original["snapshots"], "snapshots untouched");
    assert!(!out.exists());

    // status: text and JSON say so instead of reporting the other VM's state as the copy's own.
    let hint = refusal.lines().last().unwrap();
    let r = p.run(&copy, &["status"]).success();
    assert_eq!(
        r.stdout(),
        format!(
            "vb: recorded VM belongs to another project (state dir {})\n{hint}\n",
            theirs.join(".provisioner").display()
        )
    );
    let r = p.run(&copy, &["--json", "status"]).success();
    let doc: serde_json::Value = serde_json::from_str(r.stdout().trim()).unwrap();
    assert_eq!(doc["state"], "foreign", "{doc}");
    assert_eq!(doc["owner"], theirs.join(".provisioner").to_str().unwrap(), "{doc}");
    p.here(&["status"]).success().stdout_contains("vb: running (virtualbox");

    // `destroy -f` in the copy forgets the copied state; the original VM stays.
    p.run(&copy, &["destroy", "-f"]).success().stderr_contains("left untouched");
    assert!(!copy.join(".provisioner").exists());
    assert!(b.take_calls().iter().all(|c| c.starts_with("showvminfo ") || c == "--version"));
    assert_eq!(b.clone_vm()["state"], "running");

    // `up` in a fresh copy makes the copy's own VM (with its own SSH port), after saying why.
    std::fs::remove_dir_all(&copy).unwrap();
    if cfg!(windows) {
        support::copy_dir(&p.dir, &copy); // no `cp` there
    } else {
        let cp = std::process::Command::new("cp").arg("-a").arg(&p.dir).arg(&copy).status().unwrap();
        assert!(cp.success());
    }
    let cfg = std::fs::read_to_string(copy.join("box-config.toml")).unwrap();
    let port = support::free_port();
    std::fs::write(copy.join("box-config.toml"), cfg.replace(&p.port.to_string(), &port.to_string()))
        .unwrap();
    p.up_reaches_ssh(&copy, &[]).stderr_contains(&format!(
        "the virtualbox VM {uuid} recorded in {}/state.json belongs to another project (state dir {})",
        ours.display(),
        theirs.join(".provisioner").display()
    ));
    let clones: Vec<_> = b.vms().into_iter().filter(|v| v["parent"].is_string()).collect();
    assert_eq!(clones.len(), 2, "{clones:#?}");
    let mine = clones.iter().find(|v| v["uuid"] != original["uuid"]).unwrap();
    assert_eq!(mine["description"], format!("provisioner machine; state dir: {}", ours.display()));
    p.run(&copy, &["status"]).success().stdout_contains("vb: running (virtualbox");
    p.run(&copy, &["halt", "-f"]).success();
    p.run(&copy, &["destroy", "-f"]).success();
    let left: Vec<_> = b.vms().into_iter().filter(|v| v["parent"].is_string()).collect();
    assert_eq!(left.len(), 1);
    assert_eq!((&left[0]["uuid"], &left[0]["state"]), (&original["uuid"], &serde_json::json!("running")));
}

/// Issue 16.7: `status --json` of a state VirtualBox names but we do not know prints it as a string, verbatim, as
/// docs/virtualbox.md says (it printed an object `{"other": ...}`).
#[test]
fn status_json_of_an_unknown_state_is_the_word_verbatim() {
    let b = Bench::new();
    let p = Project::new(&b, "proj", &[]);
    p.up_reaches_ssh(&p.dir, &[]);
    b.force_state(b.clone_vm()["uuid"].as_str().unwrap(), "gurumeditation");
    let doc: serde_json::Value =
        serde_json::from_str(p.here(&["--json", "status"]).success().stdout().trim()).unwrap();
    assert_eq!(doc["state"], "gurumeditation", "{doc}");
    p.here(&["status"]).success().stdout_contains("vb: gurumeditation (virtualbox)");
}

/// Issue 20 on VirtualBox: a Vagrant VirtualBox `.box` without cloud-init (box.ovf + a VMDK made by `qemu-img
/// convert` from an ext4 disk with user `vagrant` and both published insecure keys, Vagrantfile, metadata.json)
/// goes through the double up to the SSH phase. The clone's own disk (the differencing VMDK VirtualBox gives a
/// linked clone, its parent found with `showmediuminfo`) is edited before `startvm`: what the double saw at
/// `startvm` is the edited disk, which holds the machine's key only and the machine's host key; the master's
/// imported disk and the cached box are untouched, and no seed DVD is attached.
#[test]
#[cfg_attr(
    windows,
    ignore = "windows: makes its disk images with Linux tools (mkfs.ext4, qemu-img) and edits them with debugfs"
)]
fn virtualbox_box_without_cloud_init_gets_its_keys_in_the_clone_before_startvm() {
    use provisioner::boxes::inject::{self, VAGRANT_INSECURE_ED25519, VAGRANT_INSECURE_RSA};
    use sha2::{Digest, Sha256};
    let sha = |p: &Path| hex::encode(Sha256::digest(std::fs::read(p).unwrap()));
    let run_ok = |cmd: &mut std::process::Command| {
        let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        assert!(out.status.success(), "{cmd:?}: {out:?}");
    };
    let b = Bench::new();
    let t = b.dir.path().join("boxsrc");
    let src = t.join("root");
    // No final newline after the second key: hashicorp/vagrant#8362.
    let ak = format!("{VAGRANT_INSECURE_RSA}\n{VAGRANT_INSECURE_ED25519}");
    for (path, body) in [
        ("etc/passwd", "root:x:0:0:root:/root:/bin/bash\nvagrant:x:1000:1000::/home/vagrant:/bin/bash\n"),
        ("etc/os-release", "ID=debian\n"),
        ("etc/ssh/ssh_host_rsa_key", "the box's shared host key"),
        ("home/vagrant/.ssh/authorized_keys", ak.as_str()),
    ] {
        std::fs::create_dir_all(src.join(path).parent().unwrap()).unwrap();
        std::fs::write(src.join(path), body).unwrap();
    }
    let raw = t.join("disk.raw");
    std::fs::File::create(&raw).unwrap().set_len(64 << 20).unwrap();
    let mkfs =
        ["/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4"].into_iter().find(|p| Path::new(p).exists()).unwrap();
    run_ok(std::process::Command::new(mkfs).args(["-q", "-F", "-d"]).arg(&src).arg(&raw));
    // A Vagrant VirtualBox box's disk is VirtualBox's export: a stream-optimized VMDK.
    let vmdk = t.join("box-disk001.vmdk");
    run_ok(
        std::process::Command::new("qemu-img")
            .args(["convert", "-O", "vmdk", "-o", "subformat=streamOptimized"])
            .arg(&raw)
            .arg(&vmdk),
    );
    let vmdk_sha = sha(&vmdk);
    let mut tar = tar::Builder::new(Vec::new());
    let ovf = std::fs::read(fixtures().join("box.ovf")).unwrap();
    let disk = std::fs::read(&vmdk).unwrap();
    for (name, data) in [
        ("metadata.json", &br#"{"provider":"virtualbox"}"#[..]),
        ("Vagrantfile", b"Vagrant.configure(\"2\") do |config|\nend\n"),
        ("box.ovf", &ovf),
        ("box-disk001.vmdk", &disk),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, name, data).unwrap();
    }
    let vbox_box = t.join("debian-novm.box");
    std::fs::write(&vbox_box, tar.into_inner().unwrap()).unwrap();
    let box_sha = sha(&vbox_box);

    let p = Project::new(&b, "nocloud", &[]);
    let toml = std::fs::read_to_string(p.dir.join("box-config.toml")).unwrap();
    let toml =
        toml.replace("vagrant = \"box/box.ovf\"", &format!("vagrant = {:?}", vbox_box.to_str().unwrap()));
    std::fs::write(p.dir.join("box-config.toml"), toml).unwrap();
    let up = p.up_reaches_ssh(&p.dir, &[]);
    let out = format!("{}{}", up.stdout(), up.stderr());
    assert!(
        out.contains(
            "disk (no cloud-init in the box): machine key written for vagrant, 2 insecure keys removed"
        ),
        "{out}"
    );
    assert_eq!(p.state()["keys_route"], "disk");

    // Order: the clone is made, its disk chain asked for (and edited), then started; no seed DVD anywhere.
    let calls = b.take_calls();
    let at = |prefix: &str| {
        calls.iter().position(|c| c.starts_with(prefix)).unwrap_or_else(|| panic!("{prefix}: {calls:#?}"))
    };
    assert!(
        at("clonevm ") < at("showmediuminfo disk ") && at("showmediuminfo disk ") < at("startvm "),
        "{calls:#?}"
    );
    assert!(!calls.iter().any(|c| c.contains("dvddrive")), "a seed DVD was attached: {calls:#?}");
    let clone = b.clone_vm();
    let medium = clone["controllers"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| c["att"].as_object().unwrap().values().cloned().collect::<Vec<_>>())
        .find(|a| a["type"] == "hdd")
        .unwrap()["medium"]
        .as_str()
        .unwrap()
        .to_string();
    let clone_disk = PathBuf::from(&medium);
    assert!(clone_disk.starts_with(b.double_dir()), "{medium}");

    // What the double saw: the clone's disk as made, then as started (edited in between), and now.
    let media = std::fs::read_to_string(b.double_dir().join("media.log")).unwrap();
    let digest = |sub: &str| {
        media
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{sub} {medium} ")))
            .unwrap_or_else(|| panic!("no {sub} of {medium} in media.log:\n{media}"))
            .to_string()
    };
    assert_ne!(digest("clonevm"), digest("startvm"), "the clone's disk was not edited before startvm");
    assert_eq!(digest("startvm"), sha(&clone_disk), "the disk changed after startvm");

    // The clone's disk, read through its parent (the master's imported disk): the machine's keys only.
    let state = StateDir::at(p.dir.join(".provisioner"));
    let (user, host) = provisioner::keys::ensure_machine_keys(&state, "vb").unwrap();
    let work = b.dir.path().join("read");
    let master = b.vms().into_iter().find(|v| v["parent"].is_null()).unwrap();
    let master_disk = PathBuf::from(
        master["controllers"]
            .as_array()
            .unwrap()
            .iter()
            .find_map(|c| {
                c["att"]
                    .as_object()
                    .unwrap()
                    .values()
                    .find(|a| a["type"] == "hdd")
                    .map(|a| a["medium"].clone())
            })
            .unwrap()
            .as_str()
            .unwrap(),
    );
    let chain = inject::Disk {
        path: clone_disk.clone(),
        format: "vmdk".into(),
        backing: vec![(master_disk.clone(), "vmdk".into())],
    };
    let read = |img: &Path, path: &str| {
        if img == clone_disk {
            inject::read_file_disk(&chain, &work, path).unwrap()
        } else {
            inject::read_file(img, "vmdk", &work, path).unwrap()
        }
    };
    assert_eq!(
        read(&clone_disk, "/home/vagrant/.ssh/authorized_keys").unwrap(),
        format!("{}\n", user.public_openssh)
    );
    assert_eq!(read(&clone_disk, "/etc/ssh/ssh_host_ed25519_key").unwrap(), host.private_openssh);
    assert_eq!(read(&clone_disk, "/etc/ssh/ssh_host_rsa_key"), None, "the box's shared host key is gone");
    assert_eq!(read(&clone_disk, "/etc/hostname").unwrap(), "vb\n");
    // The master's imported disk still has the box's keys; the box file and the cached VMDK are byte-identical.
    let master_ak = read(&master_disk, "/home/vagrant/.ssh/authorized_keys").unwrap();
    assert!(master_ak.contains("vagrant insecure public key"), "{master_ak}");
    assert_eq!(sha(&vbox_box), box_sha);
    let cached: Vec<PathBuf> =
        walk(&p.cache).into_iter().filter(|f| f.extension().is_some_and(|e| e == "vmdk")).collect();
    assert_eq!(cached.len(), 1, "{cached:?}");
    assert_eq!(sha(&cached[0]), vmdk_sha, "the cached box's VMDK changed");
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// A differencing VMDK whose parentCID is not its parent's CID: qemu will not read through it, and the disk route
/// says so with the way out, instead of debugfs's "Invalid argument".
#[test]
#[cfg_attr(windows, ignore = "windows: makes its disk images with Linux tools (mkfs.ext4, qemu-img)")]
fn a_differencing_vmdk_qemu_cannot_read_through_is_refused_with_the_choices() {
    use provisioner::boxes::inject;
    let t = tempfile::tempdir().unwrap();
    let run_ok = |cmd: &mut std::process::Command| {
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{cmd:?}: {out:?}");
    };
    let raw = t.path().join("d.raw");
    std::fs::File::create(&raw).unwrap().set_len(16 << 20).unwrap();
    let base = t.path().join("base.vmdk");
    run_ok(std::process::Command::new("qemu-img").args(["convert", "-O", "vmdk"]).arg(&raw).arg(&base));
    let diff = t.path().join("diff.vmdk");
    run_ok(
        std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "vmdk", "-F", "vmdk", "-b"])
            .arg(&base)
            .arg(&diff),
    );
    let mut bytes = std::fs::read(&diff).unwrap();
    let at = bytes.windows(10).position(|w| w == b"parentCID=").unwrap() + 10;
    bytes[at..at + 8].copy_from_slice(b"ffffffff");
    std::fs::write(&diff, bytes).unwrap();
    let disk =
        inject::Disk { path: diff.clone(), format: "vmdk".into(), backing: vec![(base, "vmdk".into())] };
    let e = format!("{:#}", inject::read_file_disk(&disk, &t.path().join("w"), "/etc/passwd").unwrap_err());
    assert!(
        e.starts_with(&format!("the disk {} cannot be read through the images under it", diff.display())),
        "{e}"
    );
    assert!(
        e.contains("\nhint: qemu checks that a differencing VMDK's parentCID is its parent's CID"),
        "{e}"
    );
}
