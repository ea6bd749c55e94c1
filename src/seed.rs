//! The cloud-init NoCloud seed: an ISO9660 image (label `cidata`, Joliet names) with `user-data`, `meta-data`
//! (and optionally `network-config`), written in Rust.
//!
//! The guest's network needs no `network-config`: cloud-init's fallback (DHCP on the first NIC) is what both
//! QEMU user networking and VirtualBox NAT expect.

mod iso9660;

use std::path::Path;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::keys::KeyPair;

/// Volume label cloud-init's NoCloud datasource looks for.
pub const LABEL: &str = "cidata";

const USER_DATA: &str = include_str!("../assets/cloud-init/user-data.hbs");
const META_DATA: &str = include_str!("../assets/cloud-init/meta-data.hbs");

/// What goes into the seed.
#[derive(Debug, Clone)]
pub struct SeedSpec {
    pub instance_id: String,
    pub hostname: String,
    pub user: String,
    pub user_key: KeyPair,
    pub host_key: KeyPair,
}

/// An instance-id for `machine` that changes whenever its host key does, so cloud-init treats a machine with new
/// keys as a new instance and applies the new seed (it runs the per-instance modules once per instance-id).
pub fn instance_id(machine: &str, host_key: &KeyPair) -> String {
    let digest = Sha256::digest(host_key.public_openssh.trim().as_bytes());
    format!("{machine}-{}", &hex::encode(digest)[..12])
}

/// The rendered `user-data` and `meta-data` documents.
pub fn render(spec: &SeedSpec) -> Result<(String, String)> {
    if spec.hostname.is_empty() || spec.user.is_empty() || spec.instance_id.is_empty() {
        bail!("cloud-init seed needs a hostname, a user and an instance-id (got {spec:?})");
    }
    let mut hb = handlebars::Handlebars::new();
    hb.set_strict_mode(true);
    hb.register_escape_fn(handlebars::no_escape);
    // Values go in JSON-encoded: a JSON string is a YAML string, whatever it contains.
    let ctx = serde_json::json!({
        "instance_id": json(&spec.instance_id),
        "hostname": json(&spec.hostname),
        "user": json(&spec.user),
        "user_key": json(spec.user_key.public_openssh.trim()),
        "host_private": json(&spec.host_key.private_openssh),
        "host_public": json(spec.host_key.public_openssh.trim()),
    });
    let user_data = hb.render_template(USER_DATA, &ctx).context("render assets/cloud-init/user-data.hbs")?;
    let meta_data = hb.render_template(META_DATA, &ctx).context("render assets/cloud-init/meta-data.hbs")?;
    Ok((user_data, meta_data))
}

fn json(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

/// Render user-data/meta-data (from assets/cloud-init/) and write the ISO atomically to `out`.
///
/// The image carries the guest's private host key, so it is written 0600.
pub fn write_seed(spec: &SeedSpec, out: &Path) -> Result<()> {
    let (user_data, meta_data) = render(spec)?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let image = iso9660::build(
        LABEL,
        &[("user-data", user_data.as_bytes()), ("meta-data", meta_data.as_bytes())],
        iso9660::Stamp::from_unix(now),
    )?;
    crate::machine::write_private(out, &image, 0o600)
        .with_context(|| format!("write cloud-init seed {}", out.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::generate;

    fn spec() -> SeedSpec {
        let host_key = generate("host").unwrap();
        SeedSpec {
            instance_id: instance_id("lab", &host_key),
            hostname: "lab".into(),
            user: "provisioner".into(),
            user_key: generate("user").unwrap(),
            host_key,
        }
    }

    #[test]
    fn user_data_is_yaml_with_the_keys() {
        let s = spec();
        let (user_data, meta_data) = render(&s).unwrap();
        assert!(user_data.starts_with("#cloud-config\n"));
        let doc: serde_yaml::Value = serde_yaml::from_str(&user_data).unwrap();
        assert_eq!(doc["hostname"], "lab");
        assert_eq!(doc["users"][0]["name"], "provisioner");
        assert_eq!(doc["users"][0]["sudo"], "ALL=(ALL) NOPASSWD:ALL");
        assert_eq!(
            doc["users"][0]["ssh_authorized_keys"][0].as_str(),
            Some(s.user_key.public_openssh.as_str())
        );
        assert_eq!(doc["ssh_keys"]["ed25519_private"].as_str(), Some(s.host_key.private_openssh.as_str()));
        assert_eq!(doc["ssh_keys"]["ed25519_public"].as_str(), Some(s.host_key.public_openssh.as_str()));
        assert_eq!(doc["ssh_deletekeys"], true);
        assert_eq!(doc["ssh_pwauth"], false);
        assert_eq!(doc["ssh_genkeytypes"].as_sequence().map(Vec::len), Some(0));
        let meta: serde_yaml::Value = serde_yaml::from_str(&meta_data).unwrap();
        assert_eq!(meta["instance-id"].as_str(), Some(s.instance_id.as_str()));
        assert_eq!(meta["local-hostname"], "lab");
    }

    #[test]
    fn instance_id_follows_the_host_key() {
        let (a, b) = (generate("a").unwrap(), generate("b").unwrap());
        assert_eq!(instance_id("lab", &a), instance_id("lab", &a));
        assert_ne!(instance_id("lab", &a), instance_id("lab", &b));
        assert!(instance_id("lab", &a).starts_with("lab-"));
    }

    #[test]
    fn hostile_values_cannot_inject_yaml() {
        let mut s = spec();
        s.hostname = "x\nruncmd: [reboot]".into();
        let (user_data, _) = render(&s).unwrap();
        let doc: serde_yaml::Value = serde_yaml::from_str(&user_data).unwrap();
        assert!(doc.get("runcmd").is_none());
        assert_eq!(doc["hostname"], "x\nruncmd: [reboot]");
    }
}
