//! The one helper every child process goes through: a deadline on every run, captured output, the command line
//! in errors, and the child killed (with its process group) if we are dropped or time out.

use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

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
    timeout: Duration,
}

impl Cmd {
    pub fn new(program: impl AsRef<OsStr>) -> Self {
        Self {
            program: program.as_ref().to_owned(),
            args: Vec::new(),
            env: Vec::new(),
            cwd: None,
            stdin: None,
            timeout: Duration::from_secs(60),
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
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
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
        // Own process group, so a timeout or drop kills grandchildren too.
        c.process_group(0);
        c
    }

    /// Run to completion (or the deadline) and capture stdout/stderr. A non-zero exit is NOT an error here.
    pub fn output(&self) -> Result<Output> {
        if verbosity() >= 1 {
            eprintln!("+ {}", self.display());
        }
        let mut cmd = self.command();
        cmd.stdin(if self.stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = cmd.spawn().map_err(|e| spawn_error(&self.program, e))?;
        let mut guard = ChildGuard::new(child);
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
        let status = guard.wait_deadline(self.timeout).with_context(|| {
            format!("`{}` did not finish within {:?}; it was killed", self.display(), self.timeout)
        })?;
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

    /// Run with inherited stdio (interactive); returns the exit status.
    pub fn run_interactive(&self) -> Result<ExitStatus> {
        if verbosity() >= 1 {
            eprintln!("+ {}", self.display());
        }
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        if let Some(d) = &self.cwd {
            cmd.current_dir(d);
        }
        cmd.status().map_err(|e| spawn_error(&self.program, e))
    }

    /// Start in the background (stdout/stderr to the given file, or null); killed when the guard drops.
    pub fn spawn(&self, log: Option<&Path>) -> Result<ChildGuard> {
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
        Ok(ChildGuard::new(child))
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
    use std::os::unix::process::ExitStatusExt;
    match (s.code(), s.signal()) {
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

/// A running child that is killed (whole process group) when dropped, unless waited for or detached.
#[derive(Debug)]
pub struct ChildGuard {
    child: Option<Child>,
}

impl ChildGuard {
    fn new(child: Child) -> Self {
        Self { child: Some(child) }
    }
    pub fn id(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }
    /// Whether the child has exited (reaping it if so).
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => Ok(c.try_wait()?),
            None => Ok(None),
        }
    }
    /// Wait until exit or deadline; on deadline the group is killed and an error returned.
    pub fn wait_deadline(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let start = Instant::now();
        let deadline = start + timeout;
        let mut pause = Duration::from_millis(1);
        loop {
            let c = self.child.as_mut().context("child already reaped")?;
            if let Some(st) = c.try_wait()? {
                self.child = None;
                return Ok(st);
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
    /// Kill the whole process group (SIGKILL) and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = c.id() as i32;
            // SAFETY: kill(2) on our own child's process group; harmless if it is gone.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
    /// Let the child live on after we drop (e.g. a daemon we started on purpose).
    pub fn detach(mut self) -> u32 {
        self.child.take().map(|c| c.id()).unwrap_or(0)
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
        std::thread::sleep(pause.min(deadline.saturating_duration_since(Instant::now())));
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}
