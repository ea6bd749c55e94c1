//! `box list|build|remove`.

use anyhow::Result;

use super::Ctx;
use crate::cli::BoxCommand;

pub fn run(_ctx: &Ctx, _cmd: BoxCommand) -> Result<i32> {
    anyhow::bail!("`box` is not implemented yet")
}
