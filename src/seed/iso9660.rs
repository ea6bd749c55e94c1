//! A minimal ISO9660 writer with Joliet names: one root directory of small files, which is all a cloud-init
//! NoCloud seed needs. Written here instead of pulling in an ISO crate: ~200 lines, no dependency, and the whole
//! format is visible (ECMA-119 for the primary tree, Joliet level 3 for the names with '-').
//!
//! Layout (2048-byte sectors): 0-15 system area, 16 primary volume descriptor, 17 Joliet supplementary
//! descriptor, 18 terminator, 19-22 path tables (L and M, primary then Joliet), 23 primary root directory,
//! 24 Joliet root directory, 25.. file data (each file starts on a sector).

use anyhow::{bail, Result};

const SECTOR: usize = 2048;
const PVD: usize = 16;
const PATH_TABLES: u32 = 19;
const ROOT_PRIMARY: u32 = 23;
const ROOT_JOLIET: u32 = 24;
const FIRST_DATA: u32 = 25;

/// A UTC time as ISO9660 records it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Stamp {
    year: u32,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
}

impl Stamp {
    pub(super) fn from_unix(secs: u64) -> Stamp {
        // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
        let days = (secs / 86400) as i64;
        let rem = secs % 86400;
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = (yoe + era * 400 + i64::from(month <= 2)) as u32;
        Stamp {
            year,
            month,
            day,
            hour: (rem / 3600) as u32,
            minute: (rem % 3600 / 60) as u32,
            second: (rem % 60) as u32,
        }
    }
    /// 7-byte directory record form.
    fn short(&self) -> [u8; 7] {
        let s = self;
        [(s.year - 1900) as u8, s.month as u8, s.day as u8, s.hour as u8, s.minute as u8, s.second as u8, 0]
    }
    /// 17-byte volume descriptor form.
    fn long(&self) -> [u8; 17] {
        let s = self;
        let mut out = [0u8; 17];
        let text =
            format!("{:04}{:02}{:02}{:02}{:02}{:02}00", s.year, s.month, s.day, s.hour, s.minute, s.second);
        out[..16].copy_from_slice(text.as_bytes());
        out
    }
}

/// Build an image holding `files` (name, contents) in its root directory, with volume label `label`.
pub(super) fn build(label: &str, files: &[(&str, &[u8])], stamp: Stamp) -> Result<Vec<u8>> {
    if label.is_empty() || label.len() > 16 || !label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        bail!("ISO volume label {label:?} must be 1-16 letters, digits or '_'");
    }
    // Lay out file data, then both directory trees point at the same extents.
    let mut next = FIRST_DATA;
    let mut entries = Vec::new();
    for (name, data) in files {
        if name.is_empty() || name.len() > 64 || name.contains('/') || !name.is_ascii() {
            bail!("ISO file name {name:?} must be 1-64 ASCII characters without '/'");
        }
        entries.push(Entry { primary: primary_name(name), joliet: ucs2(name), extent: next, data });
        next += data.len().div_ceil(SECTOR) as u32;
    }
    let total = next;

    let mut img = vec![0u8; total as usize * SECTOR];
    let mut primary: Vec<&Entry> = entries.iter().collect();
    primary.sort_by(|a, b| a.primary.cmp(&b.primary));
    let mut joliet: Vec<&Entry> = entries.iter().collect();
    joliet.sort_by(|a, b| a.joliet.cmp(&b.joliet));
    for e in &entries {
        let at = e.extent as usize * SECTOR;
        img[at..at + e.data.len()].copy_from_slice(e.data);
    }
    let root_p = directory(
        ROOT_PRIMARY,
        primary.iter().map(|e| (e.primary.as_slice(), e.extent, e.data.len())),
        stamp,
    )?;
    let root_j =
        directory(ROOT_JOLIET, joliet.iter().map(|e| (e.joliet.as_slice(), e.extent, e.data.len())), stamp)?;
    sector(&mut img, ROOT_PRIMARY).copy_from_slice(&root_p);
    sector(&mut img, ROOT_JOLIET).copy_from_slice(&root_j);
    for (i, root) in [ROOT_PRIMARY, ROOT_JOLIET].into_iter().enumerate() {
        let base = PATH_TABLES + 2 * i as u32;
        sector(&mut img, base)[..10].copy_from_slice(&path_record(root, true));
        sector(&mut img, base + 1)[..10].copy_from_slice(&path_record(root, false));
    }

    let pvd = descriptor(1, label, total, PATH_TABLES, ROOT_PRIMARY, stamp, false);
    let svd = descriptor(2, label, total, PATH_TABLES + 2, ROOT_JOLIET, stamp, true);
    img[PVD * SECTOR..(PVD + 1) * SECTOR].copy_from_slice(&pvd);
    img[(PVD + 1) * SECTOR..(PVD + 2) * SECTOR].copy_from_slice(&svd);
    let term = &mut img[(PVD + 2) * SECTOR..(PVD + 3) * SECTOR];
    term[0] = 255;
    term[1..6].copy_from_slice(b"CD001");
    term[6] = 1;
    Ok(img)
}

struct Entry<'a> {
    primary: Vec<u8>,
    joliet: Vec<u8>,
    extent: u32,
    data: &'a [u8],
}

fn sector(img: &mut [u8], n: u32) -> &mut [u8] {
    &mut img[n as usize * SECTOR..(n as usize + 1) * SECTOR]
}

/// ISO9660 level 2 name: d-characters (A-Z 0-9 _), ".;1" version suffix.
fn primary_name(name: &str) -> Vec<u8> {
    let mut n: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '.' { c.to_ascii_uppercase() } else { '_' })
        .collect();
    n.truncate(28);
    if !n.contains('.') {
        n.push('.');
    }
    n.push_str(";1");
    n.into_bytes()
}

fn ucs2(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(u16::to_be_bytes).collect()
}

fn both32(v: u32) -> [u8; 8] {
    let mut o = [0u8; 8];
    o[..4].copy_from_slice(&v.to_le_bytes());
    o[4..].copy_from_slice(&v.to_be_bytes());
    o
}

fn both16(v: u16) -> [u8; 4] {
    let mut o = [0u8; 4];
    o[..2].copy_from_slice(&v.to_le_bytes());
    o[2..].copy_from_slice(&v.to_be_bytes());
    o
}

/// One directory record.
fn record(id: &[u8], extent: u32, len: usize, dir: bool, stamp: Stamp) -> Vec<u8> {
    let size = 33 + id.len() + (id.len() + 1) % 2;
    let mut r = vec![0u8; size];
    r[0] = size as u8;
    r[2..10].copy_from_slice(&both32(extent));
    r[10..18].copy_from_slice(&both32(len as u32));
    r[18..25].copy_from_slice(&stamp.short());
    r[25] = if dir { 2 } else { 0 };
    r[28..32].copy_from_slice(&both16(1));
    r[32] = id.len() as u8;
    r[33..33 + id.len()].copy_from_slice(id);
    r
}

/// The root directory sector: ".", "..", then the files (already sorted).
fn directory<'a>(
    root: u32,
    files: impl Iterator<Item = (&'a [u8], u32, usize)>,
    stamp: Stamp,
) -> Result<Vec<u8>> {
    let mut d = record(&[0], root, SECTOR, true, stamp);
    d.extend(record(&[1], root, SECTOR, true, stamp));
    for (id, extent, len) in files {
        d.extend(record(id, extent, len, false, stamp));
    }
    if d.len() > SECTOR {
        bail!("too many files for a one-sector ISO root directory");
    }
    d.resize(SECTOR, 0);
    Ok(d)
}

/// The single path table record (the root), little- or big-endian.
fn path_record(root: u32, little: bool) -> [u8; 10] {
    let mut r = [0u8; 10];
    r[0] = 1;
    r[2..6].copy_from_slice(&if little { root.to_le_bytes() } else { root.to_be_bytes() });
    r[6..8].copy_from_slice(&if little { 1u16.to_le_bytes() } else { 1u16.to_be_bytes() });
    r
}

/// A primary (type 1) or Joliet supplementary (type 2) volume descriptor.
fn descriptor(
    kind: u8,
    label: &str,
    total: u32,
    path_tables: u32,
    root: u32,
    stamp: Stamp,
    joliet: bool,
) -> Vec<u8> {
    let mut d = vec![0u8; SECTOR];
    d[0] = kind;
    d[1..6].copy_from_slice(b"CD001");
    d[6] = 1;
    let text = |d: &mut [u8], at: usize, len: usize, s: &str| {
        let bytes = if joliet { ucs2(s) } else { s.as_bytes().to_vec() };
        let field = &mut d[at..at + len];
        for (i, b) in field.iter_mut().enumerate() {
            // Pad with spaces (UCS-2 spaces in the Joliet descriptor).
            *b = if joliet && i % 2 == 0 { 0 } else { b' ' };
        }
        field[..bytes.len().min(len)].copy_from_slice(&bytes[..bytes.len().min(len)]);
    };
    text(&mut d, 8, 32, "LINUX");
    text(&mut d, 40, 32, label);
    d[80..88].copy_from_slice(&both32(total));
    if joliet {
        d[88..91].copy_from_slice(b"%/E");
    }
    d[120..124].copy_from_slice(&both16(1));
    d[124..128].copy_from_slice(&both16(1));
    d[128..132].copy_from_slice(&both16(SECTOR as u16));
    d[132..140].copy_from_slice(&both32(10));
    d[140..144].copy_from_slice(&path_tables.to_le_bytes());
    d[148..152].copy_from_slice(&(path_tables + 1).to_be_bytes());
    d[156..190].copy_from_slice(&record(&[0], root, SECTOR, true, stamp));
    for (at, len) in [(190, 128), (318, 128), (446, 128), (702, 37), (739, 37), (776, 37)] {
        text(&mut d, at, len, "");
    }
    text(&mut d, 574, 128, "PROVISIONER");
    d[813..830].copy_from_slice(&stamp.long());
    d[830..847].copy_from_slice(&stamp.long());
    for at in [847, 864] {
        d[at..at + 16].fill(b'0');
    }
    d[881] = 1;
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        let s = Stamp::from_unix(0);
        assert_eq!((s.year, s.month, s.day), (1970, 1, 1));
        let s = Stamp::from_unix(1_709_210_096); // 2024-02-29 12:34:56 UTC
        assert_eq!((s.year, s.month, s.day, s.hour, s.minute, s.second), (2024, 2, 29, 12, 34, 56));
        assert_eq!(&s.long()[..16], b"2024022912345600");
    }

    #[test]
    fn names_and_layout() {
        assert_eq!(primary_name("user-data"), b"USER_DATA.;1");
        let img = build("cidata", &[("a", b"x"), ("empty", b"")], Stamp::from_unix(0)).unwrap();
        assert_eq!(img.len(), 26 * SECTOR);
        assert_eq!(&img[PVD * SECTOR + 1..PVD * SECTOR + 6], b"CD001");
        assert_eq!(img[25 * SECTOR], b'x');
        assert!(build("bad label", &[], Stamp::from_unix(0)).is_err());
    }
}
