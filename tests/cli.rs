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
    #[cfg(unix)]
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut state = serde_json::json!({"provider": "libvirt", "vm_name": "provisioner-lab-0badc0de"});
    if let Some(uri) = uri_in_state {
        state["libvirt_uri"] = uri.replace("SCRIPT", script.to_str().unwrap()).into();
    }
    t.write(".provisioner/state.json", state.to_string());
    (t, mark)
}

#[test]
#[cfg_attr(
    windows,
    ignore = "windows: a libvirt machine in state.json and a /bin/sh script (libvirt is Linux-only)"
)]
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
    /// The domain `name` whose provisioner marker names the state dir `.provisioner` of `project`.
    fn define(name: &str, project: &std::path::Path) -> Domain {
        let dir = std::fs::canonicalize(project).unwrap_or(project.to_path_buf()).join(".provisioner");
        crate::support::session_libvirt();
        let xml = format!(
            "<domain type='qemu'><name>{name}</name><metadata><provisioner:machine xmlns:provisioner='{}'>\
             <provisioner:state-dir>{}</provisioner:state-dir></provisioner:machine></metadata>\
             <memory unit='MiB'>64</memory><os><type arch='x86_64'>hvm</type></os></domain>",
            provisioner::provider::libvirt::METADATA_NS,
            dir.display()
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
#[cfg_attr(windows, ignore = "windows: needs libvirt (virsh), which is Linux-only")]
fn status_and_port_list_the_forwarded_ports() {
    let t = Test::with_lab();
    let name = format!("provisioner-lab-{:08x}", std::process::id());
    let _domain = Domain::define(&name, t.path());
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

/// How the child's stdout or stderr is broken.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Broken {
    /// A pipe whose read end was closed before the child started (`provisioner status | head -0`).
    StdoutPipe,
    /// The same for stderr (`provisioner validate 2>&1 >/dev/null | true`).
    StderrPipe,
    /// No stderr at all (`2>&-`).
    StderrClosed,
}

/// Run the binary in `dir` with one output broken; the other one is captured.
#[cfg(unix)]
fn run_broken(dir: &std::path::Path, args: &[&str], broken: Option<Broken>) -> std::process::Output {
    use std::process::{Command, Stdio};
    let mut c = if broken == Some(Broken::StderrClosed) {
        let mut c = Command::new("sh");
        c.args(["-c", "exec \"$0\" \"$@\" 2>&-"]).arg(crate::support::bin()).args(args);
        c
    } else {
        let mut c = Command::new(crate::support::bin());
        c.args(args);
        c
    };
    c.current_dir(dir)
        .env("PROVISIONER_CACHE_DIR", dir.join("cache"))
        .env("PROVISIONER_SSH_REUSE", "0")
        .env("RUST_BACKTRACE", "1")
        // The progress printer's thread writes too (`... health 1s: waiting for ...`).
        .env("PROVISIONER_PROGRESS_SECS", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut fds = [0; 2];
    // SAFETY: pipe(2) fills both descriptors, each then owned once.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0, "pipe");
    let (reader, writer) = unsafe {
        use std::os::fd::FromRawFd;
        (std::os::fd::OwnedFd::from_raw_fd(fds[0]), std::os::fd::OwnedFd::from_raw_fd(fds[1]))
    };
    drop(reader);
    match broken {
        Some(Broken::StdoutPipe) => c.stdout(writer),
        Some(Broken::StderrPipe) => c.stderr(writer),
        _ => &mut c,
    };
    c.output().expect("run provisioner")
}

/// Unix pipes only: the test that breaks outputs is skipped on Windows.
#[cfg(windows)]
fn run_broken(_dir: &std::path::Path, _args: &[&str], _broken: Option<Broken>) -> std::process::Output {
    unreachable!("breaks outputs with Unix pipes")
}

#[test]
#[cfg_attr(windows, ignore = "windows: breaks stdout/stderr with Unix pipes")]
fn a_closed_stdout_or_stderr_never_panics_in_any_command() {
    let single = Test::with_lab();
    let cluster = Test::new();
    crate::support::copy_cluster_example(cluster.path());
    // Every command that prints without a VM: its data on stdout, its messages (and errors) on stderr.
    let commands: &[(&Test, &[&str])] = &[
        (&single, &["validate"]),
        (&single, &["validate", "--json"]),
        (&single, &["render", "--out", "r1"]),
        (&single, &["render", "--out", "r2", "--json"]),
        (&single, &["status"]),
        (&single, &["status", "--json"]),
        (&single, &["port"]),
        (&single, &["port", "--json"]),
        (&single, &["ssh-config"]),
        (&single, &["halt"]),
        (&single, &["health", "--timeout", "2"]),
        (&single, &["verify", "--timeout", "1"]),
        (&single, &["load", "--duration", "1"]),
        (&single, &["provision"]),
        (&single, &["box", "list"]),
        (&single, &["box", "list", "--json"]),
        (&single, &["snapshot", "list"]),
        (&single, &["suspend"]),
        (&single, &["resume"]),
        (&single, &["package"]),
        (&single, &["completions", "bash"]),
        (&single, &["--help"]),
        (&single, &["help", "status"]),
        (&single, &["--version"]),
        (&single, &["nonsense"]),
        (&cluster, &["validate"]),
        (&cluster, &["status"]),
        (&cluster, &["status", "--json"]),
        (&cluster, &["halt"]),
    ];
    for (t, args) in commands {
        // The same command with both outputs read: its own exit code, and whether it writes data to stdout.
        let normal = run_broken(t.path(), args, None);
        let code = normal.status.code().expect("exit code");
        let clap = args.iter().any(|a| a.starts_with("--help") || *a == "help" || *a == "--version");
        for broken in [Broken::StdoutPipe, Broken::StderrPipe, Broken::StderrClosed] {
            let out = run_broken(t.path(), args, Some(broken));
            let stderr = String::from_utf8_lossy(&out.stderr);
            let what = format!("{args:?} with {broken:?}: {:?}\n{stderr}", out.status);
            assert!(!stderr.contains("panicked"), "{what}");
            // A closed stdout under data a successful command wrote: 141 as a shell shows SIGPIPE; clap's own
            // output (help, version) exits as clap does; otherwise the command's own code.
            let expected = if broken == Broken::StdoutPipe && code == 0 && !normal.stdout.is_empty() && !clap
            {
                141
            } else {
                code
            };
            assert_eq!(out.status.code(), Some(expected), "{what}");
            if broken == Broken::StdoutPipe {
                assert!(!stderr.contains("writing to stdout failed"), "a closed pipe is quiet: {what}");
            }
        }
    }
    // Another failure to write stdout is an error that says so.
    let full = std::process::Command::new(crate::support::bin())
        .arg("validate")
        .current_dir(single.path())
        .stdout(std::fs::File::options().write(true).open("/dev/full").unwrap())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&full.stderr);
    assert_eq!(full.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("error: writing to stdout failed: No space left on device"), "{stderr}");
    assert!(stderr.contains("hint:") && !stderr.contains("panicked"), "{stderr}");
}

/// What `virsh -c qemu:///session ARGS` prints (it must succeed).
fn virsh(args: &[&str]) -> String {
    let out = std::process::Command::new("virsh")
        .args(["-q", "-c", "qemu:///session"])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "virsh {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Issue 16.1 on libvirt: a copied project (`cp -a`, `.provisioner/` included) whose state.json records a domain
/// whose `<metadata>` names the original project's state dir refuses every command that acts on a VM, `status`
/// says the recorded VM belongs to another project, `destroy -f` only forgets the copied state; a domain naming a
/// state dir that no longer exists (a moved project) is refused by `destroy` too. The domain is never touched.
#[test]
#[cfg_attr(windows, ignore = "windows: needs libvirt (virsh), which is Linux-only")]
fn a_copied_project_never_acts_on_the_original_libvirt_domain() {
    let t = Test::with_lab();
    let orig = t.path().join("proj");
    std::fs::create_dir_all(&orig).unwrap();
    for f in ["box-config.toml", "provision"] {
        std::fs::rename(t.path().join(f), orig.join(f)).unwrap();
    }
    let name = provisioner::machine::identity::MachineId::new(&orig, "lab").unwrap().vm_name().to_string();
    let _domain = Domain::define(&name, &orig);
    let state = serde_json::json!({"provider": "libvirt", "vm_name": name, "ssh_host": "127.0.0.1",
                                   "ssh_port": 2299, "libvirt_uri": "qemu:///session"});
    std::fs::create_dir_all(orig.join(".provisioner")).unwrap();
    std::fs::write(orig.join(".provisioner/state.json"), state.to_string()).unwrap();
    std::fs::write(orig.join(".provisioner/host_ed25519.pub"), "ssh-ed25519 AAAA").unwrap();
    let copy = t.path().join("projcopy");
    assert!(std::process::Command::new("cp").arg("-a").arg(&orig).arg(&copy).status().unwrap().success());
    let run = |dir: &std::path::Path, args: &[&str]| Test::new().cwd(dir).args(args.iter().copied()).run();
    let theirs = std::fs::canonicalize(&orig).unwrap();
    let ours = std::fs::canonicalize(&copy).unwrap().join(".provisioner");
    let refusal = format!(
        "error: the libvirt domain {name} recorded in {}/state.json belongs to another project (state dir {}), \
         not to this one; it was left untouched\nhint: this project's .provisioner/ is a copy of that project's: \
         manage that VM from {}; `provisioner up` here creates this project's own VM, `provisioner destroy -f` \
         here forgets the copied state (the other VM stays)\n",
        ours.display(),
        theirs.join(".provisioner").display(),
        theirs.display()
    );
    let out = copy.join("copy.box");
    for args in crate::support::vm_commands(out.to_str().unwrap(), &[]) {
        let r = run(&copy, &args).failure();
        assert_eq!(r.stderr(), refusal, "{args:?}");
    }
    assert_eq!(virsh(&["domstate", &name]).trim(), "shut off");
    assert_eq!(virsh(&["snapshot-list", "--domain", &name, "--name"]).trim(), "");
    assert!(!out.exists());

    let r = run(&copy, &["status"]).success();
    let hint = refusal.lines().last().unwrap();
    let theirs_state = theirs.join(".provisioner");
    assert_eq!(
        r.stdout(),
        format!(
            "lab: recorded VM belongs to another project (state dir {})\n{hint}\n",
            theirs_state.display()
        )
    );
    let doc: serde_json::Value =
        serde_json::from_str(run(&copy, &["--json", "status"]).success().stdout().trim()).unwrap();
    assert_eq!(
        (&doc["state"], &doc["owner"], &doc["vm_name"]),
        (&"foreign".into(), &theirs_state.to_str().unwrap().into(), &name.clone().into()),
        "{doc}"
    );
    assert!(run(&orig, &["status"]).success().stdout().starts_with("lab: stopped (libvirt)\n"));

    // destroy -f in the copy forgets the copied state; the domain stays.
    run(&copy, &["destroy", "-f"]).success().stderr_contains("left untouched");
    assert!(!copy.join(".provisioner").exists());
    assert_eq!(virsh(&["domstate", &name]).trim(), "shut off");

    // A moved project: the marker names a state dir that is gone; even destroy refuses, saying what to do.
    let moved = t.path().join("moved");
    std::fs::rename(&orig, &moved).unwrap();
    let ours = std::fs::canonicalize(&moved).unwrap().join(".provisioner");
    let moved_refusal = format!(
        "error: the libvirt domain {name} recorded in {}/state.json belongs to another project (state dir {}, which \
         no longer exists), not to this one; it was left untouched\nhint: if this project was moved from there, \
         move it back to manage that VM; to let it go, remove it yourself (`virsh undefine {name}`), then \
         `provisioner destroy -f` here\n",
        ours.display(),
        theirs_state.display()
    );
    for args in [vec!["halt"], vec!["destroy", "-f"]] {
        assert_eq!(run(&moved, &args).failure().stderr(), moved_refusal, "{args:?}");
    }
    run(&moved, &["status"]).success().stdout_contains("which no longer exists");
    assert_eq!(virsh(&["domstate", &name]).trim(), "shut off");
}

/// Issue 16.7: the lock message tells the truth in both cases: with the holder's PID it says how to stop it; when
/// the holder wrote none (yet), it says so and how to find the process, instead of pointing at a PID "above".
#[test]
fn a_held_lock_names_its_pid_or_says_how_to_find_the_holder() {
    let t = Test::with_lab();
    let state = t.path().join(".provisioner");
    std::fs::create_dir_all(&state).unwrap();
    let lock = std::fs::canonicalize(&state).unwrap().join("lock");
    // Windows: the product shows the path without std's `\\?\` verbatim prefix, and Windows' tools in hints.
    let lock = std::path::PathBuf::from(lock.to_string_lossy().trim_start_matches(r"\\?\"));
    let mut held = match provisioner::machine::lock::try_lock(&lock).unwrap() {
        Ok(f) => f,
        Err(_) => panic!("the lock is free"),
    };
    let run = || Test::new().cwd(t.path()).args(["halt"]).run().failure().stderr();
    assert_eq!(
        run(),
        format!(
            "error: another process holds the lock on this machine and has not written its PID into the lock file \
             {} (it may have only just started)\nhint: wait for it to finish, then run again; {}\n",
            lock.display(),
            if cfg!(windows) {
                "Resource Monitor (`resmon`, CPU tab, Associated Handles) finds which process holds lock".to_string()
            } else {
                format!("`fuser -v {}` shows which process holds it", lock.display())
            }
        )
    );
    provisioner::machine::lock::write_holder(&mut held, "pid 4242 (up)").unwrap();
    assert_eq!(
        run(),
        format!(
            "error: another provisioner command holds the lock on this machine: pid 4242 (up) (lock file {})\nhint: \
             wait for it to finish, or stop it (`{}`), then run again\n",
            lock.display(),
            if cfg!(windows) { "taskkill /PID 4242" } else { "kill 4242" }
        )
    );
}

/// scripts/up's install step (scripts/install), run for real into a fake prefix: the binary lands in PREFIX/bin,
/// a shell with that on PATH runs `provisioner` from any directory, and the message names the command to type
/// (the bare name when PATH finds it, the full path when it does not). scripts/up runs this step after its build.
#[test]
#[cfg_attr(windows, ignore = "windows: runs scripts/install with bash and sh")]
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
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&dest).unwrap().permissions().mode() & 0o777, 0o755);
    }
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
    let step = up
        .find("bash scripts/install \"${CARGO_TARGET_DIR:-target}/release/provisioner\"")
        .expect("scripts/up installs what cargo built, in CARGO_TARGET_DIR when set");
    assert!(build < step && up[step..].contains("\"$dest\" up \"$@\""), "{up}");
}

/// scripts/up overlaps the host packages with the release build: with stand-ins for apt-get, dpkg-query and cargo
/// (each waits, within a deadline, for the other to have started, so a sequential script fails), the build's own
/// packages come first, the rest install while cargo runs, their output follows the build's, and a failed install
/// stops scripts/up with that output.
#[test]
#[cfg_attr(windows, ignore = "windows: runs scripts/up with bash and POSIX stand-ins")]
fn scripts_up_installs_the_host_packages_while_cargo_builds() {
    let t = Test::new();
    let repo = t.path().join("repo");
    std::fs::create_dir_all(repo.join("scripts")).unwrap();
    for f in ["up", "host-deps.sh", "install"] {
        std::fs::copy(crate::support::repo().join("scripts").join(f), repo.join("scripts").join(f)).unwrap();
    }
    let fakes = t.path().join("fakes");
    std::fs::create_dir(&fakes).unwrap();
    let marks = t.path().join("marks");
    std::fs::create_dir(&marks).unwrap();
    let m = marks.display();
    // Polls for the other side with a 20 s deadline (0.05 s steps): stand-ins, not the code under test.
    let wait_for = |file: &str, why: &str| {
        format!(
            "i=0; while [ ! -e {m}/{file} ]; do i=$((i+1)); if [ $i -gt 400 ]; then echo \"{why}\" >&2; exit 1; fi; \
             sleep 0.05; done"
        )
    };
    let scripts = [
        ("dpkg-query", "#!/bin/sh\nexit 1\n".to_string()),
        ("tee", "#!/bin/sh\ncat >/dev/null\n".to_string()),
        (
            "apt-get",
            format!(
                "#!/bin/sh\ncase \" $* \" in *\" update \"*) exit 0;; esac\n\
                 case \" $* \" in *\" openssh-server \"*) ;; *) echo \"build-deps $([ -e {m}/cargo ] && echo late)\" >>{m}/order; exit 0;; esac\n\
                 echo apt >>{m}/order; touch {m}/apt\n{}\necho 'E: stand-in apt failed' >&2\nexit ${{APT_EXIT:-0}}\n",
                wait_for("cargo", "apt ran alone: cargo never started")
            ),
        ),
        (
            "cargo",
            format!(
                "#!/bin/sh\necho cargo >>{m}/order; touch {m}/cargo\n{}\nmkdir -p target/release\n\
                 printf '#!/bin/sh\\necho \"stand-in provisioner $*\"\\n' >target/release/provisioner\n\
                 chmod 755 target/release/provisioner\n",
                wait_for("apt", "cargo ran alone: the host packages were not installing")
            ),
        ),
    ];
    for (name, text) in scripts {
        let p = fakes.join(name);
        std::fs::write(&p, text).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    }
    let up = |apt_exit: &str| {
        for f in ["order", "apt", "cargo"] {
            let _ = std::fs::remove_file(marks.join(f));
        }
        std::process::Command::new("bash")
            .arg(repo.join("scripts/up"))
            .env("PATH", format!("{}:/usr/bin:/bin", fakes.display()))
            .env("PREFIX", t.path().join("prefix"))
            .env("TMPDIR", t.path())
            .env("APT_EXIT", apt_exit)
            .output()
            .unwrap()
    };

    let out = up("0");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let order = std::fs::read_to_string(marks.join("order")).unwrap();
    assert_eq!(
        order.lines().next(),
        Some("build-deps "),
        "the build's packages first, before cargo: {order}"
    );
    assert!(
        stdout.contains("up: installing the host packages in the background while provisioner builds"),
        "{stdout}"
    );
    // The background install's output is shown after the build, each line marked.
    let built = stdout.find("up: cargo build took").expect("build time line");
    let deps = stdout.find("up: host-deps: installed").expect("host-deps output");
    assert!(built < deps, "{stdout}");
    assert!(
        stdout.contains("stand-in provisioner up"),
        "scripts/up ran `up` from the installed binary: {stdout}"
    );

    let out = up("100");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("up: installing the host packages failed")
            && stderr.contains("E: stand-in apt failed"),
        "{stderr}"
    );
    assert!(!stdout.contains("stand-in provisioner up"), "no `up` after a failed install: {stdout}");
}

/// `provisioner __reap -- CMD` (how the tool starts a local libvirt daemon) adopts what CMD disowns and reaps it
/// the moment it exits: the daemon's QEMUs are not left as zombies for an init that reaps late. Here CMD leaves a
/// `sleep` behind and exits: that orphan's parent must be the reaper (PID 1 without the feature), and once it is
/// killed the reaper must reap it and exit 0 on its own.
#[test]
#[cfg_attr(not(target_os = "linux"), ignore = "Linux only: a child subreaper is a Linux prctl")]
fn the_daemon_reaper_adopts_what_its_command_disowns_and_exits_when_all_is_reaped() {
    use std::time::Duration;
    let t = Test::new();
    let pidfile = t.path().join("orphan.pid");
    let mut reaper = std::process::Command::new(crate::support::bin())
        .args(["__reap", "--", "sh", "-c"])
        .arg(format!(
            "sleep 600 </dev/null >/dev/null 2>&1 & echo $! > {}.tmp && mv {0}.tmp {0}",
            pidfile.display()
        ))
        .spawn()
        .unwrap();
    let orphan: u32 = crate::support::wait_until(Duration::from_secs(10), "the command's orphan pid", || {
        std::fs::read_to_string(&pidfile).ok()?.trim().parse().ok()
    });
    let parent = |pid: u32| -> Option<u32> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
    };
    // The shell has exited (it wrote the file as its last act): its orphan is ours once it is reparented.
    crate::support::wait_until(Duration::from_secs(10), "the orphan to be adopted by the reaper", || {
        (parent(orphan)? == reaper.id()).then_some(())
    });
    assert!(reaper.try_wait().unwrap().is_none(), "the reaper exited while a descendant still ran");
    std::process::Command::new("kill").arg(orphan.to_string()).status().unwrap();
    let status = crate::support::wait_until(Duration::from_secs(10), "the reaper to exit", || {
        reaper.try_wait().unwrap()
    });
    assert!(status.success(), "reaper: {status}");
    assert!(
        !std::path::Path::new(&format!("/proc/{orphan}")).exists(),
        "the orphan was left unreaped (a zombie or still running)"
    );
}

/// `global-status`, run outside any project, lists this tool's machines on the session libvirt: one whose project
/// exists, and one whose project directory was deleted (marked gone); a domain named like ours but without the
/// marker is not listed. `--prune` asks first (refused without a terminal unless -f), then destroys only the
/// machine whose project is gone. (It would also destroy any other such orphan on this computer's session libvirt:
/// a machine no project can reach any more.)
#[test]
#[cfg_attr(windows, ignore = "windows: needs libvirt (virsh), which is Linux-only")]
fn global_status_lists_the_machines_of_every_project_and_prune_destroys_the_orphans() {
    let id = std::process::id();
    let live = tempfile::tempdir().unwrap();
    let parent = tempfile::tempdir().unwrap();
    let deleted = parent.path().join("a deleted project");
    std::fs::create_dir_all(&deleted).unwrap();
    let (kept, orphan, foreign) = (
        format!("provisioner-kept-{id:08x}"),
        format!("provisioner-orphan-{id:08x}"),
        format!("provisioner-foreign-{id:08x}"),
    );
    let _kept = Domain::define(&kept, live.path());
    let _orphan = Domain::define(&orphan, &deleted);
    std::fs::remove_dir_all(&deleted).unwrap();
    let _foreign = {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(
            file.path(),
            format!("<domain type='qemu'><name>{foreign}</name><memory unit='MiB'>64</memory><os><type arch='x86_64'>hvm</type></os></domain>"),
        )
        .unwrap();
        let out = std::process::Command::new("virsh")
            .args(["-q", "-c", "qemu:///session", "define", "--"])
            .arg(file.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "virsh define: {}", String::from_utf8_lossy(&out.stderr));
        Domain(foreign.clone())
    };
    let elsewhere = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| Test::new().cwd(elsewhere.path()).args(args.iter().copied()).run();
    let defined = |name: &str| {
        std::process::Command::new("virsh")
            .args(["-q", "-c", "qemu:///session", "domstate", "--", name])
            .output()
            .unwrap()
            .status
            .success()
    };

    let r = run(&["global-status"]).success();
    let out = r.stdout();
    let line =
        |vm: &str| out.lines().find(|l| l.ends_with(vm)).unwrap_or_else(|| panic!("{vm} not listed: {out}"));
    let live_dir = std::fs::canonicalize(live.path()).unwrap();
    assert!(out.starts_with("MACHINE "), "{out}");
    let k = line(&kept);
    assert!(
        k.starts_with("kept ") && k.contains(" stopped ") && k.contains(" libvirt qemu:///session "),
        "{k}"
    );
    assert!(k.contains(&format!(" {} ", live_dir.display())) && !k.contains("(gone)"), "{k}");
    let o = line(&orphan);
    assert!(o.starts_with("orphan ") && o.contains(&format!("{} (gone)", deleted.display())), "{o}");
    assert!(!out.contains(&foreign), "a domain without the marker is not ours: {out}");
    r.stderr_contains("whose project directory is gone").stderr_contains("global-status --prune");

    let r = run(&["--json", "global-status"]).success();
    let doc: serde_json::Value = serde_json::from_str(r.stdout().trim()).unwrap();
    let entry =
        |vm: &str| doc["machines"].as_array().unwrap().iter().find(|m| m["vm_name"] == vm).cloned().unwrap();
    assert_eq!(entry(&kept)["project_exists"], true);
    assert_eq!(entry(&kept)["state"], "stopped");
    assert_eq!(entry(&orphan)["project_exists"], false);
    assert_eq!(entry(&orphan)["machine"], "orphan");
    assert_eq!(entry(&orphan)["project"], deleted.display().to_string());

    run(&["global-status", "--prune"]).failure().stderr_contains("provisioner global-status --prune -f");
    assert!(defined(&orphan), "nothing is destroyed without confirmation");
    run(&["global-status", "--prune", "-f"]).success().stderr_contains(&format!("destroyed {orphan}"));
    assert!(!defined(&orphan), "the machine whose project is gone was destroyed");
    assert!(defined(&kept) && defined(&foreign), "the others were left as they were");
    run(&["global-status", "--prune", "-f"]).success().stderr_contains("nothing to prune");
}
