//! `up`, `status`, `halt`, `reload`, `destroy`: the machine's [`Machine`] does the work; these parse, call it and
//! print.

use std::io::{IsTerminal, Write};

use anyhow::{bail, Result};
use serde_json::json;

use super::Ctx;
use crate::cli::{DestroyArgs, HaltArgs, UpArgs};
use crate::config::Forward;
use crate::lifecycle::foreign_note;
pub(crate) use crate::lifecycle::refuse_foreign;
use crate::machine::state::MachineState;
use crate::provider::{self, vm_ref, Lookup, VmState};

pub(crate) fn up(ctx: &Ctx, args: &UpArgs) -> Result<i32> {
    ctx.machine()?.up(&ctx.ui, ctx.round.as_deref(), args)
}

pub(crate) fn reload(ctx: &Ctx, args: &UpArgs) -> Result<i32> {
    ctx.machine()?.reload(&ctx.ui, ctx.round.as_deref(), args)
}

pub(crate) fn halt(ctx: &Ctx, args: &HaltArgs) -> Result<i32> {
    ctx.existing_machine()?.halt(&ctx.ui, args)
}

pub(crate) fn destroy(ctx: &Ctx, args: &DestroyArgs) -> Result<i32> {
    let m = ctx.existing_machine()?;
    if !args.force && !confirm(&format!("Destroy machine {:?} and all its data?", m.cfg.machine.name))? {
        ctx.ui.info("not destroyed");
        return Ok(crate::exit::FAILURE);
    }
    m.destroy(&ctx.ui)
}

fn ssh_of(st: &MachineState) -> Option<String> {
    match (&st.ssh_host, st.ssh_port) {
        (Some(h), Some(port)) => Some(format!("{h}:{port}")),
        _ => None,
    }
}

/// One machine's status, as the hypervisor reports it (asked once); [`print_status`] shows the machine of a
/// `[machine]` file, the table of `[[machine]]` files shows a row per machine.
pub(super) struct StatusRow {
    pub machine: String,
    pub state: String,
    pub provider: Option<String>,
    pub vm_name: Option<String>,
    /// The recorded SSH endpoint.
    pub ssh: Option<String>,
    pub error: Option<String>,
    /// The live state (None: never created, no state.json).
    live: Option<VmState>,
    accel: Option<String>,
    forwards: Vec<Forward>,
    /// A recorded VM of another project: its owner and the last line (hint) of the refusal.
    foreign: Option<(Option<String>, String)>,
}

impl StatusRow {
    pub(super) fn error(machine: &str, e: &anyhow::Error) -> Self {
        let first = format!("{e}").lines().next().unwrap_or_default().to_string();
        StatusRow { error: Some(first), ..Self::blank(machine, "unknown") }
    }

    fn blank(machine: &str, state: &str) -> Self {
        StatusRow {
            machine: machine.to_string(),
            state: state.into(),
            provider: None,
            vm_name: None,
            ssh: None,
            error: None,
            live: None,
            accel: None,
            forwards: Vec::new(),
            foreign: None,
        }
    }

    /// The SSH endpoint of the table: none for a machine that is not created.
    pub(super) fn table_ssh(&self) -> Option<String> {
        self.ssh.clone().filter(|_| self.live.as_ref().is_some_and(|l| *l != VmState::NotCreated))
    }
}

/// Ask the hypervisor once for this machine's state (nothing when it was never created).
pub(super) fn status_row(ctx: &Ctx) -> Result<StatusRow> {
    let m = ctx.existing_machine()?;
    let machine = m.cfg.machine.name.clone();
    let Some(st) = MachineState::load(&m.state)? else {
        return Ok(StatusRow::blank(&machine, &VmState::NotCreated.to_string()));
    };
    let p = provider::select(&m.cfg)?;
    let vm = vm_ref(Some(&st), &m.vm_name);
    let recorded = StatusRow {
        provider: Some(p.name().to_string()),
        vm_name: Some(st.vm_name.clone()),
        ..StatusRow::blank(&machine, "")
    };
    let live = match p.lookup(&vm, &m.state)? {
        Lookup::NotCreated => VmState::NotCreated,
        Lookup::Mine(live) => live,
        Lookup::Foreign { owner } => {
            let refusal = format!("{:#}", provider::foreign_vm(p.name(), &vm, owner.as_deref(), &m.state));
            let hint = refusal.lines().last().unwrap_or_default().to_string();
            return Ok(StatusRow {
                state: "foreign".into(),
                error: Some(format!(
                    "recorded VM belongs to another project ({})",
                    foreign_note(owner.as_deref())
                )),
                foreign: Some((owner, hint)),
                ..recorded
            });
        }
    };
    let forwards =
        if live == VmState::NotCreated { Vec::new() } else { super::port::machine_forwards(&m.cfg, &st) };
    Ok(StatusRow {
        state: live.to_string(),
        ssh: ssh_of(&st),
        live: Some(live),
        accel: st.accel.clone(),
        forwards,
        ..recorded
    })
}

/// `status` of the machine of a `[machine]` file: its line (and forwards), or one JSON document.
pub(super) fn print_status(ctx: &Ctx, r: &StatusRow) {
    let name = &r.machine;
    let provider = r.provider.as_deref().unwrap_or_default();
    if let Some((owner, hint)) = &r.foreign {
        let message = r.error.as_deref().unwrap_or_default();
        if ctx.ui.json() {
            println!(
                "{}",
                json!({"machine": name, "state": "foreign", "provider": provider, "vm_name": r.vm_name,
                       "owner": owner, "message": message})
            );
        } else {
            println!("{name}: {message}\n{hint}");
        }
        return;
    }
    let Some(live) = &r.live else {
        if ctx.ui.json() {
            println!("{}", json!({"machine": name, "state": VmState::NotCreated}));
        } else {
            println!("{name}: not created");
        }
        return;
    };
    if ctx.ui.json() {
        println!(
            "{}",
            json!({"machine": name, "state": live, "provider": provider, "vm_name": r.vm_name, "ssh": r.ssh,
                   "accel": r.accel, "forwards": super::port::forwards_json(&r.forwards)})
        );
    } else {
        match (live, &r.ssh) {
            (VmState::Running, Some(ssh)) => println!("{name}: running ({provider}, {ssh})"),
            (VmState::NotCreated, _) => println!("{name}: not created"),
            (other, _) => println!("{name}: {other} ({provider})"),
        }
        print!("{}", super::port::forwards_table(&r.forwards));
    }
}

/// Ask on the terminal; without one, refuse (the caller must pass -f).
pub(super) fn confirm(question: &str) -> Result<bool> {
    if !std::io::stdin().is_terminal() {
        bail!(
            "refusing to destroy without confirmation: stdin is not a terminal\nhint: pass -f (`provisioner destroy \
             -f`) to destroy without asking"
        );
    }
    eprint!("{question} [y/N] ");
    std::io::stderr().flush()?;
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes"))
}
