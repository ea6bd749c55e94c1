//! Uploading the rendered tree: a manifest of content hashes kept in the guest
//! (`<guest_path>/.provisioner-manifest.json`) so a re-run sends only what changed, as one tar stream, and removes
//! what was deleted. The manifest is written last, after the lab is up, so a failed run is retried in full.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::render::Rendered;
use crate::ssh::shell_quote;
use crate::ssh::Session;

pub const MANIFEST_FILE: &str = ".provisioner-manifest.json";

/// One file as the manifest records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub sha256: String,
    pub mode: u32,
}

/// Path -> entry for every uploaded file.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Manifest {
    pub files: BTreeMap<String, Entry>,
}

impl Manifest {
    pub fn of(rendered: &Rendered) -> Manifest {
        Manifest {
            files: rendered
                .files
                .iter()
                .map(|f| (f.path.clone(), Entry { sha256: f.sha256(), mode: f.mode }))
                .collect(),
        }
    }
}

/// What differs between the guest's manifest and the tree to upload.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct Diff {
    pub added: Vec<String>,
    /// Content or mode changed.
    pub changed: Vec<String>,
    pub removed: Vec<String>,
    pub unchanged: Vec<String>,
}

impl Diff {
    /// Files to send.
    pub fn to_send(&self) -> impl Iterator<Item = &String> {
        self.added.iter().chain(self.changed.iter())
    }
    /// Every path whose state in the guest changes.
    pub fn touched(&self) -> Vec<String> {
        self.added.iter().chain(&self.changed).chain(&self.removed).cloned().collect()
    }
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.changed.is_empty() && self.removed.is_empty()
    }
}

/// Compare the manifest in the guest (`old`) with the tree to upload (`new`). Pure; results sorted by path.
pub fn diff(old: &Manifest, new: &Manifest) -> Diff {
    let mut d = Diff::default();
    for (path, entry) in &new.files {
        match old.files.get(path) {
            None => d.added.push(path.clone()),
            Some(e) if e != entry => d.changed.push(path.clone()),
            Some(_) => d.unchanged.push(path.clone()),
        }
    }
    d.removed = old.files.keys().filter(|p| !new.files.contains_key(*p)).cloned().collect();
    d
}

/// A tar archive of the named files of the tree, modes kept (`.env` stays 0600), owned by root.
pub fn tar_of(rendered: &Rendered, paths: &[&String]) -> Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    for path in paths {
        let f = rendered.get(path).with_context(|| format!("{path} is not in the rendered tree"))?;
        let mut h = tar::Header::new_gnu();
        h.set_size(f.contents.len() as u64);
        h.set_mode(f.mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, &f.path, f.contents.as_slice()).with_context(|| format!("tar {path}"))?;
    }
    b.into_inner().context("finish tar")
}

/// Read the guest's manifest; a missing or unreadable one means "nothing uploaded yet".
pub fn read_manifest(ssh: &Session, guest_path: &str) -> Result<Manifest> {
    let out = ssh.exec(&read_manifest_command(guest_path), Duration::from_secs(30))?;
    Ok(if out.status == 0 {
        serde_json::from_str(&out.output).unwrap_or_default()
    } else {
        Manifest::default()
    })
}

/// The command [`read_manifest`] runs.
pub fn read_manifest_command(guest_path: &str) -> String {
    format!("sudo -n cat {} 2>/dev/null", shell_quote(&format!("{guest_path}/{MANIFEST_FILE}")))
}

/// Record what the guest now holds.
pub fn write_manifest(ssh: &Session, guest_path: &str, manifest: &Manifest) -> Result<()> {
    let p = shell_quote(&format!("{guest_path}/{MANIFEST_FILE}"));
    let data = serde_json::to_vec_pretty(manifest)?;
    let out = ssh.exec_with_stdin(
        &format!("sudo -n tee {p}.tmp >/dev/null && sudo -n mv {p}.tmp {p}"),
        &mut data.as_slice(),
        Duration::from_secs(30),
    )?;
    anyhow::ensure!(out.status == 0, "cannot write the manifest in the guest:\n{}", out.output);
    Ok(())
}

/// Send what `diff` says (one tar stream) and delete what was removed. Returns the bytes sent.
pub fn apply(ssh: &Session, guest_path: &str, rendered: &Rendered, diff: &Diff) -> Result<usize> {
    let dir = shell_quote(guest_path);
    let send: Vec<&String> = diff.to_send().collect();
    let mut sent = 0;
    if !send.is_empty() {
        let tar = tar_of(rendered, &send)?;
        sent = tar.len();
        let out = ssh.exec_with_stdin(
            &format!("sudo -n mkdir -p {dir} && sudo -n tar -xf - -C {dir} --no-same-owner"),
            &mut tar.as_slice(),
            Duration::from_secs(600),
        )?;
        anyhow::ensure!(
            out.status == 0,
            "unpacking the provision tree into {guest_path} failed (exit {}):\n{}\nhint: check free space in the guest \
             (`provisioner ssh -c 'df -h'`) and that the user may run sudo without a password",
            out.status,
            crate::process::tail(&out.output, 20)
        );
    }
    if !diff.removed.is_empty() {
        let paths: Vec<String> =
            diff.removed.iter().map(|p| shell_quote(&format!("{guest_path}/{p}"))).collect();
        ssh.exec_ok(&format!("sudo -n rm -f -- {}", paths.join(" ")), Duration::from_secs(60))
            .context("remove deleted files from the guest")?;
    }
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::RenderedFile;

    fn tree(files: &[(&str, &str, u32)]) -> Rendered {
        Rendered {
            files: files
                .iter()
                .map(|(p, c, m)| RenderedFile {
                    path: p.to_string(),
                    contents: c.as_bytes().to_vec(),
                    mode: *m,
                })
                .collect(),
        }
    }

    #[test]
    fn diff_sorts_files_into_four_kinds() {
        let old = Manifest::of(&tree(&[
            ("a.yml", "1", 0o644),
            ("b.yml", "2", 0o644),
            ("run.sh", "x", 0o644),
            ("gone.txt", "z", 0o644),
        ]));
        let new = Manifest::of(&tree(&[
            ("a.yml", "1", 0o644),
            ("b.yml", "2 changed", 0o644),
            ("run.sh", "x", 0o755),
            ("new/c.yml", "3", 0o644),
        ]));
        let d = diff(&old, &new);
        assert_eq!(d.added, vec!["new/c.yml"]);
        assert_eq!(d.changed, vec!["b.yml", "run.sh"], "content and mode changes both count");
        assert_eq!(d.removed, vec!["gone.txt"]);
        assert_eq!(d.unchanged, vec!["a.yml"]);
        assert_eq!(d.touched(), vec!["new/c.yml", "b.yml", "run.sh", "gone.txt"]);
    }

    #[test]
    fn same_tree_has_empty_diff_and_empty_guest_gets_everything() {
        let t = Manifest::of(&tree(&[("a", "1", 0o644), (".env", "S=1", 0o600)]));
        let same = diff(&t, &t);
        assert!(same.is_empty());
        assert_eq!(same.unchanged.len(), 2);
        let first = diff(&Manifest::default(), &t);
        assert_eq!(first.added, vec![".env", "a"]);
        assert!(first.changed.is_empty() && first.removed.is_empty());
    }

    #[test]
    fn manifest_round_trips_as_json() {
        let m = Manifest::of(&tree(&[("x/y.yml", "data", 0o640)]));
        let back: Manifest = serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
        assert_eq!(m, back);
    }

    #[test]
    fn tar_keeps_modes_and_only_named_files() {
        let t = tree(&[("a.yml", "1", 0o644), (".env", "SECRET=1", 0o600), ("s/run.sh", "#!/bin/sh", 0o755)]);
        let names = [".env".to_string(), "s/run.sh".to_string()];
        let bytes = tar_of(&t, &names.iter().collect::<Vec<_>>()).unwrap();
        let mut ar = tar::Archive::new(bytes.as_slice());
        let got: Vec<(String, u32)> = ar
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (e.path().unwrap().to_string_lossy().into_owned(), e.header().mode().unwrap())
            })
            .collect();
        assert_eq!(got, vec![(".env".to_string(), 0o600), ("s/run.sh".to_string(), 0o755)]);
        assert!(tar_of(&t, &[&"missing".to_string()]).is_err());
    }
}
