//! The cloud-init NoCloud seed: an ISO9660 image (label `cidata`, Joliet names) with `user-data`, `meta-data`
//! (and optionally `network-config`), written in Rust.

use std::path::Path;

use anyhow::Result;

use crate::keys::KeyPair;

/// What goes into the seed.
#[derive(Debug, Clone)]
pub struct SeedSpec {
    pub instance_id: String,
    pub hostname: String,
    pub user: String,
    pub user_key: KeyPair,
    pub host_key: KeyPair,
}

/// Render user-data/meta-data (from assets/cloud-init/) and write the ISO atomically to `out`.
pub fn write_seed(_spec: &SeedSpec, _out: &Path) -> Result<()> {
    todo!("seed::write_seed")
}
