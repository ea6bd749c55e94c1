//! VirtualBox through `VBoxManage`, the way Vagrant drives it.
//!
//! Each box is imported ONCE as a master VM (`provisioner-master-<box id>`) with a snapshot `base`; every machine
//! is a linked clone of that snapshot, so creating a machine copies no disk. The clone gets CPUs, memory, NAT with
//! one `--natpf1` rule per forward (SSH first, named `ssh`), the serial console to a file in the state dir and the
//! cloud-init seed ISO on a DVD drive. The clone's description is set LAST and marks it complete: a clone without
//! it was left by an interrupted `create` and is recreated.
//!
//! Identity: the clone's UUID is chosen and recorded in state.json BEFORE `clonevm --uuid`, and every later call
//! addresses the VM by that UUID (VirtualBox's lookup by name skips inaccessible machines, so a name would make a
//! broken VM look absent). The description names the machine's canonical state dir
//! ([`crate::machine::identity`]): any spelling of the project path is the same machine, and a VM whose
//! description names another machine is refused, never removed.
//!
//! States (as Vagrant's VirtualBox driver and actions treat them; docs/virtualbox.md): saved and aborted-saved VMs
//! are not mutable, so `create` leaves them alone, `start` restores them and `halt` discards the saved state;
//! paused ones are resumed; inaccessible ones get an error with the fix. Release differences live in [`version`].

mod advice;
mod find;
mod info;
mod settings;
pub mod version;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use super::{BoxImage, Lookup, MachineSpec, Provider, VmState};
use crate::config::{Config, Firmware, Protocol};
use crate::machine::lock::FileLock;
use crate::machine::state::MachineState;
use crate::machine::StateDir;
use crate::process::{self, Cmd, Output};

pub use advice::advice;
pub use find::{is_executable, locate, WINDOWS_DEFAULT};
pub use info::{Controller, NatRule, VmInfo};
pub use version::{RulesFrom, Version};

/// The snapshot of the master that every machine is linked to.
pub const BASE_SNAPSHOT: &str = "base";
/// Controller we add when the box has no SATA/IDE slot left for the seed DVD.
pub const SEED_CONTROLLER: &str = "provisioner-seed";
/// The NIC we configure (NAT, with our forwards).
const NIC: u32 = 1;
/// Start of the description that marks a clone complete and names its state dir.
const MARKER_PREFIX: &str = "provisioner machine; state dir: ";

const QUERY: Duration = Duration::from_secs(60);
const CHANGE: Duration = Duration::from_secs(120);
const IMPORT: Duration = Duration::from_secs(30 * 60);
const START: Duration = Duration::from_secs(5 * 60);
/// How long `destroy` retries `unregistervm` while the session of a just-powered-off VM is still being released.
const UNLOCK: Duration = Duration::from_secs(30);

/// Build an argument vector from `&str`, `&Path`, `String`, ... (no shell: paths with spaces stay one argument).
macro_rules! args {
    ($($a:expr),* $(,)?) => { vec![$(OsString::from($a)),*] };
}

/// Locate VBoxManage: the config's path, PATH, then (Windows) %VBOX_MSI_INSTALL_PATH% and Program Files.
pub fn find_vboxmanage(cfg: &Config) -> Option<PathBuf> {
    let configured = cfg.virtualbox.vboxmanage.as_deref().map(|p| cfg.resolve(p));
    locate(configured.as_deref(), crate::platform::WINDOWS, |k| std::env::var_os(k), is_executable)
}

/// VBoxManage where VirtualBox installs it (PATH; on Windows also its installer's variable and Program Files),
/// for a command that has no box-config.toml (`global-status`).
pub fn find_on_host() -> Option<PathBuf> {
    locate(None, crate::platform::WINDOWS, |k| std::env::var_os(k), is_executable)
}

/// Name of the master VM imported from a box.
pub fn master_name(base: &BoxImage) -> String {
    format!("provisioner-master-{}", base.id)
}

pub struct VirtualBox {
    pub vboxmanage: PathBuf,
    /// From `VBoxManage --version`, asked once per run (by `preflight` or the first call that needs it).
    version: std::sync::OnceLock<Version>,
}

impl VirtualBox {
    pub fn new(cfg: &Config) -> Result<Self> {
        let vboxmanage = find_vboxmanage(cfg).ok_or_else(|| {
            anyhow!(
                "VBoxManage was not found (searched PATH{}).\n\
                 hint: install VirtualBox 6.1 or newer from virtualbox.org, or set `[virtualbox] vboxmanage = \
                 \"/path/to/VBoxManage\"` in box-config.toml (on Windows e.g. '{}')",
                if crate::platform::WINDOWS { ", %VBOX_MSI_INSTALL_PATH% and Program Files" } else { "" },
                WINDOWS_DEFAULT
            )
        })?;
        if !is_executable(&vboxmanage) {
            bail!(
                "the configured VBoxManage {} does not exist or is not executable.\n\
                 hint: fix `[virtualbox] vboxmanage` in box-config.toml, or remove it to search PATH",
                vboxmanage.display()
            );
        }
        Ok(Self::at(vboxmanage))
    }

    /// A provider driving the VBoxManage at this path.
    pub fn at(vboxmanage: impl Into<PathBuf>) -> Self {
        Self { vboxmanage: vboxmanage.into(), version: std::sync::OnceLock::new() }
    }

    /// The release, asked once (`VBoxManage --version`); every version-specific choice goes through it.
    pub fn version(&self) -> Result<Version> {
        if let Some(v) = self.version.get() {
            return Ok(*v);
        }
        let out = self.vbox(args!["--version"], QUERY)?;
        let all = format!("{}\n{}", out.stdout, out.stderr);
        if all.contains("vboxdrv") {
            let hint = advice(&all).unwrap_or_default();
            bail!(
                "VirtualBox is installed but its kernel driver is not usable:\n{}\n{hint}",
                out.stderr.trim()
            );
        }
        let text = out.stdout.trim();
        match Version::parse(text) {
            Some(v) if v.supported() => Ok(*self.version.get_or_init(|| v)),
            _ => bail!(
                "VirtualBox {text} ({}) is too old or unrecognised.\nhint: install VirtualBox {}.{} or newer",
                self.vboxmanage.display(),
                version::MIN.major,
                version::MIN.minor
            ),
        }
    }

    /// NAT rules of one NIC, from where this release shows them reliably.
    fn nat_rules_of(&self, info: &VmInfo, adapter: u32) -> Result<Vec<NatRule>> {
        match self.version()?.rules_from() {
            RulesFrom::ShowVmInfo => Ok(info.nat_rules(adapter)),
            RulesFrom::SettingsFile => {
                let cfg = info.get("CfgFile").context(
                    "`showvminfo` names no settings file (CfgFile) to read the NAT rules from\nhint: check the VM \
                     in the VirtualBox GUI; `provisioner destroy -f` and `up` recreate it",
                )?;
                let xml = std::fs::read_to_string(cfg).with_context(|| {
                    format!(
                        "read the VM settings file {cfg} (VirtualBox {} shows NAT rules only there)\nhint: the \
                         file must be readable by you; upgrading VirtualBox past 7.0.0 also avoids this",
                        self.version().map(|v| v.to_string()).unwrap_or_default()
                    )
                })?;
                Ok(settings::nat_rules(&xml, adapter))
            }
        }
    }

    /// Run VBoxManage; a non-zero exit becomes an error with the command, its message and advice.
    fn vbox(&self, args: Vec<OsString>, timeout: Duration) -> Result<Output> {
        let cmd = Cmd::new(&self.vboxmanage).args(args).timeout(timeout);
        let out = cmd.output()?;
        if !out.success() {
            return Err(failure(&cmd, &out));
        }
        Ok(out)
    }

    /// `showvminfo --machinereadable`, or `None` when no VM has that name or UUID.
    pub fn info(&self, vm: &str) -> Result<Option<VmInfo>> {
        operand(vm)?;
        let cmd =
            Cmd::new(&self.vboxmanage).args(args!["showvminfo", vm, "--machinereadable"]).timeout(QUERY);
        let out = cmd.output()?;
        if out.success() {
            return Ok(Some(VmInfo::parse(&out.stdout)));
        }
        if is_not_found(&out.stderr) {
            return Ok(None);
        }
        Err(failure(&cmd, &out))
    }

    fn info_required(&self, vm: &str) -> Result<VmInfo> {
        self.info(vm)?.ok_or_else(|| {
            anyhow!("VirtualBox has no VM named {vm}\nhint: run `provisioner up` to create it")
        })
    }

    /// The master VM of a box, imported and snapshotted once; a lock beside the box makes parallel `up`s safe and
    /// an import interrupted after it registered the VM is completed, not repeated.
    fn ensure_master(&self, base: &BoxImage) -> Result<String> {
        let master = master_name(base);
        let lock = lock_beside(&base.disk)?;
        let info = match self.info(&master)? {
            Some(i) => i,
            None => {
                let ovf = std::path::absolute(&base.disk)?;
                let cmd = Cmd::new(&self.vboxmanage)
                    .args(args!["import", &ovf, "--vsys", "0", "--vmname", &master])
                    .timeout(IMPORT);
                let out = cmd.output()?;
                if !out.success() {
                    let dropped = drop_unimportable_box(base, &out, lock);
                    return Err(failure(&cmd, &out)
                        .context(format!("import the box {} into VirtualBox{dropped}", ovf.display())));
                }
                self.info_required(&master)?
            }
        };
        if info.inaccessible() {
            bail!("the master VM {master} is inaccessible\n{}", advice("inaccessible").unwrap_or_default());
        }
        if !info.snapshot_names().contains(&BASE_SNAPSHOT) {
            self.vbox(args!["snapshot", &master, "take", BASE_SNAPSHOT], CHANGE)?;
        }
        Ok(master)
    }

    /// Power off or discard the saved state (if needed) and unregister a VM with its disks.
    fn remove(&self, vm: &str, info: &VmInfo) -> Result<()> {
        let state = info.state();
        if state == VmState::Inaccessible {
            // Its files cannot be read, so nothing can be deleted with it: drop the registration only.
            return self.vbox(args!["unregistervm", vm], CHANGE).map(drop);
        }
        if state.is_saved() {
            self.vbox(args!["discardstate", vm], CHANGE)?;
        } else if !state.is_off() {
            self.vbox(args!["controlvm", vm, "poweroff"], CHANGE)?;
        }
        let flag = self.version()?.delete_flag();
        // Right after a power-off the VM's session may still be locked for a moment: retry on exactly that.
        let result = process::wait_until(UNLOCK, &format!("VirtualBox to release {vm}"), || {
            let cmd = Cmd::new(&self.vboxmanage).args(args!["unregistervm", vm, flag]).timeout(CHANGE);
            let out = cmd.output()?;
            Ok(if out.success() {
                Some(Ok(()))
            } else if out.stderr.contains("is locked") || out.stderr.contains("VBOX_E_INVALID_OBJECT_STATE") {
                None
            } else {
                Some(Err(failure(&cmd, &out)))
            })
        });
        result.with_context(|| {
            format!(
                "cannot unregister {vm}: VirtualBox keeps it locked\nhint: close whatever holds it (the VirtualBox GUI, \
                 a VBoxManage still running) and run the command again"
            )
        })?
    }

    /// The VM we made for this machine, if any: by its recorded UUID, else (machines made before UUIDs were
    /// recorded) by name.
    fn find(&self, spec: &MachineSpec, recorded: Option<&str>) -> Result<Option<VmInfo>> {
        if let Some(uuid) = recorded {
            if let Some(i) = self.info(uuid)? {
                return Ok(Some(i));
            }
        }
        self.info(&spec.vm_name)
    }

    /// Everything `modifyvm`/`storageattach` sets on a clone; the description (the completion marker) goes last.
    fn configure(&self, spec: &MachineSpec, vm: &str, info: &VmInfo) -> Result<()> {
        let old: Vec<OsString> =
            self.nat_rules_of(info, NIC)?.iter().flat_map(|r| args!["--natpf1", "delete", &r.name]).collect();
        if !old.is_empty() {
            self.vbox([args!["modifyvm", vm], old].concat(), CHANGE)?;
        }
        let mut a = args![
            "modifyvm",
            vm,
            "--cpus",
            spec.cpus.to_string(),
            "--memory",
            spec.memory_mb.to_string(),
            "--nic1",
            "nat"
        ];
        if spec.base.firmware == Firmware::Uefi {
            a.extend(args!["--firmware", "efi"]);
        }
        for rule in nat_rules(spec)? {
            a.extend(args!["--natpf1", rule.to_arg()]);
        }
        a.extend(private_nic_args(spec, info));
        let serial = std::path::absolute(spec.state.serial_log())?;
        a.extend(args!["--uart1", "0x3F8", "4", "--uartmode1", "file", &serial]);
        self.vbox(a, CHANGE)?;

        // A machine whose keys go into its disk (no cloud-init in the box) gets no seed DVD.
        let seed = if spec.seed_iso.as_os_str().is_empty() {
            PathBuf::new()
        } else {
            std::path::absolute(&spec.seed_iso)?
        };
        let slot = match seed_slot(info, &seed.to_string_lossy()) {
            _ if seed.as_os_str().is_empty() => None,
            SeedSlot::Attached => None,
            SeedSlot::At { controller, port, device, grow_to } => {
                if let Some(n) = grow_to {
                    self.vbox(
                        args!["storagectl", vm, "--name", &controller, "--portcount", n.to_string()],
                        CHANGE,
                    )?;
                }
                Some((controller, port, device))
            }
            SeedSlot::NewController => {
                self.vbox(
                    args![
                        "storagectl",
                        vm,
                        "--name",
                        SEED_CONTROLLER,
                        "--add",
                        "sata",
                        "--controller",
                        "IntelAhci",
                        "--portcount",
                        "1",
                        "--bootable",
                        "off"
                    ],
                    CHANGE,
                )?;
                Some((SEED_CONTROLLER.to_string(), 0, 0))
            }
        };
        if let Some((controller, port, device)) = slot {
            self.vbox(
                args![
                    "storageattach",
                    vm,
                    "--storagectl",
                    &controller,
                    "--port",
                    port.to_string(),
                    "--device",
                    device.to_string(),
                    "--type",
                    "dvddrive",
                    "--medium",
                    &seed
                ],
                CHANGE,
            )?;
        }
        self.vbox(args!["modifyvm", vm, "--description", marker(spec)], CHANGE)?;
        Ok(())
    }
}

/// The boot disk of a VM: the first hard disk image attached, in controller order (ports, then devices).
pub fn boot_disk(info: &VmInfo) -> Option<String> {
    let disk = |v: &str| {
        let v = v.to_ascii_lowercase();
        [".vmdk", ".vdi", ".vhd"].iter().any(|e| v.ends_with(e))
    };
    info.controllers().iter().find_map(|c| {
        let devices = if c.is_ide() { 2 } else { 1 };
        let ports = if c.is_ide() { 2 } else { c.port_count.max(1) };
        (0..ports)
            .flat_map(|p| (0..devices).map(move |d| (p, d)))
            .find_map(|(p, d)| info.attachment(&c.name, p, d).filter(|v| disk(v)).map(str::to_string))
    })
}

/// `VBoxManage showmediuminfo disk` output (VBoxManageDisk.cpp: `Key:   value` lines): (parent UUID or None for a
/// base image, location, storage format).
pub fn medium_info(text: &str) -> (Option<String>, Option<String>, Option<String>) {
    let get = |key: &str| {
        text.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == key).then(|| v.trim().to_string())
        })
    };
    let parent = get("Parent UUID").filter(|p| !p.is_empty() && p != "base");
    (parent, get("Location"), get("Storage format"))
}

/// The private network's NIC: an internal network (`--nic2 intnet --intnet2 NAME`, the VBoxManage manual's
/// modifyvm networking settings) with the machine's MAC, and the first NIC's MAC set to the one the guest's
/// network-config matches. Without a private network a NIC 2 we attached earlier is removed. Pure.
pub fn private_nic_args(spec: &MachineSpec, info: &VmInfo) -> Vec<OsString> {
    match &spec.private_net {
        Some(nic) => args![
            "--macaddress1",
            vbox_mac(super::network::PRIMARY_MAC),
            "--nic2",
            "intnet",
            "--intnet2",
            &nic.net.name,
            "--macaddress2",
            vbox_mac(&nic.mac),
            "--cableconnected2",
            "on"
        ],
        None if info.get("nic2") == Some("intnet") => args!["--nic2", "none"],
        None => Vec::new(),
    }
}

/// `52:54:00:ab:cd:ef` as VBoxManage takes it: `525400ABCDEF`.
fn vbox_mac(mac: &str) -> String {
    mac.replace(':', "").to_ascii_uppercase()
}

/// The description that marks a clone as complete and names the (canonical) state dir it belongs to.
fn marker(spec: &MachineSpec) -> String {
    format!("{MARKER_PREFIX}{}", spec.state.root.display())
}

/// Who a VM found under our name or recorded UUID belongs to, from its description.
#[derive(Debug, PartialEq, Eq)]
enum Owner {
    /// Complete, and its marker names this machine's state dir (under any spelling).
    Us,
    /// No description: a clone an interrupted `create` left before its last step.
    HalfMade,
    /// Another provisioner machine's state dir, or a description we did not write.
    Other(String),
}

fn owner(info: &VmInfo, state: &StateDir) -> Owner {
    match info.get("description").unwrap_or("") {
        "" => Owner::HalfMade,
        d => match d.strip_prefix(MARKER_PREFIX) {
            Some(dir) if crate::machine::identity::same_dir(Path::new(dir), &state.root) => Owner::Us,
            _ => Owner::Other(d.to_string()),
        },
    }
}

/// One line of `VBoxManage list vms`: `"NAME" {UUID}` as (name, uuid). Pure.
fn list_entry(line: &str) -> Option<(&str, &str)> {
    let (name, uuid) = line.trim().rsplit_once(' ')?;
    let name = name.strip_prefix('"')?.strip_suffix('"')?;
    let uuid = uuid.strip_prefix('{')?.strip_suffix('}')?;
    Some((name, uuid))
}

/// A VM name or UUID as a VBoxManage operand: never one that could be read as an option.
fn operand(vm: &str) -> Result<&str> {
    if vm.is_empty() || vm.starts_with('-') {
        bail!("refusing the VirtualBox VM reference {vm:?}: it is empty or starts with '-'\nhint: state.json is damaged; `provisioner destroy -f` resets it");
    }
    Ok(vm)
}

/// A random (version 4) UUID for a new VM.
fn new_uuid() -> String {
    use rand_core::RngCore;
    let mut b = [0u8; 16];
    rand_core::OsRng.fill_bytes(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
}

/// Record the VM's UUID in state.json (before the VM is made with it).
fn record_uuid(spec: &MachineSpec, st: &mut MachineState, uuid: &str) -> Result<()> {
    if st.vm_id.as_deref() != Some(uuid) {
        st.vm_id = Some(uuid.to_string());
        st.save(&spec.state)?;
    }
    Ok(())
}

/// The error for a VM VirtualBox cannot read.
fn inaccessible(vm: &str) -> anyhow::Error {
    anyhow!(
        "VirtualBox lists the VM {vm} as inaccessible: its settings file or a disk it needs was moved or deleted\n{}",
        advice("inaccessible").unwrap_or_default()
    )
}

/// Non-zero VBoxManage exit: the command, its status, its message and what to do.
fn failure(cmd: &Cmd, out: &Output) -> anyhow::Error {
    let text = if out.stderr.trim().is_empty() { &out.stdout } else { &out.stderr };
    let hint = advice(&format!("{}\n{}", out.stderr, out.stdout)).unwrap_or(
        "hint: the lines above are VirtualBox's own message; run the command by hand to investigate \
         (`provisioner -v` prints every VBoxManage call)",
    );
    anyhow!(
        "`{}` failed ({}):\n{}\n{hint}",
        cmd.display(),
        process::describe_status(&out.status),
        process::tail(text, 20)
    )
}

/// After VirtualBox refused to import a box: remove its box cache entry (`<cache>/boxes/<id>/`, the directory of
/// the `.ovf`), so the next `up` unpacks or downloads it again instead of failing on the same files. Not when
/// the failure is not the box's: VBoxManage killed or interrupted (not its exit 1), or a failure VirtualBox's text
/// explains (a leftover VM folder, the host's virtualization). Returns what to add to the error. `lock` (the
/// import lock, a file in the entry) is released once the entry is renamed away, before it is deleted: Windows
/// cannot finish deleting a file this process holds open, so the directory would never be empty.
fn drop_unimportable_box(base: &BoxImage, out: &Output, lock: FileLock) -> String {
    let text = format!("{}\n{}", out.stderr, out.stdout);
    if out.code() != Some(1) || process::interrupted().is_some() || advice(&text).is_some() {
        return String::new();
    }
    let Some(entry) = base.disk.parent() else { return String::new() };
    let is_entry = entry.file_name().is_some_and(|n| n.to_string_lossy() == base.id)
        && entry.parent().and_then(|p| p.file_name()).is_some_and(|n| n == "boxes");
    if !is_entry {
        return String::new();
    }
    let gone = entry.with_file_name(format!("{}.removing-{}", base.id, std::process::id()));
    match std::fs::rename(entry, &gone).map_err(anyhow::Error::from).and_then(|()| {
        drop(lock);
        crate::boxes::cache::remove_tree(&gone)
    }) {
        Ok(()) => format!(
            " (the box was removed from the box cache, {}: the next `up` unpacks or downloads it again; if \
             VirtualBox refuses it again, the box itself is damaged: get it again or use another box)",
            entry.display()
        ),
        Err(e) => format!(
            " (removing the box from the box cache failed: {e:#}; `provisioner box remove {}` does it)",
            base.id
        ),
    }
}

fn is_not_found(stderr: &str) -> bool {
    stderr.contains("VBOX_E_OBJECT_NOT_FOUND") || stderr.contains("Could not find a registered machine")
}

/// Hold the exclusive lock on `<dir of path>/.vbox-master.lock` (waiting up to IMPORT for a parallel import).
fn lock_beside(path: &Path) -> Result<FileLock> {
    let lock = path.with_file_name(".vbox-master.lock");
    crate::machine::lock::wait(
        &lock,
        IMPORT,
        &format!("the lock {} (another import of this box)", lock.display()),
    )
}

/// The NAT rules for a spec: the first forward is SSH and is named `ssh`; others `<name>-<proto>-<host port>`.
pub fn nat_rules(spec: &MachineSpec) -> Result<Vec<NatRule>> {
    spec.forwards
        .iter()
        .enumerate()
        .map(|(i, f)| {
            if f.host == 0 {
                bail!("forward to guest port {} has host port 0; pick a port in box-config.toml", f.guest);
            }
            let proto = match f.protocol {
                Protocol::Tcp => "tcp",
                Protocol::Udp => "udp",
            };
            let name = if i == 0 {
                "ssh".to_string()
            } else {
                let label: String = f
                    .name
                    .as_deref()
                    .unwrap_or("fwd")
                    .chars()
                    .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
                    .collect();
                // Never a value VBoxManage could take for an option.
                let label =
                    if label.starts_with('-') || label.is_empty() { format!("fwd{label}") } else { label };
                format!("{label}-{proto}-{}", f.host)
            };
            Ok(NatRule {
                name,
                proto: proto.into(),
                host_ip: f.host_ip.clone(),
                host_port: f.host,
                guest_ip: String::new(),
                guest_port: f.guest,
            })
        })
        .collect()
}

/// Where the seed DVD goes.
#[derive(Debug, PartialEq, Eq)]
pub enum SeedSlot {
    /// The seed is already attached (a re-run of create).
    Attached,
    /// A free slot on an existing controller; `grow_to` = raise the SATA port count first.
    At { controller: String, port: u32, device: u32, grow_to: Option<u32> },
    /// No SATA/IDE slot left: add our own SATA controller.
    NewController,
}

/// Pick the seed's slot from the box's controllers: a free SATA port (growing the port count if needed), else a
/// free IDE slot or empty IDE DVD drive, else a controller of our own.
pub fn seed_slot(info: &VmInfo, seed: &str) -> SeedSlot {
    let controllers = info.controllers();
    let slots = |c: &Controller| -> Vec<(u32, u32)> {
        if c.is_ide() {
            vec![(0, 0), (0, 1), (1, 0), (1, 1)]
        } else {
            (0..c.port_count).map(|p| (p, 0)).collect()
        }
    };
    if controllers.iter().any(|c| slots(c).iter().any(|&(p, d)| info.attachment(&c.name, p, d) == Some(seed)))
    {
        return SeedSlot::Attached;
    }
    let at = |c: &Controller, port, device, grow_to| SeedSlot::At {
        controller: c.name.clone(),
        port,
        device,
        grow_to,
    };
    for c in controllers.iter().filter(|c| c.is_sata()) {
        let free = slots(c)
            .into_iter()
            .find(|&(p, d)| matches!(info.attachment(&c.name, p, d), None | Some("none")));
        match free {
            Some((p, d)) => return at(c, p, d, None),
            None if c.port_count < c.max_port_count => return at(c, c.port_count, 0, Some(c.port_count + 1)),
            None => {}
        }
    }
    for c in controllers.iter().filter(|c| c.is_ide()) {
        let free = slots(c).into_iter().find(|&(p, d)| {
            matches!(info.attachment(&c.name, p, d), None | Some("none") | Some("emptydrive"))
        });
        if let Some((p, d)) = free {
            return at(c, p, d, None);
        }
    }
    SeedSlot::NewController
}

impl Provider for VirtualBox {
    fn name(&self) -> &'static str {
        "virtualbox"
    }

    fn kind(&self) -> crate::config::ProviderKind {
        crate::config::ProviderKind::Virtualbox
    }

    fn machines(&self) -> Result<Vec<super::FoundVm>> {
        let out = self.vbox(args!["list", "vms"], QUERY)?;
        let mut found = Vec::new();
        // `"NAME" {UUID}` per VM; every VM name this tool makes starts with `provisioner-` (masters too: their
        // description carries no marker, so they are left out below).
        for (name, uuid) in out.stdout.lines().filter_map(list_entry) {
            if !name.starts_with("provisioner-") {
                continue;
            }
            // Removed meanwhile: not listed.
            let Some(i) = self.info(uuid)? else { continue };
            let Some(dir) = i.get("description").and_then(|d| d.strip_prefix(MARKER_PREFIX)) else {
                continue;
            };
            found.push(super::FoundVm {
                name: name.to_string(),
                state: i.state(),
                state_dir: PathBuf::from(dir),
            });
        }
        Ok(found)
    }

    fn preflight(&self) -> Result<()> {
        self.version().map(drop)
    }

    fn state(&self, vm: &str) -> Result<VmState> {
        Ok(match self.info(vm)? {
            None => VmState::NotCreated,
            Some(i) => i.state(),
        })
    }

    fn lookup(&self, vm: &str, state: &StateDir) -> Result<Lookup> {
        let Some(i) = self.info(vm)? else { return Ok(Lookup::NotCreated) };
        if i.inaccessible() {
            // Its settings (and description) cannot be read: the commands report it with the fix.
            return Ok(Lookup::Mine(VmState::Inaccessible));
        }
        Ok(match owner(&i, state) {
            // A clone without its marker was left by an interrupted `up` of this machine (`up` completes it).
            Owner::Us | Owner::HalfMade => Lookup::Mine(i.state()),
            Owner::Other(description) => {
                Lookup::Foreign { owner: description.strip_prefix(MARKER_PREFIX).map(str::to_string) }
            }
        })
    }

    fn create(&self, spec: &MachineSpec, recorded: &mut MachineState) -> Result<()> {
        if spec.base.format != "ovf" {
            bail!(
                "the VirtualBox provider needs an OVF box, but this box is {} ({}).\n\
                 hint: use a Vagrant box built for virtualbox (`[box] vagrant = \"x.box\"`) or an .ova URL, \
                 or set `provider = \"libvirt\"`",
                spec.base.format,
                spec.base.disk.display()
            );
        }
        let master = self.ensure_master(&spec.base)?;
        let known = recorded.vm_id.clone();
        let mut uuid = known.clone();
        if let Some(i) = self.find(spec, known.as_deref())? {
            let found = i.get("UUID").unwrap_or("").to_string();
            let vm = operand(&found)?.to_string();
            if i.inaccessible() {
                return Err(inaccessible(&vm));
            }
            match owner(&i, &spec.state) {
                // Ours and complete: keep it. Re-apply the settings while it is off, so config edits take effect; a
                // saved VM is not mutable (modifyvm fails with VBOX_E_INVALID_VM_STATE) and is left as it is.
                Owner::Us => {
                    record_uuid(spec, recorded, &vm)?;
                    return match i.state() {
                        s if s.is_off() => self.configure(spec, &vm, &i),
                        _ => Ok(()),
                    };
                }
                // Left by an interrupted create (no completion marker): remove, then clone afresh.
                Owner::HalfMade => {
                    self.remove(&vm, &i).with_context(|| format!("remove the half-made VM {}", spec.vm_name))?;
                    uuid.get_or_insert(vm);
                }
                Owner::Other(description) => bail!(
                    "the VirtualBox VM {} ({vm}) does not belong to this machine ({}): its description says \
                     {description:?}; it was left untouched\nhint: destroy it from the project it belongs to, or \
                     rename this machine ([machine] name in box-config.toml)",
                    spec.vm_name,
                    spec.state.root.display()
                ),
            }
        }
        // Recorded before the VM exists, so an interrupted clone is found (and completed) by UUID next time.
        let uuid = uuid.unwrap_or_else(new_uuid);
        record_uuid(spec, recorded, &uuid)?;
        self.vbox(
            args![
                "clonevm",
                &master,
                "--snapshot",
                BASE_SNAPSHOT,
                "--options",
                "link",
                "--name",
                operand(&spec.vm_name)?,
                "--uuid",
                &uuid,
                "--register"
            ],
            IMPORT,
        )?;
        let info = self.info_required(&uuid)?;
        self.configure(spec, &uuid, &info).with_context(|| format!("configure the VM {}", spec.vm_name))
    }

    /// The clone's own disk: its differencing image (linked clone), with the images under it that VirtualBox
    /// finds through its media registry (`showmediuminfo disk`: Parent UUID, Location), read-only.
    fn offline_disk(&self, vm: &str, _state: &StateDir) -> Result<crate::boxes::inject::Disk> {
        let info = self.info_required(vm)?;
        let top = boot_disk(&info).ok_or_else(|| {
            anyhow!(
                "the VM {vm} has no hard disk attached, so its disk cannot be edited before the first boot
hint:                  `provisioner destroy -f` and `up` clone it again from the box"
            )
        })?;
        let mut chain: Vec<(PathBuf, String)> = Vec::new();
        let mut next = top.clone();
        // A clone of a clone of ... is a chain; 32 images deep is far past any box's.
        for _ in 0..32 {
            let out = self.vbox(args!["showmediuminfo", "disk", &next], QUERY)?;
            let (parent, location, format) = medium_info(&out.stdout);
            let location = location.unwrap_or_else(|| next.clone());
            let format = format.ok_or_else(|| {
                anyhow!(
                    "`VBoxManage showmediuminfo disk {next}` names no storage format
hint: run it by hand; the                      VirtualBox release may print it under another name"
                )
            })?;
            chain.push((PathBuf::from(location), crate::boxes::inject::driver(&format)?.to_string()));
            match parent {
                Some(p) => next = p,
                None => {
                    let (path, format) = chain.remove(0);
                    return Ok(crate::boxes::inject::Disk { path, format, backing: chain });
                }
            }
        }
        bail!(
            "the disk {top} of {vm} sits on more than 32 differencing images
hint: `provisioner destroy -f` and `up`"
        )
    }

    fn start(&self, vm: &str) -> Result<()> {
        match self.state(vm)? {
            VmState::Running => Ok(()),
            VmState::Paused => self.vbox(args!["controlvm", vm, "resume"], CHANGE).map(drop),
            VmState::NotCreated => {
                bail!("VirtualBox has no VM {vm}\nhint: run `provisioner up`")
            }
            VmState::Inaccessible => Err(inaccessible(vm)),
            // poweroff/aborted boot; saved/aborted-saved restore their saved state (Vagrant: Resume -> Boot).
            _ => self
                .vbox(args!["startvm", vm, "--type", "headless"], START)
                .map(drop)
                .with_context(|| format!("start the VM {vm}")),
        }
    }

    fn halt(&self, vm: &str, timeout: Duration, force: bool) -> Result<()> {
        let state = self.state(vm)?;
        match &state {
            VmState::NotCreated | VmState::Stopped | VmState::Aborted => return Ok(()),
            // Powered off already, with memory on disk: drop it so the next start is a cold boot (Vagrant's
            // DiscardState). Afterwards the VM is "poweroff" (from saved) or "aborted" (from aborted-saved).
            VmState::Saved | VmState::AbortedSaved => {
                return self.vbox(args!["discardstate", vm], CHANGE).map(drop);
            }
            VmState::Inaccessible => return Err(inaccessible(vm)),
            VmState::Paused if !force => {
                // A paused guest cannot see the ACPI button: resume it first (Vagrant's halt does the same).
                self.vbox(args!["controlvm", vm, "resume"], CHANGE)?;
            }
            _ => {}
        }
        if !force && matches!(state, VmState::Running | VmState::Paused) {
            self.vbox(args!["controlvm", vm, "acpipowerbutton"], CHANGE)?;
            let stopped = process::wait_until(timeout, "the guest to power off", || {
                Ok(self.state(vm)?.is_off().then_some(()))
            });
            if stopped.is_ok() {
                return Ok(());
            }
        }
        self.vbox(args!["controlvm", vm, "poweroff"], CHANGE).map(drop)
    }

    fn destroy(&self, vm: &str, state: &StateDir) -> Result<()> {
        let Some(i) = self.info(vm)? else { return Ok(()) };
        if !i.inaccessible() {
            if let Owner::Other(description) = owner(&i, state) {
                bail!(
                    "the VirtualBox VM {vm} does not belong to this machine ({}): its description says \
                     {description:?}; it was left untouched\nhint: destroy it from the project it belongs to",
                    state.root.display()
                );
            }
        }
        self.remove(vm, &i)
    }

    // Snapshots and suspend/resume (issue 11), kept together: VirtualBox's state rules live in `snapshots`.
    fn snapshot_save(&self, vm_name: &str, name: &str) -> Result<()> {
        let info = self.info_required(vm_name)?;
        if info.snapshot_names().contains(&name) {
            bail!(
                "the machine already has a snapshot named {name:?}\nhint: pick another name, or `provisioner \
                 snapshot delete {name}` first"
            );
        }
        // A running VM is snapshotted online (memory included); VirtualBox pauses it for the moment it takes.
        self.vbox(args!["snapshot", vm_name, "take", name], IMPORT).map(drop)
    }

    fn snapshot_restore(&self, vm_name: &str, name: &str) -> Result<()> {
        let info = self.require_snapshot(vm_name, name)?;
        let was = info.state();
        // VirtualBox restores only a VM that is powered off or saved: power it off first, start it again after.
        if matches!(was, VmState::Running | VmState::Paused) {
            self.vbox(args!["controlvm", vm_name, "poweroff"], CHANGE)?;
        }
        self.vbox(args!["snapshot", vm_name, "restore", name], IMPORT)?;
        if was == VmState::Running {
            self.start(vm_name)?;
        }
        Ok(())
    }

    fn snapshot_list(&self, vm_name: &str) -> Result<Vec<String>> {
        Ok(self.info_required(vm_name)?.snapshot_names().into_iter().map(str::to_string).collect())
    }

    fn snapshot_delete(&self, vm_name: &str, name: &str) -> Result<()> {
        self.require_snapshot(vm_name, name)?;
        self.vbox(args!["snapshot", vm_name, "delete", name], IMPORT).map(drop)
    }

    fn suspend(&self, vm_name: &str) -> Result<()> {
        match self.state(vm_name)? {
            VmState::Running | VmState::Paused => {
                self.vbox(args!["controlvm", vm_name, "savestate"], IMPORT).map(drop)
            }
            other => bail!(
                "the machine {vm_name} is {other}; only a running machine can be suspended\nhint: `provisioner up` \
                 starts it"
            ),
        }
    }

    fn resume(&self, vm_name: &str) -> Result<()> {
        let info = self.info_required(vm_name)?;
        match info.state() {
            VmState::Running => Ok(()),
            // aborted-saved (the VM process died while suspended) restores like saved.
            s if s.is_saved() || s == VmState::Paused => self.start(vm_name),
            other => bail!(
                "the machine {vm_name} is {other} and not suspended; nothing to resume\nhint: `provisioner up` \
                 starts a stopped machine"
            ),
        }
    }
}

impl VirtualBox {
    fn require_snapshot(&self, vm_name: &str, name: &str) -> Result<VmInfo> {
        let info = self.info_required(vm_name)?;
        let all = info.snapshot_names();
        if !all.contains(&name) {
            bail!(
                "the machine has no snapshot named {name:?} (it has: {})\nhint: `provisioner snapshot list` shows them",
                if all.is_empty() { "none".to_string() } else { all.join(", ") }
            );
        }
        Ok(info)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_vms_line_gives_name_and_uuid() {
        let uuid = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";
        assert_eq!(
            list_entry(&format!("\"provisioner-web-1a2b3c4d\" {{{uuid}}}")),
            Some(("provisioner-web-1a2b3c4d", uuid))
        );
        assert_eq!(
            list_entry(&format!("\"a \"quoted\" name\" {{{uuid}}}")),
            Some(("a \"quoted\" name", uuid))
        );
        for bad in ["", "\"no uuid\"", "name {uuid}", &format!("\"x\" {uuid}")] {
            assert_eq!(list_entry(bad), None, "{bad}");
        }
    }

    fn info(lines: &str) -> VmInfo {
        VmInfo::parse(lines)
    }

    #[test]
    fn seed_goes_to_a_free_sata_port_growing_the_port_count() {
        let i = info(
            "storagecontrollername0=\"SATA Controller\"\nstoragecontrollertype0=\"IntelAhci\"\n\
             storagecontrollerportcount0=\"1\"\nstoragecontrollermaxportcount0=\"30\"\n\
             \"SATA Controller-0-0\"=\"/vms/disk.vmdk\"\n",
        );
        let want =
            SeedSlot::At { controller: "SATA Controller".into(), port: 1, device: 0, grow_to: Some(2) };
        assert_eq!(seed_slot(&i, "/s/seed.iso"), want);
        let i2 = info("storagecontrollername0=\"S\"\nstoragecontrollertype0=\"IntelAhci\"\nstoragecontrollerportcount0=\"2\"\n\"S-0-0\"=\"/d\"\n\"S-1-0\"=\"/s/seed.iso\"\n");
        assert_eq!(seed_slot(&i2, "/s/seed.iso"), SeedSlot::Attached);
    }

    #[test]
    fn boot_disk_is_the_first_hard_disk_and_its_parents_come_from_showmediuminfo() {
        let i = info(
            "storagecontrollername0=\"IDE\"\nstoragecontrollertype0=\"PIIX4\"\nstoragecontrollerportcount0=\"2\"\n\
             storagecontrollername1=\"SATA\"\nstoragecontrollertype1=\"IntelAhci\"\nstoragecontrollerportcount1=\"2\"\n\
             \"IDE-0-0\"=\"/s/seed.iso\"\n\"IDE-1-0\"=\"emptydrive\"\n\"SATA-0-0\"=\"/vms/vb/Snapshots/{1b2c}.vmdk\"\n\
             \"SATA-1-0\"=\"/vms/vb/data.VDI\"\n",
        );
        assert_eq!(boot_disk(&i).as_deref(), Some("/vms/vb/Snapshots/{1b2c}.vmdk"));
        assert_eq!(
            boot_disk(&info("storagecontrollername0=\"IDE\"\nstoragecontrollertype0=\"PIIX4\"\n")),
            None
        );
        let diff = "UUID:           1b2c\nParent UUID:    9f8e\nState:          created\n\
                    Location:       /vms/vb/Snapshots/{1b2c}.vmdk\nStorage format: VMDK\n";
        assert_eq!(
            medium_info(diff),
            (Some("9f8e".into()), Some("/vms/vb/Snapshots/{1b2c}.vmdk".into()), Some("VMDK".into()))
        );
        let base =
            "UUID:           9f8e\nParent UUID:    base\nLocation:       C:\\VMs\\m\\box-disk001.vmdk\n\
                    Storage format: VMDK\n";
        assert_eq!(medium_info(base).0, None);
        assert_eq!(medium_info(base).1.as_deref(), Some("C:\\VMs\\m\\box-disk001.vmdk"));
    }

    #[test]
    fn nothing_we_pass_can_be_read_as_an_option() {
        assert!(operand("--delete").is_err() && operand("").is_err());
        assert_eq!(
            operand("0c4f6d2e-6a57-4ad4-9a8f-1d9c0e2f3b4a").unwrap(),
            "0c4f6d2e-6a57-4ad4-9a8f-1d9c0e2f3b4a"
        );
        let u = new_uuid();
        assert_eq!((u.len(), &u[14..15]), (36, "4"), "{u}");
    }

    #[test]
    fn seed_uses_an_empty_ide_drive_else_its_own_controller() {
        let i = info(
            "storagecontrollername0=\"IDE\"\nstoragecontrollertype0=\"PIIX4\"\nstoragecontrollerportcount0=\"2\"\n\
             \"IDE-0-0\"=\"/d.vmdk\"\n\"IDE-0-1\"=\"/e.vmdk\"\n\"IDE-1-0\"=\"emptydrive\"\n",
        );
        let want = SeedSlot::At { controller: "IDE".into(), port: 1, device: 0, grow_to: None };
        assert_eq!(seed_slot(&i, "/s.iso"), want);
        let scsi = info(
            "storagecontrollername0=\"SCSI\"\nstoragecontrollertype0=\"LsiLogic\"\n\"SCSI-0-0\"=\"/d\"\n",
        );
        assert_eq!(seed_slot(&scsi, "/s.iso"), SeedSlot::NewController);
    }
}
