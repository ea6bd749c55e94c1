//! The lab running live on loopback: the rendered configs driving Debian's real Prometheus, Alertmanager and node
//! exporter and the demo app (gunicorn, Flask, prometheus_client from Debian) as host processes on 127.0.0.1 with
//! free ports (compose service names mapped through vars), plus a real HTTP webhook receiver in the test.
//! `provisioner load` drives traffic; then: every target that can run here is up (cAdvisor cannot and is named),
//! every Grafana panel's PromQL returns data (cAdvisor panels listed), and the app error-rate alert travels
//! Prometheus -> Alertmanager -> webhook.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use crate::lab::{job_matchers, panels, Lab};
use crate::support::{free_port, tail, wait_until, Proc, Test};

/// Bodies of the POSTs a webhook receiver got.
#[derive(Clone, Default)]
struct Webhook {
    bodies: Arc<Mutex<Vec<String>>>,
}

impl Webhook {
    /// Serve HTTP/1.1 on 127.0.0.1 (OS-assigned port) in a thread; every request is answered 200 and recorded.
    fn start() -> (Webhook, u16) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let hook = Webhook::default();
        let bodies = hook.bodies.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut len = 0usize;
                let mut line = String::new();
                let mut ok = true;
                loop {
                    line.clear();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        ok = false;
                        break;
                    }
                    let l = line.trim_end();
                    if l.is_empty() {
                        break;
                    }
                    if let Some((k, v)) = l.split_once(':') {
                        if k.eq_ignore_ascii_case("content-length") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                    }
                }
                if !ok {
                    continue;
                }
                let mut body = vec![0u8; len];
                if reader.read_exact(&mut body).is_ok() {
                    bodies.lock().unwrap().push(String::from_utf8_lossy(&body).into_owned());
                }
                let _ =
                    stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            }
        });
        (hook, port)
    }
    fn bodies(&self) -> Vec<String> {
        self.bodies.lock().unwrap().clone()
    }
}

fn get_json(url: &str, query: &[(&str, &str)]) -> Option<Value> {
    let mut req = ureq::get(url).timeout(Duration::from_secs(5));
    for (k, v) in query {
        req = req.query(k, v);
    }
    // Prometheus answers a bad query with 400 and a JSON error: keep that body too.
    let resp = match req.call() {
        Ok(r) | Err(ureq::Error::Status(_, r)) => r,
        Err(_) => return None,
    };
    serde_json::from_str(&resp.into_string().ok()?).ok()
}

fn http_ok(url: &str) -> Option<()> {
    ureq::get(url).timeout(Duration::from_secs(2)).call().ok().map(|_| ())
}

/// Start a program from the rendered tree as a test-owned process (killed by process group on drop).
fn spawn(
    name: &str,
    program: &str,
    args: &[String],
    cwd: &Path,
    env: &[(&str, String)],
    logs: &Path,
) -> Proc {
    let mut c = Command::new(program);
    c.args(args).current_dir(cwd);
    for (k, v) in env {
        c.env(k, v);
    }
    Proc::spawn(name, c, logs.join(format!("{name}.log")))
}

#[test]
fn live_lab_scrapes_answers_every_panel_and_delivers_the_error_alert() {
    // One loopback address per service, as the compose service names would be, each with a free port.
    let [app_ip, node_ip, am_ip, prom_ip, cadvisor_ip] =
        ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5", "127.0.0.6"];
    let [app, node, am, prom, cadvisor] = [(); 5].map(|_| free_port());
    let (hook, hook_port) = Webhook::start();
    // Short intervals and `for:` so everything happens within seconds; cAdvisor's port has no listener.
    let vars = format!(
        r#"scrape_interval = "2s"
scrape_timeout = "1900ms"
evaluation_interval = "1s"
rate_window = "15s"
instance_down_for = "2s"
error_ratio_for = "3s"
latency_p95_for = "3s"
host_cpu_for = "3s"
host_memory_for = "3s"
host_disk_for = "3s"
container_gone_for = "3s"
group_wait = "1s"
group_interval = "2s"
repeat_interval = "1h"
slow_min_seconds = 0.05
slow_max_seconds = 0.3
demo_app_target = "{app_ip}:{app}"
node_exporter_target = "{node_ip}:{node}"
alertmanager_target = "{am_ip}:{am}"
prometheus_target = "{prom_ip}:{prom}"
cadvisor_target = "{cadvisor_ip}:{cadvisor}"
webhook_url = "http://127.0.0.1:{hook_port}/hook""#
    );
    let lab = Lab::render("debian", &vars);
    let out = &lab.out;
    let logs = out.join("logs");
    let data = out.join("data");
    std::fs::create_dir_all(&logs).unwrap();

    let _app = spawn(
        "demo-app",
        "/usr/bin/python3",
        &["-m", "gunicorn", "--config", "gunicorn.conf.py", "app:app"].map(String::from),
        &out.join("demo-app"),
        &[
            ("BIND", format!("{app_ip}:{app}")),
            ("SLOW_MIN_SECONDS", "0.05".into()),
            ("SLOW_MAX_SECONDS", "0.3".into()),
            ("SECRET_KEY", crate::lab::TEST_PROMETHEUS_HEX.into()),
        ],
        &logs,
    );
    let _node = spawn(
        "node-exporter",
        "prometheus-node-exporter",
        // No systemd on the test host: its collector would only log errors.
        &[format!("--web.listen-address={node_ip}:{node}"), "--no-collector.systemd".into()],
        out,
        &[],
        &logs,
    );
    let _am = spawn(
        "alertmanager",
        "prometheus-alertmanager",
        &[
            format!("--config.file={}", out.join("alertmanager/alertmanager.yml").display()),
            format!("--storage.path={}", data.join("alertmanager").display()),
            format!("--web.listen-address={am_ip}:{am}"),
            "--cluster.listen-address=".into(),
        ],
        out,
        &[],
        &logs,
    );
    let _prom = spawn(
        "prometheus",
        "prometheus",
        &[
            format!("--config.file={}", out.join("prometheus/prometheus.yml").display()),
            format!("--storage.tsdb.path={}", data.join("prometheus").display()),
            format!("--web.listen-address={prom_ip}:{prom}"),
        ],
        out,
        &[],
        &logs,
    );
    let up = Duration::from_secs(60);
    wait_until(up, "demo app /health", || http_ok(&format!("http://{app_ip}:{app}/health")));
    wait_until(up, "node exporter /metrics", || http_ok(&format!("http://{node_ip}:{node}/metrics")));
    wait_until(up, "alertmanager /-/ready", || http_ok(&format!("http://{am_ip}:{am}/-/ready")));
    wait_until(up, "prometheus /-/ready", || http_ok(&format!("http://{prom_ip}:{prom}/-/ready")));
    let api = format!("http://{prom_ip}:{prom}/api/v1");

    // Bounded load through the real CLI: the summary counts 5xx and reports percentiles.
    let app_url = format!("http://{app_ip}:{app}");
    // Without --url it targets the host port box-config.toml forwards to the demo app's guest port 8000.
    let cfg_path = lab.dir.path().join("box-config.toml");
    let cfg = std::fs::read_to_string(&cfg_path).unwrap();
    let shipped = "guest = 8000\nhost = 8000\n";
    assert!(cfg.contains(shipped), "box-config.toml no longer forwards 8000 -> 8000");
    std::fs::write(
        &cfg_path,
        cfg.replace(shipped, &format!("guest = 8000\nhost = {app}\nhost_ip = \"{app_ip}\"\n")),
    )
    .unwrap();
    let load = Test::new()
        .cwd(lab.dir.path())
        .args(["load", "--requests", "60", "--duration", "30", "--error-ratio", "0.5"])
        .args(["--slow-ratio", "0.1", "--concurrency", "4"])
        .run()
        .success();
    let summary = load.stdout();
    assert!(summary.contains(&format!("60 requests to {app_url} in")), "{summary}");
    assert!(summary.contains("/error") && summary.contains("500") && summary.contains("p95"), "{summary}");
    // The in-guest script (stdlib only) does the same, bounded.
    let script = Command::new("/usr/bin/python3")
        .arg(out.join("loadgen/loadgen.py"))
        .args(["--url", &app_url, "--requests", "20", "--duration", "30", "--error-ratio", "0.5"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&script.stdout);
    assert!(script.status.success(), "loadgen.py: {text}{}", String::from_utf8_lossy(&script.stderr));
    assert!(text.contains("20 requests to") && text.contains("/error") && text.contains("500"), "{text}");
    // Then steady traffic in the background for the rest of the test (bounded by its own duration).
    let mut bg = Command::new(crate::support::bin());
    bg.args(["load", "--url", &app_url, "--requests", "100000", "--duration", "120", "--error-ratio", "0.5"])
        .args(["--slow-ratio", "0.1", "--concurrency", "2"]);
    let _load = Proc::spawn("load", bg, logs.join("load.log"));

    // Every scrape job that can run here is up; cAdvisor (no Docker on this host) is down and named. A scrape can
    // time out when the machine is overloaded, so each job counts once it has been seen up.
    let jobs = crate::lab::scrape_jobs(&lab);
    let mut seen_up = std::collections::BTreeSet::new();
    let mut last = String::new();
    let targets = wait_until(Duration::from_secs(120), "every runnable scrape target seen up", || {
        let t = get_json(&format!("{api}/targets"), &[("state", "active")])?;
        let active = t["data"]["activeTargets"].as_array()?.clone();
        let health = |job: &str| {
            active
                .iter()
                .find(|x| x["labels"]["job"] == job)
                .map(|x| x["health"].as_str().unwrap_or("").to_string())
        };
        let state: Vec<String> = active
            .iter()
            .map(|x| format!("{}={} {}", x["labels"]["job"], x["health"], x["lastError"]))
            .collect();
        if state.join("; ") != last {
            last = state.join("; ");
            eprintln!("targets: {last}");
        }
        seen_up.extend(jobs.iter().filter(|j| health(j).as_deref() == Some("up")).cloned());
        let all_up = jobs.iter().filter(|j| *j != "cadvisor").all(|j| seen_up.contains(j));
        (all_up && health("cadvisor").as_deref() == Some("down")).then_some(active)
    });
    assert!(!seen_up.contains("cadvisor"), "cadvisor cannot run here but was up");
    assert_eq!(targets.len(), jobs.len(), "one active target per scrape job: {targets:#?}");
    eprintln!(
        "targets: {} up; cadvisor down as expected (needs Docker, not runnable on this host)",
        jobs.len() - 1
    );

    // The error-rate alert fires and Alertmanager delivers it to the webhook.
    let note = wait_until(Duration::from_secs(120), "AppHighErrorRate notification at the webhook", || {
        hook.bodies().into_iter().find_map(|b| {
            let v: Value = serde_json::from_str(&b).ok()?;
            let hit = v["status"] == "firing"
                && v["alerts"].as_array()?.iter().any(|a| {
                    a["labels"]["alertname"] == "AppHighErrorRate" && a["labels"]["job"] == "demo-app"
                });
            hit.then_some(v)
        })
    });
    assert_eq!(note["receiver"], "lab", "{note:#}");
    let alert =
        note["alerts"].as_array().unwrap().iter().find(|a| a["labels"]["alertname"] == "AppHighErrorRate");
    let summary = alert.unwrap()["annotations"]["summary"].as_str().unwrap_or_default();
    assert!(summary.starts_with("Demo app 5xx ratio is "), "annotation not expanded: {summary:?}");
    eprintln!("webhook got: {summary}");

    // Every Grafana panel query returns data from the live Prometheus, except cAdvisor's (listed).
    let mut skipped = Vec::new();
    let mut checked = 0;
    for (file, d) in lab.dashboards() {
        for v in d["templating"]["list"].as_array().into_iter().flatten() {
            let q = v["query"]["query"].as_str().unwrap_or_default();
            let (metric, label) = label_values(q).unwrap_or_else(|| panic!("{file}: variable query {q:?}"));
            let values = wait_until(up, &format!("{file} variable {}", v["name"]), || {
                let r = get_json(&format!("{api}/label/{label}/values"), &[("match[]", &metric)])?;
                let vals = r["data"].as_array()?.clone();
                (!vals.is_empty()).then_some(vals)
            });
            eprintln!("{file}: variable ${} = {values:?}", v["name"].as_str().unwrap());
        }
        for p in panels(&d) {
            let title = p["title"].as_str().unwrap_or("?");
            for t in p["targets"].as_array().into_iter().flatten() {
                let expr = t["expr"].as_str().unwrap();
                if job_matchers(expr).iter().any(|j| j == "cadvisor") {
                    skipped.push(format!("{file}: {title}"));
                    continue;
                }
                let q = expr.replace("$__rate_interval", "30s").replace("$instance", ".*");
                let what = format!("data for {file} panel {title:?}: {q}");
                wait_until(Duration::from_secs(60), &what, || {
                    let r = get_json(&format!("{api}/query"), &[("query", &q)])?;
                    assert_eq!(r["status"], "success", "{file} panel {title:?} query failed: {r}");
                    r["data"]["result"].as_array().is_some_and(|a| !a.is_empty()).then_some(())
                });
                checked += 1;
            }
        }
    }
    assert!(checked >= 12, "only {checked} panel queries checked");
    eprintln!("{checked} panel queries returned data; skipped (need cAdvisor): {skipped:#?}");
    assert!(!skipped.is_empty(), "the containers dashboard should be listed as needing cAdvisor");

    // The demo app's gauge and counters are live, and scrapes are not counted as requests.
    let metrics = ureq::get(&format!("{app_url}/metrics")).call().unwrap().into_string().unwrap();
    assert!(metrics.contains("demo_http_requests_in_flight"), "{}", tail(&metrics, 20));
    assert!(!metrics.contains("endpoint=\"/metrics\""), "scrapes are counted as app requests");
}

/// `label_values(METRIC{...}, LABEL)` -> (METRIC{...}, LABEL).
fn label_values(q: &str) -> Option<(String, String)> {
    let inner = q.strip_prefix("label_values(")?.strip_suffix(')')?;
    let (metric, label) = inner.rsplit_once(',')?;
    Some((metric.trim().to_string(), label.trim().to_string()))
}
