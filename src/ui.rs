//! Progress and messages: an indicatif spinner per phase with its elapsed time for people, one JSON event per
//! line with `--json`, nothing but errors with `-q`. Everything goes to stderr except data (tables, JSON docs).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Human,
    Json,
    Quiet,
}

#[derive(Debug, Clone)]
pub struct Ui {
    pub mode: Mode,
    tty: bool,
}

impl Ui {
    pub fn new(json: bool, quiet: bool) -> Self {
        let mode = if json {
            Mode::Json
        } else if quiet {
            Mode::Quiet
        } else {
            Mode::Human
        };
        Self { mode, tty: std::io::stderr().is_terminal() }
    }

    pub fn json(&self) -> bool {
        self.mode == Mode::Json
    }

    /// Emit one JSON event line on stdout (only in --json mode).
    pub fn event(&self, kind: &str, fields: serde_json::Value) {
        if self.mode == Mode::Json {
            let mut v = json!({"event": kind});
            if let (Some(obj), serde_json::Value::Object(extra)) = (v.as_object_mut(), fields) {
                obj.extend(extra);
            }
            println!("{v}");
        }
    }

    pub fn info(&self, msg: impl AsRef<str>) {
        match self.mode {
            Mode::Human => eprintln!("{}", msg.as_ref()),
            Mode::Json => self.event("info", json!({"message": msg.as_ref()})),
            Mode::Quiet => {}
        }
    }

    /// Warnings show even with -q.
    pub fn warn(&self, msg: impl AsRef<str>) {
        match self.mode {
            Mode::Json => self.event("warning", json!({"message": msg.as_ref()})),
            _ => eprintln!("warning: {}", msg.as_ref()),
        }
    }

    /// Start a named phase; finish it with [`Phase::done`] (or drop = failed).
    pub fn phase(&self, name: &str) -> Phase {
        let bar = if self.mode == Mode::Human && self.tty {
            let pb = ProgressBar::new_spinner();
            pb.set_style(
                ProgressStyle::with_template("{spinner:.cyan} {prefix:.bold} {wide_msg} {elapsed:>4}")
                    .expect("valid template"),
            );
            pb.set_prefix(name.to_string());
            pb.enable_steady_tick(Duration::from_millis(120));
            Some(pb)
        } else {
            if self.mode == Mode::Human {
                eprintln!("==> {name}");
            }
            None
        };
        self.event("phase_start", json!({"phase": name}));
        Phase { ui: self.clone(), name: name.to_string(), start: Instant::now(), bar, finished: false }
    }
}

/// A running phase.
pub struct Phase {
    ui: Ui,
    name: String,
    start: Instant,
    bar: Option<ProgressBar>,
    finished: bool,
}

impl Phase {
    /// Update the detail text (e.g. the last line of a child's output).
    pub fn message(&self, msg: &str) {
        if let Some(b) = &self.bar {
            b.set_message(msg.chars().take(120).collect::<String>());
        } else if crate::process::verbosity() >= 1 && self.ui.mode == Mode::Human {
            eprintln!("    {msg}");
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// Finish successfully with a short summary.
    pub fn done(mut self, summary: &str) -> Duration {
        self.finished = true;
        let el = self.start.elapsed();
        self.finish_line("ok", summary, el);
        el
    }

    fn finish_line(&mut self, status: &str, summary: &str, el: Duration) {
        let secs = el.as_secs_f64();
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
        match self.ui.mode {
            Mode::Human => {
                let mark = if status == "ok" { "✓" } else { "✗" };
                eprintln!("{mark} {:<10} {:>7.1}s  {summary}", self.name, secs)
            }
            Mode::Json => self.ui.event(
                "phase_end",
                json!({"phase": self.name, "status": status, "seconds": secs, "summary": summary}),
            ),
            Mode::Quiet => {}
        }
    }
}

impl Drop for Phase {
    fn drop(&mut self) {
        if !self.finished {
            let el = self.start.elapsed();
            self.finish_line("failed", "", el);
        }
    }
}
