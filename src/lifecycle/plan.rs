//! The per-machine plan of one `up`: everything computed once per run and passed down the pipeline config → box
//! → provider → ssh → guest → health. The provision tree is rendered once (with the machine's secrets) and that
//! tree is what validation checks, the guest receives and the health check reads its services from; `state.json`
//! is read once and kept up to date in memory; the SSH endpoint comes from that state alone.
//!
//! One plan per machine: in a `[[machine]]` project each machine's `up` (its own thread) builds its own
//! plan from its own [`Config`] and state dir, so nothing is shared between machines but the read-only project.

use anyhow::{Context, Result};

use crate::config::Config;
use crate::guest::Lab;
use crate::machine::state::MachineState;
use crate::machine::StateDir;
use crate::profile::Profile;
use crate::ssh::Endpoint;
use crate::ui::Ui;

pub struct Plan<'a> {
    pub cfg: &'a Config,
    /// The absolute state dir.
    pub dir: &'a StateDir,
    /// `state.json` as read at the start of the run; `up` updates it here and saves it.
    pub state: Option<MachineState>,
    /// The rendered tree and compose model; `None` when `[provision] enabled = false` or the source is missing
    /// (validation then says so).
    pub lab: Option<Lab>,
}

impl<'a> Plan<'a> {
    /// Render the provision tree (when provisioning is on), validate the config against that tree (warnings go
    /// to `ui`), and read the recorded state.
    pub fn build(cfg: &'a Config, dir: &'a StateDir, profile: &'static Profile, ui: &Ui) -> Result<Plan<'a>> {
        let source = cfg.resolve(&cfg.provision.source);
        let lab = if cfg.provision.enabled != Some(false) && cfg.template_layers().iter().all(|l| l.is_dir())
        {
            Some(Lab::render(cfg, dir, profile).with_context(|| crate::config::render_failed(&source))?)
        } else {
            None
        };
        for w in crate::validate::all_with(cfg, profile, lab.as_ref().map(|l| &l.rendered))? {
            ui.warn(w.to_string());
        }
        let state = MachineState::load(dir)?;
        Ok(Plan { cfg, dir, state, lab })
    }

    /// The machine's SSH endpoint, from the recorded state and the pinned host public key.
    pub fn endpoint(&self, host_key: &str) -> Result<Endpoint> {
        Endpoint::from_state(self.cfg, self.dir, self.state.as_ref(), host_key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The repo's lab config in a temp project (the tree copied beside it), its state dir, and the VM name.
    fn project() -> (tempfile::TempDir, Config) {
        let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let t = tempfile::tempdir().unwrap();
        let tree = repo.join("provision");
        for e in walkdir::WalkDir::new(&tree) {
            let e = e.unwrap();
            let to = t.path().join("provision").join(e.path().strip_prefix(&tree).unwrap());
            if e.file_type().is_dir() {
                std::fs::create_dir_all(&to).unwrap();
            } else {
                std::fs::copy(e.path(), &to).unwrap();
            }
        }
        let path = t.path().join("box-config.toml");
        std::fs::copy(repo.join("box-config.toml"), &path).unwrap();
        let cfg = Config::load(&path).unwrap();
        (t, cfg)
    }

    #[test]
    fn a_plan_renders_once_reads_state_once_and_validates_the_tree_it_keeps() {
        let (_t, cfg) = project();
        let dir = StateDir::for_config(&cfg);
        let st = MachineState {
            provider: "libvirt".into(),
            vm_name: "vm".into(),
            ssh_host: Some("127.0.0.1".into()),
            ssh_port: Some(2299),
            ..Default::default()
        };
        st.save(&dir).unwrap();
        let (renders, reads) = (crate::render::renders_in_thread(), MachineState::reads_in_thread());
        let plan = Plan::build(&cfg, &dir, &crate::lab::PROFILE, &Ui::new(false, true)).unwrap();
        assert_eq!(crate::render::renders_in_thread() - renders, 1, "validation reuses the rendered tree");
        assert_eq!(MachineState::reads_in_thread() - reads, 1);
        let lab = plan.lab.as_ref().expect("the lab renders");
        // Rendered with the machine's secrets (kept in the state dir), not throwaway ones.
        let secrets = std::fs::read_to_string(dir.secrets()).unwrap();
        let grafana = secrets.lines().find(|l| l.contains("grafana")).expect("a grafana secret");
        let value = grafana.split('"').nth(1).unwrap();
        assert!(lab.rendered.files.iter().any(|f| String::from_utf8_lossy(&f.contents).contains(value)));
        assert!(lab.services(&cfg).0.contains(&"prometheus".to_string()));
        let ep = plan.endpoint("ssh-ed25519 AAAA").unwrap();
        assert_eq!(ep.addr.to_string(), "127.0.0.1:2299");
        assert!(ep.key.is_absolute());
        assert_eq!(MachineState::reads_in_thread() - reads, 1, "the endpoint comes from the state read once");
    }

    #[test]
    fn no_render_when_provisioning_is_off_and_a_missing_tree_is_a_validation_error() {
        let (t, mut cfg) = project();
        let dir = StateDir::for_config(&cfg);
        cfg.provision.enabled = Some(false);
        let renders = crate::render::renders_in_thread();
        let plan = Plan::build(&cfg, &dir, &crate::lab::PROFILE, &Ui::new(false, true)).unwrap();
        assert!(plan.lab.is_none() && plan.state.is_none());
        assert_eq!(crate::render::renders_in_thread(), renders);
        assert!(plan.endpoint("k").unwrap_err().to_string().contains("not created; run `provisioner up`"));
        cfg.provision.enabled = None;
        std::fs::remove_dir_all(t.path().join("provision")).unwrap();
        let e = format!(
            "{:#}",
            Plan::build(&cfg, &dir, &crate::lab::PROFILE, &Ui::new(false, true)).err().unwrap()
        );
        assert!(e.contains("does not exist"), "{e}");
    }
}
