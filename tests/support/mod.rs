//! Shared fixtures: a fluent `Test` builder around the real binary, deadline-bounded waits, free ports, and a
//! process registry that kills what a test started (by PID, process group) and dumps its log on failure.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The repository root.
/// Every command that acts on a machine's VM (issue 16: each must refuse a VM that belongs to another project),
/// `package` writing to `out`, and `load` with `load_args` before its request count.
pub fn vm_commands<'a>(out: &'a str, load_args: &[&'a str]) -> Vec<Vec<&'a str>> {
    let mut load = vec!["load"];
    load.extend_from_slice(load_args);
    load.extend(["--requests", "1"]);
    vec![
        vec!["halt"],
        vec!["halt", "-f"],
        vec!["suspend"],
        vec!["resume"],
        vec!["snapshot", "save", "s2"],
        vec!["snapshot", "restore", "s1"],
        vec!["snapshot", "delete", "s1"],
        vec!["snapshot", "list"],
        vec!["reload"],
        vec!["provision"],
        vec!["ssh", "-c", "true"],
        vec!["ssh-config"],
        vec!["port"],
        vec!["health", "--timeout", "1"],
        vec!["verify", "--timeout", "1"],
        load,
        vec!["package", "--out", out],
    ]
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Path of the built binary.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_provisioner"))
}

/// A run of the real binary in a temp dir: `Test::new().arg("validate").run().success()`.
pub struct Test {
    pub dir: tempfile::TempDir,
    args: Vec<String>,
    env: Vec<(String, String)>,
    stdin: Option<Vec<u8>>,
    cwd: Option<PathBuf>,
}

impl Test {
    pub fn new() -> Self {
        Self { dir: tempfile::tempdir().expect("tempdir"), args: vec![], env: vec![], stdin: None, cwd: None }
    }
    /// A temp dir holding a copy of the repo's box-config.toml and provision/ tree.
    pub fn with_lab() -> Self {
        let t = Self::new();
        copy_dir(&repo().join("provision"), &t.dir.path().join("provision"));
        std::fs::copy(repo().join("box-config.toml"), t.dir.path().join("box-config.toml"))
            .expect("copy config");
        t
    }
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
    pub fn write(&self, rel: &str, contents: impl AsRef<[u8]>) -> &Self {
        let p = self.dir.path().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, contents).unwrap();
        self
    }
    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }
    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, it: I) -> Self {
        self.args.extend(it.into_iter().map(Into::into));
        self
    }
    pub fn env(mut self, k: &str, v: impl Into<String>) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }
    pub fn stdin(mut self, s: impl Into<Vec<u8>>) -> Self {
        self.stdin = Some(s.into());
        self
    }
    pub fn cwd(mut self, p: impl Into<PathBuf>) -> Self {
        self.cwd = Some(p.into());
        self
    }
    /// Run (with a 20-minute hard deadline) and return the result for assertions.
    pub fn run(&self) -> Run {
        use std::io::Write;
        let mut c = Command::new(bin());
        c.args(&self.args).current_dir(self.cwd.as_deref().unwrap_or(self.dir.path()));
        c.env("PROVISIONER_CACHE_DIR", cache_dir());
        // No OpenSSH master outlives a test by default: a throwaway sshd's session survives its listener, and a
        // master on it would linger for ControlPersist. Tests of connection reuse set it to 1.
        c.env("PROVISIONER_SSH_REUSE", "0");
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c.stdin(if self.stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().expect("spawn provisioner");
        if let Some(data) = &self.stdin {
            child.stdin.take().unwrap().write_all(data).unwrap();
        }
        let out = child.wait_with_output().expect("wait provisioner");
        Run { out, args: self.args.clone() }
    }
}

/// The box cache shared by tests (and across CI runs): `$PROVISIONER_CACHE_DIR` or ~/.cache/provisioner.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("PROVISIONER_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| dirs_home().join(".cache/provisioner"))
}

fn dirs_home() -> PathBuf {
    std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/root"))
}

pub struct Run {
    pub out: Output,
    args: Vec<String>,
}

impl Run {
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.stdout).into_owned()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.out.stderr).into_owned()
    }
    pub fn code(&self) -> Option<i32> {
        self.out.status.code()
    }
    fn describe(&self) -> String {
        format!(
            "provisioner {:?} -> {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.args,
            self.out.status,
            self.stdout(),
            self.stderr()
        )
    }
    #[track_caller]
    pub fn success(self) -> Self {
        assert!(self.out.status.success(), "expected success: {}", self.describe());
        self
    }
    #[track_caller]
    pub fn failure(self) -> Self {
        assert!(!self.out.status.success(), "expected failure: {}", self.describe());
        self
    }
    #[track_caller]
    pub fn stderr_contains(self, s: &str) -> Self {
        assert!(self.stderr().contains(s), "stderr lacks {s:?}: {}", self.describe());
        self
    }
    #[track_caller]
    pub fn stdout_contains(self, s: &str) -> Self {
        assert!(self.stdout().contains(s), "stdout lacks {s:?}: {}", self.describe());
        self
    }
}

/// Poll until `f` returns Some or the deadline passes (then panic with `what`).
#[track_caller]
pub fn wait_until<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(20);
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(500));
    }
}

/// The session libvirt answers `virsh`. On a fresh machine no daemon runs yet; `provisioner` starts one itself
/// (as root) on its first call, but a test that calls `virsh` first must do the same: virtlogd, then libvirtd.
pub fn session_libvirt() {
    let answers = || {
        Command::new("virsh")
            .args(["-q", "-c", "qemu:///session", "version"])
            .output()
            .expect("virsh (scripts/host-deps.sh installs libvirt)")
            .status
            .success()
    };
    if answers() {
        return;
    }
    // A daemon started concurrently by another test makes ours exit on its pid file lock; the wait settles it.
    let _ = Command::new("/usr/sbin/virtlogd").arg("-d").status();
    // libvirtd as `provisioner` starts it: under its reaper (`__reap`, detached, stdio on /dev/null), so QEMUs
    // are reaped at once whichever starts the daemon first.
    let mut reaper = Command::new(bin());
    reaper.args(["__reap", "--", "/usr/sbin/libvirtd", "-d"]).current_dir("/");
    reaper.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    #[cfg(unix)]
    // SAFETY: setsid(2) only, between fork and exec: the reaper leads a session of its own, out of the test's
    // process group.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut reaper, || {
            libc::setsid();
            Ok(())
        });
    }
    let _ = reaper.spawn();
    wait_until(Duration::from_secs(30), "the session libvirt to answer `virsh version`", || {
        answers().then_some(())
    });
}

/// A free TCP port on 127.0.0.1 (bound then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Where the `[box.debian]` table of a config text is: from its header line (not a mention of it in a comment) to
/// the blank line after it.
pub fn box_table(text: &str) -> std::ops::Range<usize> {
    let start = text.find("\n[box.debian]\n").expect("a [box.debian] table") + 1;
    start..start + text[start..].find("\n\n").expect("a blank line after [box.debian]")
}

/// The config text with its `[box.debian]` table replaced by `box_toml`.
pub fn with_box(text: &str, box_toml: &str) -> String {
    let r = box_table(text);
    format!("{}{}\n{}", &text[..r.start], box_toml.trim_end(), &text[r.end..])
}

/// The shipped cluster example copied into `dir`, its `[provision] base` (the repo's lab, `../../provision`)
/// pointed at the repo by absolute path.
pub fn copy_cluster_example(dir: &Path) {
    copy_dir(&repo().join("examples/cluster"), dir);
    let _ = std::fs::remove_dir_all(dir.join(".provisioner"));
    let cfg = dir.join("box-config.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let base = format!("base = {:?}", repo().join("provision").display().to_string());
    assert!(text.contains("base = \"../../provision\""), "the example builds on the repo's lab");
    std::fs::write(&cfg, text.replace("base = \"../../provision\"", &base)).unwrap();
}

/// Copy a directory tree, keeping modes.
pub fn copy_dir(from: &Path, to: &Path) {
    for e in walkdir::WalkDir::new(from) {
        let e = e.unwrap();
        let dest = to.join(e.path().strip_prefix(from).unwrap());
        if e.file_type().is_dir() {
            std::fs::create_dir_all(&dest).unwrap();
        } else {
            std::fs::copy(e.path(), &dest).unwrap();
        }
    }
}

/// A background process the test started; killed (whole group) on drop, log dumped if the test panicked.
pub struct Proc {
    pub name: String,
    pub child: std::process::Child,
    pub log: PathBuf,
}

impl Proc {
    /// Start `cmd` in its own process group (Unix) with stdout+stderr to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> Proc {
        let f = std::fs::File::create(&log).unwrap();
        cmd.stdout(f.try_clone().unwrap()).stderr(f).stdin(std::process::Stdio::null());
        #[cfg(unix)]
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("start {name}: {e}"));
        Proc { name: name.into(), child, log }
    }
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Unix: the whole group; Windows: the child alone (kill below).
        #[cfg(unix)]
        unsafe {
            libc_kill(-(self.child.id() as i32), 9);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- log of {} ({})\n{}", self.name, self.log.display(), tail(&self.log_text(), 60));
        }
    }
}

#[cfg(unix)]
extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

pub fn tail(s: &str, n: usize) -> String {
    let l: Vec<&str> = s.lines().collect();
    l[l.len().saturating_sub(n)..].join("\n")
}

/// Processes (`"PID COMM"`) whose environment holds `marker` (e.g. `PROVISIONER_TEST_RUN=<unique>` set on a
/// process the test started): that process and every descendant that inherited its environment, wherever they
/// were reparented. Zombies have no readable environment and do not count.
pub fn processes_with_env(marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(env) = std::fs::read(e.path().join("environ")) else { continue };
        if env.split(|b| *b == 0).any(|kv| kv == marker.as_bytes()) {
            let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
            found.push(format!("{name} {}", comm.trim()));
        }
    }
    found
}
pub mod nethost;

/// Puts the VBoxManage double in `bin` and returns the path to configure as `vboxmanage`. Its state (calls.log,
/// state.json) is kept in `bin/vboxdouble`, beside it, on every platform.
/// - Unix: a symlink to `tests/fixtures/vbox/VBoxManage` (the double itself, a Python script).
/// - Windows (the Windows tier, under Wine): Wine cannot give a Windows program a usable handle for a Unix process,
///   so `VBoxManage.exe` is the shim `tests/fixtures/vbox/winshim`, which forwards each call to the same double run by
///   `winserver.py` (scripts/test --windows builds the shim and starts the server; `PROVISIONER_VBOX_SHIM` and
///   `VBOXDOUBLE_SERVER` say where they are).
pub fn vboxmanage_double(bin: &Path) -> PathBuf {
    std::fs::create_dir_all(bin).unwrap();
    #[cfg(unix)]
    {
        let exe = bin.join("VBoxManage");
        std::os::unix::fs::symlink(repo().join("tests/fixtures/vbox/VBoxManage"), &exe).unwrap();
        exe
    }
    #[cfg(windows)]
    {
        let shim = std::env::var_os("PROVISIONER_VBOX_SHIM")
            .expect("PROVISIONER_VBOX_SHIM: the VBoxManage.exe shim (scripts/test --windows builds it)");
        let exe = bin.join("VBoxManage.exe");
        std::fs::copy(shim, &exe).unwrap();
        exe
    }
}

/// `path` as the VBoxManage double writes it in its call log and state: the path itself on Unix; under Wine the Unix
/// path `winserver.py` maps it to (`Z:\x` is `/x`, `C:\x` is `$WINEPREFIX/drive_c/x`), so tests can replace a temp
/// dir in the log with `$TMP` and compare the same golden files on both platforms.
pub fn double_path(path: &Path) -> String {
    let s = path.to_string_lossy().into_owned();
    if cfg!(windows) {
        let s = s.strip_prefix(r"\\?\").unwrap_or(&s);
        let unix =
            |rest: &str| rest.split(['\\', '/']).filter(|p| !p.is_empty()).collect::<Vec<_>>().join("/");
        if let Some(rest) = s.strip_prefix("Z:\\").or_else(|| s.strip_prefix("z:\\")) {
            return format!("/{}", unix(rest));
        }
        if let Some(rest) = s.strip_prefix("C:\\").or_else(|| s.strip_prefix("c:\\")) {
            let prefix = std::env::var("WINEPREFIX").unwrap_or_else(|_| "/root/.wine".into());
            return format!("{prefix}/drive_c/{}", unix(rest));
        }
        return s.to_string();
    }
    s
}

/// `text` with Windows path separators turned into `/` on Windows (as is elsewhere), for asserting on messages that
/// name a path: the product prints `.\provision\x` there, which is right on Windows, and `./provision/x` on Unix.
pub fn slashes(text: &str) -> String {
    if cfg!(windows) {
        text.replace('\\', "/")
    } else {
        text.to_string()
    }
}

/// `path` canonicalised as the product shows it: `std::fs::canonicalize` without the `\\?\` verbatim prefix std
/// adds on Windows (the same path on Unix).
pub fn canonical(path: &Path) -> PathBuf {
    let c = std::fs::canonicalize(path).unwrap();
    PathBuf::from(c.to_string_lossy().trim_start_matches(r"\\?\"))
}
