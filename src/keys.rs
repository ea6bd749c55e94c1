//! Per-machine ed25519 keys, generated in Rust (ssh-key): the user key the tool logs in with, and the guest's host
//! key pair that goes into the seed so the host key is pinned before the first connection. Private keys are 0600.

use anyhow::Result;

use crate::machine::StateDir;

/// An OpenSSH key pair as text.
#[derive(Clone)]
pub struct KeyPair {
    /// OpenSSH private key PEM (never printed).
    pub private_openssh: String,
    /// `ssh-ed25519 AAAA... comment`
    pub public_openssh: String,
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyPair").field("public_openssh", &self.public_openssh).finish_non_exhaustive()
    }
}

/// Generate a new ed25519 key pair.
pub fn generate(_comment: &str) -> Result<KeyPair> {
    todo!("keys::generate")
}

/// The machine's user and host keys, created (0600) on first use and reused afterwards.
pub fn ensure_machine_keys(_state: &StateDir, _machine: &str) -> Result<(KeyPair, KeyPair)> {
    todo!("keys::ensure_machine_keys")
}
