//! Vagrant's multi-machine semantics over the single-machine commands: pick the machines a command acts on (all,
//! or the named ones), run it for each with the machine's own [`Ctx`] (its config; output labelled with its
//! name; `"machine"` in every JSON event), concurrently where the work is long (`up`, `halt`, `reload`,
//! `provision`, `destroy`, and the hypervisor queries of `status`), and report per machine.
//!
//! A file with one `[machine]` table goes straight to the single-machine command, as before.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde_json::json;

use super::Ctx;
use crate::cli::DestroyArgs;
use crate::config::{Config, Project};
use crate::lifecycle::round::{Judged, Round};
use crate::lifecycle::status::StatusRow;
use crate::machine::StateDir;

/// A command body for one machine.
type Body<'a> = &'a (dyn Fn(&Ctx) -> Result<i32> + Sync);

/// Commands that look after a machine that exists: a `[machine]` file that no longer validates must not lock the
/// user out of it (the machine is found from what still reads of the file and from its recorded state).
fn looks_after_existing(what: &str) -> bool {
    matches!(what, "status" | "port" | "halt" | "destroy")
}

/// The project behind --config, loaded once for the command (a `[machine]` file is a project of one), with the
/// named machines checked against it. `what` is the command: see [`looks_after_existing`].
fn project(ctx: &Ctx, names: &[String], what: &str) -> Result<(Project, Ctx)> {
    let path = &ctx.global.config;
    let (p, invalid) = if looks_after_existing(what) {
        // Not even the machine name reads: the state beside the file may still name the machine.
        Project::load_lenient(path, &|| crate::lifecycle::recorded_machine_name(path))?
    } else {
        (Project::load(path)?, None)
    };
    p.select(names)?;
    Ok((p, Ctx { invalid: invalid.map(Arc::new), ..ctx.clone() }))
}

/// One machine: the named one, else the primary or the only one.
pub(super) fn one(ctx: &Ctx, what: &str, name: Option<&str>, f: &dyn Fn(&Ctx) -> Result<i32>) -> Result<i32> {
    let names: Vec<String> = name.map(str::to_string).into_iter().collect();
    let (p, ctx) = project(ctx, &names, what)?;
    f(&ctx.for_member(&p, p.one(name)?, None))
}

/// Each selected machine in turn (short commands whose output is per machine: `ssh-config`, `health`).
/// Every machine is tried; the worst exit code wins and a failure names its machine (the machine of a `[machine]`
/// file, the only one, fails with its own error).
pub(super) fn each(ctx: &Ctx, names: &[String], f: Body) -> Result<i32> {
    let (p, ctx) = project(ctx, names, "each")?;
    let mut worst = crate::exit::OK;
    let mut failed = Vec::new();
    for cfg in p.select(names)? {
        let mctx = ctx.for_member(&p, cfg, None);
        match f(&mctx) {
            Ok(code) => worst = worst.max(code),
            Err(e) => {
                // The machine of a `[machine]` file (unlabelled) fails with its own error.
                let Some(name) = p.label_for(cfg) else { return Err(e) };
                mctx.ui.warn(format!("failed: {e:#}"));
                failed.push(name.to_string());
            }
        }
    }
    if !failed.is_empty() {
        bail!("failed on {}\nhint: the messages above say why, per machine", failed.join(", "));
    }
    Ok(worst)
}

/// The default of `--parallel`: every machine at once, at most one per host core, but at least 2. Pure.
pub(super) fn default_parallel(machines: usize, cores: usize) -> usize {
    machines.min(cores).max(2)
}

/// How one machine's run ended.
struct Outcome {
    machine: String,
    result: Result<i32>,
    took: Duration,
}

/// The machines the final round judges: none when no machine left anything out of its own verdict (every
/// verdict is final); else every machine whose own round ended healthy and whose run ended ok. Pure.
fn final_judgement(judged: &[Judged], ok: &dyn Fn(&str) -> bool) -> Vec<String> {
    if !judged.iter().any(|j| j.deferred) {
        return Vec::new();
    }
    judged.iter().filter(|j| ok(&j.machine)).map(|j| j.machine.clone()).collect()
}

/// The last health round of a [`Round`], once every machine's run has ended: every machine of [`final_judgement`]
/// judged with every target (in parallel, each with the usual deadline), then the captures that waited for it.
/// A machine's outcome becomes that verdict.
fn final_round(ctx: &Ctx, p: &Project, round: &Round, outcomes: &mut [Outcome]) {
    let judged = round.take_judged();
    let ok = |name: &str| outcomes.iter().any(|o| o.machine == name && matches!(o.result, Ok(0)));
    let names = final_judgement(&judged, &ok);
    if names.is_empty() || crate::process::interrupted().is_some() {
        return;
    }
    ctx.ui.info(format!(
        "every machine is up: final health round over {} (targets on other machines included)",
        names.join(", ")
    ));
    let results: Vec<(String, Result<i32>, Duration)> = std::thread::scope(|s| {
        let handles: Vec<_> = judged
            .iter()
            .filter(|j| names.contains(&j.machine))
            .filter_map(|j| p.machines.iter().find(|c| c.machine.name == j.machine).map(|cfg| (j, cfg)))
            .map(|(j, cfg)| {
                s.spawn(move || {
                    let mctx = ctx.for_member(p, cfg, None);
                    let start = Instant::now();
                    let result = mctx.machine().and_then(|m| m.final_health(&mctx.ui, j.capture.as_ref()));
                    if let Err(e) = &result {
                        mctx.ui.warn(format!("final health round failed: {e:#}"));
                    }
                    (j.machine.clone(), result, start.elapsed())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| (String::new(), Err(anyhow::anyhow!("panicked")), Duration::ZERO))
            })
            .collect()
    });
    for (machine, result, took) in results {
        if let Some(o) = outcomes.iter_mut().find(|o| o.machine == machine) {
            o.result = result;
            o.took += took;
        }
    }
}

/// The selected machines concurrently, at most `parallel` at once; one failing does not stop the others. Ends
/// with a summary table (machine, result, time); the error names every machine that failed. An `up` or
/// `reload` of several machines ends with a final health round over them ([`Round`]).
///
/// The machine of a `[machine]` file is the whole project: its command runs as it is, without the summary.
pub(super) fn parallel(
    ctx: &Ctx,
    names: &[String],
    parallel: Option<u32>,
    what: &str,
    f: Body,
) -> Result<i32> {
    let (p, ctx) = project(ctx, names, what)?;
    run_parallel(&ctx, &p, names, parallel, what, f)
}

/// [`parallel`] over a project already loaded.
fn run_parallel(
    ctx: &Ctx,
    p: &Project,
    names: &[String],
    parallel: Option<u32>,
    what: &str,
    f: Body,
) -> Result<i32> {
    let selected = p.select(names)?;
    if let Some(solo) = p.solo() {
        return f(&ctx.for_member(p, solo, None));
    }
    let round = (matches!(what, "up" | "reload") && selected.len() > 1)
        .then(|| Arc::new(Round::new(selected.iter().map(|c| c.machine.name.clone()).collect())));
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
                let mut mctx = ctx.for_member(p, cfg, bars.as_ref());
                mctx.round = round.clone();
                let start = Instant::now();
                let result = f(&mctx);
                if let Err(e) = &result {
                    mctx.ui.warn(format!("{what} failed: {e:#}"));
                }
                if round.is_none() {
                    machine_done(&mctx, what, &result, start.elapsed());
                }
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
    if let Some(round) = &round {
        final_round(ctx, p, round, &mut outcomes);
        // Each machine's result is known only now.
        for o in outcomes.iter().filter(|o| o.took > Duration::ZERO) {
            if let Some(cfg) = p.machines.iter().find(|c| c.machine.name == o.machine) {
                machine_done(&ctx.for_member(p, cfg, None), what, &o.result, o.took);
            }
        }
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

/// The `machine_done` event of one machine.
fn machine_done(mctx: &Ctx, what: &str, result: &Result<i32>, took: Duration) {
    mctx.ui.event(
        "machine_done",
        json!({"command": what, "ok": matches!(result, Ok(0)), "exit_code": exit_of(result),
               "seconds": took.as_secs_f64()}),
    );
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
pub(super) fn table(head: &[&str], rows: &[Vec<String>]) -> String {
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

/// `status`: the hypervisor is asked for every machine at once (one query each). A `[[machine]]` file shows one
/// table row per machine; the machine of a `[machine]` file is shown as its own line and forwards.
pub(super) fn status(ctx: &Ctx, names: &[String]) -> Result<i32> {
    let (p, ctx) = project(ctx, names, "status")?;
    let ctx = &ctx;
    let selected = p.select(names)?;
    let p = &p;
    let mut rows: Vec<Result<StatusRow>> = std::thread::scope(|s| {
        let handles: Vec<_> = selected
            .iter()
            .map(|cfg| {
                s.spawn(move || ctx.for_member(p, cfg, None).existing_machine().and_then(|m| m.status()))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("status panicked"))))
            .collect()
    });
    if p.solo().is_some() {
        let row = rows.pop().expect("the machine's row")?;
        super::lifecycle::print_status(ctx, &row);
        return Ok(crate::exit::OK);
    }
    let mut cells = Vec::new();
    let mut docs = Vec::new();
    for (cfg, row) in selected.iter().zip(rows) {
        let ip = cfg.member.as_ref().map(|m| m.ip.to_string()).unwrap_or_default();
        let r = row.unwrap_or_else(|e| StatusRow::error(&cfg.machine.name, &e));
        let ssh = r.table_ssh();
        docs.push(
            json!({"machine": r.machine, "state": r.state, "provider": r.provider, "ssh": ssh, "ip": ip,
                         "vm_name": r.vm_name, "error": r.error}),
        );
        cells.push(vec![
            r.machine.clone(),
            r.state.clone(),
            r.provider.clone().unwrap_or_else(|| "-".into()),
            ip,
            ssh.unwrap_or_else(|| "-".into()),
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

/// `destroy [-f] [NAME...]`: one confirmation for the lot, then every machine concurrently (the machine of a
/// `[machine]` file asks for itself, once its state is read).
pub(super) fn destroy(ctx: &Ctx, args: &DestroyArgs) -> Result<i32> {
    let (p, pctx) = project(ctx, &args.machines, "destroy")?;
    let selected: Vec<String> = p.select(&args.machines)?.iter().map(|c| c.machine.name.clone()).collect();
    // The machine of a `[machine]` file asks for itself (once its state is read); several are asked for at once.
    let forced = DestroyArgs { machines: Vec::new(), force: true };
    let (each, ask) = match p.solo() {
        Some(_) => (args, false),
        None => (&forced, !args.force),
    };
    if ask
        && !super::lifecycle::confirm(&format!(
            "Destroy machines {} and all their data?",
            selected.join(", ")
        ))?
    {
        pctx.ui.info("not destroyed");
        return Ok(crate::exit::FAILURE);
    }
    let code = run_parallel(&pctx, &p, &selected, None, "destroy", &|c| super::lifecycle::destroy(c, each))?;
    // Nothing of the project is left once its last machine is gone (only a `[[machine]]` file has machines/).
    let machines_dir = StateDir::beside(&p.path).root.join(crate::machine::MACHINES_DIR);
    if std::fs::read_dir(&machines_dir).is_ok_and(|mut d| d.next().is_none()) {
        let _ = std::fs::remove_dir(&machines_dir);
        let _ = std::fs::remove_file(StateDir::beside(&p.path).path(crate::machine::PROJECT_LOCK));
        let _ = std::fs::remove_dir(StateDir::beside(&p.path).root);
    }
    Ok(code)
}

/// `verify [NAME]`: the lab picks its machines ([`crate::lab::verify::pick`]), then its alert path runs on them.
/// The machine of a `[machine]` file is both.
pub(super) fn verify(ctx: &Ctx, args: &crate::cli::VerifyArgs) -> Result<i32> {
    let names: Vec<String> = args.machine.iter().cloned().collect();
    let (p, ctx) = project(ctx, &names, "verify")?;
    let named = || Ok(if args.machine.is_some() { Some(p.select(&names)?[0]) } else { None });
    let (monitor, app) = crate::lab::verify::machines_of(&p, named)?;
    super::provision::verify_on(&ctx.for_member(&p, app, None), monitor, app, args)
}

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

    fn cluster() -> Project {
        Project::load(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/cluster/box-config.toml"),
        )
        .unwrap()
    }

    fn target(instance: &str, health: &str) -> crate::health::Target {
        crate::health::Target {
            job: "node-exporter".into(),
            instance: instance.into(),
            health: health.into(),
            last_error: if health == "up" { String::new() } else { "connection refused".into() },
        }
    }

    /// The monitor's Prometheus, answering, with app2's node exporter still down.
    fn monitor_round(deferred_hosts: &[String]) -> crate::health::Report {
        let checked = [crate::health::Checked {
            service: "prometheus".into(),
            available: true,
            probe: Some(crate::health::ProbeResult {
                url: "http://127.0.0.1:19090/-/ready".into(),
                status: Some(200),
                latency_ms: Some(3),
                error: None,
            }),
            expect: 200,
        }];
        let running = crate::health::ContainerState { status: "running".into(), health: None, restarts: 0 };
        let containers = Some(std::collections::BTreeMap::from([("prometheus".to_string(), running)]));
        let targets =
            vec![target("localhost:9090", "up"), target("app1:9100", "up"), target("app2:9100", "down")];
        crate::health::assemble(
            &checked,
            &containers,
            Some(targets),
            &[],
            deferred_hosts,
            &crate::lab::PROFILE,
        )
    }

    #[test]
    fn a_target_on_a_machine_still_coming_up_is_judged_in_the_final_round() {
        let p = cluster();
        let monitor = p.one(Some("monitor")).unwrap();
        let round = Round::new(p.names().iter().map(|n| n.to_string()).collect());
        // The other machines of the run, as Prometheus' targets may name them; never the machine itself.
        let hosts = round.hosts_coming_up(monitor);
        assert_eq!(hosts, ["app1", "10.77.0.11", "app2", "10.77.0.12"]);

        // The monitor's own round: app2 is still being provisioned; its target does not fail the monitor.
        let own = monitor_round(&hosts);
        assert!(own.healthy, "{own:?}");
        assert_eq!(own.deferred.len(), 2);
        assert_eq!(
            own.services[0].detail,
            "targets 1/1 up; 2 target(s) on app1, app2 judged once every machine is up"
        );
        assert_eq!(own.targets.as_ref().unwrap().len(), 3, "every target is still shown");

        // The final round judges every target: app2's down target fails it, by name.
        let last = monitor_round(&[]);
        assert!(!last.healthy);
        assert!(last.deferred.is_empty());
        assert!(
            last.services[0].detail.contains("target node-exporter down (connection refused)"),
            "{last:?}"
        );

        // A run of the monitor alone defers nothing: the app machines are not coming up in it.
        let alone = Round::new(vec!["monitor".into()]);
        assert!(alone.hosts_coming_up(monitor).is_empty());
        assert!(!monitor_round(&alone.hosts_coming_up(monitor)).healthy);
    }

    #[test]
    fn the_final_round_judges_every_healthy_machine_once_one_deferred() {
        let j = |m: &str, deferred: bool| Judged { machine: m.into(), deferred, capture: None };
        let all_ok = |_: &str| true;
        // Nothing left out anywhere: every verdict is final, no final round.
        assert!(final_judgement(&[j("monitor", false), j("app1", false)], &all_ok).is_empty());
        // The monitor deferred: the whole project is judged again (app1 was stopped for its capture since).
        assert_eq!(final_judgement(&[j("monitor", true), j("app1", false)], &all_ok), ["monitor", "app1"]);
        // A machine whose run failed afterwards (or was unhealthy) is not judged again.
        let not_app1 = |m: &str| m != "app1";
        assert_eq!(final_judgement(&[j("monitor", true), j("app1", false)], &not_app1), ["monitor"]);
    }

    #[test]
    fn tables_align_columns() {
        let t = table(&["A", "BB"], &[vec!["long-name".into(), "x".into()], vec!["b".into(), "yy".into()]]);
        assert_eq!(t, "A          BB\nlong-name  x\nb          yy\n");
    }
}
