//! Service images. `debian` mode: the base image `provisioner-base:bookworm` is a Debian rootfs made on the HOST
//! (debootstrap minbase with the lab's packages, trimmed), cached as a tarball in `<cache>/images/` keyed by its
//! inputs, streamed over SSH into `docker import` and labelled with that key; a guest that already has the key is
//! left alone. Building on the host is minutes faster than apt inside a TCG guest (see docs/guest.md).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::config::Config;
use crate::process::Cmd;
use crate::ssh::shell_quote;
use crate::ssh::Session;
use crate::ui::Phase;

const BUILD_SCRIPT: &str = include_str!("../../assets/docker/base-image.sh");

/// The suite the lab's Dockerfiles build FROM (`provisioner-base:bookworm`).
pub const BASE_SUITE: &str = "bookworm";

/// Packages in the base image: every service of the lab that builds FROM it finds its program here.
pub const BASE_PACKAGES: &[&str] = &[
    "prometheus",
    "prometheus-alertmanager",
    "prometheus-node-exporter",
    "python3-flask",
    "python3-prometheus-client",
    "gunicorn",
    "curl",
    "ca-certificates",
];

/// Docker label carrying the input key.
pub const LABEL: &str = "provisioner.inputs";

/// The base image for a config: its tag, mirror and the key of everything it is made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseImage {
    pub tag: String,
    pub mirror: String,
    /// First 16 hex of sha256(build script, suite, mirror, packages).
    pub key: String,
}

impl BaseImage {
    pub fn for_config(cfg: &Config) -> Self {
        let mirror = cfg
            .base_box
            .debian
            .as_ref()
            .map(|d| d.mirror.clone())
            .unwrap_or_else(|| "http://deb.debian.org/debian".to_string());
        let mut h = Sha256::new();
        for part in [BUILD_SCRIPT, BASE_SUITE, &mirror].into_iter().chain(BASE_PACKAGES.iter().copied()) {
            h.update(part.as_bytes());
            h.update([0]);
        }
        let key = hex::encode(h.finalize())[..16].to_string();
        Self { tag: format!("provisioner-base:{BASE_SUITE}"), mirror, key }
    }

    /// The cached rootfs tarball.
    pub fn tarball(&self) -> PathBuf {
        crate::boxes::cache_dir()
            .join("images")
            .join(format!("provisioner-base-{BASE_SUITE}-{}.tar", self.key))
    }

    /// Build the tarball on the host unless cached (under a lock, so parallel runs build it once).
    /// Returns whether it was built now.
    pub fn ensure_tarball(&self, phase: &Phase) -> Result<bool> {
        use fs4::fs_std::FileExt;
        let out = self.tarball();
        let dir = out.parent().expect("tarball has a parent");
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let lock_path = dir.join(".build.lock");
        let lock =
            std::fs::File::create(&lock_path).with_context(|| format!("open {}", lock_path.display()))?;
        lock.lock_exclusive().with_context(|| format!("lock {}", lock_path.display()))?;
        if out.is_file() {
            return Ok(false);
        }
        // Work dirs of builds that were killed (an interrupt, a crash): under the lock no live build owns them.
        let work_prefix = format!("{}.work.", out.file_name().unwrap_or_default().to_string_lossy());
        for e in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))?.flatten() {
            if e.file_name().to_string_lossy().starts_with(&work_prefix) {
                crate::boxes::cache::remove_tree(&e.path())
                    .context("remove the leftover of an interrupted base image build")?;
            }
        }
        phase.message(&format!("debootstrap {BASE_SUITE} + lab packages on the host (about a minute)"));
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let cmd = if root { Cmd::new("sh") } else { Cmd::new("sudo").args(["-n", "sh"]) };
        cmd.arg("-c")
            .arg(BUILD_SCRIPT)
            .arg("base-image")
            .args([BASE_SUITE, &self.mirror])
            .arg(&out)
            .args(BASE_PACKAGES)
            .timeout(Duration::from_secs(30 * 60))
            .run()
            .context(
                "building the container base image on the host failed\nhint: it needs `debootstrap` (apt-get install \
                 debootstrap), root or password-less sudo, and the Debian mirror ([box.debian] mirror); or set \
                 [provision] images = \"registry\" where a registry is reachable",
            )?;
        Ok(true)
    }

    /// Import the tarball into the guest's Docker unless it already has this key. Returns whether it imported.
    pub fn ensure_in_guest(&self, ssh: &Session, phase: &Phase) -> Result<bool> {
        let tag = shell_quote(&self.tag);
        let have = ssh.exec(
            &format!(
                "sudo -n docker image inspect --format '{{{{ index .Config.Labels \"{LABEL}\" }}}}' {tag}"
            ),
            Duration::from_secs(60),
        )?;
        if have.status == 0 && have.output.trim() == self.key {
            return Ok(false);
        }
        let path = self.tarball();
        let size = std::fs::metadata(&path).with_context(|| format!("stat {}", path.display()))?.len();
        phase.message(&format!("docker import {} ({} MB) into the guest", self.tag, size >> 20));
        let mut file = std::io::BufReader::new(
            std::fs::File::open(&path).with_context(|| format!("open {}", path.display()))?,
        );
        // Imported untagged and tagged only after the whole tarball went through: a stream cut at a tar header
        // boundary (an interrupt, a dropped connection) ends in an EOF that `docker import` takes for the end of
        // the archive, and that partial image must never carry the tag the next run trusts.
        let out = ssh.exec_with_stdin(
            &format!(
                "sudo -n docker import --change {} --change {} -",
                shell_quote(&format!("LABEL {LABEL}={}", self.key)),
                shell_quote("ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
            ),
            &mut file,
            Duration::from_secs(45 * 60),
        )?;
        crate::process::check_interrupted()?;
        let id = out.output.lines().rev().map(str::trim).find(|l| l.starts_with("sha256:")).unwrap_or("");
        if out.status == 0 && !id.is_empty() {
            ssh.exec_ok(&format!("sudo -n docker tag {} {tag}", shell_quote(id)), Duration::from_secs(120))?;
        }
        if out.status != 0 || id.is_empty() {
            bail!(
                "`docker import` of {} in the guest failed (exit {}):\n{}\nhint: check free disk space in the guest \
                 (`provisioner ssh -c 'df -h /var/lib/docker'`; raise [machine] disk_gb)",
                self.tag,
                out.status,
                crate::process::tail(&out.output, 20)
            );
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &str) -> Config {
        let text = format!("[machine]\nname = \"t\"\n[box]\n{extra}\n");
        Config::from_bytes(std::path::Path::new("box-config.toml"), text.as_bytes()).unwrap()
    }

    #[test]
    fn key_depends_on_mirror_only_among_config_inputs() {
        let a = BaseImage::for_config(&cfg("[box.debian]\nmirror = \"http://deb.debian.org/debian\""));
        let b = BaseImage::for_config(&cfg("[box.debian]\nmirror = \"http://mirror.example/debian\""));
        let c = BaseImage::for_config(&cfg("image = \"x.qcow2\""));
        assert_ne!(a.key, b.key);
        assert_eq!(a.key, c.key, "default mirror without [box.debian]");
        assert_eq!(a.tag, "provisioner-base:bookworm");
        assert_eq!(a.key.len(), 16);
        assert!(a
            .tarball()
            .to_string_lossy()
            .ends_with(&format!("images/provisioner-base-bookworm-{}.tar", a.key)));
    }
}
