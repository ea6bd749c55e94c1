//! provisioner: Vagrant-style VMs from one `box-config.toml`.
//!
//! `main` only calls [`run`]. Library code returns `anyhow::Result` with context on every hop; [`run`] prints
//! the whole cause chain and maps the error to an exit code.

// Items are `pub(crate)` unless the public facade (the modules the integration tests use) exports them.
#![warn(unreachable_pub)]

// `println!`, `print!`, `eprintln!` and `eprint!` of std panic when the reader of a pipe has gone
// (`provisioner status | head -0`: EPIPE) or the disk is full. These shadow them in the whole crate (a `macro_rules!`
// defined before the modules comes before std's prelude), so every output, including output added later, goes
// through [`ui::output`], which records the failure instead.
macro_rules! println {
    () => { $crate::ui::output::stdout(format_args!(""), true) };
    ($($arg:tt)*) => { $crate::ui::output::stdout(format_args!($($arg)*), true) };
}
macro_rules! print {
    ($($arg:tt)*) => { $crate::ui::output::stdout(format_args!($($arg)*), false) };
}
macro_rules! eprintln {
    () => { $crate::ui::output::stderr(format_args!(""), true) };
    ($($arg:tt)*) => { $crate::ui::output::stderr(format_args!($($arg)*), true) };
}
macro_rules! eprint {
    ($($arg:tt)*) => { $crate::ui::output::stderr(format_args!($($arg)*), false) };
}

mod accel;
pub mod boxes;
mod cli;
mod commands;
pub mod config;
pub mod guest;
mod health;
pub mod host;
mod http;
pub mod keys;
pub mod lab;
pub mod lifecycle;
pub mod machine;
mod platform;
mod ports;
pub mod process;
pub mod profile;
pub mod provider;
pub mod render;
pub mod seed;
pub mod ssh;
#[cfg(test)]
mod testing;
mod text;
pub mod ui;
pub mod validate;
mod xml;

/// Exit codes.
pub mod exit {
    /// Success.
    pub const OK: i32 = 0;
    /// A command failed (the message says why and what to do).
    pub const FAILURE: i32 = 1;
    /// Bad command line (clap's own code).
    pub const USAGE: i32 = 2;
    /// The lab came up but a service is unhealthy / an alert was not delivered.
    pub const UNHEALTHY: i32 = 3;
    /// Stdout was a pipe whose reader went away (`provisioner status | head -0`): 128 + SIGPIPE, as a shell
    /// reports a tool that SIGPIPE stopped. Nothing is printed; the command itself ran to its end.
    pub const CLOSED_PIPE: i32 = 141;
    // Interrupted by a signal: 128 + its number (130 SIGINT, 143 SIGTERM, 129 SIGHUP), as shells report it.
}

/// Parse the command line, run it, print any error with its causes; returns the exit code.
pub fn run() -> i32 {
    use clap::Parser;
    let cli = cli::Cli::parse();
    process::set_verbosity(cli.global.verbose);
    let json = cli.global.json;
    if let Err(e) = process::install_interrupt_handler() {
        eprintln!("warning: {e:#}; Ctrl-C will not stop child processes cleanly");
    }
    let code = finish(commands::dispatch(cli, &lab::PROFILE), json);
    let stdout = ui::output::stdout_lost();
    if let Some(ui::output::Lost::Failed(e)) = &stdout {
        eprintln!("error: writing to stdout failed: {e}\nhint: make room where the output goes (or send it elsewhere) and run the command again");
    }
    ui::output::exit_code(code, stdout.as_ref())
}

/// The exit code of a command's result, its error (or interruption) reported.
fn finish(result: anyhow::Result<i32>, json: bool) -> i32 {
    if let Some(sig) = process::interrupted() {
        return report_interrupt(sig, json, result.err());
    }
    match result {
        Ok(code) => code,
        Err(e) => {
            if json {
                let causes: Vec<String> = e.chain().skip(1).map(|c| c.to_string()).collect();
                println!(
                    "{}",
                    serde_json::json!({"event": "error", "message": e.to_string(), "causes": causes})
                );
            }
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            exit::FAILURE
        }
    }
}

/// The end of a run a signal cancelled: say what happened and what to do, exit 128+signal.
fn report_interrupt(sig: process::Interrupted, json: bool, err: Option<anyhow::Error>) -> i32 {
    // The error chain of a cancelled step is noise ("`debootstrap` failed: killed by signal 9"); show it with -v.
    let detail = err.filter(|_| process::verbosity() >= 1).map(|e| format!("{e:#}"));
    // What stays, where a step said so (a partial remote volume); otherwise every step cleaned up after itself.
    let kept = process::interrupt_note();
    if json {
        println!(
            "{}",
            serde_json::json!({"event": "interrupted", "signal": sig.signal_name(), "exit_code": sig.exit_code(),
                               "detail": detail, "left": kept})
        );
    }
    eprintln!(
        "error: {sig}: child processes were stopped and {}{}\n\
         hint: run the same command again; it continues from the last consistent state",
        kept.as_deref().unwrap_or("nothing half-made was kept"),
        detail.map(|d| format!(" ({d})")).unwrap_or_default()
    );
    sig.exit_code()
}
