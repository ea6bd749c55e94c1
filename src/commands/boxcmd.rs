//! `box list|build|remove`.

use anyhow::Result;

use super::Ctx;
use crate::boxes::{self, cache::short, Cache};
use crate::cli::BoxCommand;

pub fn run(ctx: &Ctx, cmd: BoxCommand) -> Result<i32> {
    match cmd {
        BoxCommand::List => list(ctx),
        BoxCommand::Build { force } => build(ctx, force),
        BoxCommand::Remove { id } => remove(ctx, &id),
    }
}

fn list(ctx: &Ctx) -> Result<i32> {
    let cache = Cache::open()?;
    let boxes = cache.list()?;
    if ctx.global.json {
        println!("{}", serde_json::to_string(&boxes)?);
        return Ok(0);
    }
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

fn remove(ctx: &Ctx, id: &str) -> Result<i32> {
    let cache = Cache::open()?;
    let gone = cache.remove(id, &ctx.ui)?;
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
