//! The shipped lab (`provision/`), rendered and checked with the real tools: promtool (config, rules, rule unit
//! tests), amtool, docker-compose v1 (`config -q`), plus structural checks of the compose file, the rules' job
//! names and the Grafana dashboards, and a golden copy of every rendered template.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_norway::Value;

use crate::support::{self, Test};

/// Fixed secrets so renders are reproducible (the golden files hold them).
pub const TEST_PROMETHEUS_HEX: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
pub const TEST_GRAFANA_PASSWORD: &str = "TestOnlyGrafanaPassw0rd1";

/// Services the compose file must define.
const SERVICES: [&str; 6] =
    ["demo-app", "prometheus", "alertmanager", "grafana", "node-exporter", "cadvisor"];
/// Services without a Debian package: only in the "registry" profile in debian mode.
const REGISTRY_ONLY: [&str; 2] = ["grafana", "cadvisor"];

/// A rendered copy of the shipped lab: `images` is "debian" or "registry"; `vars` is TOML put under `[vars]`.
pub struct Lab {
    /// The lab's temp dir (box-config.toml, provision/, .provisioner/); also keeps it alive.
    pub dir: Test,
    pub out: PathBuf,
}

impl Lab {
    pub fn render(images: &str, vars: &str) -> Lab {
        let test = Test::with_lab();
        let cfg_path = test.path().join("box-config.toml");
        let cfg = std::fs::read_to_string(&cfg_path).unwrap();
        assert!(cfg.contains("images = \"auto\""), "box-config.toml no longer sets images = \"auto\"");
        let cfg = cfg.replace("images = \"auto\"", &format!("images = \"{images}\""));
        std::fs::write(&cfg_path, format!("{cfg}\n[vars]\n{vars}\n")).unwrap();
        test.write(
            ".provisioner/secrets.toml",
            format!(
                "prometheus_hex = \"{TEST_PROMETHEUS_HEX}\"\ngrafana_admin_password = \"{TEST_GRAFANA_PASSWORD}\"\n"
            ),
        );
        let out = test.path().join("out");
        Test::new()
            .cwd(test.path())
            .args(["--config", "box-config.toml", "render", "--out", "out"])
            .run()
            .success();
        Lab { dir: test, out }
    }
    pub fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.out.join(rel)).unwrap_or_else(|e| panic!("read rendered {rel}: {e}"))
    }
    pub fn yaml(&self, rel: &str) -> Value {
        serde_norway::from_str(&self.read(rel)).unwrap_or_else(|e| panic!("{rel} is not YAML: {e}"))
    }
    /// Every Grafana dashboard: (file name, JSON).
    pub fn dashboards(&self) -> Vec<(String, serde_json::Value)> {
        let dir = self.out.join("grafana/dashboards");
        let mut v: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .map(|p| {
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                let json = serde_json::from_str(&std::fs::read_to_string(&p).unwrap())
                    .unwrap_or_else(|e| panic!("dashboard {name} is not valid JSON: {e}"));
                (name, json)
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

/// Run a real tool; panic with its output unless it succeeds.
#[track_caller]
pub fn tool(dir: &Path, program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e} (install it with scripts/host-deps.sh)"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{program} {args:?} failed in {}:\n{text}", dir.display());
    text
}

/// Every panel of a dashboard, rows' nested panels included.
pub fn panels(dashboard: &serde_json::Value) -> Vec<&serde_json::Value> {
    let mut out = Vec::new();
    for p in dashboard["panels"].as_array().into_iter().flatten() {
        out.push(p);
        out.extend(p["panels"].as_array().into_iter().flatten());
    }
    out
}

/// The uid of the provisioned Prometheus datasource.
pub fn datasource_uid(lab: &Lab) -> String {
    let ds = lab.yaml("grafana/provisioning/datasources/prometheus.yml");
    let uid = ds["datasources"][0]["uid"].as_str().expect("datasource has a fixed uid");
    assert_eq!(ds["datasources"][0]["type"].as_str(), Some("prometheus"));
    uid.to_string()
}

/// Scrape job names of prometheus.yml.
pub fn scrape_jobs(lab: &Lab) -> BTreeSet<String> {
    let prom = lab.yaml("prometheus/prometheus.yml");
    prom["scrape_configs"]
        .as_sequence()
        .expect("scrape_configs")
        .iter()
        .map(|j| j["job_name"].as_str().unwrap().to_string())
        .collect()
}

/// Values of every `job="..."` / `job=~"..."` matcher in a PromQL text.
pub fn job_matchers(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("job=") {
        rest = &rest[i + 4..];
        let r = rest.trim_start_matches('~');
        if let Some(r) = r.strip_prefix('"') {
            out.push(r[..r.find('"').unwrap()].to_string());
        }
    }
    out
}

#[test]
fn prometheus_config_rules_and_rule_unit_tests_pass_promtool() {
    let lab = Lab::render("debian", "");
    let dir = lab.out.join("prometheus");
    tool(&dir, "promtool", &["check", "config", "prometheus.yml"]);
    let rules = tool(&dir, "promtool", &["check", "rules", "alert.rules.yml"]);
    assert!(rules.contains("SUCCESS: 7 rules found"), "{rules}");
    tool(&dir, "promtool", &["test", "rules", "rules.test.yml"]);
}

#[test]
fn rule_unit_tests_catch_a_broken_rule() {
    // The same rule tests must fail when a rule selects a job that does not exist (a classic defect).
    let lab = Lab::render("debian", "");
    let dir = lab.out.join("prometheus");
    let rules = lab.read("prometheus/alert.rules.yml").replace("job=\"node-exporter\"", "job=\"node\"");
    std::fs::write(dir.join("alert.rules.yml"), rules).unwrap();
    let out = Command::new("promtool")
        .args(["test", "rules", "rules.test.yml"])
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(!out.status.success(), "promtool test rules passed with broken job names");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    for alert in ["HostHighCpu", "HostLowMemory", "HostLowDisk"] {
        assert!(text.contains(alert), "the failure does not name {alert}:\n{text}");
    }
}

#[test]
fn every_job_in_rules_and_dashboards_is_a_scrape_job() {
    let lab = Lab::render("debian", "");
    let jobs = scrape_jobs(&lab);
    for want in ["prometheus", "demo-app", "node-exporter", "cadvisor", "alertmanager"] {
        assert!(jobs.contains(want), "scrape job {want} missing: {jobs:?}");
    }
    let prom = lab.yaml("prometheus/prometheus.yml");
    let interval = prom["global"]["scrape_interval"].as_str().unwrap();
    let timeout = prom["global"]["scrape_timeout"].as_str().unwrap();
    assert!(seconds(timeout) < seconds(interval), "scrape_timeout {timeout} >= scrape_interval {interval}");

    let rules = lab.read("prometheus/alert.rules.yml");
    let used = job_matchers(&rules);
    assert!(used.len() >= 6, "rules select jobs explicitly: {used:?}");
    for j in &used {
        assert!(jobs.contains(j), "alert rules select job {j:?}, which is not a scrape job {jobs:?}");
    }
    for (name, d) in lab.dashboards() {
        for p in panels(&d) {
            for t in p["targets"].as_array().into_iter().flatten() {
                for j in job_matchers(t["expr"].as_str().unwrap_or_default()) {
                    assert!(jobs.contains(&j), "{name} panel {:?} selects unknown job {j:?}", p["title"]);
                }
            }
        }
    }
}

fn seconds(d: &str) -> u64 {
    let (n, unit) = d.split_at(d.find(|c: char| !c.is_ascii_digit()).unwrap_or(d.len()));
    let n: u64 = n.parse().unwrap_or_else(|_| panic!("duration {d:?}"));
    n * match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => panic!("unit of {d:?}"),
    }
}

#[test]
fn every_alert_rule_is_unit_tested_and_has_a_for_clause() {
    let lab = Lab::render("debian", "");
    let rules = lab.yaml("prometheus/alert.rules.yml");
    let tests = lab.read("prometheus/rules.test.yml");
    let mut names = Vec::new();
    for g in rules["groups"].as_sequence().unwrap() {
        for r in g["rules"].as_sequence().unwrap() {
            let name = r["alert"].as_str().unwrap().to_string();
            assert!(r["for"].as_str().is_some_and(|f| seconds(f) > 0), "{name} has no for:");
            assert!(r["labels"]["severity"].as_str().is_some(), "{name} has no severity");
            assert!(r["annotations"]["summary"].as_str().is_some(), "{name} has no summary");
            names.push(name);
        }
    }
    for want in [
        "InstanceDown",
        "AppHighErrorRate",
        "AppHighLatencyP95",
        "HostHighCpu",
        "HostLowMemory",
        "HostLowDisk",
        "ContainerGone",
    ] {
        assert!(names.iter().any(|n| n == want), "rule {want} missing: {names:?}");
    }
    for n in &names {
        // Each alert is evaluated at least twice: once expecting nothing, once expecting it to fire.
        let hits = tests.matches(&format!("alertname: {n}\n")).count();
        assert!(hits >= 2, "rules.test.yml checks {n} {hits} time(s); test it firing and not firing");
    }
    let disk = lab.read("prometheus/alert.rules.yml");
    assert!(!disk.contains("aufs"), "disk rules must not select the obsolete aufs");
    assert!(disk.contains("fstype!~\"tmpfs"), "disk rules must exclude tmpfs");
}

#[test]
fn alertmanager_config_is_valid_and_routes_to_the_webhook() {
    let lab = Lab::render("debian", "");
    let dir = lab.out.join("alertmanager");
    let out = tool(&dir, "amtool", &["check-config", "alertmanager.yml"]);
    assert!(out.contains("1 inhibit rules"), "{out}");
    let am = lab.yaml("alertmanager/alertmanager.yml");
    let receiver = am["route"]["receiver"].as_str().unwrap();
    let r =
        am["receivers"].as_sequence().unwrap().iter().find(|r| r["name"].as_str() == Some(receiver)).unwrap();
    assert_eq!(r["webhook_configs"][0]["url"].as_str(), Some("http://demo-app:8000/alerts"));
    assert!(
        r.get("slack_configs").is_none() && r.get("email_configs").is_none(),
        "Slack/email on without values"
    );
    assert!(am["route"]["group_by"].as_sequence().is_some_and(|g| !g.is_empty()));
}

#[test]
fn slack_and_email_receivers_switch_on_with_their_vars() {
    let lab = Lab::render(
        "debian",
        r##"slack_webhook_url = "https://hooks.slack.com/services/T0/B0/secret"
slack_channel = "#lab"
smtp_smarthost = "smtp.example.org:587"
smtp_auth_username = "lab"
smtp_auth_password = "pw"
email_to = "ops@example.org""##,
    );
    let dir = lab.out.join("alertmanager");
    tool(&dir, "amtool", &["check-config", "alertmanager.yml"]);
    let am = lab.yaml("alertmanager/alertmanager.yml");
    let r = &am["receivers"][0];
    assert_eq!(
        r["slack_configs"][0]["api_url"].as_str(),
        Some("https://hooks.slack.com/services/T0/B0/secret")
    );
    assert_eq!(r["slack_configs"][0]["channel"].as_str(), Some("#lab"));
    assert_eq!(r["email_configs"][0]["to"].as_str(), Some("ops@example.org"));
    assert_eq!(am["global"]["smtp_smarthost"].as_str(), Some("smtp.example.org:587"));
    assert_eq!(am["global"]["smtp_auth_username"].as_str(), Some("lab"));
    // The Slack text is an Alertmanager template, kept literal through handlebars.
    assert!(r["slack_configs"][0]["title"].as_str().unwrap().contains("{{ .CommonLabels.alertname }}"));
}

/// Checks shared by both image modes.
/// The Dockerfile a compose `build:` (a context string, or a table with `context` and `dockerfile`) names: its
/// name and its rendered text.
fn dockerfile(lab: &Lab, build: &Value) -> (String, String) {
    let (ctx, file) = match build.as_str() {
        Some(ctx) => (ctx.to_string(), "Dockerfile".to_string()),
        None => (
            build["context"].as_str().unwrap().to_string(),
            build["dockerfile"].as_str().unwrap_or("Dockerfile").to_string(),
        ),
    };
    let text = lab.read(&format!("{}/{file}", ctx.trim_start_matches("./")));
    (file, text)
}

fn check_compose(lab: &Lab, images: &str) -> Value {
    let c = lab.yaml("docker-compose.yml");
    let services = c["services"].as_mapping().expect("services");
    for s in SERVICES {
        assert!(services.contains_key(s), "{images}: service {s} missing");
    }
    for (name, svc) in services {
        let name = name.as_str().unwrap();
        for p in svc["ports"].as_sequence().into_iter().flatten() {
            let p = p.as_str().expect("ports as strings");
            assert!(p.starts_with("127.0.0.1:"), "{images}: {name} publishes {p:?} beyond 127.0.0.1");
        }
        if name == "loadgen" {
            continue; // on-demand job (profile "load"), not a service
        }
        assert!(
            svc["ports"].as_sequence().is_some_and(|p| !p.is_empty()),
            "{images}: {name} publishes no port"
        );
        assert!(svc["healthcheck"]["test"].as_sequence().is_some(), "{images}: {name} has no healthcheck");
        assert_eq!(svc["restart"].as_str(), Some("unless-stopped"), "{images}: {name} restart policy");
        assert!(
            svc["mem_limit"].as_str().is_some() && svc["cpus"].as_f64().is_some(),
            "{images}: {name} limits"
        );
        assert_eq!(svc["networks"][0].as_str(), Some("lab"), "{images}: {name} network");
        let image = svc["image"].as_str().unwrap_or_else(|| panic!("{images}: {name} has no image"));
        let tag = image.rsplit_once(':').map(|(_, t)| t).unwrap_or("");
        assert!(
            !tag.is_empty() && tag != "latest" && !tag.contains('/'),
            "{images}: {name} image {image} unpinned"
        );
    }
    for v in ["prometheus-data", "alertmanager-data", "grafana-data"] {
        assert!(c["volumes"].as_mapping().unwrap().contains_key(v), "named volume {v}");
    }
    let grafana = &c["services"]["grafana"]["environment"];
    assert_eq!(grafana["GF_SECURITY_ADMIN_PASSWORD"].as_str(), Some("${GF_SECURITY_ADMIN_PASSWORD}"));
    assert_eq!(grafana["GF_USERS_ALLOW_SIGN_UP"].as_str(), Some("false"));
    // The env password only applies when the database is created; the volume outlives it, so it is re-applied.
    let entry = serde_norway::to_string(&c["services"]["grafana"]["entrypoint"]).unwrap();
    assert!(entry.contains("reset-admin-password") && entry.contains("exec /run.sh"), "{entry}");
    // docker-compose v1 (Debian bookworm's 1.29, what the guest runs) parses it, profiles included.
    tool(&lab.out, "docker-compose", &["config", "-q"]);
    c
}

#[test]
fn registry_proxies_and_pip_index_reach_every_image_and_the_demo_app_build() {
    let test = Test::with_lab();
    let cfg_path = test.path().join("box-config.toml");
    let cfg = std::fs::read_to_string(&cfg_path).unwrap().replace(
        "images = \"auto\"",
        "images = \"registry\"\nregistry_proxies = { \"docker.io\" = \"harbor.corp:8443/hub\", \"gcr.io\" = \
         \"harbor.corp:8443/gcr\" }\npip_index_url = \"http://10.0.2.2:8765/simple\"",
    );
    std::fs::write(&cfg_path, cfg).unwrap();
    Test::new()
        .cwd(test.path())
        .args(["--config", "box-config.toml", "render", "--out", "out"])
        .run()
        .success();
    let compose = std::fs::read_to_string(test.path().join("out/docker-compose.yml")).unwrap();
    let c: Value = serde_norway::from_str(&compose).unwrap();
    for (s, image) in [
        ("prometheus", "harbor.corp:8443/hub/prom/prometheus:v2.53.2"),
        ("alertmanager", "harbor.corp:8443/hub/prom/alertmanager:v0.27.0"),
        ("node-exporter", "harbor.corp:8443/hub/prom/node-exporter:v1.8.2"),
        ("grafana", "harbor.corp:8443/hub/grafana/grafana:11.2.2"),
        ("cadvisor", "harbor.corp:8443/gcr/cadvisor/cadvisor:v0.49.1"),
    ] {
        assert_eq!(c["services"][s]["image"].as_str(), Some(image), "{s}");
    }
    let args = &c["services"]["demo-app"]["build"]["args"];
    assert_eq!(
        args["PYTHON_IMAGE"].as_str(),
        Some("harbor.corp:8443/hub/library/python:3.12.7-slim-bookworm")
    );
    assert_eq!(args["PIP_INDEX_URL"].as_str(), Some("http://10.0.2.2:8765/simple"));
    assert_eq!(args["PIP_TRUSTED_HOST"].as_str(), Some("10.0.2.2"), "plain HTTP index: trusted by host");
}

#[test]
fn compose_registry_mode_pins_every_image_and_binds_loopback() {
    let lab = Lab::render("registry", "");
    let c = check_compose(&lab, "registry");
    for s in SERVICES {
        assert!(c["services"][s].get("profiles").is_none(), "registry mode: {s} must start by default");
    }
    for s in ["prometheus", "alertmanager", "grafana", "node-exporter", "cadvisor"] {
        assert!(c["services"][s].get("build").is_none(), "registry mode: {s} is pulled, not built");
    }
    let dockerfile = lab.read("demo-app/Dockerfile");
    // The base is a build arg (so it can come through a registry proxy) whose default and compose value are pinned.
    let from = dockerfile.lines().find(|l| l.starts_with("FROM ")).unwrap();
    assert_eq!(from, "FROM ${PYTHON_IMAGE}");
    let arg = dockerfile.lines().find(|l| l.starts_with("ARG PYTHON_IMAGE=")).unwrap();
    assert!(arg.contains("python:3.") && arg.contains("-slim"), "{arg}");
    let args = &c["services"]["demo-app"]["build"]["args"];
    assert_eq!(args["PYTHON_IMAGE"].as_str(), Some(&arg["ARG PYTHON_IMAGE=".len()..]));
    assert_eq!(args["PIP_INDEX_URL"].as_str(), Some(""), "PyPI unless [provision] pip_index_url");
    assert!(
        dockerfile.contains("\nUSER ") && dockerfile.contains("\nHEALTHCHECK "),
        "non-root + HEALTHCHECK"
    );
    for line in lab.read("demo-app/requirements.txt").lines().filter(|l| !l.trim().is_empty()) {
        assert!(line.contains("=="), "requirement {line:?} is not pinned");
    }
}

#[test]
fn compose_debian_mode_builds_from_the_base_image_and_parks_registry_only_services() {
    let lab = Lab::render("debian", "");
    let c = check_compose(&lab, "debian");
    for s in REGISTRY_ONLY {
        let profiles =
            c["services"][s]["profiles"].as_sequence().unwrap_or_else(|| panic!("{s} needs a profile"));
        assert_eq!(profiles[0].as_str(), Some("registry"), "{s}");
    }
    for s in ["demo-app", "prometheus", "alertmanager", "node-exporter"] {
        let svc = &c["services"][s];
        assert!(svc.get("profiles").is_none(), "{s} must start by default in debian mode");
        let build = &svc["build"];
        let (file, df) = dockerfile(&lab, build);
        assert!(df.contains("FROM provisioner-base:bookworm"), "{s}: {file} not FROM the base image");
        assert!(!df.contains("apt-get") && !df.contains("pip "), "{s}: {file} needs the network");
        for k in ["\nUSER ", "\nHEALTHCHECK ", "\nEXPOSE "] {
            assert!(df.contains(k), "{s}: {file} lacks {}", k.trim());
        }
    }
}

/// The debian-mode Dockerfiles have no `RUN` step (each starts a container in the TCG guest, seconds apiece): the
/// users, dirs and ownership those steps made come from the base rootfs, made on the host by the profile's setup
/// (`provisioner::lab::BASE_SETUP`). Every USER they name exists there (made by a package or by the setup, the demo
/// app's with the registry-mode image's own `useradd`), every WORKDIR is made, and every named volume mounted on one
/// is owned by the service's user (Docker copies the image dir's owner into a new volume).
#[test]
fn debian_mode_dockerfiles_have_no_run_step_and_the_base_setup_makes_what_they_relied_on() {
    let lab = Lab::render("debian", "");
    let c = check_compose(&lab, "debian");
    let setup = provisioner::lab::BASE_SETUP;
    let packages = provisioner::lab::BASE_PACKAGES;
    let named: Vec<&str> = c["volumes"].as_mapping().unwrap().keys().map(|k| k.as_str().unwrap()).collect();
    let registry_app =
        std::fs::read_to_string(support::repo().join("provision/demo-app/Dockerfile")).unwrap();
    for s in ["demo-app", "prometheus", "alertmanager", "node-exporter"] {
        let build = &c["services"][s]["build"];
        let (file, df) = dockerfile(&lab, build);
        let instructions: Vec<(String, &str)> = df
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| {
                let (k, v) = l.split_once(' ').unwrap_or((l, ""));
                (k.to_ascii_uppercase(), v.trim())
            })
            .collect();
        let run: Vec<&str> = instructions.iter().filter(|(k, _)| k == "RUN").map(|(_, v)| *v).collect();
        assert!(run.is_empty(), "{s}: {file} has RUN steps {run:?}; make that in BASE_SETUP on the host");
        let one = |key: &str| instructions.iter().find(|(k, _)| k == key).map(|(_, v)| *v);
        let user = one("USER").unwrap_or_else(|| panic!("{s}: {file} has no USER"));
        match user {
            "nobody" => {}
            "prometheus" => {
                assert!(packages.contains(&"prometheus"), "the prometheus package makes its user")
            }
            u => {
                let made = setup.lines().find(|l| l.starts_with("useradd ") && l.ends_with(&format!(" {u}")));
                let made =
                    made.unwrap_or_else(|| panic!("{s}: USER {u} is made by no package nor BASE_SETUP"));
                assert!(
                    registry_app.contains(made),
                    "{s}: {u} must be the registry-mode image's user (same uid): {made:?}"
                );
            }
        }
        let Some(workdir) = one("WORKDIR") else { continue };
        let made_dir = |cmd: &str| {
            setup.lines().any(|l| l.starts_with(cmd) && l.split_whitespace().any(|w| w == workdir))
        };
        assert!(made_dir("mkdir -p "), "{s}: WORKDIR {workdir} is not made by BASE_SETUP");
        let volumes = c["services"][s]["volumes"].as_sequence().cloned().unwrap_or_default();
        let on_named_volume = volumes.iter().filter_map(Value::as_str).any(|v| {
            let mut parts = v.split(':');
            let (src, dst) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            dst == workdir && named.contains(&src)
        });
        if on_named_volume {
            assert!(
                made_dir(&format!("chown {user}:{user} ")),
                "{s}: {workdir} (a volume) is not owned by {user}"
            );
        }
    }
}

#[test]
fn dashboards_use_the_provisioned_datasource_uid() {
    let lab = Lab::render("debian", "");
    let uid = datasource_uid(&lab);
    let dashboards = lab.dashboards();
    assert_eq!(
        dashboards.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        ["containers.json", "demo-app.json", "host.json"]
    );
    for (name, d) in &dashboards {
        let text = serde_json::to_string(d).unwrap();
        assert!(!text.contains("${DS_"), "{name} uses an import-time datasource variable");
        assert!(d["uid"].as_str().is_some_and(|u| !u.is_empty()), "{name} has no uid");
        let ps = panels(d);
        assert!(ps.len() >= 4, "{name}: {} panels", ps.len());
        for p in ps {
            let title = p["title"].as_str().unwrap_or("?");
            assert_eq!(p["datasource"]["uid"].as_str(), Some(uid.as_str()), "{name}: panel {title}");
            let targets =
                p["targets"].as_array().unwrap_or_else(|| panic!("{name}: panel {title} has no query"));
            for t in targets {
                assert_eq!(t["datasource"]["uid"].as_str(), Some(uid.as_str()), "{name}: {title} target");
                assert!(t["expr"].as_str().is_some_and(|e| !e.is_empty()), "{name}: {title} empty query");
            }
        }
        for v in d["templating"]["list"].as_array().into_iter().flatten() {
            assert_eq!(v["datasource"]["uid"].as_str(), Some(uid.as_str()), "{name}: variable {}", v["name"]);
        }
    }
    let provider = lab.yaml("grafana/provisioning/dashboards/lab.yml");
    assert_eq!(provider["providers"][0]["options"]["path"].as_str(), Some("/etc/grafana/dashboards"));
    let compose = lab.read("docker-compose.yml");
    assert!(compose.contains("./grafana/dashboards:/etc/grafana/dashboards:ro"), "dashboards not mounted");
}

#[test]
fn load_without_a_demo_app_forward_says_how_to_fix_it() {
    let lab = Lab::render("debian", "");
    let cfg_path = lab.dir.path().join("box-config.toml");
    let cfg = std::fs::read_to_string(&cfg_path).unwrap().replace("guest = 8000", "guest = 8001");
    std::fs::write(&cfg_path, cfg).unwrap();
    Test::new()
        .cwd(lab.dir.path())
        .args(["load", "--requests", "1"])
        .run()
        .failure()
        .stderr_contains("forwards no host port to the demo app (guest port 8000)")
        .stderr_contains("hint: add a [[forward]] with guest = 8000, or pass --url");
}

#[test]
fn load_reports_an_unreachable_demo_app_with_a_hint() {
    let port = support::free_port(); // bound then released: nothing listens there
    Test::new()
        .args(["load", "--url", &format!("http://127.0.0.1:{port}"), "--requests", "3", "--duration", "10"])
        .run()
        .failure()
        .stdout_contains("3 requests to")
        .stderr_contains("got an answer")
        .stderr_contains("hint: is the lab up?");
    Test::new()
        .args(["load", "--url", "http://127.0.0.1:1", "--error-ratio", "0.8", "--slow-ratio", "0.5"])
        .run()
        .failure()
        .stderr_contains("sum to at most 1");
}

#[test]
fn env_file_holds_the_secrets_privately() {
    use std::os::unix::fs::PermissionsExt;
    let lab = Lab::render("debian", "");
    let env = lab.read(".env");
    assert_eq!(
        env,
        format!("PROMETHEUS_HEX={TEST_PROMETHEUS_HEX}\nGF_SECURITY_ADMIN_PASSWORD={TEST_GRAFANA_PASSWORD}\n")
    );
    let mode = std::fs::metadata(lab.out.join(".env")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, ".env mode {mode:o}");
    assert!(!env.contains("=admin\n"), "Grafana admin/admin");
}

/// Golden copies of every rendered template (both image modes) and the list of rendered paths with modes.
/// Refresh after an intended change with `UPDATE_GOLDEN=1 cargo nextest run -E 'test(/^lab::golden/)'`.
#[test]
fn golden_rendered_templates() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let golden = support::repo().join("tests/golden/lab");
    let templates: Vec<String> = walkdir::WalkDir::new(support::repo().join("provision"))
        .sort_by_file_name()
        .into_iter()
        .map(|e| e.unwrap())
        .filter_map(|e| {
            let rel = e
                .path()
                .strip_prefix(support::repo().join("provision"))
                .unwrap()
                .to_string_lossy()
                .into_owned();
            rel.strip_suffix(".hbs").map(str::to_string)
        })
        .collect();
    assert!(templates.len() >= 5, "templates: {templates:?}");
    let mut mismatches = Vec::new();
    for images in ["debian", "registry"] {
        let lab = Lab::render(images, "");
        let mut files: Vec<(String, String)> =
            templates.iter().map(|t| (format!("{images}/{t}"), lab.read(t))).collect();
        let listing: String = walkdir::WalkDir::new(&lab.out)
            .sort_by_file_name()
            .into_iter()
            .map(|e| e.unwrap())
            .filter(|e| e.file_type().is_file())
            .map(|e| {
                use std::os::unix::fs::PermissionsExt;
                let mode = e.metadata().unwrap().permissions().mode() & 0o777;
                format!("{mode:o} {}\n", e.path().strip_prefix(&lab.out).unwrap().display())
            })
            .collect();
        files.push((format!("{images}/FILES"), listing));
        for (rel, got) in files {
            let path = golden.join(&rel);
            if update {
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(&path, &got).unwrap();
            } else if std::fs::read_to_string(&path).ok().as_deref() != Some(got.as_str()) {
                mismatches.push(rel);
            }
        }
    }
    assert!(
        mismatches.is_empty(),
        "rendered output differs from tests/golden/lab for {mismatches:?}\n\
         review with `provisioner render --out DIR` and refresh with UPDATE_GOLDEN=1 if intended"
    );
}
