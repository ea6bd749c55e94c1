//! Health of every lab service: container state from the guest, an HTTP probe through the forwarded port, and
//! Prometheus' own view of its targets. Retried until a deadline, then a table (or JSON).

use std::time::Duration;

use anyhow::Result;

use crate::config::Config;
use crate::ssh::Session;
use crate::ui::Ui;

/// Probe everything; print the table; Ok(true) when every available service is healthy.
pub fn check(_cfg: &Config, _ssh: Option<&Session>, _ui: &Ui, _timeout: Duration) -> Result<bool> {
    todo!("health::check")
}
