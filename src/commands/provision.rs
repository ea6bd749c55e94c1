//! `provision`, `health`, `verify`.

use anyhow::Result;

use super::Ctx;
use crate::cli::{HealthArgs, ProvisionArgs, VerifyArgs};

pub fn provision(_ctx: &Ctx, _args: &ProvisionArgs) -> Result<i32> {
    anyhow::bail!("`provision` is not implemented yet")
}
pub fn health(_ctx: &Ctx, _args: &HealthArgs) -> Result<i32> {
    anyhow::bail!("`health` is not implemented yet")
}
pub fn verify(_ctx: &Ctx, _args: &VerifyArgs) -> Result<i32> {
    anyhow::bail!("`verify` is not implemented yet")
}
