//! Local boxes (`image`, `vagrant`) and the import of any box file by its content: a qcow2/raw disk image, a
//! Vagrant `.box` (tar or tar.gz with `metadata.json`), an `.ova` (tar with an `.ovf`), or a loose `.ovf`.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::cache::{sha256_file, short, BoxMeta, Cache};
use super::integrity;
use crate::ui::Ui;

/// The cached copy of the local file `path`, keyed by its sha256.
pub fn ensure(cache: &Cache, path: &Path, force: bool, ui: &Ui) -> Result<(BoxMeta, bool)> {
    if !path.is_file() {
        bail!(
            "the box file {} does not exist\nhint: fix `image`/`vagrant` in [box] (relative paths start at the \
             directory of box-config.toml)",
            path.display()
        );
    }
    let source = path.display().to_string();
    let phase = ui.phase("box hash");
    if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("ovf")) {
        let files = ovf_files(path)?;
        let id = ovf_id(&files)?;
        phase.done(short(&id));
        return cache.get_or_build(&id, force, ui, |dir| {
            for f in &files {
                let name = f.file_name().context("file name")?;
                std::fs::copy(f, dir.join(name))
                    .with_context(|| format!("copy {} into the cache", f.display()))?;
            }
            let ovf = path.file_name().context("file name")?.to_string_lossy().into_owned();
            integrity::check_ovf(dir, &ovf, &source)?;
            Ok(BoxMeta::new(source.clone(), "virtualbox", "ovf", &ovf))
        });
    }
    let id = remembered_sha256(cache, path)?;
    phase.done(short(&id));
    cache.get_or_build(&id, force, ui, |dir| unpack(path, dir, source.clone()))
}

/// The sha256 of a local file, remembered by (path, size, mtime) so a multi-GB image is hashed once, not on
/// every `up`.
fn remembered_sha256(cache: &Cache, path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let md = std::fs::metadata(path).with_context(|| format!("stat {}", path.display()))?;
    let abs = crate::platform::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let t = md.modified().ok().and_then(|m| m.duration_since(std::time::UNIX_EPOCH).ok()).unwrap_or_default();
    let stamp = format!("{} {} {}.{}", abs.display(), md.len(), t.as_secs(), t.subsec_nanos());
    let memo_dir = cache.root.join("hashes");
    let memo = memo_dir.join(hex::encode(Sha256::digest(abs.to_string_lossy().as_bytes())));
    if let Ok(text) = std::fs::read_to_string(&memo) {
        if let Some((sum, seen)) = text.split_once(' ') {
            if seen == stamp && sum.len() == 64 {
                return Ok(sum.to_string());
            }
        }
    }
    let sum = sha256_file(path)?;
    std::fs::create_dir_all(&memo_dir)?;
    std::fs::write(&memo, format!("{sum} {stamp}"))?;
    Ok(sum)
}

#[derive(Debug, PartialEq, Eq)]
enum Kind {
    Gzip,
    Tar,
    Image,
}

fn sniff(path: &Path) -> Result<Kind> {
    let mut head = Vec::with_capacity(512);
    File::open(path).with_context(|| format!("open {}", path.display()))?.take(512).read_to_end(&mut head)?;
    Ok(if head.starts_with(&[0x1f, 0x8b]) {
        Kind::Gzip
    } else if head.len() >= 262 && &head[257..262] == b"ustar" {
        Kind::Tar
    } else {
        Kind::Image
    })
}

/// Import the box file `src` into the (empty) entry directory `dir`. A `src` inside `dir` is consumed.
pub fn unpack(src: &Path, dir: &Path, source: String) -> Result<BoxMeta> {
    let owned = src.parent() == Some(dir);
    let kind = sniff(src)?;
    if kind == Kind::Image {
        let format = qemu_format(src)?;
        if format != "qcow2" && format != "raw" {
            bail!(
                "{} is a {format} image; boxes must be qcow2 or raw (or an .ova/.box for VirtualBox)\n\
                 hint: convert it: qemu-img convert -O qcow2 {} box.qcow2",
                src.display(),
                src.display()
            );
        }
        // Checked before it is copied: a refused file costs no copy and leaves nothing in the cache.
        integrity::check(src)?;
        let disk = format!("box.{format}");
        if owned {
            std::fs::rename(src, dir.join(&disk))?;
        } else {
            // A copy, not a hardlink: the cached base must not change when the user edits their file. Its holes
            // stay holes (a sparse raw box is sent to a remote host without them).
            crate::platform::copy_sparse(src, &dir.join(&disk))
                .with_context(|| format!("copy {} into the cache", src.display()))?;
            if std::fs::metadata(dir.join(&disk))?.len() != std::fs::metadata(src)?.len() {
                bail!("the copy of {} into the cache is incomplete (is the disk full?)", src.display());
            }
        }
        return Ok(BoxMeta::new(source, "libvirt", &format, &disk));
    }
    let file = File::open(src).with_context(|| format!("open {}", src.display()))?;
    let result = if kind == Kind::Gzip {
        tar::Archive::new(flate2::read::GzDecoder::new(file)).unpack(dir)
    } else {
        tar::Archive::new(file).unpack(dir)
    };
    result.with_context(|| {
        format!("{} is not a valid box archive (tar or tar.gz); the file may be truncated", src.display())
    })?;
    if owned {
        std::fs::remove_file(src)?;
    }
    from_tree(dir, source)
}

/// What an unpacked archive is: a Vagrant box (metadata.json) or an OVA (an .ovf).
fn from_tree(dir: &Path, source: String) -> Result<BoxMeta> {
    let md_path = dir.join("metadata.json");
    if md_path.is_file() {
        let md: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&md_path)?)
            .context("metadata.json of the Vagrant box is not valid JSON")?;
        let provider = md.get("provider").and_then(|p| p.as_str()).unwrap_or("");
        return match provider {
            "libvirt" => {
                let disks = libvirt_disks(&md, dir)?;
                for disk in &disks {
                    if !dir.join(disk).is_file() {
                        bail!("this libvirt Vagrant box has no {disk}; it holds: {}", listing(dir));
                    }
                }
                let img = dir.join(&disks[0]);
                let format = qemu_format(&img)?;
                integrity::check(&img)?;
                let mut meta = BoxMeta::new(source, "libvirt", &format, &disks[0]);
                for disk in &disks[1..] {
                    let img = dir.join(disk);
                    integrity::check_data_disk(&img)?;
                    let format = qemu_format(&img)?;
                    meta.extra_disks.push(super::cache::ExtraDisk { disk: disk.clone(), format });
                }
                // A box made by `provisioner package` from a box without bootloader carries its kernel.
                if dir.join(super::package::KERNEL).is_file() && dir.join(super::package::INITRD).is_file() {
                    meta.kernel = Some(super::package::KERNEL.into());
                    meta.initrd = Some(super::package::INITRD.into());
                }
                Ok(meta)
            }
            "virtualbox" => match find_ovf(dir)? {
                Some(ovf) => {
                    integrity::check_ovf(dir, &ovf, &source)?;
                    Ok(BoxMeta::new(source, "virtualbox", "ovf", &ovf))
                }
                None => bail!("this virtualbox Vagrant box has no .ovf; it holds: {}", listing(dir)),
            },
            "" => bail!("metadata.json of the Vagrant box names no provider; it holds: {}", listing(dir)),
            other => bail!(
                "the Vagrant box is for the {other:?} provider; provisioner runs libvirt and virtualbox boxes\n\
                 hint: download the libvirt or virtualbox version of this box"
            ),
        };
    }
    if let Some(ovf) = find_ovf(dir)? {
        integrity::check_ovf(dir, &ovf, &source)?;
        return Ok(BoxMeta::new(source, "virtualbox", "ovf", &ovf));
    }
    bail!(
        "unknown box layout: the archive holds {}; expected a Vagrant box (metadata.json + box.img or box.ovf) \
         or an OVA (an .ovf and its disks)",
        listing(dir)
    )
}

/// The disks of a vagrant-libvirt box: `box.img` (format v1), or every `disks: [{path}]` (v2) in order, the
/// boot disk first.
fn libvirt_disks(md: &serde_json::Value, dir: &Path) -> Result<Vec<String>> {
    let Some(disks) = md.get("disks").and_then(|d| d.as_array()) else {
        return Ok(vec!["box.img".into()]);
    };
    let paths: Vec<&str> = disks.iter().filter_map(|d| d.get("path").and_then(|p| p.as_str())).collect();
    if paths.len() != disks.len() || paths.is_empty() {
        bail!(
            "metadata.json of the libvirt Vagrant box lists disks without a path; it holds: {}",
            listing(dir)
        );
    }
    // One overlay per disk: vda, vdb, ... up to vdz.
    if paths.len() > 26 {
        bail!(
            "the libvirt Vagrant box has {} disks; provisioner attaches up to 26 (vda to vdz)\nhint: use a box with \
             fewer disks",
            paths.len()
        );
    }
    let mut seen = std::collections::HashSet::new();
    for p in &paths {
        if p.contains('/') || p.contains('\\') || p.contains("..") || p.is_empty() {
            bail!(
                "metadata.json of the libvirt Vagrant box names the disk {p:?}; only files at the box's top are \
                 supported"
            );
        }
        if !seen.insert(*p) {
            bail!("metadata.json of the libvirt Vagrant box names the disk {p:?} twice\nhint: fix the box's disks list");
        }
    }
    Ok(paths.into_iter().map(str::to_string).collect())
}

fn find_ovf(dir: &Path) -> Result<Option<String>> {
    let mut ovfs: Vec<String> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.to_ascii_lowercase().ends_with(".ovf"))
        .collect();
    ovfs.sort();
    Ok(ovfs.into_iter().next())
}

/// The top-level names in `dir`, for messages.
fn listing(dir: &Path) -> String {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    if names.is_empty() {
        "nothing".into()
    } else {
        names.join(", ")
    }
}

/// The format `qemu-img info` detects.
pub fn qemu_format(path: &Path) -> Result<String> {
    Ok(integrity::info(path)?.format)
}

/// A loose `.ovf` and the files it references (`ovf:href`), which must sit beside it.
fn ovf_files(ovf: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(ovf).with_context(|| format!("read {}", ovf.display()))?;
    let base = ovf.parent().unwrap_or(Path::new("."));
    let mut files = vec![ovf.to_path_buf()];
    for part in text.split("href=\"").skip(1) {
        let name = part.split('"').next().unwrap_or("");
        if name.is_empty() || name.contains('/') || name.contains("..") {
            bail!("{} references {name:?}; only files beside the .ovf are supported", ovf.display());
        }
        let f = base.join(name);
        if !f.is_file() {
            bail!(
                "{} references {name}, which is not beside it\nhint: keep the .ovf and its disks together",
                ovf.display()
            );
        }
        files.push(f);
    }
    Ok(files)
}

fn ovf_id(files: &[PathBuf]) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for f in files {
        h.update(format!("{} {}\n", f.file_name().unwrap_or_default().to_string_lossy(), sha256_file(f)?));
    }
    Ok(hex::encode(h.finalize()))
}
