//! The `box-config.toml` model: strict serde types (unknown keys are errors), defaults that bring up the lab,
//! and validation whose errors name file:line:col.
//!
//! Loading goes through [`Config::load`]; everything else in the crate works on the validated [`Config`].

mod check;
mod diag;
pub mod hostnet;
pub mod limits;
mod project;
mod uri;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::profile::Profile;

pub use check::{
    published_ports, render_failed, valid_machine_name, valid_unix_user, ComposeOf, COMPOSE_FILES,
};
use diag::Source;
pub use diag::{line_col, ConfigError, Diagnostic, Warning};
pub use project::{Member, NetworkConfig, Peer, Project};
pub use uri::{check_libvirt_uri, is_system_instance, UriProblem};

/// The whole file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub machine: MachineConfig,
    #[serde(rename = "box")]
    pub base_box: BoxConfig,
    #[serde(default)]
    pub ssh: SshConfig,
    #[serde(default, rename = "forward")]
    pub forwards: Vec<Forward>,
    #[serde(default)]
    pub provision: ProvisionConfig,
    /// Template variables for provision/ (merged over the lab's defaults).
    #[serde(default)]
    pub vars: BTreeMap<String, toml::Value>,
    /// Health probes by service name (merged over the lab's defaults).
    #[serde(default)]
    pub health: BTreeMap<String, HealthProbe>,
    #[serde(default)]
    pub libvirt: LibvirtConfig,
    #[serde(default)]
    pub virtualbox: VirtualBoxConfig,

    /// Where the file was read from (not part of the file).
    #[serde(skip)]
    pub path: PathBuf,
    /// The decoded text it was parsed from (for positions in messages); None when built in code.
    #[serde(skip)]
    pub source_text: Option<String>,
    /// Set when this machine is one `[[machine]]` entry of a multi-machine file (see [`Project`]).
    #[serde(skip)]
    pub member: Option<Member>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// Machine name: `[a-z0-9][a-z0-9-]{0,30}`; also the guest hostname unless `hostname` is set.
    pub name: String,
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub provider: ProviderKind,
    #[serde(default = "default_cpus")]
    pub cpus: u32,
    /// Memory in MiB.
    #[serde(default = "default_memory")]
    pub memory_mb: u64,
    /// Disk size in GiB (the overlay grows to this; the base box is never changed).
    #[serde(default = "default_disk")]
    pub disk_gb: u64,
    #[serde(default)]
    pub accel: Accel,
    /// Keep a capture of the freshly provisioned machine in the cache, restored by the next `up` of an identical
    /// machine (docs/vm.md, "Cached lab").
    #[serde(default = "default_true")]
    pub cache_lab: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    #[default]
    Auto,
    Libvirt,
    Virtualbox,
}

impl ProviderKind {
    /// The name as written in the file (`auto`, `libvirt`, `virtualbox`) or recorded in the machine's state.
    pub fn parse(s: &str) -> Option<Self> {
        // The same names serde reads from the file (one mapping, not two).
        toml::Value::String(s.to_string()).try_into().ok()
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM only when it can really run a stock kernel (device node and vmx/svm flag), else TCG with a warning.
    #[default]
    Auto,
    Kvm,
    Tcg,
}

/// The base box. Exactly one of `image`, `url` (with `sha256`), `vagrant` or `debian` must be set.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BoxConfig {
    /// Local qcow2 or raw disk image (relative to the config file's directory).
    #[serde(default)]
    pub image: Option<PathBuf>,
    /// Download URL of a disk image, `.box`, `.ova`; needs `sha256`.
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub sha256: Option<String>,
    /// Local Vagrant `.box` file (libvirt or virtualbox provider inside).
    #[serde(default)]
    pub vagrant: Option<PathBuf>,
    /// Build a bootable image from a Debian mirror.
    #[serde(default)]
    pub debian: Option<DebianBox>,
    /// Firmware for images that boot from their own disk.
    #[serde(default)]
    pub firmware: Firmware,
    /// How keys get into a machine of this box (see docs/boxes.md "Boxes from Vagrant").
    #[serde(default)]
    pub keys: KeysRoute,
    /// Version constraint for a Vagrant catalog `url` (`metadata.json`), e.g. ">= 1.2, < 2".
    #[serde(default)]
    pub version: Option<String>,
}

/// `[box] keys`: how the machine's key gets in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeysRoute {
    /// Told from the box's disk: cloud-init present and enabled, or not.
    #[default]
    Auto,
    /// The NoCloud seed (the box runs cloud-init).
    CloudInit,
    /// The machine's disk edited before its first boot.
    Disk,
    /// One login with Vagrant's insecure key on 127.0.0.1, then replaced (explicit opt-in).
    InsecureOnce,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    #[default]
    Bios,
    Uefi,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DebianBox {
    #[serde(default = "default_suite")]
    pub suite: String,
    #[serde(default = "default_mirror")]
    pub mirror: String,
    /// Extra packages installed into the image (e.g. docker.io to pre-bake Docker).
    #[serde(default)]
    pub packages: Vec<String>,
}

/// One port forwarded from the host to the guest.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Forward {
    pub guest: u16,
    pub host: u16,
    #[serde(default = "default_host_ip")]
    pub host_ip: String,
    #[serde(default)]
    pub protocol: Protocol,
    /// Optional label (e.g. the service behind it).
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SshConfig {
    #[serde(default = "default_ssh_user")]
    pub user: String,
    /// Host port forwarded to the guest's port 22 (on `host_ip`). 0 picks a free port at create time.
    #[serde(default = "default_ssh_port")]
    pub host_port: u16,
    #[serde(default = "default_host_ip")]
    pub host_ip: String,
    /// Seconds to wait for SSH after boot.
    #[serde(default = "default_ssh_timeout")]
    pub connect_timeout_secs: u64,
    /// `provisioner ssh` reuses one OpenSSH connection (ControlMaster/ControlPersist); see docs/ssh.md.
    #[serde(default = "default_reuse_connection")]
    pub reuse_connection: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProvisionConfig {
    /// The template tree, relative to the config file's directory.
    #[serde(default = "default_provision_source")]
    pub source: PathBuf,
    /// A template tree that `source` builds on: every file of `base` is rendered unless `source` holds a file of
    /// the same relative path, which replaces it (`vars.toml` of both are merged, `source`'s winning).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<PathBuf>,
    /// Where the rendered tree lives in the guest.
    #[serde(default = "default_guest_path")]
    pub guest_path: String,
    /// Where service images come from.
    #[serde(default)]
    pub images: ImageSource,
    /// How Docker is installed when missing.
    #[serde(default)]
    pub docker_install: DockerInstall,
    /// Skip provisioning entirely (boot only).
    #[serde(default)]
    pub enabled: Option<bool>,
    /// Docker Hub mirrors (`registry-mirrors` in the guest's /etc/docker/daemon.json), as URLs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub registry_mirrors: Vec<String>,
    /// Registries Docker reaches over plain HTTP or unverified TLS (`insecure-registries`), as `host[:port]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub insecure_registries: Vec<String>,
    /// CA certificates (PEM files, relative to the config's directory) the guest's Docker trusts for every
    /// registry the config names (installed as `/etc/docker/certs.d/HOST/ca.crt`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ca_certs: Vec<PathBuf>,
    /// A TOML file (mode 0600, outside the config) with `["HOST"] username, password` per registry; used with
    /// `docker login --password-stdin` in the guest, never printed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry_credentials: Option<PathBuf>,
    /// Upstream registry -> the path prefix that proxies it (a Harbor/Nexus proxy project): every image of that
    /// registry is pulled as `PREFIX/REPOSITORY:TAG` (`docker.io` images as `PREFIX/library/NAME` for official ones).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub registry_proxies: BTreeMap<String, String>,
    /// The package index the registry-mode builds use for Python packages (`PIP_INDEX_URL`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pip_index_url: Option<String>,
}

/// A Docker image reference split into its registry and the rest (`python:3` -> `docker.io`,
/// `library/python:3`; `gcr.io/team/tool:v1` -> `gcr.io`, `team/tool:v1`).
pub fn split_image(image: &str) -> (&str, String) {
    match image.split_once('/') {
        Some((first, rest)) if first.contains('.') || first.contains(':') || first == "localhost" => {
            (first, rest.to_string())
        }
        Some(_) => ("docker.io", image.to_string()),
        None => ("docker.io", format!("library/{image}")),
    }
}

impl ProvisionConfig {
    /// The reference an image is pulled by: through its registry's proxy prefix when `registry_proxies` names one
    /// (`index.docker.io` and `registry-1.docker.io` count as `docker.io`), else unchanged.
    pub fn proxied_image(&self, image: &str) -> String {
        let (registry, rest) = split_image(image);
        let key = match registry {
            "index.docker.io" | "registry-1.docker.io" => "docker.io",
            r => r,
        };
        match self.registry_proxies.get(key) {
            Some(prefix) => format!("{}/{rest}", prefix.trim_end_matches('/')),
            None => image.to_string(),
        }
    }

    /// Every registry host the config names (mirrors, insecure registries, proxy prefixes), sorted, each once:
    /// where the CA certificates are installed.
    pub fn registry_hosts(&self) -> Vec<String> {
        let mut hosts: Vec<String> = self
            .registry_mirrors
            .iter()
            .filter_map(|m| url_host(m))
            .chain(self.insecure_registries.iter().cloned())
            .chain(self.registry_proxies.values().map(|p| p.split('/').next().unwrap_or(p).to_string()))
            .collect();
        hosts.sort();
        hosts.dedup();
        hosts
    }
}

/// `host[:port]` of an `http(s)://` URL.
pub fn url_host(url: &str) -> Option<String> {
    let rest = url.strip_prefix("https://").or_else(|| url.strip_prefix("http://"))?;
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
    (!host.is_empty()).then(|| host.to_string())
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageSource {
    /// The guest checks, with a short deadline, whether the registry (or its proxy/mirror) answers for the
    /// images: registry mode if it does, debian mode if not.
    Auto,
    /// Pinned official images from a registry; `docker compose build` for the services the tree builds.
    Registry,
    /// Images built from a Debian mirror (for places where only a mirror is reachable).
    #[default]
    Debian,
}

impl ImageSource {
    pub fn as_str(self) -> &'static str {
        match self {
            ImageSource::Registry => "registry",
            ImageSource::Debian => "debian",
            ImageSource::Auto => "auto",
        }
    }
    /// The mode templates see: `auto` not (yet) resolved against a guest renders as debian mode, the one that
    /// needs no registry (`render`, `validate`).
    pub fn rendered(self) -> ImageSource {
        match self {
            ImageSource::Auto => ImageSource::Debian,
            m => m,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DockerInstall {
    /// The distribution's packages (docker.io + its compose).
    #[default]
    Distro,
    /// The get.docker.com convenience script.
    GetDocker,
}

/// How to probe one lab service.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HealthProbe {
    /// URL path probed over HTTP through the forwarded port.
    pub path: String,
    /// Guest port (must be forwarded).
    pub port: u16,
    #[serde(default = "default_expect_status")]
    pub expect_status: u16,
    #[serde(default = "default_probe_timeout")]
    pub timeout_secs: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LibvirtConfig {
    /// `qemu:///session` (default, no root), `qemu:///system`, or a remote `qemu+ssh://` URI.
    #[serde(default = "default_libvirt_uri")]
    pub uri: String,
    /// Storage pool on a remote host for the uploaded box and the machine's volumes (created if missing).
    #[serde(default = "default_libvirt_pool")]
    pub pool: String,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VirtualBoxConfig {
    /// Path to VBoxManage when it is not on PATH.
    #[serde(default)]
    pub vboxmanage: Option<PathBuf>,
}

fn default_cpus() -> u32 {
    2
}
fn default_memory() -> u64 {
    4096
}
fn default_true() -> bool {
    true
}
fn default_disk() -> u64 {
    20
}
fn default_suite() -> String {
    "bookworm".into()
}
fn default_mirror() -> String {
    "http://deb.debian.org/debian".into()
}
pub fn default_host_ip() -> String {
    "127.0.0.1".into()
}
fn default_ssh_user() -> String {
    "provisioner".into()
}
fn default_ssh_port() -> u16 {
    2222
}
fn default_ssh_timeout() -> u64 {
    600
}
fn default_reuse_connection() -> bool {
    true
}
fn default_provision_source() -> PathBuf {
    "provision".into()
}
fn default_guest_path() -> String {
    "/opt/provision".into()
}
fn default_expect_status() -> u16 {
    200
}
fn default_probe_timeout() -> u64 {
    10
}
fn default_libvirt_uri() -> String {
    "qemu:///session".into()
}
pub fn default_libvirt_pool() -> String {
    "provisioner".into()
}

impl Default for SshConfig {
    fn default() -> Self {
        Self {
            user: default_ssh_user(),
            host_port: default_ssh_port(),
            host_ip: default_host_ip(),
            connect_timeout_secs: default_ssh_timeout(),
            reuse_connection: default_reuse_connection(),
        }
    }
}
impl Default for ProvisionConfig {
    fn default() -> Self {
        Self {
            source: default_provision_source(),
            base: None,
            guest_path: default_guest_path(),
            images: ImageSource::default(),
            docker_install: DockerInstall::default(),
            enabled: None,
            registry_mirrors: Vec::new(),
            insecure_registries: Vec::new(),
            ca_certs: Vec::new(),
            registry_credentials: None,
            registry_proxies: BTreeMap::new(),
            pip_index_url: None,
        }
    }
}
impl Default for LibvirtConfig {
    fn default() -> Self {
        Self { uri: default_libvirt_uri(), pool: default_libvirt_pool() }
    }
}

/// The directory of a config file: relative paths in it resolve from here; `.provisioner/` lives here.
pub fn base_dir_of(config_path: &Path) -> PathBuf {
    match config_path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn sorted(mut v: Vec<Diagnostic>) -> Vec<Diagnostic> {
    v.sort_by_key(|d| (d.line, d.col));
    v
}

impl Config {
    /// Read, decode (UTF-8 with optional BOM) and validate a config file.
    ///
    /// Errors name `file:line:col` and say what is expected.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let bytes = std::fs::read(path).map_err(|e| {
            anyhow::anyhow!(
                "cannot read {}: {e}\nhint: run from the directory holding box-config.toml, or pass --config PATH",
                path.display()
            )
        })?;
        Self::from_bytes(path, &bytes)
    }

    /// Parse and validate from bytes; `path` is used in messages and to resolve relative paths.
    ///
    /// Runs the rules on the file alone (types, allowed values, one box source, unique host ports, ...). An
    /// error is a [`ConfigError`] listing every problem as `FILE:LINE:COL: message` with a hint.
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> anyhow::Result<Config> {
        let file = path.display().to_string();
        let text = diag::decode(&file, bytes).map_err(|d| ConfigError { diagnostics: vec![d] })?;
        Self::from_source(path, &Source::new(&file, Some(text)))
    }

    /// [`Config::from_bytes`] of a file already decoded and parsed.
    fn from_source(path: &Path, src: &Source) -> anyhow::Result<Config> {
        let text = src.text().unwrap_or_default();
        let mut cfg: Config = src.deserialize().map_err(|d| ConfigError { diagnostics: vec![d] })?;
        cfg.path = path.to_path_buf();
        cfg.source_text = Some(text.to_string());
        let findings = check::local(&cfg, src);
        if !findings.errors.is_empty() {
            return Err(ConfigError { diagnostics: sorted(findings.errors) }.into());
        }
        Ok(cfg)
    }

    /// For commands that only look after an existing machine (`status`, `halt`, `destroy`): the validated config,
    /// or, when the file no longer validates, a stand-in with only what names and reaches the machine (machine
    /// name, provider, libvirt URI, VBoxManage path), read leniently from whatever of the file still parses.
    /// The second value is the validation error, for the caller to show as a warning. Errors only when not even
    /// the machine name can be read (the caller may still know it from the machine's state).
    pub fn load_lenient(path: &Path) -> anyhow::Result<(Config, Option<anyhow::Error>)> {
        match std::fs::read(path) {
            Ok(bytes) => Self::from_bytes_lenient(path, &bytes),
            Err(_) => Self::load(path).map(|c| (c, None)),
        }
    }

    /// [`Config::load_lenient`] of bytes already read.
    pub fn from_bytes_lenient(path: &Path, bytes: &[u8]) -> anyhow::Result<(Config, Option<anyhow::Error>)> {
        match Self::from_bytes(path, bytes) {
            Ok(cfg) => Ok((cfg, None)),
            Err(strict) => Self::stand_in_of(path, bytes, strict),
        }
    }

    /// The stand-in of a file that does not validate (`strict` says why), from what of it still reads.
    fn stand_in_of(
        path: &Path,
        bytes: &[u8],
        strict: anyhow::Error,
    ) -> anyhow::Result<(Config, Option<anyhow::Error>)> {
        let doc: Option<toml::Table> =
            diag::decode("", bytes).ok().and_then(|text| toml::from_str::<toml::Table>(text).ok());
        let get = |table: &str, key: &str| -> Option<String> {
            doc.as_ref()?.get(table)?.get(key)?.as_str().map(str::to_string)
        };
        let Some(name) = get("machine", "name").filter(|n| check::valid_machine_name(n)) else {
            return Err(strict);
        };
        let mut cfg = Self::stand_in(path, &name);
        if let Some(kind) = get("machine", "provider").and_then(|p| ProviderKind::parse(&p)) {
            cfg.machine.provider = kind;
        }
        if let Some(uri) = get("libvirt", "uri") {
            cfg.libvirt.uri = uri;
        }
        cfg.virtualbox.vboxmanage = get("virtualbox", "vboxmanage").map(PathBuf::from);
        Ok((cfg, Some(strict)))
    }

    /// A config with defaults everywhere but the machine name, for looking after a machine whose file is broken.
    pub fn stand_in(path: &Path, name: &str) -> Config {
        Config {
            machine: MachineConfig {
                name: name.to_string(),
                hostname: None,
                provider: ProviderKind::Auto,
                cpus: default_cpus(),
                memory_mb: default_memory(),
                disk_gb: default_disk(),
                accel: Accel::Auto,
                cache_lab: true,
            },
            base_box: BoxConfig::default(),
            ssh: SshConfig::default(),
            forwards: Vec::new(),
            provision: ProvisionConfig::default(),
            vars: BTreeMap::new(),
            health: BTreeMap::new(),
            libvirt: LibvirtConfig::default(),
            virtualbox: VirtualBoxConfig::default(),
            path: path.to_path_buf(),
            source_text: None,
            member: None,
        }
    }

    fn source(&self) -> Source<'_> {
        let src = Source::new(&self.path.display().to_string(), self.source_text.as_deref());
        match &self.member {
            Some(m) => src.with_remap(m.remap()),
            None => src,
        }
    }

    /// Every check, including the cross-references against the provision tree whose compose file `compose`
    /// gives (rendering it is `crate::validate`'s: render sits above config): forwarded guest ports published by
    /// the compose file, health probe ports forwarded, the provision directory present. Errors are a
    /// [`ConfigError`] (or a render error naming the template); Ok holds warnings.
    pub fn validate_with_tree(
        &self,
        profile: &Profile,
        compose: &check::ComposeOf,
    ) -> anyhow::Result<Vec<Warning>> {
        let src = self.source();
        let mut local = check::local(self, &src);
        let cross = check::cross(self, &src, profile, compose)?;
        local.errors.extend(cross.errors);
        local.warnings.extend(cross.warnings);
        if !local.errors.is_empty() {
            return Err(ConfigError { diagnostics: sorted(local.errors) }.into());
        }
        Ok(sorted(local.warnings))
    }

    /// The profile's health probes overlaid by the file's `[health.NAME]` tables (a table replaces the default of
    /// the same name).
    pub fn health_probes(&self, profile: &Profile) -> BTreeMap<String, HealthProbe> {
        let mut probes: BTreeMap<String, HealthProbe> = profile
            .probes
            .iter()
            .map(|(name, path, port)| {
                let probe = HealthProbe {
                    path: path.to_string(),
                    port: *port,
                    expect_status: default_expect_status(),
                    timeout_secs: default_probe_timeout(),
                };
                (name.to_string(), probe)
            })
            .collect();
        probes.extend(self.health.clone());
        probes
    }

    /// Directory of the config file: relative paths in it resolve from here; `.provisioner/` lives here.
    pub fn base_dir(&self) -> PathBuf {
        base_dir_of(&self.path)
    }

    /// This config with `[provision] images` set to `mode` (the mode `auto` resolved to).
    pub fn with_images(&self, mode: ImageSource) -> Config {
        let mut c = self.clone();
        c.provision.images = mode;
        c
    }

    /// Resolve a path from the file relative to its directory.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir().join(p)
        }
    }

    /// The provision tree's layers, resolved: `[provision] base` (when set), then `source`, which overrides it.
    pub fn template_layers(&self) -> Vec<PathBuf> {
        self.provision.base.iter().chain([&self.provision.source]).map(|p| self.resolve(p)).collect()
    }

    /// A `[[machine]]`'s `profiles` (empty for a single machine): compose profiles `up` activates, and what
    /// templates see as `cluster.profiles`.
    pub fn compose_profiles(&self) -> &[String] {
        self.member.as_ref().map_or(&[], |m| &m.profiles)
    }

    /// The libvirt host this machine runs on when it is another host (`far.example` of
    /// `qemu+ssh://u@far.example/system`); None for this host (a local URI, or VirtualBox).
    pub fn remote_libvirt_host(&self) -> Option<String> {
        if self.machine.provider == ProviderKind::Virtualbox {
            return None;
        }
        let host = project::libvirt_host(&self.libvirt.uri);
        let name = host.rsplit_once(':').map_or(host.as_str(), |(h, _)| h);
        (!name.is_empty()).then(|| name.to_string())
    }

    /// The private subnet of a `[[machine]]` file against the networks of this host (`host`; Err: why they could
    /// not be read): errors for an overlap on this host, warnings where one is only possible (a machine on a
    /// remote host, whose networks are not known here). Empty for a single machine. `validate`, `up` and
    /// `provision` run it with [`hostnet::read`].
    pub fn check_host_networks(
        &self,
        host: Result<&[hostnet::HostNet], String>,
    ) -> (Vec<Diagnostic>, Vec<Warning>) {
        let mut f = check::Findings::default();
        check::host_networks(self, &self.source(), host, &mut f);
        (f.errors, f.warnings)
    }

    /// A diagnostic at a key of this machine's part of the file (e.g. `["libvirt", "uri"]`), for findings made
    /// outside the config's own checks.
    pub fn diagnostic_at(&self, path: &[&str], message: impl Into<String>) -> Diagnostic {
        self.source().at_path(path, message)
    }

    pub fn hostname(&self) -> &str {
        self.machine.hostname.as_deref().unwrap_or(&self.machine.name)
    }

    /// All forwards including SSH (first), as the provider must set them up.
    pub fn all_forwards(&self) -> Vec<Forward> {
        let mut v = vec![Forward {
            guest: 22,
            host: self.ssh.host_port,
            host_ip: self.ssh.host_ip.clone(),
            protocol: Protocol::Tcp,
            name: Some("ssh".into()),
        }];
        v.extend(self.forwards.iter().cloned());
        v
    }

    /// Host (ip, port) that reaches a guest TCP port, if forwarded.
    pub fn host_addr_for(&self, guest_port: u16) -> Option<(String, u16)> {
        self.all_forwards()
            .into_iter()
            .find(|f| f.guest == guest_port && f.protocol == Protocol::Tcp)
            .map(|f| (f.host_ip, f.host))
    }
}
