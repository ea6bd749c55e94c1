//! `up`, `status`, `halt`, `reload`, `destroy`.

use anyhow::Result;

use super::Ctx;
use crate::cli::{DestroyArgs, HaltArgs, UpArgs};

pub fn up(_ctx: &Ctx, _args: &UpArgs) -> Result<i32> {
    anyhow::bail!("`up` is not implemented yet")
}
pub fn status(_ctx: &Ctx) -> Result<i32> {
    anyhow::bail!("`status` is not implemented yet")
}
pub fn halt(_ctx: &Ctx, _args: &HaltArgs) -> Result<i32> {
    anyhow::bail!("`halt` is not implemented yet")
}
pub fn reload(_ctx: &Ctx, _args: &UpArgs) -> Result<i32> {
    anyhow::bail!("`reload` is not implemented yet")
}
pub fn destroy(_ctx: &Ctx, _args: &DestroyArgs) -> Result<i32> {
    anyhow::bail!("`destroy` is not implemented yet")
}
