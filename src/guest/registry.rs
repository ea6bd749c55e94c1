//! Registries in the guest: `/etc/docker/daemon.json` (`registry-mirrors`, `insecure-registries`) and
//! `/etc/docker/certs.d/HOST/ca.crt` written before the first pull (Docker reloaded only when daemon.json changed),
//! `docker login --password-stdin` from a credentials file kept out of the config, the `auto` image mode's probe,
//! and the image digests registry mode records so a rebuild pulls the same bytes (`.provisioner/images.json`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::config::{Config, ImageSource, ProvisionConfig};
use crate::ssh::{shell_quote, Session};

/// How long `auto` waits for the registries to answer.
pub const PROBE_SECS: u64 = 5;

/// The guest's Docker config file.
pub const DAEMON_JSON: &str = "/etc/docker/daemon.json";

/// `daemon.json` with the config's registry keys set in `existing` (keys the config leaves empty removed, every
/// other key kept): None when nothing changes (no write, no reload). Exact text: pretty JSON, keys sorted, LF.
pub fn merge_daemon_json(existing: Option<&str>, p: &ProvisionConfig) -> Result<Option<String>> {
    let mut doc: serde_json::Map<String, serde_json::Value> = match existing.map(str::trim) {
        None | Some("") => serde_json::Map::new(),
        Some(text) => serde_json::from_str(text).with_context(|| {
            format!(
                "the guest's {DAEMON_JSON} is not a JSON object\nhint: fix or remove it \
                 (`provisioner ssh -c 'sudo cat {DAEMON_JSON}'`), then run `provisioner provision`"
            )
        })?,
    };
    let before = doc.clone();
    for (key, list) in
        [("registry-mirrors", &p.registry_mirrors), ("insecure-registries", &p.insecure_registries)]
    {
        if list.is_empty() {
            doc.remove(key);
        } else {
            doc.insert(key.to_string(), serde_json::json!(list));
        }
    }
    if doc == before && existing.is_some() {
        return Ok(None);
    }
    if doc.is_empty() && existing.is_none() {
        return Ok(None);
    }
    let sorted: BTreeMap<_, _> = doc.into_iter().collect();
    Ok(Some(serde_json::to_string_pretty(&sorted)? + "\n"))
}

/// One registry's login, from the credentials file.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Login {
    pub username: String,
    password: String,
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Login {{ username: {:?}, password: <hidden> }}", self.username)
    }
}

/// The credentials file: `["HOST[:PORT]"]` tables with `username` and `password`. It must be private (no group
/// or other permission bits): its contents are never printed, its parse errors name only a line and column.
pub fn load_credentials(path: &Path) -> Result<BTreeMap<String, Login>> {
    let shown = path.display();
    let meta = std::fs::metadata(path).with_context(|| {
        format!(
            "registry credentials file {shown} cannot be read\nhint: create it (mode 0600) or fix [provision] \
             registry_credentials in box-config.toml"
        )
    })?;
    // No mode bits on Windows (platform::mode is None): nothing to check there.
    let mode = crate::platform::mode(&meta).unwrap_or(0o600) & 0o777;
    if mode & 0o077 != 0 {
        bail!(
            "registry credentials file {shown} is readable by others (mode {mode:04o}); it holds passwords\n\
             hint: chmod 600 {shown}"
        );
    }
    let bytes = std::fs::read(path).with_context(|| format!("read {shown}"))?;
    let text = std::str::from_utf8(&bytes).map_err(|_| {
        anyhow::anyhow!("registry credentials file {shown} is not UTF-8\nhint: save it as UTF-8")
    })?;
    toml::from_str(text).map_err(|e: toml::de::Error| {
        // Never the error's own display: it quotes the offending line, which may hold a password.
        let at = e.span().map_or(String::new(), |s| {
            let (line, col) = crate::config::line_col(text, s.start);
            format!(":{line}:{col}")
        });
        anyhow::anyhow!(
            "{shown}{at}: {}\nhint: write one table per registry: [\"host:port\"] with username = \"...\" and \
             password = \"...\"",
            e.message().trim()
        )
    })
}

/// What `auto` found: the mode to run and why (for the images phase line, `health` and the cached lab).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resolved {
    pub mode: ImageSource,
    pub reason: String,
}

/// `.provisioner/images.json`: the mode that last ran and the digest every pulled image resolved to.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ImagesRecord {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved: Option<Resolved>,
    /// Image reference as the compose file names it -> `REPO@sha256:...` it was pulled as.
    #[serde(default)]
    pub digests: BTreeMap<String, String>,
}

impl ImagesRecord {
    pub fn path(state_root: &Path) -> PathBuf {
        state_root.join("images.json")
    }
    pub fn load(state_root: &Path) -> ImagesRecord {
        std::fs::read(Self::path(state_root))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }
    pub fn save(&self, state_root: &Path) -> Result<()> {
        std::fs::create_dir_all(state_root).with_context(|| format!("create {}", state_root.display()))?;
        crate::machine::write_private(&Self::path(state_root), &serde_json::to_vec_pretty(self)?, 0o600)
    }
}

/// The state dir's root for a config.
pub fn state_root(cfg: &Config) -> PathBuf {
    crate::machine::StateDir::for_config(cfg).root
}

/// Where `auto` asks: the registry of every image (through its proxy), Docker Hub's images through the mirrors
/// when there are any.
pub fn probe_targets(p: &ProvisionConfig, images: &[String]) -> Vec<String> {
    let mut targets = Vec::new();
    for image in images {
        let (registry, _) = crate::config::split_image(image);
        let hosts: Vec<String> = if registry == "docker.io" {
            if p.registry_mirrors.is_empty() {
                vec!["registry-1.docker.io".to_string()]
            } else {
                p.registry_mirrors.iter().filter_map(|m| crate::config::url_host(m)).collect()
            }
        } else {
            vec![registry.to_string()]
        };
        for h in hosts {
            if !targets.contains(&h) {
                targets.push(h);
            }
        }
    }
    targets
}

/// The shell run in the guest for the probe: every target's `/v2/` in parallel, each line `HOST CODE SECONDS`
/// (code 000: no answer). Any HTTP status counts as an answer (401: the registry wants a login).
///
/// A name the guest cannot resolve, with no proxy in the environment, cannot answer curl either: `getent` (a
/// small program, libc only) says so and curl is not started (`HOST 000 0 unresolved`). Offline, that is the
/// answer every time, and a curl start cost 0.2 s of a restored guest's time under TCG (stop 30).
pub fn probe_script(p: &ProvisionConfig, targets: &[String], secs: u64) -> String {
    let mut s = String::from(
        "command -v curl >/dev/null || { echo 'no-curl'; exit 0; }\n\
         __proxied=${https_proxy:-}${HTTPS_PROXY:-}${http_proxy:-}${HTTP_PROXY:-}${all_proxy:-}${ALL_PROXY:-}\n\
         __unresolved() { [ -z \"$__proxied\" ] && command -v getent >/dev/null && ! getent hosts \"$1\" >/dev/null 2>&1; }\n",
    );
    for t in targets {
        let q = shell_quote(t);
        let insecure = p.insecure_registries.contains(t);
        let scheme_tries = if insecure { vec!["https", "http"] } else { vec!["https"] };
        let mut tries = Vec::new();
        for scheme in scheme_tries {
            let ca = format!("/etc/docker/certs.d/{t}/ca.crt");
            let ca_arg = if insecure {
                "-k".to_string()
            } else {
                format!("$( [ -f {0} ] && echo --cacert {0} )", shell_quote(&ca))
            };
            tries.push(format!(
                "curl -s -o /dev/null -w '%{{http_code}} %{{time_total}}' --max-time {secs} {ca_arg} \
                 {scheme}://{t}/v2/"
            ));
        }
        let name = shell_quote(host_name(t));
        s.push_str(&format!(
            "( if __unresolved {name}; then echo {q} 000 0 unresolved; else r=$({} ); echo {q} ${{r:-000 {secs}}}; fi ) &\n",
            tries.join(" || ")
        ));
    }
    s.push_str("wait\n");
    s
}

/// A registry target's host name, without its port (`[::1]:5000` → `::1`).
fn host_name(target: &str) -> &str {
    if let Some(rest) = target.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match target.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => target,
    }
}

/// Judge the probe's output: registry mode when every target answered.
pub fn judge_probe(output: &str, targets: &[String], secs: u64, unavailable: &[String]) -> Resolved {
    let fallback = |why: String| Resolved {
        mode: ImageSource::Debian,
        reason: if unavailable.is_empty() {
            format!("{why}: debian mode")
        } else {
            format!("{why}: debian mode, {} unavailable", and_list(unavailable))
        },
    };
    if output.lines().any(|l| l.trim() == "no-curl") {
        return fallback("no curl in the guest to ask the registry".to_string());
    }
    let mut slowest = 0.0f64;
    for t in targets {
        let line = output.lines().find(|l| l.split_whitespace().next() == Some(t.as_str()));
        let mut parts = line.map(|l| l.split_whitespace().skip(1)).into_iter().flatten();
        let code: u16 = parts.next().and_then(|c| c.parse().ok()).unwrap_or(0);
        let took: f64 = parts.next().and_then(|c| c.parse().ok()).unwrap_or(secs as f64);
        if code == 0 {
            return fallback(match parts.next() {
                Some("unresolved") => format!("no answer from {t}: its name does not resolve in the guest"),
                _ => format!("no answer from {t} in {secs} s"),
            });
        }
        slowest = slowest.max(took);
    }
    if targets.is_empty() {
        return Resolved { mode: ImageSource::Registry, reason: "no image to pull".to_string() };
    }
    Resolved {
        mode: ImageSource::Registry,
        reason: format!("registry answered in {slowest:.1} s ({})", targets.join(", ")),
    }
}

fn and_list(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [rest @ .., last] => format!("{} and {last}", rest.join(", ")),
    }
}

/// The command that reads the guest's daemon.json (before [`apply`] decides whether it changes).
pub fn read_daemon_json_command() -> String {
    format!("sudo -n cat {DAEMON_JSON}")
}

/// Put the config's registry settings into the guest: CA certificates (per registry host), daemon.json (Docker
/// reloaded when it changed), logins. Returns a summary ("" when the config has none).
pub fn apply(cfg: &Config, ssh: &Session, login: bool) -> Result<String> {
    let p = &cfg.provision;
    let mut done = Vec::new();
    let mut hosts = p.registry_hosts();
    let creds = match &p.registry_credentials {
        Some(path) => load_credentials(&cfg.resolve(path))?,
        None => BTreeMap::new(),
    };
    for h in creds.keys() {
        if !hosts.contains(h) {
            hosts.push(h.clone());
        }
    }
    if !p.ca_certs.is_empty() && !hosts.is_empty() {
        let mut bundle = Vec::new();
        for c in &p.ca_certs {
            let path = cfg.resolve(c);
            let pem = std::fs::read(&path).with_context(|| {
                format!(
                    "read CA certificate {}\nhint: fix [provision] ca_certs in box-config.toml",
                    path.display()
                )
            })?;
            if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
                bail!(
                    "CA certificate {} holds no PEM certificate\nhint: [provision] ca_certs takes PEM files \
                     (-----BEGIN CERTIFICATE-----); convert DER with `openssl x509 -inform der -in F -out F.pem`",
                    path.display()
                );
            }
            bundle.extend_from_slice(&pem);
            if !bundle.ends_with(b"\n") {
                bundle.push(b'\n');
            }
        }
        let dirs: Vec<String> = hosts.iter().map(|h| shell_quote(h)).collect();
        let script = format!(
            "set -e; t=$(mktemp); cat > \"$t\"; for h in {}; do d=/etc/docker/certs.d/$h; mkdir -p \"$d\"; \
             cmp -s \"$t\" \"$d/ca.crt\" || {{ install -m 0644 \"$t\" \"$d/ca.crt\"; echo \"changed $h\"; }}; done; \
             rm -f \"$t\"",
            dirs.join(" ")
        );
        let out = ssh.exec_with_stdin(
            &format!("sudo -n sh -c {}", shell_quote(&script)),
            &mut bundle.as_slice(),
            Duration::from_secs(60),
        )?;
        if out.status != 0 {
            bail!(
                "installing the CA certificates in the guest's /etc/docker/certs.d failed (exit {}):\n{}\nhint: the \
                 user must be able to `sudo` without a password",
                out.status,
                crate::process::tail(&out.output, 10)
            );
        }
        let changed = out.output.lines().filter(|l| l.starts_with("changed ")).count();
        done.push(format!("CA for {} ({changed} changed)", hosts.join(", ")));
    }
    let existing = ssh.exec(&read_daemon_json_command(), Duration::from_secs(30))?;
    let existing = (existing.status == 0).then_some(existing.output);
    if let Some(text) = merge_daemon_json(existing.as_deref(), p)? {
        let script = format!(
            "set -e; mkdir -p /etc/docker; cat > {DAEMON_JSON}.new; mv {DAEMON_JSON}.new {DAEMON_JSON}; \
             if command -v systemctl >/dev/null; then systemctl reload docker; else kill -HUP $(pidof dockerd); fi"
        );
        let out = ssh.exec_with_stdin(
            &format!("sudo -n sh -c {}", shell_quote(&script)),
            &mut text.as_bytes(),
            Duration::from_secs(60),
        )?;
        if out.status != 0 {
            bail!(
                "writing {DAEMON_JSON} or reloading Docker in the guest failed (exit {}):\n{}\nhint: `provisioner \
                 ssh -c 'sudo journalctl -u docker --no-pager | tail -30'` says why",
                out.status,
                crate::process::tail(&out.output, 10)
            );
        }
        done.push(format!("{DAEMON_JSON} written, Docker reloaded"));
    }
    if login {
        for (host, l) in &creds {
            let out = ssh.exec_with_stdin(
                &format!(
                    "sudo -n docker login --username {} --password-stdin {}",
                    shell_quote(&l.username),
                    shell_quote(host)
                ),
                &mut l.password.as_bytes(),
                Duration::from_secs(120),
            )?;
            if out.status != 0 {
                let why = hide(&out.output, &l.password);
                bail!(
                    "docker login to registry {host} as {} failed (exit {}):\n{}\nhint: check the username and \
                     password for [\"{host}\"] in {}",
                    l.username,
                    out.status,
                    crate::process::tail(why.trim_end(), 5),
                    p.registry_credentials.as_deref().map(|c| c.display().to_string()).unwrap_or_default()
                );
            }
            done.push(format!("logged in to {host}"));
        }
    }
    Ok(done.join("; "))
}

/// `text` with every occurrence of `secret` blanked (a registry's error that echoed it).
pub fn hide(text: &str, secret: &str) -> String {
    if secret.is_empty() {
        text.to_string()
    } else {
        text.replace(secret, "<hidden>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(mirrors: &[&str], insecure: &[&str]) -> ProvisionConfig {
        ProvisionConfig {
            registry_mirrors: mirrors.iter().map(|s| s.to_string()).collect(),
            insecure_registries: insecure.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn probe_judges_every_target() {
        let t = vec!["a:5000".to_string(), "gcr.io".to_string()];
        let r = judge_probe("a:5000 401 0.412\ngcr.io 200 0.2\n", &t, 5, &[]);
        assert_eq!(r.mode, ImageSource::Registry);
        assert_eq!(r.reason, "registry answered in 0.4 s (a:5000, gcr.io)");
        let un = vec!["grafana".to_string(), "cadvisor".to_string()];
        let r = judge_probe("a:5000 401 0.4\ngcr.io 000 5.0\n", &t, 5, &un);
        assert_eq!(r.mode, ImageSource::Debian);
        assert_eq!(r.reason, "no answer from gcr.io in 5 s: debian mode, grafana and cadvisor unavailable");
        assert_eq!(judge_probe("", &t, 5, &[]).mode, ImageSource::Debian);
        let r = judge_probe("a:5000 401 0.4\ngcr.io 000 0 unresolved\n", &t, 5, &[]);
        assert_eq!(r.reason, "no answer from gcr.io: its name does not resolve in the guest: debian mode");
    }

    #[test]
    #[cfg_attr(windows, ignore = "windows: a guest shell script, run with /bin/sh")]
    fn a_name_that_does_not_resolve_starts_no_curl_unless_a_proxy_may_reach_it() {
        let (dir, bin) = crate::testing::stand_in_dir();
        let log = dir.path().join("curl.log");
        // Stand-ins: `getent` resolves only `known.example`; `curl` logs its URL and answers 401.
        let stand_in = |name: &str, body: &str| crate::testing::stand_in(&bin, name, body);
        stand_in("getent", "[ \"$2\" = known.example ]");
        stand_in(
            "curl",
            &format!("for a; do last=$a; done; echo \"$last\" >> {}; printf '401 0.1'", log.display()),
        );
        let targets =
            vec!["known.example:5000".to_string(), "nowhere.example".to_string(), "[::1]:5000".to_string()];
        let script = probe_script(&ProvisionConfig::default(), &targets, 5);
        let run = |proxy: &str| {
            let _ = std::fs::remove_file(&log);
            let mut sh = std::process::Command::new("sh");
            sh.args(["-c", &script]).env("PATH", format!("{}:/usr/bin:/bin", bin.display()));
            for v in ["https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"] {
                sh.env_remove(v);
            }
            if !proxy.is_empty() {
                sh.env("https_proxy", proxy);
            }
            let out = sh.output().unwrap();
            let mut lines: Vec<String> =
                String::from_utf8(out.stdout).unwrap().lines().map(String::from).collect();
            lines.sort();
            let mut urls: Vec<String> =
                std::fs::read_to_string(&log).unwrap_or_default().lines().map(String::from).collect();
            urls.sort();
            (lines, urls)
        };
        let (lines, urls) = run("");
        assert_eq!(
            lines,
            ["[::1]:5000 000 0 unresolved", "known.example:5000 401 0.1", "nowhere.example 000 0 unresolved"]
        );
        assert_eq!(urls, ["https://known.example:5000/v2/"], "curl only for the name that resolves");
        // Behind a proxy the name need not resolve here: curl asks for every target.
        let (lines, urls) = run("http://proxy.example:3128");
        assert!(lines.iter().all(|l| l.ends_with(" 401 0.1")), "{lines:?}");
        assert_eq!(urls.len(), 3, "{urls:?}");
    }

    #[test]
    fn a_targets_host_name_loses_its_port_only() {
        assert_eq!(host_name("registry-1.docker.io"), "registry-1.docker.io");
        assert_eq!(host_name("10.0.2.2:5000"), "10.0.2.2");
        assert_eq!(host_name("[::1]:5000"), "::1");
        assert_eq!(host_name("::1"), "::1");
    }

    #[test]
    fn probe_targets_follow_mirrors_and_proxies() {
        let mut c = p(&["https://m.example:5000"], &[]);
        let images = ["prom/prometheus:v1".to_string(), "gcr.io/cadvisor/cadvisor:v1".to_string()];
        assert_eq!(probe_targets(&c, &images), ["m.example:5000", "gcr.io"]);
        c.registry_proxies.insert("gcr.io".into(), "harbor.corp/gcr".into());
        let proxied: Vec<String> = images.iter().map(|i| c.proxied_image(i)).collect();
        assert_eq!(proxied[1], "harbor.corp/gcr/cadvisor/cadvisor:v1");
        assert_eq!(probe_targets(&c, &proxied), ["m.example:5000", "harbor.corp"]);
        assert_eq!(probe_targets(&p(&[], &[]), &images[..1]), ["registry-1.docker.io"]);
    }

    #[test]
    fn daemon_json_is_rendered_exactly_and_only_when_it_changes() {
        let c = p(&["https://10.0.2.2:5443", "https://m.example"], &["r.example:5000"]);
        let want =
            "{\n  \"insecure-registries\": [\n    \"r.example:5000\"\n  ],\n  \"registry-mirrors\": [\n    \
                    \"https://10.0.2.2:5443\",\n    \"https://m.example\"\n  ]\n}\n";
        assert_eq!(merge_daemon_json(None, &c).unwrap().as_deref(), Some(want));
        assert_eq!(merge_daemon_json(Some(want), &c).unwrap(), None, "unchanged: no write, no reload");
        // Keys of the guest's own are kept; ours replace theirs; an empty list removes the key.
        let theirs = "{\"log-driver\": \"journald\", \"registry-mirrors\": [\"https://old\"]}";
        assert_eq!(
            merge_daemon_json(Some(theirs), &p(&["https://new"], &[])).unwrap().as_deref(),
            Some("{\n  \"log-driver\": \"journald\",\n  \"registry-mirrors\": [\n    \"https://new\"\n  ]\n}\n")
        );
        assert_eq!(
            merge_daemon_json(Some(theirs), &p(&[], &[])).unwrap().as_deref(),
            Some("{\n  \"log-driver\": \"journald\"\n}\n")
        );
        assert_eq!(
            merge_daemon_json(None, &p(&[], &[])).unwrap(),
            None,
            "nothing configured, no file: none made"
        );
        let e = merge_daemon_json(Some("[1]"), &c).unwrap_err();
        assert!(format!("{e:#}").contains("is not a JSON object\nhint: "), "{e:#}");
    }

    #[test]
    #[cfg_attr(windows, ignore = "windows: no Unix file modes")]
    fn credentials_file_mode_is_checked_and_parse_errors_never_quote_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("creds.toml");
        std::fs::write(&path, "[\"r.example:5000\"]\nusername = \"lab\"\npassword = \"s3cret-pw\"\n")
            .unwrap();
        crate::platform::set_mode(&path, 0o640).unwrap();
        let e = format!("{:#}", load_credentials(&path).unwrap_err());
        assert!(e.contains("is readable by others (mode 0640)") && e.contains("\nhint: chmod 600 "), "{e}");
        crate::platform::set_mode(&path, 0o600).unwrap();
        let creds = load_credentials(&path).unwrap();
        assert_eq!(creds["r.example:5000"].username, "lab");
        assert!(!format!("{creds:?}").contains("s3cret-pw"));
        // A mistake on the password's line: the error names line and column, never the line's text.
        std::fs::write(&path, "[\"r.example:5000\"]\nusername = \"lab\"\npassword = \"s3cret-pw\n").unwrap();
        let e = format!("{:#}", load_credentials(&path).unwrap_err());
        assert!(e.contains("creds.toml:3:"), "{e}");
        assert!(!e.contains("s3cret-pw"), "{e}");
        assert!(e.contains("\nhint: "), "{e}");
    }

    #[test]
    fn credentials_hide_their_password_in_debug_and_errors() {
        let l = Login { username: "u".into(), password: "s3cret".into() };
        assert!(!format!("{l:?}").contains("s3cret"));
        assert_eq!(hide("bad s3cret here", "s3cret"), "bad <hidden> here");
    }
}
