//! `provisioner load`: bounded traffic at the demo app.

use anyhow::Result;

use super::Ctx;
use crate::cli::LoadArgs;

pub fn load(_ctx: &Ctx, _args: &LoadArgs) -> Result<i32> {
    anyhow::bail!("`load` is not implemented yet")
}
