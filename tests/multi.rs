//! Multi-machine projects through the binary: `[[machine]]` files and their cross-machine rules (positions in
//! messages), machine selection, the parallel `up` (one machine failing leaves the others going) and the `status`
//! table against the VBoxManage double, JSON events naming their machine, and the shipped cluster example's
//! rendered config checked with the real tools (promtool, docker-compose).

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
        let bin = t.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::os::unix::fs::symlink(fixtures.join("VBoxManage"), bin.join("VBoxManage")).unwrap();
        let proj = t.path().join("proj");
        std::fs::create_dir_all(proj.join("box")).unwrap();
        std::fs::create_dir_all(proj.join("provision")).unwrap();
        std::fs::copy(fixtures.join("box.ovf"), proj.join("box/box.ovf")).unwrap();
        std::fs::copy(fixtures.join("box-disk001.vmdk"), proj.join("box/box-disk001.vmdk")).unwrap();
        Project { vbox: bin.join("VBoxManage"), t }
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
fn cluster_example_renders_and_passes_promtool_and_compose() {
    let t = Test::new();
    support::copy_cluster_example(t.path());
    Test::new().cwd(t.path()).arg("validate").run().success().stdout_contains("3 machines");
    let mut services = std::collections::BTreeMap::new();
    for m in ["monitor", "app1", "app2"] {
        let out = t.path().join(format!("out-{m}"));
        Test::new().cwd(t.path()).args(["render", "-m", m, "--out", out.to_str().unwrap()]).run().success();
        tool(&out, "docker-compose", &["config", "-q"]);
        let doc: serde_yaml::Value =
            serde_yaml::from_str(&std::fs::read_to_string(out.join("docker-compose.yml")).unwrap()).unwrap();
        let names: Vec<String> =
            doc["services"].as_mapping().unwrap().keys().map(|k| k.as_str().unwrap().to_string()).collect();
        services.insert(m, names);
    }
    assert_eq!(services["monitor"], ["prometheus", "alertmanager", "grafana"]);
    assert_eq!(services["app1"], ["demo-app", "node-exporter", "cadvisor", "loadgen"]);
    let mon = t.path().join("out-monitor/prometheus");
    tool(&mon, "promtool", &["check", "config", "prometheus.yml"]);
    let prom: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(mon.join("prometheus.yml")).unwrap()).unwrap();
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

/// Issue 16.1 in a `[[machine]]` project: a copy (`cp -a`) shows the recorded VM as another project's in the
/// status table and JSON, and refuses to halt it; the original's VM keeps running.
#[test]
fn a_copied_multi_machine_project_shows_and_refuses_the_original_vm() {
    let p = Project::new();
    p.write(&two_machines(&p.vbox, "", support::free_port()));
    p.run(&["up", "one", "--no-provision", "--boot-timeout", "2"]).failure();
    let copy = p.t.path().join("projcopy");
    assert!(std::process::Command::new("cp").arg("-a").arg(p.dir()).arg(&copy).status().unwrap().success());
    let run = |args: &[&str]| {
        Test::new()
            .cwd(&copy)
            .env("PROVISIONER_CACHE_DIR", p.t.path().join("cache").to_str().unwrap())
            .args(args.iter().copied())
            .run()
    };
    let theirs = std::fs::canonicalize(p.dir()).unwrap().join(".provisioner/machines/one");
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
