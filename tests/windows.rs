//! Tests of the Windows build through real parts, run by the Windows tier under Wine (`scripts/test --windows`;
//! this module is compiled for Windows only):
//! - SSH: the tool's own ssh2 session (the one `up` uses), built with OpenSSL, against a real OpenSSH sshd that
//!   `scripts/windows-tier.sh` starts on 127.0.0.1 with ed25519 keys only and curve25519 key exchange only.
//! - Ctrl-C: a console Ctrl-C to `provisioner.exe up` while a VBoxManage.exe call with a child of its own blocks: exit
//!   130, and the child and grandchild ended by their Job Object. The same Job Object kill on a deadline and on drop.
//!
//! Their Unix sides are tested in ssh.rs and by the SIGINT tests of boxes.rs and guest.rs. The tier passes what these
//! tests need in environment variables; without them a test fails with what to run (it never passes unchecked).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use provisioner::keys;
use provisioner::process::Cmd;
use provisioner::ssh::{Endpoint, Session};

use windows_sys::Win32::Foundation::{CloseHandle, HANDLE, STILL_ACTIVE, WAIT_OBJECT_0};
use windows_sys::Win32::System::Threading::{
    GetExitCodeProcess, OpenProcess, WaitForSingleObject, CREATE_NEW_CONSOLE,
    PROCESS_QUERY_LIMITED_INFORMATION, PROCESS_SYNCHRONIZE,
};

use crate::support;

/// An environment variable the tier sets; a clear failure without it.
fn tier_var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: this test needs what scripts/windows-tier.sh prepares (run `scripts/test --windows`); \
             it fails rather than pass unchecked"
        )
    })
}

/// The tier's sshd: 127.0.0.1:PORT, its user, an authorized ed25519 key file and the ed25519 host key to pin.
fn tier_sshd() -> Endpoint {
    Endpoint {
        addr: tier_var("PROVISIONER_TEST_SSHD").parse().expect("PROVISIONER_TEST_SSHD is 127.0.0.1:PORT"),
        user: tier_var("PROVISIONER_TEST_SSHD_USER"),
        key: PathBuf::from(tier_var("PROVISIONER_TEST_SSHD_KEY")),
        host_key: tier_var("PROVISIONER_TEST_SSHD_PIN"),
        via: None,
    }
}

/// ed25519 keys, host key and curve25519 key exchange work in the Windows build: libssh2 there is built on OpenSSL
/// (Cargo.toml: `openssl-on-win32`), not WinCNG, which has none of them. The session is the tool's own
/// (`ssh::Session`, as `up` uses it), with the host key pinned; a wrong pin is refused before logging in.
#[test]
fn ed25519_session_with_a_pinned_host_key_runs_a_command_and_a_wrong_pin_is_refused() {
    let ep = tier_sshd();
    assert!(ep.host_key.starts_with("ssh-ed25519 "), "the tier pins an ed25519 host key: {}", ep.host_key);
    // The crypto backend, as libssh2 reports it: WinCNG would list no ssh-ed25519 and no curve25519.
    let probe = ssh2::Session::new().unwrap();
    let host_keys = probe.supported_algs(ssh2::MethodType::HostKey).unwrap();
    let kex = probe.supported_algs(ssh2::MethodType::Kex).unwrap();
    assert!(host_keys.contains(&"ssh-ed25519"), "libssh2 host key algorithms: {host_keys:?}");
    assert!(kex.contains(&"curve25519-sha256"), "libssh2 key exchanges: {kex:?}");

    // The sshd offers only ssh-ed25519 host keys and curve25519 key exchange, and accepts only ed25519 user keys.
    let start = Instant::now();
    let s = Session::connect(&ep, Duration::from_secs(30)).expect("connect to the tier's sshd");
    let out = s
        .exec("echo \"hello from $(uname -s)\"; echo to-stderr >&2; exit 7", Duration::from_secs(30))
        .unwrap();
    assert_eq!(out.status, 7, "{out:?}");
    assert_eq!(out.output, "hello from Linux\nto-stderr\n");
    eprintln!("bench: ed25519 session (connect + one command) under Wine in {:.2?}", start.elapsed());

    // Another ed25519 key pinned: refused at once with the tool's pinning error, naming both fingerprints.
    let other = keys::generate("not-the-server").unwrap();
    let wrong = Endpoint { host_key: other.public_openssh.clone(), ..ep.clone() };
    let start = Instant::now();
    let err = match Session::connect(&wrong, Duration::from_secs(30)) {
        Ok(_) => panic!("a wrong pin was accepted"),
        Err(e) => format!("{e:#}"),
    };
    let presented = keys::fingerprint_openssh(&ep.host_key).unwrap();
    let pinned = keys::fingerprint_openssh(&other.public_openssh).unwrap();
    assert!(
        err.starts_with(&format!(
            "HOST KEY MISMATCH at {}: the machine presented {presented}, but {pinned} is pinned; refusing to log in\n\
             hint: ",
            ep.addr
        )),
        "{err}"
    );
    // Not retried until the deadline: a mismatch is final.
    assert!(start.elapsed() < Duration::from_secs(15), "refusal took {:?}", start.elapsed());
}

/// A process handle opened for waiting on it and reading its exit code; closed on drop. Holding it also keeps the
/// pid from being reused while the test looks at it.
struct Process(HANDLE);

// SAFETY: a process handle may be used and closed from any thread.
unsafe impl Send for Process {}

impl Process {
    fn open(pid: u32) -> Process {
        // SAFETY: a plain Win32 call; the handle is closed on drop.
        let h = unsafe { OpenProcess(PROCESS_QUERY_LIMITED_INFORMATION | PROCESS_SYNCHRONIZE, 0, pid) };
        assert!(!h.is_null(), "open process {pid}: {}", std::io::Error::last_os_error());
        Process(h)
    }
    /// The exit code, or `None` while it runs.
    fn exit_code(&self) -> Option<u32> {
        let mut code = 0u32;
        // SAFETY: our own handle; the code is written into a local.
        assert!(unsafe { GetExitCodeProcess(self.0, &mut code) } != 0, "{}", std::io::Error::last_os_error());
        (code != STILL_ACTIVE as u32).then_some(code)
    }
    /// Wait until it has ended, at most `timeout`; its exit code, or `None` if it still runs.
    fn wait(&self, timeout: Duration) -> Option<u32> {
        // SAFETY: our own handle.
        let r = unsafe { WaitForSingleObject(self.0, timeout.as_millis() as u32) };
        if r == WAIT_OBJECT_0 {
            self.exit_code()
        } else {
            None
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // SAFETY: our own handle, closed once.
        unsafe {
            CloseHandle(self.0);
        }
    }
}

/// The exit code TerminateJobObject gives every process of a killed tree (`platform::ProcessTree::kill`).
const KILLED_BY_JOB: u32 = 1;

/// A hanging VBoxManage.exe call's tree, once it wrote its pid file: the shim (child) and its grandchild.
fn hanging_tree(pid_file: &Path) -> (Process, Process) {
    let text =
        support::wait_until(Duration::from_secs(60), "the hanging VBoxManage.exe to start its child", || {
            std::fs::read_to_string(pid_file).ok()
        });
    let pids: Vec<u32> = text.split_whitespace().map(|p| p.parse().unwrap()).collect();
    let (child, grandchild) = (Process::open(pids[0]), Process::open(pids[1]));
    assert_eq!(
        (child.exit_code(), grandchild.exit_code()),
        (None, None),
        "the tree runs before the test acts"
    );
    (child, grandchild)
}

fn shim() -> PathBuf {
    PathBuf::from(tier_var("PROVISIONER_VBOX_SHIM"))
}

/// A console Ctrl-C to `provisioner.exe up` while its VBoxManage.exe call blocks with a grandchild: the run stops
/// with 130 and the cancellation message, and the child and grandchild (which ignore Ctrl-C themselves, as children
/// in a process group of their own) are ended by their Job Object, all within seconds.
///
/// How the Ctrl-C is sent (what Wine 10 delivers): provisioner.exe runs on a console of its own (CREATE_NEW_CONSOLE,
/// as in a user's window), and `ctrl-c.exe` attaches to that console and generates CTRL_C_EVENT for it, as typing
/// Ctrl-C there would. Aiming it at a process group instead does not work: from a process without that console
/// Wine refuses it ("Invalid access", os error 12), and a process started with CREATE_NEW_PROCESS_GROUP gets no
/// Ctrl-C (Windows documents it; under Wine it got none even after `SetConsoleCtrlHandler(NULL, FALSE)`).
#[test]
fn ctrl_c_stops_up_with_130_and_the_job_object_ends_the_child_tree() {
    let dir = tempfile::tempdir().unwrap();
    let proj = dir.path().join("my project");
    std::fs::create_dir_all(proj.join("box")).unwrap();
    std::fs::create_dir_all(proj.join("provision")).unwrap();
    let fixtures = support::repo().join("tests/fixtures/vbox");
    std::fs::copy(fixtures.join("box.ovf"), proj.join("box/box.ovf")).unwrap();
    std::fs::copy(fixtures.join("box-disk001.vmdk"), proj.join("box/box-disk001.vmdk")).unwrap();
    let exe = support::vboxmanage_double(&dir.path().join("Program Files/VirtualBox"));
    std::fs::write(
        proj.join("box-config.toml"),
        format!(
            "[machine]\nname = \"vb\"\nprovider = \"virtualbox\"\ncpus = 1\nmemory_mb = 1024\n\n[box]\n\
             vagrant = \"box/box.ovf\"\n\n[ssh]\nhost_port = {}\n\n[virtualbox]\nvboxmanage = '{}'\n",
            support::free_port(),
            exe.display()
        ),
    )
    .unwrap();
    let pid_file = dir.path().join("tree.pids");
    let log = dir.path().join("up.log");
    let f = std::fs::File::create(&log).unwrap();
    let mut up = Command::new(support::bin());
    up.arg("up")
        .current_dir(&proj)
        .env("PROVISIONER_CACHE_DIR", dir.path().join("cache"))
        .env("VBOXSHIM_HANG", &pid_file)
        .stdin(Stdio::null())
        .stdout(f.try_clone().unwrap())
        .stderr(f);
    std::os::windows::process::CommandExt::creation_flags(&mut up, CREATE_NEW_CONSOLE);
    let mut up = up.spawn().expect("start provisioner.exe up");
    let (child, grandchild) = hanging_tree(&pid_file);

    let sent = Instant::now();
    let ctrl_c = shim().with_file_name("ctrl-c.exe");
    let out = Command::new(&ctrl_c).arg(up.id().to_string()).output().expect("run ctrl-c.exe");
    assert!(out.status.success(), "{}: {}", ctrl_c.display(), String::from_utf8_lossy(&out.stderr));

    let status = support::wait_until(Duration::from_secs(30), "provisioner.exe to exit after Ctrl-C", || {
        up.try_wait().unwrap()
    });
    let exited = sent.elapsed();
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(130), "{text}");
    assert!(
        text.contains(
            "error: interrupted by SIGINT: child processes were stopped and nothing half-made was kept\n\
             hint: run the same command again; it continues from the last consistent state"
        ),
        "{text}"
    );
    // Both were still running when provisioner.exe exited or end within the deadline, killed by their job.
    assert_eq!(child.wait(Duration::from_secs(10)), Some(KILLED_BY_JOB), "VBoxManage.exe (child)");
    assert_eq!(grandchild.wait(Duration::from_secs(10)), Some(KILLED_BY_JOB), "its grandchild");
    eprintln!("bench: Ctrl-C to exit 130 in {exited:.2?}, tree gone in {:.2?}", sent.elapsed());
}

/// The Job Object kill without Ctrl-C: a child tree run through `process::Cmd` is ended on its deadline, and a
/// background one when its guard is dropped, grandchild included (it never hears of it: only the job can end it).
#[test]
fn the_job_object_ends_a_child_tree_on_deadline_and_on_drop() {
    let shim = shim();
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("deadline.pids");
    let waiter = {
        let pid_file = pid_file.clone();
        std::thread::spawn(move || hanging_tree(&pid_file))
    };
    let start = Instant::now();
    let err =
        Cmd::new(&shim).arg("list").env("VBOXSHIM_HANG", &pid_file).timeout(Duration::from_secs(10)).output();
    let took = start.elapsed();
    let (child, grandchild) = waiter.join().unwrap();
    let err = format!("{:#}", err.expect_err("a hanging call must hit its deadline"));
    assert!(err.contains("did not finish within 10s; it was killed"), "{err}");
    assert!(took < Duration::from_secs(30), "the deadline was not kept: {took:?}");
    assert_eq!(child.wait(Duration::from_secs(10)), Some(KILLED_BY_JOB), "child");
    assert_eq!(grandchild.wait(Duration::from_secs(10)), Some(KILLED_BY_JOB), "grandchild (deadline)");

    let pid_file = dir.path().join("drop.pids");
    let guard = Cmd::new(&shim).arg("list").env("VBOXSHIM_HANG", &pid_file).spawn(None).unwrap();
    let (child, grandchild) = hanging_tree(&pid_file);
    drop(guard);
    assert_eq!(child.wait(Duration::from_secs(10)), Some(KILLED_BY_JOB), "child");
    assert_eq!(grandchild.wait(Duration::from_secs(10)), Some(KILLED_BY_JOB), "grandchild (drop)");
}
