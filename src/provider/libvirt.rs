//! libvirt through `virsh` and `qemu-img` only.
//!
//! The disk is a qcow2 overlay in the state dir on top of the cached box (never modified). The domain XML is
//! rendered from `assets/libvirt/domain.xml.hbs`; its `<metadata>` names the tool and the state dir, so a domain of
//! the same name that we did not make is refused instead of touched. Networking is user-mode with every forward
//! bound on the host address the config names (127.0.0.1 by default): no bridge, no NAT network. It is QEMU's own
//! (slirp) `-netdev user,hostfwd=...` through `<qemu:commandline>`: passt (libvirt's
//! `<portForward>`) fails as root, where passt drops to `nobody` and cannot write its PID file (docs/vm.md).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::json;

use super::{network, Lookup, MachineSpec, Provider, VmState};
pub use crate::accel::decide_accel;
use crate::config::{Config, Firmware, Forward, Protocol, ProviderKind};
use crate::machine::state::MachineState;
use crate::machine::StateDir;
use crate::process::Cmd;

/// The XML namespace of our `<metadata>` element.
pub const METADATA_NS: &str = "https://github.com/provisioner/provisioner/libvirt-machine/1";
const DOMAIN_TEMPLATE: &str = include_str!("../../assets/libvirt/domain.xml.hbs");
/// Kernel command line for direct boot when the box does not name one.
const DEFAULT_CMDLINE: &str = "root=/dev/vda rw console=ttyS0";
/// Free space the state dir needs before an overlay is made (the overlay starts small and grows with writes).
const MIN_FREE_BYTES: u64 = 2 << 30;

pub mod remote;

use crate::host::libvirtd::{is_connect_error, Libvirtd};
use crate::host::{Host, RemoteHost};

pub struct Libvirt {
    /// The libvirt daemon of the host the URI names (this machine, or a remote one reached over SSH): virsh calls
    /// go through it, and a remote host's volumes into its pool.
    d: Libvirtd,
}

impl Libvirt {
    pub fn new(cfg: &Config) -> Result<Self> {
        Self::for_uri(&cfg.libvirt.uri, &cfg.libvirt.pool)
    }

    /// The host a machine recorded on libvirt runs on: the one of its recorded URI ([`super::ssh_info`]).
    pub(crate) fn host_of(recorded: &MachineState) -> Host {
        recorded.libvirt_uri.as_deref().map_or(Host::Local, Host::from_uri)
    }

    /// A connection to `uri` (any source: project, machine, `--host`); remote volumes go into `pool`.
    pub fn for_uri(uri: &str, pool: &str) -> Result<Self> {
        // Whatever the URI came from (file, state.json, code), nothing reaches virsh that makes libvirt run a program.
        crate::config::check_libvirt_uri(uri).map_err(|p| {
            anyhow::anyhow!("the libvirt URI \"{}\" {}\nhint: {}", crate::text::shown(uri), p.message, p.hint)
        })?;
        let host = Host::from_uri(uri);
        let conn = match &host {
            Host::Remote(r) => r.connect_uri(uri, &remote::write_wrapper(r)?),
            Host::Local => uri.to_string(),
        };
        Ok(Self { d: Libvirtd::new(uri, conn, pool, host) })
    }

    /// A connection to the remote host of `uri` (for its box pool), its key checked against known_hosts; a URI of
    /// this machine is refused.
    pub fn for_remote_uri(uri: &str, pool: &str) -> Result<Self> {
        let lv = Self::for_uri(uri, pool)?;
        let Some(r) = lv.remote() else {
            anyhow::bail!(
                "{uri:?} is not a remote libvirt host; boxes are uploaded only to qemu+ssh:// or qemu+libssh:// hosts\n\
                 hint: give --host qemu+ssh://USER@HOST/system (or set [libvirt] uri)"
            );
        };
        r.check_known()?;
        Ok(lv)
    }

    /// The remote SSH host, for a `qemu+ssh://` or `qemu+libssh://` URI.
    pub fn remote(&self) -> Option<&RemoteHost> {
        self.d.host.remote()
    }

    /// The URI as the user wrote it (shown in messages).
    pub fn uri(&self) -> &str {
        &self.d.uri
    }

    /// Make sure the daemons answer; as root with a local URI, start the ones that are not running.
    fn ensure_daemon(&self) -> Result<()> {
        let may_start = self.d.is_local() && crate::platform::is_root();
        self.d.host.check_known()?;
        if may_start {
            ensure_virtlogd()?;
        }
        let first = self.d.virsh().arg("version").output()?;
        if first.success() {
            return Ok(());
        }
        let err = first.stderr.trim().to_string();
        if !(is_connect_error(&err) && may_start) {
            return Err(self.d.unreachable(&err));
        }
        let daemon = find_sbin("virtqemud").or_else(|| find_sbin("libvirtd")).ok_or_else(|| {
            anyhow::anyhow!(
                "no libvirt daemon is installed (neither virtqemud nor libvirtd)\n\
                 hint: install libvirt-daemon-system (Debian/Ubuntu: scripts/host-deps.sh)"
            )
        })?;
        // A daemon started concurrently by someone else makes ours exit on its pid file lock; that is fine.
        crate::host::libvirtd::start_local(&daemon)?;
        crate::process::wait_until(Duration::from_secs(30), "the libvirt daemon to answer", || {
            let out = self.d.virsh().arg("version").output()?;
            Ok(out.success().then_some(()))
        })
        .map_err(|e| {
            self.d.unreachable(&format!("started {} but it does not answer: {e:#}", daemon.display()))
        })
    }

    /// The domain's XML if it exists.
    fn dumpxml(&self, vm_name: &str) -> Result<Option<String>> {
        let out = self.d.output(&["dumpxml", "--", vm_name])?;
        if out.success() {
            return Ok(Some(out.stdout));
        }
        if is_no_domain(&out.stderr) {
            return Ok(None);
        }
        if is_connect_error(&out.stderr) {
            return Err(self.d.unreachable(out.stderr.trim()));
        }
        bail!("`virsh dumpxml {vm_name}` failed: {}", out.stderr.trim())
    }

    /// Refuse a domain of this name that we did not make (for this state dir).
    fn check_ours(&self, vm_name: &str, xml: &str, state: &StateDir) -> Result<()> {
        match owner_state_dir(xml) {
            // Any spelling of our state dir (symlink, `..`, an older marker) is ours: one identity per machine.
            Some(dir) if crate::machine::identity::same_dir(Path::new(&dir), &state.root) => Ok(()),
            Some(dir) => bail!(
                "the libvirt domain {vm_name:?} belongs to another provisioner machine (state dir {dir}), not to \
                 {}\nhint: destroy it from that directory, or rename this machine ([machine] name)",
                state.root.display()
            ),
            None => bail!(
                "a libvirt domain named {vm_name:?} exists on {} but was not made by provisioner; it was left \
                 untouched\nhint: rename this machine ([machine] name in box-config.toml), or remove that domain \
                 yourself (`virsh -c {} undefine {vm_name}`) if you are sure it is not needed",
                self.d.uri,
                self.d.uri
            ),
        }
    }

    /// The qcow2 overlay on the box, and one on each of its other disks; made once (atomically: a temp name,
    /// then renamed).
    fn ensure_overlay(&self, spec: &MachineSpec) -> Result<()> {
        ensure_overlays(spec)
    }

    /// The machine's qcow2 overlay on `backing` (the box, or a cached lab's disk).
    fn overlay_on(&self, spec: &MachineSpec, backing: &Path, format: &str) -> Result<()> {
        overlay_at(spec, &spec.state.disk(), backing, format, Some(spec.disk_gb))
    }
}

/// The machine's overlays in its state dir: `disk.qcow2` on the box's boot disk (grown to `disk_gb`) and
/// `disk-<n>.qcow2` on each of the box's other disks (their size); each made once, atomically.
pub fn ensure_overlays(spec: &MachineSpec) -> Result<()> {
    overlay_at(spec, &spec.state.disk(), &spec.base.disk, &spec.base.format, Some(spec.disk_gb))?;
    for (i, (disk, format)) in spec.base.extra_disks.iter().enumerate() {
        overlay_at(spec, &extra_disk(&spec.state, i), disk, format, None)?;
    }
    Ok(())
}

/// A qcow2 overlay at `disk` on `backing`, grown to `size_gb` (the boot disk) or the size of its backing.
fn overlay_at(
    spec: &MachineSpec,
    disk: &Path,
    backing: &Path,
    format: &str,
    size_gb: Option<u64>,
) -> Result<()> {
    if disk.exists() {
        return Ok(());
    }
    check_free_space(&spec.state.root, spec.disk_gb)?;
    let base = crate::platform::canonicalize(backing)
        .with_context(|| format!("box disk {} is missing; run `provisioner box build`", backing.display()))?;
    let tmp = PathBuf::from(format!("{}.partial", disk.display()));
    let _ = std::fs::remove_file(&tmp);
    let mut cmd =
        Cmd::new("qemu-img").args(["create", "-q", "-f", "qcow2", "-F", format, "-b"]).arg(&base).arg(&tmp);
    if let Some(gb) = size_gb {
        cmd = cmd.arg(format!("{gb}G"));
    }
    cmd.timeout(Duration::from_secs(120)).run().context("create the disk overlay")?;
    std::fs::rename(&tmp, disk).with_context(|| format!("rename {} to {}", tmp.display(), disk.display()))
}

/// The overlay of a box's disk after the first (`i` = 0 for the second disk): `disk-1.qcow2`, `disk-2.qcow2`, ...
pub fn extra_disk(state: &StateDir, i: usize) -> PathBuf {
    state.path(&format!("disk-{}.qcow2", i + 1))
}

/// The virtio device name of the `i`-th disk (0 = vda).
fn virtio_dev(i: usize) -> String {
    format!("vd{}", (b'a' + i as u8) as char)
}

/// virsh wording for "no such domain".
fn is_no_domain(stderr: &str) -> bool {
    stderr.contains("failed to get domain") || stderr.contains("Domain not found")
}

/// The system virtlogd's socket. libvirtd answers `virsh` without it; only starting a domain then fails.
const VIRTLOGD_SOCK: &str = "/run/libvirt/virtlogd-sock";

/// Start virtlogd unless something accepts on its socket. A socket file left by a daemon that was killed is
/// not proof of life (CI machines keep /run but not the processes), so this connects rather than stats.
fn ensure_virtlogd() -> Result<()> {
    let alive = || crate::platform::unix_socket_alive(Path::new(VIRTLOGD_SOCK));
    if alive() {
        return Ok(());
    }
    let Some(virtlogd) = find_sbin("virtlogd") else {
        // Not installed: `start` reports it with the hint; nothing to do here.
        return Ok(());
    };
    // A virtlogd started concurrently makes ours exit on its pid file lock; the wait below settles it.
    let _ = Cmd::new(&virtlogd).arg("-d").timeout(Duration::from_secs(30)).output()?;
    crate::process::wait_until(Duration::from_secs(15), "virtlogd to accept connections", || {
        Ok(alive().then_some(()))
    })
    .with_context(|| format!("started {} but nothing listens on {VIRTLOGD_SOCK}", virtlogd.display()))
}

fn find_sbin(name: &str) -> Option<std::path::PathBuf> {
    which::which(name).ok().or_else(|| {
        ["/usr/sbin", "/usr/local/sbin", "/sbin"].iter().map(|d| Path::new(d).join(name)).find(|p| p.exists())
    })
}

/// The state dir named in our metadata element (`<provisioner:state-dir>` in [`METADATA_NS`]), if the XML has one.
pub fn owner_state_dir(xml: &str) -> Option<String> {
    let doc = crate::xml::parse(xml)?;
    let dir = doc.descendants().find(|n| n.has_tag_name((METADATA_NS, "state-dir")))?;
    Some(dir.text().unwrap_or_default().to_string())
}

/// Error out when the filesystem of `dir` is nearly full; the overlay grows up to `disk_gb`.
fn check_free_space(dir: &Path, disk_gb: u64) -> Result<()> {
    let free =
        crate::platform::free_space(dir).with_context(|| format!("free space of {}", dir.display()))?;
    if free < MIN_FREE_BYTES {
        bail!(
            "only {} MiB free on the filesystem of {}; the machine's disk needs at least {} MiB to start and grows \
             up to {disk_gb} GiB\nhint: free some space (e.g. `provisioner box list` / `box remove` old boxes, \
             destroy unused machines) and run `provisioner up` again",
            free >> 20,
            dir.display(),
            MIN_FREE_BYTES >> 20
        );
    }
    Ok(())
}

/// The DAC label that runs QEMU as the calling user with no relabelling, for local daemons: files in the
/// state dir and the box cache stay owned by the user (a system daemon would otherwise chown them to its qemu user).
fn local_dac_label(uri: &str) -> Option<String> {
    let local = uri.split_once("://").is_some_and(|(_, rest)| rest.starts_with('/'));
    let (uid, gid) = crate::platform::user_and_group()?;
    local.then(|| format!("+{uid}:+{gid}"))
}

/// Where the domain's files are: local paths in the state dir and box cache, or remote volume paths.
#[derive(Debug, Clone)]
pub struct DomainPaths {
    pub disk: String,
    /// The overlays of the box's other disks, attached after `disk` in order.
    pub extra_disks: Vec<String>,
    pub seed: String,
    pub serial_log: String,
    pub kernel: Option<String>,
    pub initrd: Option<String>,
}

impl DomainPaths {
    /// The local layout (state dir + box cache).
    pub fn local(spec: &MachineSpec) -> Self {
        let esc = |p: &Path| p.to_string_lossy().into_owned();
        Self {
            disk: esc(&spec.state.disk()),
            extra_disks: (0..spec.base.extra_disks.len()).map(|i| esc(&extra_disk(&spec.state, i))).collect(),
            // A machine whose keys went into its disk (no cloud-init in the box) has no seed.
            seed: esc(&spec.seed_iso),
            serial_log: esc(&spec.state.serial_log()),
            kernel: spec.base.kernel.as_deref().map(esc),
            initrd: spec.base.initrd.as_deref().map(esc),
        }
    }
}

/// Render the domain XML for a machine spec.
pub fn domain_xml(spec: &MachineSpec, uuid: Option<&str>, dac_label: Option<&str>) -> Result<String> {
    domain_xml_with(spec, uuid, dac_label, &DomainPaths::local(spec))
}

/// Render the domain XML for a machine spec with its files at `paths`.
pub fn domain_xml_with(
    spec: &MachineSpec,
    uuid: Option<&str>,
    dac_label: Option<&str>,
    paths: &DomainPaths,
) -> Result<String> {
    let esc = |p: &Path| p.to_string_lossy().into_owned();
    let private = spec.private_net.as_ref();
    let ctx = json!({
        "domain_type": if spec.kvm { "kvm" } else { "qemu" },
        "kvm": spec.kvm,
        "name": spec.vm_name,
        "machine": spec.hostname,
        "namespace": METADATA_NS,
        "state_dir": esc(&spec.state.root),
        "box_id": spec.base.id,
        "memory_mb": spec.memory_mb,
        "cpus": spec.cpus,
        "uefi": spec.base.firmware == Firmware::Uefi && spec.base.kernel.is_none(),
        "kernel": paths.kernel,
        "initrd": paths.initrd,
        "cmdline": spec.base.cmdline.as_deref().unwrap_or(DEFAULT_CMDLINE),
        "disk": paths.disk,
        "extra_disks": paths
            .extra_disks
            .iter()
            .enumerate()
            .map(|(i, p)| json!({"path": p, "dev": virtio_dev(i + 1)}))
            .collect::<Vec<_>>(),
        "seed": paths.seed,
        "serial_log": paths.serial_log,
        "netdev": netdev(&spec.forwards),
        "device": primary_device(spec.private_net.is_some()),
        "private_netdev": private.filter(|n| !n.net.isolated_libvirt_network).map(|n| network::mcast_netdev(&n.net)),
        "private_device": private.filter(|n| !n.net.isolated_libvirt_network).map(|n| network::private_device(&n.mac)),
        "private_network": private.filter(|n| n.net.isolated_libvirt_network).map(|n| n.net.name.clone()),
        "private_mac": private.map(|n| n.mac.clone()),
        "uuid": uuid,
        "dac_label": dac_label,
    });
    let mut hb = handlebars::Handlebars::new();
    hb.set_strict_mode(true);
    hb.register_escape_fn(crate::xml::escape);
    hb.render_template(DOMAIN_TEMPLATE, &ctx).context("render assets/libvirt/domain.xml.hbs")
}

/// The `-netdev user` argument: one `hostfwd` per forward, on the forward's host address only.
fn netdev(forwards: &[Forward]) -> String {
    let mut arg = String::from("user,id=net0");
    for f in forwards {
        let proto = match f.protocol {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        };
        let ip = if f.host_ip.contains(':') { format!("[{}]", f.host_ip) } else { f.host_ip.clone() };
        arg.push_str(&format!(",hostfwd={proto}:{ip}:{}-:{}", f.host, f.guest));
    }
    arg
}

/// The `-device` argument of the first NIC; with a private NIC its MAC is set (the guest's network-config matches
/// it by MAC), to the address QEMU would give it anyway.
fn primary_device(with_private: bool) -> String {
    let mac = if with_private { format!(",mac={}", network::PRIMARY_MAC) } else { String::new() };
    format!("virtio-net-pci,netdev=net0{mac},bus=pcie.0,addr=0x10")
}

/// The `<uuid>` of a domain XML (a re-define must keep it).
fn domain_uuid(xml: &str) -> Option<&str> {
    let doc = crate::xml::parse(xml)?;
    let uuid = doc.root_element().children().find(|n| n.has_tag_name("uuid"))?;
    // A UUID has no entities: its text is the input's, unchanged.
    Some(xml[uuid.first_child().filter(|t| t.is_text())?.range()].trim())
}

impl Libvirt {
    /// Write and `virsh define` the domain XML of `spec` (keeping `uuid` when given).
    fn define(&self, spec: &MachineSpec, uuid: Option<&str>) -> Result<()> {
        self.define_with(spec, uuid, &DomainPaths::local(spec))
    }

    fn define_with(&self, spec: &MachineSpec, uuid: Option<&str>, paths: &DomainPaths) -> Result<()> {
        let xml = domain_xml_with(spec, uuid, local_dac_label(&self.d.uri).as_deref(), paths)?;
        let file = spec.state.path("domain.xml");
        crate::machine::write_private(&file, xml.as_bytes(), 0o600)?;
        let path = file.to_string_lossy();
        self.d.run_here(&["define", "--", &path]).map_err(|e| {
            let hint = if spec.base.firmware == Firmware::Uefi {
                "\nhint: UEFI boxes need OVMF firmware on the host (Debian/Ubuntu: `apt-get install ovmf`)"
            } else {
                ""
            };
            e.context(format!("define the domain from {}{hint}", file.display()))
        })?;
        Ok(())
    }
}

impl Provider for Libvirt {
    fn name(&self) -> &'static str {
        "libvirt"
    }

    fn kind(&self) -> ProviderKind {
        ProviderKind::Libvirt
    }

    fn preflight(&self) -> Result<()> {
        which::which("virsh").map_err(|_| {
            anyhow::anyhow!(
                "`virsh` was not found on PATH\nhint: install the libvirt client and daemon (Debian/Ubuntu: \
                 scripts/host-deps.sh, or `apt-get install libvirt-clients libvirt-daemon-system`)"
            )
        })?;
        if !self.d.host.is_remote() {
            which::which("qemu-img").map_err(|_| {
                anyhow::anyhow!("`qemu-img` was not found on PATH\nhint: install qemu-utils (Debian/Ubuntu)")
            })?;
        }
        self.ensure_daemon()?;
        if self.d.is_local() && which::which("qemu-system-x86_64").is_err() {
            bail!(
                "`qemu-system-x86_64` was not found on PATH\nhint: install qemu-system-x86 (Debian 12: from \
                 bookworm-backports to match libvirt 11, see scripts/host-deps.sh)"
            );
        }
        Ok(())
    }

    fn host(&self) -> Host {
        self.d.host.clone()
    }

    fn machines(&self) -> Result<Vec<super::FoundVm>> {
        let list = ["list", "--all", "--name"];
        // On this computer, a daemon that is not running is not started by asking (virsh would spawn a session
        // daemon): it holds no running machine, and `up` starts the daemon it needs its own way.
        let out = if self.d.is_local() {
            self.d.virsh().env("LIBVIRT_AUTOSTART", "0").args(list).output()?
        } else {
            self.d.output(&list)?
        };
        if !out.success() {
            return Err(self.d.unreachable(out.stderr.trim()));
        }
        let mut found = Vec::new();
        // Every VM name this tool makes starts so ([`super::vm_name`]); the marker decides.
        for name in out.stdout.lines().map(str::trim).filter(|n| n.starts_with("provisioner-")) {
            // A domain undefined meanwhile is simply not listed.
            let Some(xml) = self.dumpxml(name)? else { continue };
            let Some(dir) = owner_state_dir(&xml) else { continue };
            let state = self.state(name)?;
            found.push(super::FoundVm { name: name.to_string(), state, state_dir: PathBuf::from(dir) });
        }
        Ok(found)
    }

    fn state(&self, vm_name: &str) -> Result<VmState> {
        // `--reason` costs nothing extra and tells a suspended (managed-saved) domain from a powered-off one.
        let out = self.d.output(&["domstate", "--reason", "--", vm_name])?;
        if !out.success() {
            if is_no_domain(&out.stderr) {
                return Ok(VmState::NotCreated);
            }
            if is_connect_error(&out.stderr) {
                return Err(self.d.unreachable(out.stderr.trim()));
            }
            bail!("`virsh domstate {vm_name}` failed: {}", out.stderr.trim());
        }
        Ok(parse_domstate(&out.stdout))
    }

    fn lookup(&self, vm_name: &str, state: &StateDir) -> Result<Lookup> {
        // The marker and the state in one virsh connection (one SSH handshake on a remote host), as a virsh batch.
        let name = crate::host::shell_quote(vm_name);
        let out = self.d.output(&[&format!("dumpxml -- {name}; domstate --reason -- {name}")])?;
        if !out.success() {
            if is_no_domain(&out.stderr) {
                return Ok(Lookup::NotCreated);
            }
            return Err(self
                .d
                .unreachable_or(out.stderr.trim(), &format!("`virsh dumpxml/domstate {vm_name}`")));
        }
        let (xml, domstate) = out
            .stdout
            .rsplit_once("</domain>")
            .with_context(|| format!("`virsh dumpxml {vm_name}` printed no domain XML"))?;
        let live = parse_domstate(domstate);
        Ok(match owner_state_dir(&format!("{xml}</domain>")) {
            // Any spelling of our state dir (symlink, `..`, an older marker) is ours: one identity per machine.
            Some(dir) if crate::machine::identity::same_dir(Path::new(&dir), &state.root) => {
                Lookup::Mine(live)
            }
            owner => Lookup::Foreign { owner },
        })
    }

    fn create(&self, spec: &MachineSpec, _recorded: &mut MachineState) -> Result<()> {
        let existing = self.dumpxml(&spec.vm_name)?;
        if let Some(xml) = &existing {
            self.check_ours(&spec.vm_name, xml, &spec.state)?;
        }
        if let Some(nic) = spec.private_net.as_ref().filter(|n| n.net.isolated_libvirt_network) {
            self.ensure_network(&nic.net.name)?;
        }
        let uuid = existing.as_deref().and_then(domain_uuid);
        if self.d.host.is_remote() {
            if !spec.base.extra_disks.is_empty() {
                bail!(
                    "the box has {} disks; on a remote libvirt host provisioner uploads only the boot disk\nhint: run \
                     this machine on the local host, or use a single-disk version of the box",
                    spec.base.extra_disks.len() + 1
                );
            }
            let paths = self.remote_volumes(spec)?;
            return self.define_with(spec, uuid, &paths);
        }
        self.ensure_overlay(spec)?;
        self.define(spec, uuid)
    }

    fn start(&self, vm_name: &str) -> Result<()> {
        // `up` on a paused domain resumes it (as for VirtualBox); `virsh start` would say "already active".
        if self.state(vm_name)? == VmState::Paused {
            return self.d.run(&["resume", "--", vm_name]).map(drop).context("resume the paused machine");
        }
        self.d.run(&["start", "--", vm_name]).map(drop).context(
            "start the machine\nhint: see the serial log in .provisioner/serial.log and the daemon's log \
             (/var/log/libvirt/qemu/<domain>.log for qemu:///system, ~/.cache/libvirt/qemu/log/ for session)",
        )
    }

    fn halt(&self, vm_name: &str, timeout: Duration, force: bool) -> Result<()> {
        let r = self.halt_vm(vm_name, timeout, force);
        self.close_host_connection();
        r
    }

    fn destroy(&self, vm_name: &str, state: &StateDir) -> Result<()> {
        let r = self.destroy_vm(vm_name, state);
        self.close_host_connection();
        r
    }
    fn serial_console(&self, vm_name: &str, state: &StateDir) -> (String, String) {
        match self.d.host {
            Host::Remote(_) => self.remote_serial_console(vm_name),
            Host::Local => super::local_serial_console(state),
        }
    }

    fn snapshot_save(&self, vm_name: &str, name: &str) -> Result<()> {
        // Internal qcow2 snapshot, with memory when running; the raw seed ISO is left out of it.
        self.d
            .run(&[
                "snapshot-create-as",
                "--domain",
                vm_name,
                "--name",
                name,
                "--diskspec",
                "sda,snapshot=no",
            ])
            .map(drop)
            .with_context(|| format!("take snapshot {name:?} of {vm_name}"))
    }

    fn snapshot_restore(&self, vm_name: &str, name: &str) -> Result<()> {
        self.require_snapshot(vm_name, name)?;
        // A snapshot taken running comes back running, with its memory; `--force` as vagrant-libvirt does.
        self.d
            .run(&["snapshot-revert", "--domain", vm_name, "--snapshotname", name, "--force"])
            .map(drop)
            .with_context(|| format!("restore snapshot {name:?} of {vm_name}"))
    }

    fn snapshot_list(&self, vm_name: &str) -> Result<Vec<String>> {
        let out = self.d.run(&["snapshot-list", "--domain", vm_name, "--name", "--topological"])?;
        Ok(out.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect())
    }

    fn snapshot_delete(&self, vm_name: &str, name: &str) -> Result<()> {
        self.require_snapshot(vm_name, name)?;
        self.d.run(&["snapshot-delete", "--domain", vm_name, "--snapshotname", name]).map(drop)
    }

    fn lab_capture(&self, vm_name: &str, state: &StateDir, into: &Path) -> Result<Option<String>> {
        if self.d.host.is_remote() {
            // The memory image and disk live on the remote host; a cached lab is local only.
            return Ok(None);
        }
        let xml = self.dumpxml(vm_name)?.context("the machine's domain is gone")?;
        self.check_ours(vm_name, &xml, state)?;
        let uuid = domain_uuid(&xml).context("the domain XML has no <uuid>")?.to_string();
        let mem = into.join(LAB_MEMORY);
        let mem_s = mem.to_string_lossy();
        // `save` stops the guest with its memory in the file; the disk is then consistent with it and copied.
        self.d
            .virsh()
            .args(["save", vm_name, &mem_s])
            .timeout(LAB_TIMEOUT)
            .run()
            .context("save the machine's memory")?;
        let copied = (|| -> Result<()> {
            let xml = self.d.run(&["save-image-dumpxml", &mem_s])?;
            crate::machine::write_private(&into.join(LAB_XML), xml.as_bytes(), 0o600)?;
            Cmd::new("cp")
                .arg("--sparse=always")
                .arg(state.disk())
                .arg(into.join(LAB_DISK))
                .timeout(LAB_TIMEOUT)
                .run()
                .context("copy the disk into the cache")?;
            Ok(())
        })();
        // The machine runs on, from the same file, whatever happened to the copy, even after Ctrl-C (a cleanup
        // step): an interrupted capture must not leave the machine stopped with its memory in a deleted entry.
        self.d
            .virsh()
            .args(["restore", &mem_s])
            .timeout(LAB_TIMEOUT)
            .cleanup()
            .run()
            .context("resume the machine")?;
        copied?;
        Ok(Some(uuid))
    }

    fn lab_restore(&self, spec: &MachineSpec, from: &Path, data: &str) -> Result<()> {
        if self.dumpxml(&spec.vm_name)?.is_some() {
            bail!(
                "the domain {} exists already; a cached lab only replaces a machine that is not created",
                spec.vm_name
            );
        }
        self.overlay_on(spec, &from.join(LAB_DISK), "qcow2")?;
        self.define(spec, Some(data))?;
        let saved = std::fs::read_to_string(from.join(LAB_XML))
            .with_context(|| format!("read {}", from.join(LAB_XML).display()))?;
        let xml = restore_xml(&saved, &spec.state.root, &netdev(&spec.forwards))?;
        let file = spec.state.path("restore.xml");
        crate::machine::write_private(&file, xml.as_bytes(), 0o600)?;
        let mem = from.join(LAB_MEMORY);
        self.d
            .virsh()
            .args(["restore", &mem.to_string_lossy(), "--xml", &file.to_string_lossy()])
            .timeout(LAB_TIMEOUT)
            .run()
            .context("restore the cached lab's memory")?;
        Ok(())
    }

    fn suspend(&self, vm_name: &str) -> Result<()> {
        match self.state(vm_name)? {
            VmState::Running | VmState::Paused => self.d.run(&["managedsave", "--", vm_name]).map(drop),
            other => bail!(
                "the machine {vm_name} is {other}; only a running machine can be suspended\nhint: `provisioner up` \
                 starts it"
            ),
        }
    }

    fn resume(&self, vm_name: &str) -> Result<()> {
        match self.state(vm_name)? {
            VmState::Running => Ok(()),
            VmState::Paused => self.d.run(&["resume", "--", vm_name]).map(drop),
            VmState::Saved => self.start(vm_name),
            VmState::Stopped if self.has_managed_save(vm_name)? => self.start(vm_name),
            other => bail!(
                "the machine {vm_name} is {other} and not suspended; nothing to resume\nhint: `provisioner up` \
                 starts a stopped machine"
            ),
        }
    }
}

/// The isolated private network an (our) domain XML joins, if any: `<source network='provisioner-...'/>` (of
/// the first interface on a libvirt network).
pub fn private_network_of(xml: &str) -> Option<String> {
    let doc = crate::xml::parse(xml)?;
    let name = doc.descendants().filter(|n| n.has_tag_name("source")).find_map(|n| n.attribute("network"))?;
    name.starts_with("provisioner-").then(|| name.to_string())
}

/// How long a machine waits for another one creating the project's network.
const NETWORK_LOCK: Duration = Duration::from_secs(120);

impl Libvirt {
    /// A remote host's shared SSH connection (the master the virsh calls ride) is closed by `halt` and `destroy`,
    /// so no ssh process outlives the command that stopped the machine; best effort (it would exit on its own).
    fn close_host_connection(&self) {
        if let Some(r) = self.d.host.remote() {
            if let Err(e) = r.close_master() {
                eprintln!("warning: could not close the SSH connection to {}: {e:#}", r.destination());
            }
        }
    }

    fn halt_vm(&self, vm_name: &str, timeout: Duration, force: bool) -> Result<()> {
        let running = |s: &VmState| matches!(s, VmState::Running | VmState::Paused | VmState::Other(_));
        let now = self.state(vm_name)?;
        if now == VmState::Saved {
            // As Vagrant's `halt` on a saved VM: drop the saved memory, so the machine is plainly powered off.
            return self.d.run(&["managedsave-remove", "--", vm_name]).map(drop);
        }
        if !running(&now) {
            return Ok(());
        }
        if !force {
            self.d.run(&["shutdown", "--mode", "acpi", "--", vm_name])?;
            let down = crate::process::wait_until(timeout, "the guest to power off", || {
                Ok((!running(&self.state(vm_name)?)).then_some(()))
            });
            if down.is_ok() {
                return Ok(());
            }
        }
        match self.d.run(&["destroy", "--", vm_name]) {
            Ok(_) => Ok(()),
            // It may have powered off between our check and the destroy.
            Err(_) if !running(&self.state(vm_name)?) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn destroy_vm(&self, vm_name: &str, state: &StateDir) -> Result<()> {
        if let Some(xml) = self.dumpxml(vm_name)? {
            self.check_ours(vm_name, &xml, state)?;
            self.halt_vm(vm_name, Duration::ZERO, true)?;
            // Internal snapshots live in the overlay (removed below); their metadata and a suspend image go too.
            self.d.run(&["undefine", "--nvram", "--snapshots-metadata", "--managed-save", "--", vm_name])?;
            if let Some(net) = private_network_of(&xml) {
                self.remove_network_if_unused(&net)?;
            }
        }
        if self.d.host.is_remote() {
            self.delete_machine_volumes(vm_name)?;
        }
        // Our disks are plain files in the state dir (no storage pool): remove them ourselves.
        let mut files = vec![
            state.disk(),
            state.path("disk.qcow2.partial"),
            state.seed_iso(),
            state.serial_log(),
            state.path("domain.xml"),
        ];
        // The overlays of a multi-disk box's other disks (however many the box had).
        for i in 0..26 {
            files.push(extra_disk(state, i));
            files.push(PathBuf::from(format!("{}.partial", extra_disk(state, i).display())));
        }
        for f in files {
            match std::fs::remove_file(&f) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e).with_context(|| format!("remove {}", f.display()));
                }
                _ => {}
            }
        }
        Ok(())
    }
}

impl Libvirt {
    /// The project's isolated network (qemu:///system): defined, started and set to autostart once, under a lock
    /// per network so machines created in parallel do not race. Its XML has no `<forward>` and no `<ip>`: no
    /// NAT, no host address, no DHCP server.
    fn ensure_network(&self, name: &str) -> Result<()> {
        let _lock = self.network_lock(name)?;
        let info = self.d.output(&["net-info", "--", name])?;
        if !info.success() {
            if is_connect_error(&info.stderr) {
                return Err(self.d.unreachable(info.stderr.trim()));
            }
            let dir = crate::boxes::cache_dir().join("networks");
            std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
            let file = dir.join(format!("{name}.xml"));
            crate::machine::write_private(&file, network::isolated_network_xml(name).as_bytes(), 0o600)?;
            self.d
                .run(&["net-define", "--", &file.to_string_lossy()])
                .with_context(|| format!("define the private network {name}"))?;
        }
        let info = self.d.run(&["net-info", "--", name])?;
        if !info.lines().any(|l| l.starts_with("Active:") && l.trim_end().ends_with("yes")) {
            self.d.run(&["net-start", "--", name]).with_context(|| {
                format!(
                    "start the private network {name}
hint: an isolated libvirt network needs a system daemon                      (qemu:///system) that may create bridges; with qemu:///session leave [network]                      libvirt_network off (the default: a multicast socket on 127.0.0.1)"
                )
            })?;
        }
        self.d.run(&["net-autostart", "--", name])?;
        Ok(())
    }

    /// Undefine the project's network once no domain uses it any more (the last machine was destroyed).
    fn remove_network_if_unused(&self, name: &str) -> Result<()> {
        let _lock = self.network_lock(name)?;
        let domains = self.d.run(&["list", "--all", "--name"])?;
        for d in domains.lines().map(str::trim).filter(|d| !d.is_empty()) {
            if let Some(xml) = self.dumpxml(d)? {
                if private_network_of(&xml).as_deref() == Some(name) {
                    return Ok(());
                }
            }
        }
        let _ = self.d.output(&["net-destroy", "--", name])?;
        let out = self.d.output(&["net-undefine", "--", name])?;
        if !out.success()
            && !out.stderr.contains("Network not found")
            && !out.stderr.contains("no network with")
        {
            bail!(
                "could not remove the private network {name}: {}
hint: remove it by hand (`virsh -c {}                  net-destroy {name}; virsh -c {} net-undefine {name}`)",
                out.stderr.trim(),
                self.d.uri,
                self.d.uri
            );
        }
        let _ = std::fs::remove_file(crate::boxes::cache_dir().join("networks").join(format!("{name}.xml")));
        Ok(())
    }

    fn network_lock(&self, name: &str) -> Result<crate::machine::lock::FileLock> {
        let dir = crate::boxes::cache_dir().join("networks");
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        crate::machine::lock::wait_for(&dir.join(format!("{name}.lock")), NETWORK_LOCK)
    }

    fn require_snapshot(&self, vm_name: &str, name: &str) -> Result<()> {
        let all = self.snapshot_list(vm_name)?;
        if !all.iter().any(|s| s == name) {
            bail!(
                "the machine has no snapshot named {name:?} (it has: {})\nhint: `provisioner snapshot list` shows them",
                if all.is_empty() { "none".to_string() } else { all.join(", ") }
            );
        }
        Ok(())
    }

    fn has_managed_save(&self, vm_name: &str) -> Result<bool> {
        let info = self.d.run(&["dominfo", "--", vm_name])?;
        Ok(info.lines().any(|l| l.starts_with("Managed save:") && l.trim_end().ends_with("yes")))
    }
}

/// Files of a cached lab entry (libvirt).
const LAB_MEMORY: &str = "memory.save";
const LAB_XML: &str = "memory.xml";
const LAB_DISK: &str = "disk.qcow2";
/// Saving or restoring a few GiB of guest memory on a slow disk.
const LAB_TIMEOUT: Duration = Duration::from_secs(600);

/// The domain XML of a memory image (`save-image-dumpxml`), moved to another state dir and given the current
/// forwards: every path under the old state dir is rewritten, and the `-netdev user` argument replaced. Devices
/// stay as saved (libvirt refuses a restore whose guest ABI differs). Pure.
pub fn restore_xml(saved: &str, state_dir: &Path, netdev_arg: &str) -> Result<String> {
    let old = owner_state_dir(saved).context("the saved domain XML has no provisioner state dir")?;
    let escape = crate::xml::escape;
    let mut xml = saved.replace(&escape(&old), &escape(&state_dir.to_string_lossy()));
    // Where the `-netdev user` argument's value is in the text: `<qemu:arg value='user,id=net0,...'/>`.
    let value = {
        let doc = crate::xml::parse(&xml).context("the domain XML is not well-formed")?;
        let arg = doc
            .descendants()
            .filter(|n| n.tag_name().name() == "arg")
            .filter_map(|n| n.attribute_node("value"))
            .find(|a| a.value().starts_with("user,id=net0"))
            .context("the saved domain XML has no -netdev user argument")?;
        arg.range_value()
    };
    xml.replace_range(value, &escape(netdev_arg));
    Ok(xml)
}

/// `virsh domstate` output to a state.
/// The state in `virsh domstate [--reason]` output (`shut off (saved)`, `running (booted)`, or a bare state).
pub fn parse_domstate(out: &str) -> VmState {
    let out = out.trim();
    let (state, reason) = match out.split_once(" (") {
        Some((state, rest)) => (state, rest.strip_suffix(')').unwrap_or(rest)),
        None => (out, ""),
    };
    match (state, reason) {
        // `suspend` (managedsave): the next start resumes the saved memory.
        ("shut off", "saved") => VmState::Saved,
        ("running" | "in shutdown", _) => VmState::Running,
        ("shut off" | "crashed", _) => VmState::Stopped,
        ("paused" | "pmsuspended", _) => VmState::Paused,
        _ => VmState::Other(out.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Read as XML, not as text: any namespace prefix of our metadata, entities decoded, and nothing from inside a
    /// comment or from an element of another namespace.
    #[test]
    fn domain_xml_is_read_by_its_structure() {
        let xml = format!(
            "<domain type='kvm'>\n  <!-- <uuid>not-this</uuid> <source network='provisioner-old'/> -->\n  \
             <uuid> 5f2c1c4e-8f7e-4a55-9d43-0c3f4e0a6b21 </uuid>\n  <metadata>\n    <other:state-dir \
             xmlns:other='urn:other'>/not/ours</other:state-dir>\n    <m:machine xmlns:m='{METADATA_NS}'>\
             <m:state-dir>/srv/a &amp; b</m:state-dir></m:machine>\n  </metadata>\n  <devices>\n    \
             <interface type='network'><source network=\"provisioner-0123-private\"/></interface>\n  \
             </devices>\n</domain>\n"
        );
        assert_eq!(owner_state_dir(&xml).as_deref(), Some("/srv/a & b"));
        assert_eq!(domain_uuid(&xml), Some("5f2c1c4e-8f7e-4a55-9d43-0c3f4e0a6b21"));
        assert_eq!(private_network_of(&xml).as_deref(), Some("provisioner-0123-private"));
        // What `lookup` reads: the batch output cut at the domain's end tag, which it puts back.
        let batch = format!("{xml}\nrunning (booted)\n");
        let (cut, state) = batch.rsplit_once("</domain>").unwrap();
        assert_eq!(owner_state_dir(cut), None);
        assert_eq!(owner_state_dir(&format!("{cut}</domain>")).as_deref(), Some("/srv/a & b"));
        assert_eq!(parse_domstate(state), VmState::Running);
    }
}
