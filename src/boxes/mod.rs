//! Base boxes in the user's cache dir, by content hash: local images, URL + sha256 downloads, Vagrant `.box`
//! files, and images built from a Debian mirror.

use std::path::PathBuf;

use anyhow::Result;

use crate::config::Config;
use crate::provider::BoxImage;

/// The cache root: `$PROVISIONER_CACHE_DIR`, else `~/.cache/provisioner`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("PROVISIONER_CACHE_DIR") {
        return PathBuf::from(d);
    }
    dirs::cache_dir()
        .unwrap_or_else(|| PathBuf::from("/var/tmp"))
        .join("provisioner")
}

/// Make sure the box that `cfg` names is in the cache (fetching or building it) and return it.
/// `provider` is "libvirt" or "virtualbox" (a Vagrant box must match it).
pub fn ensure(_cfg: &Config, _provider: &str, _force: bool) -> Result<BoxImage> {
    todo!("boxes::ensure")
}
