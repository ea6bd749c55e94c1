//! `snapshot save|restore|list|delete`, `suspend`, `resume` and `package`: the machine's state kept by the
//! hypervisor (provider methods), plus what the guest needs afterwards (its clock).

use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::json;

use super::Ctx;
use crate::cli::{PackageArgs, SnapshotCommand};
use crate::config::Config;
use crate::machine::lock::MachineLock;
use crate::machine::state::MachineState;
use crate::machine::StateDir;
use crate::provider::{self, Provider, VmState};

/// The machine a snapshot command works on: it must exist.
struct Target {
    cfg: Config,
    state: StateDir,
    vm_name: String,
    p: Box<dyn Provider>,
}

fn target(ctx: &Ctx) -> Result<Target> {
    // The machine's one identity (canonical state dir), as every other command finds it.
    let m = ctx.machine()?;
    if MachineState::load(&m.state)?.is_none() {
        bail!("machine {:?} is not created\nhint: `provisioner up` creates it", m.cfg.machine.name);
    }
    let p = provider::select(&m.cfg)?;
    // VirtualBox VMs are addressed by their recorded UUID, libvirt domains by name; checked to be this project's.
    let (vm_name, _) = m.my_vm(p.as_ref())?;
    Ok(Target { cfg: m.cfg, state: m.state, vm_name, p })
}

pub fn snapshot(ctx: &Ctx, cmd: SnapshotCommand) -> Result<i32> {
    let t = target(ctx)?;
    let _lock = MachineLock::acquire(&t.state, "snapshot")?;
    let ui = &ctx.ui;
    match cmd {
        SnapshotCommand::Save { name, .. } => {
            provider::check_snapshot_name(&name)?;
            let ph = ui.phase("snapshot");
            t.p.snapshot_save(&t.vm_name, &name)?;
            ph.done(&format!("saved {name}"));
            ui.event("snapshot_saved", json!({"name": name}));
        }
        SnapshotCommand::Restore { name, .. } => {
            let ph = ui.phase("restore");
            t.p.snapshot_restore(&t.vm_name, &name)?;
            let live = t.p.state(&t.vm_name)?;
            if live == VmState::Running {
                sync_clock(&t.cfg, &t.state, ui);
            }
            ph.done(&format!("{name} ({live})"));
            ui.event("snapshot_restored", json!({"name": name, "state": live}));
        }
        SnapshotCommand::List { .. } => {
            let all = t.p.snapshot_list(&t.vm_name)?;
            if ctx.global.json {
                println!("{}", json!({"machine": t.cfg.machine.name, "snapshots": all}));
            } else if all.is_empty() {
                ui.info(format!("{}: no snapshots", t.cfg.machine.name));
            } else {
                for s in &all {
                    println!("{s}");
                }
            }
        }
        SnapshotCommand::Delete { name, .. } => {
            let ph = ui.phase("snapshot delete");
            t.p.snapshot_delete(&t.vm_name, &name)?;
            ph.done(&name);
        }
    }
    Ok(crate::exit::OK)
}

pub fn suspend(ctx: &Ctx) -> Result<i32> {
    let t = target(ctx)?;
    let _lock = MachineLock::acquire(&t.state, "suspend")?;
    let ph = ctx.ui.phase("suspend");
    t.p.suspend(&t.vm_name)?;
    ph.done("memory saved; `provisioner resume` continues");
    Ok(crate::exit::OK)
}

pub fn resume(ctx: &Ctx) -> Result<i32> {
    let t = target(ctx)?;
    let _lock = MachineLock::acquire(&t.state, "resume")?;
    let ph = ctx.ui.phase("resume");
    t.p.resume(&t.vm_name)?;
    sync_clock(&t.cfg, &t.state, &ctx.ui);
    ph.done("running");
    Ok(crate::exit::OK)
}

pub use crate::machine::lifecycle::sync_clock;

pub fn package(ctx: &Ctx, args: &PackageArgs) -> Result<i32> {
    let t = target(ctx)?;
    let _lock = MachineLock::acquire(&t.state, "package")?;
    let ui = &ctx.ui;
    if t.p.name() != "libvirt" {
        bail!(
            "`package` writes vagrant-libvirt boxes and needs the libvirt provider; this machine runs on {}\nhint: \
             VirtualBox users: `VBoxManage export {} -o box.ova` exports the VM",
            t.p.name(),
            t.vm_name
        );
    }
    let out = std::path::absolute(&args.out)?;
    if out.exists() {
        bail!("{} already exists\nhint: remove it or pick another --out", out.display());
    }
    let live = t.p.state(&t.vm_name)?;
    if live == VmState::Running {
        // As `vagrant package` does with virt-sysprep: the box must not carry this machine's cloud-init instance
        // or its login key. The next boot of this machine runs cloud-init again from its seed (same keys).
        let ph = ui.phase("generalize");
        let ssh = super::provision::connect(&t.cfg, &t.state, Duration::from_secs(60))?;
        ssh.exec_ok(GENERALIZE, Duration::from_secs(120))?;
        ph.done("cloud-init state and authorized_keys removed");
    } else {
        ui.warn(format!(
            "the machine is {live}: packaging its disk as it is (it keeps this machine's cloud-init state and \
             authorized key; start it and run `package` again to leave them out)"
        ));
    }
    let ph = ui.phase("halt");
    t.p.halt(&t.vm_name, Duration::from_secs(120), false)?;
    ph.done("stopped");

    let ph = ui.phase("package");
    let st = MachineState::load(&t.state)?.unwrap_or_default();
    let base = crate::boxes::ensure_ui(&t.cfg, t.p.name(), false, ui)?.0;
    let work = tempfile::Builder::new()
        .prefix(".package-")
        .tempdir_in(out.parent().context("--out has no directory")?)
        .context("make a work dir beside --out")?;
    let size = crate::boxes::package::write_box(&t.state.disk(), &base, work.path(), &out)?;
    ph.done(&format!("{} ({} MiB)", out.display(), size >> 20));
    ui.event("packaged", json!({"box": out, "bytes": size, "box_id": st.box_id}));
    ui.info(format!(
        "wrote {}; use it with `[box] vagrant = \"{}\"`, or `vagrant box add --name NAME {}`",
        out.display(),
        out.display(),
        out.display()
    ));
    Ok(crate::exit::OK)
}

/// Run in the guest before packaging (sudo): forget the cloud-init instance and every login key.
const GENERALIZE: &str = "sudo -n sh -c 'cloud-init clean --logs >/dev/null 2>&1 || rm -rf /var/lib/cloud/instances \
                          /var/lib/cloud/instance; rm -f /home/*/.ssh/authorized_keys /root/.ssh/authorized_keys; \
                          sync'";
