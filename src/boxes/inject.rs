//! Keys into a box's disk before its first boot, without cloud-init (issue 20): the boxes Vagrant users have
//! (`generic/*`, `bento/*`, `debian/*`, `vagrant package`) ship a `vagrant` user whose `authorized_keys` holds
//! Vagrant's published insecure key. Before such a machine first starts, its own disk (the qcow2 overlay, never
//! the cached box) is edited offline: the machine's key replaces every key in the box user's `authorized_keys`
//! (so the insecure keys are gone before the guest is ever on a network), and the guest gets an ed25519 host key
//! made here, so the first connection is pinned as with a cloud-init seed.
//!
//! The route: `qemu-storage-daemon` exports the image as a raw file over FUSE (no kernel module, no root, no
//! appliance: ~0.2 s), the partition table (MBR or GPT) is read here, the root ext2/3/4 filesystem found by its
//! superblock and `/etc/passwd`, and e2fsprogs' `debugfs` reads and writes files in it. Every write is read back.
//! A root filesystem debugfs cannot edit (XFS, btrfs, LVM, LUKS) is refused before boot with the choices.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::process::Cmd;

/// Vagrant's published insecure RSA public key: hashicorp/vagrant `keys/vagrant.pub.rsa` (also `keys/vagrant.pub`
/// before 2.3), <https://github.com/hashicorp/vagrant/tree/main/keys>.
pub const VAGRANT_INSECURE_RSA: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAABIwAAAQEA6NF8iallvQVp22WDkTkyrtvp9eWW6A8YVr+kz4TjGYe7gHzIw+niNltGEFHzD8+v1I2YJ6oXevct1YeS0o9HZyN1Q9qgCgzUFtdOKLv6IedplqoPkcmF0aYet2PkEDo3MlTBckFXPITAMzF8dJSIFo9D8HfdOV0IAdx4O7PtixWKn5y2hMNG0zQPyUecp4pzC6kivAIhyfHilFR61RGL+GPXQ2MWZWFYbAGjyiYJnAmCP3NOTd0jMZEnDkbUvxhMmBYSdETk1rRgm+R4LOzFUGaHqHDLKLX+FIPKcF96hrucXzcWyLbIbEgE98OHlnVYCzRdK8jlqm8tehUc9c9WhQ== vagrant insecure public key";
/// Vagrant's published insecure ed25519 public key (Vagrant 2.3+): hashicorp/vagrant `keys/vagrant.pub.ed25519`.
pub const VAGRANT_INSECURE_ED25519: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIN1YdxBpNlzxDqfJyw/QKow1F+wvG9hXGoqiysfJOn5Y vagrant insecure public key";
/// Every published insecure key, by its base64 blob (the part an `authorized_keys` line is matched on).
pub const VAGRANT_INSECURE_KEYS: [&str; 2] = [VAGRANT_INSECURE_RSA, VAGRANT_INSECURE_ED25519];

const DEADLINE: Duration = Duration::from_secs(60);

/// How keys get into a machine made from a box.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The box runs cloud-init: the NoCloud seed carries the keys.
    CloudInit,
    /// No cloud-init: the machine's disk is edited before its first boot.
    Disk,
    /// `[box] keys = "insecure-once"`: one login with Vagrant's insecure key on loopback, keys replaced in it.
    InsecureOnce,
}

impl Route {
    pub fn name(self) -> &'static str {
        match self {
            Route::CloudInit => "cloud-init",
            Route::Disk => "disk",
            Route::InsecureOnce => "insecure-once",
        }
    }
}

/// A disk image exported as a raw file over FUSE by `qemu-storage-daemon`; stopped when dropped.
struct View {
    file: PathBuf,
    pidfile: PathBuf,
}

/// `,` is the option separator of `--blockdev`: a literal comma is doubled.
fn opt_path(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

/// A disk as a hypervisor holds it: the image written to and, top first, the read-only images under it that are
/// not named in its own header (a VirtualBox differencing image's parents, which VirtualBox finds through its media
/// registry: `VBoxManage showmediuminfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    pub path: PathBuf,
    /// "qcow2", "raw", "vmdk", "vdi" or "vpc" (VHD): qemu's block driver names.
    pub format: String,
    pub backing: Vec<(PathBuf, String)>,
}

impl Disk {
    /// One image (a qcow2 overlay names its backing file itself).
    pub fn single(path: impl Into<PathBuf>, format: &str) -> Self {
        Self { path: path.into(), format: format.to_string(), backing: Vec::new() }
    }
}

/// qemu's block driver for a disk format; VirtualBox's names ("VMDK", "VDI", "VHD") are taken too.
pub fn driver(format: &str) -> Result<&'static str> {
    Ok(match format.to_ascii_lowercase().as_str() {
        "qcow2" => "qcow2",
        "raw" => "raw",
        "vmdk" => "vmdk",
        "vdi" => "vdi",
        "vhd" | "vpc" => "vpc",
        other => bail!(
            "a {other} disk cannot be edited before the first boot (qcow2, raw, VMDK, VDI and VHD can)
hint: use a \
             box that runs cloud-init ([box] keys = \"cloud-init\"), or convert the box's disk with `qemu-img convert`"
        ),
    })
}

impl View {
    /// Export `image` (qcow2, raw, vmdk, vdi) as the raw file `work/view`. Read-only unless `writable`.
    fn open(image: &Path, format: &str, work: &Path, writable: bool) -> Result<Self> {
        Self::open_disk(&Disk::single(image, format), work, writable)
    }

    /// Export `disk` (its images under it opened read-only, always) as the raw file `work/view`.
    fn open_disk(disk: &Disk, work: &Path, writable: bool) -> Result<Self> {
        let image = disk.path.as_path();
        which::which("qemu-storage-daemon").map_err(|_| {
            anyhow::anyhow!(
                "`qemu-storage-daemon` was not found on PATH; it reads the box's disk before the first boot\n\
                 hint: install qemu-system-common (Debian/Ubuntu: apt-get install qemu-system-common), or set \
                 [box] keys = \"cloud-init\" for a box that runs cloud-init"
            )
        })?;
        std::fs::create_dir_all(work).with_context(|| format!("create {}", work.display()))?;
        let image = std::fs::canonicalize(image)
            .with_context(|| format!("the disk {} is missing", image.display()))?;
        let file = work.join("view");
        let pidfile = work.join("view.pid");
        let _ = std::fs::remove_file(&pidfile);
        std::fs::write(&file, b"").with_context(|| format!("create {}", file.display()))?;
        let ro = if writable { "" } else { ",read-only=on" };
        let fmt = driver(&disk.format)?;
        let mut cmd = Cmd::new("qemu-storage-daemon");
        // The images under the top one, bottom first: node `b<i>` is backed by `b<i+1>`.
        for (i, (path, format)) in disk.backing.iter().enumerate().rev() {
            let path = std::fs::canonicalize(path).with_context(|| {
                format!("the disk {} under {} is missing", path.display(), image.display())
            })?;
            let below =
                if i + 1 < disk.backing.len() { format!(",backing=b{}", i + 1) } else { String::new() };
            cmd = cmd.arg("--blockdev").arg(format!(
                "driver={},node-name=b{i},read-only=on,file.driver=file,file.filename={},file.read-only=on{below}",
                driver(format)?,
                opt_path(&path)
            ));
        }
        let below = if disk.backing.is_empty() { String::new() } else { ",backing=b0".to_string() };
        cmd.arg("--blockdev")
            .arg(format!(
                "driver={fmt},node-name=n{ro},file.driver=file,file.filename={}{ro_file}{below}",
                opt_path(&image),
                ro_file = if writable { "" } else { ",file.read-only=on" }
            ))
            .arg("--export")
            .arg(format!(
                "type=fuse,id=e,node-name=n,mountpoint={},writable={}",
                opt_path(&file),
                if writable { "on" } else { "off" }
            ))
            .arg("--pidfile")
            .arg(&pidfile)
            .arg("--daemonize")
            .timeout(DEADLINE)
            .run()
            .with_context(|| {
                format!(
                    "export the disk {} over FUSE\nhint: qemu-storage-daemon needs /dev/fuse (and fusermount3 for a \
                     non-root user); a disk in use by a running VM cannot be opened for writing; qemu cannot open \
                     VirtualBox's differencing VDI images (a box imported as VDI): use the box's VMDK",
                    image.display()
                )
            })?;
        let v = Self { file, pidfile };
        if !disk.backing.is_empty() {
            // qemu reads through a VMDK's parent only when the child's parentCID is the parent's CID.
            v.read_at(0, 512).with_context(|| {
                format!(
                    "the disk {} cannot be read through the images under it ({})
hint: qemu checks that a \
                     differencing VMDK's parentCID is its parent's CID; use a box that runs cloud-init ([box] keys = \
                     \"cloud-init\"), or `provisioner destroy -f` and `up` to clone the machine again",
                    image.display(),
                    disk.backing.iter().map(|(p, _)| p.display().to_string()).collect::<Vec<_>>().join(", ")
                )
            })?;
        }
        Ok(v)
    }

    fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        use std::io::{Read, Seek, SeekFrom};
        let mut f =
            std::fs::File::open(&self.file).with_context(|| format!("open {}", self.file.display()))?;
        f.seek(SeekFrom::Start(offset))?;
        let mut buf = Vec::with_capacity(len);
        f.take(len as u64).read_to_end(&mut buf)?;
        Ok(buf)
    }

    /// `debugfs -R CMD` (read-only) on the filesystem at `offset`.
    fn run(&self, offset: u64, cmd: &str) -> Result<crate::process::Output> {
        Cmd::new(debugfs()?)
            .arg("-R")
            .arg(cmd)
            .arg(format!("{}?offset={offset}", self.file.display()))
            .timeout(DEADLINE)
            .run()
    }

    /// `debugfs -R CMD` on the filesystem at `offset`: its stdout.
    fn debugfs(&self, offset: u64, cmd: &str) -> Result<String> {
        Ok(self.run(offset, cmd)?.stdout)
    }

    /// A file's contents, or None when it does not exist (one debugfs run: its error says "not found").
    fn cat(&self, offset: u64, path: &str) -> Result<Option<String>> {
        let out = self.run(offset, &format!("cat {path}"))?;
        if out.stderr.contains("File not found by ext2_lookup") {
            return Ok(None);
        }
        Ok(Some(out.stdout))
    }

    fn exists(&self, offset: u64, path: &str) -> Result<bool> {
        Ok(self.debugfs(offset, &format!("stat {path}"))?.contains("Inode:"))
    }
}

impl Drop for View {
    fn drop(&mut self) {
        let Some(pid) =
            std::fs::read_to_string(&self.pidfile).ok().and_then(|s| s.trim().parse::<u32>().ok())
        else {
            return;
        };
        // The pid qemu-storage-daemon wrote for itself.
        crate::platform::terminate(pid);
        let gone = || !crate::platform::process_alive(pid);
        let _ = crate::process::wait_until(Duration::from_secs(10), "qemu-storage-daemon to stop", || {
            Ok(gone().then_some(()))
        });
        let _ = std::fs::remove_file(&self.file);
    }
}

fn debugfs() -> Result<PathBuf> {
    which::which("debugfs")
        .ok()
        .or_else(|| ["/usr/sbin/debugfs", "/sbin/debugfs"].iter().map(PathBuf::from).find(|p| p.exists()))
        .ok_or_else(|| {
            anyhow::anyhow!(
                "`debugfs` was not found; it edits the box's disk before the first boot\nhint: apt-get install \
                 e2fsprogs"
            )
        })
}

/// A partition (or the whole disk) and what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub offset: u64,
    /// "ext", "xfs", "btrfs", "lvm", "luks", "swap" or "unknown".
    pub fs: &'static str,
}

/// Byte offsets of the partitions in the first sectors of a disk (`head`: at least 34 sectors for GPT), or the
/// whole disk (offset 0) when it has no partition table. GPT entries are read from `read(offset, len)`.
pub fn partitions(head: &[u8], read: &dyn Fn(u64, usize) -> Result<Vec<u8>>) -> Result<Vec<u64>> {
    let le32 = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    let le64 = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    if head.len() < 1024 || head[510..512] != [0x55, 0xAA] {
        return Ok(vec![0]);
    }
    let entries: Vec<(u8, u32, u32)> = (0..4)
        .map(|i| {
            let e = &head[0x1BE + 16 * i..0x1BE + 16 * (i + 1)];
            (e[4], le32(e, 8), le32(e, 12))
        })
        .collect();
    // A boot sector with code where a partition table would be: entries need a boot flag of 0x00 or 0x80.
    if (0..4).any(|i| !matches!(head[0x1BE + 16 * i], 0x00 | 0x80)) {
        return Ok(vec![0]);
    }
    if entries.iter().any(|e| e.0 == 0xEE) && &head[512..520] == b"EFI PART" {
        let gpt = &head[512..1024];
        let lba = le64(gpt, 72);
        let n = le32(gpt, 80).min(256) as usize;
        let size = le32(gpt, 84) as usize;
        if size < 128 {
            bail!("the GPT header gives a partition entry size of {size} bytes");
        }
        let table = read(lba * 512, n * size)?;
        let mut out = Vec::new();
        for i in 0..n {
            let Some(e) = table.get(i * size..i * size + 128) else { break };
            if e[..16].iter().all(|b| *b == 0) {
                continue;
            }
            out.push(le64(e, 32) * 512);
        }
        return Ok(out);
    }
    let parts: Vec<u64> = entries
        .iter()
        // Empty, and extended containers (their logical partitions are not read).
        .filter(|(t, start, n)| *t != 0 && *n != 0 && *start != 0 && ![0x05, 0x0F, 0x85].contains(t))
        .map(|(_, start, _)| u64::from(*start) * 512)
        .collect();
    // A boot sector without partitions (a filesystem on the whole disk that keeps 55 AA, e.g. from a bootloader).
    Ok(if parts.is_empty() { vec![0] } else { parts })
}

/// What a filesystem's first 68 KiB say it is.
pub fn fs_kind(b: &[u8]) -> &'static str {
    let at = |o: usize, m: &[u8]| b.get(o..o + m.len()) == Some(m);
    if at(1080, b"\x53\xEF") {
        "ext"
    } else if at(0, b"XFSB") {
        "xfs"
    } else if at(0x10040, b"_BHRfS_M") {
        "btrfs"
    } else if at(512, b"LABELONE") || at(0, b"LABELONE") {
        "lvm"
    } else if at(0, b"LUKS\xba\xbe") {
        "luks"
    } else if at(4086, b"SWAPSPACE2") {
        "swap"
    } else {
        "unknown"
    }
}

/// The ext2/3/4 partition holding /etc/passwd, if any, and every filesystem seen on the way.
fn scan(v: &View) -> Result<(Option<u64>, Vec<Part>)> {
    let head = v.read_at(0, 34 * 512)?;
    let offsets = partitions(&head, &|o, n| v.read_at(o, n))?;
    let mut seen = Vec::new();
    for off in offsets {
        let kind = fs_kind(&v.read_at(off, 68 * 1024)?);
        seen.push(Part { offset: off, fs: kind });
        if kind == "ext" && v.exists(off, "/etc/passwd")? {
            return Ok((Some(off), seen));
        }
    }
    Ok((None, seen))
}

/// Filesystems that hold an operating system's root but cannot be edited offline here.
const UNEDITABLE: [&str; 4] = ["xfs", "btrfs", "lvm", "luks"];

/// The root filesystem: the ext2/3/4 partition holding /etc/passwd, or an error naming what the disk holds.
fn find_root(v: &View, what: &str) -> Result<u64> {
    let (root, seen) = scan(v)?;
    if let Some(off) = root {
        return Ok(off);
    }
    let found: Vec<String> = seen.iter().map(|p| format!("{} at byte {}", p.fs, p.offset)).collect();
    let unsupported: Vec<&str> = seen
        .iter()
        .map(|p| p.fs)
        .filter(|f| ["xfs", "btrfs", "lvm", "luks", "unknown"].contains(f))
        .collect();
    bail!(
        "{what}: no ext2/3/4 root filesystem with /etc/passwd on the disk (found: {}){}; provisioner edits the disk \
         before the first boot only on ext2/3/4\nhint: use a box that runs cloud-init ([box] keys = \"cloud-init\"), \
         a box with an ext4 root, or accept one login with Vagrant's insecure key ([box] keys = \"insecure-once\")",
        if found.is_empty() { "nothing".to_string() } else { found.join(", ") },
        if unsupported.is_empty() { String::new() } else { format!(" ({} cannot be edited offline)", unsupported.join(", ")) }
    )
}

/// Which way keys get into machines of the box at `image`, read-only, and why.
pub fn detect(image: &Path, format: &str, work: &Path) -> Result<(Route, String)> {
    let v = View::open(image, format, work, false)?;
    let (root, seen) = scan(&v)?;
    // No root to read at all (an empty or unknown disk, no /etc/passwd) and nothing known to be uneditable: the
    // seed route, as for any box before this detection existed; the boot tells what the disk is.
    if root.is_none() && !seen.iter().any(|p| UNEDITABLE.contains(&p.fs)) {
        return Ok((Route::CloudInit, "no root filesystem found to read: the seed route".into()));
    }
    let root = find_root(&v, "the box's disk")?;
    let has = |p: &str| v.exists(root, p);
    if has("/usr/bin/cloud-init")? || has("/bin/cloud-init")? {
        if has("/etc/cloud/cloud-init.disabled")? {
            return Ok((Route::Disk, "cloud-init is disabled in the box".into()));
        }
        return Ok((Route::CloudInit, "the box runs cloud-init".into()));
    }
    Ok((Route::Disk, "no cloud-init in the box".into()))
}

/// Bump when [`detect`] may answer differently for the same disk: remembered answers are then asked again.
const DETECT_VERSION: u32 = 1;

/// [`detect`], remembered beside the image (`IMAGE.route`): a box's disk does not change under its id, and reading
/// it starts `qemu-storage-daemon` and `debugfs` (0.1 s of every `up` that creates a machine, a restored cached
/// lab's included). The answer is kept with the image's size and mtime and asked again when either differs.
/// Writing it is best effort (a read-only cache only asks every time).
pub fn detect_remembered(image: &Path, format: &str, work: &Path) -> Result<(Route, String)> {
    let memo = {
        let mut name = image.file_name().unwrap_or_default().to_os_string();
        name.push(".route");
        image.with_file_name(name)
    };
    let meta = std::fs::metadata(image).with_context(|| format!("read {}", image.display()))?;
    let mtime = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
    let stamp = format!(
        "provisioner-route {DETECT_VERSION} {format} {} {}",
        meta.len(),
        mtime.map(|d| d.as_nanos()).unwrap_or(0)
    );
    if let Some(found) = std::fs::read_to_string(&memo).ok().and_then(|text| parse_memo(&text, &stamp)) {
        return Ok(found);
    }
    let found = detect(image, format, work)?;
    let _ = crate::machine::write_private(
        &memo,
        format!("{stamp}\n{}\n{}\n", found.0.name(), found.1).as_bytes(),
        0o644,
    );
    Ok(found)
}

/// A remembered [`detect`] answer, if it was kept for `stamp`. Pure.
fn parse_memo(text: &str, stamp: &str) -> Option<(Route, String)> {
    let mut lines = text.lines();
    if lines.next()? != stamp {
        return None;
    }
    let route = match lines.next()? {
        "cloud-init" => Route::CloudInit,
        "disk" => Route::Disk,
        _ => return None,
    };
    Some((route, lines.next()?.to_string()))
}

/// What goes into a machine's disk.
pub struct Injection<'a> {
    /// Users to try, in order: the first one in /etc/passwd gets the key (`[ssh] user`, then `vagrant`).
    pub users: Vec<String>,
    /// The machine's public key (`ssh-ed25519 ...`).
    pub user_key: &'a str,
    pub host_key: &'a crate::keys::KeyPair,
    pub hostname: &'a str,
}

/// What [`inject`] did.
#[derive(Debug)]
pub struct Injected {
    pub user: String,
    /// Insecure Vagrant keys removed from `authorized_keys`.
    pub insecure_removed: usize,
    /// Other keys dropped (only the machine's key stays).
    pub others_removed: usize,
    pub seconds: f64,
}

/// A user's line in /etc/passwd: (home, uid, gid).
pub fn passwd_entry(passwd: &str, user: &str) -> Option<(String, u32, u32)> {
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 7 && f[0] == user)
            .then(|| Some((f[5].to_string(), f[2].parse().ok()?, f[3].parse().ok()?)))?
    })
}

/// The base64 blob of an `authorized_keys` line (after any options), if it has one.
fn key_blob(line: &str) -> Option<&str> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let i = words
        .iter()
        .position(|w| w.starts_with("ssh-") || w.starts_with("ecdsa-") || w.starts_with("sk-"))?;
    words.get(i + 1).copied()
}

/// The new `authorized_keys`: the machine's key only, and how many insecure and other keys it replaces. A file
/// without a final newline (hashicorp/vagrant#8362) is read line by line like any other.
pub fn authorized_keys(old: &str, machine_key: &str) -> (String, usize, usize) {
    let insecure: Vec<&str> = VAGRANT_INSECURE_KEYS.iter().filter_map(|k| key_blob(k)).collect();
    let (mut bad, mut other) = (0, 0);
    for l in old.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        match key_blob(l) {
            Some(b) if insecure.contains(&b) => bad += 1,
            Some(b) if Some(b) == key_blob(machine_key) => {}
            _ => other += 1,
        }
    }
    (format!("{}\n", machine_key.trim()), bad, other)
}

/// Put the machine's key, host key and hostname into the disk `overlay` (the machine's own qcow2; never the box).
pub fn inject(overlay: &Path, work: &Path, inj: &Injection) -> Result<Injected> {
    inject_disk(&Disk::single(overlay, "qcow2"), work, inj)
}

/// [`inject`] into the machine's own `disk` of any format qemu opens (a libvirt qcow2 overlay, a VirtualBox
/// clone's differencing VMDK with its parents read-only); the images under it are never written.
pub fn inject_disk(disk: &Disk, work: &Path, inj: &Injection) -> Result<Injected> {
    let t = Instant::now();
    let v = View::open_disk(disk, work, true)?;
    let root = find_root(&v, "the machine's disk")?;
    let passwd = v.cat(root, "/etc/passwd")?.unwrap_or_default();
    let Some((user, (home, uid, gid))) =
        inj.users.iter().find_map(|u| passwd_entry(&passwd, u).map(|e| (u.clone(), e)))
    else {
        bail!(
            "the box has none of the users {} in /etc/passwd, so there is no account to put the machine's key in\n\
             hint: set [ssh] user to the box's login user (Vagrant boxes: \"vagrant\")",
            inj.users.join(", ")
        );
    };
    if home.contains(char::is_whitespace) || home.contains('"') || !home.starts_with('/') {
        bail!("the home directory {home:?} of {user} in the box's /etc/passwd cannot be edited offline");
    }
    let ssh_dir = format!("{home}/.ssh");
    let ak = format!("{ssh_dir}/authorized_keys");
    let old = v.cat(root, &ak)?.unwrap_or_default();
    let (new, insecure_removed, others_removed) = authorized_keys(&old, inj.user_key);

    let files = work.join("files");
    std::fs::create_dir_all(&files)?;
    let local = |name: &str, body: &str| -> Result<PathBuf> {
        let p = files.join(name);
        crate::machine::write_private(&p, body.as_bytes(), 0o600)?;
        Ok(p)
    };
    let l_ak = local("authorized_keys", &new)?;
    let l_hk = local("host_key", &inj.host_key.private_openssh)?;
    let l_hkp = local("host_key.pub", &format!("{}\n", inj.host_key.public_openssh.trim()))?;
    let l_host = local("hostname", &format!("{}\n", inj.hostname))?;
    let mut cmds = String::new();
    let mut put = |dest: &str, src: &Path, mode: &str, uid: u32, gid: u32| {
        cmds.push_str(&format!(
            "rm {dest}\nwrite {} {dest}\nsif {dest} mode {mode}\nsif {dest} uid {uid}\nsif {dest} gid {gid}\n",
            src.display()
        ));
    };
    // The box's other host keys (shared by everyone who has the box) go: the guest answers with its own only.
    let mut pre = String::from("mkdir /etc/ssh\n");
    for k in ["rsa", "ecdsa", "dsa"] {
        pre.push_str(&format!("rm /etc/ssh/ssh_host_{k}_key\nrm /etc/ssh/ssh_host_{k}_key.pub\n"));
    }
    pre.push_str(&format!(
        "mkdir {ssh_dir}\nsif {ssh_dir} mode 040700\nsif {ssh_dir} uid {uid}\nsif {ssh_dir} gid {gid}\n"
    ));
    put(&ak, &l_ak, "0100600", uid, gid);
    put("/etc/ssh/ssh_host_ed25519_key", &l_hk, "0100600", 0, 0);
    put("/etc/ssh/ssh_host_ed25519_key.pub", &l_hkp, "0100644", 0, 0);
    put("/etc/hostname", &l_host, "0100644", 0, 0);
    let cmdfile = files.join("commands");
    std::fs::write(&cmdfile, format!("{pre}{cmds}"))?;
    Cmd::new(debugfs()?)
        .arg("-w")
        .arg("-f")
        .arg(&cmdfile)
        .arg(format!("{}?offset={root}", v.file.display()))
        .timeout(DEADLINE)
        .run()
        .context("edit the machine's disk with debugfs")?;
    // debugfs exits 0 whatever its commands did: what was written must read back.
    for (path, want) in [
        (ak.as_str(), new.as_str()),
        ("/etc/ssh/ssh_host_ed25519_key", inj.host_key.private_openssh.as_str()),
        ("/etc/hostname", &format!("{}\n", inj.hostname)),
    ] {
        let got = v.cat(root, path)?.unwrap_or_default();
        if got != want {
            bail!(
                "writing {path} into the machine's disk did not take (it reads back {} bytes, {} expected)\nhint: \
                 the filesystem may be full or damaged: `provisioner destroy -f`, then check the box with \
                 `qemu-img check`",
                got.len(),
                want.len()
            );
        }
    }
    let _ = std::fs::remove_dir_all(&files);
    drop(v);
    Ok(Injected { user, insecure_removed, others_removed, seconds: t.elapsed().as_secs_f64() })
}

/// For a test: read a file from a disk image's root filesystem (read-only).
pub fn read_file(image: &Path, format: &str, work: &Path, path: &str) -> Result<Option<String>> {
    let v = View::open(image, format, work, false)?;
    let root = find_root(&v, "the disk")?;
    v.cat(root, path)
}

/// For a test: read a file from the root filesystem of `disk` and the images under it (read-only).
pub fn read_file_disk(disk: &Disk, work: &Path, path: &str) -> Result<Option<String>> {
    let v = View::open_disk(disk, work, false)?;
    let root = find_root(&v, "the disk")?;
    v.cat(root, path)
}

/// For a test: a file's permission bits, uid and gid as debugfs `stat` prints them.
pub fn stat_file(image: &Path, format: &str, work: &Path, path: &str) -> Result<Option<(u32, u32, u32)>> {
    let v = View::open(image, format, work, false)?;
    let root = find_root(&v, "the disk")?;
    let out = v.debugfs(root, &format!("stat {path}"))?;
    let num = |key: &str| -> Option<u32> {
        let rest = out.split(key).nth(1)?.trim_start();
        let w = rest.split_whitespace().next()?;
        if key == "Mode:" {
            u32::from_str_radix(w, 8).ok()
        } else {
            w.parse().ok()
        }
    };
    Ok(num("Mode:").map(|m| (m, num("User:").unwrap_or(u32::MAX), num("Group:").unwrap_or(u32::MAX))))
}

/// For a test (and box builders): run debugfs commands (`-f`) writably on a qcow2/raw image's root filesystem.
pub fn edit(image: &Path, format: &str, work: &Path, commands: &str) -> Result<String> {
    let v = View::open(image, format, work, true)?;
    let root = find_root(&v, "the disk")?;
    let cmdfile = work.join("edit-commands");
    std::fs::write(&cmdfile, commands)?;
    let out = Cmd::new(debugfs()?)
        .arg("-w")
        .arg("-f")
        .arg(&cmdfile)
        .arg(format!("{}?offset={root}", v.file.display()))
        .timeout(DEADLINE)
        .run()?;
    Ok(out.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_remembered_route_is_used_while_the_image_is_unchanged_and_asked_again_after() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("box.qcow2");
        std::fs::write(&image, b"not a disk").unwrap();
        let memo = dir.path().join("box.qcow2.route");
        let work = dir.path().join("work");
        // No answer kept: the disk is read (and this one is not a disk).
        assert!(detect_remembered(&image, "qcow2", &work).is_err());
        assert!(!memo.exists(), "a failed read keeps nothing");
        // An answer kept for this very image is used, without reading the disk.
        let meta = std::fs::metadata(&image).unwrap();
        let mtime = meta.modified().unwrap().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let stamp = format!("provisioner-route {DETECT_VERSION} qcow2 {} {mtime}", meta.len());
        std::fs::write(&memo, format!("{stamp}\ndisk\nno cloud-init in the box\n")).unwrap();
        let (route, why) = detect_remembered(&image, "qcow2", &work).unwrap();
        assert_eq!((route, why.as_str()), (Route::Disk, "no cloud-init in the box"));
        // The image changed (its size): the kept answer is not used.
        std::fs::write(&image, b"not a disk either").unwrap();
        assert!(detect_remembered(&image, "qcow2", &work).is_err());
        assert_eq!(parse_memo(&format!("{stamp}\ninsecure-once\nx\n"), &stamp), None, "never remembered");
    }

    #[test]
    fn authorized_keys_keeps_only_the_machine_key() {
        let m = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMachine provisioner@lab";
        // No final newline (hashicorp/vagrant#8362), both insecure keys, one with options.
        let old = format!("{VAGRANT_INSECURE_RSA}\nno-pty {VAGRANT_INSECURE_ED25519}");
        let (new, bad, other) = authorized_keys(&old, m);
        assert_eq!(new, format!("{m}\n"));
        assert_eq!((bad, other), (2, 0));
        let (_, bad, other) = authorized_keys("ssh-rsa AAAAother me@x\n# comment\n\n", m);
        assert_eq!((bad, other), (0, 1));
    }

    #[test]
    fn passwd_lines_give_home_uid_gid() {
        let p = "root:x:0:0:root:/root:/bin/bash\nvagrant:x:1000:1001:,,,:/home/vagrant:/bin/bash";
        assert_eq!(passwd_entry(p, "vagrant"), Some(("/home/vagrant".into(), 1000, 1001)));
        assert_eq!(passwd_entry(p, "nobody"), None);
    }

    #[test]
    fn partition_tables_are_read() {
        let none = |_: u64, _: usize| -> Result<Vec<u8>> { unreachable!() };
        // A bare filesystem: the whole disk.
        assert_eq!(partitions(&vec![0u8; 34 * 512], &none).unwrap(), vec![0]);
        // MBR with a Linux partition at sector 2048 and an extended container.
        let mut mbr = vec![0u8; 34 * 512];
        mbr[510] = 0x55;
        mbr[511] = 0xAA;
        mbr[0x1BE + 4] = 0x83;
        mbr[0x1BE + 8..0x1BE + 12].copy_from_slice(&2048u32.to_le_bytes());
        mbr[0x1BE + 12..0x1BE + 16].copy_from_slice(&100u32.to_le_bytes());
        mbr[0x1CE + 4] = 0x05;
        mbr[0x1CE + 8..0x1CE + 12].copy_from_slice(&4096u32.to_le_bytes());
        mbr[0x1CE + 12..0x1CE + 16].copy_from_slice(&100u32.to_le_bytes());
        assert_eq!(partitions(&mbr, &none).unwrap(), vec![2048 * 512]);
        // GPT: protective MBR, header at LBA 1, two entries at LBA 2 (the first unused).
        let mut gpt = vec![0u8; 34 * 512];
        gpt[510] = 0x55;
        gpt[511] = 0xAA;
        gpt[0x1BE + 4] = 0xEE;
        gpt[0x1BE + 8] = 1;
        gpt[0x1BE + 12] = 0xFF;
        gpt[512..520].copy_from_slice(b"EFI PART");
        gpt[512 + 72..512 + 80].copy_from_slice(&2u64.to_le_bytes());
        gpt[512 + 80..512 + 84].copy_from_slice(&2u32.to_le_bytes());
        gpt[512 + 84..512 + 88].copy_from_slice(&128u32.to_le_bytes());
        let mut table = vec![0u8; 256];
        table[128] = 1;
        table[128 + 32..128 + 40].copy_from_slice(&227328u64.to_le_bytes());
        let read = move |o: u64, n: usize| -> Result<Vec<u8>> {
            assert_eq!((o, n), (1024, 256));
            Ok(table.clone())
        };
        assert_eq!(partitions(&gpt, &read).unwrap(), vec![227328 * 512]);
    }

    #[test]
    fn filesystems_are_told_apart() {
        let mut b = vec![0u8; 68 * 1024];
        assert_eq!(fs_kind(&b), "unknown");
        b[..4].copy_from_slice(b"XFSB");
        assert_eq!(fs_kind(&b), "xfs");
        b[1080] = 0x53;
        b[1081] = 0xEF;
        assert_eq!(fs_kind(&b), "ext");
    }
}
