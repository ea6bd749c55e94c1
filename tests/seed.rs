//! Tests: the cloud-init seed image, read back with the standard tools (isoinfo, blkid).

use std::path::Path;
use std::time::Duration;

use provisioner::keys;
use provisioner::machine::StateDir;
use provisioner::process::Cmd;
use provisioner::seed::{self, SeedSpec};

fn tool(program: &str, args: &[&str], iso: &Path) -> String {
    let out = Cmd::new(program).args(args).arg(iso).timeout(Duration::from_secs(30)).run().unwrap();
    out.stdout
}

#[test]
fn seed_iso_reads_back_with_isoinfo_and_blkid() {
    let dir = tempfile::tempdir().unwrap();
    let state = StateDir::at(dir.path().join(".provisioner"));
    let (user_key, host_key) = keys::ensure_machine_keys(&state, "lab").unwrap();
    let spec = SeedSpec {
        instance_id: seed::instance_id("lab", &host_key),
        hostname: "lab".into(),
        user: "provisioner".into(),
        user_key,
        host_key,
        hosts: Vec::new(),
        private_nic: None,
    };
    let iso = state.seed_iso();
    seed::write_seed(&spec, &iso).unwrap();
    let (user_data, meta_data) = seed::render(&spec).unwrap();

    let d = tool("isoinfo", &["-d", "-i"], &iso);
    assert!(d.contains("Volume id: cidata") || d.contains("Volume id: CIDATA"), "{d}");
    assert!(d.contains("Joliet with UCS level 3 found"), "{d}");

    let listing = tool("isoinfo", &["-J", "-f", "-i"], &iso);
    let mut names: Vec<&str> = listing.lines().collect();
    names.sort();
    assert_eq!(names, ["/meta-data", "/user-data"], "{listing}");
    assert_eq!(tool("isoinfo", &["-J", "-x", "/user-data", "-i"], &iso), user_data);
    assert_eq!(tool("isoinfo", &["-J", "-x", "/meta-data", "-i"], &iso), meta_data);
    // The image carries the guest's private host key.
    assert!(user_data.contains("OPENSSH PRIVATE KEY"));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&iso).unwrap().permissions().mode() & 0o777, 0o600);

    let blkid = tool("blkid", &["-p", "-o", "export"], &iso);
    assert!(blkid.contains("TYPE=iso9660"), "{blkid}");
    assert!(blkid.lines().any(|l| l == "LABEL=cidata"), "{blkid}");

    // Rewriting (e.g. after new keys) replaces the image atomically with the new content.
    let mut spec2 = spec.clone();
    spec2.host_key = keys::generate("new").unwrap();
    spec2.instance_id = seed::instance_id("lab", &spec2.host_key);
    seed::write_seed(&spec2, &iso).unwrap();
    let meta2 = tool("isoinfo", &["-J", "-x", "/meta-data", "-i"], &iso);
    assert!(meta2.contains(&spec2.instance_id) && !meta2.contains(&spec.instance_id), "{meta2}");
}

/// A machine on the private network: `network-config` is on the image too, and reads back as written.
#[test]
fn seed_iso_carries_network_config_and_hosts() {
    let dir = tempfile::tempdir().unwrap();
    let state = StateDir::at(dir.path().join(".provisioner"));
    let (user_key, host_key) = keys::ensure_machine_keys(&state, "web").unwrap();
    let spec = SeedSpec {
        instance_id: seed::instance_id("web", &host_key),
        hostname: "web".into(),
        user: "provisioner".into(),
        user_key,
        host_key,
        hosts: vec![
            ("monitor".into(), "10.77.0.10".parse().unwrap()),
            ("web".into(), "10.77.0.11".parse().unwrap()),
        ],
        private_nic: Some(("52:54:00:aa:bb:cc".into(), "10.77.0.11".parse().unwrap(), 24)),
    };
    let iso = state.seed_iso();
    seed::write_seed(&spec, &iso).unwrap();
    let listing = tool("isoinfo", &["-J", "-f", "-i"], &iso);
    let mut names: Vec<&str> = listing.lines().collect();
    names.sort();
    assert_eq!(names, ["/meta-data", "/network-config", "/user-data"], "{listing}");
    let net = tool("isoinfo", &["-J", "-x", "/network-config", "-i"], &iso);
    assert_eq!(Some(net.clone()), seed::network_config(&spec).unwrap());
    let doc: serde_norway::Value = serde_norway::from_str(&net).unwrap();
    assert_eq!(doc["ethernets"]["private"]["addresses"][0], "10.77.0.11/24");
    // cloud-init reads it with PyYAML (YAML 1.1), where an unquoted 52:54:00:12:34:56 is a base-60 integer.
    // The system Python with Debian's PyYAML, as cloud-init itself runs (not a pyenv or venv python on PATH).
    let py = Cmd::new("/usr/bin/python3")
        .args([
            "-c",
            "import sys,yaml\nd=yaml.safe_load(open(sys.argv[1]))['ethernets']\n\
             print(*[type(d[k]['match']['macaddress']).__name__ for k in sorted(d)])",
        ])
        .arg(dir.path().join("net.yaml"))
        .timeout(Duration::from_secs(30));
    std::fs::write(dir.path().join("net.yaml"), &net).unwrap();
    assert_eq!(py.run().unwrap().stdout.trim(), "str str", "MACs must load as strings in YAML 1.1");
    assert_eq!(doc["ethernets"]["private"]["match"]["macaddress"], "52:54:00:aa:bb:cc");
    let user_data = tool("isoinfo", &["-J", "-x", "/user-data", "-i"], &iso);
    let doc: serde_norway::Value = serde_norway::from_str(&user_data).unwrap();
    assert!(
        doc["write_files"][0]["content"].as_str().unwrap().contains("10.77.0.10\tmonitor"),
        "{user_data}"
    );
}
