//! `provisioner validate`: every check on box-config.toml, including cross-references against the rendered
//! provision tree. Human mode prints warnings (stderr) and one summary line (stdout); `--json` prints one document
//! `{"valid", "file", "machine", "warnings", "errors"}` (exit 1 when invalid).

use anyhow::Result;
use serde_json::json;

use super::Ctx;
use crate::config::{Config, ConfigError, Diagnostic};

/// Every machine of the project (the machine of a `[machine]` file is a project of one): the rules between
/// machines, then each machine's own checks against its rendered provision tree.
pub(crate) fn validate(ctx: &Ctx) -> Result<i32> {
    let file = ctx.global.config.display().to_string();
    let checked = crate::config::Project::load(&ctx.global.config).and_then(|p| {
        let warnings = p
            .machines
            .iter()
            .map(|cfg| {
                let w = crate::validate::all(cfg, ctx.profile)?;
                // A remote libvirt host must be in known_hosts: refused here, before any connection is tried.
                check_remote_host(cfg)?;
                Ok(w)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((p, warnings))
    });
    let (p, each) = match checked {
        Ok(m) => m,
        Err(e) => return invalid(ctx, e),
    };
    let mut warnings: Vec<Diagnostic> = Vec::new();
    for d in each.iter().flatten() {
        // A warning about what the machines share is shown once.
        if !warnings.contains(d) {
            warnings.push(d.clone());
        }
    }
    // The verdict: the machine of a `[machine]` file with its counts, the machines of a `[[machine]]` file with
    // their addresses.
    let (doc, line) = match p.solo() {
        Some(cfg) => (
            json!({
                "valid": true,
                "file": file,
                "machine": cfg.machine.name,
                "forwards": cfg.all_forwards().len(),
                "health_probes": cfg.health_probes(ctx.profile).keys().collect::<Vec<_>>(),
                "warnings": warnings,
                "errors": [],
            }),
            format!(
                "{file}: valid (machine \"{}\", {} forwards incl. SSH, {} health probes, {} warning(s))",
                cfg.machine.name,
                cfg.all_forwards().len(),
                cfg.health_probes(ctx.profile).len(),
                warnings.len()
            ),
        ),
        None => {
            let list: Vec<_> = p
                .machines
                .iter()
                .map(|cfg| {
                    json!({"machine": cfg.machine.name, "ip": cfg.member.as_ref().map(|m| m.ip.to_string()),
                           "primary": cfg.member.as_ref().is_some_and(|m| m.primary),
                           "forwards": cfg.all_forwards().len(), "source": cfg.provision.source})
                })
                .collect();
            let names: Vec<String> = p
                .machines
                .iter()
                .map(|c| {
                    format!(
                        "{} {}",
                        c.machine.name,
                        c.member.as_ref().map(|m| m.ip.to_string()).unwrap_or_default()
                    )
                })
                .collect();
            (
                json!({"valid": true, "file": file, "machines": list, "warnings": warnings, "errors": []}),
                format!(
                    "{file}: valid ({} machines: {}; {} warning(s))",
                    p.machines.len(),
                    names.join(", "),
                    warnings.len()
                ),
            )
        }
    };
    if ctx.ui.json() {
        println!("{doc}");
    } else {
        for w in &warnings {
            ctx.ui.warn(w.to_string());
        }
        // The verdict is the command's result: stdout (warnings and errors stay on stderr).
        if ctx.ui.mode != crate::ui::Mode::Quiet {
            println!("{line}");
        }
    }
    Ok(crate::exit::OK)
}

/// A remote libvirt host whose SSH key is not in known_hosts is a finding about the file: at the `uri` that
/// names the host (the machine's own, or the shared [libvirt] one).
fn check_remote_host(cfg: &Config) -> Result<()> {
    if cfg.machine.provider == crate::config::ProviderKind::Virtualbox {
        return Ok(());
    }
    let Some(e) = crate::host::Host::from_uri(&cfg.libvirt.uri).unknown_key()? else { return Ok(()) };
    let text = e.to_string();
    let (message, hint) = text.split_once("\nhint: ").unwrap_or((&text, ""));
    let mut d = cfg.diagnostic_at(&["libvirt", "uri"], message);
    d.hint = (!hint.is_empty()).then(|| hint.to_string());
    Err(ConfigError { diagnostics: vec![d] }.into())
}

/// The verdict for a file that does not validate: the error (human), or a document listing every problem.
fn invalid(ctx: &Ctx, e: anyhow::Error) -> Result<i32> {
    let file = ctx.global.config.display().to_string();
    match e {
        e if ctx.ui.json() => {
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
        e => Err(e),
    }
}
