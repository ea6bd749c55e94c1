//! A session with a machine's guest, and what the lifecycle does through it (the guest's clock).

use std::time::Duration;

use anyhow::Result;

use crate::config::Config;
use crate::machine::StateDir;
use crate::ssh::{Endpoint, Session};
use crate::ui::Ui;

/// Connect to the machine recorded in the state dir (host key pinned).
pub fn connect(cfg: &Config, state: &StateDir, timeout: Duration) -> Result<Session> {
    Session::connect(&Endpoint::for_machine(cfg, state)?, timeout)
}

/// A guest brought back from saved memory keeps the clock of the moment it was saved: set it from the host's.
/// Best effort (a warning): the machine is usable either way.
pub fn sync_clock(cfg: &Config, state: &StateDir, ui: &Ui) {
    let set = || -> Result<()> {
        let ssh = connect(cfg, state, Duration::from_secs(60))?;
        ssh.exec_ok(&clock_command(std::time::SystemTime::now()), Duration::from_secs(30))?;
        Ok(())
    };
    if let Err(e) = set() {
        ui.warn(format!("could not set the guest's clock after the restore: {e:#}"));
    }
}

/// The guest command that sets its clock to `now` (UTC seconds).
pub fn clock_command(now: std::time::SystemTime) -> String {
    let secs = now.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    format!("sudo -n date -u -s @{secs} >/dev/null")
}
