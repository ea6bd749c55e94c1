//! Cached clean labs: after an `up` that created a machine and ended healthy, a capture of it (disk, memory, the
//! keys and secrets that match what is inside) is kept in `<cache_dir>/labs/<key>/`, so `destroy -f && up` with
//! unchanged inputs restores it in seconds instead of booting and provisioning again.
//!
//! The key ([`lab_key`]) covers everything that shaped the machine: the tool version, the provider and the
//! accelerator (a QEMU memory image only loads under the same one), the hypervisor name of the machine (so, the
//! project directory), the base box id, the whole box-config.toml as parsed, and the provision template tree.
//! Any change gives another key: the full path runs, and its capture replaces the machine's older entry.
//!
//! An entry is written in `<key>.partial-<pid>` and renamed into place with `lab.json` inside, so a crash never
//! leaves an entry that counts. Entries are private (0700 dir, 0600 files): they hold the machine's keys.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::cache::{dir_size, now_rfc3339, remove_tree, short};

/// Bump when the layout of an entry changes: older entries then simply miss.
const FORMAT: u32 = 1;
/// Files of the state dir that travel with an entry (in `keys/`), all 0600.
pub const KEY_FILES: [&str; 6] =
    ["id_ed25519", "id_ed25519.pub", "host_ed25519", "host_ed25519.pub", "known_hosts", "secrets.toml"];

/// Everything that shaped a provisioned machine, as the cache key sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LabInputs {
    pub tool_version: String,
    pub provider: String,
    pub accel: String,
    pub vm_name: String,
    pub box_id: String,
    /// The parsed box-config.toml (JSON), see [`config_fingerprint`].
    pub config: String,
    /// [`tree_hash`] of the provision tree's layers (`[provision] base`, then `source`).
    pub tree: String,
}

/// The cache key: sha256 over the inputs and the entry format. Pure.
pub fn lab_key(i: &LabInputs) -> String {
    use sha2::{Digest, Sha256};
    let doc = serde_json::json!({"format": FORMAT, "inputs": i});
    hex::encode(Sha256::digest(doc.to_string().as_bytes()))
}

/// The config as the key sees it: every table as parsed, minus the cache switch itself. Pure.
pub fn config_fingerprint(cfg: &crate::config::Config) -> Result<String> {
    let mut c = cfg.clone();
    c.machine.cache_lab = true;
    Ok(serde_json::to_string(&c)?)
}

/// sha256 over the relative path, executable bit and content of every file under each of `layers`, in layer
/// then path order (a missing layer adds nothing: `[""]` hashes a project with no tree).
pub fn tree_hash(layers: &[PathBuf]) -> Result<String> {
    use sha2::{Digest, Sha256};
    use std::os::unix::fs::PermissionsExt;
    let mut h = Sha256::new();
    for (i, dir) in layers.iter().enumerate().filter(|(_, d)| d.is_dir()) {
        h.update(format!("layer {i}\0").as_bytes());
        for e in walkdir::WalkDir::new(dir).sort_by_file_name() {
            let e = e.with_context(|| format!("read {}", dir.display()))?;
            if !e.file_type().is_file() {
                continue;
            }
            let rel = e.path().strip_prefix(dir).unwrap_or(e.path()).to_string_lossy().into_owned();
            let exec = e.metadata()?.permissions().mode() & 0o111 != 0;
            let data = std::fs::read(e.path()).with_context(|| format!("read {}", e.path().display()))?;
            h.update(format!("{rel}\0{exec}\0{}\0", data.len()).as_bytes());
            h.update(&data);
        }
    }
    Ok(hex::encode(h.finalize()))
}

/// `lab.json`: one cached lab.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LabMeta {
    pub key: String,
    pub machine: String,
    pub vm_name: String,
    /// The directory of the box-config.toml it was made from.
    pub project_dir: String,
    pub provider: String,
    pub box_id: String,
    /// What the provider needs to restore it (libvirt: the domain UUID the memory image carries).
    pub provider_data: String,
    /// UTC, RFC 3339.
    pub created: String,
    pub size: u64,
}

/// The `labs/` directory of the cache.
#[derive(Debug, Clone)]
pub struct Labs {
    pub root: PathBuf,
}

impl Labs {
    pub fn open() -> Result<Self> {
        Self::at(super::cache_dir().join("labs"))
    }

    pub fn at(root: PathBuf) -> Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&root).with_context(|| {
            format!(
                "cannot create {}\nhint: set PROVISIONER_CACHE_DIR to a writable directory",
                root.display()
            )
        })?;
        Ok(Self { root })
    }

    pub fn entry_dir(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    pub fn get(&self, key: &str) -> Result<Option<LabMeta>> {
        let path = self.entry_dir(key).join("lab.json");
        match std::fs::read_to_string(&path) {
            Ok(t) => Ok(serde_json::from_str(&t).ok()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("read {}", path.display())),
        }
    }

    /// Every complete entry, oldest first.
    pub fn list(&self) -> Result<Vec<LabMeta>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.root).with_context(|| format!("read {}", self.root.display()))? {
            let name = e?.file_name().to_string_lossy().into_owned();
            if !name.contains('.') {
                if let Some(m) = self.get(&name)? {
                    out.push(m);
                }
            }
        }
        out.sort_by(|a, b| a.created.cmp(&b.created).then(a.key.cmp(&b.key)));
        Ok(out)
    }

    /// A new, private, empty directory to fill for `key`.
    pub fn begin(&self, key: &str) -> Result<PathBuf> {
        use std::os::unix::fs::DirBuilderExt;
        let partial = self.root.join(format!("{key}.partial-{}", std::process::id()));
        let _ = remove_tree(&partial);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&partial)
            .with_context(|| format!("create {}", partial.display()))?;
        Ok(partial)
    }

    /// Put a filled `partial` in place as entry `meta.key`; drop the other entries of the same machine and
    /// those whose project directory is gone (nothing can restore them any more).
    pub fn commit(&self, partial: &Path, mut meta: LabMeta) -> Result<LabMeta> {
        meta.created = now_rfc3339();
        meta.size = dir_size(partial);
        crate::machine::write_private(&partial.join("lab.json"), &serde_json::to_vec_pretty(&meta)?, 0o600)?;
        let entry = self.entry_dir(&meta.key);
        if entry.exists() {
            self.remove_dir(&entry)?;
        }
        std::fs::rename(partial, &entry)
            .with_context(|| format!("move {} to {}", partial.display(), entry.display()))?;
        for old in self.list()? {
            let orphan = !Path::new(&old.project_dir).is_dir();
            if old.key != meta.key && (old.vm_name == meta.vm_name || orphan) {
                self.remove_dir(&self.entry_dir(&old.key))?;
            }
        }
        Ok(meta)
    }

    /// Remove an entry by its key or a unique prefix of it; returns what was removed.
    pub fn remove(&self, key_or_prefix: &str) -> Result<LabMeta> {
        let all = self.list()?;
        let hits: Vec<&LabMeta> = all.iter().filter(|m| m.key.starts_with(key_or_prefix)).collect();
        let meta = match hits.as_slice() {
            [one] if !key_or_prefix.is_empty() => (*one).clone(),
            [] | [_] => bail!(
                "no cached lab has the id {key_or_prefix:?} (cache: {})\nhint: `provisioner box list` shows the ids",
                self.root.display()
            ),
            many => bail!(
                "{key_or_prefix:?} matches {} cached labs ({}); give more of the id",
                many.len(),
                many.iter().map(|m| short(&m.key)).collect::<Vec<_>>().join(", ")
            ),
        };
        self.remove_dir(&self.entry_dir(&meta.key))?;
        Ok(meta)
    }

    fn remove_dir(&self, dir: &Path) -> Result<()> {
        let gone = self.root.join(format!(
            "{}.removing-{}",
            dir.file_name().unwrap_or_default().to_string_lossy(),
            std::process::id()
        ));
        std::fs::rename(dir, &gone).with_context(|| format!("move {} aside", dir.display()))?;
        remove_tree(&gone)
    }
}

/// Copy the machine's keys and secrets between a state dir and an entry's `keys/` (0600 each).
pub fn copy_keys(from: &Path, to: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(to)?;
    for f in KEY_FILES {
        let src = from.join(f);
        if src.is_file() {
            let data = std::fs::read(&src).with_context(|| format!("read {}", src.display()))?;
            crate::machine::write_private(&to.join(f), &data, 0o600)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs() -> LabInputs {
        LabInputs {
            tool_version: "0.1.0".into(),
            provider: "libvirt".into(),
            accel: "tcg".into(),
            vm_name: "provisioner-lab-0123abcd".into(),
            box_id: "6e3b".into(),
            config: "{}".into(),
            tree: "aa".into(),
        }
    }

    #[test]
    fn every_input_changes_the_key() {
        let base = lab_key(&inputs());
        assert_eq!(base, lab_key(&inputs()), "the key is a pure function");
        assert_eq!(base.len(), 64);
        let edits: [fn(&mut LabInputs); 7] = [
            |i| i.tool_version.push('1'),
            |i| i.provider = "virtualbox".into(),
            |i| i.accel = "kvm".into(),
            |i| i.vm_name.push('x'),
            |i| i.box_id.push('0'),
            |i| i.config = "{\"a\":1}".into(),
            |i| i.tree = "ab".into(),
        ];
        for (n, edit) in edits.iter().enumerate() {
            let mut i = inputs();
            edit(&mut i);
            assert_ne!(lab_key(&i), base, "edit {n} kept the key");
        }
    }

    #[test]
    fn tree_hash_sees_a_one_line_edit_a_new_file_the_exec_bit_and_each_layer() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let hash = |layers: &[&str]| {
            tree_hash(&layers.iter().map(|l| t.path().join(l)).collect::<Vec<_>>()).unwrap()
        };
        assert_eq!(hash(&["missing"]), hash(&[]));
        std::fs::create_dir_all(t.path().join("p/sub")).unwrap();
        std::fs::write(t.path().join("p/a.hbs"), "line 1\nline 2\n").unwrap();
        std::fs::write(t.path().join("p/sub/b"), "x").unwrap();
        let h0 = hash(&["p"]);
        assert_eq!(h0, hash(&["p"]));
        std::fs::write(t.path().join("p/a.hbs"), "line 1\nline 2 edited\n").unwrap();
        let h1 = hash(&["p"]);
        assert_ne!(h0, h1);
        std::fs::set_permissions(t.path().join("p/sub/b"), std::fs::Permissions::from_mode(0o755)).unwrap();
        let h2 = hash(&["p"]);
        assert_ne!(h1, h2);
        std::fs::write(t.path().join("p/c"), "").unwrap();
        let h3 = hash(&["p"]);
        assert_ne!(h2, h3);
        // A base layer counts, and the same file in the base or in the overlay is a different lab.
        std::fs::create_dir_all(t.path().join("base")).unwrap();
        std::fs::write(t.path().join("base/d"), "d").unwrap();
        let h4 = hash(&["base", "p"]);
        assert_ne!(h3, h4);
        std::fs::rename(t.path().join("base/d"), t.path().join("p/d")).unwrap();
        assert_ne!(h4, hash(&["base", "p"]));
    }

    #[test]
    fn commit_replaces_the_machines_older_entry_and_drops_orphans() {
        let t = tempfile::tempdir().unwrap();
        let labs = Labs::at(t.path().join("labs")).unwrap();
        let project = t.path().join("project");
        std::fs::create_dir_all(&project).unwrap();
        let meta = |key: &str, vm: &str, dir: &Path| LabMeta {
            key: key.into(),
            machine: "lab".into(),
            vm_name: vm.into(),
            project_dir: dir.display().to_string(),
            provider: "libvirt".into(),
            box_id: "b".into(),
            provider_data: "uuid".into(),
            created: String::new(),
            size: 0,
        };
        let fill = |key: &str| {
            let p = labs.begin(key).unwrap();
            std::fs::write(p.join("disk.qcow2"), b"1234").unwrap();
            p
        };
        labs.commit(&fill("k1"), meta("k1", "vm-a", &project)).unwrap();
        labs.commit(&fill("gone"), meta("gone", "vm-b", &t.path().join("deleted"))).unwrap();
        let got = labs.get("k1").unwrap().unwrap();
        assert_eq!(got.size, 4);
        let k2 = labs.commit(&fill("k2"), meta("k2", "vm-a", &project)).unwrap();
        let keys: Vec<String> = labs.list().unwrap().into_iter().map(|m| m.key).collect();
        assert_eq!(keys, vec!["k2".to_string()], "older entry of vm-a and the orphan must go");
        assert_eq!(k2.key, "k2");
        assert!(labs.remove("k").is_ok());
        assert!(labs.list().unwrap().is_empty());
        let leftovers: Vec<_> = std::fs::read_dir(&labs.root).unwrap().collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn keys_travel_private() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("id_ed25519"), "secret").unwrap();
        std::fs::write(t.path().join("secrets.toml"), "x = 1").unwrap();
        copy_keys(t.path(), &t.path().join("entry/keys")).unwrap();
        for f in ["id_ed25519", "secrets.toml"] {
            let md = std::fs::metadata(t.path().join("entry/keys").join(f)).unwrap();
            assert_eq!(md.permissions().mode() & 0o777, 0o600, "{f}");
        }
        assert!(!t.path().join("entry/keys/host_ed25519").exists());
    }
}
