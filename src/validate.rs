//! The whole check of a machine's config: the file's own rules ([`crate::config`]) and the cross-references against
//! its provision tree as it renders ([`crate::render`]). It sits above both, so config never renders and render
//! never validates.

use anyhow::Result;

use crate::config::{Config, Warning, COMPOSE_FILES};
use crate::profile::Profile;
use crate::render::{render_layers, Rendered};

/// Every check, the provision tree rendered in memory with the profile's throwaway secrets. Errors are a
/// [`crate::config::ConfigError`] (or a render error naming the template); Ok holds warnings.
pub fn all(cfg: &Config, profile: &Profile) -> Result<Vec<Warning>> {
    all_with(cfg, profile, None)
}

/// [`all`] with the provision tree already rendered (`up` renders it once per run, with the machine's secrets, and
/// validates that same tree).
pub fn all_with(cfg: &Config, profile: &Profile, rendered: Option<&Rendered>) -> Result<Vec<Warning>> {
    cfg.validate_with_tree(profile, &|| {
        let owned;
        let tree = match rendered {
            Some(r) => r,
            None => {
                owned = render_layers(cfg, &cfg.template_layers(), &(profile.sample_secrets)())?;
                &owned
            }
        };
        Ok(COMPOSE_FILES.iter().find_map(|n| tree.get(n)).map(|c| (c.path.clone(), c.contents.clone())))
    })
}
