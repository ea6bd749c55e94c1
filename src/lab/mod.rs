//! Everything specific to the shipped monitoring lab, behind one module so the tool's core (config, providers,
//! SSH, guest upload, compose, health) stays generic: its services and probes, ports, the alert `verify` waits for,
//! the load it drives, its secrets and the packages of its base image.

pub mod loadgen;
pub mod secrets;
pub mod verify;

#[cfg(test)]
mod health_tests;

use crate::profile::{Profile, TargetsCheck};

/// The lab as a profile of the generic tool: its probes, base packages, secrets and Prometheus' targets judged
/// as part of Prometheus' health.
pub const PROFILE: Profile = Profile {
    probes: PROBES,
    base_packages: BASE_PACKAGES,
    base_setup: BASE_SETUP,
    targets: Some(TargetsCheck {
        service: "prometheus",
        port: PROMETHEUS_PORT,
        path: "/api/v1/targets?state=active",
    }),
    secrets: secrets::Secrets::json_in,
    sample_secrets: secrets::Secrets::sample_json,
};

/// The lab's services: (name, HTTP path, guest port).
pub const PROBES: &[(&str, &str, u16)] = &[
    ("demo-app", "/health", 8000),
    ("prometheus", "/-/ready", 9090),
    ("alertmanager", "/-/ready", 9093),
    ("grafana", "/api/health", 3000),
    // Its landing page, not `/metrics`: a scrape runs every collector, 1-2 s of guest CPU under TCG on each
    // health round, where Prometheus' targets (judged with prometheus' row) already say whether it scrapes.
    ("node-exporter", "/", 9100),
    ("cadvisor", "/healthz", 8080),
];

/// The demo app's port in the guest (the webhook receiver, the target of `load` and `verify`).
pub const DEMO_APP_PORT: u16 = 8000;
/// Prometheus' port in the guest.
pub const PROMETHEUS_PORT: u16 = 9090;

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

/// Made in the base image's rootfs on the host (see [`crate::profile::Profile::base_setup`]), so the debian-mode
/// Dockerfiles (`provision/images/*/Dockerfile`, `provision/demo-app/Dockerfile.debian`) have no `RUN` step:
/// Prometheus' and Alertmanager's data dirs owned by the `prometheus` user their packages made (the services run as
/// that user), the demo app's dir, and its system user `app` with the uid of the registry-mode image (10001). The
/// rule and config checkers promtool and amtool (67 of 280 MB) go: no service runs them, and `docker import` in
/// the guest costs by the size (the lab's tests run the host's own, tests/lab.rs). Last, what the demo app's
/// start imports is byte-compiled: its own imports (`provision/demo-app/app.py`, kept in step by a test) and
/// gunicorn's with the thread worker (`gunicorn.conf.py`: `threads` > 1). The build script drops Debian's caches
/// (every installed module); without them the app compiled Flask, Werkzeug, Jinja2 and the stdlib it uses at every
/// start: 9 of its 12 s under TCG, for 8 MB of `.pyc`.
pub const BASE_SETUP: &str = "\
mkdir -p /prometheus /alertmanager /app
chown prometheus:prometheus /prometheus /alertmanager
useradd --system --uid 10001 --no-create-home app
rm -f /usr/bin/promtool /usr/bin/amtool
python3 -c 'import json, logging, os, random, time, flask, prometheus_client, werkzeug.middleware.dispatcher, \
gunicorn.app.wsgiapp, gunicorn.glogging, gunicorn.workers.gthread'
";

#[cfg(test)]
mod tests {
    /// The modules the base image byte-compiles: the names in its setup's `python3 -c 'import ...'`. Pure.
    fn precompiled() -> Vec<String> {
        let line = super::BASE_SETUP
            .lines()
            .find_map(|l| l.strip_prefix("python3 -c 'import "))
            .expect("the setup byte-compiles the demo app's imports");
        line.trim_end_matches('\'').split(',').map(|m| m.trim().to_string()).collect()
    }

    /// Every module `provision/demo-app/app.py` imports at its top level is compiled in the base image, so the
    /// app's start compiles nothing of Flask's or the stdlib's under TCG; a new import without a line in the setup
    /// fails here.
    #[test]
    fn the_base_image_compiles_every_module_the_demo_app_imports() {
        let app = include_str!("../../provision/demo-app/app.py");
        let compiled = precompiled();
        let mut imports = Vec::new();
        for line in app.lines() {
            if let Some(rest) = line.strip_prefix("import ") {
                imports.extend(rest.split(',').map(|m| m.split(" as ").next().unwrap().trim().to_string()));
            } else if let Some(rest) = line.strip_prefix("from ") {
                imports.push(rest.split_whitespace().next().unwrap().to_string());
            }
        }
        assert!(imports.len() >= 8, "found only {imports:?} in app.py");
        for m in &imports {
            assert!(
                compiled.contains(m),
                "app.py imports {m}, which the base image does not compile: {compiled:?}"
            );
        }
        assert!(compiled.iter().any(|m| m == "gunicorn.workers.gthread"), "{compiled:?}");
    }
}
