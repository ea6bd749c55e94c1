//! Health of every service of the machine's workload: container state from the guest, an HTTP probe through the
//! forwarded port, and the scrape targets of the service that reports them (the profile's extra check, see
//! [`crate::profile::TargetsCheck`]). Retried until a deadline, then a table (or JSON).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::json;

use crate::config::Config;
use crate::profile::Profile;
use crate::ssh::Session;
use crate::ui::Ui;

/// Overall verdict for one service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Verdict {
    Healthy,
    Unhealthy,
    /// Not startable in this image mode (no image source offline); shown, never failed.
    UnavailableOffline,
}

pub(crate) use crate::guest::{parse_inspect, ContainerState};

/// One HTTP probe through the forwarded port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct ProbeResult {
    pub url: String,
    pub status: Option<u16>,
    pub latency_ms: Option<u64>,
    pub error: Option<String>,
}

/// One scrape target as the profile's targets service reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct Target {
    pub job: String,
    pub instance: String,
    /// up | down | unknown
    pub health: String,
    pub last_error: String,
}

/// One row of the table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct ServiceHealth {
    pub service: String,
    pub verdict: Verdict,
    /// None when the guest could not be asked (no SSH).
    pub container: Option<ContainerState>,
    pub probe: Option<ProbeResult>,
    pub detail: String,
}

/// Everything one round of checks found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct Report {
    pub healthy: bool,
    pub services: Vec<ServiceHealth>,
    /// The targets service's active targets (None when it could not be asked).
    pub targets: Option<Vec<Target>>,
    /// Targets on other machines of a multi-machine `up` that were still coming up: not judged in this round
    /// (the run judges them in its final round, once every machine is up).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub deferred: Vec<Target>,
}

/// Parse a `/api/v1/targets` answer (`data.activeTargets[]`: `labels.job`, `labels.instance`, `health`,
/// `lastError`). Pure.
pub(crate) fn parse_targets(json_text: &str) -> Result<Vec<Target>> {
    let v: serde_json::Value = serde_json::from_str(json_text).context("parse the scrape targets")?;
    let s = |t: &serde_json::Value, p: &str| t.pointer(p).and_then(|x| x.as_str()).unwrap_or("").to_string();
    Ok(v.pointer("/data/activeTargets")
        .and_then(|a| a.as_array())
        .context("the targets answer has no data.activeTargets")?
        .iter()
        .map(|t| Target {
            job: s(t, "/labels/job"),
            instance: s(t, "/labels/instance"),
            health: s(t, "/health"),
            last_error: s(t, "/lastError"),
        })
        .collect())
}

/// Whether a target scrapes this service (job named like it, or its instance host is the service name).
fn target_of(t: &Target, service: &str) -> bool {
    t.job == service || t.instance.split(':').next() == Some(service)
}

/// Split the scrape targets into the ones judged now and the ones on `deferred_hosts` (names, host names and
/// addresses of machines still coming up in this run). Pure.
pub(crate) fn split_deferred(targets: Vec<Target>, deferred_hosts: &[String]) -> (Vec<Target>, Vec<Target>) {
    targets.into_iter().partition(|t| {
        let host = t.instance.rsplit_once(':').map_or(t.instance.as_str(), |(h, _)| h);
        !deferred_hosts.iter().any(|d| d == host)
    })
}

/// What the guest said about containers: `None` = could not ask; `Some(map)` = the answer.
pub(crate) type Containers = Option<BTreeMap<String, ContainerState>>;

/// Judge one service from what was gathered; the profile's targets service is judged on its targets too. Pure.
#[allow(clippy::too_many_arguments)]
pub(crate) fn judge(
    service: &str,
    available: bool,
    containers: &Containers,
    probe: Option<&ProbeResult>,
    expect_status: u16,
    targets: Option<&[Target]>,
    unavailable: &[String],
    profile: &Profile,
) -> ServiceHealth {
    let container = containers.as_ref().map(|m| m.get(service).cloned().unwrap_or_default());
    if !available {
        return ServiceHealth {
            service: service.into(),
            verdict: Verdict::UnavailableOffline,
            container,
            probe: None,
            detail: "no image source offline (images = \"debian\"); use images = \"registry\" where a registry is \
                     reachable"
                .into(),
        };
    }
    let mut problems = Vec::new();
    let mut notes = Vec::new();
    let answered = probe.is_some_and(|p| p.status == Some(expect_status));
    if let Some(c) = &container {
        if c.status.is_empty() {
            problems.push("no container".to_string());
        } else if c.status != "running" {
            problems.push(format!("container {}", c.status));
        } else if c.health.as_deref() == Some("starting") && answered {
            // Docker (20.10, the guest's: no `start_interval`) runs a container's first check one `interval`
            // after the start (30 s in the lab): until then "starting" is only that timer. The probe answered
            // through the forward just now, so it decides; an "unhealthy" check still fails the row.
            notes.push("healthcheck starting, the probe answered".to_string());
        } else if let Some(h) = c.health.as_deref().filter(|h| *h != "healthy") {
            problems.push(format!("healthcheck {h}"));
        }
    }
    match probe {
        Some(p) => match (p.status, &p.error) {
            (Some(s), _) if s == expect_status => {}
            (Some(s), _) => problems.push(format!("HTTP {s}, expected {expect_status}")),
            (None, Some(e)) => problems.push(e.clone()),
            (None, None) => problems.push("no answer".into()),
        },
        None => problems.push("no probe configured: add [health.<service>] with path and port".into()),
    }
    if let Some(ts) = targets {
        if profile.reports_targets(service) {
            let relevant: Vec<&Target> =
                ts.iter().filter(|t| !unavailable.iter().any(|u| target_of(t, u))).collect();
            let up = relevant.iter().filter(|t| t.health == "up").count();
            if relevant.is_empty() {
                problems.push("no active scrape targets yet".into());
            } else {
                notes.push(format!("targets {up}/{} up", relevant.len()));
            }
            for t in relevant.iter().filter(|t| t.health != "up") {
                problems.push(format!("target {} {} ({})", t.job, t.health, t.last_error));
            }
        } else if let Some(t) = ts.iter().find(|t| target_of(t, service)) {
            notes.push(format!("scraped: {}", t.health));
        }
    }
    if let Some(c) = container.as_ref().filter(|c| c.restarts > 0) {
        notes.push(format!("{} restarts", c.restarts));
    }
    let verdict = if problems.is_empty() { Verdict::Healthy } else { Verdict::Unhealthy };
    problems.extend(notes);
    ServiceHealth {
        service: service.into(),
        verdict,
        container,
        probe: probe.cloned(),
        detail: problems.join("; "),
    }
}

fn state_cell(s: &ServiceHealth) -> String {
    match (&s.verdict, &s.container) {
        (Verdict::UnavailableOffline, _) => "unavailable offline".into(),
        (_, None) => "?".into(),
        (_, Some(c)) if c.status.is_empty() => "missing".into(),
        (_, Some(c)) => match &c.health {
            Some(h) => format!("{} ({h})", c.status),
            None => c.status.clone(),
        },
    }
}

/// The human table: service | state | probe | latency | detail. Pure.
pub(crate) fn render_table(r: &Report) -> String {
    let rows: Vec<[String; 5]> = r
        .services
        .iter()
        .map(|s| {
            let mark = match s.verdict {
                Verdict::Healthy => "✓",
                Verdict::Unhealthy => "✗",
                Verdict::UnavailableOffline => "-",
            };
            let probe = match &s.probe {
                Some(ProbeResult { status: Some(code), .. }) => code.to_string(),
                Some(ProbeResult { error: Some(_), .. }) => "error".into(),
                _ => "-".into(),
            };
            let latency = s
                .probe
                .as_ref()
                .and_then(|p| p.latency_ms)
                .map(|ms| format!("{ms} ms"))
                .unwrap_or("-".into());
            // Service names come from the rendered compose file and details from the network: shown safely.
            let detail = s.detail.chars().filter(|c| !c.is_control()).collect::<String>();
            [format!("{mark} {}", crate::text::shown(&s.service)), state_cell(s), probe, latency, detail]
        })
        .collect();
    let head = ["SERVICE", "STATE", "PROBE", "LATENCY", "DETAIL"].map(String::from);
    let mut widths = head.clone().map(|h| h.chars().count());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[String; 5]| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i == 4 {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell}{}  ", " ".repeat(w - cell.chars().count())));
            }
        }
        s.trim_end().to_string()
    };
    let mut out = line(&head);
    out.push('\n');
    for row in &rows {
        out.push_str(&line(row));
        out.push('\n');
    }
    let bad = r.services.iter().filter(|s| s.verdict == Verdict::Unhealthy).count();
    let off = r.services.iter().filter(|s| s.verdict == Verdict::UnavailableOffline).count();
    out.push_str(&if r.healthy {
        format!("healthy: every available service is up ({off} unavailable offline)\n")
    } else {
        format!("UNHEALTHY: {bad} service(s) failing; see DETAIL (hint: `provisioner ssh -c 'sudo docker ps -a'`)\n")
    });
    out
}

/// The JSON document (`--json`). Pure.
pub(crate) fn to_json(r: &Report) -> serde_json::Value {
    let mut v = serde_json::to_value(r).expect("report serializes");
    v.as_object_mut().expect("object").insert("event".into(), json!("health"));
    v
}

/// One HTTP GET with a timeout, measuring latency; never an error (failures are data).
pub(crate) fn http_probe(url: &str, timeout: Duration) -> ProbeResult {
    let agent = ureq::AgentBuilder::new().timeout(timeout).redirects(0).build();
    let start = Instant::now();
    let res = agent.get(url).call();
    let latency_ms = Some(start.elapsed().as_millis() as u64);
    match res {
        Ok(r) => ProbeResult { url: url.into(), status: Some(r.status()), latency_ms, error: None },
        Err(ureq::Error::Status(code, _)) => {
            ProbeResult { url: url.into(), status: Some(code), latency_ms, error: None }
        }
        Err(e) => {
            ProbeResult { url: url.into(), status: None, latency_ms: None, error: Some(short_error(&e)) }
        }
    }
}

fn short_error(e: &ureq::Error) -> String {
    let s = e.to_string();
    if s.contains("Connection refused") {
        "connection refused".into()
    } else if s.contains("timed out") || s.contains("WouldBlock") {
        "timed out".into()
    } else {
        s.rsplit(": ").next().unwrap_or(&s).to_string()
    }
}

/// URL on the host that reaches a guest port through its forward.
pub(crate) fn forwarded_url(cfg: &Config, guest_port: u16, path: &str) -> Option<String> {
    cfg.host_addr_for(guest_port).map(|(ip, port)| format!("http://{ip}:{port}{path}"))
}

/// Service names to report: (available, unavailable offline). From the rendered compose file when it renders,
/// else the probe table (every entry available).
pub(crate) fn services(cfg: &Config, profile: &'static Profile) -> (Vec<String>, Vec<String>) {
    let state = crate::machine::StateDir::for_config(cfg);
    // `auto`: the mode the last provisioning ran in.
    let cfg = &match image_mode(cfg) {
        Some(r) if cfg.provision.images == crate::config::ImageSource::Auto => cfg.with_images(r.mode),
        _ => cfg.clone(),
    };
    match crate::guest::Lab::render(cfg, &state, profile) {
        Ok(lab) => lab.services(cfg),
        Err(_) => (cfg.health_probes(profile).into_keys().collect(), Vec::new()),
    }
}

/// The image mode the machine's lab last ran in, and why (`.provisioner/images.json`).
pub(crate) fn image_mode(cfg: &Config) -> Option<crate::guest::registry::Resolved> {
    crate::guest::registry::ImagesRecord::load(&crate::guest::registry::state_root(cfg)).resolved
}

/// Container state of every compose service of this machine's project.
pub(crate) fn containers(ssh: &Session, project: &str) -> Result<BTreeMap<String, ContainerState>> {
    parse_inspect(&crate::guest::containers_json(ssh, project)?)
}

/// The host's half of a health round: every HTTP probe through the forwards and the scrape targets, each on its
/// own thread from [`HostChecks::start`]. A round ([`gather`]) starts one and asks the guest meanwhile; a machine
/// just restored from a capture starts its first one as soon as it is logged in ([`check_deferring`]'s `early`), so
/// the probes' first answers (up to a second under TCG: every path in the guest runs cold) come during the checks'
/// round trip.
pub(crate) struct HostChecks {
    probes: Vec<(String, bool, u16, Option<std::thread::JoinHandle<ProbeResult>>)>,
    targets: std::thread::JoinHandle<Option<Vec<Target>>>,
}

impl HostChecks {
    pub(crate) fn start(
        cfg: &Config,
        profile: &Profile,
        available: &[String],
        unavailable: &[String],
    ) -> HostChecks {
        let probes = cfg.health_probes(profile);
        let targets_url = profile.targets.and_then(|t| {
            let port = probes.get(t.service).map(|p| p.port).unwrap_or(t.port);
            forwarded_url(cfg, port, t.path)
        });
        let targets = std::thread::spawn(move || {
            let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(5)).build();
            let body = agent.get(&targets_url?).call().ok()?.into_string().ok()?;
            parse_targets(&body).ok()
        });
        let probes = available
            .iter()
            .chain(unavailable)
            .map(|name| {
                let is_available = available.contains(name);
                let probe = probes.get(name);
                let expect = probe.map(|p| p.expect_status).unwrap_or(200);
                let run = probe.filter(|_| is_available).map(|p| {
                    let url = forwarded_url(cfg, p.port, &p.path);
                    let (timeout, port, path) = (Duration::from_secs(p.timeout_secs), p.port, p.path.clone());
                    std::thread::spawn(move || match url {
                        Some(url) => http_probe(&url, timeout),
                        None => ProbeResult {
                            url: format!("guest:{port}{path}"),
                            status: None,
                            latency_ms: None,
                            error: Some(format!(
                                "guest port {port} is not forwarded: add a [[forward]] for it"
                            )),
                        },
                    })
                });
                (name.clone(), is_available, expect, run)
            })
            .collect();
        HostChecks { probes, targets }
    }

    /// Every probe's result (waited for; each is bounded by its timeout) and the scrape targets.
    fn finish(self) -> (Vec<Checked>, Option<Vec<Target>>) {
        let checked = self
            .probes
            .into_iter()
            .map(|(service, available, expect, run)| Checked {
                service,
                available,
                probe: run.map(|h| h.join().expect("a health probe thread panicked")),
                expect,
            })
            .collect();
        (checked, self.targets.join().expect("the targets probe thread panicked"))
    }
}

/// One round of every check, leaving out of the verdict the scrape targets on `deferred_hosts` (see
/// [`split_deferred`]; empty: every target is judged). `host`: the round's host half, when already started.
pub(crate) fn gather(
    cfg: &Config,
    profile: &Profile,
    ssh: Option<&Session>,
    available: &[String],
    unavailable: &[String],
    deferred_hosts: &[String],
    host: Option<HostChecks>,
) -> Report {
    let project = crate::guest::compose::project_name(&cfg.machine.name);
    // The guest's container states (one exec) are asked while every HTTP probe runs: a round takes as long as its
    // slowest check, not their sum.
    let host = host.unwrap_or_else(|| HostChecks::start(cfg, profile, available, unavailable));
    let containers: Containers = ssh.and_then(|s| containers(s, &project).ok());
    let (checked, targets) = host.finish();
    assemble(&checked, &containers, targets, unavailable, deferred_hosts, profile)
}

/// What one round found for one service before it is judged.
#[derive(Debug, Clone)]
pub(crate) struct Checked {
    pub service: String,
    pub available: bool,
    pub probe: Option<ProbeResult>,
    pub expect: u16,
}

/// The report of one round: every service judged, the scrape targets on `deferred_hosts` left out of the
/// verdict (and listed as deferred, on the targets service's row). Pure.
pub(crate) fn assemble(
    checked: &[Checked],
    containers: &Containers,
    targets: Option<Vec<Target>>,
    unavailable: &[String],
    deferred_hosts: &[String],
    profile: &Profile,
) -> Report {
    let (targets, deferred) = match targets {
        Some(ts) => {
            let (judged, deferred) = split_deferred(ts, deferred_hosts);
            (Some(judged), deferred)
        }
        None => (None, Vec::new()),
    };
    let mut services: Vec<ServiceHealth> = checked
        .iter()
        .map(|c| {
            judge(
                &c.service,
                c.available,
                containers,
                c.probe.as_ref(),
                c.expect,
                targets.as_deref(),
                unavailable,
                profile,
            )
        })
        .collect();
    if !deferred.is_empty() {
        if let Some(s) = services.iter_mut().find(|s| profile.reports_targets(&s.service)) {
            let mut hosts: Vec<&str> = Vec::new();
            for t in &deferred {
                let host = t.instance.rsplit_once(':').map_or(t.instance.as_str(), |(h, _)| h);
                if !hosts.contains(&host) {
                    hosts.push(host);
                }
            }
            let note = format!(
                "{} target(s) on {} judged once every machine is up",
                deferred.len(),
                hosts.join(", ")
            );
            s.detail = if s.detail.is_empty() { note } else { format!("{}; {note}", s.detail) };
        }
    }
    let healthy = services.iter().all(|s| s.verdict != Verdict::Unhealthy);
    // Shown with every target; the verdict above left the deferred ones out.
    let targets = targets.map(|mut ts| {
        ts.extend(deferred.iter().cloned());
        ts
    });
    Report { healthy, services, targets, deferred }
}

/// Probe everything; print the table; Ok(true) when every available service is healthy.
pub(crate) fn check(
    cfg: &Config,
    profile: &'static Profile,
    ssh: Option<&Session>,
    ui: &Ui,
    timeout: Duration,
) -> Result<bool> {
    let (available, unavailable) = services(cfg, profile);
    check_services(cfg, profile, ssh, ui, timeout, &available, &unavailable)
}

/// [`check`] for services already known (from the run's [`crate::guest::Lab`]), so nothing is rendered again.
pub(crate) fn check_services(
    cfg: &Config,
    profile: &Profile,
    ssh: Option<&Session>,
    ui: &Ui,
    timeout: Duration,
    available: &[String],
    unavailable: &[String],
) -> Result<bool> {
    Ok(check_deferring(cfg, profile, ssh, ui, timeout, available, unavailable, &[], None)?.healthy)
}

/// [`check_services`] leaving the scrape targets on `deferred_hosts` out of the verdict (a multi-machine `up`
/// while those machines are still coming up); the last round's report. `early`: the first round's host half,
/// started before (see [`HostChecks`]); only where nothing in the guest changed since it started.
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_deferring(
    cfg: &Config,
    profile: &Profile,
    ssh: Option<&Session>,
    ui: &Ui,
    timeout: Duration,
    available: &[String],
    unavailable: &[String],
    deferred_hosts: &[String],
    mut early: Option<HostChecks>,
) -> Result<Report> {
    let phase = ui.phase("health");
    let mut last = None;
    let healthy = crate::process::wait_until(timeout, "every lab service healthy", || {
        let r = gather(cfg, profile, ssh, available, unavailable, deferred_hosts, early.take());
        let bad: Vec<&str> = r
            .services
            .iter()
            .filter(|s| s.verdict == Verdict::Unhealthy)
            .map(|s| s.service.as_str())
            .collect();
        if !r.healthy {
            phase.message(&format!("waiting for {}", bad.join(", ")));
            // With --json, what each round still waits for (and why): where a slow health phase spends its time.
            let waiting: serde_json::Map<String, serde_json::Value> = r
                .services
                .iter()
                .filter(|s| s.verdict == Verdict::Unhealthy)
                .map(|s| (s.service.clone(), serde_json::json!(s.detail)))
                .collect();
            ui.event("health_waiting", serde_json::json!({"services": waiting}));
        }
        let ok = r.healthy;
        last = Some(r);
        Ok(ok.then_some(()))
    })
    .is_ok();
    let report = last.expect("gathered at least once");
    if healthy {
        phase.done(&format!("{} services healthy", available.len()));
    } else {
        drop(phase);
    }
    let mode = image_mode(cfg);
    if ui.json() {
        let mut doc = to_json(&report);
        if let Some(m) = ui.machine() {
            doc["machine"] = serde_json::json!(m);
        }
        if let Some(r) = &mode {
            doc["images"] = serde_json::json!({"mode": r.mode.as_str(), "reason": r.reason});
        }
        println!("{doc}");
    } else {
        if let Some(m) = ui.machine() {
            println!("{m}:");
        }
        print!("{}", render_table(&report));
        if let Some(r) = &mode {
            println!("images: {} mode ({})", r.mode.as_str(), r.reason);
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_probe_against_a_real_listener() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            use std::io::{Read, Write};
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            s.write_all(
                b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            )
            .unwrap();
        });
        let r = http_probe(&format!("http://127.0.0.1:{port}/-/ready"), Duration::from_secs(5));
        server.join().unwrap();
        assert_eq!(r.status, Some(503));
        assert!(r.latency_ms.is_some());
        // Nothing listens any more: refused, as data, not an error.
        let r = http_probe(&format!("http://127.0.0.1:{port}/"), Duration::from_secs(5));
        assert_eq!(r.status, None);
        assert_eq!(r.error.as_deref(), Some("connection refused"));
    }
}
