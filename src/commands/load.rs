//! `provisioner load`: bounded traffic at the demo app.

use std::time::Duration;

use anyhow::{anyhow, bail, Result};

use super::Ctx;
use crate::cli::LoadArgs;
use crate::lab::loadgen::{self, Plan};

pub(crate) use crate::lab::DEMO_APP_PORT;

pub(crate) fn load(ctx: &Ctx, args: &LoadArgs) -> Result<i32> {
    let url = match &args.url {
        Some(u) => u.clone(),
        None => {
            let cfg = ctx.config()?;
            crate::lifecycle::refuse_foreign(&cfg)?;
            let (ip, port) = cfg.host_addr_for(DEMO_APP_PORT).ok_or_else(|| {
                anyhow!(
                    "{} forwards no host port to the demo app (guest port {DEMO_APP_PORT})\n\
                     hint: add a [[forward]] with guest = {DEMO_APP_PORT}, or pass --url http://HOST:PORT",
                    cfg.path.display()
                )
            })?;
            // A machine on a remote libvirt host: its forwards are mirrored here for this run.
            let state = ctx.state(&cfg);
            if let Ok(ep) = crate::ssh::Endpoint::for_machine(&cfg, &state) {
                ep.open_tunnel()?;
            }
            format!("http://{ip}:{port}")
        }
    };
    let plan = Plan {
        url,
        requests: args.requests,
        duration: Duration::from_secs(args.duration),
        error_ratio: args.error_ratio,
        slow_ratio: args.slow_ratio,
        concurrency: args.concurrency,
        request_timeout: Duration::from_secs(15),
        pause: Duration::ZERO,
    };
    plan.validate()?;
    ctx.ui.info(format!(
        "sending up to {} requests for at most {}s to {} ({} workers)",
        plan.requests, args.duration, plan.url, plan.concurrency
    ));
    let summary = loadgen::run(&plan)?;
    if ctx.ui.json() {
        ctx.ui.event("load", serde_json::to_value(&summary)?);
    } else {
        print!("{}", summary.render());
    }
    if summary.answered() == 0 {
        bail!(
            "no request to {} got an answer ({})\nhint: is the lab up? run `provisioner up` or `provisioner health`; \
             check the forward of guest port {DEMO_APP_PORT} in box-config.toml",
            summary.url,
            summary.first_error.as_deref().unwrap_or("no request sent")
        );
    }
    Ok(0)
}
