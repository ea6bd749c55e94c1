//! `verify`: bounded load on the demo app, then the alert's journey Prometheus -> Alertmanager -> webhook (the
//! demo app's log), with its timeline. Lab-specific: the alert names, the services and ports are the lab's.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::cli::VerifyArgs;
use crate::config::Config;
use crate::guest::compose::project_name;
use crate::host::shell_quote;
use crate::ui::Ui;

/// When each step of the alert's journey was first seen, in seconds after the traffic started.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Timeline {
    pub pending: Option<f64>,
    pub firing: Option<f64>,
    pub delivered: Option<f64>,
}

/// Render the timeline as the human report. Pure.
pub fn render_timeline(alert: &str, t: &Timeline, requests: u64) -> String {
    let cell = |v: Option<f64>| v.map(|s| format!("{s:>7.1} s")).unwrap_or_else(|| "      never".into());
    format!(
        "alert {alert}\n  traffic start {}  ({requests} requests sent)\n  pending       {}\n  firing        {}\n  \
         delivered     {}  (Alertmanager -> webhook demo-app POST /alerts)\n",
        cell(Some(0.0)),
        cell(t.pending),
        cell(t.firing),
        cell(t.delivered)
    )
}

/// The state Prometheus reports for the alert: "pending", "firing" or None. Pure.
pub fn alert_state(alerts_json: &str, alert: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(alerts_json).ok()?;
    let states: Vec<&str> = v
        .pointer("/data/alerts")?
        .as_array()?
        .iter()
        .filter(|a| a.pointer("/labels/alertname").and_then(|n| n.as_str()) == Some(alert))
        .filter_map(|a| a.get("state").and_then(|s| s.as_str()))
        .collect();
    ["firing", "pending"].iter().find(|s| states.contains(s)).map(|s| s.to_string())
}

/// Alert names of every alerting rule Prometheus loaded. Pure.
pub fn rule_alert_names(rules_json: &str) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(rules_json).unwrap_or_default();
    v.pointer("/data/groups")
        .and_then(|g| g.as_array())
        .into_iter()
        .flatten()
        .flat_map(|g| g.get("rules").and_then(|r| r.as_array()).cloned().unwrap_or_default())
        .filter(|r| r.get("type").and_then(|t| t.as_str()) == Some("alerting"))
        .filter_map(|r| r.get("name").and_then(|n| n.as_str()).map(String::from))
        .collect()
}

/// Whether the demo app's log shows a firing notification for the alert (its POST /alerts logs
/// `alert notification status=firing alerts=["Name", ...]`). Pure.
pub fn delivered_in_log(log: &str, alert: &str) -> bool {
    let quoted = format!("\"{alert}\"");
    log.lines().any(|l| l.contains("alert notification status=firing") && l.contains(&quoted))
}

fn get(url: &str) -> Result<String> {
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(10)).build();
    Ok(agent.get(url).call()?.into_string()?)
}

/// The machines of `project` `verify` uses: the machine of a `[machine]` file is both; else [`pick`].
pub fn machines_of<'a>(
    project: &'a crate::config::Project,
    named: impl FnOnce() -> Result<Option<&'a Config>>,
) -> Result<(&'a Config, &'a Config)> {
    match project.solo() {
        Some(m) => Ok((m, m)),
        None => pick(&project.machines, &project.path, named),
    }
}

/// The machines of a project `verify` uses: `monitor`, the first that forwards Prometheus' port, and `app`, the
/// one `named` picks (asked once the monitor is found) or else the first that forwards the demo app's port.
/// `project` names the file in errors.
pub fn pick<'a>(
    machines: &'a [Config],
    project: &std::path::Path,
    named: impl FnOnce() -> Result<Option<&'a Config>>,
) -> Result<(&'a Config, &'a Config)> {
    let forwards = |c: &&Config, port: u16| c.host_addr_for(port).is_some();
    let monitor = machines.iter().find(|c| forwards(c, super::PROMETHEUS_PORT)).ok_or_else(|| {
        anyhow::anyhow!(
            "no machine of {} forwards Prometheus (guest port {port})\nhint: add a [[machine.forward]] with guest = \
             {port} to the machine that runs it",
            project.display(),
            port = super::PROMETHEUS_PORT
        )
    })?;
    let app = match named()? {
        Some(c) => c,
        None => machines.iter().find(|c| forwards(c, super::DEMO_APP_PORT)).ok_or_else(|| {
            anyhow::anyhow!(
                "no machine of {} forwards the demo app (guest port {port})\nhint: add a [[machine.forward]] with \
                 guest = {port} to an app machine",
                project.display(),
                port = super::DEMO_APP_PORT
            )
        })?,
    };
    Ok((monitor, app))
}

/// `verify` where Prometheus runs on `monitor` and the demo app (the webhook receiver, whose log proves
/// delivery) on `app`: the same machine for the single-machine lab, two machines of a cluster.
pub fn run(ui: &Ui, monitor: &Config, app: &Config, args: &VerifyArgs) -> Result<i32> {
    let cfg = app;
    let state = crate::machine::StateDir::for_config(cfg);
    let endpoint = crate::ssh::Endpoint::for_machine(cfg, &state)?;
    let ssh = crate::ssh::Session::connect(&endpoint, Duration::from_secs(60))?;
    let probes = cfg.health_probes(&super::PROFILE);
    let port_of = |svc: &str, dflt: u16| probes.get(svc).map(|p| p.port).unwrap_or(dflt);
    let url = |svc: &str, dflt: u16, path: &str| {
        let on = if svc == "prometheus" { monitor } else { app };
        crate::health::forwarded_url(on, port_of(svc, dflt), path).with_context(|| {
            format!(
                "{svc}'s port {} is not forwarded\nhint: add a [[forward]] for it in box-config.toml",
                port_of(svc, dflt)
            )
        })
    };
    let prom = url("prometheus", super::PROMETHEUS_PORT, "")?;
    let app = url("demo-app", super::DEMO_APP_PORT, "")?;

    let names = rule_alert_names(&get(&format!("{prom}/api/v1/rules")).context(
        "cannot ask Prometheus for its rules through the forwarded port\nhint: run `provisioner health` first",
    )?);
    if !names.iter().any(|n| n == &args.alert) {
        bail!(
            "Prometheus has no alerting rule named \"{}\"; it has: {}\nhint: pass one of them with --alert",
            crate::text::shown(&args.alert),
            crate::text::shown(&names.join(", "))
        );
    }
    // The demo app is the lab's webhook receiver; its log (read over SSH) proves delivery. Reading it from the
    // guest needs no path from the guest to the host network.
    let project = project_name(&cfg.machine.name);
    let since = ssh.exec_ok("date +%s", Duration::from_secs(20))?.trim().to_string();
    let log_cmd = format!(
        "id=$(sudo -n docker ps -q --filter {} --filter label=com.docker.compose.service=demo-app); \
         [ -n \"$id\" ] && sudo -n docker logs --since {} $id 2>&1",
        shell_quote(&format!("label=com.docker.compose.project={project}")),
        shell_quote(&since)
    );

    let phase = ui.phase("verify");
    let start = Instant::now();
    // Half the requests fail and one in ten is slow, paced so a TCG guest keeps answering: enough for the
    // error-rate and latency rules, and bounded by --timeout in both count and time.
    let load = crate::lab::loadgen::Plan {
        url: app,
        requests: args.timeout * 10,
        duration: Duration::from_secs(args.timeout),
        error_ratio: 0.5,
        slow_ratio: 0.1,
        concurrency: 1,
        request_timeout: Duration::from_secs(10),
        pause: Duration::from_millis(100),
    };
    load.validate().context("--timeout must be at least 1 second")?;
    let control = crate::lab::loadgen::Control::default();
    let mut t = Timeline::default();
    let (result, load_result) = std::thread::scope(|s| {
        let worker = s.spawn(|| crate::lab::loadgen::run_controlled(&load, &control));
        let result = crate::process::wait_until(
            Duration::from_secs(args.timeout),
            "the alert to be delivered",
            || {
                let now = start.elapsed().as_secs_f64();
                match get(&format!("{prom}/api/v1/alerts"))
                    .ok()
                    .and_then(|a| alert_state(&a, &args.alert))
                    .as_deref()
                {
                    Some("pending") if t.pending.is_none() => t.pending = Some(now),
                    Some("firing") if t.firing.is_none() => {
                        t.pending.get_or_insert(now);
                        t.firing = Some(now);
                    }
                    _ => {}
                }
                if t.firing.is_some()
                    && delivered_in_log(&ssh.exec(&log_cmd, Duration::from_secs(30))?.output, &args.alert)
                {
                    t.delivered = Some(now);
                }
                phase.message(&format!("{} requests; {:?}", control.sent.load(Ordering::Relaxed), t));
                Ok(t.delivered.map(|_| ()))
            },
        );
        control.stop.store(true, Ordering::Relaxed);
        (result, worker.join())
    });
    let load_summary = match load_result {
        Ok(summary) => summary?,
        Err(panic) => std::panic::resume_unwind(panic),
    };
    let requests = load_summary.total();
    if result.is_ok() {
        phase.done("alert delivered");
    } else {
        drop(phase);
    }
    if ui.json() {
        let times: BTreeMap<&str, Option<f64>> = BTreeMap::from([
            ("traffic_start", Some(0.0)),
            ("pending", t.pending),
            ("firing", t.firing),
            ("delivered", t.delivered),
        ]);
        println!(
            "{}",
            json!({"event": "verify", "alert": args.alert, "delivered": t.delivered.is_some(), "requests": requests, "timeline": times})
        );
    } else {
        print!("{}", render_timeline(&args.alert, &t, requests));
    }
    if t.delivered.is_some() {
        return Ok(crate::exit::OK);
    }
    ui.warn(format!(
        "{} was not delivered within {} s\nhint: {}",
        args.alert,
        args.timeout,
        match (t.pending, t.firing) {
            (None, _) => "the rule never went pending: is the demo app scraped (`provisioner health` shows targets)? \
                          raise --timeout on a slow (TCG) machine",
            (Some(_), None) => "pending but not firing yet: the rule's `for` is longer than --timeout allowed",
            _ => "firing but not delivered: check Alertmanager (`provisioner ssh -c 'sudo docker logs $(sudo docker \
                  ps -qf name=alertmanager)'`) and its webhook_url",
        }
    ));
    Ok(crate::exit::UNHEALTHY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alert_state_prefers_firing() {
        let j = r#"{"status":"success","data":{"alerts":[
          {"labels":{"alertname":"AppHighErrorRate","instance":"a"},"state":"pending"},
          {"labels":{"alertname":"AppHighErrorRate","instance":"b"},"state":"firing"},
          {"labels":{"alertname":"Other"},"state":"firing"}]}}"#;
        assert_eq!(alert_state(j, "AppHighErrorRate").as_deref(), Some("firing"));
        assert_eq!(alert_state(j, "Missing"), None);
        assert_eq!(alert_state("garbage", "Other"), None);
    }

    #[test]
    fn rule_names_are_alerting_rules_only() {
        let j = r#"{"data":{"groups":[{"rules":[
          {"type":"alerting","name":"InstanceDown"},{"type":"recording","name":"job:x"},
          {"type":"alerting","name":"AppHighErrorRate"}]}]}}"#;
        assert_eq!(rule_alert_names(j), ["InstanceDown", "AppHighErrorRate"]);
        assert!(rule_alert_names("{}").is_empty());
    }

    #[test]
    fn delivery_needs_a_firing_line_naming_the_alert() {
        let log = "INFO alert notification status=resolved alerts=[\"AppHighErrorRate\"]\n\
                   INFO alert notification status=firing alerts=[\"AppHighErrorRateX\"]\n";
        assert!(!delivered_in_log(log, "AppHighErrorRate"));
        let log = format!(
            "{log}INFO alert notification status=firing alerts=[\"AppHighErrorRate\", \"InstanceDown\"]\n"
        );
        assert!(delivered_in_log(&log, "AppHighErrorRate"));
    }

    #[test]
    fn timeline_shows_every_step() {
        let t = Timeline { pending: Some(31.25), firing: Some(152.0), delivered: None };
        let s = render_timeline("AppHighErrorRate", &t, 1200);
        assert!(s.contains("pending          31.2 s"), "{s}");
        assert!(s.contains("firing          152.0 s"), "{s}");
        assert!(s.contains("delivered           never"), "{s}");
        assert!(s.contains("1200 requests"));
    }
}
