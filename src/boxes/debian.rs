//! Build a bootable cloud-style Debian image from a mirror: mmdebstrap (minbase plus every package, resolved and
//! installed by apt in one run) or, where it is missing, debootstrap (minbase) then apt in a chroot; configure the
//! rootfs in a chroot (`assets/box/configure.sh`), copy kernel + initrd out, `mkfs.ext4 -d` (no loop mount) and
//! `qemu-img convert` to qcow2. The image has no bootloader: the provider boots the kernel directly.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::cache::{BoxMeta, Cache};
use crate::config::DebianBox;
use crate::process::{self, Cmd};
use crate::ui::{Phase, Ui};

/// Bump when the recipe changes in a way the id cannot see (the script's text is hashed already).
const RECIPE_VERSION: u32 = 1;
const CONFIGURE: &str = include_str!("../../assets/box/configure.sh");
/// Installed by debootstrap itself. Everything else goes through apt in the chroot afterwards: debootstrap's
/// resolver cannot follow virtual packages (cloud-init's python3-cryptography needs python3-cffi-backend-api-*,
/// measured: "dependency problems - leaving unconfigured"). mmdebstrap resolves with apt and installs all at once.
const BASE_PACKAGES: &[&str] = &[
    "linux-image-amd64",
    "systemd-sysv",
    "systemd-resolved",
    "udev",
    "dbus",
    "openssh-server",
    "sudo",
    "ca-certificates",
    "iproute2",
    "curl",
    "procps",
    "kmod",
    // resize2fs: cloud-init grows the root filesystem to the machine's disk; fsck at boot.
    "e2fsprogs",
];
/// Always installed with apt in the chroot, before the configured extra packages.
const APT_PACKAGES: &[&str] = &["cloud-init"];
/// What mmdebstrap is given besides the packages, each measured (docs/boxes.md "What it costs"): dpkg without
/// fsync (a box is written once, from scratch: a crash only loses the build); no manuals, info pages, translations
/// or docs other than copyright files (nothing in the guest reads them); no kernel modules for hardware a virtio
/// guest never has (GPUs, media, wireless, InfiniBand, sensors, sound, staging); and one initramfs, made at the
/// end with only the modules the direct boot needs, instead of twice (the kernel's postinst and then the
/// initramfs-tools trigger each made a 36 MB one with `MODULES=most`). Part of the box id.
const MMDEBSTRAP_OPTS: &[&str] = &[
    "--dpkgopt=force-unsafe-io",
    "--dpkgopt=path-exclude=/usr/share/man/*",
    "--dpkgopt=path-exclude=/usr/share/info/*",
    "--dpkgopt=path-exclude=/usr/share/locale/*",
    "--dpkgopt=path-include=/usr/share/locale/locale.alias",
    "--dpkgopt=path-exclude=/usr/share/doc/*",
    "--dpkgopt=path-include=/usr/share/doc/*/copyright",
    "--dpkgopt=path-exclude=/*lib/modules/*/kernel/drivers/gpu/*",
    "--dpkgopt=path-exclude=/*lib/modules/*/kernel/drivers/media/*",
    "--dpkgopt=path-exclude=/*lib/modules/*/kernel/drivers/net/wireless/*",
    "--dpkgopt=path-exclude=/*lib/modules/*/kernel/drivers/infiniband/*",
    "--dpkgopt=path-exclude=/*lib/modules/*/kernel/drivers/iio/*",
    "--dpkgopt=path-exclude=/*lib/modules/*/kernel/drivers/staging/*",
    "--dpkgopt=path-exclude=/*lib/modules/*/kernel/sound/*",
    // update-initramfs does nothing while packages install (diverted to a stub)...
    "--essential-hook=chroot \"$1\" dpkg-divert --quiet --local --rename --add /usr/sbin/update-initramfs && \
     printf '#!/bin/sh\\nexit 0\\n' >\"$1/usr/sbin/update-initramfs\" && chmod 0755 \"$1/usr/sbin/update-initramfs\"",
    // ...then runs once: the root disk is virtio (`root=/dev/vda`, [`CMDLINE`]) with ext4; the rest loads from it.
    "--customize-hook=rm \"$1/usr/sbin/update-initramfs\" && \
     chroot \"$1\" dpkg-divert --quiet --local --rename --remove /usr/sbin/update-initramfs && \
     printf 'MODULES=list\\nCOMPRESS=gzip\\n' >\"$1/etc/initramfs-tools/conf.d/provisioner\" && \
     printf 'virtio_pci\\nvirtio_blk\\next4\\n' >>\"$1/etc/initramfs-tools/modules\" && \
     chroot \"$1\" update-initramfs -c -k all",
];
/// Kernel command line for direct boot. The root disk is the domain's only virtio disk, so `/dev/vda`: with
/// `root=LABEL=rootfs` the initramfs waited for a by-label link that a software-emulated guest got only after
/// initramfs-tools' 30 s timeout ("ALERT! LABEL=rootfs does not exist"), or after a full `rootdelay`.
pub const CMDLINE: &str = "root=/dev/vda rw console=ttyS0";

/// Extra packages, sorted and without duplicates or packages the recipe installs anyway.
fn extras(d: &DebianBox) -> Vec<String> {
    let mut v: Vec<String> = d
        .packages
        .iter()
        .map(|p| p.trim().to_string())
        .filter(|p| {
            !p.is_empty() && !BASE_PACKAGES.contains(&p.as_str()) && !APT_PACKAGES.contains(&p.as_str())
        })
        .collect();
    v.sort();
    v.dedup();
    v
}

/// What makes the rootfs: mmdebstrap when installed (one apt run for every package: measured faster on the same
/// mirror, README "Costs"), else debootstrap followed by apt in the chroot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bootstrap {
    Mmdebstrap,
    Debootstrap,
}

/// Names the bootstrap tool instead of detecting it (`mmdebstrap` or `debootstrap`).
pub const BOOTSTRAP_ENV: &str = "PROVISIONER_BOX_BOOTSTRAP";

impl Bootstrap {
    /// The tool [`BOOTSTRAP_ENV`] names, else the one this host has, mmdebstrap first.
    pub fn detect() -> Result<Bootstrap> {
        Bootstrap::choose(std::env::var(BOOTSTRAP_ENV).ok().as_deref(), which::which("mmdebstrap").is_ok())
    }

    /// [`Bootstrap::detect`] from the variable's value and whether mmdebstrap is installed. Pure.
    fn choose(env: Option<&str>, have_mmdebstrap: bool) -> Result<Bootstrap> {
        match env.map(str::trim).filter(|v| !v.is_empty()) {
            Some("mmdebstrap") => Ok(Bootstrap::Mmdebstrap),
            Some("debootstrap") => Ok(Bootstrap::Debootstrap),
            Some(other) => bail!(
                "{BOOTSTRAP_ENV}={other:?} names no bootstrap tool\nhint: set it to mmdebstrap or debootstrap, or \
                 unset it to use mmdebstrap when it is installed"
            ),
            None if have_mmdebstrap => Ok(Bootstrap::Mmdebstrap),
            None => Ok(Bootstrap::Debootstrap),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Bootstrap::Mmdebstrap => "mmdebstrap",
            Bootstrap::Debootstrap => "debootstrap",
        }
    }
}

/// Content id of a mirror build on this host: a hash of everything that decides the result.
pub fn box_id(d: &DebianBox) -> Result<String> {
    Ok(box_id_with(d, Bootstrap::detect()?))
}

/// [`box_id`] for a given bootstrap tool. The two tools make different rootfs trees (apt sources, package
/// selection order, leftovers), so they make different boxes; debootstrap's ids are the ones it always had. Pure.
pub fn box_id_with(d: &DebianBox, tool: Bootstrap) -> String {
    use sha2::{Digest, Sha256};
    let mut base: Vec<&str> = BASE_PACKAGES.to_vec();
    base.sort();
    let inputs = format!(
        "recipe={RECIPE_VERSION}\nsuite={}\nmirror={}\nbase={}\napt={}\nextra={}\nscript={}\n",
        d.suite.trim(),
        d.mirror.trim().trim_end_matches('/'),
        base.join(","),
        APT_PACKAGES.join(","),
        extras(d).join(","),
        hex::encode(Sha256::digest(CONFIGURE))
    );
    let inputs = match tool {
        Bootstrap::Debootstrap => inputs,
        Bootstrap::Mmdebstrap => {
            format!(
                "{inputs}bootstrap=mmdebstrap\nmmdebstrap={}\n",
                hex::encode(Sha256::digest(MMDEBSTRAP_OPTS.join("\n")))
            )
        }
    };
    hex::encode(Sha256::digest(inputs))
}

/// Where the box came from, for `box list`.
fn describe(d: &DebianBox) -> String {
    let ex = extras(d);
    let mut s = format!("debian {} {}", d.suite, d.mirror);
    if !ex.is_empty() {
        s.push_str(&format!(" +{}", ex.join(",")));
    }
    s
}

/// The cached box for `d`, building it when missing (or `force`).
pub fn ensure(cache: &Cache, d: &DebianBox, force: bool, ui: &Ui) -> Result<(BoxMeta, bool)> {
    let tool = Bootstrap::detect()?;
    let id = box_id_with(d, tool);
    cache.get_or_build(&id, force, ui, |dir| build(cache, &id, d, tool, dir, ui))
}

fn build(cache: &Cache, id: &str, d: &DebianBox, tool: Bootstrap, dir: &Path, ui: &Ui) -> Result<BoxMeta> {
    preflight(tool)?;
    let log = cache.log_path(id);
    std::fs::write(&log, format!("# provisioner: building box {id} from {}\n", describe(d)))
        .with_context(|| format!("write {}", log.display()))?;
    let root = dir.join("rootfs");

    let ex = extras(d);
    let phase = ui.phase(tool.name());
    let mut include = BASE_PACKAGES.iter().map(|p| p.to_string()).collect::<Vec<_>>();
    let cmd = match tool {
        Bootstrap::Debootstrap => Cmd::new("debootstrap").args([
            "--variant=minbase",
            &format!("--include={}", include.join(",")),
            d.suite.as_str(),
        ]),
        Bootstrap::Mmdebstrap => {
            // Every package in one apt run, without recommends as in the chroot route; apt runs on the host, so
            // no resolv.conf is needed in the rootfs for it.
            include.extend(APT_PACKAGES.iter().map(|p| p.to_string()).chain(ex.iter().cloned()));
            Cmd::new("mmdebstrap")
                .args([
                    "--mode=root",
                    "--variant=minbase",
                    "--aptopt=Apt::Install-Recommends \"false\"",
                    "--aptopt=Acquire::Languages \"none\"",
                    &format!("--include={}", include.join(",")),
                ])
                .args(MMDEBSTRAP_OPTS)
                .arg(d.suite.as_str())
        }
    };
    run_logged(cmd.arg(&root).arg(&d.mirror), &log, &phase, Duration::from_secs(45 * 60))?;
    phase.done(&format!("{} from {}", d.suite, d.mirror));

    // Packages still to install in the chroot (all of them went in with mmdebstrap).
    let apt: Vec<&str> = match tool {
        Bootstrap::Debootstrap => APT_PACKAGES.iter().copied().chain(ex.iter().map(String::as_str)).collect(),
        Bootstrap::Mmdebstrap => Vec::new(),
    };
    let phase = ui.phase("configure");
    // apt in the chroot resolves names with the host's resolver; the script points resolv.conf at resolved.
    let resolv = root.join("etc/resolv.conf");
    let _ = std::fs::remove_file(&resolv);
    std::fs::copy("/etc/resolv.conf", &resolv).context("copy /etc/resolv.conf into the rootfs")?;
    std::fs::write(root.join("provisioner-configure.sh"), CONFIGURE).context("write the configure script")?;
    let cmd = Cmd::new("chroot").arg(&root).args(["/bin/sh", "/provisioner-configure.sh"]).args(&apt);
    run_logged(cmd, &log, &phase, Duration::from_secs(45 * 60))?;
    std::fs::remove_file(root.join("provisioner-configure.sh"))?;
    phase.done(&if ex.is_empty() { "no extra packages".to_string() } else { format!("+ {}", ex.join(" ")) });

    let phase = ui.phase("image");
    let kernel = copy_kernel(&root, dir)?;
    let used = super::cache::dir_size(&root);
    // Sparse: only used blocks reach the qcow2. Room for the first boot; cloud-init grows the fs to the disk.
    let size_mb = (used * 3 / 2) / (1 << 20) + 1024;
    let raw = dir.join("disk.raw");
    phase.message("mkfs.ext4 -d");
    Cmd::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "rootfs", "-d"])
        .arg(&root)
        .arg(&raw)
        .arg(format!("{size_mb}M"))
        .timeout(Duration::from_secs(20 * 60))
        .run()
        .map_err(|e| with_disk_hint(e, dir))?;
    super::cache::remove_tree(&root)?;
    phase.message("qemu-img convert");
    Cmd::new("qemu-img")
        .args(["convert", "-O", "qcow2"])
        .arg(&raw)
        .arg(dir.join("box.qcow2"))
        .timeout(Duration::from_secs(20 * 60))
        .run()
        .map_err(|e| with_disk_hint(e, dir))?;
    std::fs::remove_file(&raw)?;
    phase.message("integrity check");
    super::integrity::check(&dir.join("box.qcow2"))?;
    phase.done(&format!("qcow2, kernel {kernel}"));

    let mut meta = BoxMeta::new(describe(d), "libvirt", "qcow2", "box.qcow2");
    meta.kernel = Some("vmlinuz".into());
    meta.initrd = Some("initrd.img".into());
    meta.cmdline = Some(CMDLINE.into());
    std::fs::copy(&log, dir.join("build.log"))?;
    Ok(meta)
}

fn preflight(tool: Bootstrap) -> Result<()> {
    if !crate::platform::is_root() {
        bail!(
            "building a box from a Debian mirror needs root ({} and chroot)\n\
             hint: run `sudo provisioner box build` once (the box is cached for every later `up`), or use a \
             prebuilt image: [box] image = \"...\" or url + sha256",
            tool.name()
        );
    }
    for (tool, pkg) in [
        // Neither bootstrap tool: the faster one is named first.
        (
            tool.name(),
            if tool == Bootstrap::Debootstrap { "mmdebstrap (or debootstrap)" } else { "mmdebstrap" },
        ),
        ("chroot", "coreutils"),
        ("mkfs.ext4", "e2fsprogs"),
        ("qemu-img", "qemu-utils"),
    ] {
        if which::which(tool).is_err() {
            bail!("`{tool}` is not installed; it is needed to build a box from a Debian mirror\nhint: apt-get install {pkg}");
        }
    }
    Ok(())
}

/// Run a long child with its output appended to `log`, showing the latest line on the phase; on failure the
/// error carries the log's tail and a hint for the usual causes.
fn run_logged(cmd: Cmd, log: &Path, phase: &Phase, timeout: Duration) -> Result<()> {
    use std::io::Write;
    let line = cmd.display();
    {
        let mut f = std::fs::OpenOptions::new().append(true).open(log)?;
        writeln!(f, "\n$ {line}")?;
    }
    let mut child = cmd.spawn(Some(log))?;
    let status = process::wait_until(timeout, &format!("`{line}`"), || {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(last) = text.lines().rev().find(|l| !l.trim().is_empty()) {
            phase.message(last.trim());
        }
        child.try_wait()
    })
    .with_context(|| format!("build log: {}", log.display()))?;
    if !status.success() {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        bail!(
            "`{line}` failed ({}); last lines of {}:\n{}\nhint: {}",
            process::describe_status(&status),
            log.display(),
            process::tail(&text, 25),
            failure_hint(&text)
        );
    }
    Ok(())
}

/// What to do, judged from the log of a failed step.
fn failure_hint(log: &str) -> &'static str {
    if log.contains("No space left on device") {
        "the disk is full: free space in the cache directory (or set PROVISIONER_CACHE_DIR elsewhere); a build \
         needs about 3 GB while it runs"
    } else if [
        "Failed getting release file",
        "Couldn't download",
        "Temporary failure resolving",
        "Could not connect",
    ]
    .iter()
    .any(|s| log.contains(s))
    {
        "the mirror was not reachable: check [box.debian] mirror (and suite), DNS and any proxy \
         (http_proxy is honoured), then run `provisioner box build` again"
    } else if log.contains("running --customize-hook") && !log.contains("I: cleaning package lists") {
        "making the box's one initramfs failed (update-initramfs in mmdebstrap's --customize-hook, see the log): \
         fix the cause, or build with PROVISIONER_BOX_BOOTSTRAP=debootstrap, which keeps Debian's initramfs"
    } else if log.contains("Unable to locate package") || log.contains("Couldn't find these debs") {
        "a package name in [box.debian] packages does not exist in this suite: fix the list"
    } else {
        "read the build log above; fix the cause and run `provisioner box build` again"
    }
}

fn with_disk_hint(e: anyhow::Error, dir: &Path) -> anyhow::Error {
    if format!("{e:#}").contains("No space left") || format!("{e:#}").contains("Could not allocate") {
        e.context(format!(
            "the disk holding {} is full\nhint: free space or set PROVISIONER_CACHE_DIR to a bigger disk",
            dir.display()
        ))
    } else {
        e
    }
}

/// Copy the newest kernel of the rootfs and its initrd to `dir` (world-readable, so an unprivileged hypervisor
/// can read them); returns the kernel version.
fn copy_kernel(root: &Path, dir: &Path) -> Result<String> {
    let boot = root.join("boot");
    let mut versions: Vec<String> = std::fs::read_dir(&boot)
        .with_context(|| format!("read {}", boot.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_string_lossy().strip_prefix("vmlinuz-").map(str::to_string))
        .filter(|v| !v.contains(".dpkg-"))
        .collect();
    versions.sort();
    let Some(version) = versions.pop() else {
        bail!(
            "the rootfs has no /boot/vmlinuz-*: the kernel package did not install\nhint: read the build log and \
             check that linux-image-amd64 exists on the mirror for this suite"
        );
    };
    for (from, to) in
        [(format!("vmlinuz-{version}"), "vmlinuz"), (format!("initrd.img-{version}"), "initrd.img")]
    {
        let (src, dst) = (boot.join(&from), dir.join(to));
        std::fs::copy(&src, &dst).with_context(|| {
            format!(
                "copy {} out of the rootfs\nhint: the initramfs was not generated; read the build log",
                src.display()
            )
        })?;
        crate::platform::set_mode(&dst, 0o644)?;
    }
    Ok(version)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deb(packages: &[&str]) -> DebianBox {
        DebianBox {
            suite: "bookworm".into(),
            mirror: "http://deb.debian.org/debian".into(),
            packages: packages.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn id_ignores_package_order_duplicates_and_base_packages() {
        let id = |d: &DebianBox| box_id(d).unwrap();
        let a = id(&deb(&["docker.io", "apparmor"]));
        assert_eq!(a, id(&deb(&["apparmor", "docker.io", "apparmor", "sudo"])));
        assert_ne!(a, id(&deb(&["docker.io"])));
        let mut other_suite = deb(&["docker.io", "apparmor"]);
        other_suite.suite = "trixie".into();
        assert_ne!(a, id(&other_suite));
        assert_eq!(a.len(), 64);
    }

    #[test]
    fn mmdebstrap_makes_another_box_and_debootstrap_keeps_its_ids() {
        let lab = deb(&["docker.io", "docker-compose", "apparmor"]);
        // The id of the repo's box as debootstrap builds it, pinned: it changes with the recipe's inputs only (the
        // configure script's text: stop 29's sshd motd lines moved it from 6e3b5043...), never with how the build
        // is driven.
        assert_eq!(
            box_id_with(&lab, Bootstrap::Debootstrap),
            "52ab8276d9fa060e97481f3ce6314a5e142a508311bbfdc6fe8e094affec6939"
        );
        let mm = box_id_with(&lab, Bootstrap::Mmdebstrap);
        assert_ne!(mm, box_id_with(&lab, Bootstrap::Debootstrap));
        assert_eq!(
            mm,
            box_id_with(&deb(&["apparmor", "docker-compose", "docker.io"]), Bootstrap::Mmdebstrap)
        );
        assert_eq!(box_id(&lab).unwrap(), box_id_with(&lab, Bootstrap::detect().unwrap()));
    }

    #[test]
    fn the_bootstrap_tool_is_mmdebstrap_when_installed_unless_named() {
        assert_eq!(Bootstrap::choose(None, true).unwrap(), Bootstrap::Mmdebstrap);
        assert_eq!(Bootstrap::choose(None, false).unwrap(), Bootstrap::Debootstrap);
        assert_eq!(Bootstrap::choose(Some(""), false).unwrap(), Bootstrap::Debootstrap);
        assert_eq!(Bootstrap::choose(Some("debootstrap"), true).unwrap(), Bootstrap::Debootstrap);
        // Named but missing: chosen anyway, and the build's preflight says to install it.
        assert_eq!(Bootstrap::choose(Some("mmdebstrap"), false).unwrap(), Bootstrap::Mmdebstrap);
        let e = Bootstrap::choose(Some("cdebootstrap"), true).unwrap_err().to_string();
        assert!(e.contains("PROVISIONER_BOX_BOOTSTRAP=\"cdebootstrap\"") && e.contains("hint:"), "{e}");
    }

    /// dpkg's path-exclude/path-include: fnmatch without FNM_PATHNAME (`*` crosses `/`), the last match wins.
    fn dpkg_keeps(path: &str) -> bool {
        fn glob(p: &[u8], s: &[u8]) -> bool {
            match p.split_first() {
                None => s.is_empty(),
                Some((b'*', rest)) => (0..=s.len()).any(|i| glob(rest, &s[i..])),
                Some((c, rest)) => s.split_first().is_some_and(|(d, srest)| c == d && glob(rest, srest)),
            }
        }
        let mut keep = true;
        for o in MMDEBSTRAP_OPTS {
            if let Some(p) = o.strip_prefix("--dpkgopt=path-exclude=") {
                keep &= !glob(p.as_bytes(), path.as_bytes());
            } else if let Some(p) = o.strip_prefix("--dpkgopt=path-include=") {
                keep |= glob(p.as_bytes(), path.as_bytes());
            }
        }
        keep
    }

    #[test]
    fn mmdebstrap_leaves_out_docs_and_foreign_hardware_but_keeps_what_the_box_runs() {
        let k = "/lib/modules/6.1.0-50-amd64/kernel";
        for gone in [
            "/usr/share/man/man8/dpkg.8.gz",
            "/usr/share/doc/docker.io/changelog.Debian.gz",
            "/usr/share/locale/de/LC_MESSAGES/apt.mo",
            &format!("{k}/drivers/gpu/drm/amd/amdgpu/amdgpu.ko"),
            &format!("{k}/drivers/net/wireless/intel/iwlwifi/iwlwifi.ko"),
            &format!("{k}/sound/core/snd.ko"),
            // The same package paths once the kernel ships under /usr (trixie).
            &format!("/usr{k}/drivers/media/usb/uvc/uvcvideo.ko"),
        ] {
            assert!(!dpkg_keeps(gone), "{gone} is installed");
        }
        for kept in [
            "/usr/share/doc/docker.io/copyright",
            "/usr/share/locale/locale.alias",
            // The initramfs' root disk, Docker's storage and networks, the seed's CD-ROM.
            &format!("{k}/drivers/block/virtio_blk.ko"),
            &format!("{k}/drivers/virtio/virtio_pci.ko"),
            &format!("{k}/fs/ext4/ext4.ko"),
            &format!("{k}/fs/overlayfs/overlay.ko"),
            &format!("{k}/drivers/net/veth.ko"),
            &format!("{k}/drivers/net/virtio_net.ko"),
            &format!("{k}/net/bridge/br_netfilter.ko"),
            &format!("{k}/net/netfilter/nf_conntrack.ko"),
            &format!("{k}/drivers/scsi/sr_mod.ko"),
            &format!("{k}/fs/isofs/isofs.ko"),
            "/usr/lib/python3/dist-packages/cloudinit/__init__.py",
        ] {
            assert!(dpkg_keeps(kept), "{kept} is left out");
        }
        // One initramfs, with what `root=/dev/vda` on ext4 needs.
        let hook = MMDEBSTRAP_OPTS.iter().find(|o| o.starts_with("--customize-hook=")).unwrap();
        assert!(
            CMDLINE.contains("root=/dev/vda") && hook.contains("virtio_pci\\nvirtio_blk\\next4"),
            "{hook}"
        );
        assert!(hook.ends_with("update-initramfs -c -k all"), "{hook}");
    }

    #[test]
    fn hints_name_the_cause() {
        assert!(failure_hint("E: Failed getting release file http://x/dists/y/Release").contains("mirror"));
        assert!(failure_hint("tar: No space left on device").contains("full"));
        assert!(failure_hint("E: Unable to locate package nope").contains("package name"));
        let hook = "I: running --customize-hook in shell: sh -c '...'\nE: modprobe: FATAL: Module virtio_blk not found";
        assert!(failure_hint(hook).contains("initramfs") && failure_hint(hook).contains("debootstrap"));
        let after = format!("{hook}\nI: cleaning package lists and apt cache...\nW: something else");
        assert!(failure_hint(&after).contains("read the build log"));
    }
}
