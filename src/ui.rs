//! Progress and messages: an indicatif spinner per phase with its elapsed time for people, one JSON event per
//! line with `--json`, nothing but errors with `-q`. Everything goes to stderr except data (tables, JSON docs).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::json;

/// Writing to stdout and stderr without panicking: `println!` and friends panic when the reader of a pipe has
/// gone (`provisioner status | head -0`: EPIPE) or the disk is full. The crate's own `println!`, `print!`, `eprintln!` and
/// `eprint!` (lib.rs, shadowing std's) write through these instead: the first failure of a stream is recorded and later writes to it are
/// dropped, the command goes on (a closed pipe is no reason to leave a VM half-made), and [`crate::run`] turns the
/// record into the exit code (141 for a closed stdout, as a shell reports a tool stopped by SIGPIPE).
pub mod output {
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::OnceLock;

    /// How a stream failed, first failure only.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Lost {
        /// The reader went away (EPIPE).
        Closed,
        /// Any other write error (e.g. no space left on the device of `> file`).
        Failed(String),
    }

    struct Stream {
        failed: AtomicBool,
        why: OnceLock<Lost>,
    }

    static STDOUT: Stream = Stream { failed: AtomicBool::new(false), why: OnceLock::new() };
    static STDERR: Stream = Stream { failed: AtomicBool::new(false), why: OnceLock::new() };

    impl Stream {
        fn write(&self, w: &mut dyn Write, args: std::fmt::Arguments, newline: bool) {
            if self.failed.load(Ordering::Relaxed) {
                return;
            }
            let r = w
                .write_fmt(args)
                .and_then(|()| if newline { w.write_all(b"\n") } else { Ok(()) })
                .and_then(|()| w.flush());
            if let Err(e) = r {
                self.fail(e);
            }
        }

        fn fail(&self, e: std::io::Error) {
            let lost = if e.kind() == std::io::ErrorKind::BrokenPipe {
                Lost::Closed
            } else {
                Lost::Failed(e.to_string())
            };
            let _ = self.why.set(lost);
            self.failed.store(true, Ordering::Relaxed);
        }

        fn lost(&self) -> Option<Lost> {
            self.why.get().cloned()
        }
    }

    /// Write to stdout (a line with `newline`); a failure is recorded, never a panic.
    pub fn stdout(args: std::fmt::Arguments, newline: bool) {
        STDOUT.write(&mut std::io::stdout().lock(), args, newline)
    }

    /// Bytes to stdout as they are (completion scripts).
    pub fn stdout_bytes(data: &[u8]) {
        if STDOUT.failed.load(Ordering::Relaxed) {
            return;
        }
        let mut out = std::io::stdout().lock();
        if let Err(e) = out.write_all(data).and_then(|()| out.flush()) {
            STDOUT.fail(e);
        }
    }

    /// Write to stderr (a line with `newline`); a failure is recorded, never a panic.
    pub fn stderr(args: std::fmt::Arguments, newline: bool) {
        STDERR.write(&mut std::io::stderr().lock(), args, newline)
    }

    /// How stdout failed, if it did.
    pub fn stdout_lost() -> Option<Lost> {
        STDOUT.lost()
    }

    /// The exit code once stdout failed: 141 (128 + SIGPIPE) for a closed pipe, [`crate::exit::FAILURE`] for
    /// another error; a failed command keeps its own code. Stderr carries messages, not data: losing it does not
    /// change the code.
    pub fn exit_code(code: i32, stdout: Option<&Lost>) -> i32 {
        match stdout {
            Some(_) if code != crate::exit::OK => code,
            Some(Lost::Closed) => crate::exit::CLOSED_PIPE,
            Some(Lost::Failed(_)) => crate::exit::FAILURE,
            None => code,
        }
    }
}

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
    /// Period of the plain-text progress lines a long phase prints when stderr is not a terminal.
    progress_every: Duration,
    /// The machine this output is about, in a command acting on several: JSON events carry it as `"machine"`,
    /// human lines start with `[name]`.
    machine: Option<std::sync::Arc<str>>,
    /// Shared by the machines of one command so each keeps its own progress line on a terminal.
    bars: Option<MultiProgress>,
}

/// Default period of the plain-text progress lines (`PROVISIONER_PROGRESS_SECS` overrides it).
pub const PROGRESS_EVERY: Duration = Duration::from_secs(20);

/// The progress period from `PROVISIONER_PROGRESS_SECS` (whole seconds, at least 1), else [`PROGRESS_EVERY`]. Pure.
pub fn progress_every(env: Option<&str>) -> Duration {
    env.and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|s| *s >= 1)
        .map(Duration::from_secs)
        .unwrap_or(PROGRESS_EVERY)
}

/// One plain-text progress line: `    ... images 1m40s: <last output line>`. Pure.
pub fn progress_line(phase: &str, elapsed: Duration, last: &str) -> String {
    let secs = elapsed.as_secs();
    let time = if secs >= 60 { format!("{}m{:02}s", secs / 60, secs % 60) } else { format!("{secs}s") };
    let last: String = last.trim().chars().take(120).collect();
    if last.is_empty() {
        format!("    ... {phase} {time}")
    } else {
        format!("    ... {phase} {time}: {last}")
    }
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
        Self {
            mode,
            tty: std::io::stderr().is_terminal(),
            progress_every: progress_every(std::env::var("PROVISIONER_PROGRESS_SECS").ok().as_deref()),
            machine: None,
            bars: None,
        }
    }

    /// The output of one machine: labelled with `label` (its name, among several machines); progress lines share
    /// `bars`.
    pub fn for_machine(&self, label: Option<&str>, bars: Option<&MultiProgress>) -> Ui {
        Ui { machine: label.map(Into::into), bars: bars.cloned(), ..self.clone() }
    }

    /// A MultiProgress for the machines of one command when spinners are shown (human mode on a terminal).
    pub fn multi_progress(&self) -> Option<MultiProgress> {
        (self.mode == Mode::Human && self.tty).then(MultiProgress::new)
    }

    /// The machine label of this output, if any.
    pub fn machine(&self) -> Option<&str> {
        self.machine.as_deref()
    }

    /// `[name] ` for a machine among several, else nothing.
    fn tag(&self) -> String {
        self.machine.as_deref().map(|m| format!("[{m}] ")).unwrap_or_default()
    }

    /// A human line on stderr, above the progress lines when there are some.
    fn line(&self, text: String) {
        match &self.bars {
            Some(b) => {
                let _ = b.println(text);
            }
            None => eprintln!("{text}"),
        }
    }

    pub fn json(&self) -> bool {
        self.mode == Mode::Json
    }

    /// Emit one JSON event line on stdout (only in --json mode).
    pub fn event(&self, kind: &str, fields: serde_json::Value) {
        if self.mode == Mode::Json {
            let mut v = json!({"event": kind});
            if let Some(m) = &self.machine {
                v["machine"] = json!(m.as_ref());
            }
            if let (Some(obj), serde_json::Value::Object(extra)) = (v.as_object_mut(), fields) {
                obj.extend(extra);
            }
            println!("{v}");
        }
    }

    pub fn info(&self, msg: impl AsRef<str>) {
        match self.mode {
            Mode::Human => self.line(format!("{}{}", self.tag(), msg.as_ref())),
            Mode::Json => self.event("info", json!({"message": msg.as_ref()})),
            Mode::Quiet => {}
        }
    }

    /// Warnings show even with -q.
    pub fn warn(&self, msg: impl AsRef<str>) {
        match self.mode {
            Mode::Json => self.event("warning", json!({"message": msg.as_ref()})),
            _ => self.line(format!("{}warning: {}", self.tag(), msg.as_ref())),
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
            pb.set_prefix(format!("{}{name}", self.tag()));
            let pb = match &self.bars {
                Some(b) => b.add(pb),
                None => pb,
            };
            pb.enable_steady_tick(Duration::from_millis(120));
            Some(pb)
        } else {
            if self.mode == Mode::Human {
                self.line(format!("==> {}{name}", self.tag()));
            }
            None
        };
        self.event("phase_start", json!({"phase": name}));
        let start = Instant::now();
        let ticker = (self.mode == Mode::Human && bar.is_none()).then(|| {
            let label = format!("{}{name}", self.tag());
            Ticker::start(&label, start, self.progress_every, |line| eprintln!("{line}"))
        });
        Phase { ui: self.clone(), name: name.to_string(), start, bar, ticker, finished: false }
    }
}

/// Without a terminal there is no spinner: a thread prints a [`progress_line`] every period while the phase runs,
/// so a log or CI job shows a long phase (images: minutes) is alive and what it does.
struct Ticker {
    last: std::sync::Arc<std::sync::Mutex<String>>,
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Ticker {
    fn start(name: &str, start: Instant, every: Duration, sink: impl Fn(String) + Send + 'static) -> Ticker {
        let last = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (stop, rx) = std::sync::mpsc::channel::<()>();
        let (name, shared) = (name.to_string(), last.clone());
        let thread = std::thread::spawn(move || {
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(every) {
                let msg = shared.lock().map(|m| m.clone()).unwrap_or_default();
                sink(progress_line(&name, start.elapsed(), &msg));
            }
        });
        Ticker { last, stop: Some(stop), thread: Some(thread) }
    }

    fn set(&self, msg: &str) {
        if let Ok(mut m) = self.last.lock() {
            msg.clone_into(&mut m);
        }
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A running phase.
pub struct Phase {
    ui: Ui,
    name: String,
    start: Instant,
    bar: Option<ProgressBar>,
    ticker: Option<Ticker>,
    finished: bool,
}

impl Phase {
    /// Update the detail text (e.g. the last line of a child's output).
    pub fn message(&self, msg: &str) {
        if let Some(t) = &self.ticker {
            t.set(msg);
        }
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
        // Stop the progress lines before the phase's last line.
        drop(self.ticker.take());
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
        match self.ui.mode {
            Mode::Human => {
                let mark = if status == "ok" { "✓" } else { "✗" };
                self.ui.line(format!("{mark} {}{:<10} {:>7.1}s  {summary}", self.ui.tag(), self.name, secs))
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

/// A byte progress bar on a terminal (stderr), None otherwise (logs and `--json` get the phase lines only).
pub fn bytes_bar(total: u64, label: &str) -> Option<ProgressBar> {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template("  {prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_prefix(label.to_string());
    Some(pb)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines_name_the_phase_time_and_last_output() {
        assert_eq!(
            progress_line("images", Duration::from_secs(100), "Step 3/7 : RUN x\n"),
            "    ... images 1m40s: Step 3/7 : RUN x"
        );
        assert_eq!(progress_line("ssh", Duration::from_secs(20), ""), "    ... ssh 20s");
        assert_eq!(progress_line("x", Duration::ZERO, &"y".repeat(500)).len(), "    ... x 0s: ".len() + 120);
        assert_eq!(progress_every(None), PROGRESS_EVERY);
        assert_eq!(progress_every(Some("3")), Duration::from_secs(3));
        assert_eq!(progress_every(Some("0")), PROGRESS_EVERY);
        assert_eq!(progress_every(Some("soon")), PROGRESS_EVERY);
    }

    #[test]
    fn the_ticker_repeats_the_last_message_until_stopped() {
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let sink = lines.clone();
        let t = Ticker::start("images", Instant::now(), Duration::from_millis(20), move |l| {
            sink.lock().unwrap().push(l)
        });
        t.set("docker import provisioner-base:bookworm (209 MB) into the guest");
        let deadline = Instant::now() + Duration::from_secs(10);
        while lines.lock().unwrap().len() < 2 {
            assert!(Instant::now() < deadline, "no progress lines");
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(t);
        let n = lines.lock().unwrap().len();
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(lines.lock().unwrap().len(), n, "lines after the phase ended");
        let last = lines.lock().unwrap().last().unwrap().clone();
        assert!(
            last.starts_with("    ... images ")
                && last.ends_with(": docker import provisioner-base:bookworm (209 MB) into the guest"),
            "{last}"
        );
    }
}
