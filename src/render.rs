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
//! - `cluster.*`  the project's machines (`[[machine]]` files): `machines` (name, hostname, ip), `ip`, `profiles`

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use handlebars::Handlebars;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::config::Config;
use crate::text::shown;

mod partials;

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
    /// Write the tree as the directory `out`, never through a symbolic link: the files go into a new directory
    /// beside `out` (made by this process, so nothing in it can be a planted link), which then takes `out`'s
    /// place in one rename (an atomic exchange when `out` exists). `out` may be missing, empty, or a directory an
    /// earlier render made (it holds [`RENDER_MARKER`]); a directory without the marker that holds only files this
    /// tree writes (an older render's output) is replaced only with `force`; any other directory is refused,
    /// `force` or not, naming what render did not write. `/`, a symbolic link and a non-directory are always
    /// refused.
    pub fn write_to(&self, out: &Path, force: bool) -> Result<()> {
        let target = output_target(out)?;
        let replace = match std::fs::symlink_metadata(&target) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(e).with_context(|| format!("inspect {}", target.display())),
            Ok(m) if m.file_type().is_symlink() => bail!(
                "--out {} is a symbolic link; render never writes through links\n\
                 hint: pass the directory the link points to, or another path",
                shown(&out.display().to_string())
            ),
            Ok(m) if !m.is_dir() => bail!(
                "--out {} exists and is not a directory\nhint: pass a new or empty directory",
                shown(&out.display().to_string())
            ),
            Ok(_) => {
                let shown_out = shown(&out.display().to_string());
                match self.existing_output(&target)? {
                    Existing::Empty | Existing::Marked => {}
                    Existing::Unmarked if force => {}
                    Existing::Unmarked => bail!(
                        "--out {shown_out} holds only files render writes, but no {RENDER_MARKER} marker (an \
                         output of an older provisioner, or a copy); render replaces its output directory whole\n\
                         hint: add --force to replace it (edits to those files are lost), or pass a new or empty \
                         directory"
                    ),
                    Existing::Foreign(names) => {
                        let n = names.len();
                        let mut list: Vec<String> = names.iter().take(5).map(|n| shown(n)).collect();
                        if n > 5 {
                            list.push("...".into());
                        }
                        bail!(
                            "--out {shown_out} holds {n} {} render did not write: {}; render replaces only a \
                             directory it made (marked by {RENDER_MARKER}), so it refuses this one, --force or \
                             not\nhint: pass a new or empty directory (e.g. --out /tmp/rendered)",
                            if n == 1 { "entry" } else { "entries" },
                            list.join(", ")
                        )
                    }
                }
                true
            }
        };
        let parent = target.parent().context("output directory has no parent")?;
        // Missing parents are made as before (they are the user's path; only the output itself is render's).
        crate::platform::create_dir(parent, 0o755, true)
            .with_context(|| format!("create {}", parent.display()))?;
        let fresh = FreshDir::new(parent, &target)?;
        write_file(&fresh.path.join(RENDER_MARKER), RENDER_MARKER_TEXT.as_bytes(), 0o644)?;
        for f in &self.files {
            let dest = fresh.path.join(&f.path);
            if let Some(dir) = dest.parent() {
                crate::platform::create_dir(dir, 0o755, true)
                    .with_context(|| format!("create {}", dir.display()))?;
            }
            write_file(&dest, &f.contents, f.mode)?;
        }
        fresh.swap_into(&target, replace)
    }
}

/// Name of the file that marks a directory `render --out` made (so the next render may replace it).
pub const RENDER_MARKER: &str = ".provisioner-render";
const RENDER_MARKER_TEXT: &str =
    "This directory was written by `provisioner render`; the next render replaces it whole.\n";

/// The directory `--out` names, with `.`/`..` at its end resolved (`--out .` is the current directory) and `/`
/// refused.
fn output_target(out: &Path) -> Result<PathBuf> {
    let abs = std::path::absolute(out).with_context(|| format!("resolve {}", out.display()))?;
    let target = match abs.file_name() {
        Some(_) if !abs.ends_with("..") => abs,
        _ => crate::platform::canonicalize(&abs).with_context(|| format!("resolve {}", out.display()))?,
    };
    if target.parent().is_none() {
        bail!(
            "--out {} is the root directory; render replaces its output directory whole\n\
             hint: render into a directory of its own, e.g. --out /tmp/rendered",
            shown(&out.display().to_string())
        );
    }
    Ok(target)
}

/// What an existing `--out` directory holds.
#[derive(Debug, PartialEq, Eq)]
enum Existing {
    Empty,
    /// The marker of an earlier render (a regular file, not a link or a directory): replaced whole.
    Marked,
    /// No marker, but nothing render would not write: directories on the way to the tree's files and those files.
    Unmarked,
    /// Entries render did not write (a directory is named once, not its contents), by relative path.
    Foreign(Vec<String>),
}

impl Rendered {
    fn existing_output(&self, dir: &Path) -> Result<Existing> {
        let mut entries = std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))?;
        if entries.next().is_none() {
            return Ok(Existing::Empty);
        }
        if std::fs::symlink_metadata(dir.join(RENDER_MARKER)).is_ok_and(|m| m.is_file()) {
            return Ok(Existing::Marked);
        }
        let files: std::collections::HashSet<&str> = self.files.iter().map(|f| f.path.as_str()).collect();
        let dirs: std::collections::HashSet<&str> =
            self.files.iter().flat_map(|f| f.path.match_indices('/').map(|(i, _)| &f.path[..i])).collect();
        let mut foreign = Vec::new();
        // walkdir does not follow links: a link is an entry of its own (render never writes one).
        let mut walk = walkdir::WalkDir::new(dir).min_depth(1).sort_by_file_name().into_iter();
        while let Some(entry) = walk.next() {
            let entry = entry.with_context(|| format!("read {}", dir.display()))?;
            let rel = entry.path().strip_prefix(dir).expect("under dir").to_string_lossy().into_owned();
            let kind = entry.file_type();
            if (kind.is_dir() && dirs.contains(rel.as_str()))
                || (kind.is_file() && files.contains(rel.as_str()))
            {
                continue;
            }
            if kind.is_dir() {
                walk.skip_current_dir();
                foreign.push(format!("{rel}/"));
            } else if kind.is_symlink() {
                foreign.push(format!("{rel} (a symbolic link)"));
            } else {
                foreign.push(rel);
            }
        }
        Ok(if foreign.is_empty() { Existing::Unmarked } else { Existing::Foreign(foreign) })
    }
}

/// Create a file that must not exist yet (never following a link) with exactly `mode` (setuid, setgid and
/// sticky bits dropped).
fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    use std::io::Write;
    let mut f = crate::platform::create_new_no_follow(path, 0o600)
        .with_context(|| format!("create {}", path.display()))?;
    f.write_all(data).with_context(|| format!("write {}", path.display()))?;
    // On Windows a mode is a no-op unless private (see platform::set_file_mode).
    crate::platform::set_file_mode(&f, path, mode & 0o777)
        .with_context(|| format!("set the mode of {}", path.display()))
}

/// A new directory beside the output, removed on drop unless it took the output's place.
struct FreshDir {
    path: PathBuf,
}

impl FreshDir {
    fn new(parent: &Path, target: &Path) -> Result<Self> {
        use rand_core::{OsRng, RngCore};
        let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let path = parent.join(format!(".{name}.render-{}-{:08x}", std::process::id(), OsRng.next_u32()));
        crate::platform::create_dir(&path, 0o755, false)
            .with_context(|| format!("create a directory in {}", parent.display()))?;
        Ok(Self { path })
    }

    /// Put the new tree at `target`: a rename when nothing is there, else an atomic exchange, after which the old
    /// tree (now under the fresh name) is removed.
    fn swap_into(self, target: &Path, replace: bool) -> Result<()> {
        if !replace {
            return std::fs::rename(&self.path, target)
                .with_context(|| format!("move the rendered tree to {}", target.display()));
        }
        if let Err(e) = crate::platform::rename_exchange(&self.path, target) {
            // No RENAME_EXCHANGE here (another OS or filesystem): move the old tree aside, then the new one in.
            if e.kind() != std::io::ErrorKind::Unsupported {
                return Err(e).with_context(|| format!("replace {}", target.display()));
            }
            let aside = self.path.with_extension("old");
            std::fs::rename(target, &aside).with_context(|| format!("move {} aside", target.display()))?;
            std::fs::rename(&self.path, target).with_context(|| format!("replace {}", target.display()))?;
            return std::fs::remove_dir_all(&aside).with_context(|| format!("remove {}", aside.display()));
        }
        // self.path now holds the previous output; Drop removes it.
        Ok(())
    }
}

impl Drop for FreshDir {
    fn drop(&mut self) {
        // remove_dir_all does not follow symbolic links.
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Lab defaults from each layer's `vars.toml` (a later layer's value wins) overlaid with `[vars]` from the config.
pub fn template_vars(cfg: &Config, layers: &[PathBuf]) -> Result<BTreeMap<String, toml::Value>> {
    let mut vars = BTreeMap::new();
    for layer in layers {
        vars.extend(layer_vars(&layer.join(VARS_FILE))?);
    }
    vars.extend(cfg.vars.clone());
    Ok(vars)
}

/// One layer's `vars.toml` (empty when there is none).
fn layer_vars(defaults: &Path) -> Result<BTreeMap<String, toml::Value>> {
    match std::fs::symlink_metadata(defaults) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(e).with_context(|| format!("inspect {}", defaults.display())),
        Ok(m) => {
            if !m.is_file() {
                return Err(not_a_file(defaults, &m));
            }
            let raw = read_no_follow(defaults)?;
            let text = String::from_utf8(raw).map_err(|_| {
                anyhow!("{}: not UTF-8; save it as UTF-8", shown(&defaults.display().to_string()))
            })?;
            // The parser's message and position only: its Display would quote the offending line.
            toml::from_str(&text).map_err(|e| {
                let (line, col) = e.span().map_or((1, 1), |r| crate::config::line_col(&text, r.start));
                anyhow!(
                    "{}:{line}:{col}: {}\nhint: vars.toml holds the lab's default template variables as TOML \
                     (name = value)",
                    shown(&defaults.display().to_string()),
                    shown(e.message().trim())
                )
            })
        }
    }
}

/// The full handlebars context.
pub fn context<S: Serialize + ?Sized>(
    cfg: &Config,
    layers: &[PathBuf],
    secrets: &S,
) -> Result<serde_json::Value> {
    let vars = template_vars(cfg, layers)?;
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
            "images": cfg.provision.images.rendered(),
            "pip_index_url": cfg.provision.pip_index_url.as_deref().unwrap_or(""),
            "pip_trusted_host": cfg
                .provision
                .pip_index_url
                .as_deref()
                .filter(|u| u.starts_with("http://"))
                .and_then(crate::config::url_host)
                .map(|h| h.rsplit_once(':').map_or(h.clone(), |(h, _)| h.to_string()))
                .unwrap_or_default(),
        },
        "forwards": forwards,
        "secrets": serde_json::to_value(secrets)?,
        "cluster": cluster(cfg),
    }))
}

/// `cluster.*`: for a machine of a `[[machine]]` file, every machine of the project (`machines`: name,
/// hostname, ip), this machine's `ip` and compose `profiles` (joined by commas in `profiles_csv`); for a
/// single machine, `machines` is empty.
fn cluster(cfg: &Config) -> serde_json::Value {
    match &cfg.member {
        Some(m) => serde_json::json!({
            "multi": true,
            "machines": m.peers,
            "ip": m.ip.to_string(),
            "prefix": m.prefix,
            "profiles": m.profiles,
            "profiles_csv": m.profiles.join(","),
            "network": m.network.name,
        }),
        None => serde_json::json!({"multi": false, "machines": [], "profiles": [], "profiles_csv": ""}),
    }
}

/// Render the config's provision tree with the machine's secrets (the workload profile's, from the state dir).
pub fn render_config<S: Serialize + ?Sized>(cfg: &Config, secrets: &S) -> Result<Rendered> {
    render_layers(cfg, &cfg.template_layers(), secrets)
}

/// The `image` helper: an image reference as the guest pulls it (see `ProvisionConfig::proxied_image`).
struct ImageHelper(crate::config::ProvisionConfig);

impl handlebars::HelperDef for ImageHelper {
    fn call<'reg: 'rc, 'rc>(
        &self,
        h: &handlebars::Helper<'rc>,
        _: &'reg Handlebars<'reg>,
        _: &'rc handlebars::Context,
        _: &mut handlebars::RenderContext<'reg, 'rc>,
        out: &mut dyn handlebars::Output,
    ) -> handlebars::HelperResult {
        let image = h
            .param(0)
            .and_then(|p| p.value().as_str())
            .ok_or(handlebars::RenderErrorReason::ParamNotFoundForIndex("image", 0))?;
        out.write(&self.0.proxied_image(image))?;
        Ok(())
    }
}

// A module of its own only for this lint exception: clippy 1.96 (the Windows cross-build's) flags the initializer
// although it is `const` already, and an `allow` on the macro call itself is ignored.
#[allow(clippy::missing_const_for_thread_local)]
mod renders {
    thread_local! {
        pub(super) static RENDERS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }
}
use renders::RENDERS;

/// Provision trees rendered by this thread so far: `up` reports it (`--json` event `run_counts`) to show the tree
/// is rendered once per run.
pub fn renders_in_thread() -> usize {
    RENDERS.with(|c| c.get())
}

/// Render a template tree with explicit secrets (pure apart from reading `source`).
pub fn render_tree<S: Serialize + ?Sized>(cfg: &Config, source: &Path, secrets: &S) -> Result<Rendered> {
    render_layers(cfg, &[source.to_path_buf()], secrets)
}

/// The files of stacked template trees by relative path: a later layer's file replaces an earlier one's.
/// Links, FIFOs and devices are refused in every layer, and `vars.toml` is left out.
fn layer_files(layers: &[PathBuf]) -> Result<BTreeMap<String, (PathBuf, std::fs::Metadata)>> {
    let mut files = BTreeMap::new();
    for source in layers {
        for entry in walkdir::WalkDir::new(source).sort_by_file_name() {
            let entry = entry.with_context(|| format!("walk {}", source.display()))?;
            if entry.depth() == 0 || entry.file_type().is_dir() {
                continue;
            }
            let meta = entry.metadata()?;
            if !entry.file_type().is_file() {
                return Err(not_a_file(entry.path(), &meta));
            }
            let rel = rel_slash(entry.path().strip_prefix(source).expect("under source"))?;
            if rel != VARS_FILE {
                files.insert(rel, (entry.into_path(), meta));
            }
        }
    }
    Ok(files)
}

/// Render stacked template trees (`[provision] base`, then `source`) with explicit secrets.
pub fn render_layers<S: Serialize + ?Sized>(
    cfg: &Config,
    layers: &[PathBuf],
    secrets: &S,
) -> Result<Rendered> {
    RENDERS.with(|c| c.set(c.get() + 1));
    if let Some(source) = layers.iter().find(|l| !l.is_dir()) {
        bail!(
            "provision source {} is not a directory; set [provision] source (or base) in {} to the lab's \
             template tree",
            source.display(),
            cfg.path.display()
        );
    }
    let ctx = context(cfg, layers, secrets)?;
    let hb_ctx = handlebars::Context::wraps(&ctx).context("build the template context")?;
    // Bounds on the templates' output, checked as it is written (see [`Bounded`]).
    let (mut total_left, deadline) = (MAX_RENDERED_TOTAL, std::time::Instant::now() + MAX_RENDER_TIME);
    let mut hb = Handlebars::new();
    hb.set_strict_mode(true);
    // `{{#if (has LIST "item")}}`: whether a list (e.g. `cluster.profiles`) holds an item.
    handlebars::handlebars_helper!(has: |list: array, item: str| list.iter().any(|v| v.as_str() == Some(item)));
    hb.register_helper("has", Box::new(has));
    // `{{image vars.x_image}}`: the reference an image is pulled by, through `[provision] registry_proxies`.
    hb.register_helper("image", Box::new(ImageHelper(cfg.provision.clone())));
    hb.register_escape_fn(handlebars::no_escape);
    let mut files = Vec::new();
    let mut registered = std::collections::HashMap::new();
    // Output path -> the file it came from: two files may not render to one path.
    let mut sources: BTreeMap<String, PathBuf> = BTreeMap::new();
    for (rel_str, (file, meta)) in layer_files(layers)? {
        let raw = read_no_follow(&file)?;
        // setuid, setgid and sticky bits are dropped: a lab has no use for them.
        let mode = crate::platform::mode_or_guess(&meta, &raw) & 0o777;
        let (path, contents) = match rel_str.strip_suffix(TEMPLATE_SUFFIX) {
            Some(out) => {
                let text = String::from_utf8(raw).map_err(|_| {
                    anyhow!("{}: template is not UTF-8; save it as UTF-8", shown(&file.display().to_string()))
                })?;
                let name = file.display().to_string();
                partials::check_nesting(&text).map_err(|(line, e)| {
                    anyhow!(
                        "{}:{line}: {e}\nhint: flatten the template (or split it into partials)",
                        shown(&name)
                    )
                })?;
                // Parsed once: the same tree is checked, registered and kept for later templates' partial checks.
                let ast = handlebars::Template::compile_with_name(&text, name.clone())
                    .map_err(|e| template_error(&shown(&name), e))?;
                partials::check(&name, &ast, &registered).map_err(|e| {
                    let hint = if e.contains("\nhint:") {
                        ""
                    } else {
                        "\nhint: a partial may include other partials, but none may include itself, directly or \
                         through others"
                    };
                    anyhow!("{}: {e}{hint}", shown(&name))
                })?;
                hb.register_template(&name, ast.clone());
                registered.insert(name.clone(), ast);
                let mut sink = Bounded::new(total_left, deadline);
                let result = hb.render_with_context_to_write(&name, &hb_ctx, &mut sink);
                if let Some(over) = sink.over {
                    return Err(over.error(&shown(&name)));
                }
                result.map_err(|e| render_error(&shown(&name), e))?;
                total_left -= sink.buf.len();
                (out.to_string(), sink.buf)
            }
            None => (rel_str, raw),
        };
        if let Some(bad) = path.split('/').find(|c| c.is_empty() || *c == "." || *c == "..") {
            bail!(
                "{}: renders to the file name \"{bad}\", which cannot be written\nhint: rename it; a template \
                 NAME.hbs renders to NAME, so `.hbs`, `..hbs` and `...hbs` name nothing usable",
                shown(&file.display().to_string())
            );
        }
        if let Some(first) = sources.insert(path.clone(), file.clone()) {
            bail!(
                "{} and {} both render to {path}\nhint: keep one of them (NAME.hbs renders to NAME; to replace a \
                 file of [provision] base, give the overriding file the same name, suffix included)",
                shown(&first.display().to_string()),
                shown(&file.display().to_string())
            );
        }
        // Secrets files are private however they sit in the tree, and docker compose reads them as ASCII lines.
        let (contents, mode) = if path.rsplit('/').next() == Some(".env") {
            (env_file(&shown(&file.display().to_string()), contents)?, 0o600)
        } else {
            (contents, mode)
        };
        files.push(RenderedFile { path, contents, mode });
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(Rendered { files })
}

/// Most bytes one template may render to (the lab's largest renders to about 10 KiB).
pub const MAX_RENDERED_FILE: usize = 8 << 20;
/// Most bytes all templates of a tree may render to together.
pub const MAX_RENDERED_TOTAL: usize = 32 << 20;
/// Longest time rendering a tree's templates may take (the lab's take milliseconds).
pub const MAX_RENDER_TIME: std::time::Duration = std::time::Duration::from_secs(10);

/// Which bound a template passed.
#[derive(Debug, Clone, Copy)]
enum Over {
    File,
    Total,
    Time,
}

impl Over {
    fn error(self, template: &str) -> anyhow::Error {
        let what = match self {
            Over::File => format!("renders to more than {} MiB", MAX_RENDERED_FILE >> 20),
            Over::Total => format!(
                "takes the rendered templates of the tree past {} MiB together",
                MAX_RENDERED_TOTAL >> 20
            ),
            Over::Time => format!("took more than {} s to render", MAX_RENDER_TIME.as_secs()),
        };
        anyhow!(
            "{template}: {what}; rendering stopped there\nhint: a partial included many times over (or a loop over \
             a large value) multiplies the output; include partials fewer times, or copy a large file without \
             the .hbs suffix (the limits are fixed: {} MiB per template, {} MiB in all, {} s)",
            MAX_RENDERED_FILE >> 20,
            MAX_RENDERED_TOTAL >> 20,
            MAX_RENDER_TIME.as_secs()
        )
    }
}

/// The output of one template: refuses a write that passes [`MAX_RENDERED_FILE`], the tree's bytes left, or the
/// deadline, so a template that multiplies its output (partials within partials) stops at the bound instead of
/// filling memory first. `over` says which bound stopped it.
struct Bounded {
    buf: Vec<u8>,
    limit: usize,
    total_left: usize,
    deadline: std::time::Instant,
    over: Option<Over>,
}

impl Bounded {
    fn new(total_left: usize, deadline: std::time::Instant) -> Self {
        Self { buf: Vec::new(), limit: MAX_RENDERED_FILE, total_left, deadline, over: None }
    }
}

impl std::io::Write for Bounded {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let len = self.buf.len() + data.len();
        self.over = if len > self.limit {
            Some(Over::File)
        } else if len > self.total_left {
            Some(Over::Total)
        } else if std::time::Instant::now() > self.deadline {
            Some(Over::Time)
        } else {
            None
        };
        if self.over.is_some() {
            return Err(std::io::Error::other("template output bound passed"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
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

/// The error for anything in the provision tree that is not a regular file or a directory.
fn not_a_file(path: &Path, meta: &std::fs::Metadata) -> anyhow::Error {
    let shown_path = shown(&path.display().to_string());
    if meta.file_type().is_symlink() {
        anyhow!(
            "{shown_path} is a symbolic link; the provision tree must hold regular files and directories only (a \
             link could pull files from outside it into the guest)\nhint: replace the link with a copy of the file \
             it points to"
        )
    } else {
        anyhow!(
            "{shown_path} is not a regular file (a FIFO, socket or device); the provision tree must hold regular \
             files and directories only\nhint: remove it from the tree"
        )
    }
}

/// Read a file, refusing to follow a symbolic link put in its place since it was looked at.
fn read_no_follow(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut f = crate::platform::open_no_follow(path)
        .with_context(|| format!("read {}", shown(&path.display().to_string())))?;
    if !f.metadata()?.is_file() {
        bail!("{} is not a regular file", shown(&path.display().to_string()));
    }
    let mut buf = Vec::new();
    f.read_to_end(&mut buf).with_context(|| format!("read {}", shown(&path.display().to_string())))?;
    Ok(buf)
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
        "{pos}: template syntax error: {}\nhint: a literal `{{{{` (e.g. a Go template in a shipped config file) is written `\\{{{{` \
         in a .hbs file; or keep the file without the .hbs suffix",
        shown(&e.reason().to_string())
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
            format!("undefined variable `{}`", shown(var.as_deref().unwrap_or("?"))),
            "\nhint: define the variable under [vars] in box-config.toml (or in the lab's vars.toml), or fix its name",
        ),
        other => (shown(&other.to_string()), ""),
    };
    anyhow!("{pos}: {reason}{hint}")
}

/// Helper for tests and `render --out`: render and write.
pub fn render_to_dir<S: Serialize + ?Sized>(
    cfg: &Config,
    secrets: &S,
    out: &Path,
    force: bool,
) -> Result<Rendered> {
    let r = render_config(cfg, secrets)?;
    r.write_to(out, force)?;
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::{Duration, Instant};

    #[test]
    fn the_bounded_output_stops_at_each_bound() {
        let later = Instant::now() + Duration::from_secs(60);
        let mut w = Bounded::new(MAX_RENDERED_TOTAL, later);
        w.write_all(&vec![b'x'; MAX_RENDERED_FILE]).unwrap();
        assert!(w.write_all(b"y").is_err() && matches!(w.over, Some(Over::File)));
        assert_eq!(w.buf.len(), MAX_RENDERED_FILE, "nothing past the bound is kept");
        let mut w = Bounded::new(10, later);
        assert!(w.write_all(&[0; 11]).is_err() && matches!(w.over, Some(Over::Total)));
        let mut w = Bounded::new(MAX_RENDERED_TOTAL, Instant::now() - Duration::from_millis(1));
        assert!(w.write_all(b"z").is_err() && matches!(w.over, Some(Over::Time)));
        let e = Over::Time.error("t.hbs").to_string();
        assert!(
            e.starts_with("t.hbs: took more than 10 s to render; rendering stopped there\nhint: "),
            "{e}"
        );
    }
}
