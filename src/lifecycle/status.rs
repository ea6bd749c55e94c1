//! The status query of one machine: the hypervisor asked once ([`Machine::status`]); commands print it.

use anyhow::Result;

use super::{foreign_note, Machine};
use crate::config::{Config, Forward};
use crate::machine::state::MachineState;
use crate::provider::{self, vm_ref, Lookup, VmState};

/// One machine's status, as the hypervisor reports it (asked once).
pub(crate) struct StatusRow {
    pub(crate) machine: String,
    pub(crate) state: String,
    pub(crate) provider: Option<String>,
    pub(crate) vm_name: Option<String>,
    /// The recorded SSH endpoint.
    pub(crate) ssh: Option<String>,
    pub(crate) error: Option<String>,
    /// The live state (None: never created, no state.json).
    pub(crate) live: Option<VmState>,
    pub(crate) accel: Option<String>,
    pub(crate) forwards: Vec<Forward>,
    /// A recorded VM of another project: its owner and the last line (hint) of the refusal.
    pub(crate) foreign: Option<(Option<String>, String)>,
}

impl StatusRow {
    /// The row of a machine whose status could not be read: the first line of why.
    pub(crate) fn error(machine: &str, e: &anyhow::Error) -> Self {
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
    pub(crate) fn table_ssh(&self) -> Option<String> {
        self.ssh.clone().filter(|_| self.live.as_ref().is_some_and(|l| *l != VmState::NotCreated))
    }
}

/// Every forward of a created machine, SSH first with its recorded host address and port.
pub(crate) fn machine_forwards(cfg: &Config, st: &MachineState) -> Vec<Forward> {
    let mut forwards = cfg.all_forwards();
    if let Some(port) = st.ssh_port {
        forwards[0].host = port;
    }
    if let Some(ip) = &st.ssh_host {
        forwards[0].host_ip = ip.clone();
    }
    forwards
}

fn ssh_of(st: &MachineState) -> Option<String> {
    match (&st.ssh_host, st.ssh_port) {
        (Some(h), Some(port)) => Some(format!("{h}:{port}")),
        _ => None,
    }
}

impl Machine {
    /// Ask the hypervisor once for this machine's state (nothing when it was never created).
    pub(crate) fn status(&self) -> Result<StatusRow> {
        let machine = self.cfg.machine.name.clone();
        let Some(st) = MachineState::load(&self.state)? else {
            return Ok(StatusRow::blank(&machine, &VmState::NotCreated.to_string()));
        };
        let p = provider::select(&self.cfg)?;
        let vm = vm_ref(Some(&st), &self.vm_name);
        let recorded = StatusRow {
            provider: Some(p.name().to_string()),
            vm_name: Some(st.vm_name.clone()),
            ..StatusRow::blank(&machine, "")
        };
        let live = match p.lookup(&vm, &self.state)? {
            Lookup::NotCreated => VmState::NotCreated,
            Lookup::Mine(live) => live,
            Lookup::Foreign { owner } => {
                let refusal =
                    format!("{:#}", provider::foreign_vm(p.name(), &vm, owner.as_deref(), &self.state));
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
            if live == VmState::NotCreated { Vec::new() } else { machine_forwards(&self.cfg, &st) };
        Ok(StatusRow {
            state: live.to_string(),
            ssh: ssh_of(&st),
            live: Some(live),
            accel: st.accel.clone(),
            forwards,
            ..recorded
        })
    }
}
