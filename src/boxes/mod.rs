//! Base boxes in the user's cache dir, by content hash: local images, URL + sha256 downloads, Vagrant `.box`
//! files, and images built from a Debian mirror.
//!
//! Layout: `<cache_dir>/boxes/<id>/box.json` plus the box's files; see [`cache`] for how entries are made
//! atomically and shared between concurrent builders.

pub mod cache;
pub mod catalog;
pub mod debian;
pub mod fetch;
pub mod import;
pub mod inject;
pub mod integrity;
pub mod lab;
pub mod package;

use std::path::PathBuf;

use anyhow::{bail, Result};

pub use cache::{BoxMeta, Cache};

use crate::config::{BoxConfig, Config};
use crate::ui::Ui;

/// A base box ready for a provider: a disk image (and, for boxes built from a mirror, kernel + initrd).
#[derive(Debug, Clone)]
pub struct BoxImage {
    /// Cache id (content hash based).
    pub id: String,
    /// Disk image: qcow2/raw for libvirt; for VirtualBox the `.ovf` to import.
    pub disk: PathBuf,
    /// "qcow2", "raw", "ovf", "vmdk".
    pub format: String,
    /// Direct kernel boot (boxes built from a Debian mirror have no bootloader).
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    /// Kernel command line for direct boot.
    pub cmdline: Option<String>,
    pub firmware: crate::config::Firmware,
    /// Disks after the first (vagrant-libvirt box format v2), in order, with qemu's format name: each machine
    /// gets an overlay of each, attached after the boot disk (vdb, vdc, ...).
    pub extra_disks: Vec<(PathBuf, String)>,
}

/// The cache root: `$PROVISIONER_CACHE_DIR`, else the user cache dir's `provisioner` (`~/.cache/provisioner` on Linux,
/// `%LOCALAPPDATA%\provisioner` on Windows, through `dirs`).
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("PROVISIONER_CACHE_DIR") {
        return PathBuf::from(d);
    }
    dirs::cache_dir().unwrap_or_else(|| PathBuf::from("/var/tmp")).join("provisioner")
}

/// Make sure the box that `cfg` names is in the cache (fetching or building it) and return it, reporting
/// progress through `ui` (so `--json` gets only JSON events). `provider` is "libvirt" or "virtualbox" (a Vagrant
/// box must match it). The bool says whether this call built/fetched the box (false = cache hit).
pub fn ensure_ui(cfg: &Config, provider: &str, force: bool, ui: &Ui) -> Result<(BoxImage, bool)> {
    ensure_in(&Cache::open()?, cfg, provider, force, ui)
}

/// [`ensure_ui`] with an explicit cache (tests use a temporary one).
pub fn ensure_in(
    cache: &Cache,
    cfg: &Config,
    provider: &str,
    force: bool,
    ui: &Ui,
) -> Result<(BoxImage, bool)> {
    let b = &cfg.base_box;
    check_one_source(b)?;
    let (meta, built) = if let Some(d) = &b.debian {
        debian::ensure(cache, d, force, ui)?
    } else if let Some(url) = b.url.as_deref().filter(|u| catalog::is_catalog_url(u)) {
        let ph = ui.phase("catalog");
        let constraint = b.version.as_deref().map(catalog::Constraint::parse).transpose()?;
        let pick =
            catalog::pick(&catalog::parse(&catalog::fetch_text(url)?)?, constraint.as_ref(), provider)?;
        ph.done(&format!("version {} for {provider}", pick.version));
        fetch::ensure(cache, &pick.url, &pick.sha256, force, ui)?
    } else if let Some(url) = &b.url {
        if b.version.is_some() {
            bail!(
                "[box] version needs a Vagrant catalog url (a metadata.json listing versions); {url:?} is one box\n\
                 hint: set url to the catalog (e.g. https://HOST/NAME/metadata.json), or remove `version`"
            );
        }
        let Some(sha) = &b.sha256 else {
            bail!(
                "[box] url needs a sha256 to check the download against\nhint: add sha256 = \"...\" (from the \
                 publisher's SHA256SUMS, or `sha256sum` of a copy you trust)"
            );
        };
        fetch::ensure(cache, url, sha, force, ui)?
    } else {
        let local = b.image.as_ref().or(b.vagrant.as_ref()).expect("exactly one source is set");
        import::ensure(cache, &cfg.resolve(local), force, ui)?
    };
    check_provider(&meta, provider)?;
    let image = image_of(cache, &meta, b);
    ui.event(
        "box",
        serde_json::json!({"id": meta.id, "built": built, "format": meta.format, "disk": image.disk}),
    );
    Ok((image, built))
}

fn check_one_source(b: &BoxConfig) -> Result<()> {
    let set: Vec<&str> = [
        ("image", b.image.is_some()),
        ("url", b.url.is_some()),
        ("vagrant", b.vagrant.is_some()),
        ("[box.debian]", b.debian.is_some()),
    ]
    .into_iter()
    .filter_map(|(name, on)| on.then_some(name))
    .collect();
    match set.len() {
        1 => Ok(()),
        0 => bail!(
            "[box] names no base box\nhint: set exactly one of `image`, `url` + `sha256`, `vagrant`, or a \
             [box.debian] table in box-config.toml"
        ),
        _ => bail!("[box] sets {} at once; keep exactly one of them", set.join(" and ")),
    }
}

/// The box must suit the provider that will run it.
fn check_provider(meta: &BoxMeta, provider: &str) -> Result<()> {
    if meta.provider == provider {
        return Ok(());
    }
    let why = if meta.kernel.is_some() {
        "it boots its kernel directly (no bootloader), which only libvirt/QEMU can do".to_string()
    } else {
        format!("its disk format is {}", meta.format)
    };
    bail!(
        "box {} is for the {} provider, but this machine uses {provider}: {why}\n\
         hint: set [machine] provider = \"{}\" or name a box made for {provider}",
        cache::short(&meta.id),
        meta.provider,
        meta.provider
    )
}

fn image_of(cache: &Cache, meta: &BoxMeta, b: &BoxConfig) -> BoxImage {
    let dir = cache.entry_dir(&meta.id);
    BoxImage {
        id: meta.id.clone(),
        disk: dir.join(&meta.disk),
        format: meta.format.clone(),
        kernel: meta.kernel.as_ref().map(|k| dir.join(k)),
        initrd: meta.initrd.as_ref().map(|i| dir.join(i)),
        // Boot parameters belong to the tool, not the image: boxes built by an older version get today's.
        cmdline: meta.kernel.is_some().then(|| debian::CMDLINE.to_string()),
        firmware: b.firmware,
        extra_disks: meta.extra_disks.iter().map(|d| (dir.join(&d.disk), d.format.clone())).collect(),
    }
}
