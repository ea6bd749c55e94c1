//! `ssh` and `ssh-config`.

use anyhow::Result;

use super::Ctx;
use crate::cli::{SshArgs, SshConfigArgs};

pub fn ssh(_ctx: &Ctx, _args: &SshArgs) -> Result<i32> {
    anyhow::bail!("`ssh` is not implemented yet")
}
pub fn ssh_config(_ctx: &Ctx, _args: &SshConfigArgs) -> Result<i32> {
    anyhow::bail!("`ssh-config` is not implemented yet")
}
