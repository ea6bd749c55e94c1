//! The state-dir lock: one command per machine at a time; a second fails fast naming the holder's PID.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};
use fs4::fs_std::FileExt;

use super::StateDir;

/// Held for the life of a mutating command; released on drop (and by the kernel if we die).
#[derive(Debug)]
pub struct MachineLock {
    file: File,
}

impl MachineLock {
    /// Take the lock or fail at once with the holder's PID and command.
    pub fn acquire(state: &StateDir, what: &str) -> Result<Self> {
        state.ensure()?;
        let path = state.lock_file();
        let mut file = match try_lock(&path)? {
            Ok(file) => file,
            Err((_, holder)) => bail!("{}", held(&holder, &path)),
        };
        write_holder(&mut file, &format!("pid {} ({what})", std::process::id()))?;
        Ok(Self { file })
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
             finish, or stop it (`kill {pid}`), then run again",
            crate::text::shown(holder),
            path.display()
        ),
        None => format!(
            "another process holds the lock on this machine and has not written its PID into the lock file {} \
             (it may have only just started)\nhint: wait for it to finish, then run again; `fuser -v {}` shows \
             which process holds it",
            path.display(),
            crate::ssh::shell_quote(&path.to_string_lossy())
        ),
    }
}

impl Drop for MachineLock {
    fn drop(&mut self) {
        let _ = self.file.set_len(0);
        let _ = FileExt::unlock(&self.file);
    }
}

/// Open (creating) a lock file and try to take its exclusive `flock` without waiting: `Ok(file)` when taken,
/// `Err((file, holder))` with what the current holder wrote in it when another process has it. The kernel drops
/// the lock when the holder exits, even on SIGKILL.
pub fn try_lock(path: &Path) -> Result<std::result::Result<File, (File, String)>> {
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .with_context(|| format!("open lock {}", path.display()))?;
    if file.try_lock_exclusive().unwrap_or(false) {
        return Ok(Ok(file));
    }
    let mut holder = String::new();
    let _ = file.read_to_string(&mut holder);
    Ok(Err((file, holder.trim().to_string())))
}

/// Wait up to `timeout` for the exclusive lock on `path`, for short critical sections (creating the lab
/// secrets): the same `flock` as [`MachineLock`], waited for instead of refused. Released when the file drops.
pub fn wait_for(path: &Path, timeout: std::time::Duration) -> Result<File> {
    crate::process::wait_until(timeout, &format!("the lock {}", path.display()), || Ok(try_lock(path)?.ok()))
}

/// Say who holds a lock we took (shown to the next process that finds it taken).
pub fn write_holder(file: &mut File, text: &str) -> Result<()> {
    file.set_len(0)?;
    file.rewind()?;
    file.write_all(text.as_bytes())?;
    file.flush()?;
    Ok(())
}
