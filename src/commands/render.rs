//! `provisioner render --out DIR`: the provision tree exactly as `up` would upload it (with this machine's
//! secrets, generated on first use into `.provisioner/secrets.toml`).

use anyhow::{bail, Result};
use serde_json::json;

use super::Ctx;
use crate::cli::RenderArgs;

pub fn render(ctx: &Ctx, args: &RenderArgs) -> Result<i32> {
    let cfg = ctx.config()?;
    let source = cfg.resolve(&cfg.provision.source);
    if let (Ok(src), Ok(out)) = (source.canonicalize(), std::path::absolute(&args.out)) {
        if out.starts_with(&src) {
            bail!(
                "--out {} is inside the provision tree {}: the next render would pick up its own output\n\
                 hint: render somewhere else, e.g. --out /tmp/rendered",
                args.out.display(),
                source.display()
            );
        }
    }
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
            "rendered {} files ({} bytes) from {} into {}",
            rendered.files.len(),
            bytes,
            source.display(),
            args.out.display()
        ));
    }
    Ok(0)
}
