//! Integrity checks on every disk image a box brings in, before it counts as cached: `qemu-img check` for qcow2
//! (a truncated file has clusters past its end), the file against the size its format needs, and the first
//! 68 KiB the guest sees must hold something a machine boots from (a partition table or a filesystem) that fits in
//! the disk. `qemu-img info` alone accepts a qcow2 cut to its first 64 KiB; such a box then boots to an empty
//! serial console and `up` fails only after the whole boot timeout.
//!
//! VirtualBox boxes (`.ovf` + VMDK) are checked in pure Rust ([`check_ovf`]): that path must work on a host without
//! qemu-img (Windows, macOS).

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::process::Cmd;

/// Bytes of the guest-visible disk read for the layout check: covers MBR, GPT, ext2/3/4, XFS and btrfs
/// superblocks (btrfs: 64 KiB + 0x40).
const HEAD: u64 = 68 * 1024;

/// What `qemu-img info` says about an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    pub format: String,
    pub virtual_size: u64,
}

/// `qemu-img info` of a file.
pub fn info(path: &Path) -> Result<ImageInfo> {
    let out = Cmd::new("qemu-img").args(["info", "-U", "--output=json"]).arg(path).run()?;
    let v: serde_json::Value = serde_json::from_str(&out.stdout).context("parse `qemu-img info` output")?;
    let format = v
        .get("format")
        .and_then(|f| f.as_str())
        .with_context(|| format!("`qemu-img info` reports no format for {}", path.display()))?
        .to_string();
    let virtual_size = v.get("virtual-size").and_then(|s| s.as_u64()).unwrap_or(0);
    Ok(ImageInfo { format, virtual_size })
}

/// Refuse a qcow2/raw disk that is truncated, damaged, or holds nothing bootable. The error says what is wrong
/// and what to do; the caller keeps nothing of a refused box.
pub fn check(path: &Path) -> Result<()> {
    check_disk(path, true)
}

/// [`check`] for a box's data disk (the second and later disks of a vagrant-libvirt v2 box): whole and
/// undamaged, but it may be blank.
pub fn check_data_disk(path: &Path) -> Result<()> {
    check_disk(path, false)
}

fn check_disk(path: &Path, bootable: bool) -> Result<()> {
    let info = info(path)?;
    let file_size = std::fs::metadata(path).with_context(|| format!("stat {}", path.display()))?.len();
    let refuse = |why: String| -> anyhow::Error {
        anyhow::anyhow!(
            "{} is not a usable {} disk image: {why}\nhint: the file is probably truncated or damaged (an \
             interrupted download or copy): get it again and compare its sha256 with the publisher's, or rebuild \
             it; it was not added to the box cache",
            path.display(),
            info.format
        )
    };
    match info.format.as_str() {
        "qcow2" => check_qcow2(path, file_size).map_err(refuse)?,
        // qemu rounds a raw disk up to whole 512-byte sectors.
        "raw" if file_size.div_ceil(512) * 512 < info.virtual_size => {
            return Err(refuse(format!(
                "the file has {file_size} bytes but the disk is {} bytes",
                info.virtual_size
            )))
        }
        _ => {}
    }
    if !bootable {
        return Ok(());
    }
    let head = read_head(path, &info)?;
    match layout(&head) {
        None if head.iter().all(|b| *b == 0) => Err(refuse(format!(
            "its first {} KiB are all zeros: no partition table, no filesystem, nothing to boot",
            head.len() / 1024
        ))),
        None => Err(refuse(
            "no partition table (MBR or GPT) and no filesystem (ext2/3/4, XFS, btrfs, LVM) at its start, so \
             nothing could boot from it"
                .into(),
        )),
        Some(l) if l.needs > info.virtual_size => Err(refuse(format!(
            "its {} needs {} bytes, but the disk holds only {}",
            l.what, l.needs, info.virtual_size
        ))),
        Some(_) => Ok(()),
    }
}

/// `qemu-img check` must find no corruption (leaked clusters are harmless), and the file must reach the image's
/// end offset.
fn check_qcow2(path: &Path, file_size: u64) -> std::result::Result<(), String> {
    let out = Cmd::new("qemu-img")
        .args(["check", "-U", "--output=json"])
        .arg(path)
        .timeout(Duration::from_secs(600))
        .output()
        .map_err(|e| format!("{e:#}"))?;
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_default();
    let num = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
    // Exit codes (qemu-img(1)): 0 clean, 3 only leaks, 2 corruptions, 1 the check itself failed.
    match out.code() {
        Some(0) | Some(3) => {}
        code => {
            let first = out.stderr.lines().take(3).collect::<Vec<_>>().join("\n  ");
            return Err(format!(
                "`qemu-img check` found {} corruption(s) and {} check error(s) ({}):\n  {first}",
                num("corruptions"),
                num("check-errors"),
                code.map(|c| format!("exit {c}")).unwrap_or_else(|| "killed".into())
            ));
        }
    }
    let end = num("image-end-offset");
    // qemu ends a file inside its last cluster when that cluster holds only metadata (a blank `qemu-img create`
    // disk): the file reaches the image's end if it reaches into its last cluster (cluster_bits at byte 20).
    let cluster = std::fs::File::open(path)
        .and_then(|mut f| {
            let mut h = [0u8; 24];
            f.read_exact(&mut h).map(|()| h)
        })
        .ok()
        .map(|h| u32::from_be_bytes([h[20], h[21], h[22], h[23]]))
        .filter(|bits| (9..=21).contains(bits))
        .map_or(512, |bits| 1u64 << bits);
    if end > file_size.div_ceil(cluster) * cluster {
        return Err(format!("the image's data ends at byte {end}, but the file has only {file_size} bytes"));
    }
    Ok(())
}

/// The first [`HEAD`] bytes of what the guest sees (fewer for a smaller disk).
fn read_head(path: &Path, info: &ImageInfo) -> Result<Vec<u8>> {
    let want = HEAD.min(info.virtual_size);
    if info.format == "raw" {
        let mut buf = Vec::with_capacity(want as usize);
        std::fs::File::open(path)
            .with_context(|| format!("open {}", path.display()))?
            .take(want)
            .read_to_end(&mut buf)?;
        return Ok(buf);
    }
    if want == 0 {
        return Ok(Vec::new());
    }
    let tmp = tempfile::NamedTempFile::new().context("create a temp file")?;
    Cmd::new("qemu-img")
        .args(["dd", "-U", "-f", &info.format, "-O", "raw", &format!("bs={want}"), "count=1"])
        .arg(format!("if={}", path.display()))
        .arg(format!("of={}", tmp.path().display()))
        .timeout(Duration::from_secs(120))
        .run()
        .with_context(|| format!("read the first sectors of {}", path.display()))?;
    Ok(std::fs::read(tmp.path())?)
}

/// Refuse a VirtualBox box (an `.ovf` in `dir` and the files it references) whose disks cannot be imported:
/// every referenced file must be in the box with the size the `.ovf` gives (`ovf:size`), and every VMDK must be
/// whole ([`check_vmdk`]). Pure Rust: the VirtualBox path needs no qemu-img on the host. `source` names the box
/// in the error, which says what is wrong and what to do; the caller keeps nothing of a refused box.
pub fn check_ovf(dir: &Path, ovf: &str, source: &str) -> Result<()> {
    let text =
        std::fs::read_to_string(dir.join(ovf)).with_context(|| format!("read {ovf} of the box {source}"))?;
    let refuse = |why: String| -> anyhow::Error {
        anyhow::anyhow!(
            "the box {source} is not usable: {why}\nhint: the box file is probably truncated or damaged (an \
             interrupted download or copy): get it again and compare its sha256 with the publisher's, or export it \
             again; it was not added to the box cache"
        )
    };
    for file in ovf_references(&text) {
        let Some(href) = file.href else { continue };
        if href.is_empty() || href.contains('/') || href.contains('\\') || href.contains("..") {
            return Err(refuse(format!("its {ovf} references {href:?}, which is not a file beside it")));
        }
        let path = dir.join(&href);
        let size = match std::fs::metadata(&path) {
            Ok(md) if md.is_file() => md.len(),
            _ => return Err(refuse(format!("its {ovf} references {href}, which the box does not hold"))),
        };
        if let Some(want) = file.size.filter(|w| *w != size) {
            return Err(refuse(format!("{href} has {size} bytes, but its {ovf} says {want} (ovf:size)")));
        }
        if href.to_ascii_lowercase().ends_with(".vmdk") {
            check_vmdk(&path).map_err(|why| refuse(format!("{href} is not a usable VMDK disk: {why}")))?;
        }
    }
    Ok(())
}

/// The disk images an `.ovf` references (VMDK, VDI, VHD files beside it), in the order of its `<References>`:
/// the first is the boot disk of a Vagrant VirtualBox box. With qemu's format name for each.
pub fn ovf_disks(ovf: &Path) -> Result<Vec<(std::path::PathBuf, String)>> {
    let text = std::fs::read_to_string(ovf).with_context(|| format!("read {}", ovf.display()))?;
    let dir = ovf.parent().unwrap_or(Path::new("."));
    Ok(ovf_references(&text)
        .into_iter()
        .filter_map(|f| f.href)
        .filter(|h| !h.contains('/') && !h.contains('\\') && !h.contains(".."))
        .filter_map(|h| {
            let ext = h.rsplit('.').next()?.to_ascii_lowercase();
            let format = match ext.as_str() {
                "vmdk" => "vmdk",
                "vdi" => "vdi",
                "vhd" => "vpc",
                _ => return None,
            };
            Some((dir.join(&h), format.to_string()))
        })
        .collect())
}

/// A `<File>` of an OVF's `<References>`.
#[derive(Debug, PartialEq, Eq)]
struct OvfFile {
    href: Option<String>,
    size: Option<u64>,
}

/// The `<File ...>` elements of an OVF (with or without the `ovf:` prefix on the element and its attributes).
fn ovf_references(text: &str) -> Vec<OvfFile> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find('<') {
        rest = &rest[at + 1..];
        let name_end = rest.find(|c: char| c.is_whitespace() || c == '>' || c == '/').unwrap_or(rest.len());
        let name = &rest[..name_end];
        if name != "File" && !name.ends_with(":File") {
            continue;
        }
        let tag = &rest[name_end..rest.find('>').unwrap_or(rest.len())];
        let attr = |key: &str| -> Option<String> {
            let mut t = tag;
            while let Some(i) = t.find(key) {
                let before_ok = i == 0 || t[..i].ends_with(|c: char| c.is_whitespace() || c == ':');
                let after = t[i + key.len()..].trim_start();
                if before_ok {
                    if let Some(v) = after.strip_prefix('=') {
                        let v = v.trim_start();
                        let q = v.chars().next()?;
                        if q == '"' || q == '\'' {
                            return v[1..].split(q).next().map(str::to_string);
                        }
                    }
                }
                t = &t[i + key.len()..];
            }
            None
        };
        out.push(OvfFile { href: attr("href"), size: attr("size").and_then(|s| s.trim().parse().ok()) });
    }
    out
}

/// The sparse-extent magic, "KDMV" on disk.
const VMDK_MAGIC: &[u8; 4] = b"KDMV";
/// `gdOffset` of a stream-optimized header whose grain directory is in the footer.
const GD_AT_END: u64 = u64::MAX;

/// Check one VMDK file (pure): a sparse extent (`KDMV` header: its grain directory and tables, every grain
/// inside the file; a stream-optimized one with its footer and end-of-stream marker) or a text descriptor whose
/// extents (flat or sparse files beside it) are all there with their sizes. `Err` says what is wrong.
pub fn check_vmdk(path: &Path) -> std::result::Result<(), String> {
    let data_len = std::fs::metadata(path).map_err(|e| format!("cannot read it: {e}"))?.len();
    if data_len == 0 {
        return Err("the file is empty".into());
    }
    let mut head = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(512).read_to_end(&mut head))
        .map_err(|e| format!("cannot read it: {e}"))?;
    if head.starts_with(VMDK_MAGIC) {
        return check_sparse(path, data_len, None);
    }
    if head.starts_with(b"# Disk DescriptorFile") {
        return check_descriptor(path, data_len);
    }
    Err(format!(
        "it starts with neither the sparse-extent magic KDMV nor a `# Disk DescriptorFile` descriptor (its first \
         bytes: {})",
        head.iter().take(8).map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ")
    ))
}

/// A descriptor file: every extent it names must be beside it, whole.
fn check_descriptor(path: &Path, len: u64) -> std::result::Result<(), String> {
    if len > 1 << 20 {
        return Err(format!("its descriptor is {len} bytes; a VMDK descriptor is a few hundred"));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("its descriptor is not text: {e}"))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut extents = 0;
    for line in text.lines().map(str::trim) {
        let mut w = line.split_whitespace();
        let (Some(access), Some(sectors), Some(kind)) = (w.next(), w.next(), w.next()) else { continue };
        if !matches!(access, "RW" | "RDONLY" | "NOACCESS") {
            continue;
        }
        extents += 1;
        let sectors: u64 =
            sectors.parse().map_err(|_| format!("its extent line {line:?} has no size in sectors"))?;
        if kind == "ZERO" {
            continue;
        }
        let name = line.split('"').nth(1).ok_or_else(|| format!("its extent line {line:?} names no file"))?;
        if name.is_empty() || name.contains('/') || name.contains('\\') || name.contains("..") {
            return Err(format!("its extent {name:?} is not a file beside it"));
        }
        let offset: u64 = line.rsplit('"').next().unwrap_or("").trim().parse().unwrap_or(0);
        let file = dir.join(name);
        let have = match std::fs::metadata(&file) {
            Ok(md) if md.is_file() => md.len(),
            _ => return Err(format!("its extent file {name} is missing")),
        };
        match kind {
            "FLAT" | "VMFS" => {
                let need = offset.saturating_add(sectors).saturating_mul(512);
                if have < need {
                    return Err(format!(
                        "its flat extent {name} has {have} bytes, the descriptor needs {need}"
                    ));
                }
            }
            "SPARSE" | "VMFSSPARSE" => check_sparse(&file, have, Some(sectors))
                .map_err(|why| format!("its sparse extent {name}: {why}"))?,
            other => return Err(format!("its extent {name} is of type {other}, which a box cannot use")),
        }
    }
    if extents == 0 {
        return Err("its descriptor names no extent".into());
    }
    Ok(())
}

/// The fields of a sparse extent header (VMware's "Virtual Disk Format 5.0", SparseExtentHeader).
#[derive(Debug, Clone, Copy)]
struct SparseHeader {
    flags: u64,
    capacity: u64,
    grain: u64,
    desc_offset: u64,
    desc_size: u64,
    gtes_per_gt: u64,
    gd_offset: u64,
}

fn sparse_header(b: &[u8]) -> std::result::Result<SparseHeader, String> {
    if b.len() < 512 || !b.starts_with(VMDK_MAGIC) {
        return Err("no sparse-extent header (KDMV)".into());
    }
    let version = le32(b, 4).unwrap_or(0);
    if !(1..=3).contains(&version) {
        return Err(format!("its header has version {version}; VMDK sparse extents are version 1 to 3"));
    }
    let h = SparseHeader {
        flags: le32(b, 8).unwrap_or(0),
        capacity: le64(b, 12).unwrap_or(0),
        grain: le64(b, 20).unwrap_or(0),
        desc_offset: le64(b, 28).unwrap_or(0),
        desc_size: le64(b, 36).unwrap_or(0),
        gtes_per_gt: le32(b, 44).unwrap_or(0),
        gd_offset: le64(b, 56).unwrap_or(0),
    };
    // Flag 0: the four line-end bytes are valid; a transfer in text mode (FTP ASCII) changes them.
    if h.flags & 1 != 0 && b.get(73..77) != Some(b"\n \r\n".as_slice()) {
        return Err("its header's line-end test bytes are changed: the file was transferred as text".into());
    }
    if h.grain < 8 || !h.grain.is_power_of_two() || h.grain > 1 << 20 {
        return Err(format!(
            "its header has a grain of {} sectors; VMDK grains are 8 or more, a power of 2",
            h.grain
        ));
    }
    if h.gtes_per_gt == 0 || h.gtes_per_gt > 1 << 16 {
        return Err(format!("its header has {} entries per grain table", h.gtes_per_gt));
    }
    if h.capacity == 0 {
        return Err("its header gives the disk a capacity of 0 sectors".into());
    }
    Ok(h)
}

/// Flag 16: grains are compressed (stream-optimized); each starts with a 12-byte marker (LBA, size).
const COMPRESSED: u64 = 1 << 16;

/// A sparse extent of `len` bytes: header (or, stream-optimized, its footer), descriptor, grain directory and
/// tables inside the file, every allocated grain inside the file. `sectors`: what a descriptor says it holds.
fn check_sparse(path: &Path, len: u64, sectors: Option<u64>) -> std::result::Result<(), String> {
    let f = std::fs::File::open(path).map_err(|e| format!("cannot read it: {e}"))?;
    let fits = |at: u64, n: u64| -> std::result::Result<(), String> {
        match at.checked_add(n) {
            Some(end) if end <= len => Ok(()),
            _ => Err(format!(
                "it needs bytes {at}..{} but the file has only {len} (truncated)",
                at.saturating_add(n)
            )),
        }
    };
    let read = |at: u64, n: u64| -> std::result::Result<Vec<u8>, String> {
        fits(at, n)?;
        let mut buf = vec![0u8; n as usize];
        crate::platform::read_exact_at(&f, &mut buf, at)
            .map_err(|e| format!("cannot read it at byte {at}: {e}"))?;
        Ok(buf)
    };
    if len < 512 {
        return Err(format!("the file has {len} bytes, less than its 512-byte header"));
    }
    let mut h = sparse_header(&read(0, 512)?)?;
    if let Some(s) = sectors.filter(|s| *s != h.capacity) {
        return Err(format!("its header says {} sectors, the descriptor {s}", h.capacity));
    }
    if h.desc_offset > 0 {
        read(h.desc_offset.saturating_mul(512), h.desc_size.saturating_mul(512))
            .map_err(|why| format!("its embedded descriptor is cut off: {why}"))?;
    }
    if h.gd_offset == GD_AT_END {
        // Stream-optimized: the file ends with a footer marker, the footer (a header with the real gdOffset)
        // and an end-of-stream marker (a zero sector).
        if len < 2048 || len % 512 != 0 {
            return Err(format!(
                "the file has {len} bytes: a stream-optimized VMDK ends with its footer and end-of-stream marker \
                 on whole sectors; the file is truncated"
            ));
        }
        let tail = read(len - 1536, 1536)?;
        let marker_type = le32(&tail, 12).unwrap_or(0);
        if marker_type != 3 || !tail[1024..].iter().all(|b| *b == 0) || !tail[512..].starts_with(VMDK_MAGIC) {
            return Err(
                "it does not end with a footer and an end-of-stream marker, as a stream-optimized VMDK must: the \
                 file is truncated"
                    .into(),
            );
        }
        h = sparse_header(&tail[512..1024]).map_err(|why| format!("its footer: {why}"))?;
        if h.gd_offset == GD_AT_END {
            return Err("its footer does not say where the grain directory is".into());
        }
    }
    let span = h.grain.saturating_mul(h.gtes_per_gt);
    let gd_entries = h.capacity.div_ceil(span);
    let gd = read(h.gd_offset.saturating_mul(512), gd_entries.saturating_mul(4))
        .map_err(|why| format!("its grain directory is cut off: {why}"))?;
    for gt in gd.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")) as u64) {
        if gt == 0 {
            continue;
        }
        let table =
            read(gt * 512, h.gtes_per_gt * 4).map_err(|why| format!("a grain table is cut off: {why}"))?;
        for grain in table.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")) as u64)
        {
            // 0: not allocated; 1: a zero grain (format 2+).
            if grain <= 1 {
                continue;
            }
            let at = grain * 512;
            if h.flags & COMPRESSED != 0 {
                let marker = read(at, 12).map_err(|why| format!("a grain is cut off: {why}"))?;
                let size = le32(&marker, 8).unwrap_or(0);
                fits(at + 12, size).map_err(|why| format!("a compressed grain is cut off: {why}"))?;
            } else {
                fits(at, h.grain * 512).map_err(|why| format!("a grain is cut off: {why}"))?;
            }
        }
    }
    Ok(())
}

/// What the start of a disk holds and how many bytes it says the disk must have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub what: &'static str,
    pub needs: u64,
}

fn le16(b: &[u8], at: usize) -> Option<u64> {
    b.get(at..at + 2).map(|s| u16::from_le_bytes([s[0], s[1]]) as u64)
}
fn le32(b: &[u8], at: usize) -> Option<u64> {
    b.get(at..at + 4).map(|s| u32::from_le_bytes(s.try_into().expect("4 bytes")) as u64)
}
fn le64(b: &[u8], at: usize) -> Option<u64> {
    b.get(at..at + 8).map(|s| u64::from_le_bytes(s.try_into().expect("8 bytes")))
}
fn be32(b: &[u8], at: usize) -> Option<u64> {
    b.get(at..at + 4).map(|s| u32::from_be_bytes(s.try_into().expect("4 bytes")) as u64)
}
fn be64(b: &[u8], at: usize) -> Option<u64> {
    b.get(at..at + 8).map(|s| u64::from_be_bytes(s.try_into().expect("8 bytes")))
}

/// Recognise the start of a disk (pure). GPT before MBR (a GPT disk carries a protective MBR).
pub fn layout(head: &[u8]) -> Option<Layout> {
    if head.get(512..520) == Some(b"EFI PART") {
        // The backup header sits on the disk's last sector.
        let alternate = le64(head, 512 + 32)?;
        return Some(Layout {
            what: "GPT partition table",
            needs: alternate.saturating_add(1).saturating_mul(512),
        });
    }
    if head.get(510..512) == Some(&[0x55, 0xAA]) {
        // Entries with a valid boot flag only: a filesystem's boot sector has code where a partition table would be.
        let needs = (0..4)
            .map(|i| 446 + 16 * i)
            .filter(|&e| {
                matches!(head.get(e), Some(0x00) | Some(0x80)) && head.get(e + 4).is_some_and(|t| *t != 0)
            })
            .filter_map(|e| Some(le32(head, e + 8)?.saturating_add(le32(head, e + 12)?)))
            .max()
            .unwrap_or(0);
        return Some(Layout { what: "MBR partition table", needs: needs.saturating_mul(512) });
    }
    if le16(head, 1080) == Some(0xEF53) {
        let sb = 1024;
        let block = 1024u64.checked_shl(le32(head, sb + 24)? as u32).unwrap_or(u64::MAX);
        let mut blocks = le32(head, sb + 4)?;
        if le32(head, sb + 0x60)? & 0x80 != 0 {
            blocks |= le32(head, sb + 0x150)? << 32;
        }
        return Some(Layout { what: "ext2/3/4 filesystem", needs: blocks.saturating_mul(block) });
    }
    if head.get(0..4) == Some(b"XFSB") {
        return Some(Layout { what: "XFS filesystem", needs: be64(head, 8)?.saturating_mul(be32(head, 4)?) });
    }
    if head.get(0x10040..0x10048) == Some(b"_BHRfS_M") {
        return Some(Layout { what: "btrfs filesystem", needs: le64(head, 0x10070)? });
    }
    if head.get(512..520) == Some(b"LABELONE") {
        return Some(Layout { what: "LVM physical volume", needs: 0 });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mbr(entries: &[(u8, u8, u32, u32)]) -> Vec<u8> {
        let mut b = vec![0u8; 4096];
        for (i, (flag, kind, start, len)) in entries.iter().enumerate() {
            let e = 446 + 16 * i;
            b[e] = *flag;
            b[e + 4] = *kind;
            b[e + 8..e + 12].copy_from_slice(&start.to_le_bytes());
            b[e + 12..e + 16].copy_from_slice(&len.to_le_bytes());
        }
        b[510] = 0x55;
        b[511] = 0xAA;
        b
    }

    #[test]
    fn mbr_needs_the_end_of_its_last_partition() {
        let l = layout(&mbr(&[(0x80, 0x83, 2048, 4096), (0, 0x82, 8192, 2048)])).unwrap();
        assert_eq!(l, Layout { what: "MBR partition table", needs: (8192 + 2048) * 512 });
        // A boot sector whose "entries" are code (flags other than 0x00/0x80) says nothing about the size.
        assert_eq!(layout(&mbr(&[(0x31, 0xc0, u32::MAX, u32::MAX)])).unwrap().needs, 0);
    }

    #[test]
    fn gpt_needs_its_backup_header() {
        let mut b = mbr(&[(0, 0xEE, 1, u32::MAX)]);
        b[512..520].copy_from_slice(b"EFI PART");
        b[544..552].copy_from_slice(&(2_097_151u64).to_le_bytes());
        assert_eq!(layout(&b).unwrap(), Layout { what: "GPT partition table", needs: 1 << 30 });
    }

    #[test]
    fn ext4_size_from_its_superblock() {
        let mut b = vec![0u8; 4096];
        b[1080..1082].copy_from_slice(&0xEF53u16.to_le_bytes());
        b[1028..1032].copy_from_slice(&262_144u32.to_le_bytes());
        b[1048..1052].copy_from_slice(&2u32.to_le_bytes()); // 4096-byte blocks
        assert_eq!(layout(&b).unwrap(), Layout { what: "ext2/3/4 filesystem", needs: 1 << 30 });
        b[1024 + 0x60] = 0x80; // 64bit: the high word counts
        b[1024 + 0x150..1024 + 0x154].copy_from_slice(&1u32.to_le_bytes());
        assert_eq!(layout(&b).unwrap().needs, ((1u64 << 32) + 262_144) * 4096);
    }

    fn put(b: &mut [u8], at: usize, v: &[u8]) {
        b[at..at + v.len()].copy_from_slice(v);
    }

    /// A sparse extent header: 1 MiB disk, 64 KiB grains, 512 entries per table.
    fn kdmv(flags: u32, gd_offset: u64, desc: (u64, u64)) -> Vec<u8> {
        let mut h = vec![0u8; 512];
        put(&mut h, 0, b"KDMV");
        put(&mut h, 4, &3u32.to_le_bytes());
        put(&mut h, 8, &flags.to_le_bytes());
        put(&mut h, 12, &2048u64.to_le_bytes());
        put(&mut h, 20, &128u64.to_le_bytes());
        put(&mut h, 28, &desc.0.to_le_bytes());
        put(&mut h, 36, &desc.1.to_le_bytes());
        put(&mut h, 44, &512u32.to_le_bytes());
        put(&mut h, 56, &gd_offset.to_le_bytes());
        put(&mut h, 73, b"\n \r\n");
        h
    }

    fn marker(val: u64, size: u32, kind: u32) -> Vec<u8> {
        let mut m = vec![0u8; 512];
        put(&mut m, 0, &val.to_le_bytes());
        put(&mut m, 8, &size.to_le_bytes());
        put(&mut m, 12, &kind.to_le_bytes());
        m
    }

    /// A stream-optimized VMDK as VirtualBox exports it (sectors): header with the grain directory at the end (0),
    /// descriptor (1), one compressed grain (2), grain table marker + table (3, 4-7), directory marker +
    /// directory (8, 9), footer marker (10), footer (11), end-of-stream marker (12).
    fn stream_vmdk() -> Vec<u8> {
        let flags = 1 | (1 << 16) | (1 << 17);
        let mut v = kdmv(flags, u64::MAX, (1, 1));
        let mut desc =
            b"# Disk DescriptorFile\ncreateType=\"streamOptimized\"\nRW 2048 SPARSE \"d.vmdk\"\n".to_vec();
        desc.resize(512, 0);
        v.extend(desc);
        let mut grain = marker(0, 20, 0);
        put(&mut grain, 8, &20u32.to_le_bytes());
        grain[12..32].copy_from_slice(&[0x78; 20]);
        v.extend(grain);
        v.extend(marker(4, 0, 1));
        let mut gt = vec![0u8; 2048];
        put(&mut gt, 0, &2u32.to_le_bytes());
        v.extend(gt);
        v.extend(marker(1, 0, 2));
        let mut gd = vec![0u8; 512];
        put(&mut gd, 0, &4u32.to_le_bytes());
        v.extend(gd);
        v.extend(marker(1, 0, 3));
        v.extend(kdmv(flags, 9, (1, 1)));
        v.extend(vec![0u8; 512]);
        v
    }

    fn vmdk_err(dir: &Path, name: &str, data: &[u8]) -> String {
        let p = dir.join(name);
        std::fs::write(&p, data).unwrap();
        check_vmdk(&p).unwrap_err()
    }

    #[test]
    fn stream_optimized_vmdk_is_whole_only_with_its_footer() {
        let t = tempfile::tempdir().unwrap();
        let good = stream_vmdk();
        std::fs::write(t.path().join("d.vmdk"), &good).unwrap();
        check_vmdk(&t.path().join("d.vmdk")).unwrap();
        let e = vmdk_err(t.path(), "a.vmdk", &good[..good.len() - 512]);
        assert!(
            e.contains("does not end with a footer and an end-of-stream marker") && e.contains("truncated"),
            "{e}"
        );
        let e = vmdk_err(t.path(), "b.vmdk", &good[..good.len() - 100]);
        assert!(e.contains("on whole sectors; the file is truncated"), "{e}");
        let e = vmdk_err(t.path(), "c.vmdk", &good[..1000]);
        assert!(e.contains("truncated"), "{e}");
        // The line-end test bytes after a text-mode transfer.
        let mut text = good.clone();
        text[75] = b'\n';
        let e = vmdk_err(t.path(), "d2.vmdk", &text);
        assert!(e.contains("transferred as text"), "{e}");
        // The grain table names a grain past the end of the file.
        let mut past = good.clone();
        put(&mut past, 4 * 512, &5000u32.to_le_bytes());
        let e = vmdk_err(t.path(), "e.vmdk", &past);
        assert!(
            e.contains("a grain is cut off: it needs bytes 2560000..") && e.contains("has only 6656"),
            "{e}"
        );
    }

    #[test]
    fn garbage_and_empty_vmdks_are_refused() {
        let t = tempfile::tempdir().unwrap();
        assert_eq!(vmdk_err(t.path(), "e.vmdk", b""), "the file is empty");
        let e = vmdk_err(t.path(), "g.vmdk", b"vmdk bytes");
        assert!(e.starts_with(
            "it starts with neither the sparse-extent magic KDMV nor a `# Disk DescriptorFile`"
        ));
        assert!(e.contains("76 6d 64 6b"), "{e}");
        let e = vmdk_err(t.path(), "h.vmdk", &b"KDMV"[..]);
        assert!(e.contains("less than its 512-byte header"), "{e}");
    }

    #[test]
    fn sparse_vmdk_with_its_directory_in_the_header_checks_every_grain() {
        let t = tempfile::tempdir().unwrap();
        // Header (0), directory (1), table (2-5), one 64 KiB grain (6-133).
        let mut v = kdmv(1, 1, (0, 0));
        let mut gd = vec![0u8; 512];
        put(&mut gd, 0, &2u32.to_le_bytes());
        v.extend(gd);
        let mut gt = vec![0u8; 2048];
        put(&mut gt, 4, &6u32.to_le_bytes());
        v.extend(gt);
        v.extend(vec![0x55u8; 128 * 512]);
        std::fs::write(t.path().join("s.vmdk"), &v).unwrap();
        check_vmdk(&t.path().join("s.vmdk")).unwrap();
        let e = vmdk_err(t.path(), "s2.vmdk", &v[..v.len() - 1]);
        assert!(e.contains("a grain is cut off"), "{e}");
        let e = vmdk_err(t.path(), "s3.vmdk", &v[..1024]);
        assert!(e.contains("a grain table is cut off"), "{e}");
    }

    #[test]
    fn flat_vmdk_descriptor_needs_its_extent_whole() {
        let t = tempfile::tempdir().unwrap();
        let desc = "# Disk DescriptorFile\nversion=1\ncreateType=\"monolithicFlat\"\nRW 2048 FLAT \"d-flat.vmdk\" 0\n";
        std::fs::write(t.path().join("d.vmdk"), desc).unwrap();
        let e = check_vmdk(&t.path().join("d.vmdk")).unwrap_err();
        assert_eq!(e, "its extent file d-flat.vmdk is missing");
        std::fs::write(t.path().join("d-flat.vmdk"), vec![0u8; 1 << 20]).unwrap();
        check_vmdk(&t.path().join("d.vmdk")).unwrap();
        std::fs::write(t.path().join("d-flat.vmdk"), vec![0u8; 4096]).unwrap();
        let e = check_vmdk(&t.path().join("d.vmdk")).unwrap_err();
        assert_eq!(e, "its flat extent d-flat.vmdk has 4096 bytes, the descriptor needs 1048576");
        let e = vmdk_err(t.path(), "x.vmdk", b"# Disk DescriptorFile\nversion=1\n");
        assert_eq!(e, "its descriptor names no extent");
        let e = vmdk_err(t.path(), "y.vmdk", b"# Disk DescriptorFile\nRW 2048 FLAT \"../etc/passwd\" 0\n");
        assert!(e.contains("is not a file beside it"), "{e}");
    }

    #[test]
    fn ovf_sizes_and_references_are_checked() {
        let t = tempfile::tempdir().unwrap();
        let disk = stream_vmdk();
        std::fs::write(t.path().join("box-disk001.vmdk"), &disk).unwrap();
        let ovf = |size: &str| {
            format!(
                "<Envelope xmlns:ovf=\"x\"><References><ovf:File ovf:id=\"file1\" ovf:href=\"box-disk001.vmdk\" \
                 {size}/></References><DiskSection><Disk ovf:fileRef=\"file1\"/></DiskSection></Envelope>"
            )
        };
        std::fs::write(t.path().join("box.ovf"), ovf(&format!("ovf:size=\"{}\"", disk.len()))).unwrap();
        check_ovf(t.path(), "box.ovf", "x.box").unwrap();
        std::fs::write(t.path().join("box.ovf"), ovf("ovf:size=\"99999\"")).unwrap();
        let e = format!("{:#}", check_ovf(t.path(), "box.ovf", "x.box").unwrap_err());
        assert!(
            e.starts_with(
                "the box x.box is not usable: box-disk001.vmdk has 6656 bytes, but its box.ovf says \
                               99999 (ovf:size)\nhint: the box file is probably truncated or damaged"
            ),
            "{e}"
        );
        assert!(e.ends_with("it was not added to the box cache"), "{e}");
        std::fs::write(t.path().join("box.ovf"), ovf("")).unwrap();
        std::fs::write(t.path().join("box-disk001.vmdk"), b"garbage").unwrap();
        let e = format!("{:#}", check_ovf(t.path(), "box.ovf", "x.box").unwrap_err());
        assert!(e.contains("box-disk001.vmdk is not a usable VMDK disk: it starts with neither"), "{e}");
        std::fs::remove_file(t.path().join("box-disk001.vmdk")).unwrap();
        let e = format!("{:#}", check_ovf(t.path(), "box.ovf", "x.box").unwrap_err());
        assert!(e.contains("its box.ovf references box-disk001.vmdk, which the box does not hold"), "{e}");
        assert_eq!(
            ovf_references("<File ovf:href='a' size=\"3\"/><Filex/><ovf:File href=\"b\">"),
            [
                OvfFile { href: Some("a".into()), size: Some(3) },
                OvfFile { href: Some("b".into()), size: None }
            ]
        );
    }

    #[test]
    fn zeros_and_short_heads_are_nothing() {
        assert_eq!(layout(&[0u8; 70_000]), None);
        assert_eq!(layout(&[]), None);
        assert_eq!(layout(&[0x55; 100]), None);
    }
}
