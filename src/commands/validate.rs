//! `provisioner validate`

use anyhow::Result;

use super::Ctx;

pub fn validate(ctx: &Ctx) -> Result<i32> {
    let cfg = ctx.config()?;
    ctx.ui.info(format!("{}: valid (machine \"{}\")", cfg.path.display(), cfg.machine.name));
    Ok(0)
}
