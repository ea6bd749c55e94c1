//! Service images. `debian` mode: the base image `provisioner-base:bookworm` is a Debian rootfs made on the HOST
//! (debootstrap minbase with the lab's packages, the profile's setup commands run in it, trimmed), cached as a tarball in `<cache>/images/` keyed by its
//! inputs, streamed over SSH into `docker import` and labelled with that key; a guest that already has the key is
//! left alone. Building on the host is minutes faster than apt inside a TCG guest (see docs/guest.md).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::config::Config;
use crate::process::Cmd;
use crate::profile::Profile;
use crate::ssh::shell_quote;
use crate::ssh::Session;
use crate::ui::Phase;

const BUILD_SCRIPT: &str = include_str!("../../assets/docker/base-image.sh");

/// The suite the lab's Dockerfiles build FROM (`provisioner-base:bookworm`).
pub const BASE_SUITE: &str = "bookworm";

/// Longest host-side build of the base image.
const BUILD_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Docker label carrying the input key.
pub const LABEL: &str = "provisioner.inputs";

/// The base image for a config: its tag, mirror and the key of everything it is made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseImage {
    pub tag: String,
    pub mirror: String,
    /// First 16 hex of sha256(build script, suite, mirror, packages).
    pub key: String,
    /// The packages installed in it (the profile's base packages).
    pub packages: &'static [&'static str],
    /// The profile's setup commands run in the rootfs after the packages (users, dirs, ownership).
    pub setup: &'static str,
}

impl BaseImage {
    pub fn for_config(cfg: &Config, profile: &Profile) -> Self {
        let mirror = cfg
            .base_box
            .debian
            .as_ref()
            .map(|d| d.mirror.clone())
            .unwrap_or_else(|| "http://deb.debian.org/debian".to_string());
        let mut h = Sha256::new();
        for part in [BUILD_SCRIPT, BASE_SUITE, &mirror, profile.base_setup]
            .into_iter()
            .chain(profile.base_packages.iter().copied())
        {
            h.update(part.as_bytes());
            h.update([0]);
        }
        let key = hex::encode(h.finalize())[..16].to_string();
        Self {
            tag: format!("provisioner-base:{BASE_SUITE}"),
            mirror,
            key,
            packages: profile.base_packages,
            setup: profile.base_setup,
        }
    }

    /// The cached rootfs tarball.
    pub fn tarball(&self) -> PathBuf {
        crate::boxes::cache_dir()
            .join("images")
            .join(format!("provisioner-base-{BASE_SUITE}-{}.tar", self.key))
    }

    /// Build the tarball on the host unless cached (under a lock, so parallel runs build it once). `note` gets
    /// progress text; `cancel` set from another thread stops the build (its process group is killed and the
    /// half-made work dir removed). Returns whether it was built now.
    pub fn ensure_tarball(&self, note: &dyn Fn(&str), cancel: &AtomicBool) -> Result<bool> {
        let out = self.tarball();
        let dir = out.parent().expect("tarball has a parent");
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let lock_path = dir.join(".build.lock");
        let _lock = crate::machine::lock::block(&lock_path)?;
        if out.is_file() {
            return Ok(false);
        }
        // Work dirs of builds that were killed (an interrupt, a crash): under the lock no live build owns them.
        remove_work_dirs(&out).context("remove the leftover of an interrupted base image build")?;
        note(&format!("debootstrap {BASE_SUITE} + lab packages on the host (about a minute)"));
        let result = self.build(&out, cancel);
        if result.is_err() {
            // Best effort: the next build removes what is left.
            let _ = remove_work_dirs(&out);
        }
        result.map(|()| true)
    }

    fn build(&self, out: &Path, cancel: &AtomicBool) -> Result<()> {
        const HINT: &str = "hint: it needs `debootstrap` (apt-get install debootstrap), root or password-less sudo, \
                            and the Debian mirror ([box.debian] mirror); or set [provision] images = \"registry\" \
                            where a registry is reachable";
        let root = crate::platform::is_root();
        let cmd = if root { Cmd::new("sh") } else { Cmd::new("sudo").args(["-n", "sh"]) };
        let cmd = cmd.arg("-c").arg(BUILD_SCRIPT).arg("base-image").args([BASE_SUITE, &self.mirror]).arg(out);
        let cmd = cmd.arg(self.setup);
        let cmd = cmd.args(self.packages);
        let log = out.with_extension("log");
        let _ = std::fs::remove_file(&log);
        let mut child = cmd
            .spawn(Some(&log))
            .with_context(|| format!("building the container base image on the host failed\n{HINT}"))?;
        let deadline = Instant::now() + BUILD_TIMEOUT;
        let status = loop {
            // An interrupt: the watcher kills the build's group; this thread ends with the interruption.
            crate::process::check_interrupted()?;
            if let Some(st) = child.try_wait()? {
                crate::process::check_interrupted()?;
                break st;
            }
            if cancel.load(Ordering::Relaxed) {
                child.kill();
                bail!("the host-side build of the container base image was cancelled");
            }
            if Instant::now() >= deadline {
                child.kill();
                bail!(
                    "`{}` did not finish within {BUILD_TIMEOUT:?}; it was killed\n{HINT}",
                    cmd.display().chars().take(80).collect::<String>()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let text = std::fs::read(&log).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
        if !status.success() {
            bail!(
                "building the container base image on the host failed ({}); last lines of {}:\n{}\n{HINT}",
                crate::process::describe_status(&status),
                log.display(),
                crate::process::tail(&text, 20)
            );
        }
        let _ = std::fs::remove_file(&log);
        Ok(())
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

/// Remove the `<tarball>.work.*` dirs (the build script's scratch) left by a build that was killed.
fn remove_work_dirs(out: &Path) -> Result<()> {
    let (Some(dir), Some(name)) = (out.parent(), out.file_name()) else { return Ok(()) };
    let prefix = format!("{}.work.", name.to_string_lossy());
    for e in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))?.flatten() {
        if e.file_name().to_string_lossy().starts_with(&prefix) {
            crate::boxes::cache::remove_tree(&e.path())?;
        }
    }
    Ok(())
}

/// The host-side build of the base image, started on a thread before the guest boots (`up` of a machine that is
/// not running) and joined at the images phase: the two take about a minute each under TCG, so the overlap saves
/// the shorter one. Dropped without [`HostBuild::join`] (an error or interrupt elsewhere), it cancels the build.
pub struct HostBuild {
    thread: Option<JoinHandle<Result<Built>>>,
    cancel: Arc<AtomicBool>,
}

/// What the background build did: whether it built (vs. found the tarball cached), and how long it ran.
#[derive(Debug, Clone, Copy)]
struct Built {
    built: bool,
    secs: f64,
}

/// How a joined [`HostBuild`] overlapped the boot: seconds it ran, seconds the images phase still waited for it.
/// `saved_secs` is the time the overlap took off `up` (the build time minus the wait).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Overlap {
    pub built: bool,
    pub build_secs: f64,
    pub waited_secs: f64,
    pub saved_secs: f64,
}

impl Overlap {
    /// Pure: from the build's duration and the wait at the join.
    pub fn new(built: bool, build_secs: f64, waited_secs: f64) -> Self {
        Self { built, build_secs, waited_secs, saved_secs: (build_secs - waited_secs).max(0.0) }
    }
}

impl HostBuild {
    /// Start the build of `base` on a thread (nothing to do and no thread when its tarball is cached).
    pub fn start(base: &BaseImage) -> Option<HostBuild> {
        if base.tarball().is_file() {
            return None;
        }
        let cancel = Arc::new(AtomicBool::new(false));
        let (base, flag) = (base.clone(), cancel.clone());
        let thread = std::thread::Builder::new()
            .name("base-image".into())
            .spawn(move || {
                let t = Instant::now();
                let built = base.ensure_tarball(&|_| {}, &flag)?;
                Ok(Built { built, secs: t.elapsed().as_secs_f64() })
            })
            .ok()?;
        Some(HostBuild { thread: Some(thread), cancel })
    }

    /// Wait for the build (showing that in `phase`) and report the overlap, or the build's error.
    pub fn join(mut self, phase: &Phase) -> Result<Overlap> {
        let thread = self.thread.take().expect("joined once");
        if !thread.is_finished() {
            phase.message("waiting for the base image build on the host (started while the guest booted)");
        }
        let t = Instant::now();
        let built = match thread.join() {
            Ok(r) => r?,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        Ok(Overlap::new(built.built, built.secs, t.elapsed().as_secs_f64()))
    }
}

impl Drop for HostBuild {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.cancel.store(true, Ordering::Relaxed);
            let _ = t.join();
        }
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
        let a = BaseImage::for_config(
            &cfg("[box.debian]\nmirror = \"http://deb.debian.org/debian\""),
            &crate::lab::PROFILE,
        );
        let b = BaseImage::for_config(
            &cfg("[box.debian]\nmirror = \"http://mirror.example/debian\""),
            &crate::lab::PROFILE,
        );
        let c = BaseImage::for_config(&cfg("image = \"x.qcow2\""), &crate::lab::PROFILE);
        assert_ne!(a.key, b.key);
        assert_eq!(a.key, c.key, "default mirror without [box.debian]");
        assert_eq!(a.tag, "provisioner-base:bookworm");
        assert_eq!(a.key.len(), 16);
        let tarball = a.tarball();
        assert!(tarball.ends_with(format!("images/provisioner-base-bookworm-{}.tar", a.key)), "{tarball:?}");
    }

    #[test]
    fn key_changes_with_the_profiles_setup() {
        static NO_SETUP: Profile = Profile { base_setup: "", ..crate::lab::PROFILE };
        let c = cfg("image = \"x.qcow2\"");
        let lab = BaseImage::for_config(&c, &crate::lab::PROFILE);
        assert_eq!(lab.setup, crate::lab::BASE_SETUP);
        assert_ne!(
            lab.key,
            BaseImage::for_config(&c, &NO_SETUP).key,
            "a tarball made without the setup is reused"
        );
    }

    /// The real build script with stand-ins for debootstrap (a rootfs of one file) and chroot (runs the command
    /// in that dir): the profile's setup runs inside the rootfs after the packages are in, and what it made is in
    /// the tarball (with the Python byte-code it compiled, where Debian's is dropped before it runs); an empty
    /// setup runs nothing.
    #[test]
    #[cfg_attr(windows, ignore = "windows: runs the build script under /bin/sh with shell-script doubles")]
    fn the_build_script_runs_the_setup_in_the_rootfs_and_tars_what_it_made() {
        let (dir, bin) = crate::testing::stand_in_dir();
        let chroots = dir.path().join("chroots");
        let tool = |name: &str, body: &str| crate::testing::stand_in(&bin, name, body);
        // debootstrap --variant=minbase --include=PKGS SUITE ROOT MIRROR
        // Debian's postinst byte-compiled what it installed: the script drops that before the setup runs.
        tool(
            "debootstrap",
            "mkdir -p \"$4/etc\" \"$4/usr/lib/python3/deb/__pycache__\" && echo \"$2\" > \"$4/etc/included\" && \
             : > \"$4/usr/lib/python3/deb/__pycache__/a.pyc\"",
        );
        tool("chroot", &format!("echo \"$@\" >> {chroots:?}; cd \"$1\" && shift && exec \"$@\""));
        let build = |setup: &str, out: &Path| {
            let o = std::process::Command::new("/bin/sh")
                .args(["-c", BUILD_SCRIPT, "base-image", BASE_SUITE, "http://mirror.invalid/debian"])
                .arg(out)
                .args([setup, "prometheus", "curl"])
                .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
                // The caller's environment stays out of the rootfs (the setup checks this one is unset).
                .env("PYTHONDONTWRITEBYTECODE", "1")
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            let list = std::process::Command::new("tar").arg("-tvf").arg(out).output().unwrap();
            String::from_utf8_lossy(&list.stdout).into_owned()
        };
        // Relative paths: the stand-in chroot runs the setup with the rootfs as its working directory.
        let listing = build(
            "grep -qx -- --include=prometheus,curl etc/included; mkdir -p prometheus; echo x > prometheus/made; \
             test ! -e usr/lib/python3/deb/__pycache__; test -z \"${PYTHONDONTWRITEBYTECODE:-}\"; \
             mkdir -p usr/lib/python3/app/__pycache__; \
             : > usr/lib/python3/app/__pycache__/b.pyc",
            &dir.path().join("a.tar"),
        );
        assert!(listing.contains(" ./prometheus/made\n"), "{listing}");
        // What the setup compiled stays; Debian's caches are gone.
        assert!(listing.contains(" ./usr/lib/python3/app/__pycache__/b.pyc\n"), "{listing}");
        assert!(!listing.contains("a.pyc"), "{listing}");
        assert!(listing.contains(" ./etc/machine-id\n"), "{listing}");
        let ran = std::fs::read_to_string(&chroots).unwrap();
        assert_eq!(ran.lines().count(), 1, "{ran}");
        assert!(ran.contains("/rootfs /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin "), "{ran}");
        assert!(ran.contains(" /bin/sh -eu -c grep -qx"), "{ran}");
        // A failing setup fails the build (and leaves no tarball a later run would trust).
        let o = std::process::Command::new("/bin/sh")
            .args(["-c", BUILD_SCRIPT, "base-image", BASE_SUITE, "http://mirror.invalid/debian"])
            .arg(dir.path().join("b.tar"))
            .args(["false", "curl"])
            .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
            .output()
            .unwrap();
        assert!(!o.status.success());
        assert!(!dir.path().join("b.tar").exists());
        std::fs::remove_file(&chroots).unwrap();
        let listing = build("", &dir.path().join("c.tar"));
        assert!(!listing.contains("prometheus/made") && listing.contains(" ./etc/included\n"), "{listing}");
        assert!(!chroots.exists(), "an empty setup started a chroot");
    }
}

#[cfg(test)]
mod overlap_tests {
    use super::Overlap;

    #[test]
    fn saved_time_is_the_build_minus_the_wait() {
        assert_eq!(Overlap::new(true, 70.0, 0.0).saved_secs, 70.0, "finished while the guest booted");
        assert_eq!(Overlap::new(true, 70.0, 20.0).saved_secs, 50.0, "the images phase waited 20 s");
        assert_eq!(Overlap::new(false, 0.1, 0.3).saved_secs, 0.0);
    }
}
