//! One function per subcommand; `dispatch` is the only place that maps the CLI to them.

pub mod boxcmd;
pub mod lab;
pub mod lifecycle;
pub mod load;
mod plan;
pub mod port;
pub mod provision;
pub mod render;
pub mod snapshot;
pub mod ssh;
pub mod validate;

use anyhow::Result;

use crate::cli::{Cli, Command, Global};
use crate::config::Config;
use crate::machine::StateDir;
use crate::ui::Ui;

/// What every command gets.
pub struct Ctx {
    pub global: Global,
    pub ui: Ui,
}

impl Ctx {
    /// Load and validate the config named by --config.
    pub fn config(&self) -> Result<Config> {
        crate::config::Config::load(&self.global.config)
    }
    pub fn state(&self, cfg: &Config) -> StateDir {
        StateDir::for_config(cfg)
    }
}

/// Run a parsed command; the returned value is the process exit code.
pub fn dispatch(cli: Cli) -> Result<i32> {
    let ctx = Ctx { ui: Ui::new(cli.global.json, cli.global.quiet), global: cli.global };
    match cli.command {
        Command::Up(a) => lifecycle::up(&ctx, &a),
        Command::Ssh(a) => ssh::ssh(&ctx, &a),
        Command::SshConfig(a) => ssh::ssh_config(&ctx, &a),
        Command::Status => lifecycle::status(&ctx),
        Command::Port(a) => port::port(&ctx, &a),
        Command::Halt(a) => lifecycle::halt(&ctx, &a),
        Command::Reload(a) => lifecycle::reload(&ctx, &a),
        Command::Provision(a) => provision::provision(&ctx, &a),
        Command::Destroy(a) => lifecycle::destroy(&ctx, &a),
        Command::Validate => validate::validate(&ctx),
        Command::Render(a) => render::render(&ctx, &a),
        Command::Health(a) => provision::health(&ctx, &a),
        Command::Verify(a) => provision::verify(&ctx, &a),
        Command::Load(a) => load::load(&ctx, &a),
        Command::Box(c) => boxcmd::run(&ctx, c),
        Command::Snapshot(c) => snapshot::snapshot(&ctx, c),
        Command::Suspend => snapshot::suspend(&ctx),
        Command::Resume => snapshot::resume(&ctx),
        Command::Package(a) => snapshot::package(&ctx, &a),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "provisioner", &mut std::io::stdout());
            Ok(0)
        }
    }
}
