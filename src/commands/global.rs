//! `global-status [--prune [-f]]`: every machine provisioner made on this computer, whatever its project (Vagrant's
//! `global-status`). Each hypervisor is asked live for the VMs carrying this tool's ownership marker, which names
//! the machine's state dir, so there is no index to go stale. A machine whose project directory was deleted before
//! `destroy` is out of reach of every project's commands; `--prune` destroys those, checking each marker as
//! `destroy` does.

use anyhow::Result;
use serde_json::json;

use super::Ctx;
use crate::cli::GlobalStatusArgs;
use crate::machine::StateDir;
use crate::provider::{FoundVm, Provider};

/// The libvirt instances of this computer that are asked: the user's own and the system one.
const LOCAL_URIS: [&str; 2] = ["qemu:///session", "qemu:///system"];

/// One hypervisor to ask: how it is named in the table, and the provider that asks it.
struct Hypervisor {
    label: String,
    provider: Box<dyn Provider>,
}

/// One machine found: on which hypervisor (index into the list), its project directory and machine name, and
/// whether that directory is gone.
struct Row {
    found: FoundVm,
    on: usize,
    project: String,
    machine: String,
    gone: bool,
}

impl Row {
    fn new(found: FoundVm, on: usize) -> Row {
        let (project, machine) = names(&found);
        Row { gone: gone(&found.state_dir), found, on, project, machine }
    }
}

/// The hypervisors installed here. None is started: a libvirt daemon that is not running is reported, not
/// started (its machines cannot be running either).
fn hypervisors() -> Vec<Hypervisor> {
    let mut all: Vec<Hypervisor> = Vec::new();
    if crate::platform::LIBVIRT_HOST && which::which("virsh").is_ok() {
        for uri in LOCAL_URIS {
            if let Ok(p) = crate::provider::libvirt::Libvirt::for_uri(uri, "default") {
                all.push(Hypervisor { label: format!("libvirt {uri}"), provider: Box::new(p) });
            }
        }
    }
    if let Some(exe) = crate::provider::virtualbox::find_on_host() {
        all.push(Hypervisor {
            label: "virtualbox".to_string(),
            provider: Box::new(crate::provider::virtualbox::VirtualBox::at(exe)),
        });
    }
    all
}

/// Is the project directory of this state dir gone (not merely unreadable)? A project that exists reaches its
/// machine even without its state dir: its `up` and `destroy` find the VM by name and marker.
fn gone(state_dir: &std::path::Path) -> bool {
    let dir = crate::machine::project_of(state_dir).map_or_else(|| state_dir.to_path_buf(), |(p, _)| p);
    matches!(std::fs::metadata(dir), Err(e) if e.kind() == std::io::ErrorKind::NotFound)
}

pub(super) fn global_status(ctx: &Ctx, args: &GlobalStatusArgs) -> Result<i32> {
    let hypervisors = hypervisors();
    let mut rows = Vec::new();
    let mut not_asked = Vec::new();
    for (on, h) in hypervisors.iter().enumerate() {
        match h.provider.machines() {
            Ok(found) => rows.extend(found.into_iter().map(|f| Row::new(f, on))),
            Err(e) => not_asked.push((h.label.clone(), first_line(&e))),
        }
    }
    rows.sort_by(|a, b| (&a.found.state_dir, &a.found.name).cmp(&(&b.found.state_dir, &b.found.name)));

    if !ctx.ui.json() {
        if rows.is_empty() {
            println!("no machines made by provisioner on this computer");
        } else {
            let cells: Vec<Vec<String>> = rows
                .iter()
                .map(|r| {
                    // Names and paths as read from the hypervisor: control characters shown escaped.
                    let project = crate::text::escaped(&r.project);
                    vec![
                        crate::text::escaped(&r.machine),
                        r.found.state.to_string(),
                        hypervisors[r.on].label.clone(),
                        if r.gone { format!("{project} (gone)") } else { project },
                        crate::text::escaped(&r.found.name),
                    ]
                })
                .collect();
            print!("{}", super::multi::table(&["MACHINE", "STATE", "PROVIDER", "PROJECT", "VM"], &cells));
        }
        for (label, why) in &not_asked {
            ctx.ui.info(format!("{label}: not asked: {why}"));
        }
        if hypervisors.is_empty() {
            ctx.ui.info("no hypervisor is installed here: neither virsh (libvirt) nor VBoxManage (VirtualBox) was found");
        }
    }

    let orphans: Vec<&Row> = rows.iter().filter(|r| r.gone).collect();
    let mut pruned = Vec::new();
    let mut code = crate::exit::OK;
    if !args.prune {
        if !orphans.is_empty() && !ctx.ui.json() {
            ctx.ui.info(format!(
                "{} machine(s) whose project directory is gone: no project can destroy them; `provisioner \
                 global-status --prune` does",
                orphans.len()
            ));
        }
    } else if orphans.is_empty() {
        ctx.ui.info("nothing to prune: the project directory of every machine exists");
    } else {
        let vms: Vec<String> = orphans.iter().map(|r| crate::text::escaped(&r.found.name)).collect();
        if !args.force
            && !super::lifecycle::confirm_or(
                &format!(
                    "Destroy {} machine(s) whose project directory is gone ({}), with their disks?",
                    orphans.len(),
                    vms.join(", ")
                ),
                "provisioner global-status --prune -f",
            )?
        {
            ctx.ui.info("nothing destroyed");
            return Ok(crate::exit::FAILURE);
        }
        for r in orphans {
            let h = &hypervisors[r.on];
            // The provider's own destroy: the marker is checked against the recorded state dir, then the VM, its
            // snapshots and saved memory go (its disks were in the state dir; whatever of it is left goes too).
            match h.provider.destroy(&r.found.name, &StateDir::at(&r.found.state_dir)) {
                Ok(()) => {
                    ctx.ui.info(format!(
                        "destroyed {} ({}; its project directory {} is gone)",
                        crate::text::escaped(&r.found.name),
                        h.label,
                        crate::text::escaped(&r.project)
                    ));
                    pruned.push(r.found.name.clone());
                }
                Err(e) => {
                    ctx.ui.warn(format!(
                        "could not destroy {} ({}): {e:#}",
                        crate::text::escaped(&r.found.name),
                        h.label
                    ));
                    code = crate::exit::FAILURE;
                }
            }
        }
    }
    if ctx.ui.json() {
        let docs: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                json!({"machine": r.machine, "vm_name": r.found.name, "state": r.found.state.to_string(),
                       "provider": hypervisors[r.on].label, "project": r.project, "state_dir": r.found.state_dir,
                       "project_exists": !r.gone})
            })
            .collect();
        let not_asked: Vec<serde_json::Value> =
            not_asked.iter().map(|(label, why)| json!({"provider": label, "reason": why})).collect();
        println!("{}", json!({"machines": docs, "not_asked": not_asked, "pruned": pruned}));
    }
    Ok(code)
}

/// (project directory, machine name) of a found VM, from its state dir (the VM name's machine part when the
/// state dir has another shape).
fn names(f: &FoundVm) -> (String, String) {
    match crate::machine::project_of(&f.state_dir) {
        Some((project, member)) => {
            let machine = member
                .or_else(|| crate::lifecycle::machine_name_of(&f.name).map(str::to_string))
                .unwrap_or_else(|| f.name.clone());
            (project.display().to_string(), machine)
        }
        None => (
            f.state_dir.display().to_string(),
            crate::lifecycle::machine_name_of(&f.name).unwrap_or(&f.name).to_string(),
        ),
    }
}

/// The first line of an error's message (its hint and causes left out): why a hypervisor was not asked.
fn first_line(e: &anyhow::Error) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}
