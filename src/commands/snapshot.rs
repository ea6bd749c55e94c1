//! `snapshot save|restore|list|delete`, `suspend`, `resume` and `package`: the machine's state kept by the
//! hypervisor. The machine's [`crate::lifecycle::Machine`] does the work (and sets the guest's clock afterwards);
//! these parse, call it and print.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::json;

use super::Ctx;
use crate::cli::{PackageArgs, SnapshotCommand};
use crate::config::Config;
use crate::machine::state::MachineState;
use crate::machine::StateDir;
use crate::provider::{Provider, VmState};

pub(crate) fn snapshot(ctx: &Ctx, cmd: SnapshotCommand) -> Result<i32> {
    let m = ctx.machine()?;
    let ui = &ctx.ui;
    match cmd {
        SnapshotCommand::Save { name, .. } => m.snapshot_save(ui, &name)?,
        SnapshotCommand::Restore { name, .. } => return m.snapshot_restore(ui, &name),
        SnapshotCommand::List { .. } => {
            let all = m.snapshot_list()?;
            if ctx.global.json {
                println!("{}", json!({"machine": m.cfg.machine.name, "snapshots": all}));
            } else if all.is_empty() {
                ui.info(format!("{}: no snapshots", m.cfg.machine.name));
            } else {
                for s in &all {
                    println!("{s}");
                }
            }
        }
        SnapshotCommand::Delete { name, .. } => m.snapshot_delete(ui, &name)?,
    }
    Ok(crate::exit::OK)
}

pub(crate) fn suspend(ctx: &Ctx) -> Result<i32> {
    ctx.machine()?.suspend(&ctx.ui)?;
    Ok(crate::exit::OK)
}

pub(crate) fn resume(ctx: &Ctx) -> Result<i32> {
    ctx.machine()?.resume(&ctx.ui)?;
    Ok(crate::exit::OK)
}

/// The machine `package` works on.
struct Target<'a> {
    cfg: Config,
    state: StateDir,
    vm_name: String,
    p: &'a dyn Provider,
}

pub(crate) fn package(ctx: &Ctx, args: &PackageArgs) -> Result<i32> {
    let m = ctx.machine()?;
    let vm = m.created("package")?;
    let t = Target { cfg: m.cfg.clone(), state: m.state.clone(), vm_name: vm.vm.clone(), p: vm.p.as_ref() };
    let ui = &ctx.ui;
    if t.p.kind() != crate::config::ProviderKind::Libvirt {
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
        let ssh = crate::lifecycle::session::connect(&t.cfg, &t.state, Duration::from_secs(60))?;
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
