//! What every command gets: the global options, the output, and the machine it acts on.

use anyhow::Result;

use crate::cli::Global;
use crate::config::Config;
use crate::machine::StateDir;
use crate::profile::Profile;
use crate::ui::Ui;

/// What every command gets.
#[derive(Clone)]
pub(crate) struct Ctx {
    pub global: Global,
    pub ui: Ui,
    /// The workload every machine of the run provisions (given once, by [`crate::run`]).
    pub profile: &'static Profile,
    /// The machine this command acts on when it is one of a `[[machine]]` file (validated with the project).
    pub member: Option<Config>,
    /// The multi-machine `up`/`reload` this machine is brought up in, with other machines at once.
    pub round: Option<std::sync::Arc<crate::lifecycle::round::Round>>,
    /// Why the `[machine]` file, loaded leniently for a command that looks after an existing machine (`status`,
    /// `port`, `halt`, `destroy`), does not validate: the machine is then found from its recorded state.
    pub invalid: Option<std::sync::Arc<anyhow::Error>>,
}

impl Ctx {
    /// Load and validate the config named by --config (the machine's own config for one of several).
    pub(crate) fn config(&self) -> Result<Config> {
        match &self.member {
            Some(cfg) => Ok(cfg.clone()),
            None => crate::config::Config::load(&self.global.config),
        }
    }

    /// The context of one machine of `project`: its config, its output labelled as the project says
    /// ([`crate::config::Project::label_for`]: by name among several, as it always was for a `[machine]` file).
    pub(crate) fn for_member(
        &self,
        project: &crate::config::Project,
        cfg: &Config,
        bars: Option<&indicatif::MultiProgress>,
    ) -> Ctx {
        Ctx {
            ui: self.ui.for_machine(project.label_for(cfg), bars),
            member: Some(cfg.clone()),
            ..self.clone()
        }
    }

    /// The machine this command acts on: its config, identity and lifecycle.
    pub(crate) fn machine(&self) -> Result<crate::lifecycle::Machine> {
        crate::lifecycle::Machine::new(self.config()?, self.profile)
    }

    /// The machine of a command that looks after it (`status`, `port`, `halt`, `destroy`): found from its
    /// recorded state when the file no longer validates ([`crate::lifecycle::Machine::existing`]).
    pub(crate) fn existing_machine(&self) -> Result<crate::lifecycle::Machine> {
        crate::lifecycle::Machine::existing(self.config()?, self.profile, self.invalid.as_deref(), &self.ui)
    }

    pub(crate) fn state(&self, cfg: &Config) -> StateDir {
        StateDir::for_config(cfg)
    }
}
