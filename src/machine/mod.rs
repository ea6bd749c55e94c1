//! Per-machine state: the `.provisioner/` directory beside box-config.toml, its lock, and what lives in it.
//!
//! Layout (all files the tool writes for one machine; `destroy` removes the directory):
//! ```text
//! .provisioner/
//!   lock               flock held by the running command; holds its PID
//!   state.json         provider, VM name and UUID, box id, ssh endpoint, timings
//!   id_ed25519(.pub)   per-machine user key (0600)
//!   host_ed25519(.pub) the guest's host key, generated here, put in the seed (0600)
//!   known_hosts        the pinned host key, for `ssh` / ssh-config
//!   secrets.toml       generated lab secrets (0600), stable across re-renders
//!   seed.iso           cloud-init NoCloud seed
//!   disk.qcow2         copy-on-write overlay on the cached box (libvirt)
//!   serial.log         the guest's serial console
//! ```
//! A `[[machine]]` project keeps the same files per machine in `.provisioner/machines/<name>/`, plus a project
//! lock `.provisioner/project.lock` held while the private network is set up.

pub mod identity;
pub mod lock;
pub mod state;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::config::Config;

pub const STATE_DIR_NAME: &str = ".provisioner";
/// The project lock file in `.provisioner/`, held while the project's private network is set up.
pub const PROJECT_LOCK: &str = "project.lock";
/// In a `[[machine]]` project, each machine's state dir is `.provisioner/machines/<name>/` (same layout as above).
pub const MACHINES_DIR: &str = "machines";

/// The one rule for where a machine's state lives under its project directory `base`: `.provisioner/` for the
/// machine of a `[machine]` file (a project of one: its state dir is unchanged since the first release, so existing
/// machines are found), `.provisioner/machines/<name>/` for a machine of a `[[machine]]` file. Pure.
pub fn machine_dir(base: &Path, cfg: &Config) -> PathBuf {
    let root = base.join(STATE_DIR_NAME);
    match &cfg.member {
        Some(_) => root.join(MACHINES_DIR).join(&cfg.machine.name),
        None => root,
    }
}

/// The project directory of a state dir laid out by [`machine_dir`], and the machine's name when it is one of a
/// `[[machine]]` file; None for a path of another shape. Pure.
pub fn project_of(state_dir: &Path) -> Option<(PathBuf, Option<String>)> {
    if state_dir.file_name()? == STATE_DIR_NAME {
        return Some((state_dir.parent()?.to_path_buf(), None));
    }
    let name = state_dir.file_name()?.to_str()?.to_string();
    let machines = state_dir.parent()?;
    let root = machines.parent()?;
    (machines.file_name()? == MACHINES_DIR && root.file_name()? == STATE_DIR_NAME)
        .then(|| root.parent().map(|p| (p.to_path_buf(), Some(name))))
        .flatten()
}

/// Paths of one machine's state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    pub root: PathBuf,
}

impl StateDir {
    /// The machine's state dir, spelt from the config's directory as given (see [`machine_dir`]).
    pub fn for_config(cfg: &Config) -> Self {
        Self::at(machine_dir(&cfg.base_dir(), cfg))
    }
    /// The state dir of the config file at `config_path`, which need not parse.
    pub fn beside(config_path: &std::path::Path) -> Self {
        Self { root: crate::config::base_dir_of(config_path).join(STATE_DIR_NAME) }
    }
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
    /// Create the directory (0700) if missing.
    pub fn ensure(&self) -> Result<()> {
        if !self.root.is_dir() {
            crate::platform::create_dir(&self.root, 0o700, true)
                .with_context(|| format!("create state dir {}", self.root.display()))?;
        }
        Ok(())
    }
    pub fn exists(&self) -> bool {
        self.root.is_dir()
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
    pub fn lock_file(&self) -> PathBuf {
        self.path("lock")
    }
    pub fn state_file(&self) -> PathBuf {
        self.path("state.json")
    }
    pub fn user_key(&self) -> PathBuf {
        self.path("id_ed25519")
    }
    pub fn host_key(&self) -> PathBuf {
        self.path("host_ed25519")
    }
    pub fn known_hosts(&self) -> PathBuf {
        self.path("known_hosts")
    }
    pub fn secrets(&self) -> PathBuf {
        self.path("secrets.toml")
    }
    pub fn seed_iso(&self) -> PathBuf {
        self.path("seed.iso")
    }
    pub fn disk(&self) -> PathBuf {
        self.path("disk.qcow2")
    }
    pub fn serial_log(&self) -> PathBuf {
        self.path("serial.log")
    }
}

/// Write a file atomically (temp file in the same dir + rename) with the given mode (on Windows a private mode is an
/// ACL for the current user only, which the rename keeps; see `platform::set_file_mode`).
pub fn write_private(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    use std::io::Write;
    let dir = path.parent().context("path has no parent")?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("create temp file in {}", dir.display()))?;
    crate::platform::set_file_mode(tmp.as_file(), tmp.path(), mode)
        .with_context(|| format!("set the mode of {}", tmp.path().display()))?;
    tmp.write_all(data)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).with_context(|| format!("write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::identity::MachineId;
    use super::*;

    #[test]
    fn a_state_dir_names_its_project_and_member() {
        let p = |s: &str| project_of(Path::new(s));
        assert_eq!(p("/srv/lab/.provisioner"), Some((PathBuf::from("/srv/lab"), None)));
        assert_eq!(
            p("/srv/cluster/.provisioner/machines/app1"),
            Some((PathBuf::from("/srv/cluster"), Some("app1".to_string())))
        );
        for other in ["/srv/lab", "/srv/x/machines/app1", "/srv/x/.provisioner/other/app1", "/"] {
            assert_eq!(p(other), None, "{other}");
        }
    }

    #[test]
    fn one_rule_places_every_machines_state_dir() {
        // The machine of a `[machine]` file: `.provisioner/` beside the file, as since the first release, whether
        // spelt as given (StateDir) or canonical (MachineId); its VM name is the historic one.
        let t = tempfile::tempdir().unwrap();
        let single = Config::stand_in(&t.path().join("box-config.toml"), "lab");
        assert_eq!(StateDir::for_config(&single).root, t.path().join(STATE_DIR_NAME));
        let canon = crate::platform::canonicalize(t.path()).unwrap();
        let id = MachineId::for_config(&single).unwrap();
        assert_eq!(id.state_dir().root, canon.join(STATE_DIR_NAME));
        assert_eq!(id.vm_name(), MachineId::new(t.path(), "lab").unwrap().vm_name());

        // A machine of a `[[machine]]` file: its own dir under `machines/`, both ways; the VM name formed alike.
        let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/cluster");
        let project = crate::config::Project::load(&base.join("box-config.toml")).unwrap();
        let monitor = project.one(Some("monitor")).unwrap();
        let rel = Path::new(STATE_DIR_NAME).join(MACHINES_DIR).join("monitor");
        assert_eq!(StateDir::for_config(monitor).root, base.join(&rel));
        let id = MachineId::for_config(monitor).unwrap();
        assert_eq!(id.state_dir().root, crate::platform::canonicalize(&base).unwrap().join(&rel));
        assert_eq!(id.vm_name(), MachineId::new(&base, "monitor").unwrap().vm_name());
    }
}
