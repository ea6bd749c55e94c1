//! What a workload brings to the generic tool: its HTTP probes, the packages of its container base image, its
//! secrets (made once per machine, seen by templates as `secrets.*`) and an extra health check (a service that
//! reports its scrape targets). The core (config, render, guest, health) takes a [`Profile`] and names no service,
//! port or file of a workload; the shipped monitoring lab is one (`crate::lab::PROFILE`).

use std::path::Path;

use anyhow::Result;

/// A workload as the generic tool sees it: data, and hooks for what needs code.
#[derive(Debug)]
pub struct Profile {
    /// The services' default HTTP probes: (name, path, guest port). `[health.NAME]` in the file overrides one.
    pub probes: &'static [(&'static str, &'static str, u16)],
    /// Packages of the container base image the workload's Dockerfiles build FROM.
    pub base_packages: &'static [&'static str],
    /// The service that reports its scrape targets, whose targets are judged as part of its health.
    pub targets: Option<TargetsCheck>,
    /// The machine's secrets in its state dir (`root`), made and saved on first use.
    pub secrets: fn(root: &Path) -> Result<serde_json::Value>,
    /// Throwaway secrets of the same shape (validation renders the tree without touching the state dir).
    pub sample_secrets: fn() -> serde_json::Value,
}

/// A service whose health includes the scrape targets it reports (Prometheus' `/api/v1/targets` answer shape).
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
