//! The one helper every child process goes through: a deadline on every run, captured output, the command line
//! in errors, and the child killed (with its process group) if we are dropped or time out.
//!
//! Interrupts: [`install_interrupt_handler`] turns SIGINT/SIGTERM/SIGHUP (Windows: Ctrl-C, Ctrl-Break, console
//! close) into a cancellation. Children run as the roots of their own process trees (`platform::ProcessTree`: a
//! process group on Unix, a Job Object on Windows), so a terminal's Ctrl-C reaches only us and a timeout can kill
//! grandchildren too; on a signal a watcher thread kills every registered tree at once, and the main thread unwinds through its
//! normal error path (partial cache entries removed, locks dropped) with an [`Interrupted`] error; `run()` then
//! exits 128+signal. A second signal, or an unwind that takes longer than [`INTERRUPT_GRACE`], exits at once
//! (what is left half-made is cleared by the next run under its lock).

use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::platform::{self, ProcessTree};

static VERBOSITY: AtomicU8 = AtomicU8::new(0);

/// Set from `-v`: at 1 the command lines are printed to stderr, at 2 their output too.
pub fn set_verbosity(v: u8) {
    VERBOSITY.store(v, Ordering::Relaxed);
}

pub fn verbosity() -> u8 {
    VERBOSITY.load(Ordering::Relaxed)
}

/// Result of a finished child.
#[derive(Debug, Clone)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status.success()
    }
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

/// A child process to run with a deadline.
#[derive(Debug)]
pub struct Cmd {
    program: OsString,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    cwd: Option<std::path::PathBuf>,
    stdin: Option<Vec<u8>>,
    /// A file read as stdin (streamed by the child itself: large files never pass through memory).
    stdin_file: Option<std::path::PathBuf>,
    timeout: Duration,
    /// Part of cleanup after an interrupt (e.g. `umount -l` of a dead build): runs even when cancelled.
    cleanup: bool,
}

impl Cmd {
    pub fn new(program: impl AsRef<OsStr>) -> Self {
        Self {
            program: program.as_ref().to_owned(),
            args: Vec::new(),
            env: Vec::new(),
            cwd: None,
            stdin: None,
            stdin_file: None,
            timeout: Duration::from_secs(60),
            cleanup: false,
        }
    }
    pub fn arg(mut self, a: impl AsRef<OsStr>) -> Self {
        self.args.push(a.as_ref().to_owned());
        self
    }
    pub fn args<I, S>(mut self, it: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args.extend(it.into_iter().map(|s| s.as_ref().to_owned()));
        self
    }
    pub fn env(mut self, k: impl AsRef<OsStr>, v: impl AsRef<OsStr>) -> Self {
        self.env.push((k.as_ref().to_owned(), v.as_ref().to_owned()));
        self
    }
    pub fn cwd(mut self, dir: impl AsRef<Path>) -> Self {
        self.cwd = Some(dir.as_ref().to_owned());
        self
    }
    pub fn stdin(mut self, data: impl Into<Vec<u8>>) -> Self {
        self.stdin = Some(data.into());
        self
    }
    /// Read `file` as stdin (the child gets the open file; nothing is copied here).
    pub fn stdin_file(mut self, file: impl AsRef<Path>) -> Self {
        self.stdin_file = Some(file.as_ref().to_owned());
        self
    }
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }
    /// A cleanup step: it still runs after an interrupt, and an interrupt does not kill it.
    pub fn cleanup(mut self) -> Self {
        self.cleanup = true;
        self
    }

    /// The command line as a user would type it (for messages).
    pub fn display(&self) -> String {
        std::iter::once(&self.program)
            .chain(self.args.iter())
            .map(|a| {
                let s = a.to_string_lossy();
                if s.is_empty() || s.contains(|c: char| c.is_whitespace() || "'\"$\\".contains(c)) {
                    format!("'{}'", s.replace('\'', r"'\''"))
                } else {
                    s.into_owned()
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn command(&self) -> Command {
        let mut c = Command::new(&self.program);
        c.args(&self.args);
        for (k, v) in &self.env {
            c.env(k, v);
        }
        if let Some(d) = &self.cwd {
            c.current_dir(d);
        }
        // Own process tree, so a timeout or drop kills grandchildren too.
        ProcessTree::prepare(&mut c);
        c
    }

    /// Run to completion (or the deadline) and capture stdout/stderr. A non-zero exit is NOT an error here.
    pub fn output(&self) -> Result<Output> {
        if !self.cleanup {
            check_interrupted()?;
        }
        // `-v`: each command with its time once it ended (as guest commands are shown: where the time goes);
        // `-vv` also when it starts (a command that hangs is seen at once).
        if verbosity() >= 2 {
            eprintln!("+ {} ...", self.display());
        }
        let _shown = Shown((verbosity() >= 1).then(|| (std::time::Instant::now(), self.display())));
        let mut cmd = self.command();
        cmd.stdin(match (&self.stdin, &self.stdin_file) {
            (Some(_), _) => Stdio::piped(),
            (None, Some(f)) => Stdio::from(
                std::fs::File::open(f)
                    .with_context(|| format!("open {} for {}", f.display(), self.display()))?,
            ),
            (None, None) => Stdio::null(),
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let child = cmd.spawn().map_err(|e| spawn_error(&self.program, e))?;
        let mut guard = ChildGuard::new(child, !self.cleanup);
        let child = guard.child.as_mut().expect("child present");
        let stdin_thread = self.stdin.clone().map(|data| {
            let mut pipe = child.stdin.take().expect("stdin piped");
            std::thread::spawn(move || {
                use std::io::Write;
                let _ = pipe.write_all(&data);
            })
        });
        let mut out = child.stdout.take().expect("stdout piped");
        let mut err = child.stderr.take().expect("stderr piped");
        let t_out = std::thread::spawn(move || {
            let mut b = Vec::new();
            let _ = out.read_to_end(&mut b);
            b
        });
        let t_err = std::thread::spawn(move || {
            let mut b = Vec::new();
            let _ = err.read_to_end(&mut b);
            b
        });
        let status = match guard.wait_deadline(self.timeout) {
            Ok(st) => st,
            Err(e) if e.is::<Interrupted>() => return Err(e),
            Err(e) => {
                return Err(e.context(format!(
                    "`{}` did not finish within {:?}; it was killed",
                    self.display(),
                    self.timeout
                )))
            }
        };
        let stdout = String::from_utf8_lossy(&t_out.join().unwrap_or_default()).into_owned();
        let stderr = String::from_utf8_lossy(&t_err.join().unwrap_or_default()).into_owned();
        if let Some(t) = stdin_thread {
            let _ = t.join();
        }
        if verbosity() >= 2 {
            eprint!("{stdout}{stderr}");
        }
        Ok(Output { status, stdout, stderr })
    }

    /// Run and require exit 0; the error carries the command line, exit status and stderr.
    pub fn run(&self) -> Result<Output> {
        let out = self.output()?;
        if !out.success() {
            bail!(
                "`{}` failed ({}):\n{}",
                self.display(),
                describe_status(&out.status),
                tail(if out.stderr.trim().is_empty() { &out.stdout } else { &out.stderr }, 20)
            );
        }
        Ok(out)
    }

    /// Start in the background (stdout/stderr to the given file, or null); killed when the guard drops.
    pub fn spawn(&self, log: Option<&Path>) -> Result<ChildGuard> {
        if !self.cleanup {
            check_interrupted()?;
        }
        if verbosity() >= 1 {
            eprintln!("+ {} &", self.display());
        }
        let mut cmd = self.command();
        cmd.stdin(Stdio::null());
        match log {
            Some(p) => {
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .with_context(|| format!("open log {}", p.display()))?;
                cmd.stdout(f.try_clone()?).stderr(f);
            }
            None => {
                cmd.stdout(Stdio::null()).stderr(Stdio::null());
            }
        }
        let child = cmd.spawn().map_err(|e| spawn_error(&self.program, e))?;
        Ok(ChildGuard::new(child, !self.cleanup))
    }
}

fn spawn_error(program: &OsStr, e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::NotFound {
        anyhow::anyhow!(
            "`{}` was not found on PATH; install it (see README, Troubleshooting) or put it on PATH",
            program.to_string_lossy()
        )
    } else {
        anyhow::anyhow!("cannot start `{}`: {e}", program.to_string_lossy())
    }
}

pub fn describe_status(s: &ExitStatus) -> String {
    match (s.code(), platform::exit_signal(s)) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => "unknown status".into(),
    }
}

/// Last `n` lines of a text.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A running child that is killed (whole process tree) when dropped, unless waited for or detached.
#[derive(Debug)]
pub struct ChildGuard {
    child: Option<Child>,
    /// The child's process tree (its group on Unix, its job on Windows).
    tree: ProcessTree,
    /// Registered for the interrupt watcher (its tree is killed on SIGINT/SIGTERM/SIGHUP).
    registered: bool,
    /// How it ended, once reaped by [`ChildGuard::try_wait`] (asked again, it answers the same).
    exited: Option<ExitStatus>,
}

impl ChildGuard {
    fn new(child: Child, register: bool) -> Self {
        let tree = ProcessTree::of(&child);
        if register {
            register_tree(child.id(), &tree);
        }
        Self { child: Some(child), tree, registered: register, exited: None }
    }
    /// The child is gone (reaped): its group id may be reused, so the watcher must forget it.
    fn reaped(&mut self, pid: u32) {
        if self.registered {
            unregister_tree(pid);
        }
        self.tree.release();
    }
    pub fn id(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }
    /// Whether the child has exited (reaping it if so).
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        let Some(c) = self.child.as_mut() else { return Ok(self.exited) };
        let st = c.try_wait()?;
        if let Some(st) = st {
            let pid = c.id();
            self.child = None;
            self.exited = Some(st);
            self.reaped(pid);
        }
        Ok(st)
    }
    /// Wait until exit or deadline; on deadline the group is killed and an error returned.
    pub fn wait_deadline(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let start = Instant::now();
        let deadline = start + timeout;
        let mut pause = Duration::from_millis(1);
        loop {
            let c = self.child.as_mut().context("child already reaped")?;
            if let Some(st) = c.try_wait()? {
                let pid = c.id();
                self.child = None;
                self.reaped(pid);
                // Killed by the interrupt watcher (or finished just as the signal came): not a failure of its own.
                if self.registered {
                    check_interrupted()?;
                }
                return Ok(st);
            }
            if self.registered && interrupted().is_some() {
                self.kill();
                check_interrupted()?;
            }
            if Instant::now() >= deadline {
                self.kill();
                bail!("timed out after {timeout:?}");
            }
            std::thread::sleep(pause);
            // Most children (virsh, qemu-img info) exit within tens of milliseconds: poll every millisecond at
            // first so their exit is seen at once (a doubling pause from 2 ms made `status` take 2x `virsh`),
            // then back off for long runs.
            if start.elapsed() > Duration::from_millis(200) {
                pause = (pause * 2).min(Duration::from_millis(50));
            }
        }
    }
    /// Kill the whole process tree (SIGKILL / TerminateJobObject) and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = c.id();
            self.tree.kill();
            let _ = c.kill();
            let _ = c.wait();
            self.reaped(pid);
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Poll `f` until it returns `Some`, or the deadline passes (then the last error/none is reported).
pub fn wait_until<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(50);
    let mut last_err: Option<anyhow::Error> = None;
    loop {
        check_interrupted()?;
        match f() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if Instant::now() >= deadline {
            return Err(match last_err {
                Some(e) => e.context(format!("timed out after {timeout:?} waiting for {what}")),
                None => anyhow::anyhow!("timed out after {timeout:?} waiting for {what}"),
            });
        }
        sleep_interruptible(pause.min(deadline.saturating_duration_since(Instant::now())));
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Interrupts

/// How long the main thread may take to unwind after a signal (kill children, remove partial entries, release
/// locks) before the watcher exits the process itself.
pub const INTERRUPT_GRACE: Duration = Duration::from_secs(15);

/// Process trees of running children, by the pid of their root.
static TREES: Mutex<Vec<(u32, ProcessTree)>> = Mutex::new(Vec::new());

/// The error a cancelled operation returns; `run()` maps it to exit code 128+signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("interrupted by {}", self.signal_name())]
pub struct Interrupted(pub i32);

impl Interrupted {
    /// 130 for SIGINT, 143 for SIGTERM, 129 for SIGHUP.
    pub fn exit_code(self) -> i32 {
        128 + self.0
    }
    pub fn signal_name(self) -> &'static str {
        platform::signal_name(self.0)
    }
}

/// What an interrupted run leaves behind, when a step knows it leaves something (see [`set_interrupt_note`]).
static INTERRUPT_NOTE: Mutex<Option<String>> = Mutex::new(None);

/// Say what this interrupted run leaves behind: the interrupt message prints it instead of "nothing half-made
/// was kept" (e.g. a partial volume on a remote host that could not be deleted in time).
pub fn set_interrupt_note(note: impl Into<String>) {
    *INTERRUPT_NOTE.lock().unwrap_or_else(|e| e.into_inner()) = Some(note.into());
}

/// The note of [`set_interrupt_note`], if a step set one.
pub fn interrupt_note() -> Option<String> {
    INTERRUPT_NOTE.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// The signal that interrupted this run, if any.
pub fn interrupted() -> Option<Interrupted> {
    platform::interrupt().map(Interrupted)
}

/// `Err(Interrupted)` once a signal came: call it before starting anything long.
pub fn check_interrupted() -> Result<()> {
    match interrupted() {
        Some(i) => Err(anyhow::Error::new(i)),
        None => Ok(()),
    }
}

/// Sleep up to `d`, returning early when a signal comes.
pub fn sleep_interruptible(d: Duration) {
    let end = Instant::now() + d;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() || interrupted().is_some() {
            return;
        }
        std::thread::sleep(left.min(Duration::from_millis(100)));
    }
}

fn register_tree(pid: u32, tree: &ProcessTree) {
    let mut g = TREES.lock().unwrap_or_else(|e| e.into_inner());
    g.push((pid, tree.clone()));
    // A signal that came between the check before spawning and this registration: the watcher has already
    // swept, so kill this tree here.
    if interrupted().is_some() {
        tree.kill();
    }
}

fn unregister_tree(pid: u32) {
    let mut g = TREES.lock().unwrap_or_else(|e| e.into_inner());
    g.retain(|(p, _)| *p != pid);
}

/// Kill every registered child process tree; returns how many there were.
fn kill_trees() -> usize {
    let g = TREES.lock().unwrap_or_else(|e| e.into_inner());
    for (_, tree) in g.iter() {
        tree.kill();
    }
    g.len()
}

/// Turn SIGINT, SIGTERM and SIGHUP (Windows: Ctrl-C, Ctrl-Break, console close) into a cancellation (see the
/// module docs). Call once, early in `run()`. On Unix the handlers are reset by exec(2), so a program we exec into
/// (`ssh`) gets the default behaviour back.
pub fn install_interrupt_handler() -> Result<()> {
    if !platform::install_interrupts().context("install the interrupt handler")? {
        return Ok(());
    }
    std::thread::Builder::new()
        .name("interrupts".into())
        .spawn(watch_interrupts)
        .context("start the interrupt watcher")?;
    Ok(())
}

fn watch_interrupts() {
    if !platform::wait_interrupt(None) {
        return;
    }
    let first = interrupted().unwrap_or(Interrupted(platform::SIGINT));
    kill_trees();
    // The main thread now unwinds. A second signal, or a slow unwind, ends the process here.
    let second = platform::wait_interrupt(Some(INTERRUPT_GRACE));
    kill_trees();
    let why = if second { "a second signal" } else { "cleanup took too long" };
    eprintln!(
        "error: {first}; stopping at once ({why})\nhint: run the command again: what was left half-made is cleared \
         by the next run"
    );
    platform::exit_now(first.exit_code())
}

/// `-v`'s line when an OpenSSH master on `socket` did not take a command in-process (`why`, see [`Shown`]), so an
/// `ssh` process runs it.
pub fn show_ssh_instead(socket: &std::path::Path, why: &str) {
    if verbosity() >= 1 {
        eprintln!("+ the SSH master at {} did not take the command ({why}): ssh instead", socket.display());
    }
}

/// With `-v`, prints `+ MS ms: COMMAND` on stderr when dropped, however the command ended.
pub struct Shown(Option<(std::time::Instant, String)>);

impl Shown {
    /// `-v`'s lines for work that starts no child process (a command run through an SSH master in-process):
    /// `+ LINE ...` now with `-vv`, `+ MS ms: LINE` when dropped with `-v`, as a child command's.
    pub fn start(line: impl FnOnce() -> String) -> Self {
        if verbosity() == 0 {
            return Shown(None);
        }
        let line = line();
        if verbosity() >= 2 {
            eprintln!("+ {line} ...");
        }
        Shown(Some((std::time::Instant::now(), line)))
    }

    /// Nothing ran after all (another way is taken): no line.
    pub fn cancel(mut self) {
        self.0 = None;
    }
}

impl Drop for Shown {
    fn drop(&mut self) {
        if let Some((started, line)) = self.0.take() {
            eprintln!("+ {} ms: {line}", started.elapsed().as_millis());
        }
    }
}
