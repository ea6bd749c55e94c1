//! `box list|build|remove`: cached boxes, and the cached labs made from them.

use anyhow::Result;

use super::Ctx;
use crate::boxes::lab::{LabMeta, Labs};
use crate::boxes::{self, cache::short, Cache};
use crate::cli::BoxCommand;

pub(crate) fn run(ctx: &Ctx, cmd: BoxCommand) -> Result<i32> {
    match cmd {
        BoxCommand::List => list(ctx),
        BoxCommand::Build { force } => build(ctx, force),
        BoxCommand::Remove { id, host: None } => remove(ctx, &id),
        BoxCommand::Remove { id, host: Some(uri) } => remove_remote(ctx, &id, &uri),
        BoxCommand::Upload { host } => upload(ctx, host.as_deref()),
    }
}

fn list(ctx: &Ctx) -> Result<i32> {
    let cache = Cache::open()?;
    let boxes = cache.list()?;
    let labs = Labs::open()?.list()?;
    if ctx.global.json {
        // Boxes stay a JSON array (as before); cached labs are JSON lines after it, tagged.
        println!("{}", serde_json::to_string(&boxes)?);
        for l in &labs {
            println!("{}", serde_json::json!({"lab": l}));
        }
        return Ok(0);
    }
    print_labs(&labs);
    if boxes.is_empty() {
        ctx.ui.info(format!("no cached boxes in {}", cache.root.display()));
        return Ok(0);
    }
    println!("{:<12}  {:<10}  {:<6}  {:>9}  {:<20}  SOURCE", "ID", "PROVIDER", "FORMAT", "SIZE", "CREATED");
    for b in &boxes {
        println!(
            "{:<12}  {:<10}  {:<6}  {:>9}  {:<20}  {}",
            short(&b.id),
            b.provider,
            b.format,
            human_size(b.size),
            b.created,
            b.source
        );
    }
    Ok(0)
}

/// Cached labs (restored by `up` instead of provisioning), one line each, on stdout before the boxes.
fn print_labs(labs: &[LabMeta]) {
    if labs.is_empty() {
        return;
    }
    println!("{:<12}  {:<10}  {:<12}  {:>9}  {:<20}  PROJECT", "LAB", "MACHINE", "BOX", "SIZE", "CREATED");
    for l in labs {
        println!(
            "{:<12}  {:<10}  {:<12}  {:>9}  {:<20}  {}",
            short(&l.key),
            l.machine,
            short(&l.box_id),
            human_size(l.size),
            l.created,
            l.project_dir
        );
    }
    println!();
}

fn build(ctx: &Ctx, force: bool) -> Result<i32> {
    let cfg = ctx.config()?;
    let provider = crate::provider::select(&cfg)?;
    let start = std::time::Instant::now();
    let (image, built) = boxes::ensure_ui(&cfg, provider.name(), force, &ctx.ui)?;
    if ctx.global.json {
        println!(
            "{}",
            serde_json::json!({
                "id": image.id, "built": built, "format": image.format, "disk": image.disk,
                "kernel": image.kernel, "initrd": image.initrd, "cmdline": image.cmdline,
                "seconds": start.elapsed().as_secs_f64(),
            })
        );
    } else {
        ctx.ui.info(format!(
            "box {} {} in {:.1}s: {}",
            short(&image.id),
            if built { "built" } else { "already cached" },
            start.elapsed().as_secs_f64(),
            image.disk.display()
        ));
    }
    Ok(0)
}

/// The remote libvirt host of `uri` (or the config's), with the config's pool.
fn remote_host(ctx: &Ctx, uri: Option<&str>) -> Result<crate::provider::libvirt::Libvirt> {
    let (cfg_uri, pool) = match ctx.config() {
        Ok(cfg) => (cfg.libvirt.uri.clone(), cfg.libvirt.pool.clone()),
        Err(_) if uri.is_some() => (String::new(), crate::config::default_libvirt_pool()),
        Err(e) => return Err(e),
    };
    let uri = uri.unwrap_or(&cfg_uri);
    crate::provider::libvirt::Libvirt::for_remote_uri(uri, &pool)
}

fn upload(ctx: &Ctx, uri: Option<&str>) -> Result<i32> {
    let cfg = ctx.config()?;
    let lv = remote_host(ctx, uri)?;
    let (image, _) = boxes::ensure_ui(&cfg, "libvirt", false, &ctx.ui)?;
    let start = std::time::Instant::now();
    let sent = lv.upload_box(&image)?;
    let secs = start.elapsed().as_secs_f64();
    if ctx.global.json {
        println!(
            "{}",
            serde_json::json!({"id": image.id, "host": lv.uri(), "bytes_sent": sent, "secs": secs})
        );
    } else {
        println!("box {} on {}: {sent} bytes sent in {secs:.2} s", short(&image.id), lv.uri());
    }
    Ok(0)
}

fn remove_remote(ctx: &Ctx, id: &str, uri: &str) -> Result<i32> {
    if id.len() < 4 || !id.chars().all(|c| c.is_ascii_hexdigit()) {
        anyhow::bail!(
            "{id:?} is not a box id\nhint: give at least 4 hex digits of the id (`provisioner box list`)"
        );
    }
    let lv = remote_host(ctx, Some(uri))?;
    let gone = lv.remove_box(id)?;
    if gone.is_empty() {
        anyhow::bail!(
            "no box {id} in the pool of {uri}\nhint: the box volumes are named box-<id>...; `virsh -c URI vol-list \
             --pool POOL` lists them"
        );
    }
    ctx.ui.info(format!("removed {} from {uri}: {}", id, gone.join(", ")));
    Ok(0)
}

fn remove(ctx: &Ctx, id: &str) -> Result<i32> {
    let cache = Cache::open()?;
    let labs = Labs::open()?;
    // An id is a box's or a cached lab's (both are 64 hex digits; a prefix matching both is ambiguous).
    let is_lab = labs.list()?.iter().any(|l| l.key.starts_with(id));
    let is_box = cache.list()?.iter().any(|b| b.id.starts_with(id));
    if is_lab && is_box {
        anyhow::bail!("{id:?} matches a cached box and a cached lab; give more of the id");
    }
    if is_lab {
        let gone = labs.remove(id)?;
        ctx.ui.info(format!(
            "removed cached lab {} of {} ({}); a machine restored from it must be destroyed and created again",
            short(&gone.key),
            gone.project_dir,
            human_size(gone.size)
        ));
        ctx.ui.event("lab_removed", serde_json::json!({"key": gone.key}));
        return Ok(0);
    }
    let gone = cache.remove(id, &ctx.ui)?;
    // A lab's disk is an overlay on its box: it goes with it.
    for l in labs.list()?.into_iter().filter(|l| l.box_id == gone.id) {
        labs.remove(&l.key)?;
        ctx.ui.info(format!("removed cached lab {} (made from this box)", short(&l.key)));
    }
    ctx.ui.info(format!(
        "removed box {} ({}, {}); machines created from it must be destroyed and created again",
        short(&gone.id),
        gone.source,
        human_size(gone.size)
    ));
    ctx.ui.event("box_removed", serde_json::json!({"id": gone.id}));
    Ok(0)
}

fn human_size(bytes: u64) -> String {
    let mb = bytes as f64 / (1u64 << 20) as f64;
    if mb >= 1024.0 {
        format!("{:.1} GiB", mb / 1024.0)
    } else {
        format!("{mb:.1} MiB")
    }
}
