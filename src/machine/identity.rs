//! One identity per machine: the canonical path of its state dir.
//!
//! The same project can be reached by many spellings (`../proj`, a symlinked directory, a different case on
//! Windows). Everything that names or recognises a machine goes through [`MachineId`], computed ONCE per run from
//! the config's directory: the hypervisor name (`provisioner-<machine>-<8 hex of the canonical path>`), the
//! ownership markers written into the hypervisor (libvirt `<metadata>`, VirtualBox `--description`) and every
//! comparison of a recorded marker with this machine ([`same_dir`]). A marker written by an older version with a
//! non-canonical spelling still matches, because the recorded path is canonicalised before it is compared.

use std::path::{Component, Path, PathBuf};

use anyhow::{Context, Result};

use super::{StateDir, STATE_DIR_NAME};

/// A machine's identity: its canonical state dir and hypervisor name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineId {
    state_dir: PathBuf,
    vm_name: String,
}

impl MachineId {
    /// The identity of the machine `name` whose config lives in `base_dir` (which must exist).
    pub fn new(base_dir: &Path, name: &str) -> Result<Self> {
        let base = crate::platform::canonicalize(base_dir)
            .with_context(|| format!("resolve the project directory {}", base_dir.display()))?;
        Ok(Self::from_canonical(&base, name))
    }

    /// The identity of the machine a config describes: for a machine of a `[[machine]]` file the state dir is
    /// `.provisioner/machines/<name>` (the VM name is formed the same way in both layouts).
    pub fn for_config(cfg: &crate::config::Config) -> Result<Self> {
        let base = crate::platform::canonicalize(cfg.base_dir())
            .with_context(|| format!("resolve the project directory {}", cfg.base_dir().display()))?;
        Ok(Self { state_dir: super::machine_dir(&base, cfg), vm_name: vm_name_for(&base, &cfg.machine.name) })
    }

    /// From an already canonical base dir (no file system access).
    pub fn from_canonical(base: &Path, name: &str) -> Self {
        Self { state_dir: base.join(STATE_DIR_NAME), vm_name: vm_name_for(base, name) }
    }

    /// The canonical state dir (`<canonical project dir>/.provisioner`).
    pub fn state_dir(&self) -> StateDir {
        StateDir::at(&self.state_dir)
    }

    /// The hypervisor name for the machine.
    pub fn vm_name(&self) -> &str {
        &self.vm_name
    }

    /// Whether a state dir recorded in a marker is this machine's.
    pub fn owns(&self, recorded: &str) -> bool {
        same_dir(Path::new(recorded), &self.state_dir)
    }
}

/// `provisioner-<machine>-<first 8 hex of sha256(canonical base dir)>`. Unchanged since the first release, so
/// existing machines keep their names.
fn vm_name_for(canonical_base: &Path, name: &str) -> String {
    use sha2::{Digest, Sha256};
    let h = Sha256::digest(canonical_base.to_string_lossy().as_bytes());
    format!("provisioner-{name}-{}", &hex::encode(h)[..8])
}

/// Whether two spellings name the same directory: both are canonicalised when they exist (symlinks and `..`
/// resolved), else normalised lexically; compared case-insensitively on Windows, where paths are.
pub fn same_dir(a: &Path, b: &Path) -> bool {
    key(&canonical_or_lexical(a)) == key(&canonical_or_lexical(b))
}

fn canonical_or_lexical(p: &Path) -> PathBuf {
    if let Ok(c) = crate::platform::canonicalize(p) {
        return c;
    }
    // A path that no longer exists: resolve its deepest existing ancestor, then append the rest lexically.
    let abs = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let mut out = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other.as_os_str()),
        }
    }
    let mut existing = out.clone();
    let mut rest = Vec::new();
    while !existing.exists() {
        match (existing.file_name().map(|n| n.to_os_string()), existing.parent()) {
            (Some(n), Some(parent)) => {
                rest.push(n);
                existing = parent.to_path_buf();
            }
            _ => return out,
        }
    }
    let mut resolved = crate::platform::canonicalize(&existing).unwrap_or(existing);
    resolved.extend(rest.iter().rev());
    resolved
}

/// What two spellings compare by (case-folded on Windows, whose file names ignore case).
fn key(p: &Path) -> String {
    crate::platform::path_key(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg_attr(windows, ignore = "windows: making a symbolic link needs developer mode or elevation")]
    fn every_spelling_of_a_dir_is_the_same_machine() {
        let t = tempfile::tempdir().unwrap();
        let real = t.path().join("proj");
        let other = t.path().join("other");
        std::fs::create_dir_all(real.join(STATE_DIR_NAME)).unwrap();
        std::fs::create_dir_all(&other).unwrap();
        crate::platform::symlink(&real, &t.path().join("link")).unwrap();
        let id = MachineId::new(&real, "lab").unwrap();
        let via_dots = MachineId::new(&other.join("../proj"), "lab").unwrap();
        let via_link = MachineId::new(&t.path().join("link"), "lab").unwrap();
        assert_eq!(id, via_dots);
        assert_eq!(id, via_link);
        // Markers recorded with the old, non-canonical spellings still match; another dir does not.
        assert!(id.owns(&format!("{}/../proj/.provisioner", other.display())));
        assert!(id.owns(&format!("{}/link/.provisioner", t.path().display())));
        assert!(!id.owns(&format!("{}/.provisioner", other.display())));
        // A marker naming a dir that is gone is compared lexically.
        assert!(!id.owns("/nonexistent/x/../proj/.provisioner"));
        assert!(same_dir(Path::new("/nonexistent/a/../b"), Path::new("/nonexistent/b")));
    }

    #[test]
    fn vm_name_is_the_historic_one() {
        // sha256("/home/u/lab") starts with these 8 hex digits: names of existing machines never change.
        use sha2::{Digest, Sha256};
        let want = format!("provisioner-lab-{}", &hex::encode(Sha256::digest(b"/home/u/lab"))[..8]);
        assert_eq!(MachineId::from_canonical(Path::new("/home/u/lab"), "lab").vm_name(), want);
    }
}
