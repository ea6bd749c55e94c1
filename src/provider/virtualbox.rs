//! VirtualBox through `VBoxManage`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;

use super::{MachineSpec, Provider, VmState};
use crate::config::Config;
use crate::machine::StateDir;

/// Locate VBoxManage: the config's path, PATH, then (Windows) %VBOX_MSI_INSTALL_PATH% and Program Files.
pub fn find_vboxmanage(cfg: &Config) -> Option<PathBuf> {
    if let Some(p) = &cfg.virtualbox.vboxmanage {
        return Some(p.clone());
    }
    which::which("VBoxManage").ok()
}

pub struct VirtualBox {
    pub vboxmanage: PathBuf,
}

impl VirtualBox {
    pub fn new(cfg: &Config) -> Result<Self> {
        let vboxmanage = find_vboxmanage(cfg).ok_or_else(|| {
            anyhow::anyhow!("VBoxManage was not found; install VirtualBox or set [virtualbox] vboxmanage")
        })?;
        Ok(Self { vboxmanage })
    }
}

impl Provider for VirtualBox {
    fn name(&self) -> &'static str {
        "virtualbox"
    }
    fn preflight(&self) -> Result<()> {
        todo!()
    }
    fn state(&self, _vm_name: &str) -> Result<VmState> {
        todo!()
    }
    fn create(&self, _spec: &MachineSpec) -> Result<()> {
        todo!()
    }
    fn start(&self, _vm_name: &str) -> Result<()> {
        todo!()
    }
    fn halt(&self, _vm_name: &str, _timeout: Duration, _force: bool) -> Result<()> {
        todo!()
    }
    fn destroy(&self, _vm_name: &str, _state: &StateDir) -> Result<()> {
        todo!()
    }
    fn ssh_endpoint(&self, _vm_name: &str, _state: &StateDir) -> Result<SocketAddr> {
        todo!()
    }
}
