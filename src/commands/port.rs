//! `provisioner port [--guest N]` (what `vagrant port` shows) and the forwarded-port list `status` prints: the
//! forwards of box-config.toml, SSH first with the address recorded when the machine was created.

use anyhow::{bail, Result};
use serde_json::json;

use super::Ctx;
use crate::cli::PortArgs;
use crate::config::{Forward, Protocol};
use crate::lifecycle::Machine;
use crate::machine::state::MachineState;
use crate::provider::{self, VmState};

fn proto(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
    }
}

/// `  GUEST (guest) => HOST_IP:HOST (host)  PROTO  NAME`, one line per forward, under a heading. Pure.
pub(crate) fn forwards_table(forwards: &[Forward]) -> String {
    if forwards.is_empty() {
        return String::new();
    }
    let mut out = String::from("forwarded ports:\n");
    for f in forwards {
        let host = format!("{}:{}", f.host_ip, f.host);
        let name = f.name.as_deref().map(crate::text::shown).unwrap_or_default();
        out.push_str(&format!(
            "  {:>5} (guest) => {host:<21} (host)  {}  {name}\n",
            f.guest,
            proto(f.protocol)
        ));
    }
    out
}

/// The same list as JSON objects. Pure.
pub(crate) fn forwards_json(forwards: &[Forward]) -> serde_json::Value {
    forwards
        .iter()
        .map(|f| {
            json!({"name": f.name, "guest": f.guest, "host": f.host, "host_ip": f.host_ip,
                   "protocol": proto(f.protocol)})
        })
        .collect()
}

pub(crate) fn port(ctx: &Ctx, args: &PortArgs) -> Result<i32> {
    let m = ctx.existing_machine()?;
    let name = &m.cfg.machine.name;
    let st = match MachineState::load(&m.state)? {
        Some(st) if m.my_vm(provider::select(&m.cfg)?.as_ref())?.1 != VmState::NotCreated => st,
        _ => bail!(
            "machine `{name}` is not created, so no port is forwarded\nhint: `provisioner up` creates it"
        ),
    };
    let forwards = crate::lifecycle::status::machine_forwards(&m.cfg, &st);
    if args.local {
        return local(ctx, &m, &forwards);
    }
    if let Some(guest) = args.guest {
        let Some(f) = forwards.iter().find(|f| f.guest == guest) else {
            bail!(
                "guest port {guest} of machine `{name}` is not forwarded\nhint: add a [[forward]] with guest = \
                 {guest} to box-config.toml, then `provisioner reload`"
            );
        };
        if ctx.ui.json() {
            println!("{}", forwards_json(std::slice::from_ref(f))[0]);
        } else {
            println!("{}", f.host);
        }
        return Ok(crate::exit::OK);
    }
    if ctx.ui.json() {
        println!("{}", json!({"machine": name, "forwards": forwards_json(&forwards)}));
    } else {
        print!("{}", forwards_table(&forwards));
    }
    Ok(crate::exit::OK)
}

/// `port --local`: mirror a remote machine's forwards on the local 127.0.0.1 until interrupted.
fn local(ctx: &Ctx, m: &Machine, forwards: &[Forward]) -> Result<i32> {
    let ep = crate::ssh::Endpoint::for_machine(&m.cfg, &m.state)?;
    let guest = ep.guest_addr();
    let Some(far) = guest.host.remote() else {
        bail!(
            "machine `{}` runs on this machine: its forwards already listen here (`provisioner port` lists them)\n\
             hint: --local is for machines on a remote libvirt host (qemu+ssh://)",
            m.cfg.machine.name
        );
    };
    guest.open_route()?;
    print!("{}", forwards_table(forwards));
    ctx.ui.info(format!(
        "forwarding 127.0.0.1:PORT here to 127.0.0.1:PORT on {} (ports {}); Ctrl-C stops",
        far.destination(),
        guest.ports.iter().map(u16::to_string).collect::<Vec<_>>().join(", ")
    ));
    loop {
        crate::process::sleep_interruptible(std::time::Duration::from_secs(3600));
        crate::process::check_interrupted()?;
    }
}
