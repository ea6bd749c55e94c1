//! The CLI surface: every command declared with help, completions.

use crate::support::Test;

#[test]
fn every_command_has_help() {
    for cmd in [
        "up",
        "ssh",
        "ssh-config",
        "status",
        "port",
        "halt",
        "reload",
        "provision",
        "destroy",
        "validate",
        "render",
        "health",
        "verify",
        "load",
        "box",
        "completions",
    ] {
        let r = Test::new().args([cmd, "--help"]).run().success();
        assert!(r.stdout().contains("Usage:"), "{cmd} --help: {}", r.stdout());
    }
}

#[test]
fn completions_for_bash_name_every_command() {
    let r = Test::new().args(["completions", "bash"]).run().success();
    for cmd in ["up", "destroy", "ssh-config", "health"] {
        assert!(r.stdout().contains(cmd), "bash completion lacks {cmd}");
    }
}

#[test]
fn durations_and_counts_out_of_range_are_usage_errors_not_panics() {
    let huge = "18446744073709551615";
    for args in [
        vec!["health", "--timeout", huge],
        vec!["up", "--boot-timeout", huge],
        vec!["halt", "--timeout", huge],
        vec!["verify", "--timeout", huge],
        vec!["load", "--duration", huge],
        vec!["health", "--timeout", "0"],
        vec!["load", "--requests", "0"],
        vec!["load", "--concurrency", "100000"],
    ] {
        let r = Test::with_lab().args(args.clone()).run();
        assert_eq!(r.code(), Some(2), "{args:?}: {}", r.stderr());
        assert!(r.stderr().contains("is not in 1..="), "{args:?}: {}", r.stderr());
        assert!(!r.stderr().contains("panicked"), "{args:?}: {}", r.stderr());
    }
}

/// A project whose state.json says a libvirt machine exists, and a script that leaves a mark when run.
fn project_with_state(uri_in_state: Option<&str>) -> (Test, std::path::PathBuf) {
    let t = Test::with_lab();
    let mark = t.path().join("ran");
    let script = t.path().join("evil.sh");
    std::fs::write(&script, format!("#!/bin/sh\ntouch {}\n", mark.display())).unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut state = serde_json::json!({"provider": "libvirt", "vm_name": "provisioner-lab-0badc0de"});
    if let Some(uri) = uri_in_state {
        state["libvirt_uri"] = uri.replace("SCRIPT", script.to_str().unwrap()).into();
    }
    t.write(".provisioner/state.json", state.to_string());
    (t, mark)
}

#[test]
fn no_libvirt_uri_runs_a_program_from_state_json_or_a_broken_config() {
    // From state.json (read when box-config.toml does not validate).
    let (t, mark) = project_with_state(Some("qemu+ext:///session?command=SCRIPT"));
    let cfg = std::fs::read_to_string(t.path().join("box-config.toml")).unwrap();
    t.write("box-config.toml", cfg.replace("cpus = 2", "cpus = 0"));
    let r = Test::new().cwd(t.path()).arg("status").run().failure();
    assert!(r.stderr().contains(".provisioner/state.json records the libvirt URI"), "{}", r.stderr());
    assert!(r.stderr().contains("`ext` transport") && r.stderr().contains("hint:"), "{}", r.stderr());
    assert!(!mark.exists(), "status ran the program named in state.json");

    // From a box-config.toml that no longer validates (status reads the URI leniently).
    let (t, mark) = project_with_state(None);
    let script = mark.parent().unwrap().join("evil.sh");
    let uri = format!("uri = \"qemu+ssh://h/system?command={}\"", script.display());
    t.write(
        "box-config.toml",
        cfg.replace("cpus = 2", "cpus = 0").replace("uri = \"qemu:///session\"", &uri),
    );
    for cmd in ["status", "halt"] {
        let r = Test::new().cwd(t.path()).arg(cmd).run().failure();
        assert!(r.stderr().contains("has the parameter `command`"), "{cmd}: {}", r.stderr());
        assert!(!mark.exists(), "{cmd} ran the program named in the config");
    }
}

#[test]
fn ssh_config_refuses_aliases_openssh_cannot_use() {
    for bad in ["#lab", "lab=x", "a b", "-oProxyCommand=x", "lab*", "lab\u{1b}[2J", ""] {
        let r = Test::with_lab().args(["ssh-config".to_string(), format!("--host={bad}")]).run().failure();
        assert!(r.stderr().contains("is not a usable OpenSSH host alias"), "{bad:?}: {}", r.stderr());
        assert!(r.stderr().contains("hint:") && !r.stderr().contains('\u{1b}'), "{bad:?}: {}", r.stderr());
    }
}

/// A stopped domain in the session libvirt named like a provisioner machine; undefined on drop.
struct Domain(String);

impl Domain {
    fn define(name: &str) -> Domain {
        crate::support::session_libvirt();
        let xml = format!(
            "<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>\
             <os><type arch='x86_64'>hvm</type></os></domain>"
        );
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), xml).unwrap();
        let out = std::process::Command::new("virsh")
            .args(["-q", "-c", "qemu:///session", "define", "--"])
            .arg(file.path())
            .output()
            .expect("virsh (scripts/host-deps.sh installs libvirt)");
        assert!(out.status.success(), "virsh define: {}", String::from_utf8_lossy(&out.stderr));
        Domain(name.to_string())
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        let _ = std::process::Command::new("virsh")
            .args(["-q", "-c", "qemu:///session", "undefine", "--", &self.0])
            .output();
    }
}

#[test]
fn status_and_port_list_the_forwarded_ports() {
    let t = Test::with_lab();
    let name = format!("provisioner-lab-{:08x}", std::process::id());
    let _domain = Domain::define(&name);
    let state = serde_json::json!({"provider": "libvirt", "vm_name": name, "ssh_host": "127.0.0.1",
                                   "ssh_port": 2299, "libvirt_uri": "qemu:///session"});
    t.write(".provisioner/state.json", state.to_string());
    let run = |args: &[&str]| Test::new().cwd(t.path()).args(args.iter().copied()).run();
    let r = run(&["status"]).success();
    let out = r.stdout();
    assert!(out.starts_with("lab: stopped (libvirt)\nforwarded ports:\n"), "{out}");
    assert!(out.contains("   22 (guest) => 127.0.0.1:2299"), "the recorded SSH port: {out}");
    assert!(out.contains(" 8000 (guest) => 127.0.0.1:8000") && out.contains("demo-app"), "{out}");
    let r = run(&["status", "--json"]).success();
    let doc: serde_json::Value = serde_json::from_str(r.stdout().trim()).unwrap();
    assert_eq!(
        doc["forwards"][0],
        serde_json::json!({"name": "ssh", "guest": 22, "host": 2299, "host_ip": "127.0.0.1", "protocol": "tcp"})
    );
    assert!(doc["forwards"].as_array().unwrap().len() > 1);
    // `port` like `vagrant port`: the list, or one guest port's host port.
    run(&["port"]).success().stdout_contains("   22 (guest) => 127.0.0.1:2299");
    assert_eq!(run(&["port", "--guest", "22"]).success().stdout(), "2299\n");
    run(&["port", "--guest", "1234"]).failure().stderr_contains("guest port 1234").stderr_contains("hint:");
}

/// scripts/up's install step (scripts/install), run for real into a fake prefix: the binary lands in PREFIX/bin,
/// a shell with that on PATH runs `provisioner` from any directory, and the message names the command to type
/// (the bare name when PATH finds it, the full path when it does not). scripts/up runs this step after its build.
#[test]
fn the_install_step_puts_provisioner_on_path() {
    let t = Test::new();
    let prefix = t.path().join("prefix");
    let install = |path: &str, bin: &std::path::Path| {
        std::process::Command::new("bash")
            .arg(crate::support::repo().join("scripts/install"))
            .arg(bin)
            .env("PREFIX", &prefix)
            .env("PATH", path)
            .output()
            .unwrap()
    };
    let on_path = format!("{}:/usr/bin:/bin", prefix.join("bin").display());
    let out = install(&on_path, &crate::support::bin());
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    let dest = prefix.join("bin/provisioner");
    assert_eq!(text.trim_end(), format!("installed {}: type `provisioner`", dest.display()));
    assert_eq!(
        std::fs::read(&dest).unwrap(),
        std::fs::read(crate::support::bin()).unwrap(),
        "a copy of the build"
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&dest).unwrap().permissions().mode() & 0o777, 0o755);
    // The next step of the README, as a user's shell runs it: found by name, from another directory.
    let v = std::process::Command::new("sh")
        .args(["-c", "provisioner --version"])
        .current_dir(t.path())
        .env("PATH", &on_path)
        .output()
        .unwrap();
    assert!(v.status.success() && String::from_utf8_lossy(&v.stdout).starts_with("provisioner "), "{v:?}");

    // Installed again (an update) with the prefix not on PATH: the message gives the full path to type.
    let out = install("/usr/bin:/bin", &crate::support::bin());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains(&format!("type `{}`", dest.display())), "{text}");

    // Nothing built: an error that says what to do, nothing installed over the good copy.
    let out = install(&on_path, &t.path().join("missing"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("hint: build it first"), "{err}");
    assert_eq!(std::fs::read(&dest).unwrap(), std::fs::read(crate::support::bin()).unwrap());

    // scripts/up runs this step right after its release build, and runs `up` from the installed binary.
    let up = std::fs::read_to_string(crate::support::repo().join("scripts/up")).unwrap();
    let build = up.find("cargo build --release --locked").unwrap();
    let step = up.find("bash scripts/install target/release/provisioner").expect("scripts/up installs");
    assert!(build < step && up[step..].contains("\"$dest\" up \"$@\""), "{up}");
}
