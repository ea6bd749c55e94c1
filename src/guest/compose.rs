//! Docker Compose in the guest: which flavour is installed (v2 plugin or v1 `docker-compose`), the lab's compose
//! model (services, profiles, build contexts, bind mounts), the command lines, and which services a changed file
//! belongs to.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{anyhow, Context, Result};
use serde::Serialize;

use crate::config::ImageSource;
use crate::host::shell_quote;
use crate::render::Rendered;

/// Which Compose the guest has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ComposeKind {
    /// `docker compose` (the v2 CLI plugin).
    V2,
    /// `docker-compose` (the v1 Python program).
    V1,
}

/// What the guest reported about Docker and Compose.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DockerProbe {
    /// `docker --version` output when the client exists.
    pub docker: Option<String>,
    pub compose: Option<ComposeKind>,
    /// The engine's version when the daemon already answers `docker info`, so a ready guest costs one exec.
    pub server_version: Option<String>,
}

/// Shell script whose output [`parse_probe`] reads: each check's output framed by markers with its status.
/// The last one asks the daemon; an empty answer means "not up yet" and [`super::docker::ensure`] waits for it.
pub const PROBE_SCRIPT: &str = include_str!("../../assets/docker/probe.sh");

/// Parse the output of [`PROBE_SCRIPT`]. Pure: only the exit statuses and version banners count.
pub fn parse_probe(output: &str) -> DockerProbe {
    let mut results: BTreeMap<&str, (i32, String)> = BTreeMap::new();
    let mut current: Option<(&str, String)> = None;
    for line in output.lines() {
        if let Some(cmd) = line.strip_prefix("@@begin ") {
            current = Some((cmd, String::new()));
        } else if let Some(status) = line.strip_prefix("@@status ") {
            if let Some((cmd, text)) = current.take() {
                results.insert(cmd, (status.trim().parse().unwrap_or(-1), text));
            }
        } else if let Some((_, text)) = current.as_mut() {
            text.push_str(line);
            text.push('\n');
        }
    }
    let ok = |key: &str, banner: &str| {
        results.iter().find(|(cmd, _)| cmd.ends_with(key)).and_then(|(_, (status, text))| {
            (*status == 0 && text.to_ascii_lowercase().contains(banner)).then(|| text.trim().to_string())
        })
    };
    let v2 = ok("docker compose version", "compose version");
    let v1 = ok("docker-compose version", "docker-compose version");
    // `docker info` prints only the version (digits and dots, maybe a +suffix) when the daemon answers.
    let server_version = results
        .iter()
        .find(|(cmd, _)| cmd.contains("docker info"))
        .and_then(|(_, (status, text))| (*status == 0).then(|| text.trim().to_string()))
        .filter(|v| !v.is_empty() && !v.contains(char::is_whitespace));
    DockerProbe {
        docker: ok("docker --version", "docker version"),
        compose: detect_compose(v2.as_deref(), v1.as_deref()),
        server_version,
    }
}

/// Prefer v2 when both answer (v1 is deprecated).
pub fn detect_compose(v2_banner: Option<&str>, v1_banner: Option<&str>) -> Option<ComposeKind> {
    match (v2_banner, v1_banner) {
        (Some(_), _) => Some(ComposeKind::V2),
        (None, Some(_)) => Some(ComposeKind::V1),
        (None, None) => None,
    }
}

/// Compose file names, in the order Compose itself looks for them.
pub const COMPOSE_FILES: &[&str] =
    &["compose.yaml", "compose.yml", "docker-compose.yml", "docker-compose.yaml"];

/// One service of the lab's compose file, as far as provisioning cares.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Service {
    pub name: String,
    /// Compose profiles; a service with any is not started by a plain `up -d`.
    pub profiles: Vec<String>,
    /// Build context relative to the tree root (`app`), when the service is built.
    pub build_context: Option<String>,
    /// Image reference, when named.
    pub image: Option<String>,
    /// Relative bind-mount sources (`monitor/monitor.yml`, `dashboards/provisioning`).
    pub mounts: Vec<String>,
}

/// The parsed compose file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ComposeModel {
    /// Its path in the rendered tree.
    pub file: String,
    pub services: Vec<Service>,
}

impl ComposeModel {
    /// Find and parse the compose file of a rendered tree.
    pub fn from_rendered(rendered: &Rendered) -> Result<ComposeModel> {
        let file = COMPOSE_FILES.iter().find_map(|name| rendered.get(name)).ok_or_else(|| {
            anyhow!(
                "the provision tree has no compose file ({})\nhint: add one at the root of [provision] source",
                COMPOSE_FILES.join(", ")
            )
        })?;
        let text =
            std::str::from_utf8(&file.contents).with_context(|| format!("{} is not UTF-8", file.path))?;
        Self::parse(&file.path, text)
    }

    /// Parse compose YAML (only the keys provisioning uses).
    pub fn parse(file: &str, text: &str) -> Result<ComposeModel> {
        let doc: serde_norway::Value = serde_norway::from_str(text).map_err(|e| {
            anyhow!("{file}: {e}\nhint: `provisioner render --out DIR` shows the rendered file")
        })?;
        let services = doc
            .get("services")
            .and_then(|s| s.as_mapping())
            .ok_or_else(|| anyhow!("{file}: no `services:` mapping"))?;
        let str_list = |v: Option<&serde_norway::Value>| -> Vec<String> {
            v.and_then(|v| v.as_sequence())
                .map(|s| s.iter().filter_map(|x| x.as_str().map(String::from)).collect())
                .unwrap_or_default()
        };
        let mut out = Vec::new();
        for (name, svc) in services {
            let name = name.as_str().ok_or_else(|| anyhow!("{file}: a service name is not a string"))?;
            let build_context = match svc.get("build") {
                Some(serde_norway::Value::String(ctx)) => Some(ctx.as_str()),
                Some(b) => Some(b.get("context").and_then(|c| c.as_str()).unwrap_or(".")),
                None => None,
            }
            .and_then(relative);
            let mounts = svc
                .get("volumes")
                .and_then(|v| v.as_sequence())
                .map(|vols| {
                    vols.iter()
                        .filter_map(|v| match v {
                            serde_norway::Value::String(s) => s.split(':').next().and_then(relative),
                            other => {
                                let bind = other.get("type").and_then(|t| t.as_str()) == Some("bind");
                                other
                                    .get("source")
                                    .and_then(|s| s.as_str())
                                    .filter(|_| bind)
                                    .and_then(relative)
                            }
                        })
                        .collect()
                })
                .unwrap_or_default();
            out.push(Service {
                name: name.to_string(),
                profiles: str_list(svc.get("profiles")),
                build_context,
                image: svc.get("image").and_then(|i| i.as_str()).map(String::from),
                mounts,
            });
        }
        Ok(ComposeModel { file: file.to_string(), services: out })
    }

    pub fn service(&self, name: &str) -> Option<&Service> {
        self.services.iter().find(|s| s.name == name)
    }
}

/// A path relative to the tree root (`./monitor/x.yml` -> `monitor/x.yml`, `.` -> ``); None for named
/// volumes and absolute paths, which are not part of the uploaded tree.
fn relative(src: &str) -> Option<String> {
    if src == "." || src == "./" {
        return Some(String::new());
    }
    let rest = src.strip_prefix("./")?;
    Some(rest.trim_end_matches('/').to_string())
}

/// What a set of changed files means for the running lab.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct ChangePlan {
    /// The compose file or `.env` changed: `up -d` recreates what it must.
    pub compose_changed: bool,
    /// Services whose build context changed: rebuild, then `up -d` recreates them.
    pub rebuild: BTreeSet<String>,
    /// Services whose bind-mounted files changed: restart them.
    pub restart: BTreeSet<String>,
    /// Changed files no service uses (reported, nothing restarted).
    pub unmapped: Vec<String>,
}

impl ChangePlan {
    pub fn is_empty(&self) -> bool {
        !self.compose_changed && self.rebuild.is_empty() && self.restart.is_empty()
    }
}

/// Map changed paths (added, changed or removed) to services. Pure.
///
/// A path inside a service's build context rebuilds it; a path inside one of its bind mounts restarts it; a path
/// under a top-level directory named like a service restarts that service (config it reads at start); the compose
/// file and `.env` are Compose's own business (`up -d`).
pub fn plan_changes(model: &ComposeModel, changed: &[String]) -> ChangePlan {
    let under = |path: &str, dir: &str| dir.is_empty() || path == dir || path.starts_with(&format!("{dir}/"));
    let mut plan = ChangePlan::default();
    for path in changed {
        if path == &model.file || path == ".env" {
            plan.compose_changed = true;
            continue;
        }
        let mut hit = false;
        for svc in &model.services {
            if svc.build_context.as_deref().is_some_and(|ctx| under(path, ctx)) {
                plan.rebuild.insert(svc.name.clone());
                hit = true;
            } else if svc.mounts.iter().any(|m| under(path, m)) || under(path, &svc.name) {
                plan.restart.insert(svc.name.clone());
                hit = true;
            }
        }
        if !hit {
            plan.unmapped.push(path.clone());
        }
    }
    // A rebuilt service is recreated anyway.
    let rebuilt = plan.rebuild.clone();
    plan.restart.retain(|s| !rebuilt.contains(s));
    plan
}

/// How to run Compose for this lab in the guest: always through `sudo -n` (no docker group membership, no
/// reconnect), from the tree's directory, with an explicit project name and file.
#[derive(Debug, Clone)]
pub struct Compose {
    pub kind: ComposeKind,
    pub dir: String,
    pub project: String,
    pub file: String,
    /// The machine's `profiles`, passed as `--profile` so services in those compose profiles start too.
    pub profiles: Vec<String>,
}

impl Compose {
    /// The shell command for `compose <args>`.
    pub fn cmd(&self, args: &str) -> String {
        self.cmd_env("", args)
    }

    /// [`Compose::cmd`] with more `NAME=value` words (space-separated) in Compose's environment.
    pub fn cmd_env(&self, env: &str, args: &str) -> String {
        const COMPOSE_HTTP_TIMEOUT: u32 = 600;
        let bin = match self.kind {
            ComposeKind::V2 => "docker compose",
            ComposeKind::V1 => "docker-compose",
        };
        let profiles: String =
            self.profiles.iter().map(|p| format!(" --profile {}", shell_quote(p))).collect();
        // Compose's Docker API timeout (60 s by default) ran out creating a container in a TCG guest on a loaded
        // host ("consider setting COMPOSE_HTTP_TIMEOUT"); `sudo` resets the environment, hence `env`.
        format!(
            "cd {} && sudo -n env COMPOSE_HTTP_TIMEOUT={COMPOSE_HTTP_TIMEOUT} {env}{}{bin} -p {} -f {}{profiles} {args}",
            shell_quote(&self.dir),
            if env.is_empty() { "" } else { " " },
            shell_quote(&self.project),
            shell_quote(&self.file)
        )
    }
}

/// The environment `compose build` runs with: in `debian` mode, Compose v1 with a Docker engine before 23 builds
/// through the docker CLI with BuildKit, whose metadata steps (ENV, USER, EXPOSE, HEALTHCHECK, CMD ...) start no
/// container, where the classic builder creates and commits one per step (seconds each in a TCG guest). From 23 on
/// the CLI needs the buildx plugin for BuildKit, so the classic builder stays; Compose v2 picks its builder itself.
/// Registry mode keeps the classic builder: 20.10's BuildKit resolves a FROM image at the registry itself, without
/// the CA installed under /etc/docker/certs.d (measured: `x509: certificate signed by unknown authority`).
pub fn build_env(kind: ComposeKind, server_version: &str, images: ImageSource) -> &'static str {
    let major = server_version.split('.').next().and_then(|m| m.trim().parse::<u32>().ok());
    match (kind, major, images) {
        (ComposeKind::V1, Some(m), ImageSource::Debian) if m < 23 => {
            "COMPOSE_DOCKER_CLI_BUILD=1 DOCKER_BUILDKIT=1"
        }
        _ => "",
    }
}

/// A Compose project name from the machine name (lowercase letters, digits, dashes).
pub fn project_name(machine: &str) -> String {
    let s: String = machine
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' })
        .collect();
    format!("provisioner-{s}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const LAB: &str = r#"
services:
  demo-app:
    build: ./demo-app
    ports: ["8000:8000"]
  prometheus:
    build:
      context: ./prometheus
    volumes:
      - ./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro
      - ./prometheus/rules:/etc/prometheus/rules:ro
      - prom-data:/prometheus
  alertmanager:
    image: provisioner-alertmanager
    volumes:
      - type: bind
        source: ./alertmanager
        target: /etc/alertmanager
  node-exporter:
    build: { context: ./node-exporter }
  grafana:
    image: grafana/grafana:11.1.0
    profiles: [offline-unavailable]
    volumes: ["./grafana/provisioning:/etc/grafana/provisioning:ro"]
  cadvisor:
    image: gcr.io/cadvisor/cadvisor:v0.49.1
    profiles: [offline-unavailable]
volumes:
  prom-data: {}
"#;

    fn probe_output(docker: (i32, &str), v2: (i32, &str), v1: (i32, &str)) -> String {
        probe_output_with_info(
            docker,
            v2,
            v1,
            (1, "Cannot connect to the Docker daemon at unix:///var/run/docker.sock"),
        )
    }

    fn probe_output_with_info(
        docker: (i32, &str),
        v2: (i32, &str),
        v1: (i32, &str),
        info: (i32, &str),
    ) -> String {
        let mut s = String::new();
        for (cmd, (st, text)) in [
            ("docker --version", docker),
            ("sudo -n docker compose version", v2),
            ("docker-compose version", v1),
            ("sudo -n docker info --format {{.ServerVersion}}", info),
        ] {
            s.push_str(&format!("@@begin {cmd}\n{text}\n@@status {st}\n"));
        }
        s
    }

    #[test]
    fn detects_compose_v2_plugin() {
        let out = probe_output(
            (0, "Docker version 26.1.5+dfsg1, build a72d7cd"),
            (0, "Docker Compose version 2.26.1-4"),
            (127, "sh: 1: docker-compose: not found"),
        );
        let p = parse_probe(&out);
        assert_eq!(p.compose, Some(ComposeKind::V2));
        assert!(p.docker.unwrap().contains("26.1.5"));
    }

    /// Runs the real probe script under `sh` with stand-ins for docker, sudo and docker-compose on PATH.
    #[test]
    #[cfg_attr(windows, ignore = "windows: runs the probe script under /bin/sh with shell-script doubles")]
    fn probe_script_runs_compose_v1_once_then_reads_its_cache() {
        let (dir, bin) = crate::testing::stand_in_dir();
        let count = dir.path().join("compose-runs");
        let tool = |name: &str, body: &str| crate::testing::stand_in(&bin, name, body);
        tool(
            "docker",
            "case \"$1\" in --version) echo 'Docker version 20.10.24+dfsg1, build 297e128' ;;\n\
             compose) echo \"docker: 'compose' is not a docker command.\" >&2; exit 1 ;;\n\
             info) echo 20.10.24+dfsg1 ;; esac",
        );
        tool("sudo", "[ \"$1\" = -n ] && shift; exec \"$@\"");
        tool(
            "docker-compose",
            &format!("echo run >> {count:?}; echo 'docker-compose version 1.29.2, build unknown'"),
        );
        // Only the utilities the script uses, so the host's own docker-compose (if any) stays out of sight.
        let sys = dir.path().join("sys");
        std::fs::create_dir(&sys).unwrap();
        for util in ["head", "tail", "stat", "mkdir", "mv"] {
            let found =
                ["/usr/bin", "/bin"].iter().map(|d| std::path::Path::new(d).join(util)).find(|p| p.exists());
            crate::platform::symlink(&found.expect("coreutils"), &sys.join(util)).unwrap();
        }
        let run = || {
            let out = std::process::Command::new("/bin/sh")
                .args(["-c", PROBE_SCRIPT])
                .env("PATH", format!("{}:{}", bin.display(), sys.display()))
                .env("HOME", dir.path().join("home"))
                .env_remove("XDG_CACHE_HOME")
                .output()
                .unwrap();
            parse_probe(&String::from_utf8_lossy(&out.stdout))
        };
        let runs = || std::fs::read_to_string(&count).unwrap_or_default().lines().count();
        let want = DockerProbe {
            docker: Some("Docker version 20.10.24+dfsg1, build 297e128".into()),
            compose: Some(ComposeKind::V1),
            server_version: Some("20.10.24+dfsg1".into()),
        };
        assert_eq!(run(), want);
        assert_eq!(runs(), 1);
        assert_eq!(run(), want, "the cached banner must read the same");
        assert_eq!(runs(), 1, "the second probe started docker-compose again");
        // An upgrade (another size) is noticed.
        tool(
            "docker-compose",
            &format!("echo run >> {count:?}; echo 'docker-compose version 1.29.3, build x'"),
        );
        assert_eq!(run(), want);
        assert_eq!(runs(), 2);
        // Removed: not found, no stale cache answer.
        std::fs::remove_file(bin.join("docker-compose")).unwrap();
        assert_eq!(run().compose, None);
    }

    /// The warm path of the real probe script: a second probe with unchanged binaries starts no docker or
    /// docker-compose at all (their answers come from the cache; the daemon is asked through its socket with
    /// curl), reads the same, and asks `docker info` when the guest has no curl; a changed docker binary is probed
    /// again.
    #[test]
    #[cfg_attr(windows, ignore = "windows: runs the probe script under /bin/sh with shell-script doubles")]
    fn probe_script_starts_no_docker_cli_when_nothing_changed() {
        let (dir, bin) = crate::testing::stand_in_dir();
        let calls = dir.path().join("calls");
        let tool = |name: &str, body: &str| {
            crate::testing::stand_in(&bin, name, &format!("echo \"{name} $*\" >> {calls:?}\n{body}"))
        };
        let docker = "case \"$1\" in --version) echo 'Docker version 20.10.24+dfsg1, build 297e128' ;;\n\
             compose) echo \"docker: 'compose' is not a docker command.\" >&2; exit 1 ;;\n\
             info) echo 20.10.24+dfsg1 ;; esac";
        tool("docker", docker);
        tool("docker-compose", "echo 'docker-compose version 1.29.2, build unknown'");
        tool("sudo", "[ \"$1\" = -n ] && shift; exec \"$@\"");
        tool(
            "curl",
            r#"echo '{"Platform":{"Name":""},"Components":[{"Name":"Engine","Version":"20.10.24+dfsg1"}],"Version":"20.10.24+dfsg1","ApiVersion":"1.41"}'"#,
        );
        let sys = dir.path().join("sys");
        std::fs::create_dir(&sys).unwrap();
        for util in ["head", "tail", "stat", "mkdir", "mv"] {
            let found =
                ["/usr/bin", "/bin"].iter().map(|d| std::path::Path::new(d).join(util)).find(|p| p.exists());
            crate::platform::symlink(&found.expect("coreutils"), &sys.join(util)).unwrap();
        }
        // (what the probe read, the stand-ins it started: "sudo" lines left out)
        let run = || {
            let _ = std::fs::remove_file(&calls);
            let out = std::process::Command::new("/bin/sh")
                .args(["-c", PROBE_SCRIPT])
                .env("PATH", format!("{}:{}", bin.display(), sys.display()))
                .env("HOME", dir.path().join("home"))
                .env_remove("XDG_CACHE_HOME")
                .output()
                .unwrap();
            let started: Vec<String> = std::fs::read_to_string(&calls)
                .unwrap_or_default()
                .lines()
                .filter(|l| !l.starts_with("sudo"))
                .map(String::from)
                .collect();
            (parse_probe(&String::from_utf8_lossy(&out.stdout)), started)
        };
        let want = DockerProbe {
            docker: Some("Docker version 20.10.24+dfsg1, build 297e128".into()),
            compose: Some(ComposeKind::V1),
            server_version: Some("20.10.24+dfsg1".into()),
        };
        let (first, started) = run();
        assert_eq!(first, want);
        assert!(started.contains(&"docker --version".to_string()), "{started:?}");
        let (second, started) = run();
        assert_eq!(second, want, "the cached answers read the same");
        assert_eq!(
            started,
            ["curl -sf --max-time 30 --unix-socket /var/run/docker.sock http://localhost/version"]
        );
        // No curl in the guest: the daemon is asked with `docker info`.
        std::fs::remove_file(bin.join("curl")).unwrap();
        let (third, started) = run();
        assert_eq!(third, want);
        assert_eq!(started, ["docker info --format {{.ServerVersion}}"]);
        // An upgraded docker (another size) is probed again.
        tool("docker", &format!("{docker}\n# upgraded"));
        let (_, started) = run();
        assert!(started.contains(&"docker --version".to_string()), "{started:?}");
    }

    #[test]
    fn a_running_daemon_is_seen_in_the_same_probe() {
        let v1 = (0, "docker-compose version 1.29.2, build unknown");
        let v2 = (1, "docker: 'compose' is not a docker command.");
        let up = probe_output_with_info((0, "Docker version 20.10.24"), v2, v1, (0, "20.10.24+dfsg1"));
        assert_eq!(parse_probe(&up).server_version.as_deref(), Some("20.10.24+dfsg1"));
        let down = probe_output((0, "Docker version 20.10.24"), v2, v1);
        assert_eq!(parse_probe(&down).server_version, None);
        // sudo asking for a password, or an error on stdout with status 0, is not a version.
        let odd = probe_output_with_info(
            (0, "Docker version 20.10.24"),
            v2,
            v1,
            (0, "sudo: a password is required"),
        );
        assert_eq!(parse_probe(&odd).server_version, None);
    }

    #[test]
    fn detects_compose_v1_on_bookworm() {
        let out = probe_output(
            (0, "Docker version 20.10.24+dfsg1, build 297e128"),
            (1, "docker: 'compose' is not a docker command.\nSee 'docker --help'"),
            (0, "docker-compose version 1.29.2, build unknown\ndocker-py version: 5.0.3"),
        );
        assert_eq!(parse_probe(&out).compose, Some(ComposeKind::V1));
    }

    #[test]
    fn prefers_v2_when_both_exist() {
        let out = probe_output(
            (0, "Docker version 26.1.5"),
            (0, "Docker Compose version v2.29.1"),
            (0, "docker-compose version 1.29.2, build unknown"),
        );
        assert_eq!(parse_probe(&out).compose, Some(ComposeKind::V2));
    }

    #[test]
    fn nothing_installed() {
        let out = probe_output(
            (127, "sh: 1: docker: not found"),
            (1, "sudo: docker: command not found"),
            (127, "sh: 1: docker-compose: not found"),
        );
        assert_eq!(parse_probe(&out), DockerProbe { docker: None, compose: None, server_version: None });
    }

    #[test]
    fn exit_zero_without_banner_is_not_compose() {
        // Old docker CLIs print their help with status 0 for an unknown subcommand.
        let out =
            probe_output((0, "Docker version 19.03"), (0, "Usage: docker [OPTIONS] COMMAND"), (127, "nope"));
        assert_eq!(parse_probe(&out).compose, None);
    }

    #[test]
    fn parses_lab_compose() {
        let m = ComposeModel::parse("compose.yaml", LAB).unwrap();
        assert_eq!(m.services.len(), 6);
        let prom = m.service("prometheus").unwrap();
        assert_eq!(prom.build_context.as_deref(), Some("prometheus"));
        assert_eq!(prom.mounts, vec!["prometheus/prometheus.yml", "prometheus/rules"]);
        assert_eq!(m.service("alertmanager").unwrap().mounts, vec!["alertmanager"]);
        assert_eq!(m.service("node-exporter").unwrap().build_context.as_deref(), Some("node-exporter"));
        assert_eq!(m.service("grafana").unwrap().profiles, vec!["offline-unavailable"]);
    }

    #[test]
    fn compose_without_services_is_an_error() {
        assert!(ComposeModel::parse("compose.yaml", "version: '3'\n").is_err());
        assert!(ComposeModel::parse("compose.yaml", "services: [\n").is_err());
    }

    #[test]
    fn changed_paths_map_to_services() {
        let m = ComposeModel::parse("compose.yaml", LAB).unwrap();
        let changed: Vec<String> = [
            "demo-app/app.py",
            "alertmanager/alertmanager.yml",
            "grafana/provisioning/datasources/ds.yml",
            "README.md",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let plan = plan_changes(&m, &changed);
        assert!(!plan.compose_changed);
        assert_eq!(plan.rebuild.iter().collect::<Vec<_>>(), ["demo-app"]);
        assert_eq!(plan.restart.iter().collect::<Vec<_>>(), ["alertmanager", "grafana"]);
        assert_eq!(plan.unmapped, vec!["README.md"]);
    }

    #[test]
    fn build_context_change_wins_over_restart() {
        let m = ComposeModel::parse("compose.yaml", LAB).unwrap();
        let plan = plan_changes(&m, &["prometheus/rules/alerts.yml".to_string()]);
        assert_eq!(plan.rebuild.iter().collect::<Vec<_>>(), ["prometheus"]);
        assert!(plan.restart.is_empty());
    }

    #[test]
    fn compose_file_and_env_mean_up() {
        let m = ComposeModel::parse("compose.yaml", LAB).unwrap();
        let plan = plan_changes(&m, &["compose.yaml".to_string(), ".env".to_string()]);
        assert!(plan.compose_changed);
        assert!(plan.rebuild.is_empty() && plan.restart.is_empty());
        assert!(plan_changes(&m, &[]).is_empty());
    }

    #[test]
    fn prefix_of_a_name_is_not_a_match() {
        let m = ComposeModel::parse("compose.yaml", LAB).unwrap();
        let plan = plan_changes(&m, &["prometheus-extra/x".to_string()]);
        assert!(plan.is_empty());
        assert_eq!(plan.unmapped, vec!["prometheus-extra/x"]);
    }

    #[test]
    fn compose_command_lines() {
        let c = Compose {
            kind: ComposeKind::V1,
            dir: "/opt/provision".into(),
            project: project_name("Lab_1"),
            file: "compose.yaml".into(),
            profiles: Vec::new(),
        };
        assert_eq!(
            c.cmd("up -d"),
            "cd /opt/provision && sudo -n env COMPOSE_HTTP_TIMEOUT=600 docker-compose -p provisioner-lab-1 -f \
             compose.yaml up -d"
        );
        let c = Compose { kind: ComposeKind::V2, ..c };
        assert!(c.cmd("pull").contains("docker compose -p provisioner-lab-1 -f compose.yaml pull"));
        let c = Compose { profiles: vec!["app".into(), "it's".into()], ..c };
        assert!(
            c.cmd("up -d").ends_with("-f compose.yaml --profile app --profile 'it'\\''s' up -d"),
            "{}",
            c.cmd("up -d")
        );
    }

    #[test]
    fn compose_v1_builds_with_buildkit_in_debian_mode_on_an_engine_before_23_only() {
        let c = Compose {
            kind: ComposeKind::V1,
            dir: "/opt/provision".into(),
            project: "p".into(),
            file: "compose.yaml".into(),
            profiles: Vec::new(),
        };
        let env = build_env(ComposeKind::V1, "20.10.24+dfsg1", ImageSource::Debian);
        assert_eq!(env, "COMPOSE_DOCKER_CLI_BUILD=1 DOCKER_BUILDKIT=1");
        assert_eq!(
            c.cmd_env(env, "build app"),
            "cd /opt/provision && sudo -n env COMPOSE_HTTP_TIMEOUT=600 COMPOSE_DOCKER_CLI_BUILD=1 DOCKER_BUILDKIT=1 \
             docker-compose -p p -f compose.yaml build app"
        );
        assert_eq!(c.cmd_env("", "build app"), c.cmd("build app"));
        // From 23 on the docker CLI's BuildKit needs buildx, which a v1 setup may lack: the classic builder stays.
        assert_eq!(build_env(ComposeKind::V1, "24.0.5", ImageSource::Debian), "");
        assert_eq!(build_env(ComposeKind::V1, "", ImageSource::Debian), "", "unknown engine version");
        assert_eq!(
            build_env(ComposeKind::V2, "20.10.24", ImageSource::Debian),
            "",
            "Compose v2 picks its builder"
        );
        // A FROM pulled through a registry with a private CA: BuildKit would ask the registry without that CA.
        assert_eq!(build_env(ComposeKind::V1, "20.10.24+dfsg1", ImageSource::Registry), "");
        assert_eq!(build_env(ComposeKind::V1, "20.10.24+dfsg1", ImageSource::Auto), "");
    }
}
