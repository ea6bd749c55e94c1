//! Rendering `provision/`: files ending in `.hbs` are handlebars templates (strict mode: an undefined variable is an
//! error naming the template and line), rendered without the suffix; every other file is copied byte for byte.
//! Unix modes are kept (executable scripts stay executable). The result is an in-memory tree so `validate` can
//! inspect it, `render --out` can write it and the guest upload can hash and stream it.
//!
//! Template context:
//! - `vars.*`     the lab's defaults (`provision/vars.toml`) overlaid by `[vars]` of box-config.toml
//! - `machine.*`  name, hostname, cpus, memory_mb
//! - `provision.*` guest_path, images ("registry" | "debian")
//! - `secrets.*`  generated once per machine, kept 0600 in `.provisioner/secrets.toml`

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use handlebars::Handlebars;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::Config;
use crate::machine::{write_private, StateDir};

/// Lab defaults for template variables, inside the provision tree. Not uploaded.
pub const VARS_FILE: &str = "vars.toml";
pub const TEMPLATE_SUFFIX: &str = ".hbs";

/// One rendered file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedFile {
    /// Path relative to the tree root, `/`-separated.
    pub path: String,
    pub contents: Vec<u8>,
    /// Unix permission bits.
    pub mode: u32,
}

impl RenderedFile {
    pub fn sha256(&self) -> String {
        hex::encode(Sha256::digest(&self.contents))
    }
}

/// A rendered tree, sorted by path.
#[derive(Debug, Clone, Default)]
pub struct Rendered {
    pub files: Vec<RenderedFile>,
}

impl Rendered {
    pub fn get(&self, path: &str) -> Option<&RenderedFile> {
        self.files.iter().find(|f| f.path == path)
    }
    /// Write under `out` (created). Existing files with the same names are replaced; modes are applied.
    pub fn write_to(&self, out: &Path) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(out).with_context(|| format!("create {}", out.display()))?;
        for f in &self.files {
            let dest = out.join(&f.path);
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
            }
            if f.mode & 0o077 == 0 {
                write_private(&dest, &f.contents, f.mode)?;
            } else {
                std::fs::write(&dest, &f.contents).with_context(|| format!("write {}", dest.display()))?;
                std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(f.mode))?;
            }
        }
        Ok(())
    }
}

/// Secrets generated once per machine.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Secrets {
    /// 32 random bytes, hex.
    pub prometheus_hex: String,
    /// Grafana admin password: 24 characters from [A-Za-z0-9].
    pub grafana_admin_password: String,
}

impl Secrets {
    pub fn generate() -> Self {
        use rand_core::{OsRng, RngCore};
        let mut b = [0u8; 32];
        OsRng.fill_bytes(&mut b);
        const ALPHA: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789";
        let mut pw = String::new();
        while pw.len() < 24 {
            let mut x = [0u8; 1];
            OsRng.fill_bytes(&mut x);
            // Rejection sampling keeps the distribution uniform.
            if (x[0] as usize) < 256 - (256 % ALPHA.len()) {
                pw.push(ALPHA[x[0] as usize % ALPHA.len()] as char);
            }
        }
        Self { prometheus_hex: hex::encode(b), grafana_admin_password: pw }
    }

    /// Load from the state dir, generating (and saving 0600) on first use.
    pub fn load_or_create(state: &StateDir) -> Result<Self> {
        let p = state.secrets();
        if p.exists() {
            let text = std::fs::read_to_string(&p).with_context(|| format!("read {}", p.display()))?;
            return toml::from_str(&text).with_context(|| {
                format!("{} is damaged; delete it to generate new lab secrets", p.display())
            });
        }
        state.ensure()?;
        let s = Self::generate();
        write_private(&p, toml::to_string(&s)?.as_bytes(), 0o600)?;
        Ok(s)
    }
}

/// Lab defaults from `<source>/vars.toml` overlaid with `[vars]` from the config.
pub fn template_vars(cfg: &Config, source: &Path) -> Result<BTreeMap<String, toml::Value>> {
    let mut vars = BTreeMap::new();
    let defaults = source.join(VARS_FILE);
    if defaults.exists() {
        let text =
            std::fs::read_to_string(&defaults).with_context(|| format!("read {}", defaults.display()))?;
        let table: BTreeMap<String, toml::Value> =
            toml::from_str(&text).map_err(|e| anyhow!("{}: {e}", defaults.display()))?;
        vars.extend(table);
    }
    vars.extend(cfg.vars.clone());
    Ok(vars)
}

/// The full handlebars context.
pub fn context(cfg: &Config, source: &Path, secrets: &Secrets) -> Result<serde_json::Value> {
    let vars = template_vars(cfg, source)?;
    let forwards: Vec<_> = cfg
        .forwards
        .iter()
        .map(|f| serde_json::json!({"guest": f.guest, "host": f.host, "host_ip": f.host_ip, "name": f.name}))
        .collect();
    Ok(serde_json::json!({
        "vars": serde_json::to_value(vars)?,
        "machine": {
            "name": cfg.machine.name,
            "hostname": cfg.hostname(),
            "cpus": cfg.machine.cpus,
            "memory_mb": cfg.machine.memory_mb,
        },
        "provision": {
            "guest_path": cfg.provision.guest_path,
            "images": cfg.provision.images,
        },
        "forwards": forwards,
        "secrets": secrets,
    }))
}

/// Render the config's provision tree with the machine's secrets.
pub fn render_config(cfg: &Config, state: &StateDir) -> Result<Rendered> {
    let source = cfg.resolve(&cfg.provision.source);
    let secrets = Secrets::load_or_create(state)?;
    render_tree(cfg, &source, &secrets)
}

thread_local! {
    static RENDERS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Provision trees rendered by this thread so far: `up` reports it (`--json` event `run_counts`) to show the tree
/// is rendered once per run.
pub fn renders_in_thread() -> usize {
    RENDERS.with(|c| c.get())
}

/// Render a template tree with explicit secrets (pure apart from reading `source`).
pub fn render_tree(cfg: &Config, source: &Path, secrets: &Secrets) -> Result<Rendered> {
    use std::os::unix::fs::PermissionsExt;
    RENDERS.with(|c| c.set(c.get() + 1));
    if !source.is_dir() {
        bail!(
            "provision source {} is not a directory; set [provision] source in {} to the lab's template tree",
            source.display(),
            cfg.path.display()
        );
    }
    let ctx = context(cfg, source, secrets)?;
    let mut hb = Handlebars::new();
    hb.set_strict_mode(true);
    hb.register_escape_fn(handlebars::no_escape);
    let mut files = Vec::new();
    for entry in walkdir::WalkDir::new(source).sort_by_file_name() {
        let entry = entry.with_context(|| format!("walk {}", source.display()))?;
        if !entry.file_type().is_file() {
            continue;
        }
        let rel = entry.path().strip_prefix(source).expect("under source");
        let rel_str = rel_slash(rel)?;
        if rel_str == VARS_FILE {
            continue;
        }
        let mode = entry.metadata()?.permissions().mode() & 0o7777;
        let raw = std::fs::read(entry.path()).with_context(|| format!("read {}", entry.path().display()))?;
        let (path, contents) = match rel_str.strip_suffix(TEMPLATE_SUFFIX) {
            Some(out) => {
                let text = String::from_utf8(raw).map_err(|_| {
                    anyhow!("{}: template is not UTF-8; save it as UTF-8", entry.path().display())
                })?;
                let shown = entry.path().display().to_string();
                hb.register_template_string(&shown, &text).map_err(|e| template_error(&shown, e))?;
                let rendered = hb.render(&shown, &ctx).map_err(|e| render_error(&shown, e))?;
                (out.to_string(), rendered.into_bytes())
            }
            None => (rel_str, raw),
        };
        // Secrets files are private however they sit in the tree, and docker compose reads them as ASCII lines.
        let (contents, mode) = if path.rsplit('/').next() == Some(".env") {
            (env_file(&entry.path().display().to_string(), contents)?, 0o600)
        } else {
            (contents, mode)
        };
        files.push(RenderedFile { path, contents, mode });
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(Rendered { files })
}

/// A `.env` file as compose wants it: ASCII, LF line ends (CRLF from a Windows editor is converted).
fn env_file(shown: &str, contents: Vec<u8>) -> Result<Vec<u8>> {
    if let Some(pos) = contents.iter().position(|b| !b.is_ascii()) {
        let line = contents[..pos].iter().filter(|b| **b == b'\n').count() + 1;
        bail!(
            "{shown}:{line}: .env holds a non-ASCII byte (0x{:02X}) after rendering\n\
             hint: keep .env values ASCII (a non-ASCII [vars] value is the usual cause)",
            contents[pos]
        );
    }
    let mut out = Vec::with_capacity(contents.len());
    for (i, b) in contents.iter().enumerate() {
        if *b == b'\r' && contents.get(i + 1) == Some(&b'\n') {
            continue;
        }
        out.push(*b);
    }
    Ok(out)
}

fn rel_slash(rel: &Path) -> Result<String> {
    let parts: Vec<&str> = rel
        .components()
        .map(|c| c.as_os_str().to_str().ok_or_else(|| anyhow!("non-UTF-8 file name {}", rel.display())))
        .collect::<Result<_>>()?;
    Ok(parts.join("/"))
}

fn template_error(template: &str, e: handlebars::TemplateError) -> anyhow::Error {
    let pos = match e.pos() {
        Some((l, c)) => format!("{template}:{l}:{c}"),
        None => template.to_string(),
    };
    anyhow!(
        "{pos}: template syntax error: {}\nhint: a literal `{{{{` (e.g. a Prometheus or Grafana template) is written `\\{{{{` \
         in a .hbs file; or keep the file without the .hbs suffix",
        e.reason()
    )
}

fn render_error(template: &str, e: handlebars::RenderError) -> anyhow::Error {
    let pos = match (e.line_no, e.column_no) {
        (Some(l), Some(c)) => format!("{template}:{l}:{c}"),
        (Some(l), None) => format!("{template}:{l}"),
        _ => template.to_string(),
    };
    let (reason, hint) = match e.reason() {
        handlebars::RenderErrorReason::MissingVariable(var) => (
            format!("undefined variable `{}`", var.as_deref().unwrap_or("?")),
            "\nhint: define the variable under [vars] in box-config.toml (or in the lab's vars.toml), or fix its name",
        ),
        other => (other.to_string(), ""),
    };
    anyhow!("{pos}: {reason}{hint}")
}

/// Helper for tests and `render --out`: render and write.
pub fn render_to_dir(cfg: &Config, state: &StateDir, out: &Path) -> Result<Rendered> {
    let r = render_config(cfg, state)?;
    r.write_to(out)?;
    Ok(r)
}

/// Convenience: the path the rendered file would have under a directory.
pub fn out_path(out: &Path, f: &RenderedFile) -> PathBuf {
    out.join(&f.path)
}
