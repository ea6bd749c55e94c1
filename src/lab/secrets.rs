//! The lab's secrets: generated once per machine, kept 0600 in the state dir (`secrets.toml`), stable across
//! re-renders; templates see them as `secrets.*`.

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use serde::{Deserialize, Serialize};

use crate::machine::{write_private, StateDir};

/// Secrets generated once per machine.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Secrets {
    /// 32 random bytes, hex.
    pub prometheus_hex: String,
    /// Grafana admin password: 24 characters from [A-Za-z0-9].
    pub grafana_admin_password: String,
}

impl Secrets {
    pub fn generate() -> Self {
        use rand_core::{OsRng, RngCore};
        let mut b = [0u8; 32];
        OsRng.fill_bytes(&mut b);
        const ALPHA: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789";
        let mut pw = String::new();
        while pw.len() < 24 {
            let mut x = [0u8; 1];
            OsRng.fill_bytes(&mut x);
            // Rejection sampling keeps the distribution uniform.
            if (x[0] as usize) < 256 - (256 % ALPHA.len()) {
                pw.push(ALPHA[x[0] as usize % ALPHA.len()] as char);
            }
        }
        Self { prometheus_hex: hex::encode(b), grafana_admin_password: pw }
    }

    /// [`Secrets::load_or_create`] in the state dir at `root`, as templates see them (the profile's hook).
    pub fn json_in(root: &Path) -> Result<serde_json::Value> {
        Ok(serde_json::to_value(Self::load_or_create(&StateDir::at(root))?)?)
    }

    /// Fresh secrets as templates see them, saved nowhere (validation renders with them).
    pub fn sample_json() -> serde_json::Value {
        serde_json::to_value(Self::generate()).expect("secrets serialize")
    }

    /// Load from the state dir, generating (and saving 0600) on first use. Creation happens under the
    /// state dir's secrets lock, so concurrent commands (two `render`s, `render` and `up`) agree on one set.
    pub fn load_or_create(state: &StateDir) -> Result<Self> {
        let p = state.secrets();
        if let Some(s) = Self::load(&p)? {
            return Ok(s);
        }
        state.ensure()?;
        let _lock = crate::machine::lock::wait_for(&state.path("secrets.lock"), SECRETS_LOCK_WAIT)?;
        // Another command may have made them while this one waited.
        if let Some(s) = Self::load(&p)? {
            return Ok(s);
        }
        let s = Self::generate();
        write_private(&p, toml::to_string(&s)?.as_bytes(), 0o600)?;
        Ok(s)
    }

    /// The saved secrets, if any. A damaged file is reported by position only: neither the parser's message nor
    /// its quote of the line is shown, since either may hold a secret.
    fn load(p: &Path) -> Result<Option<Self>> {
        let text = match std::fs::read(p) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("read {}", p.display())),
        };
        let damaged = |at: String| {
            anyhow!(
                "{}{at}: the lab secrets file is damaged (its contents are not shown)\nhint: delete it to generate \
                 new lab secrets; `provisioner provision` then uploads them to the guest",
                p.display()
            )
        };
        let text = String::from_utf8(text).map_err(|_| damaged(String::new()))?;
        toml::from_str(&text).map(Some).map_err(|e| {
            let at = e.span().map(|r| crate::config::line_col(&text, r.start));
            damaged(at.map(|(l, c)| format!(":{l}:{c}")).unwrap_or_default())
        })
    }
}

/// How long a command waits for another one creating the lab secrets (a few milliseconds of work).
const SECRETS_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(30);
