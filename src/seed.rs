//! The cloud-init NoCloud seed: an ISO9660 image (label `cidata`, Joliet names) with `user-data`, `meta-data`
//! (and optionally `network-config`), written in Rust.
//!
//! A machine alone needs no `network-config`: cloud-init's fallback (DHCP on the first NIC) is what both QEMU
//! user networking and VirtualBox NAT expect. A machine on a private network gets a `network-config` (v2) that
//! matches each NIC by MAC: the first (NAT) one by [`crate::provider::network::PRIMARY_MAC`] with DHCP and the
//! default route, the private one with its static address and `optional: true`. cloud-init renders it into
//! `/etc/systemd/network/10-cloud-init-*.network`, which sort before the box's `20-provisioner-dhcp.network`
//! (`en* eth*`), so the private NIC never runs DHCP and `systemd-networkd-wait-online` has nothing to wait for.
//! Every machine of the project is named in `/etc/hosts` (written by `write_files`, with `manage_etc_hosts` off).

mod iso9660;

use std::net::Ipv4Addr;
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
    /// Every machine of the project (name, private address): `/etc/hosts` in each guest. Empty: cloud-init
    /// manages `/etc/hosts` as for a single machine.
    pub hosts: Vec<(String, Ipv4Addr)>,
    /// The private NIC: (MAC, address, prefix length).
    pub private_nic: Option<(String, Ipv4Addr, u8)>,
}

/// An instance-id for `machine` that changes whenever its host key does, so cloud-init treats a machine with new
/// keys as a new instance and applies the new seed (it runs the per-instance modules once per instance-id).
pub fn instance_id(machine: &str, host_key: &KeyPair) -> String {
    let digest = Sha256::digest(host_key.public_openssh.trim().as_bytes());
    format!("{machine}-{}", &hex::encode(digest)[..12])
}

/// The `network-config` (v2) of a machine with a private NIC, None without one.
pub fn network_config(spec: &SeedSpec) -> Result<Option<String>> {
    let Some((mac, ip, prefix)) = &spec.private_nic else { return Ok(None) };
    check_mac(mac)?;
    if *prefix == 0 || *prefix > 30 {
        bail!("the private network prefix /{prefix} is not usable (1-30)\nhint: use a subnet such as 10.77.0.0/24");
    }
    let primary = crate::provider::network::PRIMARY_MAC;
    if mac.eq_ignore_ascii_case(primary) {
        bail!(
            "the private NIC cannot have the first NIC's MAC {primary}\nhint: leave the MAC to provisioner"
        );
    }
    let doc = serde_json::json!({
        "version": 2,
        "ethernets": {
            "primary": {
                "match": {"macaddress": primary},
                "dhcp4": true,
            },
            "private": {
                "match": {"macaddress": mac.to_ascii_lowercase()},
                "dhcp4": false,
                "dhcp6": false,
                "addresses": [format!("{ip}/{prefix}")],
                "optional": true,
            },
        },
    });
    // JSON, which is YAML with every string quoted: unquoted, cloud-init's YAML 1.1 parser reads a MAC such as
    // 52:54:00:12:34:56 as a base-60 integer (and fails with "'int' object has no attribute 'lower'").
    let json = serde_json::to_string_pretty(&doc).context("render network-config")?;
    Ok(Some(format!(
        "# Written by provisioner: the first NIC by MAC with DHCP, the private one static.\n{json}\n"
    )))
}

fn check_mac(mac: &str) -> Result<()> {
    let ok =
        mac.len() == 17 && mac.split(':').all(|o| o.len() == 2 && o.chars().all(|c| c.is_ascii_hexdigit()));
    if !ok {
        bail!("{mac:?} is not a MAC address (xx:xx:xx:xx:xx:xx)\nhint: leave the MAC to provisioner");
    }
    Ok(())
}

/// Names as `/etc/hosts` takes them: letters, digits, `-` and `.` (RFC 1123), not starting with `-` or `.`.
fn check_host_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && !name.starts_with(['-', '.'])
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.'));
    if !ok {
        bail!(
            "{:?} cannot be a host name in /etc/hosts\nhint: name machines with letters, digits and `-`",
            crate::text::shown(name)
        );
    }
    Ok(())
}

/// The guest's `/etc/hosts` naming every machine of the project, None when `hosts` is empty. The machine's own
/// hostname maps to its private address when it is in the list, else to 127.0.1.1 (Debian's convention).
pub fn etc_hosts(spec: &SeedSpec) -> Result<Option<String>> {
    hosts_file(&spec.hostname, &spec.hosts)
}

/// [`etc_hosts`] from the hostname and the project's machines (also for boxes without cloud-init).
pub fn hosts_file(hostname: &str, hosts: &[(String, std::net::Ipv4Addr)]) -> Result<Option<String>> {
    struct S<'a> {
        hostname: &'a str,
        hosts: &'a [(String, std::net::Ipv4Addr)],
    }
    let spec = S { hostname, hosts };
    if spec.hosts.is_empty() {
        return Ok(None);
    }
    check_host_name(spec.hostname)?;
    let mut out = String::from("# Written by provisioner: the project's machines.\n");
    out.push_str("127.0.0.1\tlocalhost\n");
    if !spec.hosts.iter().any(|(n, _)| n == spec.hostname) {
        out.push_str(&format!("127.0.1.1\t{}\n", spec.hostname));
    }
    out.push_str(
        "::1\tlocalhost ip6-localhost ip6-loopback\nff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n",
    );
    for (name, ip) in spec.hosts {
        check_host_name(name)?;
        out.push_str(&format!("{ip}\t{name}\n"));
    }
    Ok(Some(out))
}

/// The instance-id written to meta-data: the spec's, plus a digest of the network part when there is one, so a
/// changed network (a machine added to the project, a new address) makes cloud-init apply the seed again (it
/// applies network-config and `write_files` once per instance).
fn effective_instance_id(spec: &SeedSpec, network: Option<&str>, hosts: Option<&str>) -> String {
    if network.is_none() && hosts.is_none() {
        return spec.instance_id.clone();
    }
    let mut h = Sha256::new();
    h.update(network.unwrap_or("").as_bytes());
    h.update([0]);
    h.update(hosts.unwrap_or("").as_bytes());
    format!("{}-n{}", spec.instance_id, &hex::encode(h.finalize())[..8])
}

/// The rendered `user-data` and `meta-data` documents.
pub fn render(spec: &SeedSpec) -> Result<(String, String)> {
    if spec.hostname.is_empty() || spec.user.is_empty() || spec.instance_id.is_empty() {
        bail!("cloud-init seed needs a hostname, a user and an instance-id (got {spec:?})");
    }
    let network = network_config(spec)?;
    let hosts = etc_hosts(spec)?;
    let instance_id = effective_instance_id(spec, network.as_deref(), hosts.as_deref());
    let mut hb = handlebars::Handlebars::new();
    hb.set_strict_mode(true);
    hb.register_escape_fn(handlebars::no_escape);
    // Values go in JSON-encoded: a JSON string is a YAML string, whatever it contains.
    let ctx = serde_json::json!({
        "instance_id": json(&instance_id),
        "etc_hosts": hosts.as_deref().map(json),
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
    let network = network_config(spec)?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let mut files: Vec<(&str, &[u8])> =
        vec![("user-data", user_data.as_bytes()), ("meta-data", meta_data.as_bytes())];
    if let Some(n) = &network {
        files.push(("network-config", n.as_bytes()));
    }
    let image = iso9660::build(LABEL, &files, iso9660::Stamp::from_unix(now))?;
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
            hosts: Vec::new(),
            private_nic: None,
        }
    }

    #[test]
    fn user_data_is_yaml_with_the_keys() {
        let s = spec();
        let (user_data, meta_data) = render(&s).unwrap();
        assert!(user_data.starts_with("#cloud-config\n"));
        let doc: serde_norway::Value = serde_norway::from_str(&user_data).unwrap();
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
        let meta: serde_norway::Value = serde_norway::from_str(&meta_data).unwrap();
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

    fn on_network(s: &mut SeedSpec) {
        s.hostname = "web".into();
        s.hosts = vec![
            ("monitor".into(), "10.77.0.10".parse().unwrap()),
            ("web".into(), "10.77.0.11".parse().unwrap()),
        ];
        s.private_nic = Some(("52:54:00:AB:cd:01".into(), "10.77.0.11".parse().unwrap(), 24));
    }

    #[test]
    fn a_single_machine_keeps_cloud_init_defaults() {
        let s = spec();
        assert_eq!(network_config(&s).unwrap(), None);
        let (user_data, meta_data) = render(&s).unwrap();
        let doc: serde_norway::Value = serde_norway::from_str(&user_data).unwrap();
        assert_eq!(doc["manage_etc_hosts"], true);
        assert!(doc.get("write_files").is_none());
        let meta: serde_norway::Value = serde_norway::from_str(&meta_data).unwrap();
        assert_eq!(meta["instance-id"].as_str(), Some(s.instance_id.as_str()));
    }

    #[test]
    fn private_network_config_matches_both_nics_by_mac() {
        let mut s = spec();
        on_network(&mut s);
        let text = network_config(&s).unwrap().unwrap();
        // Quoted: YAML 1.1 (cloud-init's PyYAML) reads an unquoted 52:54:00:12:34:56 as a base-60 integer.
        assert!(text.contains("\"52:54:00:12:34:56\"") && text.contains("\"52:54:00:ab:cd:01\""), "{text}");
        let net: serde_norway::Value = serde_norway::from_str(&text).unwrap();
        assert_eq!(net["version"], 2);
        let primary = &net["ethernets"]["primary"];
        assert_eq!(primary["match"]["macaddress"], crate::provider::network::PRIMARY_MAC);
        assert_eq!(primary["dhcp4"], true);
        let private = &net["ethernets"]["private"];
        assert_eq!(private["match"]["macaddress"], "52:54:00:ab:cd:01");
        assert_eq!(private["dhcp4"], false);
        assert_eq!(private["addresses"][0], "10.77.0.11/24");
        assert_eq!(private["optional"], true);
        assert!(private.get("gateway4").is_none() && private.get("routes").is_none(), "no default route");
    }

    #[test]
    fn etc_hosts_names_every_machine() {
        let mut s = spec();
        on_network(&mut s);
        let (user_data, meta_data) = render(&s).unwrap();
        let doc: serde_norway::Value = serde_norway::from_str(&user_data).unwrap();
        assert_eq!(doc["manage_etc_hosts"], false);
        assert_eq!(doc["write_files"][0]["path"], "/etc/hosts");
        let hosts = doc["write_files"][0]["content"].as_str().unwrap();
        let lines: Vec<&str> = hosts.lines().collect();
        assert!(lines.contains(&"10.77.0.10\tmonitor") && lines.contains(&"10.77.0.11\tweb"), "{hosts}");
        assert!(lines.contains(&"127.0.0.1\tlocalhost"), "{hosts}");
        // Its own name is its private address, not 127.0.1.1.
        assert!(!hosts.contains("127.0.1.1"), "{hosts}");
        // A changed network is a new instance for cloud-init (it applies network-config once per instance).
        let meta: serde_norway::Value = serde_norway::from_str(&meta_data).unwrap();
        let id = meta["instance-id"].as_str().unwrap().to_string();
        assert!(id.starts_with(&format!("{}-n", s.instance_id)), "{id}");
        s.hosts.push(("db".into(), "10.77.0.12".parse().unwrap()));
        let (_, meta2) = render(&s).unwrap();
        assert!(!meta2.contains(&id), "{meta2}");
    }

    #[test]
    fn bad_network_values_are_refused() {
        let mut s = spec();
        on_network(&mut s);
        s.hosts.push(("evil\n1.2.3.4 bank".into(), "10.77.0.12".parse().unwrap()));
        let e = render(&s).unwrap_err().to_string();
        assert!(e.contains("hint:"), "{e}");
        let mut s = spec();
        on_network(&mut s);
        s.private_nic = Some(("nope".into(), "10.77.0.11".parse().unwrap(), 24));
        assert!(network_config(&s).unwrap_err().to_string().contains("not a MAC"));
        s.private_nic =
            Some((crate::provider::network::PRIMARY_MAC.into(), "10.77.0.11".parse().unwrap(), 24));
        assert!(network_config(&s).is_err());
        s.private_nic = Some(("52:54:00:ab:cd:01".into(), "10.77.0.11".parse().unwrap(), 0));
        assert!(network_config(&s).is_err());
    }

    #[test]
    fn hostile_values_cannot_inject_yaml() {
        let mut s = spec();
        s.hostname = "x\nruncmd: [reboot]".into();
        let (user_data, _) = render(&s).unwrap();
        let doc: serde_norway::Value = serde_norway::from_str(&user_data).unwrap();
        assert!(doc.get("runcmd").is_none());
        assert_eq!(doc["hostname"], "x\nruncmd: [reboot]");
    }
}
