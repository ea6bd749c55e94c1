//! The on-disk box cache: `boxes/<id>/box.json` beside the box's files. An entry is built in
//! `<id>.partial-<pid>` under an exclusive flock on `<id>.lock` and renamed into place when complete, so a crash
//! never leaves an entry that counts and a second builder waits for the first and reuses its result.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::machine::lock::{self, FileLock};
use crate::ui::Ui;

/// `box.json`: what one cache entry holds. Paths are relative to the entry directory.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BoxMeta {
    pub id: String,
    /// Where it came from: a path, a URL, or `debian <suite> <mirror> +packages`.
    pub source: String,
    /// "libvirt" or "virtualbox".
    pub provider: String,
    /// "qcow2", "raw" or "ovf".
    pub format: String,
    /// The disk image (or the `.ovf` to import).
    pub disk: String,
    #[serde(default)]
    pub kernel: Option<String>,
    #[serde(default)]
    pub initrd: Option<String>,
    #[serde(default)]
    pub cmdline: Option<String>,
    /// The disks after the first (vagrant-libvirt box format v2 `disks`), in order: attached as vdb, vdc, ...
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_disks: Vec<ExtraDisk>,
    /// UTC, RFC 3339.
    pub created: String,
    /// Bytes on disk of the whole entry.
    pub size: u64,
}

impl BoxMeta {
    /// What a builder reports; `id`, `created` and `size` are filled in when the entry is committed.
    pub fn new(source: String, provider: &str, format: &str, disk: &str) -> Self {
        Self {
            id: String::new(),
            source,
            provider: provider.into(),
            format: format.into(),
            disk: disk.into(),
            kernel: None,
            initrd: None,
            cmdline: None,
            extra_disks: Vec::new(),
            created: String::new(),
            size: 0,
        }
    }
}

/// A box's disk after the first: its file in the entry and qemu's format name.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExtraDisk {
    pub disk: String,
    pub format: String,
}

/// The `boxes/` directory of the cache.
#[derive(Debug, Clone)]
pub struct Cache {
    pub root: PathBuf,
}

impl Cache {
    /// `<cache_dir>/boxes`, created if missing.
    pub fn open() -> Result<Self> {
        Self::at(super::cache_dir().join("boxes"))
    }

    pub fn at(root: PathBuf) -> Result<Self> {
        std::fs::create_dir_all(&root).with_context(|| {
            format!(
                "cannot create the box cache {}\nhint: set PROVISIONER_CACHE_DIR to a writable directory",
                root.display()
            )
        })?;
        Ok(Self { root })
    }

    pub fn entry_dir(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    /// Where interrupted downloads wait to be resumed (outside any entry, so they survive a failed build).
    pub fn downloads_dir(&self) -> Result<PathBuf> {
        let d = self.root.join("downloads");
        std::fs::create_dir_all(&d).with_context(|| format!("create {}", d.display()))?;
        Ok(d)
    }

    /// The build log of a box (kept beside the entry so it survives a failed build).
    pub fn log_path(&self, id: &str) -> PathBuf {
        self.root.join(format!("{id}.build.log"))
    }

    /// The complete entry `id`, if cached.
    pub fn get(&self, id: &str) -> Result<Option<BoxMeta>> {
        let path = self.entry_dir(id).join("box.json");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
        };
        let meta = serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is damaged\nhint: remove the box with `provisioner box remove {id}` and build it again",
                path.display()
            )
        })?;
        Ok(Some(meta))
    }

    /// Return entry `id`, building it with `build` (given an empty directory to fill) when missing or `force`.
    /// Holds `<id>.lock` throughout; a concurrent caller waits and then finds the entry. The bool says whether
    /// this call built it.
    pub fn get_or_build(
        &self,
        id: &str,
        force: bool,
        ui: &Ui,
        build: impl FnOnce(&Path) -> Result<BoxMeta>,
    ) -> Result<(BoxMeta, bool)> {
        if !force {
            if let Some(m) = self.get(id)? {
                return Ok((m, false));
            }
        }
        let _lock = self.lock(id, ui)?;
        if !force {
            if let Some(m) = self.get(id)? {
                return Ok((m, false));
            }
        }
        self.remove_stale(id)?;
        let partial = self.root.join(format!("{id}.partial-{}", std::process::id()));
        std::fs::create_dir_all(&partial).with_context(|| format!("create {}", partial.display()))?;
        let built = build(&partial).and_then(|meta| self.commit(id, &partial, meta));
        if built.is_err() {
            let _ = remove_tree(&partial);
        }
        Ok((built?, true))
    }

    fn commit(&self, id: &str, partial: &Path, mut meta: BoxMeta) -> Result<BoxMeta> {
        // A build a signal cancelled is never published, even if its last step happened to finish.
        crate::process::check_interrupted()?;
        meta.id = id.to_string();
        meta.created = now_rfc3339();
        meta.size = dir_size(partial);
        let json = serde_json::to_string_pretty(&meta)?;
        std::fs::write(partial.join("box.json"), json + "\n").context("write box.json")?;
        let entry = self.entry_dir(id);
        if entry.exists() {
            let old = self.root.join(format!("{id}.old-{}", std::process::id()));
            std::fs::rename(&entry, &old).with_context(|| format!("move {} aside", entry.display()))?;
            remove_tree(&old)?;
        }
        std::fs::rename(partial, &entry)
            .with_context(|| format!("move {} to {}", partial.display(), entry.display()))?;
        Ok(meta)
    }

    /// Leftovers of builds that died: only called under the lock, so no live builder owns them.
    fn remove_stale(&self, id: &str) -> Result<()> {
        let prefixes = [format!("{id}.partial-"), format!("{id}.old-"), format!("{id}.removing-")];
        for e in std::fs::read_dir(&self.root)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            if prefixes.iter().any(|p| name.starts_with(p.as_str())) {
                remove_tree(&e.path()).context("remove the leftover of an earlier build")?;
            }
        }
        Ok(())
    }

    /// Exclusive lock on `<id>.lock`; waits (saying so) while another process builds the same box.
    fn lock(&self, id: &str, ui: &Ui) -> Result<FileLock> {
        let path = self.root.join(format!("{id}.lock"));
        let mut lock = match lock::try_lock(&path)? {
            Ok(lock) => lock,
            Err(holder) => {
                ui.info(format!(
                    "waiting for another provisioner ({}) that is building box {}",
                    if holder.is_empty() { "pid unknown" } else { &holder },
                    short(id)
                ));
                ui.event("box_wait", serde_json::json!({"id": id}));
                lock::block(&path)?
            }
        };
        lock::write_holder(&mut lock, &format!("pid {}", std::process::id()))?;
        Ok(lock)
    }

    /// Every complete entry, oldest first.
    pub fn list(&self) -> Result<Vec<BoxMeta>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.root).with_context(|| format!("read {}", self.root.display()))? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            if e.file_type()?.is_dir() && !name.contains('.') {
                if let Some(m) = self.get(&name)? {
                    out.push(m);
                }
            }
        }
        out.sort_by(|a, b| a.created.cmp(&b.created).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    /// Find an entry by its id or a unique prefix of it.
    pub fn find(&self, id_or_prefix: &str) -> Result<BoxMeta> {
        let all = self.list()?;
        let hits: Vec<&BoxMeta> = all.iter().filter(|m| m.id.starts_with(id_or_prefix)).collect();
        match hits.as_slice() {
            [one] if !id_or_prefix.is_empty() => Ok((*one).clone()),
            [] | [_] => bail!(
                "no cached box has the id {id_or_prefix:?} (cache: {})\nhint: `provisioner box list` shows the ids",
                self.root.display()
            ),
            many => bail!(
                "{id_or_prefix:?} matches {} cached boxes ({}); give more of the id",
                many.len(),
                many.iter().map(|m| short(&m.id)).collect::<Vec<_>>().join(", ")
            ),
        }
    }

    /// Remove an entry (by id or unique prefix) under its lock; returns what was removed.
    pub fn remove(&self, id_or_prefix: &str, ui: &Ui) -> Result<BoxMeta> {
        let meta = self.find(id_or_prefix)?;
        let _lock = self.lock(&meta.id, ui)?;
        let entry = self.entry_dir(&meta.id);
        let gone = self.root.join(format!("{}.removing-{}", meta.id, std::process::id()));
        std::fs::rename(&entry, &gone).with_context(|| format!("move {} aside", entry.display()))?;
        remove_tree(&gone)?;
        let _ = std::fs::remove_file(self.log_path(&meta.id));
        Ok(meta)
    }
}

/// Remove a directory tree that may hold a Debian rootfs. debootstrap mounts proc (and sys) inside its target;
/// if it dies those mounts stay, and a plain recursive delete would descend into them. Detach every mount below
/// `path` first, and refuse to delete while any remains.
pub fn remove_tree(path: &Path) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let mut mounts = mounts_under(path)?;
    mounts.sort_by_key(|m| std::cmp::Reverse(m.as_os_str().len()));
    for m in &mounts {
        crate::process::Cmd::new("umount").arg("-l").arg(m).cleanup().run()?;
    }
    let left = mounts_under(path)?;
    if !left.is_empty() {
        bail!(
            "{} still has mounts below it ({}); not deleting it\nhint: unmount them (umount -l PATH) and run again",
            path.display(),
            left.iter().map(|m| m.display().to_string()).collect::<Vec<_>>().join(", ")
        );
    }
    std::fs::remove_dir_all(path).with_context(|| format!("remove {}", path.display()))
}

/// Mount points at or below `path` (from the mount table, octal escapes decoded).
fn mounts_under(path: &Path) -> Result<Vec<PathBuf>> {
    let base = crate::platform::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let table = crate::platform::mount_table();
    Ok(table
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(|m| PathBuf::from(unescape_mount(m)))
        .filter(|m| m.starts_with(&base))
        .collect())
}

fn unescape_mount(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The first 12 hex digits of an id, as shown to people.
pub fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

/// Bytes used by the files under `dir` (not following symlinks).
pub fn dir_size(dir: &Path) -> u64 {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_file())
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

/// sha256 of a file, as lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut f = File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).with_context(|| format!("read {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// The current UTC time as RFC 3339 (seconds).
pub fn now_rfc3339() -> String {
    let secs =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    rfc3339(secs)
}

fn rfc3339(secs: u64) -> String {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil-from-days (H. Hinnant), valid for all dates after 1970.
    let z = days as i64 + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_paths_are_unescaped() {
        assert_eq!(unescape_mount(r"/a\040b/proc"), "/a b/proc");
        assert_eq!(unescape_mount("/plain"), "/plain");
    }

    /// A leftover mount inside a dead build (as a killed debootstrap leaves proc) is detached, not descended into.
    #[test]
    #[cfg_attr(windows, ignore = "windows: mounts a tmpfs with mount(8)")]
    fn remove_tree_detaches_mounts_first() {
        if !crate::platform::is_root() {
            eprintln!("skipped: mounting needs root");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let inner = tmp.path().join("x.partial-1/rootfs/proc");
        std::fs::create_dir_all(&inner).unwrap();
        crate::process::Cmd::new("mount").args(["-t", "tmpfs", "none"]).arg(&inner).run().unwrap();
        std::fs::write(inner.join("keep"), b"on the mount").unwrap();
        assert_eq!(mounts_under(tmp.path()).unwrap().len(), 1);
        remove_tree(&tmp.path().join("x.partial-1")).unwrap();
        assert!(mounts_under(tmp.path()).unwrap().is_empty());
        assert!(!tmp.path().join("x.partial-1").exists());
    }

    #[test]
    fn rfc3339_known_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_301_999), "2026-11-21T22:59:59Z");
    }

    #[test]
    fn failed_build_leaves_no_entry_and_next_build_commits() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::at(tmp.path().join("boxes")).unwrap();
        let ui = Ui::new(false, true);
        let err = cache
            .get_or_build("abc", false, &ui, |dir| {
                std::fs::write(dir.join("half"), b"x")?;
                bail!("boom")
            })
            .unwrap_err();
        assert!(err.to_string().contains("boom"));
        assert!(cache.get("abc").unwrap().is_none());
        assert!(cache.list().unwrap().is_empty());
        let names: Vec<_> = std::fs::read_dir(&cache.root).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(!names.iter().any(|n| n.to_string_lossy().contains("partial")), "{names:?}");

        let (m, built) = cache
            .get_or_build("abc", false, &ui, |dir| {
                std::fs::write(dir.join("disk"), b"0123")?;
                Ok(BoxMeta::new("t".into(), "libvirt", "raw", "disk"))
            })
            .unwrap();
        assert!(built);
        assert_eq!((m.id.as_str(), m.size), ("abc", 4));
        let (again, built) = cache.get_or_build("abc", false, &ui, |_| bail!("must not rebuild")).unwrap();
        assert!(!built);
        assert_eq!(again, m);
        assert_eq!(cache.find("ab").unwrap().id, "abc");
        cache.remove("abc", &ui).unwrap();
        assert!(cache.find("abc").is_err());
    }

    #[test]
    fn stale_partial_of_a_dead_build_is_cleared() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::at(tmp.path().to_path_buf()).unwrap();
        std::fs::create_dir_all(tmp.path().join("abc.partial-999999/x")).unwrap();
        assert!(cache.list().unwrap().is_empty());
        cache
            .get_or_build("abc", false, &Ui::new(false, true), |dir| {
                std::fs::write(dir.join("d"), b"1")?;
                Ok(BoxMeta::new("t".into(), "libvirt", "raw", "d"))
            })
            .unwrap();
        assert!(!tmp.path().join("abc.partial-999999").exists());
    }
}
