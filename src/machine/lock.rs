//! The state-dir lock: one command per machine at a time; a second fails fast naming the holder's PID.

use std::fs::File;
use std::io::{Read, Seek, Write};

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
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("open lock {}", path.display()))?;
        match file.try_lock_exclusive() {
            Ok(true) => {}
            Ok(false) | Err(_) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                bail!(
                    "another provisioner command holds the lock on this machine ({}); wait for it to finish, \
                     or stop it (its PID is above) and run again\nlock file: {}",
                    if holder.is_empty() { "holder unknown".to_string() } else { holder.to_string() },
                    path.display()
                );
            }
        }
        file.set_len(0)?;
        file.rewind()?;
        write!(file, "pid {} ({})", std::process::id(), what)?;
        file.flush()?;
        Ok(Self { file })
    }
}

impl Drop for MachineLock {
    fn drop(&mut self) {
        let _ = self.file.set_len(0);
        let _ = FileExt::unlock(&self.file);
    }
}
