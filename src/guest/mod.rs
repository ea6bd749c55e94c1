//! The pipeline run in the guest once SSH is up: Docker (and Compose v1/v2) installed if missing, the rendered
//! tree uploaded (only what changed), images made, `compose up -d`.

use anyhow::Result;

use crate::config::Config;
use crate::render::Rendered;
use crate::ssh::Session;
use crate::ui::Ui;

/// Run every provisioning step on a reachable guest. Idempotent.
pub fn provision(_cfg: &Config, _ssh: &Session, _rendered: &Rendered, _ui: &Ui, _force: bool) -> Result<()> {
    todo!("guest::provision")
}
