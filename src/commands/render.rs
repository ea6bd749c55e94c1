//! `provisioner render --out DIR`

use anyhow::Result;
use serde_json::json;

use super::Ctx;
use crate::cli::RenderArgs;

pub fn render(ctx: &Ctx, args: &RenderArgs) -> Result<i32> {
    let cfg = ctx.config()?;
    let state = ctx.state(&cfg);
    let rendered = crate::render::render_to_dir(&cfg, &state, &args.out)?;
    let bytes: usize = rendered.files.iter().map(|f| f.contents.len()).sum();
    if ctx.ui.json() {
        let files: Vec<_> = rendered
            .files
            .iter()
            .map(|f| json!({"path": f.path, "bytes": f.contents.len(), "mode": format!("{:o}", f.mode), "sha256": f.sha256()}))
            .collect();
        println!("{}", json!({"out": args.out, "files": files}));
    } else {
        ctx.ui.info(format!(
            "rendered {} files ({} bytes) into {}",
            rendered.files.len(),
            bytes,
            args.out.display()
        ));
    }
    Ok(0)
}
