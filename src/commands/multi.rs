//! Vagrant's multi-machine semantics over the single-machine commands: pick the machines a command acts on (all,
//! or the named ones), run it for each with the machine's own [`Ctx`] (its config; output labelled with its
//! name; `"machine"` in every JSON event), concurrently where the work is long (`up`, `halt`, `reload`,
//! `provision`, `destroy`, and the hypervisor queries of `status`), and report per machine.
//!
//! A file with one `[machine]` table goes straight to the single-machine command, as before.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde_json::json;

use super::Ctx;
use crate::cli::DestroyArgs;
use crate::config::{Config, Project};

/// A command body for one machine.
type Body<'a> = &'a (dyn Fn(&Ctx) -> Result<i32> + Sync);

/// The project behind --config when it is a `[[machine]]` file; None for a single-machine file (whose commands
/// keep their own loading, including the lenient one of `status`, `halt` and `destroy`).
fn multi_project(ctx: &Ctx, names: &[String]) -> Result<Option<Project>> {
    if !Project::is_multi_file(&ctx.global.config) {
        if !names.is_empty() {
            // Names still have to match the one machine.
            let (cfg, _) = Config::load_lenient(&ctx.global.config)?;
            let project = Project { path: ctx.global.config.clone(), machines: vec![cfg], multi: false };
            project.select(names)?;
        }
        return Ok(None);
    }
    Ok(Some(Project::load(&ctx.global.config)?))
}

/// One machine: the named one, else the primary or the only one.
pub fn one(ctx: &Ctx, name: Option<&str>, f: &dyn Fn(&Ctx) -> Result<i32>) -> Result<i32> {
    let names: Vec<String> = name.map(str::to_string).into_iter().collect();
    match multi_project(ctx, &names)? {
        None => f(ctx),
        Some(p) => f(&ctx.for_machine(p.one(name)?, None)),
    }
}

/// Each selected machine in turn (short commands whose output is per machine: `ssh-config`, `health`).
/// Every machine is tried; the worst exit code wins and a failure names its machine.
pub fn each(ctx: &Ctx, names: &[String], f: Body) -> Result<i32> {
    let Some(p) = multi_project(ctx, names)? else { return f(ctx) };
    let mut worst = crate::exit::OK;
    let mut failed = Vec::new();
    for cfg in p.select(names)? {
        let mctx = ctx.for_machine(cfg, None);
        match f(&mctx) {
            Ok(code) => worst = worst.max(code),
            Err(e) => {
                mctx.ui.warn(format!("failed: {e:#}"));
                failed.push(cfg.machine.name.clone());
            }
        }
    }
    if !failed.is_empty() {
        bail!("failed on {}\nhint: the messages above say why, per machine", failed.join(", "));
    }
    Ok(worst)
}

/// The default of `--parallel`: every machine at once, at most one per host core, but at least 2. Pure.
pub fn default_parallel(machines: usize, cores: usize) -> usize {
    machines.min(cores).max(2)
}

/// How one machine's run ended.
struct Outcome {
    machine: String,
    result: Result<i32>,
    took: Duration,
}

/// The selected machines concurrently, at most `parallel` at once; one failing does not stop the others. Ends
/// with a summary table (machine, result, time); the error names every machine that failed.
pub fn parallel(ctx: &Ctx, names: &[String], parallel: Option<u32>, what: &str, f: Body) -> Result<i32> {
    let Some(p) = multi_project(ctx, names)? else { return f(ctx) };
    let selected = p.select(names)?;
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    let width = parallel.map(|n| n as usize).unwrap_or_else(|| default_parallel(selected.len(), cores));
    ctx.ui.event(
        "parallel",
        json!({"command": what, "machines": p.names(), "parallel": width, "cores": cores}),
    );
    let bars = ctx.ui.multi_progress();
    let queue = Mutex::new(selected.iter().copied().collect::<std::collections::VecDeque<&Config>>());
    let outcomes = Mutex::new(Vec::<Outcome>::new());
    std::thread::scope(|s| {
        for _ in 0..width.min(selected.len()) {
            s.spawn(|| loop {
                // After Ctrl-C no further machine is started (the running ones stop at their next step).
                if crate::process::interrupted().is_some() {
                    return;
                }
                let Some(cfg) = queue.lock().expect("queue").pop_front() else { return };
                let mctx = ctx.for_machine(cfg, bars.as_ref());
                let start = Instant::now();
                let result = f(&mctx);
                if let Err(e) = &result {
                    mctx.ui.warn(format!("{what} failed: {e:#}"));
                }
                mctx.ui.event(
                    "machine_done",
                    json!({"command": what, "ok": matches!(result, Ok(0)), "exit_code": exit_of(&result),
                           "seconds": start.elapsed().as_secs_f64()}),
                );
                outcomes.lock().expect("outcomes").push(Outcome {
                    machine: cfg.machine.name.clone(),
                    result,
                    took: start.elapsed(),
                });
            });
        }
    });
    let mut outcomes = outcomes.into_inner().expect("outcomes");
    for cfg in queue.into_inner().expect("queue") {
        let result = Err(anyhow::anyhow!("not started: the command was interrupted"));
        outcomes.push(Outcome { machine: cfg.machine.name.clone(), result, took: Duration::ZERO });
    }
    outcomes.sort_by_key(|o| p.names().iter().position(|n| *n == o.machine));
    if let Some(b) = &bars {
        let _ = b.clear();
    }
    if !ctx.ui.json() {
        eprint!("{}", summary_table(&outcomes));
    }
    let failed: Vec<&str> =
        outcomes.iter().filter(|o| o.result.is_err()).map(|o| o.machine.as_str()).collect();
    if !failed.is_empty() {
        bail!(
            "{what} failed on {} of {} machines: {}\nhint: the messages above say why, per machine; fix it and run \
             `provisioner {what} {}` again (the other machines are left as they are)",
            failed.len(),
            outcomes.len(),
            failed.join(", "),
            failed.join(" ")
        );
    }
    let worst =
        outcomes.iter().filter_map(|o| o.result.as_ref().ok().copied()).max().unwrap_or(crate::exit::OK);
    if worst != crate::exit::OK {
        let bad: Vec<&str> = outcomes
            .iter()
            .filter(|o| o.result.as_ref().is_ok_and(|c| *c != 0))
            .map(|o| o.machine.as_str())
            .collect();
        ctx.ui.warn(format!("{what}: not healthy on {}", bad.join(", ")));
    }
    Ok(worst)
}

fn exit_of(r: &Result<i32>) -> i32 {
    match r {
        Ok(c) => *c,
        Err(_) => crate::exit::FAILURE,
    }
}

/// `MACHINE  RESULT  TIME` for the end of a parallel command.
fn summary_table(outcomes: &[Outcome]) -> String {
    let rows: Vec<(String, String, String)> = outcomes
        .iter()
        .map(|o| {
            let result = match &o.result {
                Ok(0) => "ok".to_string(),
                Ok(crate::exit::UNHEALTHY) => "unhealthy".to_string(),
                Ok(c) => format!("exit {c}"),
                Err(e) => {
                    let first = format!("{e}");
                    format!(
                        "failed: {}",
                        first.lines().next().unwrap_or("").chars().take(70).collect::<String>()
                    )
                }
            };
            (o.machine.clone(), result, format!("{:.1}s", o.took.as_secs_f64()))
        })
        .collect();
    table(
        &["MACHINE", "RESULT", "TIME"],
        &rows.iter().map(|r| vec![r.0.clone(), r.1.clone(), r.2.clone()]).collect::<Vec<_>>(),
    )
}

/// A left-aligned text table. Pure.
fn table(head: &[&str], rows: &[Vec<String>]) -> String {
    let mut w: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<width$}  ", width = w[i]));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(head.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

/// `status`: one table row per machine; the hypervisor is asked for every machine at once (one query each).
pub fn status(ctx: &Ctx, names: &[String]) -> Result<i32> {
    let Some(p) = multi_project(ctx, names)? else { return super::lifecycle::status(ctx) };
    let selected = p.select(names)?;
    let rows: Vec<Result<super::lifecycle::StatusRow>> = std::thread::scope(|s| {
        let handles: Vec<_> = selected
            .iter()
            .map(|cfg| s.spawn(move || super::lifecycle::status_row(&ctx.for_machine(cfg, None))))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("status panicked"))))
            .collect()
    });
    let mut cells = Vec::new();
    let mut docs = Vec::new();
    for (cfg, row) in selected.iter().zip(rows) {
        let ip = cfg.member.as_ref().map(|m| m.ip.to_string()).unwrap_or_default();
        let r = row.unwrap_or_else(|e| super::lifecycle::StatusRow::error(&cfg.machine.name, &e));
        docs.push(
            json!({"machine": r.machine, "state": r.state, "provider": r.provider, "ssh": r.ssh, "ip": ip,
                         "vm_name": r.vm_name, "error": r.error}),
        );
        cells.push(vec![
            r.machine.clone(),
            r.state.clone(),
            r.provider.clone().unwrap_or_else(|| "-".into()),
            ip,
            r.ssh.clone().unwrap_or_else(|| "-".into()),
            r.error.clone().unwrap_or_default(),
        ]);
    }
    if ctx.ui.json() {
        println!("{}", json!({"machines": docs}));
    } else {
        print!("{}", table(&["MACHINE", "STATE", "PROVIDER", "IP", "SSH", ""], &cells));
    }
    Ok(crate::exit::OK)
}

/// `destroy [-f] [NAME...]`: one confirmation for the lot, then every machine concurrently.
pub fn destroy(ctx: &Ctx, args: &DestroyArgs) -> Result<i32> {
    let Some(p) = multi_project(ctx, &args.machines)? else { return super::lifecycle::destroy(ctx, args) };
    let selected: Vec<String> = p.select(&args.machines)?.iter().map(|c| c.machine.name.clone()).collect();
    if !args.force
        && !super::lifecycle::confirm(&format!(
            "Destroy machines {} and all their data?",
            selected.join(", ")
        ))?
    {
        ctx.ui.info("not destroyed");
        return Ok(crate::exit::FAILURE);
    }
    let forced = DestroyArgs { machines: Vec::new(), force: true };
    let code = parallel(ctx, &selected, None, "destroy", &|c| super::lifecycle::destroy(c, &forced))?;
    // Nothing of the project is left once its last machine is gone.
    let machines_dir = crate::machine::StateDir::beside(&p.path).root.join(crate::machine::MACHINES_DIR);
    if std::fs::read_dir(&machines_dir).is_ok_and(|mut d| d.next().is_none()) {
        let _ = std::fs::remove_dir(&machines_dir);
        let _ = std::fs::remove_file(crate::machine::StateDir::beside(&p.path).path(PROJECT_LOCK));
        let _ = std::fs::remove_dir(crate::machine::StateDir::beside(&p.path).root);
    }
    Ok(code)
}

/// `verify [NAME]`: Prometheus on the machine that forwards it, load on the named machine's demo app (default:
/// the first machine that forwards the demo app).
pub fn verify(ctx: &Ctx, args: &crate::cli::VerifyArgs) -> Result<i32> {
    let names: Vec<String> = args.machine.iter().cloned().collect();
    let Some(p) = multi_project(ctx, &names)? else { return super::provision::verify(ctx, args) };
    let forwards = |c: &&Config, port: u16| c.host_addr_for(port).is_some();
    let monitor = p.machines.iter().find(|c| forwards(c, 9090)).ok_or_else(|| {
        anyhow::anyhow!(
            "no machine of {} forwards Prometheus (guest port 9090)\nhint: add a [[machine.forward]] with guest = \
             9090 to the machine that runs it",
            p.path.display()
        )
    })?;
    let app = match &args.machine {
        Some(_) => p.select(&names)?[0],
        None => p.machines.iter().find(|c| forwards(c, super::load::DEMO_APP_PORT)).ok_or_else(|| {
            anyhow::anyhow!(
                "no machine of {} forwards the demo app (guest port 8000)\nhint: add a [[machine.forward]] with \
                 guest = 8000 to an app machine",
                p.path.display()
            )
        })?,
    };
    let actx = ctx.for_machine(app, None);
    super::provision::verify_on(&actx, monitor, app, args)
}

/// The project lock file in `.provisioner/`, held while the project's private network is set up.
pub const PROJECT_LOCK: &str = "project.lock";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parallel_default_is_bounded_by_cores_but_at_least_two() {
        assert_eq!(default_parallel(3, 2), 2);
        assert_eq!(default_parallel(3, 8), 3);
        assert_eq!(default_parallel(1, 8), 2);
        assert_eq!(default_parallel(5, 1), 2);
    }

    #[test]
    fn tables_align_columns() {
        let t = table(&["A", "BB"], &[vec!["long-name".into(), "x".into()], vec!["b".into(), "yy".into()]]);
        assert_eq!(t, "A          BB\nlong-name  x\nb          yy\n");
    }
}
