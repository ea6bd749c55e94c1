//! Multi-machine projects through the binary: `[[machine]]` files and their cross-machine rules (positions in
//! messages), machine selection, the parallel `up` (one machine failing leaves the others going) and the `status`
//! table against the VBoxManage double, JSON events naming their machine, and the shipped cluster example's
//! rendered config checked with the real tools (promtool, docker-compose).

#[cfg(unix)]
use crate::lab::tool;
use crate::support::{self, Test};

use std::path::{Path, PathBuf};

/// A two-machine file for the VBoxManage double: `one` and `two` on the given host ports, a shared box.
fn two_machines(vboxmanage: &Path, extra: &str, two_port: u16) -> String {
    format!(
        "[defaults]\nprovider = \"virtualbox\"\ncpus = 1\nmemory_mb = 1024\n\n[box]\nvagrant = \"box/box.ovf\"\n\n\
         [virtualbox]\nvboxmanage = {vb:?}\n{extra}\n\
         [[machine]]\nname = \"one\"\nprimary = true\nip = \"10.77.0.21\"\n\n\
         [[machine]]\nname = \"two\"\n\n[[machine.forward]]\nguest = 8000\nhost = {two_port}\n",
        vb = vboxmanage.to_str().unwrap()
    )
}

/// A temp project using the VBoxManage double (state beside its symlink) and the fixture OVF box.
struct Project {
    t: Test,
    vbox: PathBuf,
}

impl Project {
    fn new() -> Project {
        let t = Test::new();
        let fixtures = support::repo().join("tests/fixtures/vbox");
        let vbox = support::vboxmanage_double(&t.path().join("bin"));
        let proj = t.path().join("proj");
        std::fs::create_dir_all(proj.join("box")).unwrap();
        std::fs::create_dir_all(proj.join("provision")).unwrap();
        std::fs::copy(fixtures.join("box.ovf"), proj.join("box/box.ovf")).unwrap();
        std::fs::copy(fixtures.join("box-disk001.vmdk"), proj.join("box/box-disk001.vmdk")).unwrap();
        Project { vbox, t }
    }
    fn dir(&self) -> PathBuf {
        self.t.path().join("proj")
    }
    fn write(&self, toml: &str) {
        std::fs::write(self.dir().join("box-config.toml"), toml).unwrap();
    }
    fn run(&self, args: &[&str]) -> support::Run {
        Test::new()
            .cwd(self.dir())
            .env("PROVISIONER_CACHE_DIR", self.t.path().join("cache").to_str().unwrap())
            .args(args.iter().copied())
            .run()
    }
    /// The VMs the double has registered: (name, state).
    fn vms(&self) -> Vec<(String, String)> {
        let Ok(bytes) = std::fs::read(self.t.path().join("bin/vboxdouble/state.json")) else { return vec![] };
        let st: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        st["vms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| (v["name"].as_str().unwrap().to_string(), v["state"].as_str().unwrap().to_string()))
            .collect()
    }
}

/// The validation errors of a file, one `file:line:col: message` per entry.
fn errors_of(toml: &str) -> String {
    let t = Test::new();
    t.write("box-config.toml", toml);
    std::fs::create_dir_all(t.path().join("provision")).unwrap();
    let run = Test::new().cwd(t.path()).arg("validate").run().failure();
    run.stderr()
}

const BOX: &str = "[box]\nvagrant = \"x.box\"\n";

#[test]
fn cross_machine_rules_are_errors_at_their_line_and_column() {
    let toml = format!(
        "{BOX}\n[network]\nsubnet = \"10.77.0.0/24\"\n\n\
         [[machine]]\nname = \"a\"\nprimary = true\nip = \"10.77.0.5\"\n\n\
         [[machine.forward]]\nguest = 8000\nhost = 18000\n\n\
         [[machine]]\nname = \"a\"\nprimary = true\nip = \"10.77.0.5\"\n\n\
         [[machine]]\nname = \"c\"\nip = \"10.78.0.5\"\n\n[[machine.forward]]\nguest = 8000\nhost = 18000\n\n\
         [[machine]]\nname = \"d\"\nip = \"10.77.0.255\"\n"
    );
    let e = errors_of(&toml);
    // Lines: 17 name, 18 primary, 19 ip of the second "a"; 23 ip of c, 27 its host port; 31 ip of d.
    for want in [
        "box-config.toml:17:8: machine name \"a\" is already used at line 8",
        "box-config.toml:18:11: a second primary machine (\"a\" is primary at line 9)",
        "box-config.toml:19:6: ip 10.77.0.5 is already given to machine \"a\"",
        "box-config.toml:23:6: ip 10.78.0.5 is outside the subnet 10.77.0.0/24 of [network]",
        "box-config.toml:27:8: host port 18000 is already used by machine \"a\" (a forward on 127.0.0.1)",
        "box-config.toml:31:6: ip 10.77.0.255 is the broadcast address of 10.77.0.0/24",
    ] {
        assert!(e.contains(want), "missing {want:?} in:\n{e}");
    }
    assert!(e.contains("hint:"), "{e}");

    // Strict keys inside a [[machine]], the subnet itself, and [ssh] host_port (per machine in such files).
    let e = errors_of(&format!("{BOX}[[machine]]\nname = \"a\"\ncpu = 2\n"));
    assert!(e.contains("box-config.toml:5:1: unknown key `cpu`"), "{e}");
    let e = errors_of(&format!(
        "{BOX}[network]\nsubnet = \"10.0.0.0/8\"\n[ssh]\nhost_port = 2222\n[[machine]]\nname = \"a\"\n"
    ));
    assert!(e.contains("box-config.toml:4:10: subnet 10.0.0.0/8 overlaps 10.0.2.0/24"), "{e}");
    assert!(e.contains("box-config.toml:6:13: `host_port` in [ssh] does not apply"), "{e}");
    // A machine's own rules point into its entry.
    let e = errors_of(&format!("{BOX}[[machine]]\nname = \"a\"\n[[machine]]\nname = \"B\"\n"));
    assert!(e.contains("box-config.toml:6:8: machine name \"B\" is not allowed"), "{e}");
    // Profiles are passed to compose as `--profile`: its naming rule, at the offending entry.
    let e = errors_of(&format!("{BOX}[[machine]]\nname = \"a\"\nprofiles = [\"app\", \"-x\"]\n"));
    assert!(e.contains("box-config.toml:5:20: profile \"-x\" is not a compose profile name"), "{e}");
}

/// A host port clashes only on the same libvirt host and overlapping bind addresses: another `host_ip` or a
/// machine on another host (`[machine.libvirt] uri`) may reuse it; a wildcard bind clashes with any address.
#[test]
fn host_ports_clash_per_host_and_bind_address() {
    let fwd =
        |host_ip: &str| format!("[[machine.forward]]\nguest = 8000\nhost = 18000\nhost_ip = \"{host_ip}\"\n");
    let remote = "[machine.libvirt]\nuri = \"qemu+ssh://lab@far.example/system\"\n";
    let file = |b_ip: &str, b_remote: bool| {
        format!(
            "{BOX}[[machine]]\nname = \"a\"\n{}[[machine]]\nname = \"b\"\n{}{}",
            fwd("127.0.0.1"),
            fwd(b_ip),
            if b_remote { remote } else { "" }
        )
    };
    let ok = |toml: String| {
        let t = Test::new();
        t.write("box-config.toml", toml);
        std::fs::create_dir_all(t.path().join("provision")).unwrap();
        Test::new().cwd(t.path()).arg("validate").run()
    };
    let r = ok(file("127.0.0.2", false));
    assert!(!r.stderr().contains("already used"), "another loopback address: {}", r.stderr());
    let r = ok(file("127.0.0.1", true));
    assert!(!r.stderr().contains("already used"), "another host: {}", r.stderr());
    let e = errors_of(&file("0.0.0.0", false));
    assert!(
        e.contains(
            "box-config.toml:13:8: host port 18000 is already used by machine \"a\" (a forward on 127.0.0.1)"
        ),
        "{e}"
    );
    // A machine's own URI is checked at its own position.
    let e = errors_of(&format!(
        "{BOX}[[machine]]\nname = \"a\"\n[machine.libvirt]\nuri = \"qemu+ssh://h/system?command=x\"\n"
    ));
    assert!(e.contains("box-config.toml:6:7:") && e.contains("`command`"), "{e}");
}

#[test]
fn a_single_machine_file_is_unchanged_and_names_are_checked() {
    let t = Test::with_lab();
    t.write("box-config.toml", std::fs::read_to_string(t.path().join("box-config.toml")).unwrap());
    let run = Test::new().cwd(t.path()).args(["status"]).run().success();
    assert_eq!(run.stdout().lines().next(), Some("lab: not created"));
    Test::new()
        .cwd(t.path())
        .args(["status", "web"])
        .run()
        .failure()
        .stderr_contains("no machine named \"web\"")
        .stderr_contains("its machines are: lab");
    assert!(!t.path().join(".provisioner/machines").exists());
}

#[test]
fn a_broken_multi_machine_file_is_refused_even_beside_a_single_machines_state() {
    // A file turned into `[[machine]]` keeps the old machine's `.provisioner/state.json` (docs/multi-machine.md).
    // Broken, it is refused whole: `status` must not fall back to that old single machine.
    let t = Test::new();
    t.write("box-config.toml", format!("{BOX}[[machine]]\nname = \"a\"\ncpus = \"many\"\n"));
    t.write(
        ".provisioner/state.json",
        r#"{"provider": "libvirt", "vm_name": "provisioner-lab-86ee3d20", "provisioned": false}"#,
    );
    let run = Test::new().cwd(t.path()).args(["status"]).run().failure().stderr_contains("box-config.toml:");
    assert!(!run.stdout().contains("lab"), "{}", run.stdout());
}

#[test]
fn selection_status_table_and_json_machine_field_on_the_double() {
    let p = Project::new();
    p.write(&two_machines(&p.vbox, "", support::free_port()));
    p.run(&["validate"]).success().stdout_contains("valid (2 machines: one 10.77.0.21, two 10.77.0.10");
    p.run(&["halt", "three"])
        .failure()
        .stderr_contains("no machine named \"three\"")
        .stderr_contains("its machines are: one, two")
        .stderr_contains("hint:");
    let status = p.run(&["status"]).success().stdout();
    let lines: Vec<&str> = status.lines().collect();
    assert!(lines[0].starts_with("MACHINE") && lines[0].contains("STATE"), "{status}");
    assert!(
        lines[1].starts_with("one ") && lines[1].contains("not created") && lines[1].contains("10.77.0.21")
    );
    assert!(lines[2].starts_with("two ") && lines[2].contains("10.77.0.10"), "{status}");

    // `up` of one named machine: the other is not touched; every JSON event carries the machine.
    let out = p.run(&["--json", "up", "one", "--no-provision", "--boot-timeout", "2"]).failure();
    let events: Vec<serde_json::Value> =
        out.stdout().lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let phases: Vec<&serde_json::Value> = events.iter().filter(|e| e["event"] == "phase_start").collect();
    assert!(!phases.is_empty(), "{}", out.stdout());
    assert!(phases.iter().all(|e| e["machine"] == "one"), "{}", out.stdout());
    let vms = p.vms();
    assert_eq!(vms.iter().filter(|(n, _)| n.starts_with("provisioner-one-")).count(), 1, "{vms:?}");
    assert!(!vms.iter().any(|(n, _)| n.starts_with("provisioner-two-")), "{vms:?}");
    assert!(p.dir().join(".provisioner/machines/one/state.json").is_file());

    // The table asks the hypervisor for each recorded machine.
    let status = p.run(&["status"]).success().stdout();
    assert!(status
        .lines()
        .any(|l| l.starts_with("one ") && l.contains("running") && l.contains("virtualbox")));
    let json: serde_json::Value =
        serde_json::from_str(&p.run(&["--json", "status"]).success().stdout()).unwrap();
    assert_eq!(json["machines"][0]["machine"], "one");
    assert_eq!(json["machines"][0]["state"], "running");
    assert_eq!(json["machines"][1]["state"], "not created");

    // ssh-config: one stanza per machine; a machine not created yet is named as the failure.
    let cfg = p.run(&["ssh-config", "one"]).success().stdout();
    assert!(cfg.contains("Host one") && cfg.contains(".provisioner/machines/one/known_hosts"), "{cfg}");
    let all = p.run(&["ssh-config"]).failure();
    assert!(all.stdout().contains("Host one"), "{}", all.stdout());
    assert!(all.stderr().contains("[two] warning: failed: machine `two` not created"), "{}", all.stderr());

    p.run(&["destroy", "-f"]).success();
    assert!(p.vms().iter().all(|(n, _)| !n.starts_with("provisioner-one-")), "{:?}", p.vms());
    assert!(!p.dir().join(".provisioner").exists(), "the last machine's destroy leaves no state");

    // Without a primary, a one-machine command needs a name.
    p.write(&two_machines(&p.vbox, "", support::free_port()).replace("primary = true\n", ""));
    p.run(&["ssh", "-c", "true"])
        .failure()
        .stderr_contains("defines 2 machines (one, two) and none is `primary`")
        .stderr_contains("hint: name it");
    p.run(&["port", "--machine", "two"]).failure().stderr_contains("machine `two` is not created");
}

#[test]
fn one_failing_machine_does_not_stop_the_others_and_is_named() {
    let p = Project::new();
    // `two` forwards a host port that is taken: its `up` fails at once; `one` still goes on to boot.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    p.write(&two_machines(&p.vbox, "", port));
    let out = p.run(&["up", "--no-provision", "--boot-timeout", "2", "--parallel", "2"]).failure();
    let err = out.stderr();
    assert!(err.contains("up failed on 2 of 2 machines: one, two"), "{err}");
    assert!(err.contains("[two] warning: up failed:") && err.contains(&port.to_string()), "{err}");
    assert!(err.contains("[one] warning: up failed:") && err.contains("did not answer SSH"), "{err}");
    // The summary table, in file order.
    let table: Vec<&str> = err.lines().skip_while(|l| !l.starts_with("MACHINE")).collect();
    assert!(table[0].contains("RESULT") && table[0].contains("TIME"), "{err}");
    assert!(table[1].starts_with("one ") && table[2].starts_with("two "), "{err}");
    let vms = p.vms();
    assert!(vms.iter().any(|(n, s)| n.starts_with("provisioner-one-") && s == "running"), "{vms:?}");
    assert!(!vms.iter().any(|(n, _)| n.starts_with("provisioner-two-")), "{vms:?}");
    drop(taken);
    p.run(&["destroy", "-f", "one", "two"]).success();
    assert!(p.vms().iter().all(|(n, _)| !n.starts_with("provisioner-one-")));
}

/// The shipped cluster: every machine renders; the monitor's Prometheus scrapes the app machines by name
/// (promtool), every machine's compose file parses (docker-compose v1) and runs only its part of the lab.
#[test]
#[cfg_attr(
    windows,
    ignore = "windows: checks the rendered cluster with promtool and docker-compose (Linux binaries)"
)]
fn cluster_example_renders_and_passes_promtool_and_compose() {
    // The tools (promtool, docker-compose) are Linux binaries: skipped on Windows (see the ignore reason).
    #[cfg(unix)]
    {
        let t = Test::new();
        support::copy_cluster_example(t.path());
        Test::new().cwd(t.path()).arg("validate").run().success().stdout_contains("3 machines");
        let mut services = std::collections::BTreeMap::new();
        for m in ["monitor", "app1", "app2"] {
            let out = t.path().join(format!("out-{m}"));
            Test::new()
                .cwd(t.path())
                .args(["render", "-m", m, "--out", out.to_str().unwrap()])
                .run()
                .success();
            tool(&out, "docker-compose", &["config", "-q"]);
            let doc: serde_norway::Value =
                serde_norway::from_str(&std::fs::read_to_string(out.join("docker-compose.yml")).unwrap())
                    .unwrap();
            let names: Vec<String> = doc["services"]
                .as_mapping()
                .unwrap()
                .keys()
                .map(|k| k.as_str().unwrap().to_string())
                .collect();
            services.insert(m, names);
        }
        assert_eq!(services["monitor"], ["prometheus", "alertmanager", "grafana"]);
        assert_eq!(services["app1"], ["demo-app", "node-exporter", "cadvisor", "loadgen"]);
        let mon = t.path().join("out-monitor/prometheus");
        tool(&mon, "promtool", &["check", "config", "prometheus.yml"]);
        let prom: serde_norway::Value =
            serde_norway::from_str(&std::fs::read_to_string(mon.join("prometheus.yml")).unwrap()).unwrap();
        let targets = |job: &str| -> Vec<String> {
            let jobs = prom["scrape_configs"].as_sequence().unwrap();
            let j = jobs.iter().find(|j| j["job_name"] == job).unwrap();
            j["static_configs"][0]["targets"]
                .as_sequence()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().into())
                .collect()
        };
        assert_eq!(targets("demo-app"), ["app1:8000", "app2:8000"]);
        assert_eq!(targets("node-exporter"), ["app1:9100", "app2:9100"]);
        // Offline (images = "debian") no machine runs cAdvisor: a scrape job for it would only be down.
        let jobs: Vec<&str> = prom["scrape_configs"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|j| j["job_name"].as_str().unwrap())
            .collect();
        assert_eq!(jobs, ["prometheus", "demo-app", "node-exporter", "alertmanager"]);
        let compose = std::fs::read_to_string(t.path().join("out-monitor/docker-compose.yml")).unwrap();
        assert!(compose.contains("- \"app2:10.77.0.12\""), "names resolve inside the containers too");
        let app = std::fs::read_to_string(t.path().join("out-app2/docker-compose.yml")).unwrap();
        assert!(app.contains("\"10.77.0.12:9100:9100\""), "exporters published on the private address");
        let am = std::fs::read_to_string(t.path().join("out-monitor/alertmanager/alertmanager.yml")).unwrap();
        assert!(am.contains("http://app1:8000/alerts"));
        // Each machine keeps its own secrets in its own state dir.
        for m in ["monitor", "app1", "app2"] {
            assert!(t.path().join(format!(".provisioner/machines/{m}/secrets.toml")).is_file());
        }
    }
}

/// Issue 16.1 in a `[[machine]]` project: a copy (`cp -a`) shows the recorded VM as another project's in the
/// status table and JSON, and refuses to halt it; the original's VM keeps running.
#[test]
fn a_copied_multi_machine_project_shows_and_refuses_the_original_vm() {
    let p = Project::new();
    p.write(&two_machines(&p.vbox, "", support::free_port()));
    p.run(&["up", "one", "--no-provision", "--boot-timeout", "2"]).failure();
    let copy = p.t.path().join("projcopy");
    if cfg!(windows) {
        support::copy_dir(&p.dir(), &copy); // no `cp` there
    } else {
        assert!(std::process::Command::new("cp")
            .arg("-a")
            .arg(p.dir())
            .arg(&copy)
            .status()
            .unwrap()
            .success());
    }
    let run = |args: &[&str]| {
        Test::new()
            .cwd(&copy)
            .env("PROVISIONER_CACHE_DIR", p.t.path().join("cache").to_str().unwrap())
            .args(args.iter().copied())
            .run()
    };
    // As the product prints it: without std's `\\?\` verbatim prefix on Windows, the host's separators.
    let theirs = std::fs::canonicalize(p.dir()).unwrap();
    let theirs = PathBuf::from(theirs.to_string_lossy().trim_start_matches(r"\\?\"))
        .join(".provisioner")
        .join("machines")
        .join("one");
    let status = run(&["status"]).success().stdout();
    let row = status.lines().find(|l| l.starts_with("one ")).unwrap();
    assert!(row.contains("foreign") && row.contains("virtualbox"), "{status}");
    assert!(
        row.ends_with(&format!("recorded VM belongs to another project (state dir {})", theirs.display())),
        "{status}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&run(&["--json", "status"]).success().stdout()).unwrap();
    assert_eq!(json["machines"][0]["state"], "foreign", "{json}");
    run(&["halt", "one"]).failure().stderr_contains(&format!(
        "belongs to another project (state dir {}), not to this one; it was left untouched",
        theirs.display()
    ));
    let vms = p.vms();
    let one = vms.iter().find(|(n, _)| n.starts_with("provisioner-one-")).unwrap();
    assert_eq!(one.1, "running", "{vms:?}");
    p.run(&["status"]).success().stdout_contains("running");
}

/// `validate` of this `[[machine]]` file fails with exactly this (after `error: `).
#[track_caller]
fn refused_exactly(toml: &str, expected: &str) {
    assert_eq!(errors_of(toml), format!("error: {expected}\n"), "stderr differs for:\n{toml}");
}

/// `validate` of this `[[machine]]` file: the run (the caller asserts success or what it needs).
fn validate_file(toml: &str) -> support::Run {
    let t = Test::new();
    t.write("box-config.toml", toml);
    std::fs::create_dir_all(t.path().join("provision")).unwrap();
    Test::new().cwd(t.path()).arg("validate").run()
}

const SUBNET_HINT: &str =
    "hint: pick a range of 10.0.0.0/8, 172.16.0.0/12 or 192.168.0.0/16 that no network of \
                           the host uses, e.g. \"10.77.0.0/24\"";

#[test]
fn reserved_subnets_are_refused_at_their_position() {
    let file = |subnet: &str| format!("{BOX}[network]\nsubnet = \"{subnet}\"\n[[machine]]\nname = \"a\"\n");
    for (subnet, range) in [
        ("127.0.0.0/8", "127.0.0.0/8, the loopback range (every machine's own)"),
        ("127.1.2.0/24", "127.0.0.0/8, the loopback range (every machine's own)"),
        ("239.1.0.0/16", "224.0.0.0/4, the multicast range"),
        ("224.0.0.0/8", "224.0.0.0/4, the multicast range"),
        ("0.0.0.0/8", "0.0.0.0/8, \"this network\" (never a host's address)"),
        ("255.255.255.0/24", "240.0.0.0/4, the reserved range (with the broadcast address 255.255.255.255)"),
        ("169.254.0.0/16", "169.254.0.0/16, the link-local range"),
        ("169.0.0.0/8", "169.254.0.0/16, the link-local range"),
    ] {
        refused_exactly(
            &file(subnet),
            &format!(
                "box-config.toml:4:10: subnet {subnet} in [network] overlaps {range}: the machines cannot have \
                 addresses there\n{SUBNET_HINT}"
            ),
        );
    }
    // Neighbours of those ranges are private ranges like any other (the host's own networks are checked apart:
    // see host_network_overlap_is_an_error_on_this_host_and_a_warning_for_a_remote_one).
    for ok in ["10.10.0.0/24", "126.0.0.0/8", "172.16.0.0/12", "192.168.254.0/24"] {
        let r = validate_file(&file(ok));
        if r.stderr().contains("a network this host is on") {
            continue; // this machine is on it: the host check refuses it, rightly
        }
        r.success();
    }
}

#[test]
fn names_and_hostnames_that_would_reach_another_machine_are_refused() {
    let hint_host =
        "hint: every machine's name and hostname must reach only that machine (/etc/hosts of every \
                     guest lists them): give it a hostname of its own, or remove `hostname` to use its name";
    refused_exactly(
        &format!("{BOX}[[machine]]\nname = \"localhost\"\n[[machine]]\nname = \"b-\"\n"),
        "box-config.toml:4:8: machine name \"localhost\" is reserved: in every guest it names the guest itself \
         (127.0.0.1), so it cannot name a machine\nhint: pick another name (e.g. \"lab\")\n\
         box-config.toml:6:8: machine name \"b-\" ends with '-': it is also the guest's host name, which cannot end \
         with '-'\nhint: end the name with a letter or digit (e.g. \"lab\")",
    );
    refused_exactly(
        &format!(
            "{BOX}[[machine]]\nname = \"a\"\nhostname = \"web\"\n[[machine]]\nname = \"b\"\nhostname = \"web\"\n\
             [[machine]]\nname = \"c\"\nhostname = \"a\"\n"
        ),
        &format!(
            "box-config.toml:8:12: hostname \"web\" is already the hostname of machine \"a\" (line 5)\n{hint_host}\n\
             box-config.toml:11:12: hostname \"a\" is the name of machine \"a\" (line 4)\n{hint_host}"
        ),
    );
    refused_exactly(
        &format!("{BOX}[[machine]]\nname = \"a\"\nhostname = \"localhost\"\n"),
        "box-config.toml:5:12: hostname \"localhost\" is reserved: in every guest it names the guest itself \
         (127.0.0.1), so it cannot name a machine\nhint: pick another hostname, or remove it to use the machine's \
         name",
    );
    // A hostname of its own, or its own name as hostname, is fine; so is '-' inside a name.
    validate_file(&format!(
        "{BOX}[[machine]]\nname = \"a\"\nhostname = \"a\"\n[[machine]]\nname = \"b-1\"\nhostname = \"web\"\n\
         [[machine]]\nname = \"local-host\"\n"
    ))
    .success();
}

/// `qemu+ssh://h/system` and `qemu+ssh://root@H:22/system` are one host: their forwarded host ports clash.
#[test]
fn one_remote_host_spelt_two_ways_is_one_host_for_port_clashes() {
    let file = |uri_b: &str| {
        format!(
            "{BOX}[[machine]]\nname = \"a\"\n[machine.libvirt]\nuri = \"qemu+ssh://h/system\"\n\
             [[machine.forward]]\nguest = 8000\nhost = 18000\n\
             [[machine]]\nname = \"b\"\n[machine.libvirt]\nuri = \"{uri_b}\"\n\
             [[machine.forward]]\nguest = 8000\nhost = 18000\n"
        )
    };
    for same in ["qemu+ssh://root@H:22/system", "qemu+libssh://someone@h./system", "qemu+ssh://h:022/system"]
    {
        refused_exactly(
            &file(same),
            "box-config.toml:16:8: host port 18000 is already used by machine \"a\" (a forward on 127.0.0.1)\n\
             hint: every machine's forwards and ssh_port need host ports of their own (or another host_ip)",
        );
    }
    // Another SSH port may be another machine behind a forward; another name is another host.
    for other in ["qemu+ssh://h:2222/system", "qemu+ssh://h2/system"] {
        let r = validate_file(&file(other)).failure(); // (the hosts are not in known_hosts)
        assert!(!r.stderr().contains("already used"), "{other}: {}", r.stderr());
    }
}

#[test]
fn errors_that_had_no_position_get_their_own() {
    // [defaults] cpus = 0: once, at its own line (not at every [[machine]]).
    refused_exactly(
        &format!("{BOX}[defaults]\ncpus = 0\nmemory_mb = 1024\n[[machine]]\nname = \"a\"\n[[machine]]\nname = \"b\"\n"),
        "box-config.toml:4:8: `cpus` must be from 1 to 256, found 0\nhint: the lab itself wants cpus = 2, \
         memory_mb = 4096, disk_gb = 20",
    );
    // A machine's own value is still reported at its own line.
    refused_exactly(
        &format!(
            "{BOX}[defaults]\ncpus = 1\n[[machine]]\nname = \"a\"\ncpus = 0\n[[machine]]\nname = \"b\"\n"
        ),
        "box-config.toml:7:8: `cpus` must be from 1 to 256, found 0\nhint: the lab itself wants cpus = 2, \
         memory_mb = 4096, disk_gb = 20",
    );
    // A forward on the machine's own ssh_port names that key and its line.
    refused_exactly(
        &format!(
            "{BOX}[[machine]]\nname = \"a\"\nssh_port = 2222\n[[machine.forward]]\nguest = 8000\nhost = 2222\n"
        ),
        "box-config.toml:8:8: host port 2222 of [[machine.forward]] #1 is already used by its ssh_port (line 5)\n\
         hint: give every forward (and ssh_port) its own host port",
    );
    // A top-level [[forward]] says where forwards go in such a file.
    refused_exactly(
        &format!("{BOX}[[machine]]\nname = \"a\"\n[[forward]]\nguest = 8000\nhost = 18000\n"),
        "box-config.toml:5:3: unknown key `forward` at the top level; expected one of: machine, defaults, network, \
         box, ssh, provision, vars, health, libvirt, virtualbox\nhint: in a file of several machines a forward \
         belongs to one machine: write it as [[machine.forward]] after that machine's [[machine]] table",
    );
    // A provision tree that does not render (here /etc) is named with the position of its `source`.
    let e = errors_of(&format!("{BOX}[[machine]]\nname = \"a\"\n[machine.provision]\nsource = \"/etc\"\n"));
    assert!(
        e.starts_with(
            "error: box-config.toml:6:10: the provision tree /etc does not render (validate renders it"
        ),
        "{e}"
    );
    // A guest_path of / in the shared [provision], with a machine that has its own [machine.provision].
    refused_exactly(
        &format!(
            "{BOX}[provision]\nguest_path = \"/opt/..\"\n[[machine]]\nname = \"a\"\n[machine.provision]\n\
             enabled = false\n"
        ),
        "box-config.toml:4:14: `guest_path` \"/opt/..\" is the guest's / once `.` and `..` are resolved: the \
         provision tree would be unpacked over the guest's root\nhint: use a dedicated directory such as \"/opt/provision\"",
    );
}

/// A remote libvirt host whose key is unknown: the error is at the `uri` naming it.
#[test]
#[cfg_attr(windows, ignore = "windows: runs ssh-keygen, and remote libvirt hosts are Linux-only")]
fn a_remote_libvirt_host_with_an_unknown_key_is_refused_at_its_uri() {
    let kh = tempfile::tempdir().unwrap();
    let known = kh.path().join("known_hosts");
    std::fs::write(&known, "").unwrap();
    let uri = format!("qemu+ssh://root@10.0.0.2/system?known_hosts={}", known.display());
    let e = errors_of(&format!(
        "{BOX}[[machine]]\nname = \"a\"\n[machine.provision]\nenabled = false\n[machine.libvirt]\nuri = '{uri}'\n"
    ));
    assert!(
        e.starts_with(&format!(
            "error: box-config.toml:8:7: the SSH host key of the libvirt host 10.0.0.2 is not in {}",
            known.display()
        )),
        "{e}"
    );
    assert!(e.contains("\nhint: check the key's fingerprint and add it: ssh-keyscan 10.0.0.2"), "{e}");
}

/// The subnet against the host's networks, injected: an overlap on this host is an error at `subnet`; a
/// machine on a remote host gets a warning at its `uri` (its host's networks are not known); networks that
/// cannot be read are a warning.
#[test]
fn host_network_overlap_is_an_error_on_this_host_and_a_warning_for_a_remote_one() {
    use provisioner::config::hostnet::HostNet;
    use provisioner::config::Project;
    let t = Test::new();
    let path = t.path().join("box-config.toml");
    let load = |toml: &str| {
        std::fs::write(&path, toml).unwrap();
        Project::load(&path).unwrap()
    };
    let host = [
        HostNet::new("lo", "127.0.0.1".parse().unwrap(), 8),
        HostNet::new("eth0", "10.10.3.4".parse().unwrap(), 16),
    ];
    let shown = path.display().to_string();
    let p = load(&format!("{BOX}[network]\nsubnet = \"10.10.0.0/24\"\n[[machine]]\nname = \"a\"\n"));
    let (errors, warnings) = p.machines[0].check_host_networks(Ok(&host));
    let errors: Vec<String> = errors.iter().map(|d| d.to_string()).collect();
    assert_eq!(
        errors,
        [format!(
            "{shown}:4:10: subnet 10.10.0.0/24 in [network] overlaps a network this host is on (eth0 10.10.3.4/16): \
             the guests would send that network's traffic into the private segment\nhint: pick a range no network \
             of this host uses, e.g. subnet = \"10.77.0.0/24\""
        )]
    );
    assert!(warnings.is_empty(), "{warnings:?}");
    // The neighbour 10.11.0.0/24 is not on the host: accepted.
    let p = load(&format!("{BOX}[network]\nsubnet = \"10.11.0.0/24\"\n[[machine]]\nname = \"a\"\n"));
    assert_eq!(p.machines[0].check_host_networks(Ok(&host)), (vec![], vec![]));
    // A host on 10.77.0.0/24 is offered the next spare range.
    let on_default = [HostNet::new("wlan0", "10.77.0.99".parse().unwrap(), 24)];
    let p = load(&format!("{BOX}[[machine]]\nname = \"a\"\n"));
    let (errors, _) = p.machines[0].check_host_networks(Ok(&on_default));
    assert!(errors[0].to_string().ends_with("e.g. subnet = \"10.78.0.0/24\""), "{errors:?}");
    // Unreadable networks: a warning, not a refusal.
    let p = load(&format!("{BOX}[network]\nsubnet = \"10.10.0.0/24\"\n[[machine]]\nname = \"a\"\n"));
    let (errors, warnings) = p.machines[0].check_host_networks(Err("getifaddrs failed".into()));
    assert!(errors.is_empty());
    assert_eq!(
        warnings[0].to_string(),
        format!(
            "{shown}:4:10: this host's networks could not be read (getifaddrs failed); subnet 10.10.0.0/24 was not \
             checked against them\nhint: make sure no network of this host (`ip -4 addr`) overlaps [network] subnet"
        )
    );
    // A machine on a remote host: its host's networks are unknown, so a possible overlap is a warning at its uri
    // (this host's overlapping network does not concern it); the local machine is still checked.
    let p = load(&format!(
        "{BOX}[network]\nsubnet = \"10.10.0.0/24\"\n[[machine]]\nname = \"a\"\n[[machine]]\nname = \"b\"\n\
         [machine.libvirt]\nuri = \"qemu+ssh://lab@Far.Example/system\"\n"
    ));
    let (errors, warnings) = p.machines[1].check_host_networks(Ok(&host));
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(
        warnings.iter().map(|d| d.to_string()).collect::<Vec<_>>(),
        [format!(
            "{shown}:10:7: machine \"b\" runs on far.example, whose networks are not known here: none of them may \
             overlap the private subnet 10.10.0.0/24\nhint: list them on far.example with `ip -4 addr`; if one \
             overlaps, pick another [network] subnet"
        )]
    );
    assert_eq!(p.machines[0].check_host_networks(Ok(&host)).0.len(), 1);
}

/// The real reader on this machine: loopback is 127.0.0.1/8 on lo.
#[test]
#[cfg_attr(
    windows,
    ignore = "windows: the host networks are not read there (unknown: the overlap check is for libvirt, Linux-only)"
)]
fn host_networks_reader_finds_loopback() {
    let nets = provisioner::config::hostnet::read().unwrap();
    assert!(
        nets.iter().any(|n| n.interface == "lo" && n.addr.to_string() == "127.0.0.1" && n.prefix == 8),
        "{nets:?}"
    );
}

/// `validate` reads the host's networks itself: in a network namespace of its own whose loopback also holds
/// 10.123.0.1/24, the subnet 10.123.0.0/24 is refused and its neighbour 10.124.0.0/24 accepted.
#[test]
#[cfg_attr(
    windows,
    ignore = "windows: needs a Linux network namespace (unshare) and the host networks, unknown on Windows"
)]
fn validate_refuses_a_subnet_the_host_is_on() {
    let t = Test::new();
    std::fs::create_dir_all(t.path().join("provision")).unwrap();
    let run = |subnet: &str| {
        t.write(
            "box-config.toml",
            format!("{BOX}[network]\nsubnet = \"{subnet}\"\n[[machine]]\nname = \"a\"\n"),
        );
        let script = "ip link set lo up && ip addr add 10.123.0.1/24 dev lo && exec \"$0\" validate";
        let out = std::process::Command::new("unshare")
            .args(["-n", "sh", "-c", script])
            .arg(support::bin())
            .current_dir(t.path())
            .output()
            .expect("run unshare");
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, stderr) = run("10.123.0.0/24");
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.starts_with(
            "error: box-config.toml:4:10: subnet 10.123.0.0/24 in [network] overlaps a network this host is on \
             (lo 10.123.0.1/24)"
        ),
        "{stderr}"
    );
    let (code, stderr) = run("10.124.0.0/24");
    assert_eq!(code, Some(0), "{stderr}");
}
