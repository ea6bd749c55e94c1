//! `provisioner render --out DIR`: the provision tree exactly as `up` would upload it (with this machine's
//! secrets, generated on first use into `.provisioner/secrets.toml`).

use anyhow::{bail, Result};
use serde_json::json;

use super::Ctx;
use crate::cli::RenderArgs;
use crate::text::shown;

/// `out` made absolute with its existing part canonical (symbolic links and `..` resolved), for comparisons.
fn resolved(out: &std::path::Path) -> std::path::PathBuf {
    let abs = std::path::absolute(out).unwrap_or_else(|_| out.to_path_buf());
    let mut missing = Vec::new();
    let mut cur = abs.as_path();
    loop {
        if let Ok(c) = crate::platform::canonicalize(cur) {
            return missing.into_iter().rev().fold(c, |p, m| p.join(m));
        }
        match (cur.parent(), cur.file_name()) {
            (Some(parent), Some(name)) => {
                missing.push(name.to_os_string());
                cur = parent;
            }
            _ => return abs,
        }
    }
}

pub(crate) fn render(ctx: &Ctx, args: &RenderArgs) -> Result<i32> {
    let cfg = ctx.config()?;
    let layers = cfg.template_layers();
    let source = layers.last().expect("the source layer").clone();
    let out = resolved(&args.out);
    for layer in &layers {
        if crate::platform::canonicalize(layer).is_ok_and(|src| out.starts_with(src)) {
            bail!(
                "--out {} is inside the provision tree {}: the next render would pick up its own output\n\
                 hint: render somewhere else, e.g. --out /tmp/rendered",
                shown(&args.out.display().to_string()),
                layer.display()
            );
        }
    }
    let state = ctx.state(&cfg);
    // The output directory is replaced whole: never the project, the provision tree or the machine's state (nor
    // a directory holding one of them), and never a directory inside the state (keys, disk).
    let protected = [(cfg.base_dir(), "this project"), (state.root.clone(), "the machine's state directory")]
        .into_iter()
        .chain(layers.iter().map(|l| (l.clone(), "the provision tree")));
    for (dir, what) in protected {
        let Ok(dir) = crate::platform::canonicalize(&dir) else { continue };
        if dir.starts_with(&out) || (what != "this project" && out.starts_with(&dir)) {
            bail!(
                "--out {} {} {what} ({}); render replaces its output directory whole\n\
                 hint: render somewhere else, e.g. --out /tmp/rendered",
                shown(&args.out.display().to_string()),
                if dir.starts_with(&out) { "holds" } else { "is inside" },
                dir.display()
            );
        }
    }
    let rendered =
        crate::render::render_to_dir(&cfg, &ctx.profile.secrets_in(&state.root)?, &args.out, args.force)?;
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
