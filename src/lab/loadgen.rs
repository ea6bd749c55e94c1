//! Bounded HTTP load at the demo app: a request count AND a duration cap, a mix of `/`, `/error` and `/slow`
//! spread evenly (a low-discrepancy sequence, so short runs already hit the requested ratios), several workers,
//! and a summary with requests by endpoint and status and latency percentiles.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde::Serialize;

/// What to send.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Base URL, e.g. `http://127.0.0.1:8000`.
    pub url: String,
    pub requests: u64,
    pub duration: Duration,
    pub error_ratio: f64,
    pub slow_ratio: f64,
    pub concurrency: u32,
    /// Timeout of one request (`/slow` sleeps up to `SLOW_MAX_SECONDS`).
    pub request_timeout: Duration,
    /// Pause of each worker after each request (zero: back to back). Paced load keeps a slow guest answering.
    pub pause: Duration,
}

/// Shared with a caller that watches the load or ends it early from another thread (`verify` stops it once
/// the alert is delivered).
#[derive(Debug, Default)]
pub struct Control {
    /// Set to end the load after the requests in flight.
    pub stop: AtomicBool,
    /// Requests completed so far (answered or not).
    pub sent: AtomicU64,
}

impl Plan {
    pub fn validate(&self) -> Result<()> {
        let ok = |r: f64| (0.0..=1.0).contains(&r);
        if !ok(self.error_ratio) || !ok(self.slow_ratio) || self.error_ratio + self.slow_ratio > 1.0 {
            bail!(
                "--error-ratio {} and --slow-ratio {} must each be within 0..=1 and sum to at most 1\n\
                 hint: e.g. --error-ratio 0.3 --slow-ratio 0.2 sends 30 % to /error, 20 % to /slow, the rest to /",
                self.error_ratio,
                self.slow_ratio
            );
        }
        if self.requests == 0 || self.duration.is_zero() || self.concurrency == 0 {
            bail!("--requests, --duration and --concurrency must be at least 1");
        }
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            bail!(
                "--url \"{}\" is not an http(s) URL\nhint: pass the base URL, e.g. --url http://127.0.0.1:8000",
                crate::text::shown(&self.url)
            );
        }
        Ok(())
    }

    /// The endpoint of request number `i`: the fractional part of `i * golden ratio` is spread evenly over [0, 1).
    pub fn endpoint(&self, i: u64) -> &'static str {
        let x = (i as f64 * 0.618_033_988_749_895).fract();
        if x < self.error_ratio {
            "/error"
        } else if x < self.error_ratio + self.slow_ratio {
            "/slow"
        } else {
            "/"
        }
    }
}

/// What came back.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub url: String,
    /// Requests by endpoint, then by status (`"200"`, `"500"`, or `"error"` when no HTTP response came).
    pub counts: BTreeMap<String, BTreeMap<String, u64>>,
    pub elapsed_secs: f64,
    pub latency_p50_ms: f64,
    pub latency_p95_ms: f64,
    /// First transport error, if any (connection refused, timeout).
    pub first_error: Option<String>,
}

impl Summary {
    pub fn total(&self) -> u64 {
        self.counts.values().flat_map(|m| m.values()).sum()
    }
    /// Requests that got an HTTP response (any status).
    pub fn answered(&self) -> u64 {
        self.counts
            .values()
            .flat_map(|m| m.iter())
            .filter(|(s, _)| s.as_str() != "error")
            .map(|(_, n)| n)
            .sum()
    }
    /// Human table.
    pub fn render(&self) -> String {
        let mut s = format!("{} requests to {} in {:.1}s\n", self.total(), self.url, self.elapsed_secs);
        s.push_str(&format!("  {:<10} {:>6} {:>8}\n", "ENDPOINT", "STATUS", "REQUESTS"));
        for (endpoint, by_status) in &self.counts {
            for (status, n) in by_status {
                s.push_str(&format!("  {endpoint:<10} {status:>6} {n:>8}\n"));
            }
        }
        s.push_str(&format!(
            "latency p50 {:.0} ms, p95 {:.0} ms\n",
            self.latency_p50_ms, self.latency_p95_ms
        ));
        s
    }
}

/// Send the load; returns when the request count is reached or the duration has passed.
pub fn run(plan: &Plan) -> Result<Summary> {
    run_controlled(plan, &Control::default())
}

/// [`run`], also ending when `control.stop` is set, and counting requests in `control.sent` as they complete.
pub fn run_controlled(plan: &Plan, control: &Control) -> Result<Summary> {
    plan.validate()?;
    let agent = crate::http::agent()?.timeout(plan.request_timeout).build();
    let base = plan.url.trim_end_matches('/').to_string();
    let start = Instant::now();
    let deadline = start + plan.duration;
    let next = AtomicU64::new(0);
    // (endpoint, outcome, latency) of every request, and the first error.
    type Results = (Vec<(&'static str, String, Duration)>, Option<String>);
    let results: Mutex<Results> = Mutex::new((Vec::new(), None));
    std::thread::scope(|s| {
        for _ in 0..plan.concurrency {
            s.spawn(|| loop {
                if Instant::now() >= deadline
                    || control.stop.load(Ordering::Relaxed)
                    || crate::process::interrupted().is_some()
                {
                    return;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= plan.requests {
                    return;
                }
                let endpoint = plan.endpoint(i);
                let t0 = Instant::now();
                let (status, err) = match agent.get(&format!("{base}{endpoint}")).call() {
                    Ok(resp) => {
                        let code = resp.status();
                        let _ = resp.into_string();
                        (code.to_string(), None)
                    }
                    Err(ureq::Error::Status(code, resp)) => {
                        let _ = resp.into_string();
                        (code.to_string(), None)
                    }
                    Err(e) => ("error".to_string(), Some(e.to_string())),
                };
                let took = t0.elapsed();
                {
                    let mut r = results.lock().expect("results lock");
                    r.0.push((endpoint, status, took));
                    if r.1.is_none() {
                        r.1 = err;
                    }
                }
                control.sent.fetch_add(1, Ordering::Relaxed);
                if !plan.pause.is_zero() {
                    std::thread::sleep(plan.pause.min(deadline.saturating_duration_since(Instant::now())));
                }
            });
        }
    });
    let (samples, first_error) = results.into_inner().expect("results lock");
    let mut summary =
        Summary { url: base, elapsed_secs: start.elapsed().as_secs_f64(), first_error, ..Default::default() };
    let mut latencies: Vec<Duration> = Vec::with_capacity(samples.len());
    for (endpoint, status, took) in samples {
        *summary.counts.entry(endpoint.to_string()).or_default().entry(status).or_default() += 1;
        latencies.push(took);
    }
    latencies.sort();
    summary.latency_p50_ms = percentile_ms(&latencies, 0.50);
    summary.latency_p95_ms = percentile_ms(&latencies, 0.95);
    Ok(summary)
}

/// Nearest-rank percentile of sorted samples, in milliseconds (0 when there are none).
fn percentile_ms(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1].as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(error_ratio: f64, slow_ratio: f64) -> Plan {
        Plan {
            url: "http://127.0.0.1:1".into(),
            requests: 1,
            duration: Duration::from_secs(1),
            error_ratio,
            slow_ratio,
            concurrency: 1,
            request_timeout: Duration::from_secs(1),
            pause: Duration::ZERO,
        }
    }

    #[test]
    fn endpoint_mix_matches_ratios_in_short_runs() {
        let p = plan(0.3, 0.2);
        let mut n = BTreeMap::new();
        for i in 0..100 {
            *n.entry(p.endpoint(i)).or_insert(0i32) += 1;
        }
        for (endpoint, want) in [("/error", 30), ("/slow", 20), ("/", 50)] {
            let got = n[endpoint];
            assert!((got - want).abs() <= 2, "{endpoint}: {got} of 100, want about {want}");
        }
    }

    #[test]
    fn bad_ratios_are_rejected_with_a_hint() {
        let e = plan(0.8, 0.5).validate().unwrap_err().to_string();
        assert!(e.contains("sum to at most 1") && e.contains("hint:"), "{e}");
        assert!(plan(-0.1, 0.0).validate().is_err());
        assert!(plan(0.3, 0.2).validate().is_ok());
    }

    /// A listener that answers every connection with an empty 200.
    fn ok_server() -> String {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for mut conn in listener.incoming().flatten() {
                let mut buf = [0u8; 1024];
                let _ = conn.read(&mut buf);
                let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            }
        });
        format!("http://{addr}")
    }

    #[test]
    fn stop_ends_the_load_and_sent_counts_it() {
        let plan = Plan {
            url: ok_server(),
            requests: u64::MAX,
            duration: Duration::from_secs(24 * 3600),
            concurrency: 2,
            ..plan(0.0, 0.0)
        };
        let control = Control::default();
        let summary = std::thread::scope(|s| {
            let load = s.spawn(|| run_controlled(&plan, &control));
            while control.sent.load(Ordering::Relaxed) < 20 {
                std::thread::yield_now();
            }
            control.stop.store(true, Ordering::Relaxed);
            load.join().unwrap().unwrap()
        });
        // Returning at all is the proof (the plan alone runs for a day); what it counted matches what it sent.
        assert!(summary.total() >= 20, "{}", summary.total());
        assert_eq!(summary.total(), control.sent.load(Ordering::Relaxed));
        assert_eq!(summary.answered(), summary.total(), "{:?}", summary.first_error);
    }

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile_ms(&v, 0.5), 50.0);
        assert_eq!(percentile_ms(&v, 0.95), 95.0);
        assert_eq!(percentile_ms(&[], 0.95), 0.0);
    }
}
