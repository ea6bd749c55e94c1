//! The pipeline run in the guest once SSH is up: Docker (and Compose v1/v2) installed if missing, the rendered
//! tree uploaded (only what changed), images made, `compose up -d`, and only the services a change touches
//! restarted. Idempotent: on an unchanged, running lab it only looks.

pub mod compose;
pub mod docker;
pub mod forwards;
pub mod images;
pub mod registry;
pub mod upload;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::config::{Config, ImageSource};
use crate::profile::Profile;
use crate::render::Rendered;
use crate::ssh::shell_quote;
use crate::ssh::Session;
use crate::ui::Ui;
use compose::{ChangePlan, Compose, ComposeModel};

/// The lab of one machine for one run: the provision tree rendered once (with the machine's secrets) and its
/// compose model, shared by validation, the guest pipeline and the health check.
pub struct Lab {
    pub rendered: Rendered,
    /// The parsed compose file, or why it does not parse (an error only when the guest pipeline needs it).
    model: std::result::Result<ComposeModel, String>,
    /// The workload this tree belongs to (its probes, secrets and base packages).
    pub profile: &'static Profile,
    /// The secrets it was rendered with (to render it again for the mode `auto` resolves to).
    secrets: Option<serde_json::Value>,
    /// The same tree for registry mode, rendered at most once per run ([`Lab::registry_mode`]).
    registry: std::sync::OnceLock<std::result::Result<Box<Lab>, String>>,
}

impl Lab {
    /// Render the config's tree with the machine's secrets (the profile's, from the state dir) and parse its
    /// compose file.
    pub fn render(cfg: &Config, state: &crate::machine::StateDir, profile: &'static Profile) -> Result<Lab> {
        let secrets = profile.secrets_in(&state.root)?;
        let mut lab = Self::of(crate::render::render_config(cfg, &secrets)?, profile);
        lab.secrets = Some(secrets);
        Ok(lab)
    }

    /// The same tree rendered for another image mode (`auto` resolved), with the same secrets.
    pub fn for_mode(&self, cfg: &Config, mode: ImageSource) -> Result<Lab> {
        let cfg = cfg.with_images(mode);
        let secrets = self.secrets.clone().unwrap_or(serde_json::Value::Null);
        let mut lab = Self::of(crate::render::render_config(&cfg, &secrets)?, self.profile);
        lab.secrets = self.secrets.clone();
        Ok(lab)
    }

    /// Parse the compose file of a rendered tree.
    pub fn of(rendered: Rendered, profile: &'static Profile) -> Lab {
        let model = ComposeModel::from_rendered(&rendered).map_err(|e| format!("{e:#}"));
        Lab { rendered, model, profile, secrets: None, registry: Default::default() }
    }

    /// The tree rendered for registry mode (what `images = "auto"` asks the registry about and may resolve to),
    /// rendered on first use and kept for the run.
    pub fn registry_mode(&self, cfg: &Config) -> Result<&Lab> {
        self.registry
            .get_or_init(|| {
                self.for_mode(cfg, ImageSource::Registry).map(Box::new).map_err(|e| format!("{e:#}"))
            })
            .as_ref()
            .map(|b| &**b)
            .map_err(|e| anyhow::anyhow!("{e}"))
    }

    pub fn model(&self) -> Result<&ComposeModel> {
        self.model.as_ref().map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// Services to report: (available, unavailable offline). From the compose file when it parses (see
    /// [`split_services`]), else the probe table (every entry available).
    pub fn services(&self, cfg: &Config) -> (Vec<String>, Vec<String>) {
        // `auto` renders as debian mode; once the guest resolved it to registry mode, that tree's services count.
        if cfg.provision.images == ImageSource::Auto {
            let rec = registry::ImagesRecord::load(&registry::state_root(cfg));
            if let Some(r) = rec.resolved.filter(|r| r.mode == ImageSource::Registry) {
                if let Ok(lab) = self.registry_mode(cfg) {
                    return lab.services(&cfg.with_images(r.mode));
                }
            }
        }
        match &self.model {
            Ok(model) => split_services(model, cfg.provision.images.rendered(), cfg.compose_profiles()),
            Err(_) => (cfg.health_probes(self.profile).into_keys().collect(), Vec::new()),
        }
    }
}

/// Services `up -d` starts (no compose profile, or one of the machine's `profiles`, which `up` passes as
/// `--profile`), and those reported "unavailable offline": in `debian` mode, a profiled service that nothing can
/// build offline (no build of its own, and no other service builds its image). Other profiled services (e.g. an
/// on-demand one whose image another service builds) are neither.
pub fn split_services(
    model: &ComposeModel,
    images: ImageSource,
    active_profiles: &[String],
) -> (Vec<String>, Vec<String>) {
    let built_images: Vec<&str> = model
        .services
        .iter()
        .filter(|s| s.build_context.is_some())
        .filter_map(|s| s.image.as_deref())
        .collect();
    let mut active = Vec::new();
    let mut unavailable = Vec::new();
    for s in &model.services {
        if s.profiles.is_empty() || s.profiles.iter().any(|p| active_profiles.contains(p)) {
            active.push(s.name.clone());
        } else if images == ImageSource::Debian
            && s.build_context.is_none()
            && !s.image.as_deref().is_some_and(|i| built_images.contains(&i))
        {
            unavailable.push(s.name.clone());
        }
    }
    (active, unavailable)
}

/// How Compose is called for this config.
pub fn compose_for(cfg: &Config, model: &ComposeModel, kind: compose::ComposeKind) -> Compose {
    Compose {
        kind,
        dir: cfg.provision.guest_path.clone(),
        project: compose::project_name(&cfg.machine.name),
        file: model.file.clone(),
        profiles: cfg.compose_profiles().to_vec(),
    }
}

/// Compose services of this project with a running container: from the container states the health check reads
/// ([`containers_json`]), so a warm `up` asks the guest for them once.
pub fn running_services(ssh: &Session, project: &str) -> Result<BTreeSet<String>> {
    running_in(&containers_json(ssh, project)?)
}

/// The Docker Engine's socket in the guest.
pub(crate) const DOCKER_SOCKET: &str = "/var/run/docker.sock";

/// `docker inspect` of the project's containers as one JSON array (what [`parse_inspect`] reads). Through the
/// Engine API on the SSH connection itself when it may reach the socket (the SSH user is in the docker group:
/// `assets/docker/probe.sh` adds it): sshd connects, so no process starts in the guest. In a guest just restored
/// from memory that took 0.25 s (by hand, through `ssh -L`) where `sudo` and two `curl` starts took 0.78 s (stop 30). Else (an older lab, a
/// box whose sshd forbids socket forwarding) with [`containers_command`].
pub(crate) fn containers_json(ssh: &Session, project: &str) -> Result<String> {
    match containers_via_api(ssh, project) {
        Ok(Some(json)) => return Ok(json),
        Ok(None) => {}
        Err(e) if crate::process::verbosity() >= 1 => {
            eprintln!("+ the Engine API through the connection failed ({e:#}); asking with a command")
        }
        Err(_) => {}
    }
    ssh.exec_ok(&containers_command(project), Duration::from_secs(60))
}

/// Send the list of the project's containers ahead ([`Session::prefetch_get`]), for [`containers_json`]'s next
/// `times` calls: dockerd answers while the caller's batch of commands runs. False when the connection may not
/// reach the socket: the batch must then carry [`containers_command`].
pub(crate) fn send_containers_list(ssh: &Session, project: &str, times: usize) -> bool {
    ssh.prefetch_get(DOCKER_SOCKET, &containers_list_path(project), times)
}

/// The Engine API's list of the project's containers, stopped ones too.
fn containers_list_path(project: &str) -> String {
    let filters = format!(r#"{{"label":["com.docker.compose.project={project}"]}}"#);
    format!("/containers/json?all=1&filters={}", percent_encode(&filters))
}

/// `s` with every byte but RFC 3986's unreserved ones percent-encoded (for a query value). Pure.
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// [`containers_json`] through the Engine API: the list, then every container's inspect side by side. None when
/// the connection may not reach the socket.
fn containers_via_api(ssh: &Session, project: &str) -> Result<Option<String>> {
    const T: Duration = Duration::from_secs(60);
    let Some(list) = ssh.socket_get(DOCKER_SOCKET, &[containers_list_path(project)], T)? else {
        return Ok(None);
    };
    let list = &list[0];
    if list.status != 200 {
        bail!(
            "the Engine API answered the list with {}: {}",
            list.status,
            String::from_utf8_lossy(&list.body)
        );
    }
    let listed: serde_json::Value =
        serde_json::from_slice(&list.body).context("parse the Engine API's list")?;
    let paths: Vec<String> = listed
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c.get("Id")?.as_str())
        .filter(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(|id| format!("/containers/{id}/json"))
        .collect();
    if paths.is_empty() {
        return Ok(Some("[]".to_string()));
    }
    let Some(each) = ssh.socket_get(DOCKER_SOCKET, &paths, T)? else { return Ok(None) };
    let mut bodies = Vec::with_capacity(each.len());
    for r in each {
        match r.status {
            200 => bodies.push(String::from_utf8(r.body).context("an inspect answer is not UTF-8")?),
            // Removed between the list and its inspect: gone, as `docker inspect` would not list it.
            404 => {}
            code => {
                bail!("the Engine API answered an inspect with {code}: {}", String::from_utf8_lossy(&r.body))
            }
        }
    }
    Ok(Some(format!("[{}]", bodies.join(","))))
}

/// The services running in a [`containers_command`] answer (one-off `compose run` containers left out). Pure.
fn running_in(inspect: &str) -> Result<BTreeSet<String>> {
    Ok(parse_inspect(inspect)?.into_iter().filter(|(_, c)| c.status == "running").map(|(s, _)| s).collect())
}

/// A container as `docker inspect` reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Default)]
pub(crate) struct ContainerState {
    /// created | running | restarting | exited | paused | dead
    pub status: String,
    /// Docker healthcheck: starting | healthy | unhealthy (None without a healthcheck).
    pub health: Option<String>,
    pub restarts: u64,
}

/// Parse `docker inspect` output (a JSON array) into state per compose service. Pure.
pub(crate) fn parse_inspect(json_text: &str) -> Result<BTreeMap<String, ContainerState>> {
    let v: serde_json::Value =
        serde_json::from_str(json_text.trim()).context("parse `docker inspect` output")?;
    let mut out = BTreeMap::new();
    for c in v.as_array().into_iter().flatten() {
        let Some(service) = c.pointer("/Config/Labels/com.docker.compose.service").and_then(|s| s.as_str())
        else {
            continue;
        };
        let state = ContainerState {
            status: c.pointer("/State/Status").and_then(|s| s.as_str()).unwrap_or("unknown").to_string(),
            health: c.pointer("/State/Health/Status").and_then(|s| s.as_str()).map(String::from),
            restarts: c.get("RestartCount").and_then(|r| r.as_u64()).unwrap_or(0),
        };
        // One-off containers (`compose run`) do not replace the service's own.
        let one_off =
            c.pointer("/Config/Labels/com.docker.compose.oneoff").and_then(|s| s.as_str()) == Some("True");
        if !one_off {
            out.insert(service.to_string(), state);
        }
    }
    Ok(out)
}

/// The command [`containers_json`] runs where the connection may not reach the Engine's socket: `docker inspect` of
/// the project's containers as one JSON array. Through the Engine API with two `curl` starts when the guest has curl (each docker CLI start costs 0.3-0.5 s of guest CPU
/// under TCG: `ps` + `inspect` took 0.9 s), else with the docker CLI. The list's ids are picked out by the shell's
/// own pattern matching (a `grep | cut | sed` did it until stop 29: three more process starts, cold ones in a guest
/// just restored from memory).
pub fn containers_command(project: &str) -> String {
    let label = format!("label=com.docker.compose.project={project}");
    let filters = shell_quote(&format!(r#"filters={{"label":["com.docker.compose.project={project}"]}}"#));
    let api = format!(
        r#"api='curl -sf --unix-socket /var/run/docker.sock'; list=$($api -G --data-urlencode {filters} 'http://docker/containers/json?all=1') || exit 1; urls=; rest=$list; while :; do case $rest in *'"Id":"'*) rest=${{rest#*'"Id":"'}}; id=${{rest%%'"'*}}; case $id in ''|*[!0-9a-f]*) ;; *) urls="$urls http://docker/containers/$id/json" ;; esac ;; *) break ;; esac; done; printf '['; [ -z "$urls" ] || $api -w ',' $urls || exit 1; printf '{{}}]
'"#
    );
    let cli = format!(
        "ids=$(docker ps -aq --filter {label}); if [ -n \"$ids\" ]; then docker inspect $ids; else echo '[]'; fi",
        label = shell_quote(&label)
    );
    format!(
        "if command -v curl >/dev/null 2>&1; then sudo -n sh -c {}; else sudo -n sh -c {}; fi",
        shell_quote(&api),
        shell_quote(&cli)
    )
}

/// What `auto` asks the registries (the registry-mode tree's pulled images): the probe's targets and its script.
fn image_mode_probe(cfg: &Config, reg_lab: &Lab) -> Result<(Vec<String>, String)> {
    let images: Vec<String> = reg_lab
        .model()?
        .services
        .iter()
        .filter(|s| s.build_context.is_none())
        .filter(|s| s.profiles.is_empty() || s.profiles.iter().any(|p| cfg.compose_profiles().contains(p)))
        .filter_map(|s| s.image.clone())
        .collect();
    let targets = registry::probe_targets(&cfg.provision, &images);
    let script = registry::probe_script(&cfg.provision, &targets, registry::PROBE_SECS);
    Ok((targets, script))
}

/// The guest commands that [`provision`] and the health check run on a running, unchanged lab, all of them
/// reads (or idempotent, as the forwards' rules), built by the functions those steps use: `up` runs them in one
/// round trip ([`Session::prefetch`]) before it starts, so a warm `up` costs one exec instead of eight.
/// `containers_sent`: the containers' list went ahead through the connection ([`send_containers_list`]), so the
/// batch does not carry [`containers_command`].
pub fn warm_commands(cfg: &Config, lab: &Lab, containers_sent: bool) -> Vec<String> {
    let mut cmds = vec![compose::PROBE_SCRIPT.to_string()];
    cmds.extend(forwards::command(cfg));
    if cfg.provision.images != ImageSource::Debian
        || !cfg.provision.registry_hosts().is_empty()
        || cfg.provision.registry_credentials.is_some()
    {
        cmds.push(registry::read_daemon_json_command());
    }
    if cfg.provision.images == ImageSource::Auto {
        if let Some((_, probe)) = lab.registry_mode(cfg).ok().and_then(|l| image_mode_probe(cfg, l).ok()) {
            cmds.push(probe);
        }
    }
    cmds.push(upload::read_manifest_command(&cfg.provision.guest_path));
    let project = compose::project_name(&cfg.machine.name);
    // Twice: the running services (the upload step) and the first health round read the same container states,
    // which run once and are served to both.
    if !containers_sent {
        cmds.push(containers_command(&project));
        cmds.push(containers_command(&project));
    }
    cmds
}

/// What a restored cached lab is asked, where a warm `up` asks [`warm_commands`]: the cached lab is the
/// provisioned lab (its key covers the config and the tree), so only the first health round's container states,
/// and with `recheck` (`images = "auto"`, cached in debian mode) the registry probe of [`resolve_auto`].
pub fn restored_commands(cfg: &Config, lab: &Lab, recheck: bool, containers_sent: bool) -> Vec<String> {
    let mut cmds = Vec::new();
    if recheck {
        if let Some((_, probe)) = lab.registry_mode(cfg).ok().and_then(|l| image_mode_probe(cfg, l).ok()) {
            cmds.push(probe);
        }
    }
    if !containers_sent {
        cmds.push(containers_command(&compose::project_name(&cfg.machine.name)));
    }
    cmds
}

/// `images = "auto"`: ask the registries the registry-mode tree pulls from (the `image mode` phase), warning
/// when the answer differs from `previous`, the mode this lab last ran in.
pub fn resolve_auto(
    cfg: &Config,
    ssh: &Session,
    lab: &Lab,
    previous: Option<&registry::Resolved>,
    ui: &Ui,
) -> Result<registry::Resolved> {
    let phase = ui.phase("image mode");
    let reg_lab = lab.registry_mode(cfg)?;
    let (_, offline) = split_services(lab.model()?, ImageSource::Debian, cfg.compose_profiles());
    let (targets, probe) = image_mode_probe(cfg, reg_lab)?;
    let out = ssh.exec(&probe, Duration::from_secs(registry::PROBE_SECS + 30))?;
    let r = registry::judge_probe(&out.output, &targets, registry::PROBE_SECS, &offline);
    if let Some(prev) = previous.filter(|p| p.mode != r.mode) {
        ui.warn(format!(
            "images = \"auto\": this lab ran in {} mode before; now {} mode ({})",
            prev.mode.as_str(),
            r.mode.as_str(),
            r.reason
        ));
    }
    phase.done(&format!("{} mode: {}", r.mode.as_str(), r.reason));
    ui.event("image_mode", json!({"mode": r.mode.as_str(), "reason": r.reason, "auto": true}));
    Ok(r)
}

/// Run every provisioning step on a reachable guest. Idempotent. `host_build` is the base image build `up`
/// started on the host while the guest booted; it is joined at the images phase (or cancelled if not needed).
pub fn provision(
    cfg: &Config,
    ssh: &Session,
    lab: &Lab,
    ui: &Ui,
    force: bool,
    host_build: Option<images::HostBuild>,
) -> Result<()> {
    // A compose file that does not parse stops here, before anything runs in the guest.
    lab.model()?;

    let phase = ui.phase("docker");
    let ready = docker::ensure(ssh, cfg.provision.docker_install, &phase)?;
    phase.done(&format!(
        "Docker {} with Compose {:?}{}",
        ready.server_version,
        ready.compose,
        if ready.installed { " (installed now)" } else { "" }
    ));
    let phase = ui.phase("forwards");
    let summary = forwards::ensure(ssh, cfg)?;
    phase.done(&summary);

    // Registries: CA certificates, daemon.json and logins before the first pull; `auto` asks them now.
    let state_root = registry::state_root(cfg);
    let mut record = registry::ImagesRecord::load(&state_root);
    let previous_mode = record.resolved.as_ref().map(|r| r.mode);
    let wants_registry = cfg.provision.images != ImageSource::Debian;
    let has_settings =
        !cfg.provision.registry_hosts().is_empty() || cfg.provision.registry_credentials.is_some();
    if wants_registry || has_settings {
        let phase = ui.phase("registry");
        let summary = registry::apply(cfg, ssh, false)?;
        phase.done(if summary.is_empty() { "no registry settings" } else { &summary });
    }
    let (resolved, resolved_lab) = match cfg.provision.images {
        ImageSource::Auto => {
            let r = resolve_auto(cfg, ssh, lab, record.resolved.as_ref(), ui)?;
            // `auto` renders as debian mode until resolved: only registry mode needs the tree rendered again.
            let reg = (r.mode == ImageSource::Registry).then(|| lab.registry_mode(cfg)).transpose()?;
            (r, reg)
        }
        m => (registry::Resolved { mode: m, reason: format!("images = \"{}\"", m.as_str()) }, None),
    };
    let mode = resolved.mode;
    let lab = resolved_lab.unwrap_or(lab);
    let (rendered, model) = (&lab.rendered, lab.model()?);
    let cfg = &cfg.with_images(mode);
    if mode == ImageSource::Registry && cfg.provision.registry_credentials.is_some() {
        let phase = ui.phase("registry login");
        let summary = registry::apply(cfg, ssh, true)?;
        phase.done(&summary);
    }
    record.resolved = Some(resolved.clone());
    record.save(&state_root)?;

    let compose = compose_for(cfg, model, ready.compose);
    let (active, unavailable) = split_services(model, cfg.provision.images, cfg.compose_profiles());

    let phase = ui.phase("upload");
    let guest_path = &cfg.provision.guest_path;
    let old = if force { upload::Manifest::default() } else { upload::read_manifest(ssh, guest_path)? };
    let first_run = old.files.is_empty();
    let new = upload::Manifest::of(rendered);
    let diff = upload::diff(&old, &new);
    let sent = upload::apply(ssh, guest_path, rendered, &diff)?;
    ui.event("upload", json!({"added": diff.added, "changed": diff.changed, "removed": diff.removed}));
    phase.done(&format!(
        "{} sent ({} KiB), {} removed, {} unchanged",
        diff.added.len() + diff.changed.len(),
        sent.div_ceil(1024),
        diff.removed.len(),
        diff.unchanged.len()
    ));

    let running = running_services(ssh, &compose.project)?;
    let all_running = active.iter().all(|s| running.contains(s));
    let plan = compose::plan_changes(model, &diff.touched());
    if !first_run && !force && plan.is_empty() && all_running {
        ui.event("provision_skipped", json!({"reason": "nothing changed and every service runs"}));
        ui.info(format!("lab unchanged and running ({} services); nothing to do", active.len()));
        // Files no service uses may still have changed: record them.
        return if diff.is_empty() { Ok(()) } else { upload::write_manifest(ssh, guest_path, &new) };
    }

    let phase = ui.phase("images");
    let buildable: Vec<String> = active
        .iter()
        .filter(|s| model.service(s).is_some_and(|svc| svc.build_context.is_some()))
        .cloned()
        .collect();
    // A lab that ran in the other image mode: its services' images are made again for this one.
    let mode_changed = previous_mode.is_some_and(|m| m != mode);
    let to_build: Vec<String> = if first_run || force || mode_changed {
        buildable.clone()
    } else {
        buildable.iter().filter(|s| plan.rebuild.contains(*s)).cloned().collect()
    };
    let mut summary = Vec::new();
    match cfg.provision.images {
        ImageSource::Debian => {
            let base = images::BaseImage::for_config(cfg, lab.profile);
            match host_build {
                Some(build) => {
                    let o = build.join(&phase)?;
                    ui.event(
                        "base_image_overlap",
                        json!({"built": o.built, "build_seconds": o.build_secs, "waited_seconds": o.waited_secs,
                               "saved_seconds": o.saved_secs}),
                    );
                    if o.built {
                        summary.push(format!(
                            "base rootfs built on host in {:.0} s while the guest booted ({:.0} s saved)",
                            o.build_secs, o.saved_secs
                        ));
                    }
                }
                None => {
                    let never = std::sync::atomic::AtomicBool::new(false);
                    if base.ensure_tarball(&|m| phase.message(m), &never)? {
                        summary.push("base rootfs built on host".to_string());
                    }
                }
            }
            if base.ensure_in_guest(ssh, &phase)? {
                summary.push(format!("{} imported", base.tag));
            }
        }
        ImageSource::Registry | ImageSource::Auto => {
            drop(host_build); // started for `auto`, which resolved to registry mode: cancelled
            summary.push(format!("registry mode ({})", resolved.reason));
            let pull: Vec<&String> = active.iter().filter(|s| !buildable.contains(s)).collect();
            let refs: Vec<(String, String)> = pull
                .iter()
                .filter_map(|s| {
                    model.service(s).and_then(|svc| svc.image.clone()).map(|i| (s.to_string(), i))
                })
                .collect();
            // Reproducible pulls: an image pulled before is pulled by the digest it resolved to (unless --force).
            let (pinned, fresh): (Vec<_>, Vec<_>) =
                refs.iter().partition(|(_, image)| !force && record.digests.contains_key(image));
            for (_, image) in &pinned {
                let by_digest = &record.digests[image];
                phase.message(&format!("pull {by_digest}"));
                let cmd = format!(
                    "sudo -n docker image inspect {d} >/dev/null 2>&1 || sudo -n docker pull -q {d} && sudo -n docker tag {d} {i}",
                    d = shell_quote(by_digest),
                    i = shell_quote(image)
                );
                let out = ssh.exec(&cmd, Duration::from_secs(30 * 60))?;
                if out.status != 0 {
                    bail!(
                        "pulling {image} by its recorded digest {by_digest} failed (exit {}):\n{}\nhint: the registry \
                         no longer has those bytes, or is unreachable; `provisioner provision --force` resolves the \
                         tag again",
                        out.status,
                        crate::process::tail(&out.output, 10)
                    );
                }
            }
            if !fresh.is_empty() {
                let names: Vec<&str> = fresh.iter().map(|(s, _)| s.as_str()).collect();
                stream(ssh, &compose, &format!("pull {}", names.join(" ")), &phase, 30 * 60).context(
                    "pulling service images failed\nhint: the guest needs the registry (or its mirror or proxy) \
                     reachable, with [provision] ca_certs for a private CA and registry_credentials for a login; \
                     or use [provision] images = \"debian\"",
                )?;
                for (_, image) in &fresh {
                    if let Some(d) = repo_digest(ssh, image)? {
                        record.digests.insert(image.clone(), d);
                    }
                }
            }
            record.digests.retain(|image, _| refs.iter().any(|(_, i)| i == image));
            record.save(&state_root)?;
            if !refs.is_empty() {
                summary.push(format!(
                    "pulled {} ({} by recorded digest)",
                    refs.iter().map(|(s, _)| s.as_str()).collect::<Vec<_>>().join(", "),
                    pinned.len()
                ));
            }
        }
    }
    if !to_build.is_empty() {
        let env = compose::build_env(ready.compose, &ready.server_version, cfg.provision.images);
        let cmd = compose.cmd_env(env, &format!("build {}", to_build.join(" ")));
        stream_cmd(ssh, &cmd, &phase, 60 * 60).map_err(|e| {
            e.context("`compose build` failed\nhint: the last lines above name the failing Dockerfile step; fix it \
                       under [provision] source and run `provisioner provision`")
        })?;
        summary.push(format!("built {}", to_build.join(", ")));
    }
    phase.done(&if summary.is_empty() { "up to date".to_string() } else { summary.join("; ") });

    let phase = ui.phase("compose");
    if let Err(e) = stream(ssh, &compose, "up -d --remove-orphans", &phase, 20 * 60) {
        drop(phase);
        return Err(e.context(failing_logs(ssh, &compose, &active)));
    }
    let restart = restart_list(&plan, &to_build, &active, first_run || force || mode_changed);
    if !restart.is_empty() {
        stream(ssh, &compose, &format!("restart {}", restart.join(" ")), &phase, 10 * 60)?;
    }
    if !unavailable.is_empty() {
        ui.warn(format!(
            "{} unavailable offline (no image source in debian mode: {}); shown in the health table",
            unavailable.join(", "),
            resolved.reason
        ));
    }
    phase.done(&format!(
        "{} services up{}",
        active.len(),
        if restart.is_empty() { String::new() } else { format!(", restarted {}", restart.join(", ")) }
    ));
    upload::write_manifest(ssh, guest_path, &new)
}

/// The `REPO@sha256:…` an image pulled as `image` resolved to (None when Docker recorded no digest).
fn repo_digest(ssh: &Session, image: &str) -> Result<Option<String>> {
    let out = ssh.exec_ok(
        &format!("sudo -n docker image inspect --format '{{{{json .RepoDigests}}}}' {}", shell_quote(image)),
        Duration::from_secs(60),
    )?;
    let digests: Vec<String> = serde_json::from_str(out.trim()).unwrap_or_default();
    let repo = image.rsplit_once(':').filter(|(_, tag)| !tag.contains('/')).map_or(image, |(r, _)| r);
    Ok(digests.iter().find(|d| d.split('@').next() == Some(repo)).or(digests.first()).cloned())
}

/// Services to restart after `up -d`: those whose mounted config changed, unless they were just (re)built or the
/// whole lab was just created.
fn restart_list(plan: &ChangePlan, built: &[String], active: &[String], fresh: bool) -> Vec<String> {
    if fresh {
        return Vec::new();
    }
    plan.restart.iter().filter(|s| active.contains(s) && !built.contains(s)).cloned().collect()
}

/// Run a compose subcommand with its output streamed into the phase; error with the tail on failure.
fn stream(ssh: &Session, compose: &Compose, args: &str, phase: &crate::ui::Phase, secs: u64) -> Result<()> {
    stream_cmd(ssh, &compose.cmd(args), phase, secs)
}

/// Run a shell command in the guest, showing its output in `phase`; an error when it fails.
fn stream_cmd(ssh: &Session, cmd: &str, phase: &crate::ui::Phase, secs: u64) -> Result<()> {
    let out = ssh.exec_stream(cmd, Duration::from_secs(secs), &mut |line| phase.message(line))?;
    if out.status != 0 {
        bail!(
            "`{cmd}` failed in the guest (exit {}):\n{}",
            out.status,
            crate::process::tail(&out.output, 30)
        );
    }
    Ok(())
}

/// The last log lines of every active service that is not running (all active ones if that cannot be told).
fn failing_logs(ssh: &Session, compose: &Compose, active: &[String]) -> String {
    let running = running_services(ssh, &compose.project).unwrap_or_default();
    let failing: Vec<&String> = active.iter().filter(|s| !running.contains(*s)).collect();
    let mut text = String::from("`compose up -d` failed");
    for svc in if failing.is_empty() { active.iter().collect() } else { failing } {
        let logs = ssh
            .exec(
                &compose.cmd(&format!("logs --no-color --tail 40 {}", shell_quote(svc))),
                Duration::from_secs(60),
            )
            .map(|o| o.output)
            .unwrap_or_else(|e| format!("(logs unavailable: {e})"));
        text.push_str(&format!("\n--- last log lines of {svc}\n{}", logs.trim_end()));
    }
    text.push_str(
        "\nhint: fix the service's config under [provision] source and run `provisioner provision`; \
         `provisioner ssh -c 'sudo docker ps -a'` shows every container",
    );
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::path::Path;

    static LAB_PROFILE: Profile = crate::lab::PROFILE;

    /// The repo's own box-config.toml and provision/ tree, rendered with the lab's sample secrets.
    fn repo_lab(images: &str) -> (Config, Lab) {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("box-config.toml");
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("images = \"auto\"", &format!("images = \"{images}\""));
        let cfg = Config::from_bytes(&path, text.as_bytes()).unwrap();
        let secrets = (LAB_PROFILE.sample_secrets)();
        let mut lab = Lab::of(crate::render::render_config(&cfg, &secrets).unwrap(), &LAB_PROFILE);
        lab.secrets = Some(secrets);
        (cfg, lab)
    }

    #[test]
    fn a_restored_lab_is_asked_for_its_health_and_with_auto_the_registry_but_not_the_provisioning_checks() {
        let (cfg, lab) = repo_lab("auto");
        let project = compose::project_name(&cfg.machine.name);
        let warm = warm_commands(&cfg, &lab, false);
        assert!(warm.contains(&compose::PROBE_SCRIPT.to_string()) && warm.len() >= 6, "{warm:#?}");
        let containers = containers_command(&project);
        assert_eq!(warm.iter().filter(|c| **c == containers).count(), 2, "read by two steps: {warm:#?}");
        // The list went ahead through the connection: the batch does not ask it again.
        let sent = warm_commands(&cfg, &lab, true);
        assert_eq!(sent, warm.iter().filter(|c| **c != containers).cloned().collect::<Vec<_>>());
        let probe = image_mode_probe(&cfg, lab.registry_mode(&cfg).unwrap()).unwrap().1;
        // Cached in debian mode with `auto`: the registry is asked again, with the very probe `resolve_auto` runs.
        assert_eq!(restored_commands(&cfg, &lab, true, false), [probe.clone(), containers.clone()]);
        assert_eq!(restored_commands(&cfg, &lab, true, true), std::slice::from_ref(&probe));
        // Nothing to recheck: the first health round's container states only.
        assert_eq!(restored_commands(&cfg, &lab, false, false), std::slice::from_ref(&containers));
        let (cfg, lab) = repo_lab("debian");
        assert_eq!(restored_commands(&cfg, &lab, false, false), [containers]);
        assert!(restored_commands(&cfg, &lab, false, true).is_empty());
        assert!(warm_commands(&cfg, &lab, false).iter().all(|c| *c != probe), "debian mode asks no registry");
    }

    #[test]
    #[cfg_attr(windows, ignore = "windows: a guest shell command, run with /bin/sh")]
    fn the_containers_command_reads_the_engine_api_with_curl_else_the_docker_cli() {
        let cmd = containers_command("provisioner-lab");
        // The Engine API as curl would print it: the filtered list, then each container's inspect document.
        let curl = r#"
for a in "$@"; do case "$a" in
  *containers/json*) ;;
  filters=*) [ "$a" = 'filters={"label":["com.docker.compose.project=provisioner-lab"]}' ] || { echo "bad filter $a" >&2; exit 9; } ;;
esac; done
case "$*" in
  *'containers/json?all=1'*) printf '[{"Id":"aa11","Names":["/x"],"ImageID":"sha256:ff"},{"Id":"bb22"}]' ;;
  *aa11/json*bb22/json*)
    printf '{"Config":{"Labels":{"com.docker.compose.service":"demo-app"}},"State":{"Status":"running","Health":{"Status":"healthy"}},"RestartCount":0},'
    printf '{"Config":{"Labels":{"com.docker.compose.service":"prometheus"}},"State":{"Status":"exited"},"RestartCount":3},' ;;
  *) echo "unexpected curl $*" >&2; exit 9 ;;
esac"#;
        let got = crate::health::parse_inspect(&crate::testing::guest_sh(
            &cmd,
            &[
                ("curl", curl),
                ("docker", "echo docker must not run >&2; exit 9"),
                // The ids are picked out by the shell itself.
                ("grep", "exit 9"),
                ("cut", "exit 9"),
                ("sed", "exit 9"),
            ],
        ))
        .unwrap();
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got["demo-app"].health.as_deref(), Some("healthy"));
        assert_eq!((got["prometheus"].status.as_str(), got["prometheus"].restarts), ("exited", 3));
        // No container: an empty array.
        let none = r#"case "$*" in *'all=1'*) printf '[]' ;; *) exit 9 ;; esac"#;
        assert!(crate::health::parse_inspect(&crate::testing::guest_sh(
            &cmd,
            &[("curl", none), ("docker", "exit 9")]
        ))
        .unwrap()
        .is_empty());
        // No curl in the guest: the docker CLI.
        let docker = r#"case "$1" in
  ps) echo cc33 ;;
  inspect) [ "$2" = cc33 ] && printf '[{"Config":{"Labels":{"com.docker.compose.service":"alertmanager"}},"State":{"Status":"running"}}]' ;;
esac"#;
        let got =
            crate::health::parse_inspect(&crate::testing::guest_sh(&cmd, &[("docker", docker)])).unwrap();
        assert_eq!(got.keys().collect::<Vec<_>>(), ["alertmanager"]);
    }

    #[test]
    fn running_services_are_the_running_containers_of_the_health_checks_answer() {
        let inspect = r#"[
  {"Config":{"Labels":{"com.docker.compose.service":"demo-app"}},"State":{"Status":"running"}},
  {"Config":{"Labels":{"com.docker.compose.service":"prometheus"}},"State":{"Status":"exited"}},
  {"Config":{"Labels":{"com.docker.compose.service":"alertmanager","com.docker.compose.oneoff":"True"}},"State":{"Status":"running"}},
  {"Config":{"Labels":{}},"State":{"Status":"running"}},
  {}]"#;
        assert_eq!(running_in(inspect).unwrap().into_iter().collect::<Vec<_>>(), ["demo-app"]);
        assert!(running_in("not json").is_err());
    }

    const LAB: &str = "services:\n  demo-app:\n    build: ./demo-app\n    image: lab/demo:debian\n  \
                       prometheus:\n    build: ./prometheus\n  grafana:\n    image: grafana/grafana\n    \
                       profiles: [registry]\n  cadvisor:\n    image: c\n    profiles: [registry]\n  loadgen:\n    \
                       image: lab/demo:debian\n    profiles: [load]\n";

    #[test]
    fn profiles_are_unavailable_offline_only_in_debian_mode() {
        let m = ComposeModel::parse("compose.yaml", LAB).unwrap();
        let (a, u) = split_services(&m, ImageSource::Debian, &[]);
        assert_eq!(a, ["demo-app", "prometheus"]);
        assert_eq!(u, ["grafana", "cadvisor"]);
        let (a, u) = split_services(&m, ImageSource::Registry, &[]);
        assert_eq!(a, ["demo-app", "prometheus"], "registry-mode compose files put no service in a profile");
        assert!(u.is_empty());
        // A machine's `profiles` start the services of those compose profiles too.
        let (a, u) = split_services(&m, ImageSource::Registry, &["load".into(), "other".into()]);
        assert_eq!(a, ["demo-app", "prometheus", "loadgen"]);
        assert!(u.is_empty());
    }

    #[test]
    fn restart_skips_rebuilt_inactive_and_fresh() {
        let plan = ChangePlan {
            restart: ["prometheus", "grafana", "demo-app"].iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        let active = vec!["demo-app".to_string(), "prometheus".to_string()];
        assert_eq!(restart_list(&plan, &["demo-app".to_string()], &active, false), ["prometheus"]);
        assert!(restart_list(&plan, &[], &active, true).is_empty());
    }
}
