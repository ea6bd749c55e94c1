//! One function per subcommand; `dispatch` is the only place that maps the CLI to them.

pub mod boxcmd;
pub mod lifecycle;
pub mod load;
mod multi;
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
    /// The machine this command acts on when it is one of a `[[machine]]` file (validated with the project).
    pub member: Option<Config>,
    /// The multi-machine `up`/`reload` this machine is brought up in, with other machines at once.
    pub round: Option<std::sync::Arc<crate::machine::round::Round>>,
    /// Why the `[machine]` file, loaded leniently for a command that looks after an existing machine (`status`,
    /// `port`, `halt`, `destroy`), does not validate: the machine is then found from its recorded state.
    pub invalid: Option<std::sync::Arc<anyhow::Error>>,
}

impl Ctx {
    /// Load and validate the config named by --config (the machine's own config for one of several).
    pub fn config(&self) -> Result<Config> {
        match &self.member {
            Some(cfg) => Ok(cfg.clone()),
            None => crate::config::Config::load(&self.global.config),
        }
    }

    /// The context of one machine of a `[[machine]]` file: its config, output labelled with its name.
    pub fn for_machine(&self, cfg: &Config, bars: Option<&indicatif::MultiProgress>) -> Ctx {
        Ctx {
            global: self.global.clone(),
            ui: self.ui.for_machine(&cfg.machine.name, bars),
            member: Some(cfg.clone()),
            round: self.round.clone(),
            invalid: self.invalid.clone(),
        }
    }

    /// The context of one machine of `project`: output labelled with its name when the project has several
    /// (a `[[machine]]` file), unlabelled for the machine of a `[machine]` file.
    pub fn for_member(&self, project: &crate::config::Project, cfg: &Config) -> Ctx {
        match project.multi {
            true => self.for_machine(cfg, None),
            false => Ctx { member: Some(cfg.clone()), ..self.clone_base() },
        }
    }

    fn clone_base(&self) -> Ctx {
        Ctx {
            global: self.global.clone(),
            ui: self.ui.clone(),
            member: self.member.clone(),
            round: self.round.clone(),
            invalid: self.invalid.clone(),
        }
    }
    /// The machine this command acts on: its config, identity and lifecycle.
    pub fn machine(&self) -> Result<crate::machine::Machine> {
        crate::machine::Machine::new(self.config()?)
    }

    /// The machine of a command that looks after it (`status`, `port`, `halt`, `destroy`): found from its
    /// recorded state when the file no longer validates ([`crate::machine::Machine::existing`]).
    pub fn existing_machine(&self) -> Result<crate::machine::Machine> {
        crate::machine::Machine::existing(self.config()?, self.invalid.as_deref(), &self.ui)
    }

    pub fn state(&self, cfg: &Config) -> StateDir {
        StateDir::for_config(cfg)
    }
}

/// Run a parsed command; the returned value is the process exit code.
pub fn dispatch(cli: Cli) -> Result<i32> {
    let ctx = Ctx {
        ui: Ui::new(cli.global.json, cli.global.quiet),
        global: cli.global,
        member: None,
        round: None,
        invalid: None,
    };
    let one =
        |name: &Option<String>, f: &dyn Fn(&Ctx) -> Result<i32>| multi::one(&ctx, "one", name.as_deref(), f);
    match cli.command {
        Command::Up(a) => multi::parallel(&ctx, &a.machines, a.parallel, "up", &|c| lifecycle::up(c, &a)),
        Command::Ssh(a) => one(&a.machine, &|c| ssh::ssh(c, &a)),
        Command::SshConfig(a) => multi::each(&ctx, &a.machines, &|c| ssh::ssh_config(c, &a)),
        Command::Status(a) => multi::status(&ctx, &a.machines),
        Command::Port(a) => multi::one(&ctx, "port", a.machine.machine.as_deref(), &|c| port::port(c, &a)),
        Command::Halt(a) => multi::parallel(&ctx, &a.machines, None, "halt", &|c| lifecycle::halt(c, &a)),
        Command::Reload(a) => {
            multi::parallel(&ctx, &a.machines, a.parallel, "reload", &|c| lifecycle::reload(c, &a))
        }
        Command::Provision(a) => {
            multi::parallel(&ctx, &a.machines, None, "provision", &|c| provision::provision(c, &a))
        }
        Command::Destroy(a) => multi::destroy(&ctx, &a),
        Command::Validate => validate::validate(&ctx),
        Command::Render(a) => one(&a.machine.machine, &|c| render::render(c, &a)),
        Command::Health(a) => multi::each(&ctx, &a.machines, &|c| provision::health(c, &a)),
        Command::Verify(a) => multi::verify(&ctx, &a),
        // Load at a given URL needs no project.
        Command::Load(a) if a.url.is_some() => load::load(&ctx, &a),
        Command::Load(a) => one(&a.machine.machine, &|c| load::load(c, &a)),
        Command::Box(crate::cli::BoxCommand::Build { force }) => {
            // Every machine's box (machines sharing one build it once: the cache holds it).
            multi::each(&ctx, &[], &|c| boxcmd::run(c, crate::cli::BoxCommand::Build { force }))
        }
        Command::Box(c) => boxcmd::run(&ctx, c),
        Command::Snapshot(c) => {
            let name = match &c {
                crate::cli::SnapshotCommand::Save { machine, .. }
                | crate::cli::SnapshotCommand::Restore { machine, .. }
                | crate::cli::SnapshotCommand::List { machine }
                | crate::cli::SnapshotCommand::Delete { machine, .. } => machine.machine.clone(),
            };
            one(&name, &|x| snapshot::snapshot(x, c.clone()))
        }
        Command::Suspend(a) => multi::each(&ctx, &a.machines, &snapshot::suspend),
        Command::Resume(a) => multi::each(&ctx, &a.machines, &snapshot::resume),
        Command::Package(a) => one(&a.machine.machine, &|c| snapshot::package(c, &a)),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            // Into memory first: clap_complete panics when its writer fails (a closed pipe).
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "provisioner", &mut script);
            crate::ui::output::stdout_bytes(&script);
            Ok(0)
        }
    }
}
