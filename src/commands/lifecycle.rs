//! `up`, `status`, `halt`, `reload`, `destroy`: the machine's [`Machine`] does the work; these parse, call it and
//! print.

use std::io::{IsTerminal, Write};

use anyhow::{bail, Result};
use serde_json::json;

use super::Ctx;
use crate::cli::{DestroyArgs, HaltArgs, UpArgs};
use crate::lifecycle::status::StatusRow;
use crate::provider::VmState;

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
    confirm_or(question, "provisioner destroy -f")
}

/// [`confirm`] for a command whose forced form is `forced`.
pub(super) fn confirm_or(question: &str, forced: &str) -> Result<bool> {
    if !std::io::stdin().is_terminal() {
        bail!(
            "refusing to destroy without confirmation: stdin is not a terminal\nhint: pass -f (`{forced}`) to \
             destroy without asking"
        );
    }
    eprint!("{question} [y/N] ");
    std::io::stderr().flush()?;
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes"))
}
