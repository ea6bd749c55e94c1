//! Hypervisor backends behind one trait, chosen in ONE place ([`select`]).

pub mod libvirt;
pub mod network;
pub mod virtualbox;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;
use serde::Serialize;

pub use crate::boxes::BoxImage;
use crate::config::{Config, Forward, ProviderKind};
use crate::host::{GuestAddr, Host};
use crate::machine::state::MachineState;
use crate::machine::StateDir;
pub use network::{PrivateNet, PrivateNic};

/// Live run state as the hypervisor reports it. In JSON it is always a string: the snake_case name of a known
/// state (`aborted_saved`), or the hypervisor's own word, verbatim, for any other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmState {
    /// No VM of ours exists.
    NotCreated,
    /// Running (libvirt also "in shutdown").
    Running,
    /// Defined but powered off (libvirt "shut off"/"crashed", VirtualBox "poweroff"/"teleported").
    Stopped,
    /// VirtualBox "aborted": the VM process died; powered off, settings can change, `up` boots it.
    Aborted,
    /// Paused with its memory in place (libvirt "paused"/"pmsuspended", VirtualBox "paused"): `up` resumes it.
    Paused,
    /// VirtualBox "saved": memory saved to disk. Not mutable; `up` restores it, `halt` discards the saved state.
    Saved,
    /// VirtualBox 7 "aborted-saved": the VM process died while a saved state existed; treated like `Saved`.
    AbortedSaved,
    /// VirtualBox lists the VM but cannot read its settings file or a disk.
    Inaccessible,
    /// Anything else the hypervisor says, verbatim (transient states such as "starting", "gurumeditation").
    Other(String),
}

impl VmState {
    /// Powered off with no saved state: settings may change and a start is a cold boot.
    pub fn is_off(&self) -> bool {
        matches!(self, VmState::Stopped | VmState::Aborted)
    }
    /// Holding a saved state that a start restores (no reconfiguration possible).
    pub fn is_saved(&self) -> bool {
        matches!(self, VmState::Saved | VmState::AbortedSaved)
    }
}

impl Serialize for VmState {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            VmState::Other(word) => s.serialize_str(word),
            VmState::AbortedSaved => s.serialize_str("aborted_saved"),
            VmState::NotCreated => s.serialize_str("not_created"),
            known => s.serialize_str(&known.to_string()),
        }
    }
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmState::NotCreated => f.write_str("not created"),
            VmState::Running => f.write_str("running"),
            VmState::Stopped => f.write_str("stopped"),
            VmState::Aborted => f.write_str("aborted"),
            VmState::Paused => f.write_str("paused"),
            VmState::Saved => f.write_str("saved"),
            VmState::AbortedSaved => f.write_str("aborted-saved"),
            VmState::Inaccessible => f.write_str("inaccessible"),
            VmState::Other(s) => f.write_str(s),
        }
    }
}

/// What the hypervisor holds under the reference a machine recorded (VirtualBox UUID, libvirt domain name), judged
/// by the ownership marker written into it (VirtualBox `--description`, libvirt `<metadata>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// No VM by that reference.
    NotCreated,
    /// This machine's VM (its marker names this state dir under any spelling, or a VM `up` left half-made), in
    /// this state.
    Mine(VmState),
    /// A VM that is not this machine's: `owner` is the state dir its marker names, None when it carries no
    /// provisioner marker at all.
    Foreign { owner: Option<String> },
}

/// A VM a provisioner machine made, found on its hypervisor without its project (`global-status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundVm {
    /// The hypervisor's name for it.
    pub name: String,
    /// Its live state.
    pub state: VmState,
    /// The machine's state dir, as the VM's ownership marker names it (the directory may be gone).
    pub state_dir: PathBuf,
}

/// Everything a provider needs to create a machine.
#[derive(Debug, Clone)]
pub struct MachineSpec {
    /// Name in the hypervisor: `provisioner-<machine>-<8 hex of the state dir path hash>`.
    pub vm_name: String,
    pub hostname: String,
    pub cpus: u32,
    pub memory_mb: u64,
    pub disk_gb: u64,
    pub base: BoxImage,
    /// The cloud-init seed ISO; empty for a machine whose keys went into its disk (a box without cloud-init):
    /// it gets no seed drive.
    pub seed_iso: PathBuf,
    /// Forwards, SSH first.
    pub forwards: Vec<Forward>,
    pub state: StateDir,
    /// true = KVM, false = TCG (decided by [`crate::provider::libvirt::decide_accel`] or the config).
    pub kvm: bool,
    /// The machine's NIC on the project's private network ([`network`]), if it has one.
    pub private_net: Option<PrivateNic>,
}

/// What every hypervisor backend implements. All calls go through the hypervisor's own CLI.
pub trait Provider {
    /// "libvirt" / "virtualbox".
    fn name(&self) -> &'static str;
    /// Which provider this is (never [`ProviderKind::Auto`]): what callers branch on instead of the name.
    fn kind(&self) -> ProviderKind;
    /// Check the host can run this provider (CLI present, daemon reachable, ...); errors say what to install/start.
    fn preflight(&self) -> Result<()>;
    /// Every VM on this provider's host that a provisioner machine made (its ownership marker names a state dir),
    /// with its live state; other VMs are left out.
    fn machines(&self) -> Result<Vec<FoundVm>>;
    /// The host the machines of this provider run on (this machine unless a libvirt URI names a remote one).
    fn host(&self) -> crate::host::Host {
        crate::host::Host::Local
    }
    /// Live state of the VM named `vm_name` (one hypervisor call).
    fn state(&self, vm_name: &str) -> Result<VmState>;
    /// The VM `vm` (name or id) and whether it is the machine's whose state dir is `state`: the ownership check
    /// every command that acts on a VM goes through ([`my_vm_state`]).
    fn lookup(&self, vm: &str, state: &StateDir) -> Result<Lookup>;
    /// Define/import the VM (disk overlay, seed attached, forwards); idempotent: an existing VM of ours is kept.
    /// `recorded` is the machine's state.json as saved by `up`; a provider that identifies VMs by an id of its
    /// own (VirtualBox's UUID) records it there, and saves it, before the VM is made.
    fn create(&self, spec: &MachineSpec, recorded: &mut crate::machine::state::MachineState) -> Result<()>;
    fn start(&self, vm_name: &str) -> Result<()>;
    /// Graceful shutdown, waiting up to `timeout`, then forced off.
    fn halt(&self, vm_name: &str, timeout: Duration, force: bool) -> Result<()>;
    /// Remove the VM and everything the provider made for it. Idempotent.
    fn destroy(&self, vm_name: &str, state: &StateDir) -> Result<()>;

    /// Take a snapshot `name` of the whole machine (disk, and memory when it runs). An existing name is an error.
    fn snapshot_save(&self, vm_name: &str, name: &str) -> Result<()>;
    /// Bring the machine back to snapshot `name`, in the run state it had then (running when taken running).
    fn snapshot_restore(&self, vm_name: &str, name: &str) -> Result<()>;
    /// The machine's snapshots, oldest first.
    fn snapshot_list(&self, vm_name: &str) -> Result<Vec<String>>;
    fn snapshot_delete(&self, vm_name: &str, name: &str) -> Result<()>;
    /// Save the running machine's memory to disk and stop it (Vagrant's `suspend`).
    fn suspend(&self, vm_name: &str) -> Result<()>;
    /// Start a suspended machine from its saved memory (Vagrant's `resume`).
    fn resume(&self, vm_name: &str) -> Result<()>;

    /// The guest's serial console so far (for boot diagnostics) and where a user finds it. Best effort: empty
    /// text when it cannot be read.
    fn serial_console(&self, _vm_name: &str, state: &StateDir) -> (String, String) {
        local_serial_console(state)
    }

    /// The machine's own disk, to edit before its first boot (issue 20's disk route): by default the local qcow2
    /// overlay in the state dir (libvirt).
    fn offline_disk(&self, _vm_name: &str, state: &StateDir) -> Result<crate::boxes::inject::Disk> {
        Ok(crate::boxes::inject::Disk::single(state.disk(), "qcow2"))
    }

    /// Cached lab: capture the running machine (disk and memory) into the empty directory `into`, leaving it
    /// running. Returns what [`Provider::lab_restore`] needs, or None when this provider cannot.
    fn lab_capture(&self, _vm_name: &str, _state: &StateDir, _into: &Path) -> Result<Option<String>> {
        Ok(None)
    }
    /// Create the machine of `spec` from a capture in `from` and leave it running where the capture was taken.
    fn lab_restore(&self, _spec: &MachineSpec, _from: &Path, _data: &str) -> Result<()> {
        anyhow::bail!("the {} provider cannot restore a cached lab", self.name())
    }
}

/// The serial log in the state dir, where a local hypervisor writes the console (empty when there is none yet).
fn local_serial_console(state: &StateDir) -> (String, String) {
    let log = state.serial_log();
    let text = std::fs::read(&log).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
    (text, log.display().to_string())
}

/// How a provider addresses a machine's VM: the UUID recorded in state.json (VirtualBox), else the recorded name,
/// else `vm_name` (the name this machine's VM gets).
pub fn vm_ref(recorded: Option<&crate::machine::state::MachineState>, vm_name: &str) -> String {
    recorded
        .and_then(|s| s.vm_id.clone().or_else(|| Some(s.vm_name.clone()).filter(|n| !n.is_empty())))
        .unwrap_or_else(|| vm_name.to_string())
}

/// THE ownership check: the live state of the machine's VM `vm`, or, when the hypervisor's marker says it
/// belongs to another project (a copied `.provisioner/`), an error naming that project; nothing is touched.
pub fn my_vm_state(p: &dyn Provider, vm: &str, state: &StateDir) -> Result<VmState> {
    match p.lookup(vm, state)? {
        Lookup::NotCreated => Ok(VmState::NotCreated),
        Lookup::Mine(s) => Ok(s),
        Lookup::Foreign { owner } => Err(foreign_vm(p.name(), vm, owner.as_deref(), state)),
    }
}

/// Whether the state dir a foreign VM's marker names still exists: then this project's record is a copy of that
/// project's (the VM has a project to be managed from); otherwise this project may have been moved from there.
pub fn owner_exists(owner: Option<&str>) -> bool {
    owner.is_some_and(|o| Path::new(o).is_dir())
}

/// The refusal for a recorded VM that belongs to another project (or that provisioner did not make).
pub fn foreign_vm(provider: &str, vm: &str, owner: Option<&str>, state: &StateDir) -> anyhow::Error {
    let ours = state.root.display();
    let what = match ProviderKind::parse(provider) {
        Some(ProviderKind::Virtualbox) => format!("VirtualBox VM {vm}"),
        _ => format!("libvirt domain {vm}"),
    };
    match owner {
        Some(dir) if owner_exists(owner) => anyhow::anyhow!(
            "the {what} recorded in {ours}/state.json belongs to another project (state dir {dir}), not to this one; \
             it was left untouched\nhint: this project's .provisioner/ is a copy of that project's: manage that VM \
             from {}; `provisioner up` here creates this project's own VM, `provisioner destroy -f` here forgets \
             the copied state (the other VM stays)",
            Path::new(dir).parent().unwrap_or(Path::new(dir)).display()
        ),
        Some(dir) => anyhow::anyhow!(
            "the {what} recorded in {ours}/state.json belongs to another project (state dir {dir}, which no longer \
             exists), not to this one; it was left untouched\nhint: if this project was moved from there, move it \
             back to manage that VM; to let it go, remove it yourself ({}), then `provisioner destroy -f` here",
            remove_by_hand(provider, vm)
        ),
        None => anyhow::anyhow!(
            "the {what} recorded in {ours}/state.json was not made by provisioner for this project (it carries no \
             provisioner marker); it was left untouched\nhint: `provisioner destroy -f` here forgets the record \
             (the VM stays), then `provisioner up` creates this project's own VM; remove that VM yourself ({}) if \
             you are sure it is not needed",
            remove_by_hand(provider, vm)
        ),
    }
}

fn remove_by_hand(provider: &str, vm: &str) -> String {
    match ProviderKind::parse(provider) {
        Some(ProviderKind::Virtualbox) => format!("`VBoxManage unregistervm {vm} --delete-all`"),
        _ => format!("`virsh undefine {vm}`"),
    }
}

/// Snapshot names: what every hypervisor accepts and a shell needs no quoting for.
pub fn check_snapshot_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['-', '.'])
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        anyhow::bail!(
            "\"{}\" is not a valid snapshot name\nhint: use 1-64 letters, digits, `-`, `_` or `.`, not starting \
             with `-` or `.`",
            crate::text::shown(name)
        );
    }
    Ok(())
}

/// How the guest of a created machine is reached over SSH (as Vagrant's `ssh_info`), as the provider that
/// recorded it in state.json says: the address of its SSH forward and the route there (directly, or through the
/// libvirt host it runs on, mirroring the host ports of its forwards: SSH first). No hypervisor call.
pub fn ssh_info(cfg: &Config, recorded: &MachineState, ssh: SocketAddr) -> GuestAddr {
    let host = match ProviderKind::parse(&recorded.provider) {
        Some(ProviderKind::Libvirt) => libvirt::Libvirt::host_of(recorded),
        _ => Host::Local,
    };
    let ports = match host {
        Host::Local => vec![ssh.port()],
        Host::Remote(_) => std::iter::once(ssh.port())
            .chain(cfg.all_forwards().iter().skip(1).map(|f| f.host).filter(|p| *p != 0 && *p != ssh.port()))
            .collect(),
    };
    GuestAddr { addr: ssh, host, ports }
}

/// The one place a provider is chosen.
pub fn select(cfg: &Config) -> Result<Box<dyn Provider>> {
    match cfg.machine.provider {
        ProviderKind::Libvirt if !crate::platform::LIBVIRT_HOST => anyhow::bail!(
            "provider \"libvirt\" is not supported on {} hosts: libvirt (virsh, QEMU/KVM) runs on Linux\n\
             hint: use VirtualBox: set [machine] provider = \"virtualbox\" (or \"auto\") in {}",
            std::env::consts::OS,
            cfg.path.display()
        ),
        ProviderKind::Libvirt => Ok(Box::new(libvirt::Libvirt::new(cfg)?)),
        ProviderKind::Virtualbox => Ok(Box::new(virtualbox::VirtualBox::new(cfg)?)),
        ProviderKind::Auto => {
            if crate::platform::LIBVIRT_HOST && which::which("virsh").is_ok() {
                Ok(Box::new(libvirt::Libvirt::new(cfg)?))
            } else if virtualbox::find_vboxmanage(cfg).is_some() {
                Ok(Box::new(virtualbox::VirtualBox::new(cfg)?))
            } else {
                anyhow::bail!(
                    "no hypervisor found: neither `virsh` (libvirt) nor `VBoxManage` (VirtualBox) is installed.\n\
                     hint: on Debian/Ubuntu run scripts/host-deps.sh (libvirt + QEMU), or install VirtualBox; \
                     then set [machine] provider in box-config.toml if you want one explicitly"
                )
            }
        }
    }
}

/// The hypervisor name for a machine: stable per config location, unique across projects. Falls back to the
/// path as given when the project directory cannot be resolved; [`crate::machine::identity::MachineId`] is the
/// one place the name is defined.
pub fn vm_name(cfg: &Config) -> String {
    match crate::machine::identity::MachineId::for_config(cfg) {
        Ok(id) => id.vm_name().to_string(),
        Err(_) => crate::machine::identity::MachineId::from_canonical(&cfg.base_dir(), &cfg.machine.name)
            .vm_name()
            .to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::VmState;

    #[test]
    fn every_state_is_a_string_in_json() {
        let json = |s: VmState| serde_json::to_value(s).unwrap();
        assert_eq!(json(VmState::Other("gurumeditation".into())), "gurumeditation");
        assert_eq!(json(VmState::AbortedSaved), "aborted_saved");
        assert_eq!(json(VmState::NotCreated), "not_created");
        assert_eq!(json(VmState::Running), "running");
        assert_eq!(json(VmState::Inaccessible), "inaccessible");
    }
}
