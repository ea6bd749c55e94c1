//! Multi-machine files: `[[machine]]` entries with shared `[defaults]` and a `[network]`, expanded into one
//! complete [`Config`] per machine (so every single-machine code path works on it unchanged), plus the rules
//! between machines (unique names and addresses, addresses inside the subnet, host ports, one primary).
//!
//! A file with a single `[machine]` table is a project of one machine, loaded exactly as before.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::diag::{self, Diagnostic, Source};
use super::{
    check, sorted, Accel, BoxConfig, Config, ConfigError, Forward, HealthProbe, LibvirtConfig, MachineConfig,
    Protocol, ProviderKind, ProvisionConfig, SshConfig, VirtualBoxConfig,
};
use crate::text::shown;

/// The whole multi-machine file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProjectFile {
    machine: Vec<MachineEntry>,
    #[serde(default)]
    defaults: Defaults,
    #[serde(default)]
    network: NetworkConfig,
    #[serde(default, rename = "box")]
    base_box: Option<BoxConfig>,
    #[serde(default)]
    ssh: SshConfig,
    #[serde(default)]
    provision: ProvisionConfig,
    #[serde(default)]
    vars: BTreeMap<String, toml::Value>,
    #[serde(default)]
    health: BTreeMap<String, HealthProbe>,
    #[serde(default)]
    libvirt: LibvirtConfig,
    #[serde(default)]
    virtualbox: VirtualBoxConfig,
}

/// `[defaults]`: machine settings every `[[machine]]` inherits unless it sets them itself.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Defaults {
    provider: Option<ProviderKind>,
    cpus: Option<u32>,
    memory_mb: Option<u64>,
    disk_gb: Option<u64>,
    accel: Option<Accel>,
    cache_lab: Option<bool>,
}

/// One `[[machine]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct MachineEntry {
    name: String,
    hostname: Option<String>,
    #[serde(default)]
    primary: bool,
    /// Address on the private network (default: the subnet's 10th host address onwards, in file order).
    ip: Option<String>,
    provider: Option<ProviderKind>,
    cpus: Option<u32>,
    memory_mb: Option<u64>,
    disk_gb: Option<u64>,
    accel: Option<Accel>,
    cache_lab: Option<bool>,
    /// Host port forwarded to the guest's SSH (0 or absent: a free port picked at create time).
    ssh_port: Option<u16>,
    #[serde(rename = "box")]
    base_box: Option<BoxConfig>,
    #[serde(default, rename = "forward")]
    forwards: Vec<Forward>,
    /// Compose profiles this machine runs: `up` passes each as `--profile`, and templates see them as
    /// `cluster.profiles`.
    #[serde(default)]
    profiles: Vec<String>,
    provision: Option<MachineProvision>,
    /// The machine's own libvirt host and pool (e.g. one machine on a remote host).
    libvirt: Option<MachineLibvirt>,
    #[serde(default)]
    vars: BTreeMap<String, toml::Value>,
    #[serde(default)]
    health: BTreeMap<String, HealthProbe>,
}

/// What a machine may change of the shared `[libvirt]`: its host (URI) and the storage pool there.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MachineLibvirt {
    uri: Option<String>,
    pool: Option<String>,
}

/// The host a libvirt URI reaches ("" for this machine): where a machine's forwarded ports are bound. One host
/// spelt two ways is one host: the name is compared without case (and a trailing dot), the port defaults to the
/// transport's (22 for ssh and libssh, 16514 for tls, 16509 for tcp), and the user is left out: a port forwarded
/// on a host is bound in that host's network stack, whichever account's libvirt binds it (and an SSH URI without
/// a user may log in as the local user or as ~/.ssh/config says, which is still the same host). Two ports of one
/// name stay two hosts (an SSH port forwarded to another machine is another machine). Pure.
pub(crate) fn libvirt_host(uri: &str) -> String {
    let Some((scheme, rest)) = uri.split_once("://") else { return String::new() };
    let transport = scheme.split_once('+').map_or("", |(_, t)| t).to_ascii_lowercase();
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    let hostport = authority.rsplit('@').next().unwrap_or("");
    let (host, port) = match hostport.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((h, p)) => (h, p.strip_prefix(':')),
            None => (v6, None),
        },
        None => match hostport.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        },
    };
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    if host.is_empty() {
        return String::new();
    }
    let default_port = match transport.as_str() {
        "ssh" | "libssh" => "22",
        "tls" => "16514",
        "tcp" => "16509",
        _ => "",
    };
    let port = port.filter(|p| !p.is_empty()).map(|p| p.trim_start_matches('0')).unwrap_or(default_port);
    format!("{host}:{port}")
}

/// Two bind addresses of one host overlap when they are equal or either is a wildcard.
fn binds_overlap(a: &str, b: &str) -> bool {
    let any = |ip: &str| matches!(ip, "" | "0.0.0.0" | "::" | "[::]");
    a == b || any(a) || any(b)
}

/// What a machine may change of the shared `[provision]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MachineProvision {
    source: Option<PathBuf>,
    enabled: Option<bool>,
}

/// `[network]`: the private network between the machines of a project.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// IPv4 subnet in CIDR form, prefix 8-30 (default "10.77.0.0/24").
    #[serde(default = "default_subnet")]
    pub subnet: String,
    /// Network name, unique within the project (default "lab").
    #[serde(default = "default_net_name")]
    pub name: String,
    /// libvirt with `qemu:///system` only: an isolated libvirt network (no `<forward>`) instead of the tunnel.
    #[serde(default)]
    pub isolated: bool,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self { subnet: default_subnet(), name: default_net_name(), isolated: false }
    }
}

fn default_subnet() -> String {
    "10.77.0.0/24".into()
}
fn default_net_name() -> String {
    "lab".into()
}

/// A machine of the project as the others see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Peer {
    pub name: String,
    pub hostname: String,
    pub ip: Ipv4Addr,
    /// Its compose profiles (which part of the lab it runs).
    pub profiles: Vec<String>,
}

/// What a machine of a `[[machine]]` file knows beyond its own [`Config`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Position in the file (0-based).
    pub index: usize,
    pub primary: bool,
    /// Its address on the private network and the subnet's prefix length.
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub network: NetworkConfig,
    pub profiles: Vec<String>,
    /// Every machine of the project, this one included, in file order.
    pub peers: Vec<Peer>,
    own_box: bool,
    own_provision: bool,
    own_libvirt: bool,
    /// Machine keys whose value comes from `[defaults]` (for positions in messages).
    from_defaults: Vec<&'static str>,
}

impl Member {
    /// Where the machine's tables are in the file, for positions in messages.
    pub(super) fn remap(&self) -> Vec<(Vec<String>, Vec<String>)> {
        let at = |rest: &[&str]| -> Vec<String> {
            ["machine", &self.index.to_string()].iter().chain(rest).map(|s| s.to_string()).collect()
        };
        let key = |path: &[&str]| -> Vec<String> { path.iter().map(|s| s.to_string()).collect() };
        let mut v = vec![
            (key(&["machine"]), at(&[])),
            (key(&["forward"]), at(&["forward"])),
            (key(&["ssh", "host_port"]), at(&["ssh_port"])),
        ];
        for k in &self.from_defaults {
            v.push((key(&["machine", k]), key(&["defaults", k])));
        }
        if self.own_box {
            v.push((key(&["box"]), at(&["box"])));
        }
        if self.own_provision {
            v.push((key(&["provision"]), at(&["provision"])));
        }
        if self.own_libvirt {
            v.push((key(&["libvirt"]), at(&["libvirt"])));
        }
        v
    }
}

/// The machines of one file: one for a `[machine]` file, one per entry for a `[[machine]]` file.
#[derive(Debug, Clone)]
pub struct Project {
    pub path: PathBuf,
    pub machines: Vec<Config>,
    /// Whether the file uses `[[machine]]` (state under `.provisioner/machines/<name>/`): read only by
    /// [`Project::label_for`] and [`Project::solo`].
    several: bool,
}

impl Project {
    /// Read and validate a file of either form: the one load (and the one TOML parse) of the file per command.
    /// A `[machine]` file is a project of one machine (its state dir and VM name are those it always had).
    pub fn load(path: &Path) -> anyhow::Result<Project> {
        let bytes = read(path)?;
        let file = path.display().to_string();
        let text = diag::decode(&file, &bytes).map_err(|d| ConfigError { diagnostics: vec![d] })?;
        let src = Source::new(&file, Some(text));
        if src.is_multi() {
            return Ok(Project { path: path.to_path_buf(), machines: expand(path, &src)?, several: true });
        }
        Ok(Project::of_one(path, Config::from_source(path, &src)?))
    }

    /// For commands that look after machines that exist (`status`, `port`, `halt`, `destroy`): a `[[machine]]`
    /// file is validated as a whole (as [`Project::load`]); a `[machine]` file that no longer validates still
    /// names its machine ([`Config::load_lenient`]), the validation error coming back beside it. When not even
    /// the machine's name reads, `recorded` may still know it (from the machine's recorded state).
    pub fn load_lenient(
        path: &Path,
        recorded: &dyn Fn() -> Option<String>,
    ) -> anyhow::Result<(Project, Option<anyhow::Error>)> {
        let one = match std::fs::read(path) {
            Ok(bytes) => {
                let file = path.display().to_string();
                match diag::decode(&file, &bytes).ok().map(|t| Source::new(&file, Some(t))) {
                    Some(src) if src.is_multi() => {
                        let machines = expand(path, &src)?;
                        return Ok((Project { path: path.to_path_buf(), machines, several: true }, None));
                    }
                    Some(src) => match Config::from_source(path, &src) {
                        Ok(cfg) => Ok((cfg, None)),
                        Err(strict) => Config::stand_in_of(path, &bytes, strict),
                    },
                    None => Config::from_bytes_lenient(path, &bytes),
                }
            }
            // Unreadable: the error of the strict load (which says why), unless it reads now.
            Err(_) => match Self::load(path) {
                Ok(p) => return Ok((p, None)),
                Err(e) => Err(e),
            },
        };
        match one {
            Ok((cfg, invalid)) => Ok((Project::of_one(path, cfg), invalid)),
            Err(e) => match recorded() {
                Some(name) => Ok((Project::of_one(path, Config::stand_in(path, &name)), Some(e))),
                None => Err(e),
            },
        }
    }

    /// The project of a `[machine]` file.
    pub fn of_one(path: &Path, cfg: Config) -> Project {
        Project { path: path.to_path_buf(), machines: vec![cfg], several: false }
    }

    /// The label of a machine's output: its name among the machines of a `[[machine]]` file (`[name]` before
    /// each line, `"machine"` in each JSON event, a row of the summary); none for the machine of a `[machine]`
    /// file, whose output is as it always was. The one place that decides the shape of a command's output.
    pub fn label_for<'c>(&self, cfg: &'c Config) -> Option<&'c str> {
        self.several.then_some(cfg.machine.name.as_str())
    }

    /// The machine of a `[machine]` file: the whole project, which a command runs as it is (unlabelled, without a
    /// summary over machines); none for a `[[machine]]` file, even of one machine.
    pub fn solo(&self) -> Option<&Config> {
        match self.machines.as_slice() {
            [cfg] if self.label_for(cfg).is_none() => Some(cfg),
            _ => None,
        }
    }

    pub fn names(&self) -> Vec<&str> {
        self.machines.iter().map(|m| m.machine.name.as_str()).collect()
    }

    /// The named machines in file order (all when `names` is empty); an unknown name is an error listing them.
    pub fn select(&self, names: &[String]) -> anyhow::Result<Vec<&Config>> {
        for n in names {
            if !self.machines.iter().any(|m| &m.machine.name == n) {
                anyhow::bail!(
                    "no machine named \"{}\" in {}; its machines are: {}\nhint: pass one of these names, or none \
                     to act on every machine",
                    shown(n),
                    self.path.display(),
                    self.names().join(", ")
                );
            }
        }
        Ok(self.machines.iter().filter(|m| names.is_empty() || names.contains(&m.machine.name)).collect())
    }

    /// The one machine a single-machine command (`ssh`) acts on: the named one, else the primary or the only one.
    pub fn one(&self, name: Option<&str>) -> anyhow::Result<&Config> {
        if let Some(n) = name {
            return Ok(self.select(&[n.to_string()])?[0]);
        }
        if self.machines.len() == 1 {
            return Ok(&self.machines[0]);
        }
        match self.machines.iter().find(|m| m.member.as_ref().is_some_and(|x| x.primary)) {
            Some(m) => Ok(m),
            None => anyhow::bail!(
                "{} defines {} machines ({}) and none is `primary`; this command needs one\nhint: name it (e.g. \
                 `provisioner ssh {}`), or set `primary = true` on one [[machine]]",
                self.path.display(),
                self.machines.len(),
                self.names().join(", "),
                self.machines[0].machine.name
            ),
        }
    }
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| {
        anyhow::anyhow!(
            "cannot read {}: {e}\nhint: run from the directory holding box-config.toml, or pass --config PATH",
            path.display()
        )
    })
}

/// A parsed `a.b.c.d/p`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Subnet {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Subnet {
    /// Parse a CIDR subnet with a prefix of 8-30 and no host bits set. Pure.
    pub(super) fn parse(s: &str) -> Result<Subnet, String> {
        let (a, p) = s.split_once('/').ok_or("write it as ADDRESS/PREFIX, e.g. \"10.77.0.0/24\"")?;
        let addr: Ipv4Addr = a.parse().map_err(|_| format!("\"{}\" is not an IPv4 address", shown(a)))?;
        let prefix: u8 = p.parse().map_err(|_| format!("\"{}\" is not a prefix length", shown(p)))?;
        if !(8..=30).contains(&prefix) {
            return Err(format!("prefix /{prefix} is outside 8-30"));
        }
        let net = Subnet { addr, prefix };
        if net.network() != addr {
            return Err(format!("host bits are set; the subnet is {}/{prefix}", net.network()));
        }
        Ok(net)
    }
    fn mask(&self) -> u32 {
        u32::MAX << (32 - self.prefix)
    }
    pub(super) fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask())
    }
    pub(super) fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) | !self.mask())
    }
    pub(super) fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.network())
    }
    fn overlaps(&self, other: &Subnet) -> bool {
        self.contains(other.network()) || other.contains(self.network())
    }
}

/// The subnet QEMU user networking and VirtualBox NAT give the first NIC: the private network must not overlap.
const NAT_SUBNET: Subnet = Subnet { addr: Ipv4Addr::new(10, 0, 2, 0), prefix: 24 };

/// Ranges no private network can use (RFC 6890), with what they are.
const RESERVED: &[(Subnet, &str)] = &[
    (
        Subnet { addr: Ipv4Addr::new(0, 0, 0, 0), prefix: 8 },
        "0.0.0.0/8, \"this network\" (never a host's address)",
    ),
    (
        Subnet { addr: Ipv4Addr::new(127, 0, 0, 0), prefix: 8 },
        "127.0.0.0/8, the loopback range (every machine's own)",
    ),
    (Subnet { addr: Ipv4Addr::new(169, 254, 0, 0), prefix: 16 }, "169.254.0.0/16, the link-local range"),
    (Subnet { addr: Ipv4Addr::new(224, 0, 0, 0), prefix: 4 }, "224.0.0.0/4, the multicast range"),
    (
        Subnet { addr: Ipv4Addr::new(240, 0, 0, 0), prefix: 4 },
        "240.0.0.0/4, the reserved range (with the broadcast address 255.255.255.255)",
    ),
];

fn err(src: &Source, path: &[&str], msg: String, hint: &str) -> Diagnostic {
    src.at_path(path, msg).with_hint(hint)
}

/// Parse a `[[machine]]` file, check it, and expand one [`Config`] per machine.
fn expand(path: &Path, src: &Source) -> anyhow::Result<Vec<Config>> {
    let text = src.text().unwrap_or_default();
    let pf: ProjectFile = src.deserialize().map_err(|d| ConfigError { diagnostics: vec![d] })?;
    let mut errors = Vec::new();
    if pf.machine.is_empty() {
        errors.push(err(src, &["machine"], "no machine in `machine = []`".into(), "add a [[machine]] table"));
    }
    if src.span_of(&["ssh", "host_port"]).is_some() {
        errors.push(err(
            src,
            &["ssh", "host_port"],
            "`host_port` in [ssh] does not apply to a file of several machines".into(),
            "set `ssh_port` in each [[machine]] that needs a fixed one; without it a free port is picked",
        ));
    }
    let reserved = |s: &Subnet| RESERVED.iter().find(|(r, _)| r.overlaps(s)).map(|(_, what)| *what);
    let subnet = match Subnet::parse(&pf.network.subnet) {
        Ok(s) if reserved(&s).is_some() => {
            errors.push(err(
                src,
                &["network", "subnet"],
                format!(
                    "subnet {} in [network] overlaps {}: the machines cannot have addresses there",
                    pf.network.subnet,
                    reserved(&s).unwrap_or_default()
                ),
                super::check::SUBNET_HINT,
            ));
            None
        }
        Ok(s) if s.overlaps(&NAT_SUBNET) => {
            errors.push(err(
                src,
                &["network", "subnet"],
                format!(
                    "subnet {} overlaps 10.0.2.0/24, the NAT network of every machine's first NIC",
                    pf.network.subnet
                ),
                "pick another private range, e.g. \"10.77.0.0/24\"",
            ));
            None
        }
        Ok(s) => Some(s),
        Err(m) => {
            errors.push(err(
                src,
                &["network", "subnet"],
                format!("subnet \"{}\" in [network]: {m}", shown(&pf.network.subnet)),
                "write an IPv4 subnet such as \"10.77.0.0/24\" (prefix 8-30)",
            ));
            None
        }
    };
    if pf.network.isolated && !super::is_system_instance(&pf.libvirt.uri) {
        errors.push(err(
            src,
            &["network", "isolated"],
            "`isolated = true` needs the libvirt URI qemu:///system (an isolated libvirt network)".into(),
            "set [libvirt] uri = \"qemu:///system\", or remove `isolated` to use the private tunnel of qemu:///session",
        ));
    }
    if !check::valid_machine_name(&pf.network.name) {
        errors.push(err(
            src,
            &["network", "name"],
            format!("network name \"{}\" is not allowed", shown(&pf.network.name)),
            "use 1-31 characters from a-z, 0-9 and '-'",
        ));
    }

    // Names and primary.
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    let mut primary: Option<usize> = None;
    for (i, e) in pf.machine.iter().enumerate() {
        let idx = i.to_string();
        if let Some(first) = seen.insert(&e.name, i) {
            let line = src.at_path(&["machine", &first.to_string(), "name"], "").line.unwrap_or(0);
            errors.push(err(
                src,
                &["machine", &idx, "name"],
                format!("machine name \"{}\" is already used at line {line}", shown(&e.name)),
                "give every [[machine]] its own name",
            ));
        }
        if e.primary {
            if let Some(first) = primary {
                let line = src.at_path(&["machine", &first.to_string(), "primary"], "").line.unwrap_or(0);
                errors.push(err(
                    src,
                    &["machine", &idx, "primary"],
                    format!(
                        "a second primary machine (\"{}\" is primary at line {line})",
                        shown(&pf.machine[first].name)
                    ),
                    "set `primary = true` on at most one [[machine]]",
                ));
            } else {
                primary = Some(i);
            }
        }
        for (j, p) in e.profiles.iter().enumerate() {
            // Compose's own rule for profile names.
            let ok = p.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
                && p.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
            if !ok {
                errors.push(err(
                    src,
                    &["machine", &idx, "profiles", &j.to_string()],
                    format!("profile \"{}\" is not a compose profile name", shown(p)),
                    "start with a letter or digit, then letters, digits, '_', '.' or '-'",
                ));
            }
        }
        if let Some(h) = &e.hostname {
            let line_of =
                |j: usize, key: &str| src.at_path(&["machine", &j.to_string(), key], "").line.unwrap_or(0);
            let named = pf.machine.iter().position(|o| &o.name == h).filter(|&j| j != i);
            let hosted = pf.machine[..i].iter().position(|o| o.hostname.as_ref() == Some(h));
            let clash = match (named, hosted) {
                (Some(j), _) => Some(format!(
                    "hostname \"{}\" is the name of machine \"{}\" (line {})",
                    shown(h),
                    shown(&pf.machine[j].name),
                    line_of(j, "name")
                )),
                (None, Some(j)) => Some(format!(
                    "hostname \"{}\" is already the hostname of machine \"{}\" (line {})",
                    shown(h),
                    shown(&pf.machine[j].name),
                    line_of(j, "hostname")
                )),
                (None, None) => None,
            };
            if let Some(msg) = clash {
                errors.push(err(
                    src,
                    &["machine", &idx, "hostname"],
                    msg,
                    "every machine's name and hostname must reach only that machine (/etc/hosts of every guest \
                     lists them): give it a hostname of its own, or remove `hostname` to use its name",
                ));
            }
        }
        if e.base_box.is_none() && pf.base_box.is_none() {
            errors.push(err(
                src,
                &["machine", &idx, "name"],
                format!("machine \"{}\" has no box", shown(&e.name)),
                "add a shared [box] table, or a [machine.box] table after this [[machine]]",
            ));
        }
    }

    // Addresses: explicit ones checked, the rest assigned from the 10th host address on.
    let mut ips: Vec<Option<Ipv4Addr>> = vec![None; pf.machine.len()];
    let mut used: BTreeMap<Ipv4Addr, usize> = BTreeMap::new();
    for (i, e) in pf.machine.iter().enumerate() {
        let Some(raw) = &e.ip else { continue };
        let at = ["machine", &i.to_string(), "ip"];
        let Ok(ip) = raw.parse::<Ipv4Addr>() else {
            errors.push(err(
                src,
                &at,
                format!("ip \"{}\" is not an IPv4 address", shown(raw)),
                "e.g. ip = \"10.77.0.11\"",
            ));
            continue;
        };
        if let Some(net) = subnet {
            let range = format!("{}/{}", net.network(), net.prefix);
            if !net.contains(ip) {
                errors.push(err(
                    src,
                    &at,
                    format!("ip {ip} is outside the subnet {range} of [network]"),
                    "pick an address inside [network] subnet, or change the subnet",
                ));
            } else if ip == net.network() || ip == net.broadcast() {
                let what = if ip == net.network() { "network" } else { "broadcast" };
                errors.push(err(
                    src,
                    &at,
                    format!("ip {ip} is the {what} address of {range}"),
                    "pick a host address between them",
                ));
            }
        }
        if let Some(first) = used.insert(ip, i) {
            errors.push(err(
                src,
                &at,
                format!("ip {ip} is already given to machine \"{}\"", shown(&pf.machine[first].name)),
                "give every machine its own address",
            ));
        }
        ips[i] = Some(ip);
    }
    if let Some(net) = subnet {
        let mut next = u32::from(net.network()) + 10;
        for slot in ips.iter_mut().filter(|s| s.is_none()) {
            while used.contains_key(&Ipv4Addr::from(next)) {
                next += 1;
            }
            let ip = Ipv4Addr::from(next);
            if !net.contains(ip) || ip == net.broadcast() {
                errors.push(err(
                    src,
                    &["network", "subnet"],
                    format!("subnet {} has no room left for the machines without `ip`", pf.network.subnet),
                    "give them an `ip`, or a larger subnet",
                ));
                break;
            }
            used.insert(ip, usize::MAX);
            *slot = Some(ip);
        }
    }

    // Host ports across machines: a clash is the same protocol and port on the same libvirt host, on
    // overlapping bind addresses (equal, or either a wildcard).
    struct Claim {
        machine: usize,
        host: String,
        ip: String,
        proto: Protocol,
        port: u16,
        what: &'static str,
    }
    let mut claimed: Vec<Claim> = Vec::new();
    for (i, e) in pf.machine.iter().enumerate() {
        let idx = i.to_string();
        let uri = e.libvirt.as_ref().and_then(|l| l.uri.as_deref()).unwrap_or(&pf.libvirt.uri);
        let host = libvirt_host(uri);
        let mut claims: Vec<(Claim, Vec<String>)> = Vec::new();
        if let Some(p) = e.ssh_port.filter(|p| *p != 0) {
            let c = Claim {
                machine: i,
                host: host.clone(),
                ip: pf.ssh.host_ip.clone(),
                proto: Protocol::Tcp,
                port: p,
                what: "its ssh_port",
            };
            claims.push((c, vec!["machine".into(), idx.clone(), "ssh_port".into()]));
        }
        for (j, f) in e.forwards.iter().enumerate() {
            let c = Claim {
                machine: i,
                host: host.clone(),
                ip: f.host_ip.clone(),
                proto: f.protocol,
                port: f.host,
                what: "a forward",
            };
            claims.push((
                c,
                vec!["machine".into(), idx.clone(), "forward".into(), j.to_string(), "host".into()],
            ));
        }
        for (c, at) in claims {
            let at: Vec<&str> = at.iter().map(String::as_str).collect();
            let clash = claimed.iter().find(|o| {
                o.machine != i
                    && o.proto == c.proto
                    && o.port == c.port
                    && o.host == c.host
                    && binds_overlap(&o.ip, &c.ip)
            });
            if let Some(o) = clash {
                errors.push(err(
                    src,
                    &at,
                    format!(
                        "host port {} is already used by machine \"{}\" ({} on {})",
                        c.port,
                        shown(&pf.machine[o.machine].name),
                        o.what,
                        if o.ip.is_empty() { "every address" } else { &o.ip }
                    ),
                    "every machine's forwards and ssh_port need host ports of their own (or another host_ip)",
                ));
            } else {
                claimed.push(c);
            }
        }
    }
    if !errors.is_empty() {
        return Err(ConfigError { diagnostics: sorted(errors) }.into());
    }

    let subnet = subnet.expect("checked above");
    let peers: Vec<Peer> = pf
        .machine
        .iter()
        .zip(&ips)
        .map(|(e, ip)| Peer {
            name: e.name.clone(),
            hostname: e.hostname.clone().unwrap_or_else(|| e.name.clone()),
            ip: ip.expect("assigned above"),
            profiles: e.profiles.clone(),
        })
        .collect();
    let d = &pf.defaults;
    let mut machines = Vec::new();
    for (i, e) in pf.machine.iter().enumerate() {
        let mut vars = pf.vars.clone();
        vars.extend(e.vars.clone());
        let mut health = pf.health.clone();
        health.extend(e.health.clone());
        let mp = e.provision.clone().unwrap_or_default();
        let cfg = Config {
            machine: MachineConfig {
                name: e.name.clone(),
                hostname: e.hostname.clone(),
                provider: e.provider.or(d.provider).unwrap_or_default(),
                cpus: e.cpus.or(d.cpus).unwrap_or_else(super::default_cpus),
                memory_mb: e.memory_mb.or(d.memory_mb).unwrap_or_else(super::default_memory),
                disk_gb: e.disk_gb.or(d.disk_gb).unwrap_or_else(super::default_disk),
                accel: e.accel.or(d.accel).unwrap_or_default(),
                cache_lab: e.cache_lab.or(d.cache_lab).unwrap_or(true),
            },
            base_box: e.base_box.clone().or_else(|| pf.base_box.clone()).unwrap_or_default(),
            ssh: SshConfig { host_port: e.ssh_port.unwrap_or(0), ..pf.ssh.clone() },
            forwards: e.forwards.clone(),
            provision: ProvisionConfig {
                source: mp.source.clone().unwrap_or_else(|| pf.provision.source.clone()),
                enabled: mp.enabled.or(pf.provision.enabled),
                ..pf.provision.clone()
            },
            vars,
            health,
            libvirt: LibvirtConfig {
                uri: e.libvirt.as_ref().and_then(|l| l.uri.clone()).unwrap_or_else(|| pf.libvirt.uri.clone()),
                pool: e
                    .libvirt
                    .as_ref()
                    .and_then(|l| l.pool.clone())
                    .unwrap_or_else(|| pf.libvirt.pool.clone()),
            },
            virtualbox: pf.virtualbox.clone(),
            path: path.to_path_buf(),
            source_text: Some(text.to_string()),
            member: Some(Member {
                index: i,
                primary: e.primary,
                ip: peers[i].ip,
                prefix: subnet.prefix,
                network: pf.network.clone(),
                profiles: e.profiles.clone(),
                peers: peers.clone(),
                own_box: e.base_box.is_some(),
                own_provision: e.provision.is_some(),
                own_libvirt: e.libvirt.is_some(),
                from_defaults: [
                    ("provider", e.provider.is_none() && d.provider.is_some()),
                    ("cpus", e.cpus.is_none() && d.cpus.is_some()),
                    ("memory_mb", e.memory_mb.is_none() && d.memory_mb.is_some()),
                    ("disk_gb", e.disk_gb.is_none() && d.disk_gb.is_some()),
                    ("accel", e.accel.is_none() && d.accel.is_some()),
                    ("cache_lab", e.cache_lab.is_none() && d.cache_lab.is_some()),
                ]
                .into_iter()
                .filter_map(|(k, inherited)| inherited.then_some(k))
                .collect(),
            }),
        };
        let local = check::local(&cfg, &cfg.source());
        for d in local.errors {
            if !errors.contains(&d) {
                errors.push(d);
            }
        }
        machines.push(cfg);
    }
    if !errors.is_empty() {
        return Err(ConfigError { diagnostics: sorted(errors) }.into());
    }
    Ok(machines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_parse_and_contain() {
        let n = Subnet::parse("10.77.0.0/24").unwrap();
        assert!(n.contains("10.77.0.5".parse().unwrap()));
        assert!(!n.contains("10.77.1.5".parse().unwrap()));
        assert_eq!(n.broadcast(), Ipv4Addr::new(10, 77, 0, 255));
        assert!(Subnet::parse("10.77.0.1/24").unwrap_err().contains("host bits"));
        assert!(Subnet::parse("10.77.0.0/31").is_err());
        assert!(Subnet::parse("10.77.0.0").is_err());
        assert!(Subnet::parse("10.0.0.0/8").unwrap().overlaps(&NAT_SUBNET));
    }

    #[test]
    fn a_machine_file_is_a_project_of_one_and_a_broken_one_still_names_its_machine() {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(repo.join("box-config.toml")).unwrap();
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("box-config.toml");
        std::fs::write(&path, &text).unwrap();
        let p = Project::load(&path).unwrap();
        assert!(p.solo().is_some());
        assert_eq!(p.machines.len(), 1);
        assert!(p.machines[0].member.is_none(), "its state dir stays .provisioner/");
        assert_eq!(p.one(None).unwrap().machine.name, p.machines[0].machine.name);

        // A value broken: the strict load refuses it, the lenient one keeps the machine and says why.
        let broken = text.replacen("[machine]", "[machine]\ncolour = \"red\"", 1);
        std::fs::write(&path, &broken).unwrap();
        assert!(Project::load(&path).is_err());
        let (p, invalid) = Project::load_lenient(&path, &|| None).unwrap();
        assert_eq!(p.machines.len(), 1);
        assert!(p.solo().is_some());
        assert!(format!("{:#}", invalid.expect("the validation error")).contains("box-config.toml:"));

        // A broken `[[machine]]` file is validated as a whole, leniently or not.
        std::fs::write(&path, "[[machine]]\nname = \"a\"\ncpus = \"many\"\n").unwrap();
        assert!(Project::load_lenient(&path, &|| None).is_err());
    }

    #[test]
    fn one_host_spelt_two_ways_is_one_host() {
        assert_eq!(libvirt_host("qemu+ssh://h/system"), libvirt_host("qemu+ssh://root@H:22/system"));
        assert_eq!(libvirt_host("qemu+ssh://h./system?keyfile=/k"), "h:22");
        assert_eq!(libvirt_host("qemu+libssh://u@[::1]/system"), "::1:22");
        assert_ne!(libvirt_host("qemu+ssh://h/system"), libvirt_host("qemu+ssh://h:2222/system"));
        assert_eq!(libvirt_host("qemu:///system"), "");
        assert_eq!(libvirt_host("qemu+unix:///system"), "");
    }
}
