//! `state.json`: what the tool knows about the machine between commands (the hypervisor is asked live for its
//! run state; this records identities and endpoints).

use serde::{Deserialize, Serialize};

use anyhow::{Context, Result};

use super::StateDir;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MachineState {
    /// "libvirt" or "virtualbox".
    pub provider: String,
    /// The hypervisor's name for the VM (domain name / VM name), unique per machine.
    pub vm_name: String,
    /// Hypervisor id. VirtualBox: the VM's UUID, chosen and recorded here BEFORE `clonevm --uuid`, so every later
    /// call addresses the VM by UUID (a lookup by name skips inaccessible VMs). Absent in older state files.
    #[serde(default)]
    pub vm_id: Option<String>,
    /// Cached box id the disk is based on.
    #[serde(default)]
    pub box_id: Option<String>,
    /// SSH endpoint on the host.
    #[serde(default)]
    pub ssh_host: Option<String>,
    #[serde(default)]
    pub ssh_port: Option<u16>,
    /// Libvirt URI used, so later commands reach the same daemon.
    #[serde(default)]
    pub libvirt_uri: Option<String>,
    /// "tcg" or "kvm", as decided at create time.
    #[serde(default)]
    pub accel: Option<String>,
    /// Set once cloud-init reported done at least once.
    #[serde(default)]
    pub provisioned: bool,
    /// How the machine's key got in: "cloud-init" (the seed; also when absent), "disk" (edited before the first
    /// boot) or "insecure-once" (one login with Vagrant's insecure key), docs/boxes.md "Boxes from Vagrant".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys_route: Option<String>,
    /// The guest user the machine's key went to when it is not `[ssh] user` (a Vagrant box's `vagrant`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_user: Option<String>,
    /// `keys_route` "insecure-once": set when the machine is created, cleared once its first login replaced the
    /// box's keys (until then the next `up` logs in with Vagrant's insecure key again, and only then).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub first_login_pending: bool,
}

// A module of its own only for this lint exception: clippy 1.96 (the Windows cross-build's) flags the initializer
// although it is `const` already, and an `allow` on the macro call itself is ignored.
#[allow(clippy::missing_const_for_thread_local)]
mod reads {
    thread_local! {
        pub(super) static READS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }
}
use reads::READS;

impl MachineState {
    /// Reads of state.json by this thread so far (`up` reports it to show it reads the file once per run).
    pub fn reads_in_thread() -> usize {
        READS.with(|c| c.get())
    }

    pub fn load(dir: &StateDir) -> Result<Option<Self>> {
        READS.with(|c| c.set(c.get() + 1));
        let p = dir.state_file();
        match std::fs::read(&p) {
            Ok(b) => {
                Ok(Some(serde_json::from_slice(&b).with_context(|| {
                    format!("corrupt {}; `provisioner destroy -f` resets it", p.display())
                })?))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("read {}", p.display())),
        }
    }
    pub fn save(&self, dir: &StateDir) -> Result<()> {
        dir.ensure()?;
        super::write_private(&dir.state_file(), &serde_json::to_vec_pretty(self)?, 0o600)
    }
}
