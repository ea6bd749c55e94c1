//! `provision`, `health`, `verify`.

use std::time::Duration;

use anyhow::Result;

use super::Ctx;
use crate::cli::{HealthArgs, ProvisionArgs, VerifyArgs};
use crate::config::Config;
use crate::machine::lock::MachineLock;
use crate::machine::StateDir;
use crate::ssh::Session;

use crate::lifecycle::session::connect;
use crate::lifecycle::{refuse_foreign, HEALTH_TIMEOUT};

/// Render, provision the guest and print the health table; returns the exit code.
fn provision_and_check(ctx: &Ctx, cfg: &Config, state: &StateDir, ssh: &Session, force: bool) -> Result<i32> {
    let ui = &ctx.ui;
    let lab = crate::guest::Lab::render(cfg, state, ctx.profile)?;
    // Most runs find the lab as it was: every check goes to the guest in one round trip.
    let project = crate::guest::compose::project_name(&cfg.machine.name);
    let sent = crate::guest::send_containers_list(ssh, &project, 2);
    ssh.prefetch(&crate::guest::warm_commands(cfg, &lab, sent), Duration::from_secs(60));
    crate::guest::provision(cfg, ssh, &lab, ui, force, None)?;
    let (available, unavailable) = lab.services(cfg);
    health_code(crate::health::check_services(
        cfg,
        ctx.profile,
        Some(ssh),
        ui,
        HEALTH_TIMEOUT,
        &available,
        &unavailable,
    )?)
}

fn health_code(healthy: bool) -> Result<i32> {
    Ok(if healthy { crate::exit::OK } else { crate::exit::UNHEALTHY })
}

pub(crate) fn provision(ctx: &Ctx, args: &ProvisionArgs) -> Result<i32> {
    let cfg = ctx.config()?;
    refuse_foreign(&cfg)?;
    let state = ctx.state(&cfg);
    let _lock = MachineLock::acquire(&state, "provision")?;
    let ssh = connect(&cfg, &state, Duration::from_secs(60))?;
    provision_and_check(ctx, &cfg, &state, &ssh, args.force)
}

pub(crate) fn health(ctx: &Ctx, args: &HealthArgs) -> Result<i32> {
    let cfg = ctx.config()?;
    refuse_foreign(&cfg)?;
    let state = ctx.state(&cfg);
    // Without SSH the HTTP probes still say something useful; the container column shows "?".
    let ssh = match connect(&cfg, &state, Duration::from_secs(20)) {
        Ok(s) => Some(s),
        Err(e) => {
            ctx.ui.warn(format!("container state unknown: {e:#}"));
            None
        }
    };
    health_code(crate::health::check(
        &cfg,
        ctx.profile,
        ssh.as_ref(),
        &ctx.ui,
        Duration::from_secs(args.timeout),
    )?)
}

/// `verify` where Prometheus runs on `monitor` and the demo app on `app` (the lab's alert path, [`crate::lab::verify`]).
pub(crate) fn verify_on(ctx: &Ctx, monitor: &Config, app: &Config, args: &VerifyArgs) -> Result<i32> {
    refuse_foreign(monitor)?;
    if app.machine.name != monitor.machine.name {
        refuse_foreign(app)?;
    }
    crate::lab::verify::run(&ctx.ui, monitor, app, args)
}
