//! The generic health check judged with the lab's profile: Prometheus' targets count in Prometheus' health.

use std::collections::BTreeMap;

use super::PROFILE;
use crate::health::*;

fn running(health: Option<&str>) -> ContainerState {
    ContainerState { status: "running".into(), health: health.map(String::from), restarts: 0 }
}
fn ok_probe(ms: u64) -> ProbeResult {
    ProbeResult { url: "http://127.0.0.1:1/x".into(), status: Some(200), latency_ms: Some(ms), error: None }
}
fn target(job: &str, instance: &str, health: &str) -> Target {
    Target { job: job.into(), instance: instance.into(), health: health.into(), last_error: String::new() }
}

fn sample() -> Report {
    let containers: Containers = Some(BTreeMap::from([
        ("demo-app".to_string(), running(Some("healthy"))),
        ("prometheus".to_string(), ContainerState { restarts: 2, ..running(None) }),
        ("alertmanager".to_string(), ContainerState { status: "exited".into(), health: None, restarts: 5 }),
    ]));
    let targets = vec![
        target("demo-app", "demo-app:8000", "up"),
        target("prometheus", "localhost:9090", "up"),
        target("cadvisor", "cadvisor:8080", "down"),
    ];
    let unavailable = vec!["grafana".to_string(), "cadvisor".to_string()];
    let refused = ProbeResult {
        url: "u".into(),
        status: None,
        latency_ms: None,
        error: Some("connection refused".into()),
    };
    let services = vec![
        judge(
            "demo-app",
            true,
            &containers,
            Some(&ok_probe(12)),
            200,
            Some(&targets),
            &unavailable,
            &PROFILE,
        ),
        judge(
            "prometheus",
            true,
            &containers,
            Some(&ok_probe(3)),
            200,
            Some(&targets),
            &unavailable,
            &PROFILE,
        ),
        judge("alertmanager", true, &containers, Some(&refused), 200, Some(&targets), &unavailable, &PROFILE),
        judge("grafana", false, &containers, None, 200, Some(&targets), &unavailable, &PROFILE),
    ];
    let healthy = services.iter().all(|s| s.verdict != Verdict::Unhealthy);
    Report { healthy, services, targets: Some(targets), deferred: Vec::new() }
}

#[test]
fn judge_rules() {
    let r = sample();
    let v: Vec<Verdict> = r.services.iter().map(|s| s.verdict).collect();
    assert_eq!(v, [Verdict::Healthy, Verdict::Healthy, Verdict::Unhealthy, Verdict::UnavailableOffline]);
    assert!(!r.healthy);
    assert_eq!(r.services[1].detail, "targets 2/2 up; 2 restarts", "cadvisor's target is excluded");
    assert_eq!(r.services[2].detail, "container exited; connection refused; 5 restarts");
}

#[test]
fn judge_catches_wrong_status_unhealthy_check_and_down_target() {
    let c: Containers = Some(BTreeMap::from([("x".to_string(), running(Some("unhealthy")))]));
    let p = ProbeResult { status: Some(503), ..ok_probe(1) };
    let s = judge("x", true, &c, Some(&p), 200, None, &[], &PROFILE);
    assert_eq!(s.verdict, Verdict::Unhealthy);
    assert_eq!(s.detail, "healthcheck unhealthy; HTTP 503, expected 200");
    let ts = vec![target("node-exporter", "node-exporter:9100", "down")];
    let c: Containers = Some(BTreeMap::from([("prometheus".to_string(), running(None))]));
    let s = judge("prometheus", true, &c, Some(&ok_probe(1)), 200, Some(&ts), &[], &PROFILE);
    assert_eq!(s.verdict, Verdict::Unhealthy);
    // Without SSH the container state is unknown, not a failure; a missing container is.
    assert_eq!(
        judge("x", true, &None, Some(&ok_probe(1)), 200, None, &[], &PROFILE).verdict,
        Verdict::Healthy
    );
    let none: Containers = Some(BTreeMap::new());
    assert_eq!(judge("x", true, &none, Some(&ok_probe(1)), 200, None, &[], &PROFILE).detail, "no container");
}

#[test]
fn a_starting_healthcheck_waits_for_nothing_once_the_probe_answers() {
    // Docker's first check runs one interval (30 s) after the start: "starting" alone is that timer.
    let c: Containers = Some(BTreeMap::from([("x".to_string(), running(Some("starting")))]));
    let s = judge("x", true, &c, Some(&ok_probe(1)), 200, None, &[], &PROFILE);
    assert_eq!(s.verdict, Verdict::Healthy);
    assert_eq!(s.detail, "healthcheck starting, the probe answered");
    // Not when the probe fails or answers another status, and never for an unhealthy check.
    let refused = ProbeResult {
        status: None,
        error: Some("connection refused".into()),
        latency_ms: None,
        ..ok_probe(1)
    };
    let s = judge("x", true, &c, Some(&refused), 200, None, &[], &PROFILE);
    assert_eq!(
        (s.verdict, s.detail.as_str()),
        (Verdict::Unhealthy, "healthcheck starting; connection refused")
    );
    let s = judge(
        "x",
        true,
        &c,
        Some(&ProbeResult { status: Some(503), ..ok_probe(1) }),
        200,
        None,
        &[],
        &PROFILE,
    );
    assert_eq!(s.detail, "healthcheck starting; HTTP 503, expected 200");
    let s = judge("x", true, &c, None, 200, None, &[], &PROFILE);
    assert_eq!(s.verdict, Verdict::Unhealthy);
    // Prometheus' targets still count.
    let c: Containers = Some(BTreeMap::from([("prometheus".to_string(), running(Some("starting")))]));
    let ts = vec![target("node-exporter", "node-exporter:9100", "unknown")];
    let s = judge("prometheus", true, &c, Some(&ok_probe(1)), 200, Some(&ts), &[], &PROFILE);
    assert_eq!(s.verdict, Verdict::Unhealthy, "{}", s.detail);
}

#[test]
fn table_lists_every_service_with_columns() {
    let t = render_table(&sample());
    let lines: Vec<&str> = t.lines().collect();
    assert!(lines[0].starts_with("SERVICE"));
    assert!(lines[0].contains("STATE") && lines[0].contains("LATENCY") && lines[0].contains("DETAIL"));
    assert!(
        lines[1].starts_with("✓ demo-app")
            && lines[1].contains("running (healthy)")
            && lines[1].contains("12 ms")
    );
    assert!(
        lines[3].starts_with("✗ alertmanager") && lines[3].contains("exited") && lines[3].contains("error")
    );
    assert!(lines[4].starts_with("- grafana") && lines[4].contains("unavailable offline"));
    assert!(lines[5].starts_with("UNHEALTHY: 1 service"));
    // Columns line up: STATE starts at the same offset on every row.
    let col = lines[0].find("STATE").unwrap();
    assert_eq!(lines[1].chars().skip(col).take(7).collect::<String>(), "running");
}

#[test]
fn json_carries_the_same_data() {
    let j = to_json(&sample());
    assert_eq!(j["event"], "health");
    assert_eq!(j["healthy"], false);
    assert_eq!(j["services"].as_array().unwrap().len(), 4);
    assert_eq!(j["services"][0]["verdict"], "healthy");
    assert_eq!(j["services"][0]["probe"]["latency_ms"], 12);
    assert_eq!(j["services"][2]["container"]["restarts"], 5);
    assert_eq!(j["services"][3]["verdict"], "unavailable_offline");
    assert_eq!(j["targets"][2]["health"], "down");
}

#[test]
fn parses_docker_inspect_and_skips_one_off_containers() {
    let text = r#"[
      {"RestartCount": 1, "State": {"Status": "running", "Health": {"Status": "healthy"}},
       "Config": {"Labels": {"com.docker.compose.service": "demo-app", "com.docker.compose.oneoff": "False"}}},
      {"RestartCount": 0, "State": {"Status": "exited"},
       "Config": {"Labels": {"com.docker.compose.service": "demo-app", "com.docker.compose.oneoff": "True"}}},
      {"RestartCount": 0, "State": {"Status": "exited"}, "Config": {"Labels": {}}}
    ]"#;
    let m = parse_inspect(text).unwrap();
    assert_eq!(m.len(), 1);
    assert_eq!(
        m["demo-app"],
        ContainerState { status: "running".into(), health: Some("healthy".into()), restarts: 1 }
    );
    assert!(parse_inspect("[]").unwrap().is_empty());
    assert!(parse_inspect("not json").is_err());
}

#[test]
fn parses_prometheus_targets() {
    let text = r#"{"status":"success","data":{"activeTargets":[
      {"labels":{"job":"demo-app","instance":"demo-app:8000"},"health":"up","lastError":""},
      {"labels":{"job":"node-exporter","instance":"node-exporter:9100"},"health":"down","lastError":"connection refused"}
    ]}}"#;
    let t = parse_targets(text).unwrap();
    assert_eq!(
        t[1],
        Target {
            job: "node-exporter".into(),
            instance: "node-exporter:9100".into(),
            health: "down".into(),
            last_error: "connection refused".into()
        }
    );
    assert!(parse_targets(r#"{"status":"error"}"#).is_err());
}
