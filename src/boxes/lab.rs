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
//!
//! `lab.json` records every file of the entry (size, mtime, sha256; a sampled hash of the large ones), and
//! [`Labs::lookup`] checks the entry against that record before `up` uses it ([`verify`]): a truncated, edited or
//! missing file drops the entry with the reason, and `up` takes the full path instead of restoring a lab that
//! cannot work.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::cache::{dir_size, now_rfc3339, remove_tree, short};

/// Bump when the layout of an entry changes: older entries then simply miss.
/// 2: `lab.json` records the entry's files.
const FORMAT: u32 = 2;
/// Files up to this size are hashed whole at every lookup (memory.xml, the keys); larger ones (memory.save,
/// disk.qcow2: hundreds of MB) by size, mtime and [`SAMPLES`] blocks of [`SAMPLE`] bytes, and whole only when
/// their mtime moved. A whole sha256 costs about 0.8 s per GiB on the 2-core build host (see docs/vm.md).
const SMALL: u64 = 4 << 20;
const SAMPLES: u64 = 32;
const SAMPLE: u64 = 64 << 10;
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
    /// The key of the container base image the lab's debian-mode images are built FROM (its build script, suite,
    /// mirror, packages and the profile's setup): a tool whose base image changed builds the lab again.
    pub base_image: String,
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
    let mut h = Sha256::new();
    for (i, dir) in layers.iter().enumerate().filter(|(_, d)| d.is_dir()) {
        h.update(format!("layer {i}\0").as_bytes());
        for e in walkdir::WalkDir::new(dir).sort_by_file_name() {
            let e = e.with_context(|| format!("read {}", dir.display()))?;
            if !e.file_type().is_file() {
                continue;
            }
            let rel = slash_path(e.path().strip_prefix(dir).unwrap_or(e.path()));
            let data = std::fs::read(e.path()).with_context(|| format!("read {}", e.path().display()))?;
            // The executable bit as render sends it to the guest.
            let exec = crate::platform::mode_or_guess(&e.metadata()?, &data) & 0o111 != 0;
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
    /// Every file of the entry but lab.json, as committed (filled by [`Labs::commit`]).
    #[serde(default)]
    pub files: Vec<FileRecord>,
    /// The image mode the lab ran in ("registry" | "debian"; absent in entries made before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub images_mode: Option<String>,
}

/// One file of an entry as it was when the entry was committed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileRecord {
    /// Relative to the entry directory, `/`-separated.
    pub path: String,
    pub size: u64,
    /// Modification time, `seconds.nanoseconds`.
    pub mtime: String,
    /// sha256 of the whole file.
    pub sha256: String,
    /// For files above [`SMALL`]: sha256 of the sampled blocks ([`sampled_sha256`]).
    #[serde(default)]
    pub sampled: String,
}

/// A relative path with `/` between its parts on every OS, so records and hashes are the same on Windows.
fn slash_path(rel: &Path) -> String {
    rel.iter().map(|c| c.to_string_lossy()).collect::<Vec<_>>().join("/")
}

/// The record of every file under `dir` but lab.json, in path order.
pub fn record_files(dir: &Path) -> Result<Vec<FileRecord>> {
    let mut out = Vec::new();
    for e in walkdir::WalkDir::new(dir).sort_by_file_name() {
        let e = e.with_context(|| format!("read {}", dir.display()))?;
        if !e.file_type().is_file() || (e.depth() == 1 && e.file_name() == "lab.json") {
            continue;
        }
        let rel = slash_path(e.path().strip_prefix(dir).unwrap_or(e.path()));
        let md = e.metadata().with_context(|| format!("stat {}", e.path().display()))?;
        let size = md.len();
        out.push(FileRecord {
            path: rel,
            size,
            mtime: mtime(&md),
            sha256: super::cache::sha256_file(e.path())?,
            sampled: if size > SMALL { sampled_sha256(e.path(), size)? } else { String::new() },
        });
    }
    Ok(out)
}

fn mtime(md: &std::fs::Metadata) -> String {
    let t = md.modified().ok().and_then(|m| m.duration_since(std::time::UNIX_EPOCH).ok()).unwrap_or_default();
    format!("{}.{:09}", t.as_secs(), t.subsec_nanos())
}

/// sha256 over [`SAMPLES`] blocks of [`SAMPLE`] bytes spread evenly over a file of `size` bytes, the first and
/// the last included (2 MiB read, whatever the size).
pub fn sampled_sha256(path: &Path, size: u64) -> Result<String> {
    use sha2::{Digest, Sha256};
    let f = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut h = Sha256::new();
    let block = SAMPLE.min(size);
    let mut buf = vec![0u8; block as usize];
    for i in 0..SAMPLES {
        let at = (size - block) * i / (SAMPLES - 1);
        crate::platform::read_exact_at(&f, &mut buf, at)
            .with_context(|| format!("read {} at byte {at}", path.display()))?;
        h.update(&buf);
    }
    Ok(hex::encode(h.finalize()))
}

/// Check the files of the entry in `dir` against their record: `Err` says what is wrong (pure but for reading
/// the files). Every recorded file must exist with its size; a small one must have its sha256; a large one its
/// sampled hash, and its whole sha256 too when its mtime is not the recorded one (an edit that kept the size).
pub fn verify(dir: &Path, files: &[FileRecord]) -> std::result::Result<(), String> {
    if files.is_empty() {
        return Err("lab.json records none of its files (an entry of an older version)".into());
    }
    for r in files {
        let path = dir.join(&r.path);
        let md = match std::fs::metadata(&path) {
            Ok(md) if md.is_file() => md,
            Ok(_) => return Err(format!("{} is not a file", r.path)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(format!("{} is missing", r.path))
            }
            Err(e) => return Err(format!("cannot read {}: {e}", r.path)),
        };
        if md.len() != r.size {
            return Err(format!(
                "{} has {} bytes, {} were recorded (truncated or replaced)",
                r.path,
                md.len(),
                r.size
            ));
        }
        let changed = || format!("{} has other content than was recorded (same size, edited)", r.path);
        let unreadable = |e: anyhow::Error| format!("cannot read {}: {e:#}", r.path);
        if r.size > SMALL {
            if sampled_sha256(&path, r.size).map_err(unreadable)? != r.sampled {
                return Err(changed());
            }
            if mtime(&md) == r.mtime {
                continue;
            }
        }
        if super::cache::sha256_file(&path).map_err(unreadable)? != r.sha256 {
            return Err(changed());
        }
    }
    Ok(())
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
        crate::platform::create_dir(&root, 0o700, true).with_context(|| {
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

    /// Entry `key` if it is there and its files are as recorded ([`verify`]). An entry that is not is removed, and
    /// the second value says why (for a warning): the caller then takes the full path.
    pub fn lookup(&self, key: &str) -> Result<(Option<LabMeta>, Option<String>)> {
        let Some(meta) = self.get(key)? else { return Ok((None, None)) };
        let dir = self.entry_dir(key);
        match verify(&dir, &meta.files) {
            Ok(()) => Ok((Some(meta), None)),
            Err(why) => {
                let removed = match self.remove_dir(&dir) {
                    Ok(()) => "it was removed".to_string(),
                    Err(e) => format!("removing it failed ({e:#}); the next capture replaces it"),
                };
                Ok((
                    None,
                    Some(format!(
                        "the cached lab {} is not usable: {why}; {removed}, and this `up` takes the full path \
                         (boot and provisioning)",
                        short(key)
                    )),
                ))
            }
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
        let partial = self.root.join(format!("{key}.partial-{}", std::process::id()));
        let _ = remove_tree(&partial);
        crate::platform::create_dir(&partial, 0o700, false)
            .with_context(|| format!("create {}", partial.display()))?;
        Ok(partial)
    }

    /// Put a filled `partial` in place as entry `meta.key`; drop the other entries of the same machine and
    /// those whose project directory is gone (nothing can restore them any more).
    pub fn commit(&self, partial: &Path, mut meta: LabMeta) -> Result<LabMeta> {
        meta.created = now_rfc3339();
        meta.size = dir_size(partial);
        meta.files = record_files(partial)?;
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
    crate::platform::create_dir(to, 0o700, true)?;
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
            base_image: "3f86".into(),
            config: "{}".into(),
            tree: "aa".into(),
        }
    }

    #[test]
    fn every_input_changes_the_key() {
        let base = lab_key(&inputs());
        assert_eq!(base, lab_key(&inputs()), "the key is a pure function");
        assert_eq!(base.len(), 64);
        let edits: [fn(&mut LabInputs); 8] = [
            |i| i.tool_version.push('1'),
            |i| i.provider = "virtualbox".into(),
            |i| i.accel = "kvm".into(),
            |i| i.vm_name.push('x'),
            |i| i.box_id.push('0'),
            |i| i.base_image.push('0'),
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
    #[cfg_attr(windows, ignore = "windows: no exec bit to flip (a script's is guessed from its #! line)")]
    fn tree_hash_sees_a_one_line_edit_a_new_file_the_exec_bit_and_each_layer() {
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
        crate::platform::set_mode(&t.path().join("p/sub/b"), 0o755).unwrap();
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
            files: Vec::new(),
            images_mode: None,
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

    /// A committed entry as the libvirt capture writes it: a memory image and a disk above [`SMALL`] (checked by
    /// size, sampled hash and mtime), the saved XML and the keys below it (hashed whole at every lookup).
    fn committed(labs: &Labs, project: &Path) -> LabMeta {
        let p = labs.begin("k").unwrap();
        let big = |n: usize, seed: u8| {
            (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect::<Vec<u8>>()
        };
        std::fs::write(p.join("memory.save"), big(5 << 20, 1)).unwrap();
        std::fs::write(p.join("disk.qcow2"), big(6 << 20, 2)).unwrap();
        std::fs::write(p.join("memory.xml"), "<domain><name>vm-a</name></domain>\n").unwrap();
        std::fs::create_dir_all(p.join("keys")).unwrap();
        std::fs::write(p.join("keys/id_ed25519"), "private key").unwrap();
        let meta = LabMeta {
            key: "k".into(),
            machine: "lab".into(),
            vm_name: "vm-a".into(),
            project_dir: project.display().to_string(),
            provider: "libvirt".into(),
            box_id: "b".into(),
            provider_data: "uuid".into(),
            created: String::new(),
            size: 0,
            files: Vec::new(),
            images_mode: None,
        };
        labs.commit(&p, meta).unwrap()
    }

    /// Change one byte of `file` in place, keeping its size (and, with `keep_mtime`, its mtime).
    fn poke(file: &Path, at: u64, keep_mtime: bool) {
        use crate::platform;
        let f = std::fs::OpenOptions::new().read(true).write(true).open(file).unwrap();
        let before = f.metadata().unwrap().modified().unwrap();
        let mut b = [0u8];
        platform::read_exact_at(&f, &mut b, at).unwrap();
        platform::write_all_at(&f, &[b[0] ^ 0xff], at).unwrap();
        if keep_mtime {
            f.set_modified(before).unwrap();
        } else {
            f.set_modified(before + std::time::Duration::from_secs(5)).unwrap();
        }
    }

    /// What a lookup of the bad entry returns: no hit, the reason, and the entry is gone (a second lookup is a
    /// plain miss).
    fn dropped(labs: &Labs) -> String {
        let (hit, why) = labs.lookup("k").unwrap();
        assert!(hit.is_none(), "a bad entry must not be used");
        let why = why.expect("a dropped entry says why");
        assert!(!labs.entry_dir("k").exists(), "the bad entry must be removed: {why}");
        assert_eq!(labs.lookup("k").unwrap(), (None, None));
        assert!(labs.list().unwrap().is_empty());
        why
    }

    #[test]
    fn intact_entry_is_used_and_records_every_file() {
        let t = tempfile::tempdir().unwrap();
        let labs = Labs::at(t.path().join("labs")).unwrap();
        let meta = committed(&labs, t.path());
        let paths: Vec<&str> = meta.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["disk.qcow2", "keys/id_ed25519", "memory.save", "memory.xml"]);
        assert!(meta.files.iter().all(|f| f.sha256.len() == 64));
        assert_eq!(meta.files.iter().filter(|f| !f.sampled.is_empty()).count(), 2, "the two large files");
        let (hit, why) = labs.lookup("k").unwrap();
        assert_eq!((hit, why), (Some(meta.clone()), None));
        // A copy of the cache that did not keep mtimes: the whole hash decides, and it matches.
        let disk = labs.entry_dir("k").join("disk.qcow2");
        let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
        f.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(60)).unwrap();
        assert_eq!(labs.lookup("k").unwrap(), (Some(meta), None));
    }

    #[test]
    fn truncated_memory_image_drops_the_entry_with_the_reason() {
        let t = tempfile::tempdir().unwrap();
        let labs = Labs::at(t.path().join("labs")).unwrap();
        committed(&labs, t.path());
        let mem = labs.entry_dir("k").join("memory.save");
        std::fs::OpenOptions::new().write(true).open(&mem).unwrap().set_len(1 << 20).unwrap();
        assert_eq!(
            dropped(&labs),
            "the cached lab k is not usable: memory.save has 1048576 bytes, 5242880 were recorded (truncated or \
             replaced); it was removed, and this `up` takes the full path (boot and provisioning)"
        );
    }

    #[test]
    fn edited_files_of_the_same_size_drop_the_entry() {
        let t = tempfile::tempdir().unwrap();
        let labs = Labs::at(t.path().join("labs")).unwrap();
        // A small file: hashed whole at every lookup, whatever its mtime says.
        committed(&labs, t.path());
        poke(&labs.entry_dir("k").join("memory.xml"), 3, true);
        let why = dropped(&labs);
        assert!(why.contains("memory.xml has other content than was recorded (same size, edited)"), "{why}");
        // A large file edited in a sampled block with its mtime put back: the sampled hash sees it.
        committed(&labs, t.path());
        poke(&labs.entry_dir("k").join("memory.save"), 0, true);
        let why = dropped(&labs);
        assert!(why.contains("memory.save has other content"), "{why}");
        // A large file edited between the sampled blocks: its mtime moved, so it is hashed whole.
        committed(&labs, t.path());
        poke(&labs.entry_dir("k").join("disk.qcow2"), 100_000, false);
        let why = dropped(&labs);
        assert!(why.contains("disk.qcow2 has other content"), "{why}");
    }

    #[test]
    fn missing_file_and_an_entry_without_a_record_are_dropped() {
        let t = tempfile::tempdir().unwrap();
        let labs = Labs::at(t.path().join("labs")).unwrap();
        committed(&labs, t.path());
        std::fs::remove_file(labs.entry_dir("k").join("keys/id_ed25519")).unwrap();
        assert!(dropped(&labs).contains(": keys/id_ed25519 is missing;"));
        let meta = committed(&labs, t.path());
        let old = LabMeta { files: Vec::new(), ..meta };
        let json = serde_json::to_string(&old).unwrap().replace(",\"files\":[]", "");
        std::fs::write(labs.entry_dir("k").join("lab.json"), json).unwrap();
        assert!(dropped(&labs).contains("lab.json records none of its files"));
    }

    #[test]
    fn keys_travel_private() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("id_ed25519"), "secret").unwrap();
        std::fs::write(t.path().join("secrets.toml"), "x = 1").unwrap();
        copy_keys(t.path(), &t.path().join("entry/keys")).unwrap();
        for f in ["id_ed25519", "secrets.toml"] {
            let md = std::fs::metadata(t.path().join("entry/keys").join(f)).unwrap();
            // Windows has no mode bits: there the ACL makes it private (platform::set_file_mode).
            if let Some(mode) = crate::platform::mode(&md) {
                assert_eq!(mode & 0o777, 0o600, "{f}");
            }
        }
        assert!(!t.path().join("entry/keys/host_ed25519").exists());
    }
}
