//! Per-machine ed25519 keys, generated in Rust (ssh-key): the user key the tool logs in with, and the guest's host
//! key pair that goes into the seed so the host key is pinned before the first connection. Private keys are 0600.

use std::path::Path;

use anyhow::{Context, Result};
use ssh_key::{Algorithm, HashAlg, LineEnding, PrivateKey, PublicKey};

use crate::machine::{write_private, StateDir};

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

impl KeyPair {
    fn from_private(key: &PrivateKey) -> Result<Self> {
        Ok(Self {
            private_openssh: key.to_openssh(LineEnding::LF).context("encode private key")?.to_string(),
            public_openssh: key.public_key().to_openssh().context("encode public key")?,
        })
    }

    /// `SHA256:...` fingerprint of the public key, as OpenSSH prints it.
    pub fn fingerprint(&self) -> Result<String> {
        fingerprint_openssh(&self.public_openssh)
    }
}

/// Generate a new ed25519 key pair.
pub fn generate(comment: &str) -> Result<KeyPair> {
    let mut key =
        PrivateKey::random(&mut rand_core::OsRng, Algorithm::Ed25519).context("generate ed25519 key")?;
    key.set_comment(comment);
    KeyPair::from_private(&key)
}

/// The machine's user and host keys, created (0600) on first use and reused afterwards.
pub fn ensure_machine_keys(state: &StateDir, machine: &str) -> Result<(KeyPair, KeyPair)> {
    state.ensure()?;
    let user = ensure_key(&state.user_key(), &format!("provisioner@{machine}"))?;
    let host = ensure_key(&state.host_key(), &format!("root@{machine}"))?;
    Ok((user, host))
}

/// Load the private key at `path` (re-writing its `.pub`), or generate and store a new one.
fn ensure_key(path: &Path, comment: &str) -> Result<KeyPair> {
    let pair = match std::fs::read_to_string(path) {
        Ok(pem) => {
            let key = PrivateKey::from_openssh(&pem).with_context(|| {
                format!(
                    "{} is not a valid OpenSSH private key\nhint: remove the state with `provisioner destroy -f` and run `provisioner up` again",
                    path.display()
                )
            })?;
            KeyPair::from_private(&key)?
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let pair = generate(comment)?;
            write_private(path, pair.private_openssh.as_bytes(), 0o600)?;
            pair
        }
        Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
    };
    let public = path.with_extension("pub");
    if std::fs::read_to_string(&public).ok().as_deref().map(str::trim) != Some(pair.public_openssh.trim()) {
        write_private(&public, format!("{}\n", pair.public_openssh).as_bytes(), 0o644)?;
    }
    Ok(pair)
}

/// Write `<state>/known_hosts` pinning `host_pub` for `host:port` (OpenSSH spells non-22 ports `[host]:port`).
pub fn write_known_hosts(state: &StateDir, host: &str, port: u16, host_pub: &str) -> Result<()> {
    state.ensure()?;
    let key = PublicKey::from_openssh(host_pub.trim())
        .context("the pinned host key is not an OpenSSH public key")?;
    let pattern = if port == 22 { host.to_string() } else { format!("[{host}]:{port}") };
    let line = format!("{pattern} {}\n", key.to_openssh().context("encode host key")?);
    let path = state.known_hosts();
    // Called by every `provisioner ssh`: a file that already pins exactly this (0600) is left alone, sparing a
    // temp file and an fsync per call.
    let current = std::fs::read(&path).ok().zip(std::fs::symlink_metadata(&path).ok());
    if current.is_some_and(|(bytes, meta)| {
        bytes == line.as_bytes()
            && meta.is_file()
            && crate::platform::mode(&meta).map_or(true, |m| m & 0o777 == 0o600)
    }) {
        return Ok(());
    }
    write_private(&path, line.as_bytes(), 0o600)
}

/// `SHA256:...` fingerprint of an OpenSSH public key line.
pub fn fingerprint_openssh(public: &str) -> Result<String> {
    let key = PublicKey::from_openssh(public.trim()).context("not an OpenSSH public key")?;
    Ok(key.fingerprint(HashAlg::Sha256).to_string())
}

/// `SHA256:...` fingerprint of a public key in SSH wire format (what a server presents); `None` if undecodable.
pub fn fingerprint_blob(blob: &[u8]) -> Option<String> {
    PublicKey::from_bytes(blob).ok().map(|k| k.fingerprint(HashAlg::Sha256).to_string())
}

/// The SSH wire-format blob of an OpenSSH public key line (to compare with what a server presents).
pub fn public_blob(public: &str) -> Result<Vec<u8>> {
    let key = PublicKey::from_openssh(public.trim()).context("not an OpenSSH public key")?;
    key.to_bytes().context("encode public key")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_created_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::at(dir.path().join(".provisioner"));
        let (user, host) = ensure_machine_keys(&state, "m1").unwrap();
        assert!(user.public_openssh.starts_with("ssh-ed25519 "));
        assert_ne!(user.public_openssh, host.public_openssh);
        for p in [state.user_key(), state.host_key()] {
            // Windows has no mode bits: there the key is private by its ACL (platform::set_file_mode).
            if let Some(mode) = crate::platform::mode(&std::fs::metadata(&p).unwrap()) {
                assert_eq!(mode & 0o777, 0o600, "{}", p.display());
            }
            assert!(p.with_extension("pub").is_file());
        }
        let (user2, host2) = ensure_machine_keys(&state, "m1").unwrap();
        assert_eq!(user.public_openssh, user2.public_openssh);
        assert_eq!(host.private_openssh, host2.private_openssh);
        assert!(!format!("{user:?}").contains("PRIVATE"));
    }

    #[test]
    fn known_hosts_pins_bracketed_port_and_fingerprints_agree() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::at(dir.path());
        let host = generate("h").unwrap();
        write_known_hosts(&state, "127.0.0.1", 2222, &host.public_openssh).unwrap();
        let text = std::fs::read_to_string(state.known_hosts()).unwrap();
        assert!(text.starts_with("[127.0.0.1]:2222 ssh-ed25519 "), "{text}");
        let fp = host.fingerprint().unwrap();
        assert!(fp.starts_with("SHA256:") && !fp.ends_with('='), "{fp}");
        assert_eq!(
            fingerprint_blob(&public_blob(&host.public_openssh).unwrap()).as_deref(),
            Some(fp.as_str())
        );
        // Unchanged: the file is left alone (same inode); another key, port or a wrong mode: rewritten, 0600.
        let old = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        std::fs::File::options().write(true).open(state.known_hosts()).unwrap().set_modified(old).unwrap();
        write_known_hosts(&state, "127.0.0.1", 2222, &host.public_openssh).unwrap();
        let mtime = std::fs::metadata(state.known_hosts()).unwrap().modified().unwrap();
        assert_eq!(mtime, old, "an unchanged pin is not written again");
        write_known_hosts(&state, "127.0.0.1", 2223, &host.public_openssh).unwrap();
        assert!(std::fs::read_to_string(state.known_hosts()).unwrap().starts_with("[127.0.0.1]:2223 "));
        crate::platform::set_mode(&state.known_hosts(), 0o644).unwrap();
        write_known_hosts(&state, "127.0.0.1", 2223, &host.public_openssh).unwrap();
        let meta = std::fs::metadata(state.known_hosts()).unwrap();
        assert!(crate::platform::mode(&meta).map_or(true, |m| m & 0o777 == 0o600), "{meta:?}");
    }
}
