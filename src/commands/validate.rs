//! `provisioner validate`: every check on box-config.toml, including cross-references against the rendered
//! provision tree. Human mode prints warnings (stderr) and one summary line (stdout); `--json` prints one document
//! `{"valid", "file", "machine", "warnings", "errors"}` (exit 1 when invalid).

use anyhow::Result;
use serde_json::json;

use super::Ctx;
use crate::config::{ConfigError, Diagnostic};

pub fn validate(ctx: &Ctx) -> Result<i32> {
    let file = ctx.global.config.display().to_string();
    let checked = ctx.config().and_then(|cfg| {
        let w = cfg.validate_all()?;
        // A remote libvirt host must be in known_hosts: refused here, before any connection is tried.
        if cfg.machine.provider != crate::config::ProviderKind::Virtualbox {
            crate::provider::libvirt::remote::check_uri_host(&cfg.libvirt.uri)?;
        }
        Ok((cfg, w))
    });
    match checked {
        Ok((cfg, warnings)) => {
            if ctx.ui.json() {
                let doc = json!({
                    "valid": true,
                    "file": file,
                    "machine": cfg.machine.name,
                    "forwards": cfg.all_forwards().len(),
                    "health_probes": cfg.health_probes().keys().collect::<Vec<_>>(),
                    "warnings": warnings,
                    "errors": [],
                });
                println!("{doc}");
            } else {
                for w in &warnings {
                    ctx.ui.warn(w.to_string());
                }
                // The verdict is the command's result: stdout (warnings and errors stay on stderr).
                if ctx.ui.mode != crate::ui::Mode::Quiet {
                    println!(
                    "{file}: valid (machine \"{}\", {} forwards incl. SSH, {} health probes, {} warning(s))",
                    cfg.machine.name,
                    cfg.all_forwards().len(),
                    cfg.health_probes().len(),
                    warnings.len()
                    );
                }
            }
            Ok(crate::exit::OK)
        }
        Err(e) if ctx.ui.json() => {
            let errors = match e.downcast_ref::<ConfigError>() {
                Some(ce) => ce.diagnostics.clone(),
                None => {
                    vec![Diagnostic { file, line: None, col: None, message: format!("{e:#}"), hint: None }]
                }
            };
            println!(
                "{}",
                json!({"valid": false, "file": ctx.global.config, "warnings": [], "errors": errors})
            );
            Ok(crate::exit::FAILURE)
        }
        Err(e) => Err(e),
    }
}
