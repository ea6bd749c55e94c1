//! Semantic validation of a parsed config: rules on single values and between keys ([`local`], run by every load),
//! and cross-references against the provision tree ([`cross`], run by `validate` and before `up`/`provision`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use anyhow::{Context, Result};

use super::diag::{Diagnostic, Source};
use super::hostnet::{self, HostNet};
use super::{check_libvirt_uri, Config, Protocol};
use crate::profile::Profile;
use crate::text::shown;

/// What validation found.
#[derive(Debug, Default)]
pub(super) struct Findings {
    pub errors: Vec<Diagnostic>,
    pub warnings: Vec<Diagnostic>,
}

impl Findings {
    fn error(&mut self, d: Diagnostic, hint: &str) {
        self.errors.push(d.with_hint(hint));
    }
    fn warn(&mut self, d: Diagnostic, hint: &str) {
        self.warnings.push(d.with_hint(hint));
    }
}

/// `[a-z0-9][a-z0-9-]{0,30}`
pub fn valid_machine_name(s: &str) -> bool {
    let b = s.as_bytes();
    (1..=31).contains(&b.len())
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

/// A Unix user name as Debian's adduser accepts it: `[a-z_][a-z0-9_-]{0,31}`.
pub fn valid_unix_user(s: &str) -> bool {
    let b = s.as_bytes();
    (1..=32).contains(&b.len())
        && (b[0].is_ascii_lowercase() || b[0] == b'_')
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_' || *c == b'-')
}

/// An RFC 1123 host name (dot-separated labels of a-z, 0-9, '-', not starting or ending with '-').
fn valid_hostname(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|l| {
            (1..=63).contains(&l.len())
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        })
}

fn url_scheme_ok(url: &str, schemes: &[&str]) -> bool {
    schemes
        .iter()
        .any(|s| url.strip_prefix(s).and_then(|r| r.strip_prefix("://")).is_some_and(|r| !r.is_empty()))
}

/// `host[:port]` as Docker names a registry: a host name or IPv4 address, an optional port.
fn valid_registry_host(s: &str) -> bool {
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (s, None),
    };
    port.map_or(true, |p| p.parse::<u16>().is_ok_and(|n| n > 0))
        && (valid_hostname(&host.to_ascii_lowercase()) || host.parse::<std::net::Ipv4Addr>().is_ok())
}

/// `[provision]` registry keys: mirrors and the package index are URLs, insecure registries and proxy prefixes
/// name a registry host, proxied registries are registry names.
fn check_registries(cfg: &Config, src: &Source, f: &mut Findings) {
    let p = &cfg.provision;
    for (i, m) in p.registry_mirrors.iter().enumerate() {
        let ok = url_scheme_ok(m, &["https", "http"])
            && super::url_host(m).is_some_and(|h| valid_registry_host(&h));
        if !ok {
            f.error(
                src.at_path(
                    &["provision", "registry_mirrors", &i.to_string()],
                    format!("`registry_mirrors` entry \"{}\" is not an http(s) URL of a registry", shown(m)),
                ),
                "write the mirror's URL, e.g. \"https://mirror.example.com\" (Docker uses it for Docker Hub images \
                 only; see registry_proxies for the others)",
            );
        }
    }
    for (i, h) in p.insecure_registries.iter().enumerate() {
        if !valid_registry_host(h) {
            f.error(
                src.at_path(
                    &["provision", "insecure_registries", &i.to_string()],
                    format!("`insecure_registries` entry \"{}\" is not a registry host[:port]", shown(h)),
                ),
                "write the host and port only, without scheme or path, e.g. \"registry.example:5000\"",
            );
        }
    }
    for (i, c) in p.ca_certs.iter().enumerate() {
        if c.as_os_str().is_empty() {
            f.error(
                src.at_path(&["provision", "ca_certs", &i.to_string()], "`ca_certs` entry is empty"),
                "name a PEM file, relative to box-config.toml (e.g. \"certs/corp-ca.pem\")",
            );
        }
    }
    for (registry, prefix) in &p.registry_proxies {
        let host = prefix.split('/').next().unwrap_or("");
        if registry != "docker.io"
            && !(registry.contains('.') || registry.contains(':') || registry == "localhost")
        {
            f.error(
                src.at_path(
                    &["provision", "registry_proxies", registry],
                    format!("`registry_proxies` key \"{}\" is not a registry name", shown(registry)),
                ),
                "use the registry an image names, e.g. \"docker.io\", \"gcr.io\", \"quay.io\"",
            );
        }
        if prefix.contains("://")
            || !valid_registry_host(host)
            || prefix.ends_with('/')
            || prefix.contains("//")
        {
            f.error(
                src.at_path(
                    &["provision", "registry_proxies", registry],
                    format!(
                        "`registry_proxies` prefix \"{}\" for {} is not REGISTRY[:PORT]/PATH",
                        shown(prefix),
                        shown(registry)
                    ),
                ),
                "write the proxy project's prefix without scheme, e.g. \"harbor.example.com/dockerhub-proxy\"",
            );
        }
    }
    if let Some(u) = &p.pip_index_url {
        if !url_scheme_ok(u, &["https", "http"]) {
            f.error(
                src.at_path(
                    &["provision", "pip_index_url"],
                    format!("`pip_index_url` \"{}\" is not an http(s) URL", shown(u)),
                ),
                "write the simple index's URL, e.g. \"https://nexus.example.com/repository/pypi/simple\"",
            );
        }
    }
}

/// Files the `[provision]` registry keys name: CA certificates exist, the credentials file exists and is private.
fn registry_files(cfg: &Config, src: &Source, f: &mut Findings) {
    let p = &cfg.provision;
    for (i, c) in p.ca_certs.iter().enumerate() {
        let path = cfg.resolve(c);
        if !c.as_os_str().is_empty() && !path.is_file() {
            f.error(
                src.at_path(
                    &["provision", "ca_certs", &i.to_string()],
                    format!("CA certificate {} does not exist", path.display()),
                ),
                "name a PEM file, relative to box-config.toml",
            );
        }
    }
    if let Some(c) = &p.registry_credentials {
        let path = cfg.resolve(c);
        let at = ["provision", "registry_credentials"];
        match std::fs::metadata(&path) {
            Err(_) => f.error(
                src.at_path(&at, format!("registry credentials file {} does not exist", path.display())),
                "create it (mode 0600) with [\"host:port\"] tables holding username and password",
            ),
            // No mode bits on Windows (platform::mode is None): the file's ACL is the user's business there.
            Ok(m) if crate::platform::mode(&m).is_some_and(|mode| mode & 0o077 != 0) => f.error(
                src.at_path(
                    &at,
                    format!(
                        "registry credentials file {} is readable by others (mode {:04o}); it holds passwords",
                        path.display(),
                        crate::platform::mode(&m).unwrap_or(0) & 0o777
                    ),
                ),
                &format!("chmod 600 {}", path.display()),
            ),
            Ok(_) => {}
        }
    }
}

/// Rules on the file alone.
pub(super) fn local(cfg: &Config, src: &Source) -> Findings {
    let mut f = Findings::default();
    let m = &cfg.machine;
    if !valid_machine_name(&m.name) {
        f.error(
            src.at_path(&["machine", "name"], format!("machine name \"{}\" is not allowed", shown(&m.name))),
            "use 1-31 characters from a-z, 0-9 and '-', starting with a letter or digit (e.g. \"lab\")",
        );
    }
    let itself = "in every guest it names the guest itself (127.0.0.1), so it cannot name a machine";
    if valid_machine_name(&m.name) && m.name.ends_with('-') {
        f.error(
            src.at_path(
                &["machine", "name"],
                format!(
                    "machine name \"{}\" ends with '-': it is also the guest's host name, which cannot end with '-'",
                    shown(&m.name)
                ),
            ),
            "end the name with a letter or digit (e.g. \"lab\")",
        );
    } else if m.name == "localhost" {
        f.error(
            src.at_path(&["machine", "name"], format!("machine name \"localhost\" is reserved: {itself}")),
            "pick another name (e.g. \"lab\")",
        );
    }
    if let Some(h) = &m.hostname {
        if h == "localhost" {
            f.error(
                src.at_path(
                    &["machine", "hostname"],
                    format!("hostname \"localhost\" is reserved: {itself}"),
                ),
                "pick another hostname, or remove it to use the machine's name",
            );
        } else if !valid_hostname(h) {
            f.error(
                src.at_path(&["machine", "hostname"], format!("hostname \"{}\" is not a valid host name", shown(h))),
                "use dot-separated labels of a-z, 0-9 and '-' (e.g. \"lab.local\"), or remove it to use the name",
            );
        }
    }
    use super::limits::*;
    for (key, value, min, max, unit) in [
        ("cpus", u64::from(m.cpus), CPUS_MIN, CPUS_MAX, ""),
        ("memory_mb", m.memory_mb, MEMORY_MB_MIN, MEMORY_MB_MAX, " MiB"),
        ("disk_gb", m.disk_gb, DISK_GB_MIN, DISK_GB_MAX, " GiB"),
    ] {
        if !(min..=max).contains(&value) {
            f.error(
                src.at_path(
                    &["machine", key],
                    format!("`{key}` must be {}, found {value}", range_text(min, max, unit)),
                ),
                "the lab itself wants cpus = 2, memory_mb = 4096, disk_gb = 20",
            );
        }
    }
    check_box(cfg, src, &mut f);
    check_network(cfg, src, &mut f);
    check_registries(cfg, src, &mut f);
    if !valid_unix_user(&cfg.ssh.user) {
        f.error(
            src.at_path(
                &["ssh", "user"],
                format!("`user` \"{}\" in [ssh] is not a valid Unix user name", shown(&cfg.ssh.user)),
            ),
            "use lowercase letters, digits, '_' and '-', starting with a letter or '_', at most 32 characters",
        );
    }
    if !(SECS_MIN..=SECS_MAX).contains(&cfg.ssh.connect_timeout_secs) {
        f.error(
            src.at_path(
                &["ssh", "connect_timeout_secs"],
                format!(
                    "`connect_timeout_secs` must be {}, found {}",
                    range_text(SECS_MIN, SECS_MAX, " s"),
                    cfg.ssh.connect_timeout_secs
                ),
            ),
            "a TCG guest needs about 60 s to reach SSH; the default is 600",
        );
    }
    let gp = &cfg.provision.guest_path;
    // Resolved as the guest would (without links): `.` is dropped, `..` goes up, and `/..` is `/`.
    let mut resolved: Vec<&str> = Vec::new();
    for c in gp.split('/').filter(|c| !c.is_empty() && *c != ".") {
        if c == ".." {
            resolved.pop();
        } else {
            resolved.push(c);
        }
    }
    let dotted = gp.split('/').any(|c| c == "." || c == "..");
    let gp_problem = if !gp.starts_with('/') || gp.trim_end_matches('/').is_empty() {
        Some(format!("`guest_path` must be an absolute directory below /, found \"{}\"", shown(gp)))
    } else if dotted && resolved.is_empty() {
        Some(format!(
            "`guest_path` \"{}\" is the guest's / once `.` and `..` are resolved: the provision tree would be \
             unpacked over the guest's root",
            shown(gp)
        ))
    } else if dotted {
        Some(format!(
            "`guest_path` \"{}\" has a `.` or `..` component; write the directory it means: \"/{}\"",
            shown(gp),
            shown(&resolved.join("/"))
        ))
    } else {
        None
    };
    if let Some(msg) = gp_problem {
        f.error(
            src.at_path(&["provision", "guest_path"], msg),
            "use a dedicated directory such as \"/opt/provision\"",
        );
    }
    for (name, p) in &cfg.health {
        let at = |key: &str, msg: String| src.at_path(&["health", name, key], msg);
        if !p.path.starts_with('/') {
            f.error(
                at(
                    "path",
                    format!(
                        "health probe \"{}\": `path` must start with '/', found \"{}\"",
                        shown(name),
                        shown(&p.path)
                    ),
                ),
                "e.g. path = \"/health\"",
            );
        }
        if p.port == 0 {
            f.error(
                at("port", format!("health probe \"{}\": `port` must be 1-65535", shown(name))),
                "set the guest port the service listens on",
            );
        }
        if !(100..=599).contains(&p.expect_status) {
            f.error(
                at(
                    "expect_status",
                    format!(
                        "health probe \"{}\": `expect_status` {} is not an HTTP status",
                        shown(name),
                        p.expect_status
                    ),
                ),
                "use 100-599, usually 200",
            );
        }
        if !(SECS_MIN..=SECS_MAX).contains(&p.timeout_secs) {
            f.error(
                at(
                    "timeout_secs",
                    format!(
                        "health probe \"{}\": `timeout_secs` must be {}, found {}",
                        shown(name),
                        range_text(SECS_MIN, SECS_MAX, " s"),
                        p.timeout_secs
                    ),
                ),
                "the default is 10",
            );
        }
    }
    if let Err(p) = check_libvirt_uri(&cfg.libvirt.uri) {
        f.error(
            src.at_path(
                &["libvirt", "uri"],
                format!("`uri` \"{}\" in [libvirt] {}", shown(&cfg.libvirt.uri), p.message),
            ),
            &p.hint,
        );
    }
    let pool = &cfg.libvirt.pool;
    let pool_ok = !pool.is_empty()
        && pool.len() <= 64
        && !pool.starts_with(['-', '.'])
        && pool.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !pool_ok {
        f.error(
            src.at_path(&["libvirt", "pool"], format!("`pool` \"{}\" in [libvirt] is not a valid pool name", shown(pool))),
            "use 1-64 letters, digits, `-`, `_` or `.`, not starting with `-` or `.`; the default is \"provisioner\"",
        );
    }
    f
}

const SOURCES: &str = "image, url (+ sha256), vagrant, [box.debian]";

fn check_box(cfg: &Config, src: &Source, f: &mut Findings) {
    let b = &cfg.base_box;
    let set: Vec<&str> = [
        ("image", b.image.is_some()),
        ("url", b.url.is_some()),
        ("vagrant", b.vagrant.is_some()),
        ("debian", b.debian.is_some()),
    ]
    .into_iter()
    .filter_map(|(k, on)| on.then_some(k))
    .collect();
    let source_name = |k: &str| if k == "debian" { "[box.debian]".to_string() } else { format!("`{k}`") };
    match set.as_slice() {
        [] => f.error(
            src.at_path(&["box"], format!("no box source in [box]; set exactly one of: {SOURCES}")),
            "the shipped box-config.toml builds one from the Debian mirror with [box.debian]",
        ),
        [_] => {}
        [first, second, ..] => f.error(
            src.at_path(
                &["box", second],
                format!(
                    "two box sources: {} and {}; keep exactly one of: {SOURCES}",
                    source_name(first),
                    source_name(second)
                ),
            ),
            "remove all but one box source",
        ),
    }
    match (&b.url, &b.sha256) {
        (Some(url), sha) => {
            if !url_scheme_ok(url, &["http", "https", "file"]) {
                f.error(
                    src.at_path(
                        &["box", "url"],
                        format!(
                            "`url` \"{}\" in [box] is not an http://, https:// or file:// URL",
                            shown(url)
                        ),
                    ),
                    "for a file on this machine use `image` (or file:///absolute/path)",
                );
            }
            // A Vagrant catalog (metadata.json) carries the checksum of each box it lists.
            let catalog = url.split(['?', '#']).next().unwrap_or(url).ends_with(".json");
            match sha {
                None if catalog => {}
                None => f.error(
                    src.at_path(
                        &["box", "url"],
                        "`url` in [box] needs `sha256` (the download's SHA-256, 64 hex digits)",
                    ),
                    "compute it with `sha256sum FILE` and add sha256 = \"...\"",
                ),
                Some(s) if s.len() != 64 || !s.bytes().all(|c| c.is_ascii_hexdigit()) => f.error(
                    src.at_path(
                        &["box", "sha256"],
                        format!(
                            "`sha256` must be 64 hexadecimal digits, found {} characters \"{}\"",
                            s.chars().count(),
                            shown(s)
                        ),
                    ),
                    "copy the SHA-256 (not SHA-1 or SHA-512) published beside the image, or run `sha256sum FILE`",
                ),
                Some(_) => {}
            }
        }
        (None, Some(_)) => f.error(
            src.at_path(&["box", "sha256"], "`sha256` in [box] is only used with `url`"),
            "remove it, or add the `url` it checks",
        ),
        (None, None) => {}
    }
    let catalog =
        b.url.as_deref().is_some_and(|u| u.split(['?', '#']).next().unwrap_or(u).ends_with(".json"));
    if b.version.is_some() && !catalog {
        f.error(
            src.at_path(
                &["box", "version"],
                "`version` in [box] needs `url` to name a Vagrant catalog (metadata.json)",
            ),
            "set url to the catalog (e.g. https://HOST/NAME/metadata.json), or remove `version`",
        );
    }
    if let Some(d) = &b.debian {
        if !url_scheme_ok(&d.mirror, &["http", "https", "file"]) {
            f.error(
                src.at_path(
                    &["box", "debian", "mirror"],
                    format!("`mirror` \"{}\" is not an http://, https:// or file:// URL", shown(&d.mirror)),
                ),
                "e.g. mirror = \"http://deb.debian.org/debian\"",
            );
        }
        if d.suite.is_empty()
            || !d.suite.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        {
            f.error(
                src.at_path(
                    &["box", "debian", "suite"],
                    format!("`suite` \"{}\" is not a Debian suite name", shown(&d.suite)),
                ),
                "e.g. suite = \"bookworm\"",
            );
        }
        for (i, p) in d.packages.iter().enumerate() {
            let ok = p.len() >= 2
                && p.as_bytes()[0].is_ascii_alphanumeric()
                && p.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"+-.".contains(&c));
            if !ok {
                f.error(
                    src.at_path(
                        &["box", "debian", "packages", &i.to_string()],
                        format!("\"{}\" is not a Debian package name", shown(p)),
                    ),
                    "package names are lowercase letters, digits, '+', '-' and '.'",
                );
            }
        }
    }
}

fn check_network(cfg: &Config, src: &Source, f: &mut Findings) {
    // (protocol, host port) -> (where, label) of its first use.
    let mut used: BTreeMap<(Protocol, u16), (Option<usize>, String)> = BTreeMap::new();
    let ssh_ip = ["ssh", "host_ip"];
    check_ip(&cfg.ssh.host_ip, &ssh_ip, "the SSH forward", src, f);
    // In a `[[machine]]` file the SSH port is the machine's `ssh_port` and its forwards are [[machine.forward]].
    let (ssh_key, forward_table) = match cfg.member {
        Some(_) => ("its ssh_port", "[[machine.forward]]"),
        None => ("[ssh] host_port", "[[forward]]"),
    };
    if cfg.ssh.host_port != 0 {
        let written = src.written(&["ssh", "host_port"]);
        let (line, label) = if written {
            (src.at_path(&["ssh", "host_port"], "").line, ssh_key.to_string())
        } else {
            (None, format!("{ssh_key} (the SSH forward's default port)"))
        };
        used.insert((Protocol::Tcp, cfg.ssh.host_port), (line, label));
    }
    for (i, fw) in cfg.forwards.iter().enumerate() {
        let idx = i.to_string();
        let label = match &fw.name {
            Some(n) => format!("{forward_table} #{} (\"{}\")", i + 1, shown(n)),
            None => format!("{forward_table} #{}", i + 1),
        };
        for (key, port) in [("guest", fw.guest), ("host", fw.host)] {
            if port == 0 {
                f.error(
                    src.at_path(&["forward", &idx, key], format!("port 0 in {label} `{key}`")),
                    "use a port from 1 to 65535",
                );
            }
        }
        check_ip(&fw.host_ip, &["forward", &idx, "host_ip"], &label, src, f);
        if fw.host == 0 {
            continue;
        }
        let here = src.at_path(&["forward", &idx, "host"], "");
        match used.get(&(fw.protocol, fw.host)) {
            Some((line, first)) => {
                let at = line.map(|l| format!(" (line {l})")).unwrap_or_default();
                f.error(
                    Diagnostic {
                        message: format!("host port {} of {label} is already used by {first}{at}", fw.host),
                        ..here
                    },
                    &format!(
                        "give every forward (and {}) its own host port",
                        ssh_key.trim_start_matches("its ")
                    ),
                );
            }
            None => {
                used.insert((fw.protocol, fw.host), (here.line, label));
            }
        }
    }
}

fn check_ip(ip: &str, path: &[&str], what: &str, src: &Source, f: &mut Findings) {
    match ip.parse::<IpAddr>() {
        Err(_) => f.error(
            src.at_path(path, format!("`host_ip` \"{}\" of {what} is not an IP address", shown(ip))),
            "use 127.0.0.1 (host names are not accepted)",
        ),
        Ok(a) if !a.is_loopback() => f.warn(
            src.at_path(
                path,
                format!(
                    "{what} listens on {a}, not on loopback: other machines can reach the guest through it"
                ),
            ),
            "use 127.0.0.1 unless you mean to expose the port",
        ),
        Ok(_) => {}
    }
}

/// Private ranges offered in the hint when the subnet overlaps a network of this host.
const SPARE_SUBNETS: &[(&str, std::net::Ipv4Addr, u8)] = &[
    ("10.77.0.0/24", std::net::Ipv4Addr::new(10, 77, 0, 0), 24),
    ("10.78.0.0/24", std::net::Ipv4Addr::new(10, 78, 0, 0), 24),
    ("172.30.77.0/24", std::net::Ipv4Addr::new(172, 30, 77, 0), 24),
    ("192.168.177.0/24", std::net::Ipv4Addr::new(192, 168, 177, 0), 24),
];

/// The private subnet of a `[[machine]]` file against the networks of the host the machine runs on: an overlap
/// with a network of this host is an error (the guests would send that network's traffic into the private
/// segment); a machine on a remote host gets a warning, since that host's networks are not known here.
pub(super) fn host_networks(cfg: &Config, src: &Source, host: Result<&[HostNet], String>, f: &mut Findings) {
    let Some(m) = &cfg.member else { return };
    let subnet = &m.network.subnet;
    let at = ["network", "subnet"];
    if let Some(remote) = cfg.remote_libvirt_host() {
        f.warn(
            src.at_path(
                &["libvirt", "uri"],
                format!(
                    "machine \"{}\" runs on {}, whose networks are not known here: none of them may overlap the \
                     private subnet {subnet}",
                    shown(&cfg.machine.name),
                    shown(&remote)
                ),
            ),
            &format!("list them on {} with `ip -4 addr`; if one overlaps, pick another [network] subnet", shown(&remote)),
        );
        return;
    }
    match host {
        Err(e) => f.warn(
            src.at_path(
                &at,
                format!("this host's networks could not be read ({e}); subnet {subnet} was not checked against them"),
            ),
            "make sure no network of this host (`ip -4 addr`) overlaps [network] subnet",
        ),
        Ok(nets) => {
            let hits = hostnet::overlapping(m.ip, m.prefix, nets);
            if hits.is_empty() {
                return;
            }
            let list: Vec<String> = hits.iter().map(|h| h.describe()).collect();
            let hint = match hostnet::free_subnet(nets, SPARE_SUBNETS) {
                Some(free) => format!("pick a range no network of this host uses, e.g. subnet = \"{free}\""),
                None => SUBNET_HINT.to_string(),
            };
            f.error(
                src.at_path(
                    &at,
                    format!(
                        "subnet {subnet} in [network] overlaps a network this host is on ({}): the guests would send \
                         that network's traffic into the private segment",
                        list.join(", ")
                    ),
                ),
                &hint,
            );
        }
    }
}

/// Compose file names in the order docker compose looks for them.
pub const COMPOSE_FILES: &[&str] =
    &["compose.yaml", "compose.yml", "docker-compose.yml", "docker-compose.yaml"];

/// Context of a render error found while validating.
pub fn render_failed(source: &std::path::Path) -> String {
    format!("the provision tree {} does not render (validate renders it as `up` would)", source.display())
}

/// The hint of every subnet refusal.
pub(crate) const SUBNET_HINT: &str =
    "pick a range of 10.0.0.0/8, 172.16.0.0/12 or 192.168.0.0/16 that no network of the host uses, e.g. \
     \"10.77.0.0/24\"";

/// The provision tree's compose file as the tree renders (its path in the tree and its bytes), or None when the tree
/// renders none. Rendering is the caller's (the render module sits above config): see `crate::validate`.
pub type ComposeOf<'a> = dyn Fn() -> Result<Option<(String, Vec<u8>)>> + 'a;

/// Cross-references: the provision dir exists and renders, every forwarded port is published by the rendered
/// compose file, every health probe's port is forwarded. Render failures are returned as errors (they name the
/// template, line and column); findings about the config come back in [`Findings`].
pub(super) fn cross(cfg: &Config, src: &Source, profile: &Profile, compose: &ComposeOf) -> Result<Findings> {
    let mut f = Findings::default();
    registry_files(cfg, src, &mut f);
    if cfg.member.is_some() {
        let nets = hostnet::read();
        host_networks(cfg, src, nets.as_deref().map_err(|e| format!("{e:#}")), &mut f);
    }
    for (name, probe) in cfg.health_probes(profile) {
        if cfg.host_addr_for(probe.port).is_some() {
            continue;
        }
        let msg = format!(
            "health probe \"{}\" uses guest port {}, which is not forwarded",
            shown(&name),
            probe.port
        );
        let hint = format!("add a [[forward]] with guest = {}, or change [health.{name}] port", probe.port);
        if cfg.health.contains_key(&name) {
            f.error(src.at_path(&["health", &name, "port"], msg), &hint);
        } else if cfg.member.is_none() {
            // (A machine of a `[[machine]]` file runs part of the lab: the defaults of services it does not run
            // are never probed, since health asks its compose file which services it has.)
            f.warn(
                src.at_path(&["forward"], format!("{msg} (lab default); it will be reported unreachable")),
                &hint,
            );
        }
    }
    if cfg.provision.enabled == Some(false) {
        return Ok(f);
    }
    let source = cfg.resolve(&cfg.provision.source);
    let layers = [
        (
            "base",
            cfg.provision.base.as_ref(),
            "set [provision] base to the template tree this one builds on (relative to box-config.toml), or \
             remove it",
        ),
        (
            "source",
            Some(&cfg.provision.source),
            "run from the directory holding the lab's provision/ tree, or set [provision] source to it",
        ),
    ];
    for (key, dir, hint) in layers {
        let Some(dir) = dir.map(|d| cfg.resolve(d)) else { continue };
        if !dir.is_dir() {
            f.error(
                src.at_path(
                    &["provision", key],
                    format!("provision directory {} does not exist", dir.display()),
                ),
                hint,
            );
            return Ok(f);
        }
    }
    // The position of `source` when the file writes it (a tree such as /etc fails for its own reasons).
    let at = ["provision", "source"];
    let written = src.written(&at).then(|| format!("{}: ", src.at_path(&at, "").location()));
    let compose =
        compose().with_context(|| format!("{}{}", written.unwrap_or_default(), render_failed(&source)))?;
    let Some((compose_file, compose_contents)) = compose else {
        f.warn(
            src.at_path(
                &["provision", "source"],
                format!(
                    "{} renders no docker-compose.yml; forwarded ports were not checked",
                    source.display()
                ),
            ),
            "a provision tree is expected to hold docker-compose.yml(.hbs)",
        );
        return Ok(f);
    };
    let compose_path = shown(&source.join(&compose_file).display().to_string());
    let doc: serde_norway::Value = serde_norway::from_slice(&compose_contents).map_err(|e| {
        let at = e.location().map(|l| format!(":{}:{}", l.line(), l.column())).unwrap_or_default();
        anyhow::anyhow!("{compose_path}{at} (rendered): not valid YAML: {e}\nhint: fix the compose template, or a [vars] value it \
             inserts (a value with `:` or `#` needs quotes around it in the template)")
    })?;
    let published = published_ports(&doc);
    let host_net = host_network_services(&doc);
    for (i, fw) in cfg.forwards.iter().enumerate() {
        if fw.guest == 0 || published.contains(&(fw.protocol, fw.guest)) {
            continue;
        }
        let label = fw.name.as_deref().map(|n| format!(" (\"{}\")", shown(n))).unwrap_or_default();
        let msg = format!(
            "forwarded guest port {}{label} is not published by any service in {compose_path}",
            fw.guest
        );
        let at = src.at_path(&["forward", &i.to_string(), "guest"], msg);
        let hint = format!(
            "publish it in the compose file (\"127.0.0.1:{0}:{0}\") or remove this [[forward]]",
            fw.guest
        );
        if host_net.is_empty() {
            f.error(at, &hint);
        } else {
            let svc = host_net.join(", ");
            f.warn(
                Diagnostic {
                    message: format!("{} (unless {svc} on the host network listens on it)", at.message),
                    ..at
                },
                &hint,
            );
        }
    }
    Ok(f)
}

/// (protocol, port on the guest) of every port a compose file publishes.
pub fn published_ports(doc: &serde_norway::Value) -> BTreeSet<(Protocol, u16)> {
    let mut out = BTreeSet::new();
    let Some(services) = doc.get("services").and_then(|s| s.as_mapping()) else { return out };
    for svc in services.values() {
        let Some(ports) = svc.get("ports").and_then(|p| p.as_sequence()) else { continue };
        for p in ports {
            let (published, proto) = match p {
                serde_norway::Value::String(s) => {
                    let (spec, proto) = s.rsplit_once('/').unwrap_or((s, "tcp"));
                    let parts: Vec<&str> = spec.rsplitn(3, ':').collect();
                    // "C" alone publishes on a random port; "[IP:]H:C" publishes H.
                    (if parts.len() >= 2 { Some(parts[1].to_string()) } else { None }, proto.to_string())
                }
                serde_norway::Value::Mapping(m) => (
                    m.get("published").map(|v| match v {
                        serde_norway::Value::Number(n) => n.to_string(),
                        other => other.as_str().unwrap_or_default().to_string(),
                    }),
                    m.get("protocol").and_then(|v| v.as_str()).unwrap_or("tcp").to_string(),
                ),
                _ => (None, String::new()),
            };
            let proto = if proto == "udp" { Protocol::Udp } else { Protocol::Tcp };
            let Some(published) = published else { continue };
            let (lo, hi) = published.split_once('-').unwrap_or((&published, &published));
            if let (Ok(lo), Ok(hi)) = (lo.parse::<u16>(), hi.parse::<u16>()) {
                out.extend((lo..=hi).map(|port| (proto, port)));
            }
        }
    }
    out
}

fn host_network_services(doc: &serde_norway::Value) -> Vec<String> {
    let Some(services) = doc.get("services").and_then(|s| s.as_mapping()) else { return vec![] };
    services
        .iter()
        .filter(|(_, s)| s.get("network_mode").and_then(|m| m.as_str()) == Some("host"))
        .filter_map(|(k, _)| k.as_str().map(str::to_string))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(valid_machine_name("lab"));
        assert!(valid_machine_name("0-a"));
        assert!(!valid_machine_name("-a"));
        assert!(!valid_machine_name("Lab"));
        assert!(!valid_machine_name(&"a".repeat(32)));
        assert!(valid_machine_name(&"a".repeat(31)));
        assert!(valid_unix_user("_svc-1"));
        assert!(!valid_unix_user("1abc"));
        assert!(!valid_unix_user("Bob"));
    }

    #[test]
    fn compose_ports_short_and_long_syntax() {
        let doc: serde_norway::Value = serde_norway::from_str(
            r#"
services:
  a: {ports: ["127.0.0.1:8000:8000", "9000-9001:9000-9001", "7000", "[::1]:6000:6001/udp", "5000:5000/tcp"]}
  b: {ports: [{target: 80, published: "4000", protocol: tcp}, {target: 81, published: 4001}, {target: 82}]}
  c: {image: x}
"#,
        )
        .unwrap();
        let got: Vec<_> = published_ports(&doc).into_iter().collect();
        use Protocol::*;
        assert_eq!(
            got,
            vec![(Tcp, 4000), (Tcp, 4001), (Tcp, 5000), (Tcp, 8000), (Tcp, 9000), (Tcp, 9001), (Udp, 6000)]
        );
    }
}
