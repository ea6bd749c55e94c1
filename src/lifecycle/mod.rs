//! The owner of a machine's lifecycle (as Lima's hostagent owns an instance): [`Machine`] holds the machine's
//! identity (canonical state dir, VM name), its config and recorded state, and carries `up`, `boot`, `halt`,
//! `reload`, `destroy`, the cached lab and the ownership check; commands parse, call it, and print.
//! Provider-agnostic, through [`provider::select`].
//!
//! `up` is re-runnable after an interrupt at any point: `state.json` is written before the hypervisor is touched,
//! `create` is idempotent (an existing domain of ours is re-defined, the overlay is made once under a temp name),
//! and a running machine is only waited for. So a half-created machine is completed, never duplicated.

pub mod insecure_once;
pub mod lab_cache;
pub(crate) mod offline;
pub mod plan;
pub mod round;
pub mod session;
pub(crate) mod status;

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::json;

use self::plan::Plan;
use self::round::{Judged, Round};
use self::session::{clock_command, connect, sync_clock};
use crate::boxes::inject::Route;
use crate::cli::{HaltArgs, UpArgs};
use crate::config::{Config, Forward, ProviderKind};
use crate::machine::identity::MachineId;
use crate::machine::lock::MachineLock;
use crate::machine::state::MachineState;
use crate::machine::StateDir;
use crate::profile::Profile;
use crate::provider::{self, vm_ref, Lookup, MachineSpec, Provider, VmState};
use crate::ssh::Session;
use crate::ui::Ui;

/// Deadline for `cloud-init status --wait` once SSH answers.
const CLOUD_INIT_TIMEOUT: Duration = Duration::from_secs(600);
/// cloud-init's record of its final stage (on tmpfs, so per boot): a clean one means it is done.
const CLOUD_INIT_RESULT: &str = "cat /run/cloud-init/result.json 2>/dev/null";
/// Lines of the serial console shown when the guest never answers SSH.
const SERIAL_TAIL_LINES: usize = 30;
/// Seconds `up` and `provision` wait for the lab to turn healthy.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(300);

/// One machine: its config, its one identity (absolute state dir, VM name), computed once for the whole run.
pub struct Machine {
    pub cfg: Config,
    pub state: StateDir,
    pub vm_name: String,
    /// The workload provisioned on it (its probes, secrets, base packages, extra health check).
    pub profile: &'static Profile,
}

impl Machine {
    pub fn new(cfg: Config, profile: &'static Profile) -> Result<Self> {
        // The one identity of this machine (canonical state dir + VM name), computed once for the whole run.
        let id = MachineId::for_config(&cfg)?;
        Ok(Self { cfg, state: id.state_dir(), vm_name: id.vm_name().to_string(), profile })
    }

    /// How the provider addresses the VM: the UUID recorded in state.json when there is one (VirtualBox), else
    /// its recorded name. Read again after `create`, which records the UUID before it makes the VM.
    pub fn vm_ref(&self) -> Result<String> {
        Ok(vm_ref(MachineState::load(&self.state)?.as_ref(), &self.vm_name))
    }

    /// The machine's VM and its live state, for a command that acts on it: the recorded VM, checked to be this
    /// project's ([`provider::my_vm_state`]); one that belongs to another project is refused, untouched.
    pub fn my_vm(&self, p: &dyn Provider) -> Result<(String, VmState)> {
        let vm = self.vm_ref()?;
        let live = provider::my_vm_state(p, &vm, &self.state)?;
        Ok((vm, live))
    }

    /// For `status`, `port`, `halt` and `destroy`: an edit that breaks box-config.toml must not lock the user out
    /// of a machine that exists. When the file does not validate (`invalid`: its project was loaded leniently),
    /// the machine is found from what still reads of it and from its recorded state (provider, libvirt URI, VM
    /// name), with a warning carrying the errors.
    pub fn existing(
        cfg: Config,
        profile: &'static Profile,
        invalid: Option<&anyhow::Error>,
        ui: &Ui,
    ) -> Result<Self> {
        let path = cfg.path.clone();
        let Some(invalid) = invalid else {
            return Self::new(cfg, profile);
        };
        let mut m = Self::new(cfg, profile)?;
        if let Some(st) = MachineState::load(&m.state)? {
            if let Some(kind) = crate::config::ProviderKind::parse(&st.provider) {
                m.cfg.machine.provider = kind;
            }
            if let Some(uri) = st.libvirt_uri {
                // The recorded URI passes the same check as the file's before anything connects with it.
                crate::config::check_libvirt_uri(&uri).map_err(|p| {
                    anyhow::anyhow!(
                        "{} records the libvirt URI \"{}\", which {}\nhint: {}; or `provisioner destroy -f` with a \
                         valid box-config.toml",
                        m.state.state_file().display(),
                        crate::text::shown(&uri),
                        p.message,
                        p.hint
                    )
                })?;
                m.cfg.libvirt.uri = uri;
            }
            m.vm_name = st.vm_name;
        }
        ui.warn(format!(
            "{} does not validate; this command goes on with the machine's recorded state \
             ({}/state.json)\n{invalid:#}",
            path.display(),
            crate::machine::STATE_DIR_NAME
        ));
        Ok(m)
    }
}

/// For a command that reaches the guest over SSH (`ssh`, `ssh-config`, `provision`, `health`, `load`, `verify`):
/// refuse when state.json was recorded for another project's VM, with the same check (and message) as every
/// command that drives the hypervisor. The hypervisor is asked only when the recorded VM name was made for
/// another project directory (its hash part differs: a copied or moved `.provisioner/`), so the usual `ssh` costs
/// no hypervisor call.
pub fn refuse_foreign(cfg: &Config) -> Result<()> {
    let id = MachineId::for_config(cfg)?;
    let state = id.state_dir();
    let Some(st) = MachineState::load(&state)? else { return Ok(()) };
    let hash = |name: &str| name.rsplit_once('-').map(|(_, h)| h.to_string());
    let elsewhere = machine_name_of(&st.vm_name).is_some() && hash(&st.vm_name) != hash(id.vm_name());
    if !elsewhere {
        return Ok(());
    }
    let mut cfg = cfg.clone();
    if let Some(kind) = crate::config::ProviderKind::parse(&st.provider) {
        cfg.machine.provider = kind;
    }
    let p = provider::select(&cfg)?;
    provider::my_vm_state(p.as_ref(), &vm_ref(Some(&st), id.vm_name()), &state).map(drop)
}

/// The copied record of another project's VM in `plan`, set aside so that `up` makes this project's own VM:
/// what belongs to that VM (its disk overlay, domain XML, seed) is removed from this state dir; the machine's keys
/// and lab secrets stay. Returns the live state of this project's own VM (normally not created).
fn adopt_copy(ui: &Ui, m: &Machine, p: &dyn Provider, plan: &mut Plan, owner: &str) -> Result<VmState> {
    let vm = vm_ref(plan.state.as_ref(), &m.vm_name);
    ui.warn(format!(
        "the {} VM {vm} recorded in {}/state.json belongs to another project (state dir {owner}): this project's \
         .provisioner/ is a copy of that project's; that VM is left untouched and this project gets its own",
        p.name(),
        m.state.root.display()
    ));
    for f in
        [m.state.disk(), m.state.path("disk.qcow2.partial"), m.state.path("domain.xml"), m.state.seed_iso()]
    {
        match std::fs::remove_file(&f) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("remove the copied {}", f.display()));
            }
            _ => {}
        }
    }
    plan.state = None;
    std::fs::remove_file(m.state.state_file())
        .with_context(|| format!("remove the copied {}", m.state.state_file().display()))?;
    provider::my_vm_state(p, &m.vm_name, &m.state)
}

/// Whether cloud-init's `result.json` says it finished with no errors (and no recoverable ones, which
/// `cloud-init status` reports as a warning). Anything unexpected is "not clean", so the slow path decides.
fn cloud_init_clean(result_json: &str) -> bool {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(result_json) else {
        return false;
    };
    let empty = |x: Option<&serde_json::Value>| match x {
        None | Some(serde_json::Value::Null) => true,
        Some(serde_json::Value::Array(a)) => a.is_empty(),
        Some(serde_json::Value::Object(o)) => o.is_empty(),
        Some(_) => false,
    };
    let v1 = &v["v1"];
    v1.is_object()
        && v1.get("errors").is_some_and(|e| e.as_array().is_some_and(Vec::is_empty))
        && empty(v1.get("recoverable_errors"))
}

/// The machine name recorded beside the config file at `config` (for a file so broken that not even its machine
/// name reads).
pub fn recorded_machine_name(config: &Path) -> Option<String> {
    let st = MachineState::load(&StateDir::beside(config)).ok().flatten()?;
    machine_name_of(&st.vm_name).map(str::to_string)
}

/// The machine name inside a VM name made by [`provider::vm_name`]: `provisioner-NAME-HASH8`.
pub fn machine_name_of(vm_name: &str) -> Option<&str> {
    let rest = vm_name.strip_prefix("provisioner-")?;
    let (name, hash) = rest.rsplit_once('-')?;
    (hash.len() == 8 && crate::config::valid_machine_name(name)).then_some(name)
}

impl Machine {
    /// `up`: create or start the machine, wait for cloud-init, provision and check its health. `round` is the
    /// multi-machine `up` it is part of, if any.
    pub fn up(&self, ui: &Ui, round: Option<&Round>, args: &UpArgs) -> Result<i32> {
        let _lock = MachineLock::acquire(&self.state, "up")?;
        let p = provider::select(&self.cfg)?;
        up_locked(ui, round, self, p.as_ref(), args)
    }

    /// `reload`: halt, then `up` again (config edits take effect), under one lock.
    pub fn reload(&self, ui: &Ui, round: Option<&Round>, args: &UpArgs) -> Result<i32> {
        let _lock = MachineLock::acquire(&self.state, "reload")?;
        halt_locked(ui, self, &HaltArgs { machines: Vec::new(), force: false, timeout: 60 })?;
        let p = provider::select(&self.cfg)?;
        up_locked(ui, round, self, p.as_ref(), args)
    }

    /// `halt`: shut the machine down (or power it off with `force`).
    pub fn halt(&self, ui: &Ui, args: &HaltArgs) -> Result<i32> {
        let _lock = MachineLock::acquire(&self.state, "halt")?;
        halt_locked(ui, self, args)
    }
}

fn up_locked(ui: &Ui, round: Option<&Round>, m: &Machine, p: &dyn Provider, args: &UpArgs) -> Result<i32> {
    let provisioning = !args.no_provision && m.cfg.provision.enabled != Some(false);
    let show_render = provisioning.then(|| ui.phase("render"));
    let mut plan = Plan::build(&m.cfg, &m.state, m.profile, ui)?;
    if let (Some(ph), Some(lab)) = (show_render, &plan.lab) {
        ph.done(&format!("{} files", lab.rendered.files.len()));
    }
    let ph = ui.phase("preflight");
    p.preflight()?;
    let recorded = vm_ref(plan.state.as_ref(), &m.vm_name);
    let live = match p.lookup(&recorded, &m.state)? {
        Lookup::NotCreated => VmState::NotCreated,
        Lookup::Mine(live) => live,
        // A copied project: its own VM is made; the original's stays the original's.
        Lookup::Foreign { owner: Some(owner) } if provider::owner_exists(Some(&owner)) => {
            adopt_copy(ui, m, p, &mut plan, &owner)?
        }
        Lookup::Foreign { owner } => {
            return Err(provider::foreign_vm(p.name(), &recorded, owner.as_deref(), &m.state))
        }
    };
    // Every `up` reaches the guest through its host: a remote host whose sshd does not forward to its loopback is
    // said now, before a box is sent or a VM made there (with an automatic port and nothing recorded yet, the
    // tunnel says it at the SSH phase).
    let ssh_port = plan.state.as_ref().and_then(|s| s.ssh_port).unwrap_or(m.cfg.ssh.host_port);
    if ssh_port != 0 {
        p.host().check_route(ssh_port)?;
    }
    ph.done(&format!("{} ({})", p.name(), live));

    // A new machine needs the lab's base image: build it on the host while the guest boots (both take about a
    // minute under TCG). Joined at the images phase; dropped (cancelled) if `up` fails before.
    let host_build = (provisioning
        && live == VmState::NotCreated
        && m.cfg.provision.images != crate::config::ImageSource::Registry)
        .then(|| {
            crate::guest::images::HostBuild::start(&crate::guest::images::BaseImage::for_config(
                &m.cfg, m.profile,
            ))
        })
        .flatten();
    if host_build.is_some() {
        ui.event("base_image_build_started", json!({}));
    }

    let was_up = matches!(live, VmState::Running | VmState::Saved | VmState::AbortedSaved | VmState::Paused);
    let (user_key, host_key, lab) = match live {
        VmState::Running => {
            let keys = crate::keys::ensure_machine_keys(&m.state, &m.cfg.machine.name)?;
            if plan.state.is_none() {
                bail!(
                    "the machine {} is running but its state.json is missing\nhint: `provisioner destroy -f` removes \
                     it, then `provisioner up` recreates it",
                    m.vm_name
                );
            }
            (keys.0, keys.1, None)
        }
        VmState::NotCreated | VmState::Stopped | VmState::Aborted => boot(ui, m, p, live, &mut plan.state)?,
        // Saved or paused: resume as it is. A saved VM is not mutable, so nothing is reconfigured (config edits
        // take effect after `provisioner reload`).
        VmState::Saved | VmState::AbortedSaved | VmState::Paused => {
            let keys = crate::keys::ensure_machine_keys(&m.state, &m.cfg.machine.name)?;
            let ph = ui.phase("resume");
            p.start(&vm_ref(plan.state.as_ref(), &m.vm_name))?;
            ph.done(&format!("resumed from {live}"));
            (keys.0, keys.1, None)
        }
        VmState::Inaccessible => bail!(
            "VirtualBox lists the machine {} as inaccessible: its settings file or a disk it needs (for a linked \
             clone also the provisioner-master-* VM) was moved or deleted\nhint: restore the missing files, or run \
             `provisioner destroy -f` (it unregisters the dead entry) and then `provisioner up`",
            m.vm_name
        ),
        other => bail!(
            "the machine {} is {other}; it cannot be started from this state\nhint: `provisioner halt -f` powers \
             it off, then run `provisioner up` again",
            m.vm_name
        ),
    };

    // The cached lab brought the secrets its services run with (installed into the state dir by `boot`): the tree
    // was rendered before, with secrets made for a new machine, so it is rendered again with those (else the
    // next provision would upload a `.env` the guest's services were not made with).
    let restored = lab.as_ref().is_some_and(|l| l.restored);
    if restored && plan.lab.is_some() {
        plan.lab = Some(crate::guest::Lab::render(&m.cfg, &m.state, m.profile)?);
    }
    let timeout = Duration::from_secs(args.boot_timeout.unwrap_or(m.cfg.ssh.connect_timeout_secs));
    // keys = "insecure-once", first boot: the one login with Vagrant's insecure key replaces the keys, then the
    // session is the pinned one.
    let first_login = match plan.state.as_ref().filter(|s| s.first_login_pending) {
        Some(_) => {
            let addr = plan.endpoint(&host_key.public_openssh)?.addr;
            Some(insecure_once::first_login(ui, m, p, &mut plan.state, addr, timeout, &user_key, &host_key)?)
        }
        None => None,
    };
    let ep = plan.endpoint(&host_key.public_openssh)?;
    let ph = ui.phase("ssh");
    let session = match first_login {
        Some(session) => session,
        None => Session::connect(&ep, timeout).map_err(|e| {
            let (text, place) = p.serial_console(&m.vm_name, &m.state);
            e.context(serial_tail(&text, &place))
        })?,
    };
    ph.done(&ep.addr.to_string());
    // The restored lab is the captured one, healthy when saved: its first health round's HTTP probes start now and
    // run while the checks' round trip does (every path in the guest runs cold after a restore, and the demo app's
    // first answer took up to a second under TCG). Not before the login: both need the guest's two vCPUs and QEMU's
    // network thread, and alongside the probes the login took 1.4-2.0 s instead of 0.8-1.0 s in half the runs
    // (stop 29; docs/vm.md "Cached lab"). Dropped if the lab is provisioned again below.
    let mut early = match (&plan.lab, restored && provisioning) {
        (Some(render), true) => {
            let (available, unavailable) = render.services(&m.cfg);
            Some(crate::health::HostChecks::start(&m.cfg, m.profile, &available, &unavailable))
        }
        _ => None,
    };
    // A restored guest keeps the clock of its capture: set from the host's by a command started now and collected
    // after the checks, so the guest runs it beside them (after a restore its `sudo` runs cold: in the checks'
    // batch it held the round trip up by 0.2-0.4 s, stop 30).
    let clock = match restored {
        true => {
            let cmd = clock_command(std::time::SystemTime::now());
            Some(session.start(&cmd, Duration::from_secs(30)))
        }
        false => None,
    };
    // No cloud-init in the guest (the disk route and insecure-once): what the seed would do is a root script run
    // on every `up` (idempotent), built here so a warm `up` sends it with its checks.
    let disk_route =
        matches!(plan.state.as_ref().and_then(|s| s.keys_route.as_deref()), Some("disk" | "insecure-once"));
    let setup = match disk_route {
        true => Some(offline::setup_command(
            &m.cfg,
            private_nic(&m.cfg)?.as_ref(),
            crate::seed::hosts_file(m.cfg.hostname(), &peer_hosts(&m.cfg))?,
        )),
        false => None,
    };
    // A machine that was already up (running, resumed, or the cached lab restored) is most likely unchanged:
    // every check the rest of `up` makes on it goes to the guest at once, in one round trip, and each step
    // below takes its answer (a step that changes anything makes the later ones ask again).
    let warm = restored || was_up;
    let recheck = restored && lab.as_ref().is_some_and(|l| lab_cache::recheck_mode(&m.cfg, l));
    if warm {
        let mut cmds: Vec<String> = setup.iter().cloned().collect();
        // A restored lab was captured after cloud-init had finished (its result is in the saved memory).
        if !restored {
            cmds.push(CLOUD_INIT_RESULT.to_string());
        }
        if let (Some(lab), true) = (&plan.lab, provisioning) {
            // The containers' list goes ahead through the connection (read twice on a warm `up`: the running
            // services, then the health round), so dockerd answers while the batch runs.
            let project = crate::guest::compose::project_name(&m.cfg.machine.name);
            let sent = crate::guest::send_containers_list(&session, &project, if restored { 1 } else { 2 });
            cmds.extend(match restored {
                true => crate::guest::restored_commands(&m.cfg, lab, recheck, sent),
                false => crate::guest::warm_commands(&m.cfg, lab, sent),
            });
        }
        // Nothing to ask (a restored lab with nothing to recheck and its containers' list sent ahead): no phase.
        if !cmds.is_empty() {
            let ph = ui.phase("checks");
            let held = session.prefetch(&cmds, Duration::from_secs(60));
            ph.done(&match held {
                0 => "asked one by one (the batch did not run)".to_string(),
                1 => "1 guest check".to_string(),
                n => format!("{n} guest checks in one round trip"),
            });
        }
    }
    let clock = clock.map(|run| {
        run.and_then(|r| r.finish()).and_then(|out| match out.status {
            0 => Ok(()),
            code => anyhow::bail!("exit {code}: {}", crate::process::tail(&out.output, 5)),
        })
    });
    if let Some(Err(e)) = clock {
        ui.warn(format!("could not set the guest's clock after restoring the cached lab: {e:#}"));
    }

    if let Some(cmd) = &setup {
        // No cloud-init: sshd answered with the pinned host key; what the seed did is done now, as root.
        offline::setup(&session, ui, cmd)?;
    }
    let ph = ui.phase(if disk_route { "ready" } else { "cloud-init" });
    // Fast path: cloud-init writes result.json (on tmpfs, so per boot) when its final stage ends. A clean one
    // spares `cloud-init status --wait`, a Python start that costs seconds under TCG on every warm `up`.
    let clean = || -> Result<bool> {
        let result = session.exec(CLOUD_INIT_RESULT, Duration::from_secs(30))?;
        Ok(result.status == 0 && cloud_init_clean(&result.output))
    };
    let out = if disk_route || restored || clean()? {
        crate::ssh::ExecOutput { status: 0, output: String::new() }
    } else {
        session.exec("cloud-init status --wait --long", CLOUD_INIT_TIMEOUT)?
    };
    match out.status {
        0 => {}
        // cloud-init >= 23.4: done, with recoverable errors.
        2 => ui.warn(format!("cloud-init finished with recoverable errors:\n{}", out.output.trim())),
        code => bail!(
            "cloud-init failed in the guest (exit {code}):\n{}\nhint: look at /var/log/cloud-init.log in the guest \
             (`provisioner ssh -c 'sudo tail -50 /var/log/cloud-init.log'`) and the serial log {}",
            crate::process::tail(&out.output, 20),
            m.state.serial_log().display()
        ),
    }
    let st = plan.state.get_or_insert_with(MachineState::default);
    if !st.provisioned {
        st.provisioned = true;
        st.save(&m.state)?;
    }
    ph.done(if disk_route { "sshd answers with the pinned host key" } else { "done" });

    let box_id = plan.state.as_ref().and_then(|s| s.box_id.as_deref());
    let render = match (&plan.lab, provisioning) {
        (Some(render), true) => render,
        _ => {
            ui.info(format!(
                "{}: running ({}, {}); provisioning skipped",
                m.cfg.machine.name,
                p.name(),
                ep.addr
            ));
            // A machine without provisioning is cached as booted; `--no-provision` leaves it unprovisioned.
            if let Some(cache) = lab.as_ref().filter(|l| !l.restored && !args.no_provision) {
                // Nothing provisioned, so no healthchecks to wait for.
                lab_cache::capture(&m.cfg, p, &m.vm_name, &m.state, box_id, cache, None, ui);
            }
            report_counts(ui);
            return Ok(crate::exit::OK);
        }
    };
    if recheck {
        // `auto` never keeps a debian-mode lab without asking the registry. While it still does not answer, the
        // cached lab stays as it is; when it does, the lab is provisioned again in registry mode (said so).
        ui.info("the cached lab ran in debian mode; images = \"auto\" asks the registry again");
        let state_root = crate::guest::registry::state_root(&m.cfg);
        let mut record = crate::guest::registry::ImagesRecord::load(&state_root);
        let r = crate::guest::resolve_auto(&m.cfg, &session, render, record.resolved.as_ref(), ui)?;
        let same = record.resolved.as_ref().is_some_and(|p| p.mode == r.mode);
        record.resolved = Some(r);
        record.save(&state_root)?;
        if same {
            drop(host_build);
        } else {
            early = None;
            crate::guest::provision(&m.cfg, &session, render, ui, false, host_build)?;
        }
    } else if restored {
        // The cached lab is the provisioned lab: only its health is checked (the host-side build is cancelled).
        drop(host_build);
    } else {
        crate::guest::provision(&m.cfg, &session, render, ui, false, host_build)?;
    }
    let (available, unavailable) = render.services(&m.cfg);
    // In a multi-machine `up`, what lives on the machines still coming up is judged in the run's final round.
    let coming_up = round.map(|r| r.hosts_coming_up(&m.cfg)).unwrap_or_default();
    let report = crate::health::check_deferring(
        &m.cfg,
        m.profile,
        Some(&session),
        ui,
        HEALTH_TIMEOUT,
        &available,
        &unavailable,
        &coming_up,
        early,
    )?;
    let healthy = report.healthy;
    let deferred = !report.deferred.is_empty();
    let cache = lab.as_ref().filter(|l| healthy && !l.restored);
    if let (Some(round), true) = (round, healthy) {
        round.record(Judged {
            machine: m.cfg.machine.name.clone(),
            deferred,
            // Cached only once the final round has judged it whole.
            capture: cache.filter(|_| deferred).map(|c| (c.clone(), box_id.map(str::to_string))),
        });
    }
    if let Some(cache) = cache.filter(|_| !deferred) {
        lab_cache::capture(&m.cfg, p, &m.vm_name, &m.state, box_id, cache, Some(&session), ui);
    }
    report_counts(ui);
    Ok(if healthy { crate::exit::OK } else { crate::exit::UNHEALTHY })
}

impl Machine {
    /// The final health round of a multi-machine `up` for this machine ([`Round`]): every service judged with
    /// every Prometheus target (the other machines are up now), then the lab capture that waited for this verdict.
    /// The machine's lock is taken again (its `up` released it).
    pub fn final_health(&self, ui: &Ui, capture: Option<&(lab_cache::Plan, Option<String>)>) -> Result<i32> {
        final_health(ui, self, capture)
    }
}

fn final_health(ui: &Ui, m: &Machine, capture: Option<&(lab_cache::Plan, Option<String>)>) -> Result<i32> {
    let _lock = MachineLock::acquire(&m.state, "up")?;
    let session = connect(&m.cfg, &m.state, Duration::from_secs(60))?;
    let (available, unavailable) = crate::health::services(&m.cfg, m.profile);
    let report = crate::health::check_deferring(
        &m.cfg,
        m.profile,
        Some(&session),
        ui,
        HEALTH_TIMEOUT,
        &available,
        &unavailable,
        &[],
        None,
    )?;
    if !report.healthy {
        return Ok(crate::exit::UNHEALTHY);
    }
    if let Some((plan, box_id)) = capture {
        let p = provider::select(&m.cfg)?;
        lab_cache::capture(
            &m.cfg,
            p.as_ref(),
            &m.vm_name,
            &m.state,
            box_id.as_deref(),
            plan,
            Some(&session),
            ui,
        );
    }
    Ok(crate::exit::OK)
}

/// With `--json`: how many times this run rendered the provision tree and read state.json (once each), and
/// what it asked of the guest.
fn report_counts(ui: &Ui) {
    let (execs, prefetched, gets) = crate::ssh::exec_counts();
    ui.event(
        "run_counts",
        json!({"renders": crate::render::renders_in_thread(), "state_reads": MachineState::reads_in_thread(),
               "guest_execs": execs, "guest_execs_prefetched": prefetched, "guest_socket_gets": gets}),
    );
}

/// Create or start the machine (from the cached lab when one matches), recording it in `recorded` (and
/// state.json) before the hypervisor is touched; returns its (user, host) keys and, for a machine created now,
/// the lab cache plan.
fn boot(
    ui: &Ui,
    m: &Machine,
    p: &dyn Provider,
    live: VmState,
    recorded: &mut Option<MachineState>,
) -> Result<(crate::keys::KeyPair, crate::keys::KeyPair, Option<lab_cache::Plan>)> {
    // A master connection left from the machine's previous run would talk to a dead guest.
    close_ssh_master(ui, &m.state);
    let mut st = recorded.take().unwrap_or_default();
    let forwards = resolve_forwards(&m.cfg, &st);
    let ph = ui.phase("ports");
    crate::ports::check_free(&forwards)?;
    ph.done(&format!("{} forwards free", forwards.len()));

    let ph = ui.phase("box");
    let base = crate::boxes::ensure_ui(&m.cfg, p.name(), false, ui)?.0;
    ph.done(&base.id);

    // How the machine's key gets in: decided once, when the machine is made (docs/boxes.md "Boxes from Vagrant").
    let (route, why) = match (&live, st.keys_route.as_deref()) {
        (VmState::NotCreated, _) => offline::decide(m, p, &base)?,
        (_, Some("disk")) => (Route::Disk, "recorded".to_string()),
        (_, Some("insecure-once")) => {
            // Not booted again where more than loopback would reach it while it may still take the insecure key.
            if st.first_login_pending {
                insecure_once::check_allowed(&m.cfg)?;
            }
            (Route::InsecureOnce, "recorded".to_string())
        }
        _ => (Route::CloudInit, "recorded".to_string()),
    };

    let accel = crate::accel::decide_accel(m.cfg.machine.accel, &crate::accel::HostAccel::probe())?;
    // Cached labs are captures of cloud-init machines with one disk.
    let mut lab = match (&live, route) {
        (VmState::NotCreated, Route::CloudInit) if base.extra_disks.is_empty() => {
            let base_image = crate::guest::images::BaseImage::for_config(&m.cfg, m.profile).key;
            lab_cache::plan(&m.cfg, &m.vm_name, p.name(), accel.label(), &base.id, &base_image, ui)?
        }
        _ => None,
    };
    if let Some(hit) = lab.as_ref().and_then(|l| l.hit.as_ref()) {
        lab_cache::install_keys(hit, &m.state)?;
    }
    let (user_key, host_key) = crate::keys::ensure_machine_keys(&m.state, &m.cfg.machine.name)?;

    let private_net = private_nic(&m.cfg)?;
    if route == Route::CloudInit {
        let ph = ui.phase("keys");
        ph.done(&format!("cloud-init ({why}): ed25519 user and host keys in the seed"));
        let ph = ui.phase("seed");
        let seed = crate::seed::SeedSpec {
            // Changes whenever the host key does, so cloud-init re-applies a regenerated seed.
            instance_id: crate::seed::instance_id(&m.vm_name, &host_key),
            hostname: m.cfg.hostname().to_string(),
            user: m.cfg.ssh.user.clone(),
            user_key: user_key.clone(),
            host_key: host_key.clone(),
            hosts: peer_hosts(&m.cfg),
            private_nic: private_net.as_ref().map(|n| (n.mac.clone(), n.ip, n.prefix)),
        };
        crate::seed::write_seed(&seed, &m.state.seed_iso())?;
        ph.done("cidata");
    } else {
        // No seed: the domain gets no cloud-init drive.
        match std::fs::remove_file(m.state.seed_iso()) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("remove {}", m.state.seed_iso().display()))
            }
            _ => {}
        }
    }

    // KVM vs TCG is a QEMU choice; VirtualBox picks its own execution engine.
    if let (Some(w), ProviderKind::Libvirt) = (&accel.warning, p.kind()) {
        ui.warn(w);
    }
    let ssh = &forwards[0];
    st = MachineState {
        provider: p.name().to_string(),
        vm_name: m.vm_name.clone(),
        box_id: Some(base.id.clone()),
        ssh_host: Some(ssh.host_ip.clone()),
        ssh_port: Some(ssh.host),
        libvirt_uri: (p.kind() == ProviderKind::Libvirt).then(|| m.cfg.libvirt.uri.clone()),
        accel: Some(accel.label().to_string()),
        keys_route: Some(route.name().to_string()),
        // Set once, when the machine is made: its first `up` logs in with the insecure key (and no later one).
        first_login_pending: if live == VmState::NotCreated {
            route == Route::InsecureOnce
        } else {
            st.first_login_pending
        },
        ..st
    };
    // Recorded before the hypervisor is touched, so an interrupted `up` can be completed or destroyed.
    st.save(&m.state)?;

    let ph = ui.phase("create");
    let spec = MachineSpec {
        vm_name: m.vm_name.clone(),
        hostname: m.cfg.hostname().to_string(),
        cpus: m.cfg.machine.cpus,
        memory_mb: m.cfg.machine.memory_mb,
        disk_gb: m.cfg.machine.disk_gb,
        base,
        seed_iso: if route == Route::CloudInit { m.state.seed_iso() } else { std::path::PathBuf::new() },
        forwards,
        state: m.state.clone(),
        kvm: accel.kvm,
        private_net,
    };
    if let Some(plan) = lab.as_mut().filter(|l| l.hit.is_some()) {
        ph.done("from the cached lab");
        lab_cache::restore(p, &spec, plan, ui)?;
        *recorded = Some(st);
        return Ok((user_key, host_key, lab));
    }
    {
        // The machines of one project share their private network: one creates it at a time.
        let _project = project_lock(&m.cfg)?;
        // The provider may record the VM's id (VirtualBox's UUID) in `st` (and state.json).
        p.create(&spec, &mut st)?;
    }
    ph.done(&format!("{} ({})", m.vm_name, accel.label()));
    if route == Route::Disk && live == VmState::NotCreated {
        let ph = ui.phase("keys");
        let vm = vm_ref(Some(&st), &m.vm_name);
        let (user, line) = offline::inject(m, p, &vm, &why, &user_key, &host_key)?;
        st.ssh_user = (user != m.cfg.ssh.user).then_some(user);
        st.save(&m.state)?;
        ph.done(&line);
    }
    *recorded = Some(st);

    let ph = ui.phase("boot");
    p.start(&vm_ref(recorded.as_ref(), &m.vm_name))?;
    ph.done(if live == VmState::NotCreated { "created and started" } else { "started" });
    Ok((user_key, host_key, lab))
}

/// The machine's NIC on its project's private network (machines of a `[[machine]]` file only): MAC and network
/// name derived from the canonical project directory, so they are stable and unique per project.
fn private_nic(cfg: &Config) -> Result<Option<crate::provider::PrivateNic>> {
    let Some(member) = &cfg.member else { return Ok(None) };
    let project = crate::platform::canonicalize(cfg.base_dir())
        .with_context(|| format!("resolve the project directory {}", cfg.base_dir().display()))?;
    let project = project.to_string_lossy();
    let name = crate::provider::network::net_name(&project, &member.network.name);
    Ok(Some(crate::provider::PrivateNic {
        ip: member.ip,
        prefix: member.prefix,
        mac: crate::provider::network::mac_for(&project, &cfg.machine.name),
        net: crate::provider::PrivateNet::for_uri(&name, member.network.isolated, &cfg.libvirt.uri),
    }))
}

/// `/etc/hosts` entries for every machine of the project (its name, and its hostname when that differs).
fn peer_hosts(cfg: &Config) -> Vec<(String, std::net::Ipv4Addr)> {
    let Some(member) = &cfg.member else { return Vec::new() };
    let mut hosts = Vec::new();
    for p in &member.peers {
        hosts.push((p.name.clone(), p.ip));
        if p.hostname != p.name {
            hosts.push((p.hostname.clone(), p.ip));
        }
    }
    hosts
}

/// For a machine of a `[[machine]]` file, the project's lock (`.provisioner/project.lock`), waited for: held
/// while the machine's hypervisor objects (and the shared private network) are made.
fn project_lock(cfg: &Config) -> Result<Option<crate::machine::lock::FileLock>> {
    if cfg.member.is_none() {
        return Ok(None);
    }
    let dir = StateDir::beside(&cfg.path);
    dir.ensure()?;
    let path = dir.path(crate::machine::PROJECT_LOCK);
    Ok(Some(crate::machine::lock::wait_for(&path, Duration::from_secs(600))?))
}

/// Every forward, SSH first; an SSH host port of 0 becomes the port recorded earlier or a free one.
fn resolve_forwards(cfg: &Config, st: &MachineState) -> Vec<Forward> {
    let mut forwards = cfg.all_forwards();
    if forwards[0].host == 0 {
        forwards[0].host = st.ssh_port.filter(|p| *p != 0).unwrap_or_else(|| {
            std::net::TcpListener::bind((forwards[0].host_ip.as_str(), 0))
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .unwrap_or(0)
        });
    }
    forwards
}

/// The last lines of the serial console, as context for an SSH timeout, with what an empty console or a firmware
/// error means.
/// Why the guest did not answer SSH, from its serial console `text` (found at `place`).
fn serial_tail(text: &str, place: &str) -> String {
    if text.trim().is_empty() {
        return format!(
            "the guest did not answer SSH and its serial console ({}) stayed empty: not even the firmware printed \
             anything, so the machine never started to boot\n\
             hint: the box's disk is most likely unusable (truncated, damaged or not bootable): run `qemu-img check` \
             on it, remove it with `provisioner box remove ID` (`provisioner box list` shows the ids), get or build \
             it again, then `provisioner destroy -f && provisioner up`",
            place
        );
    }
    let hint = if text.contains("No bootable device") || text.contains("Boot failed") {
        "the firmware found nothing to boot on the disk: the box has no bootloader (or a damaged one); use a box \
         with a bootloader, or one with a kernel and initrd (such as a [box.debian] build), then \
         `provisioner destroy -f && provisioner up`"
    } else {
        "a guest that never reaches a login prompt has a boot problem (box, kernel command line, disk); one that \
         does may be slow (TCG): raise --boot-timeout"
    };
    format!(
        "the guest did not answer SSH; last {SERIAL_TAIL_LINES} lines of its serial console ({place}):\n{}\nhint: {hint}",
        crate::process::tail(text, SERIAL_TAIL_LINES)
    )
}

/// The VM of a created machine, with its lock held: what snapshots, suspend, resume and `package` act on.
pub struct CreatedVm {
    pub p: Box<dyn Provider>,
    /// How the provider addresses the VM (VirtualBox: its recorded UUID; libvirt: the domain name).
    pub vm: String,
    _lock: MachineLock,
}

impl Machine {
    /// The machine's VM for `what`: it must exist and be this project's (one of another project is refused,
    /// untouched); the machine's lock is held as long as the value lives.
    pub fn created(&self, what: &str) -> Result<CreatedVm> {
        if MachineState::load(&self.state)?.is_none() {
            bail!("machine {:?} is not created\nhint: `provisioner up` creates it", self.cfg.machine.name);
        }
        let p = provider::select(&self.cfg)?;
        // VirtualBox VMs are addressed by their recorded UUID, libvirt domains by name; checked to be this project's.
        let (vm, _) = self.my_vm(p.as_ref())?;
        let lock = MachineLock::acquire(&self.state, what)?;
        Ok(CreatedVm { p, vm, _lock: lock })
    }

    /// `snapshot save NAME`.
    pub fn snapshot_save(&self, ui: &Ui, name: &str) -> Result<()> {
        let t = self.created("snapshot")?;
        provider::check_snapshot_name(name)?;
        let ph = ui.phase("snapshot");
        t.p.snapshot_save(&t.vm, name)?;
        ph.done(&format!("saved {name}"));
        ui.event("snapshot_saved", json!({"name": name}));
        Ok(())
    }

    /// `snapshot restore NAME`; a guest running afterwards gets the host's clock and, when it is provisioned,
    /// its health is checked in the same session (as `up` ends): the exit code says whether the lab is green.
    pub fn snapshot_restore(&self, ui: &Ui, name: &str) -> Result<i32> {
        let t = self.created("snapshot")?;
        let ph = ui.phase("restore");
        t.p.snapshot_restore(&t.vm, name)?;
        let live = t.p.state(&t.vm)?;
        let running = live == VmState::Running;
        let provisioned = self.cfg.provision.enabled != Some(false);
        let services = (running && provisioned).then(|| crate::health::services(&self.cfg, self.profile));
        let (session, early) = match running {
            true => self.restored_session(ui, services.as_ref()),
            false => (None, None),
        };
        ph.done(&format!("{name} ({live})"));
        ui.event("snapshot_restored", json!({"name": name, "state": live}));
        let (Some(session), Some((available, unavailable))) = (session, services) else {
            return Ok(crate::exit::OK);
        };
        let report = crate::health::check_deferring(
            &self.cfg,
            self.profile,
            Some(&session),
            ui,
            HEALTH_TIMEOUT,
            &available,
            &unavailable,
            &[],
            early,
        )?;
        Ok(if report.healthy { crate::exit::OK } else { crate::exit::UNHEALTHY })
    }

    /// A session with a guest just brought back from saved memory, its clock set from the host's, and the first
    /// health round's container states fetched in the same round trip. None (with a warning) when the guest
    /// cannot be reached: the machine is usable either way.
    ///
    /// With `services` (available, unavailable), the health round's HTTP probes start once logged in and run during
    /// that round trip, as a restored cached lab's in `up`.
    fn restored_session(
        &self,
        ui: &Ui,
        services: Option<&(Vec<String>, Vec<String>)>,
    ) -> (Option<Session>, Option<crate::health::HostChecks>) {
        let clock = clock_command(std::time::SystemTime::now());
        let mut early = None;
        let mut set = || -> Result<Session> {
            let ssh = connect(&self.cfg, &self.state, Duration::from_secs(60))?;
            early = services.map(|(a, u)| crate::health::HostChecks::start(&self.cfg, self.profile, a, u));
            let project = crate::guest::compose::project_name(&self.cfg.machine.name);
            let mut cmds = vec![clock.clone()];
            if !crate::guest::send_containers_list(&ssh, &project, 1) {
                cmds.push(crate::guest::containers_command(&project));
            }
            ssh.prefetch(&cmds, Duration::from_secs(60));
            ssh.exec_ok(&clock, Duration::from_secs(30))?;
            Ok(ssh)
        };
        let session = set()
            .map_err(|e| ui.warn(format!("could not set the guest's clock after the restore: {e:#}")))
            .ok();
        (session, early)
    }

    /// `snapshot list`: the snapshot names.
    pub fn snapshot_list(&self) -> Result<Vec<String>> {
        let t = self.created("snapshot")?;
        t.p.snapshot_list(&t.vm)
    }

    /// `snapshot delete NAME`.
    pub fn snapshot_delete(&self, ui: &Ui, name: &str) -> Result<()> {
        let t = self.created("snapshot")?;
        let ph = ui.phase("snapshot delete");
        t.p.snapshot_delete(&t.vm, name)?;
        ph.done(name);
        Ok(())
    }

    /// `suspend`: the guest's memory saved by the hypervisor.
    pub fn suspend(&self, ui: &Ui) -> Result<()> {
        let t = self.created("suspend")?;
        let ph = ui.phase("suspend");
        t.p.suspend(&t.vm)?;
        ph.done("memory saved; `provisioner resume` continues");
        Ok(())
    }

    /// `resume`: back from saved memory, with the host's clock.
    pub fn resume(&self, ui: &Ui) -> Result<()> {
        let t = self.created("resume")?;
        let ph = ui.phase("resume");
        t.p.resume(&t.vm)?;
        sync_clock(&self.cfg, &self.state, ui);
        ph.done("running");
        Ok(())
    }
}

/// What `status` (and `destroy`) say of a recorded VM's owner.
pub fn foreign_note(owner: Option<&str>) -> String {
    match owner {
        Some(dir) if provider::owner_exists(owner) => format!("state dir {dir}"),
        Some(dir) => format!("state dir {dir}, which no longer exists"),
        None => "not made by provisioner".to_string(),
    }
}

fn halt_locked(ui: &Ui, m: &Machine, args: &HaltArgs) -> Result<i32> {
    if MachineState::load(&m.state)?.is_none() {
        ui.info(format!("{}: not created", m.cfg.machine.name));
        return Ok(crate::exit::OK);
    }
    let p = provider::select(&m.cfg)?;
    let (vm, _) = m.my_vm(p.as_ref())?;
    close_ssh_master(ui, &m.state);
    let ph = ui.phase("halt");
    p.halt(&vm, Duration::from_secs(args.timeout), args.force)?;
    ph.done(if args.force { "powered off" } else { "shut down" });
    Ok(crate::exit::OK)
}

impl Machine {
    /// `destroy` (asked for already): the VM, its disks and the state dir. A copied record of another project's
    /// VM is forgotten, that VM left untouched.
    pub fn destroy(&self, ui: &Ui) -> Result<i32> {
        destroy(ui, self)
    }
}

fn destroy(ui: &Ui, m: &Machine) -> Result<i32> {
    if !m.state.exists() {
        ui.info(format!("{}: not created; nothing to destroy", m.cfg.machine.name));
        return Ok(crate::exit::OK);
    }
    let lock = MachineLock::acquire(&m.state, "destroy")?;
    let recorded = MachineState::load(&m.state).ok().flatten();
    let vm_name = recorded.as_ref().map(|s| s.vm_name.clone()).unwrap_or(m.vm_name.clone());
    let p = provider::select(&m.cfg)?;
    let vm = vm_ref(recorded.as_ref(), &vm_name);
    if recorded.is_some() {
        if let Lookup::Foreign { owner } = p.lookup(&vm, &m.state)? {
            if owner.is_some() && !provider::owner_exists(owner.as_deref()) {
                // Moved, not copied: that VM has no other project to be destroyed from.
                return Err(provider::foreign_vm(p.name(), &vm, owner.as_deref(), &m.state));
            }
            // A copied record (or one of a VM provisioner did not make): forget it, never touch that VM.
            let ph = ui.phase("destroy");
            remove_state_dir(&m.state, lock)?;
            ph.done(&format!(
                "forgot this project's copied state; the {} VM {vm} belongs to another project ({}) and was left \
                 untouched",
                p.name(),
                foreign_note(owner.as_deref())
            ));
            return Ok(crate::exit::OK);
        }
    }
    close_ssh_master(ui, &m.state);
    let ph = ui.phase("destroy");
    p.destroy(&vm, &m.state)?;
    remove_state_dir(&m.state, lock)?;
    ph.done(&vm_name);
    Ok(crate::exit::OK)
}

/// Close the machine's OpenSSH master connection (see [`crate::ssh::control`]) so no ssh process outlives the
/// machine; a failure only warns: the machine going down ends the connection anyway.
fn close_ssh_master(ui: &Ui, state: &StateDir) {
    match crate::ssh::control::close_master(state) {
        Ok(true) => ui.event("ssh_master_closed", json!({})),
        Ok(false) => {}
        Err(e) => ui.warn(format!("could not close the SSH master connection: {e:#}")),
    }
}

/// Remove the state dir whose lock `lock` is: everything but the lock file under the lock, then, once it is
/// released, the lock file and the dir. (Windows cannot finish deleting a file this process holds open, so with
/// the lock still held the dir would never be empty: "Directory is not empty", os error 145.)
fn remove_state_dir(state: &StateDir, lock: MachineLock) -> Result<()> {
    let root = &state.root;
    let lock_file = state.lock_file();
    let ctx = || format!("remove the state dir {}", root.display());
    let entries = match std::fs::read_dir(root) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        other => other.with_context(ctx)?,
    };
    for entry in entries {
        let entry = entry.with_context(ctx)?;
        let path = entry.path();
        if path == lock_file {
            continue;
        }
        let removed = if entry.file_type().with_context(ctx)?.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        match removed {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e).with_context(ctx),
            _ => {}
        }
    }
    drop(lock);
    for removed in [std::fs::remove_file(&lock_file), std::fs::remove_dir(root)] {
        match removed {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e).with_context(ctx),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::machine_name_of;

    #[test]
    fn cloud_init_result_is_clean_only_without_errors() {
        use super::cloud_init_clean;
        // bookworm's cloud-init 22.4, and a newer one with the recoverable_errors map.
        assert!(cloud_init_clean(
            r#"{"v1": {"datasource": "DataSourceNoCloud [seed=/dev/sr0]", "errors": []}}"#
        ));
        assert!(cloud_init_clean(r#"{"v1": {"datasource": "x", "errors": [], "recoverable_errors": {}}}"#));
        assert!(!cloud_init_clean(r#"{"v1": {"datasource": "x", "errors": ["('ssh', ...)"]}}"#));
        assert!(!cloud_init_clean(
            r#"{"v1": {"datasource": "x", "errors": [], "recoverable_errors": {"WARNING": ["w"]}}}"#
        ));
        assert!(!cloud_init_clean(r#"{"v1": {}}"#));
        assert!(!cloud_init_clean(""));
    }

    #[test]
    fn machine_name_comes_back_out_of_the_vm_name() {
        assert_eq!(machine_name_of("provisioner-lab-86ee3d20"), Some("lab"));
        assert_eq!(machine_name_of("provisioner-my-lab-2-0e94640e"), Some("my-lab-2"));
        assert_eq!(machine_name_of("provisioner-lab"), None);
        assert_eq!(machine_name_of("someone-else-86ee3d20"), None);
    }
}
