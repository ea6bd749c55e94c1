//! The command line: every subcommand a Vagrant user expects, declared with clap's derive API.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::limits::{CONCURRENCY_MAX, REQUESTS_MAX, SECS_MAX, SECS_MIN};

/// Seconds, within the range box-config.toml allows for durations (1 s to one day).
fn secs() -> clap::builder::RangedU64ValueParser<u64> {
    clap::value_parser!(u64).range(SECS_MIN..=SECS_MAX)
}

/// Vagrant-style VMs from one `box-config.toml`: libvirt or VirtualBox, a cloud-init seed with a pinned
/// host key, SSH, and a Docker Compose monitoring lab provisioned inside.
#[derive(Debug, Parser)]
#[command(name = "provisioner", version, propagate_version = true, max_term_width = 110)]
pub(crate) struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Args)]
pub(crate) struct Global {
    /// The box definition. Its directory holds the `.provisioner/` state dir.
    #[arg(long, global = true, env = "PROVISIONER_CONFIG", default_value = "box-config.toml")]
    pub config: PathBuf,
    /// More detail: child process command lines and their output (repeat for more).
    #[arg(long, short = 'v', global = true, action = clap::ArgAction::Count, conflicts_with = "quiet")]
    pub verbose: u8,
    /// Only errors and the final result.
    #[arg(long, short = 'q', global = true)]
    pub quiet: bool,
    /// Machine-readable output: one JSON object per line (events for long commands, a document for data).
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Create and boot the machine, then provision the lab and print its health (idempotent).
    Up(UpArgs),
    /// Open a shell in the machine (system `ssh`, host key pinned), or run one command with -c / `--`.
    Ssh(SshArgs),
    /// Print an OpenSSH config stanza for this machine (for ~/.ssh/config, VS Code, Ansible).
    SshConfig(SshConfigArgs),
    /// Show each machine's state, asked live from the hypervisor, and its forwarded ports.
    Status(MachinesArg),
    /// List the forwarded ports (guest => host), or print the host port of one guest port (like `vagrant port`).
    Port(PortArgs),
    /// Shut the machine down gracefully (ACPI), forcing it off after a deadline.
    Halt(HaltArgs),
    /// Halt then `up` again.
    Reload(UpArgs),
    /// Re-run the provisioning (Docker, upload, images, compose, health) on the running machine.
    Provision(ProvisionArgs),
    /// Remove the machine and every trace of it: domain/VM, disks, seed, keys, logs, state.
    Destroy(DestroyArgs),
    /// Every machine provisioner made on this computer, whatever its project, asked live from each hypervisor;
    /// `--prune` destroys those whose project directory is gone.
    GlobalStatus(GlobalStatusArgs),
    /// Check box-config.toml strictly (types, unknown keys, cross-references, rules between machines) without
    /// touching any VM.
    Validate,
    /// Render the provision/ templates into a directory, exactly as they would be uploaded.
    Render(RenderArgs),
    /// Probe every lab service (container state, HTTP through the forwarded port, Prometheus targets).
    Health(HealthArgs),
    /// Drive traffic at the demo app and prove an alert travels Prometheus -> Alertmanager -> webhook.
    Verify(VerifyArgs),
    /// Bounded load on the demo app (/, /error, /slow) through its forwarded port.
    Load(LoadArgs),
    /// Manage cached base boxes and cached labs.
    #[command(subcommand)]
    Box(BoxCommand),
    /// Save, restore, list or delete named snapshots of the machine (disk and, when running, memory).
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Save the running machine's memory to disk and stop it; `resume` continues where it was.
    Suspend(MachinesArg),
    /// Start a suspended machine from its saved memory.
    Resume(MachinesArg),
    /// Write the machine as a vagrant-libvirt box (box.img + metadata.json + Vagrantfile).
    Package(PackageArgs),
    /// Print shell completions for bash, zsh, fish, elvish or powershell.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Internal: run a libvirt daemon with this process as the reaper of the QEMUs it disowns (started by the
    /// tool itself where no service manager runs the daemon; see `host::libvirtd::start_local`).
    #[command(name = "__reap", hide = true)]
    Reap {
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<std::ffi::OsString>,
    },
}

/// Machines of a `[[machine]]` file to act on (all when none is named).
#[derive(Debug, Clone, Args, Default)]
pub(crate) struct MachinesArg {
    /// Machine names (default: every machine of the file).
    #[arg(value_name = "NAME")]
    pub machines: Vec<String>,
}

/// The one machine a command acts on.
#[derive(Debug, Clone, Args, Default)]
pub(crate) struct MachineArg {
    /// Machine name (default: the primary machine, or the only one).
    #[arg(long = "machine", short = 'm', value_name = "NAME")]
    pub machine: Option<String>,
}

#[derive(Debug, Clone, Args, Default)]
pub struct UpArgs {
    /// Machine names (default: every machine of the file).
    #[arg(value_name = "NAME")]
    pub machines: Vec<String>,
    /// Machines brought up at once [default: the machine count, at most the host's cores, at least 2].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub parallel: Option<u32>,
    /// Boot the machine only; skip Docker, upload, images, compose and health.
    #[arg(long)]
    pub no_provision: bool,
    /// Seconds to wait for SSH after boot, 1-86400 [default: [ssh] connect_timeout_secs of box-config.toml, 600].
    #[arg(long, value_parser = secs())]
    pub boot_timeout: Option<u64>,
}

#[derive(Debug, Clone, Args, Default)]
pub(crate) struct ProvisionArgs {
    /// Machine names (default: every machine of the file).
    #[arg(value_name = "NAME")]
    pub machines: Vec<String>,
    /// Upload and restart even when nothing changed.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Clone, Args)]
pub(crate) struct SshArgs {
    /// Machine name (default: the primary machine, or the only one).
    #[arg(value_name = "NAME")]
    pub machine: Option<String>,
    /// Run this command instead of an interactive shell; exit with its status.
    #[arg(short = 'c', long = "command", conflicts_with = "args")]
    pub command: Option<String>,
    /// Command and arguments after `--`.
    #[arg(last = true)]
    pub args: Vec<String>,
}

#[derive(Debug, Clone, Args)]
pub(crate) struct SshConfigArgs {
    /// Machine names (default: every machine, one stanza each).
    #[arg(value_name = "NAME")]
    pub machines: Vec<String>,
    /// Host alias in the stanza (default: the machine name).
    #[arg(long)]
    pub host: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub(crate) struct PortArgs {
    #[command(flatten)]
    pub machine: MachineArg,
    /// Print only the host port forwarded to this guest port.
    #[arg(long)]
    pub guest: Option<u16>,
    /// A machine on a remote libvirt host: open its forwards on this machine's 127.0.0.1 (same ports) until
    /// Ctrl-C, so the lab's web pages open in a local browser.
    #[arg(long, conflicts_with = "guest")]
    pub local: bool,
}

#[derive(Debug, Clone, Args)]
pub struct HaltArgs {
    /// Machine names (default: every machine of the file).
    #[arg(value_name = "NAME")]
    pub machines: Vec<String>,
    /// Power off at once instead of an ACPI shutdown.
    #[arg(long, short = 'f')]
    pub force: bool,
    /// Seconds to wait for the graceful shutdown before forcing it (1-86400).
    #[arg(long, default_value_t = 60, value_parser = secs())]
    pub timeout: u64,
}

#[derive(Debug, Clone, Args)]
pub(crate) struct DestroyArgs {
    /// Machine names (default: every machine of the file).
    #[arg(value_name = "NAME")]
    pub machines: Vec<String>,
    /// Do not ask for confirmation (required when stdin is not a terminal).
    #[arg(long, short = 'f')]
    pub force: bool,
}

#[derive(Debug, Clone, Args)]
pub(crate) struct GlobalStatusArgs {
    /// Destroy the machines whose project directory is gone (asks first on a terminal).
    #[arg(long)]
    pub prune: bool,
    /// With --prune: do not ask (required when stdin is not a terminal).
    #[arg(long, short = 'f', requires = "prune")]
    pub force: bool,
}

#[derive(Debug, Clone, Args)]
pub(crate) struct RenderArgs {
    #[command(flatten)]
    pub machine: MachineArg,
    /// Output directory: new, empty, or made by an earlier render; it is replaced whole (never through a link).
    #[arg(long, short = 'o')]
    pub out: PathBuf,
    /// Replace --out when it holds only files render writes but no marker (an older render's output). A
    /// directory holding anything else is refused, --force or not.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Clone, Args)]
pub(crate) struct HealthArgs {
    /// Machine names (default: every machine of the file).
    #[arg(value_name = "NAME")]
    pub machines: Vec<String>,
    /// Seconds to keep retrying before reporting a service unhealthy (1-86400).
    #[arg(long, default_value_t = 120, value_parser = secs())]
    pub timeout: u64,
}

#[derive(Debug, Clone, Args)]
pub struct VerifyArgs {
    /// The machine whose demo app gets the load (default: the first machine that forwards it).
    #[arg(value_name = "NAME")]
    pub machine: Option<String>,
    /// Alert to wait for (the lab's error-rate alert is `AppHighErrorRate`).
    #[arg(long, default_value = "AppHighErrorRate")]
    pub alert: String,
    /// Seconds to wait for the alert to be delivered (1-86400).
    #[arg(long, default_value_t = 600, value_parser = secs())]
    pub timeout: u64,
}

#[derive(Debug, Clone, Args)]
pub(crate) struct LoadArgs {
    #[command(flatten)]
    pub machine: MachineArg,
    /// Base URL of the demo app (default: its forwarded port on the host).
    #[arg(long)]
    pub url: Option<String>,
    /// Total requests, at most (1-10000000).
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..=REQUESTS_MAX))]
    pub requests: u64,
    /// Seconds, at most (1-86400).
    #[arg(long, default_value_t = 120, value_parser = secs())]
    pub duration: u64,
    /// Share of requests sent to /error (0..=1).
    #[arg(long, default_value_t = 0.3)]
    pub error_ratio: f64,
    /// Share of requests sent to /slow (0..=1).
    #[arg(long, default_value_t = 0.2)]
    pub slow_ratio: f64,
    /// Concurrent workers (1-256).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=CONCURRENCY_MAX as i64))]
    pub concurrency: u32,
}

#[derive(Debug, Subcommand)]
pub(crate) enum BoxCommand {
    /// List cached boxes.
    List,
    /// Fetch or build the box that box-config.toml names, into the cache.
    Build {
        /// Rebuild even when a cached copy exists.
        #[arg(long)]
        force: bool,
    },
    /// Remove a cached box by its id (see `box list`); with `--host URI`, its uploaded copy in that libvirt host's pool.
    Remove {
        id: String,
        /// A remote libvirt URI (qemu+ssh://...): remove the box's volumes from its pool ([libvirt] pool), not the cache.
        #[arg(long, value_name = "URI")]
        host: Option<String>,
    },
    /// Upload the box box-config.toml names into a remote libvirt host's pool (`up` does it when needed).
    Upload {
        /// The libvirt URI (default: [libvirt] uri).
        #[arg(long, value_name = "URI")]
        host: Option<String>,
    },
}

#[derive(Debug, Clone, Subcommand)]
pub(crate) enum SnapshotCommand {
    /// Take a snapshot NAME of the machine (with its memory when it runs).
    Save {
        name: String,
        #[command(flatten)]
        machine: MachineArg,
    },
    /// Bring the machine back to snapshot NAME (running again when it was taken running).
    Restore {
        name: String,
        #[command(flatten)]
        machine: MachineArg,
    },
    /// List the machine's snapshots.
    List {
        #[command(flatten)]
        machine: MachineArg,
    },
    /// Delete snapshot NAME.
    Delete {
        name: String,
        #[command(flatten)]
        machine: MachineArg,
    },
}

#[derive(Debug, Clone, Args)]
pub(crate) struct PackageArgs {
    #[command(flatten)]
    pub machine: MachineArg,
    /// The box file to write.
    #[arg(long, short = 'o', default_value = "package.box")]
    pub out: PathBuf,
}

#[cfg(test)]
mod tests {
    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
