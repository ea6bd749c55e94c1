//! One function per subcommand; `dispatch` is the only place that maps the CLI to them.

pub(crate) mod boxcmd;
mod ctx;
mod global;
pub(crate) mod lifecycle;
pub(crate) mod load;
mod multi;
pub(crate) mod port;
pub(crate) mod provision;
pub(crate) mod render;
pub(crate) mod snapshot;
pub(crate) mod ssh;
pub(crate) mod validate;

use anyhow::Result;

use crate::cli::{Cli, Command};
use crate::ui::Ui;
pub(crate) use ctx::Ctx;

/// Run a parsed command; the returned value is the process exit code.
/// `profile` is the workload every machine provisions.
pub(crate) fn dispatch(cli: Cli, profile: &'static crate::profile::Profile) -> Result<i32> {
    let ctx = Ctx {
        ui: Ui::new(cli.global.json, cli.global.quiet),
        profile,
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
        Command::GlobalStatus(a) => global::global_status(&ctx, &a),
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
        Command::Reap { command } => crate::host::libvirtd::reap(&command),
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
