//! provisioner: Vagrant-style VMs from one `box-config.toml`.
//!
//! `main` only calls [`run`]. Library code returns `anyhow::Result` with context on every hop; [`run`] prints
//! the whole cause chain and maps the error to an exit code.

pub mod accel;
pub mod boxes;
pub mod cli;
pub mod commands;
pub mod config;
pub mod guest;
pub mod health;
pub mod keys;
pub mod loadgen;
pub mod machine;
pub mod ports;
pub mod process;
pub mod provider;
pub mod render;
pub mod seed;
pub mod ssh;
pub mod text;
pub mod ui;

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
}

/// Parse the command line, run it, print any error with its causes; returns the exit code.
pub fn run() -> i32 {
    use clap::Parser;
    let cli = cli::Cli::parse();
    process::set_verbosity(cli.global.verbose);
    let json = cli.global.json;
    match commands::dispatch(cli) {
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
