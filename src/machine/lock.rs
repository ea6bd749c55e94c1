//! Every lock of the tool, one mechanism: an exclusive `flock` on a lock file, taken one of three ways: [`try_lock`]
//! (at once or not at all: the state-dir lock, one command per machine, a second fails fast naming the holder's
//! PID), [`wait_for`] / [`wait`] (up to a deadline: the project, network, secrets and box import locks) and
//! [`block`] (until free: box and base image builds, which say they wait). The kernel drops the lock when its
//! holder exits, even on SIGKILL; [`FileLock`] releases it on drop.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use fs4::fs_std::FileExt;

use super::StateDir;

/// Held for the life of a mutating command; released on drop (and by the kernel if we die).
#[derive(Debug)]
pub struct MachineLock {
    _lock: FileLock,
}

/// A held exclusive lock on a lock file: released (and what its holder wrote in it cleared) on drop.
#[derive(Debug)]
pub struct FileLock {
    file: File,
}

impl Drop for FileLock {
    fn drop(&mut self) {
        let _ = self.file.set_len(0);
        let _ = FileExt::unlock(&self.file);
    }
}

impl MachineLock {
    /// Take the lock or fail at once with the holder's PID and command.
    pub fn acquire(state: &StateDir, what: &str) -> Result<Self> {
        state.ensure()?;
        let path = state.lock_file();
        let mut lock = match try_lock(&path)? {
            Ok(lock) => lock,
            Err(holder) => bail!("{}", held(&holder, &path)),
        };
        write_holder(&mut lock, &format!("pid {} ({what})", std::process::id()))?;
        Ok(Self { _lock: lock })
    }
}

/// Why the lock on `path` cannot be taken, from what its holder wrote in it (`pid N (command)`, or nothing yet):
/// the PID and how to stop it when the holder wrote one, else how to find the process.
pub fn held(holder: &str, path: &Path) -> String {
    let pid = holder
        .strip_prefix("pid ")
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse::<u32>().ok());
    match pid {
        Some(pid) => format!(
            "another provisioner command holds the lock on this machine: {} (lock file {})\nhint: wait for it to \
             finish, or stop it (`{}`), then run again",
            crate::text::shown(holder),
            path.display(),
            crate::platform::stop_process_command(pid)
        ),
        None => format!(
            "another process holds the lock on this machine and has not written its PID into the lock file {} \
             (it may have only just started)\nhint: wait for it to finish, then run again; {}",
            path.display(),
            crate::platform::file_holder_hint(path, &crate::host::shell_quote(&path.to_string_lossy()))
        ),
    }
}

/// Open (creating) the lock file `path`, not truncating what its holder wrote in it.
fn open(path: &Path) -> Result<File> {
    std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).with_context(
        || {
            format!(
                "open lock {}\nhint: its directory must be writable by you (`ls -ld {}`)",
                path.display(),
                crate::host::shell_quote(&path.parent().unwrap_or(path).to_string_lossy())
            )
        },
    )
}

/// Try to take the exclusive lock on `path` (created if missing) without waiting: `Ok(lock)` when taken,
/// `Err(holder)` with what the current holder wrote in it (`pid N (command)`, or nothing yet) when another
/// process has it.
pub fn try_lock(path: &Path) -> Result<std::result::Result<FileLock, String>> {
    let mut file = open(path)?;
    if file.try_lock_exclusive().unwrap_or(false) {
        return Ok(Ok(FileLock { file }));
    }
    let mut holder = String::new();
    let _ = file.read_to_string(&mut holder);
    Ok(Err(holder.trim().to_string()))
}

/// Wait up to `timeout` for the exclusive lock on `path`, for short critical sections (creating the lab
/// secrets, the project's network): the same lock as [`MachineLock`], waited for instead of refused.
pub fn wait_for(path: &Path, timeout: Duration) -> Result<FileLock> {
    wait(path, timeout, &format!("the lock {}", path.display()))
}

/// [`wait_for`] saying what is waited for (`what`) when the deadline passes.
pub fn wait(path: &Path, timeout: Duration, what: &str) -> Result<FileLock> {
    crate::process::wait_until(timeout, what, || Ok(try_lock(path)?.ok()))
}

/// Wait for the exclusive lock on `path` as long as its holder keeps it (builds that take minutes; the caller
/// says that it waits, e.g. after a failed [`try_lock`]).
pub fn block(path: &Path) -> Result<FileLock> {
    let file = open(path)?;
    file.lock_exclusive().with_context(|| format!("lock {}", path.display()))?;
    Ok(FileLock { file })
}

/// Say who holds a lock we took (shown to the next process that finds it taken).
pub fn write_holder(lock: &mut FileLock, text: &str) -> Result<()> {
    let file = &mut lock.file;
    file.set_len(0)?;
    file.rewind()?;
    file.write_all(text.as_bytes())?;
    file.flush()?;
    Ok(())
}
