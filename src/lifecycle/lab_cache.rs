//! The cached clean lab inside `up`: look the machine up before it is created ([`plan`]), restore it instead of
//! booting ([`restore`]), and capture it after an `up` that created it and ended healthy ([`capture`]).
//! The store and its key are in [`crate::boxes::lab`].

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::json;

use crate::boxes::lab::{self, LabInputs, LabMeta, Labs};
use crate::config::{Config, ProviderKind};
use crate::guest::ContainerState;
use crate::machine::StateDir;
use crate::provider::{MachineSpec, Provider};
use crate::ssh::Session;
use crate::ui::Ui;

/// What `up` knows about the cache for a machine it is about to create.
#[derive(Debug, Clone)]
pub struct Plan {
    pub key: String,
    /// The entry to restore, when one matches.
    pub hit: Option<LabMeta>,
    /// Whether the machine was restored from `hit` (set by [`restore`]).
    pub restored: bool,
}

/// The cache key of the machine `up` is about to create, and its entry if cached. None when the config opts out
/// or the provider cannot restore captures (VirtualBox).
pub fn plan(
    cfg: &Config,
    vm_name: &str,
    provider: &str,
    accel: &str,
    box_id: &str,
    base_image: &str,
    ui: &Ui,
) -> Result<Option<Plan>> {
    if !cfg.machine.cache_lab || ProviderKind::parse(provider) != Some(ProviderKind::Libvirt) {
        return Ok(None);
    }
    let inputs = LabInputs {
        tool_version: env!("CARGO_PKG_VERSION").to_string(),
        provider: provider.to_string(),
        accel: accel.to_string(),
        vm_name: vm_name.to_string(),
        box_id: box_id.to_string(),
        base_image: base_image.to_string(),
        config: lab::config_fingerprint(cfg)?,
        tree: lab::tree_hash(&cfg.template_layers())?,
    };
    let key = lab::lab_key(&inputs);
    let (hit, dropped) = Labs::open()?.lookup(&key)?;
    if let Some(why) = &dropped {
        ui.warn(why);
    }
    ui.event("lab_cache", json!({"key": key, "hit": hit.is_some(), "dropped": dropped}));
    Ok(Some(Plan { key, hit, restored: false }))
}

/// Put the entry's keys and secrets into the state dir, before the seed and the machine are made from them.
pub fn install_keys(hit: &LabMeta, state: &StateDir) -> Result<()> {
    state.ensure()?;
    lab::copy_keys(&Labs::open()?.entry_dir(&hit.key).join("keys"), &state.root)?;
    if let Some(mode) = hit.images_mode.as_deref() {
        use crate::config::ImageSource;
        let mode = if mode == "registry" { ImageSource::Registry } else { ImageSource::Debian };
        let record = crate::guest::registry::ImagesRecord {
            resolved: Some(crate::guest::registry::Resolved {
                mode,
                reason: format!("the cached lab {} ran in this mode", crate::boxes::cache::short(&hit.key)),
            }),
            ..Default::default()
        };
        record.save(&state.root)?;
    }
    Ok(())
}

/// Whether a restored entry must be provisioned again: `images = "auto"` and the lab was cached in another mode
/// than registry mode (the pipeline then asks the registry, and says so when the mode changes).
pub fn recheck_mode(cfg: &Config, plan: &Plan) -> bool {
    cfg.provision.images == crate::config::ImageSource::Auto
        && plan.restored
        && plan.hit.as_ref().is_some_and(|h| h.images_mode.as_deref() != Some("registry"))
}

/// Create and run the machine from the entry (instead of create + start).
pub fn restore(p: &dyn Provider, spec: &MachineSpec, plan: &mut Plan, ui: &Ui) -> Result<()> {
    let Some(hit) = &plan.hit else { return Ok(()) };
    let ph = ui.phase("restore lab");
    p.lab_restore(spec, &Labs::open()?.entry_dir(&hit.key), &hit.provider_data).map_err(|e| {
        e.context(format!(
            "restore the cached lab {}\nhint: drop it with `provisioner box remove {}`, then `provisioner destroy -f` \
             and `provisioner up` take the full path",
            crate::boxes::cache::short(&hit.key),
            crate::boxes::cache::short(&hit.key)
        ))
    })?;
    plan.restored = true;
    let mode = hit.images_mode.as_deref().unwrap_or("unrecorded");
    ph.done(&format!(
        "cached lab {} ({mode} mode; provisioning skipped)",
        crate::boxes::cache::short(&hit.key)
    ));
    ui.event("lab_restored", json!({"key": hit.key}));
    Ok(())
}

/// Longest wait before a capture for the containers' first healthchecks: Docker (20.10) runs the first one an
/// `interval` (30 s in the lab) after a container starts, and a check may take its `timeout`.
const FIRST_CHECKS_WAIT: Duration = Duration::from_secs(45);

/// Whether no container still waits for its first Docker healthcheck (none `starting`). Pure.
pub(crate) fn first_checks_done(containers: &BTreeMap<String, ContainerState>) -> bool {
    containers.values().all(|c| c.health.as_deref() != Some("starting"))
}

/// Before the capture, wait (bounded, never failing) until every container's first healthcheck has run; the
/// seconds waited. A memory image resumes each of the guest's timers at the phase it was saved at: a lab saved
/// while those checks ran (a `runc exec` each, seconds under TCG) resumed in their middle at every restore, and a
/// cached `up` took 7.7-8.0 s where one saved outside them took 3.2-3.3 s. Right after them the next round is an
/// interval away, longer than a restore's checks and health round.
fn wait_first_checks(session: &Session, cfg: &Config) -> f64 {
    let start = Instant::now();
    let project = crate::guest::compose::project_name(&cfg.machine.name);
    let _ = crate::process::wait_until(FIRST_CHECKS_WAIT, "the containers' first healthchecks", || {
        match crate::health::containers(session, &project) {
            Ok(containers) => Ok(first_checks_done(&containers).then_some(())),
            // No Docker to ask: nothing to wait for.
            Err(_) => Ok(Some(())),
        }
    });
    start.elapsed().as_secs_f64()
}

/// Keep a capture of the machine just created by this `up` (`session`: its guest, asked for a quiet moment
/// first, see [`wait_first_checks`]). Best effort: a failure is a warning, the machine is fine either way.
#[allow(clippy::too_many_arguments)]
pub fn capture(
    cfg: &Config,
    p: &dyn Provider,
    vm_name: &str,
    state: &StateDir,
    box_id: Option<&str>,
    plan: &Plan,
    session: Option<&Session>,
    ui: &Ui,
) {
    let ph = ui.phase("cache lab");
    let start = Instant::now();
    let waited = session.map(|s| wait_first_checks(s, cfg)).unwrap_or(0.0);
    let result = (|| -> Result<Option<LabMeta>> {
        let labs = Labs::open()?;
        let partial = labs.begin(&plan.key)?;
        let done = (|| -> Result<Option<LabMeta>> {
            let Some(data) = p.lab_capture(vm_name, state, &partial)? else { return Ok(None) };
            lab::copy_keys(&state.root, &partial.join("keys"))?;
            let meta = LabMeta {
                key: plan.key.clone(),
                machine: cfg.machine.name.clone(),
                vm_name: vm_name.to_string(),
                // Absolute and canonical: `box list` shows it, and an entry whose project is gone is dropped.
                project_dir: crate::platform::canonicalize(cfg.base_dir())?.display().to_string(),
                provider: p.name().to_string(),
                box_id: box_id.unwrap_or_default().to_string(),
                provider_data: data,
                created: String::new(),
                size: 0,
                files: Vec::new(),
                images_mode: crate::guest::registry::ImagesRecord::load(&state.root)
                    .resolved
                    .map(|r| r.mode.as_str().to_string()),
            };
            labs.commit(&partial, meta).map(Some)
        })();
        if !matches!(done, Ok(Some(_))) {
            let _ = crate::boxes::cache::remove_tree(&partial);
        }
        done
    })();
    if p.state(vm_name).is_ok_and(|s| s == crate::provider::VmState::Running) {
        // The guest was stopped for the capture: its clock lags by that long.
        super::session::sync_clock(cfg, state, ui);
    }
    match result {
        Ok(Some(meta)) => {
            let quiet = match waited {
                w if w >= 1.0 => format!(", {w:.0}s of it for the first healthchecks"),
                _ => String::new(),
            };
            ph.done(&format!(
                "{} ({} MiB, {:.1}s{quiet}); `destroy -f && up` restores it",
                crate::boxes::cache::short(&meta.key),
                meta.size >> 20,
                start.elapsed().as_secs_f64()
            ));
            ui.event("lab_saved", json!({"key": meta.key, "bytes": meta.size}));
        }
        Ok(None) => {
            ph.done("not supported by this provider");
        }
        Err(e) => {
            ph.done("failed");
            ui.warn(format!(
                "the lab was not cached: {e:#}\nhint: the machine is fine; free space in the cache dir or set \
                 [machine] cache_lab = false"
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(health: Option<&str>) -> ContainerState {
        ContainerState { status: "running".into(), health: health.map(str::to_string), restarts: 0 }
    }

    /// A capture waits while any container's first healthcheck is still to come; one without a healthcheck, or
    /// judged either way, does not hold it.
    #[test]
    fn the_capture_waits_only_for_containers_still_starting() {
        let mut c = BTreeMap::from([
            ("demo-app".to_string(), state(Some("healthy"))),
            ("grafana".to_string(), state(None)),
            ("prometheus".to_string(), state(Some("unhealthy"))),
        ]);
        assert!(first_checks_done(&c));
        c.insert("alertmanager".into(), state(Some("starting")));
        assert!(!first_checks_done(&c));
        assert!(first_checks_done(&BTreeMap::new()), "no containers: nothing to wait for");
    }
}
