//! libvirt through `virsh` and `qemu-img` only.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Result;

use super::{MachineSpec, Provider, VmState};
use crate::config::Config;
use crate::machine::StateDir;

pub struct Libvirt {
    pub uri: String,
}

impl Libvirt {
    pub fn new(cfg: &Config) -> Result<Self> {
        Ok(Self {
            uri: cfg.libvirt.uri.clone(),
        })
    }
}

impl Provider for Libvirt {
    fn name(&self) -> &'static str {
        "libvirt"
    }
    fn preflight(&self) -> Result<()> {
        todo!("libvirt preflight")
    }
    fn state(&self, _vm_name: &str) -> Result<VmState> {
        todo!("libvirt state")
    }
    fn create(&self, _spec: &MachineSpec) -> Result<()> {
        todo!("libvirt create")
    }
    fn start(&self, _vm_name: &str) -> Result<()> {
        todo!("libvirt start")
    }
    fn halt(&self, _vm_name: &str, _timeout: Duration, _force: bool) -> Result<()> {
        todo!("libvirt halt")
    }
    fn destroy(&self, _vm_name: &str, _state: &StateDir) -> Result<()> {
        todo!("libvirt destroy")
    }
    fn ssh_endpoint(&self, _vm_name: &str, _state: &StateDir) -> Result<SocketAddr> {
        todo!("libvirt ssh_endpoint")
    }
}
