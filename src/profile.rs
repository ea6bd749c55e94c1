//! What a workload brings to the generic tool: its HTTP probes, the packages of its container base image, its
//! secrets (made once per machine, seen by templates as `secrets.*`) and an extra health check (a service that
//! reports its scrape targets). The core (config, render, guest, health) takes a [`Profile`] and names no service,
//! port or file of a workload; the shipped monitoring lab (src/lab) provides one.

use std::path::Path;

use anyhow::Result;

/// A workload as the generic tool sees it: data, and hooks for what needs code.
#[derive(Debug)]
pub struct Profile {
    /// The services' default HTTP probes: (name, path, guest port). `[health.NAME]` in the file overrides one.
    pub probes: &'static [(&'static str, &'static str, u16)],
    /// Packages of the container base image the workload's Dockerfiles build FROM.
    pub base_packages: &'static [&'static str],
    /// Shell commands run as root inside the base image's rootfs on the host once its packages are in: the users,
    /// directories and ownership the Dockerfiles would otherwise make in `RUN` steps, each of which starts a
    /// container in the guest (seconds under TCG). Part of the base image's key.
    pub base_setup: &'static str,
    /// The service that reports its scrape targets, whose targets are judged as part of its health.
    pub targets: Option<TargetsCheck>,
    /// The machine's secrets in its state dir (`root`), made and saved on first use.
    pub secrets: fn(root: &Path) -> Result<serde_json::Value>,
    /// Throwaway secrets of the same shape (validation renders the tree without touching the state dir).
    pub sample_secrets: fn() -> serde_json::Value,
}

/// A service whose health includes the scrape targets it reports (an `/api/v1/targets` answer, which the health
/// check parses).
#[derive(Debug, Clone, Copy)]
pub struct TargetsCheck {
    /// The service's name (its probe's port, when the file overrides it, is where the targets are asked).
    pub service: &'static str,
    /// Its guest port when no probe names it.
    pub port: u16,
    /// The HTTP path that answers the active targets.
    pub path: &'static str,
}

impl Profile {
    /// The machine's secrets from its state dir (made on first use).
    pub fn secrets_in(&self, root: &Path) -> Result<serde_json::Value> {
        (self.secrets)(root)
    }

    /// Whether `service` is the one whose scrape targets are judged.
    pub fn reports_targets(&self, service: &str) -> bool {
        self.targets.is_some_and(|t| t.service == service)
    }
}

#[cfg(test)]
mod tests {
    //! The core with a workload that is not the lab: its probes, targets service, secrets and packages are the
    //! profile's, and the core's sources name no lab service or port.

    use std::collections::BTreeMap;
    use std::io::{BufRead, BufReader, Write};
    use std::path::Path;

    use super::*;
    use crate::config::Config;
    use crate::health::{assemble, gather, judge, Checked, ContainerState, Containers, Target, Verdict};

    /// A workload of two services, `web` and `watch`; `watch` reports its scrape targets on port 7001.
    static OTHER: Profile = Profile {
        probes: &[("web", "/up", 7000), ("watch", "/ready", 7001)],
        base_packages: &["busybox"],
        base_setup: "",
        targets: Some(TargetsCheck { service: "watch", port: 7001, path: "/scrape/targets" }),
        secrets: |_| Ok(serde_json::json!({"token": "from-the-state-dir"})),
        sample_secrets: || serde_json::json!({"token": "sample"}),
    };
    /// The same services without a targets check.
    static PLAIN: Profile = Profile { targets: None, ..OTHER };

    fn cfg(extra: &str) -> Config {
        let text = format!("[machine]\nname = \"t\"\n[box]\nimage = \"x.qcow2\"\n{extra}");
        Config::from_bytes(Path::new("box-config.toml"), text.as_bytes()).unwrap()
    }
    fn down(job: &str, instance: &str) -> Target {
        Target {
            job: job.into(),
            instance: instance.into(),
            health: "down".into(),
            last_error: "refused".into(),
        }
    }
    fn answered() -> crate::health::ProbeResult {
        crate::health::ProbeResult { url: "u".into(), status: Some(200), latency_ms: Some(1), error: None }
    }

    #[test]
    fn probes_are_the_profiles_overlaid_by_the_file() {
        let c = cfg("[health.web]\npath = \"/other\"\nport = 7100\n");
        let probes = c.health_probes(&OTHER);
        assert_eq!(probes.keys().collect::<Vec<_>>(), ["watch", "web"]);
        assert_eq!((probes["watch"].path.as_str(), probes["watch"].port), ("/ready", 7001));
        assert_eq!(
            (probes["web"].path.as_str(), probes["web"].port),
            ("/other", 7100),
            "the file's table wins"
        );
    }

    #[test]
    fn the_targets_service_is_the_profiles() {
        let c: Containers = Some(BTreeMap::from([
            ("watch".to_string(), ContainerState { status: "running".into(), ..Default::default() }),
            ("prometheus".to_string(), ContainerState { status: "running".into(), ..Default::default() }),
        ]));
        let ts = vec![down("web", "web:7000")];
        let watch = judge("watch", true, &c, Some(&answered()), 200, Some(&ts), &[], &OTHER);
        assert_eq!(watch.verdict, Verdict::Unhealthy);
        assert_eq!(watch.detail, "target web down (refused); targets 0/1 up");
        // A service of the same name as the lab's targets service is judged like any other under this profile.
        let other = judge("prometheus", true, &c, Some(&answered()), 200, Some(&ts), &[], &OTHER);
        assert_eq!((other.verdict, other.detail.as_str()), (Verdict::Healthy, ""));
        // Without a targets check nobody is judged on targets.
        let plain = judge("watch", true, &c, Some(&answered()), 200, Some(&ts), &[], &PLAIN);
        assert_eq!((plain.verdict, plain.detail.as_str()), (Verdict::Healthy, ""));
    }

    #[test]
    fn deferred_targets_are_noted_on_the_targets_services_row() {
        let checked: Vec<Checked> = ["web", "watch"]
            .iter()
            .map(|s| Checked {
                service: s.to_string(),
                available: true,
                probe: Some(answered()),
                expect: 200,
            })
            .collect();
        let up = Target { health: "up".into(), last_error: String::new(), ..down("web", "web:7000") };
        let ts = vec![up, down("web", "m2:7000")];
        let r = assemble(&checked, &None, Some(ts), &[], &["m2".to_string()], &OTHER);
        assert!(r.healthy, "the deferred target is left out of the verdict");
        assert_eq!(r.services[0].detail, "scraped: up");
        assert_eq!(r.services[1].detail, "targets 1/1 up; 1 target(s) on m2 judged once every machine is up");
    }

    /// A real HTTP server on loopback standing in for the guest's forwarded services: it answers `n` requests,
    /// the targets path with one `up` target, any other with `status(i)` for the i-th request; the paths asked.
    fn serve(
        n: usize,
        status: impl Fn(usize) -> &'static str + Send + 'static,
    ) -> (u16, std::thread::JoinHandle<Vec<String>>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let mut paths = Vec::new();
            for i in 0..n {
                let (mut s, _) = listener.accept().unwrap();
                let mut line = String::new();
                BufReader::new(&s).read_line(&mut line).unwrap();
                let path = line.split(' ').nth(1).unwrap_or("").to_string();
                let (status, body) = if path == "/scrape/targets" {
                    (
                        "200 OK",
                        r#"{"status":"success","data":{"activeTargets":[{"labels":{"job":"web","instance":"web:7000"},"health":"up","lastError":""}]}}"#,
                    )
                } else {
                    (status(i), "ok")
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                s.write_all(head.as_bytes()).and_then(|()| s.write_all(body.as_bytes())).unwrap();
                paths.push(path);
            }
            paths
        });
        (port, server)
    }

    /// `gather` asks the targets at the profile's path, through the forward of the profile's port (a real HTTP
    /// server on loopback standing in for the guest's forwarded service).
    #[test]
    fn targets_are_asked_at_the_profiles_port_and_path() {
        // One request for the targets, one for `watch`'s probe.
        let (port, server) = serve(2, |_| "200 OK");
        let c = cfg(&format!("[[forward]]\nguest = 7001\nhost = {port}\n"));
        let r = gather(&c, &OTHER, None, &["watch".to_string()], &[], &[], None);
        let mut paths = server.join().unwrap();
        // Both asked, at once (a round's checks run concurrently).
        paths.sort();
        assert_eq!(paths, ["/ready", "/scrape/targets"]);
        assert_eq!(r.targets.as_ref().map(|t| t.len()), Some(1));
        assert_eq!(
            (r.services[0].verdict, r.services[0].detail.as_str()),
            (Verdict::Healthy, "targets 1/1 up")
        );
    }

    /// A round's host half started early ([`crate::health::HostChecks`], as after a restore) is what that round
    /// judges: it is not asked again, and the next round asks afresh.
    #[test]
    fn a_round_started_early_is_judged_on_its_answers_and_the_next_asks_again() {
        // The early round's probe gets 503 (its first two requests: the probe and the targets); the next round 200.
        let (port, server) = serve(4, |i| if i < 2 { "503 Service Unavailable" } else { "200 OK" });
        let c = cfg(&format!("[[forward]]\nguest = 7001\nhost = {port}\n"));
        let watch = ["watch".to_string()];
        let early = crate::health::HostChecks::start(&c, &OTHER, &watch, &[]);
        let first = gather(&c, &OTHER, None, &watch, &[], &[], Some(early));
        assert!(!first.healthy, "judged on the early answers (503)");
        assert_eq!(first.services[0].probe.as_ref().and_then(|p| p.status), Some(503));
        let second = gather(&c, &OTHER, None, &watch, &[], &[], None);
        assert_eq!(second.services[0].probe.as_ref().and_then(|p| p.status), Some(200));
        assert!(second.healthy);
        // Four requests in all: the first round asked nothing besides the early ones.
        assert_eq!(server.join().unwrap().len(), 4);
    }

    #[test]
    fn render_and_the_base_image_take_the_profiles_secrets_and_packages() {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("app.env.hbs"), "TOKEN={{secrets.token}}\n").unwrap();
        let c = cfg("");
        let state = t.path().join("state");
        let r = crate::render::render_tree(&c, t.path(), &OTHER.secrets_in(&state).unwrap()).unwrap();
        assert_eq!(
            r.get("app.env").map(|f| String::from_utf8_lossy(&f.contents).into_owned()).as_deref(),
            Some("TOKEN=from-the-state-dir\n")
        );
        let other = crate::guest::images::BaseImage::for_config(&c, &OTHER);
        let plain = crate::guest::images::BaseImage::for_config(&c, &PLAIN);
        let with_curl = Profile { base_packages: &["busybox", "curl"], ..PLAIN };
        assert_eq!(other.packages, ["busybox"]);
        assert_eq!(other.key, plain.key, "same packages, same image");
        assert_ne!(other.key, crate::guest::images::BaseImage::for_config(&c, &with_curl).key);
    }

    /// The core (config, render, guest, health and this file) names no service, port or module of the lab outside
    /// its tests: the lab reaches it only as a [`Profile`].
    #[test]
    fn the_core_names_no_lab_service_or_port() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = vec![
            root.join("config.rs"),
            root.join("render.rs"),
            root.join("health.rs"),
            root.join("profile.rs"),
        ];
        for dir in ["config", "render", "guest"] {
            for e in std::fs::read_dir(root.join(dir)).unwrap() {
                files.push(e.unwrap().path());
            }
        }
        const NAMES: &[&str] = &[
            "crate::lab",
            "prometheus",
            "alertmanager",
            "grafana",
            "cadvisor",
            "node-exporter",
            "node_exporter",
            "demo-app",
            "demo_app",
            "loadgen",
            "9090",
            "9093",
            "3000",
            "8000",
            "9100",
            "8080",
        ];
        let mut found = Vec::new();
        for f in files.iter().filter(|f| f.extension().is_some_and(|e| e == "rs")) {
            let text = std::fs::read_to_string(f).unwrap();
            // Tests may use the lab as a realistic fixture; the code above them may not name it.
            let code = text.split("#[cfg(test)]").next().unwrap().to_lowercase();
            for (n, line) in code.lines().enumerate() {
                for name in NAMES.iter().filter(|name| line.contains(*name)) {
                    found.push(format!("{}:{}: {name}", f.display(), n + 1));
                }
            }
        }
        assert!(found.is_empty(), "the core names the lab:\n{}", found.join("\n"));
    }
}
