//! Integrity checks on every disk image a box brings in, before it counts as cached: `qemu-img check` for qcow2
//! (a truncated file has clusters past its end), the file against the size its format needs, and the first
//! 68 KiB the guest sees must hold something a machine boots from (a partition table or a filesystem) that fits in
//! the disk. `qemu-img info` alone accepts a qcow2 cut to its first 64 KiB; such a box then boots to an empty
//! serial console and `up` fails only after the whole boot timeout.

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
    if end > file_size {
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

    #[test]
    fn zeros_and_short_heads_are_nothing() {
        assert_eq!(layout(&[0u8; 70_000]), None);
        assert_eq!(layout(&[]), None);
        assert_eq!(layout(&[0x55; 100]), None);
    }
}
