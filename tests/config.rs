//! box-config.toml: the shipped file validates; every class of mistake gets its exact, positioned message;
//! thousands of mutated files never panic and always say where (or that the file is not UTF-8).

use std::path::Path;

use proptest::prelude::*;
use provisioner::config::{Config, ConfigError, Protocol};

use crate::support::{self, Test};

/// A small valid config whose provision tree (see [`tree`]) publishes 8000 and 9090.
const BASE: &str = r#"[machine]
name = "cfg-test"
cpus = 1
memory_mb = 512

[box]
image = "base.qcow2"

[ssh]
host_port = 2222

[[forward]]
name = "demo-app"
guest = 8000
host = 18000

[[forward]]
name = "prometheus"
guest = 9090
host = 19090
"#;

const COMPOSE: &str = r#"services:
  demo-app:
    image: demo:{{vars.tag}}
    ports: ["127.0.0.1:8000:8000"]
  prometheus:
    image: prom
    ports:
      - target: 9090
        published: 9090
"#;

/// A provision tree next to the config.
fn tree(t: &Test) {
    t.write("provision/vars.toml", "tag = \"1\"\n");
    t.write("provision/docker-compose.yml.hbs", COMPOSE);
}

/// `validate` with this config text; returns the run.
fn validate(config: impl AsRef<[u8]>) -> crate::support::Run {
    let t = Test::new().arg("validate");
    tree(&t);
    t.write("box-config.toml", config);
    t.run()
}

/// `validate` must fail and print exactly these lines (after `error: ` on the first).
#[track_caller]
fn fails_with(config: impl AsRef<[u8]>, expected: &str) {
    let r = validate(config).failure();
    assert_eq!(r.code(), Some(1));
    // Paths in messages use the host's separators (`.\\provision\\x` on Windows).
    assert_eq!(support::slashes(&r.stderr()), format!("error: {expected}\n"), "stderr differs");
}

#[test]
fn shipped_config_validates() {
    let r = Test::with_lab().arg("validate").run().success();
    // The verdict is the command's output: stdout.
    assert!(r.stdout().starts_with("box-config.toml: valid (machine \"lab\""), "{}", r.stdout());
    assert!(!r.stderr().contains("valid (machine"), "{}", r.stderr());
    let r = Test::with_lab().args(["validate", "--json"]).run().success();
    let doc: serde_json::Value = serde_json::from_str(r.stdout().trim()).expect("one JSON document");
    assert_eq!(doc["valid"], true);
    assert_eq!(doc["machine"], "lab");
    assert_eq!(doc["errors"], serde_json::json!([]));
}

#[test]
fn base_fixture_validates_without_warnings_about_ports() {
    let r = validate(BASE).success();
    assert!(r.stdout().contains("box-config.toml: valid (machine \"cfg-test\""), "{}", r.stdout());
    // Lab-default probes for services this fixture does not forward are warnings, not errors.
    assert!(r
        .stderr()
        .contains("warning: box-config.toml:12:1: health probe \"alertmanager\" uses guest port 9093"));
    assert!(!r.stderr().contains("demo-app\" uses"), "{}", r.stderr());
}

#[test]
fn unknown_key_names_the_table_and_the_allowed_keys() {
    fails_with(
        BASE.replace("cpus = 1", "cpu = 1"),
        "box-config.toml:3:1: unknown key `cpu` in [machine]; expected one of: name, hostname, provider, cpus, \
         memory_mb, disk_gb, accel, cache_lab\nhint: did you mean `cpus`?",
    );
    fails_with(
        BASE.replace("host = 19090", "host = 19090\nhots = 1"),
        "box-config.toml:21:1: unknown key `hots` in [[forward]] #2; expected one of: guest, host, host_ip, \
         protocol, name\nhint: did you mean `host`?",
    );
}

#[test]
fn wrong_type_says_expected_and_found() {
    fails_with(
        BASE.replace("cpus = 1", "cpus = \"1\""),
        "box-config.toml:3:8: wrong type for `cpus` in [machine]: expected an integer, found a string",
    );
    fails_with(
        BASE.replace("guest = 8000", "guest = 70000"),
        "box-config.toml:14:9: `guest` in [[forward]] #1 is out of range: expected an integer from 0 to 65535, \
         found 70000",
    );
}

#[test]
fn bad_enum_lists_allowed_values() {
    fails_with(
        BASE.replace("cpus = 1", "cpus = 1\nprovider = \"qemu\""),
        "box-config.toml:4:12: bad value \"qemu\" for `provider` in [machine]; expected one of: auto, libvirt, \
         virtualbox\nhint: set `provider` to one of: auto, libvirt, virtualbox",
    );
}

#[test]
fn missing_required_key_and_table() {
    fails_with(
        BASE.replace("name = \"cfg-test\"\n", ""),
        "box-config.toml:1:1: missing required key `name` in [machine]\nhint: add the key `name`; see \
         docs/box-config.md",
    );
    fails_with(
        BASE.replace("[box]\nimage = \"base.qcow2\"\n", ""),
        "box-config.toml:1:1: missing required table [box]\nhint: add the table [box]; see docs/box-config.md",
    );
}

#[test]
fn box_needs_exactly_one_source() {
    fails_with(
        BASE.replace("image = \"base.qcow2\"", "image = \"base.qcow2\"\nvagrant = \"x.box\""),
        "box-config.toml:8:11: two box sources: `image` and `vagrant`; keep exactly one of: image, url (+ sha256), \
         vagrant, [box.debian]\nhint: remove all but one box source",
    );
    fails_with(
        BASE.replace("image = \"base.qcow2\"", "firmware = \"uefi\""),
        "box-config.toml:6:1: no box source in [box]; set exactly one of: image, url (+ sha256), vagrant, \
         [box.debian]\nhint: the shipped box-config.toml builds one from the Debian mirror with [box.debian]",
    );
}

#[test]
fn bad_sha256_and_url_without_sha256() {
    fails_with(
        BASE.replace("image = \"base.qcow2\"", "url = \"https://example.org/a.qcow2\"\nsha256 = \"abc123\""),
        "box-config.toml:8:10: `sha256` must be 64 hexadecimal digits, found 6 characters \"abc123\"\nhint: copy the \
         SHA-256 (not SHA-1 or SHA-512) published beside the image, or run `sha256sum FILE`",
    );
    fails_with(
        BASE.replace("image = \"base.qcow2\"", "url = \"https://example.org/a.qcow2\""),
        "box-config.toml:7:7: `url` in [box] needs `sha256` (the download's SHA-256, 64 hex digits)\nhint: compute \
         it with `sha256sum FILE` and add sha256 = \"...\"",
    );
}

#[test]
fn duplicate_host_port_names_both_uses() {
    fails_with(
        BASE.replace("host = 19090", "host = 2222"),
        "box-config.toml:20:8: host port 2222 of [[forward]] #2 (\"prometheus\") is already used by [ssh] host_port \
         (line 10)\nhint: give every forward (and [ssh] host_port) its own host port",
    );
}

#[test]
fn several_problems_are_all_reported_in_file_order() {
    let r = validate(
        BASE.replace("name = \"cfg-test\"", "name = \"Lab_1\"").replace("memory_mb = 512", "memory_mb = 100"),
    )
    .failure();
    let stderr = r.stderr();
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.starts_with("hint:")).collect();
    assert_eq!(
        lines,
        [
            "error: box-config.toml:2:8: machine name \"Lab_1\" is not allowed",
            "box-config.toml:4:13: `memory_mb` must be from 256 to 4194304 MiB, found 100",
        ]
    );
}

#[test]
fn probe_port_not_forwarded() {
    fails_with(
        format!("{BASE}\n[health.demo-app]\npath = \"/health\"\nport = 8001\n"),
        "box-config.toml:24:8: health probe \"demo-app\" uses guest port 8001, which is not forwarded\nhint: add a \
         [[forward]] with guest = 8001, or change [health.demo-app] port",
    );
}

#[test]
fn forwarded_port_not_published_by_compose() {
    fails_with(
        format!("{BASE}\n[[forward]]\nname = \"extra\"\nguest = 7777\nhost = 17777\n"),
        "box-config.toml:24:9: forwarded guest port 7777 (\"extra\") is not published by any service in \
         ./provision/docker-compose.yml\nhint: publish it in the compose file (\"127.0.0.1:7777:7777\") or remove \
         this [[forward]]",
    );
}

#[test]
fn provision_dir_missing() {
    fails_with(
        format!("{BASE}\n[provision]\nsource = \"nowhere\"\n"),
        "box-config.toml:23:10: provision directory ./nowhere does not exist\nhint: run from the directory holding \
         the lab's provision/ tree, or set [provision] source to it",
    );
}

#[test]
fn undefined_template_variable_fails_validation_naming_the_template() {
    let t = Test::new().arg("validate");
    tree(&t);
    t.write("provision/vars.toml", "");
    t.write("box-config.toml", BASE);
    let r = t.run().failure();
    assert!(
        support::slashes(&r.stderr()).contains("provision/docker-compose.yml.hbs:3:"),
        "render error names the template and line: {}",
        r.stderr()
    );
}

#[test]
fn utf16_files_are_refused_with_what_to_do() {
    let le_bom: Vec<u8> =
        [0xFF, 0xFE].into_iter().chain(BASE.encode_utf16().flat_map(u16::to_le_bytes)).collect();
    fails_with(
        le_bom,
        "box-config.toml:1:1: the file is UTF-16 (little-endian, byte order mark FF FE), not UTF-8\nhint: save the \
         file as UTF-8 (in most editors: \"Save with encoding\" > UTF-8)",
    );
    let be_bom: Vec<u8> =
        [0xFE, 0xFF].into_iter().chain(BASE.encode_utf16().flat_map(u16::to_be_bytes)).collect();
    assert!(validate(be_bom).failure().stderr().contains("UTF-16 (big-endian, byte order mark FE FF)"));
    let le_plain: Vec<u8> = BASE.encode_utf16().flat_map(u16::to_le_bytes).collect();
    assert!(validate(le_plain).failure().stderr().contains("UTF-16 (little-endian, no byte order mark)"));
}

#[test]
fn invalid_utf8_says_where() {
    let mut bytes = BASE.replace("cfg-test", "cfg-tXst").into_bytes();
    let at = bytes.iter().position(|b| *b == b'X').unwrap();
    bytes[at] = 0xE9; // Latin-1 é
    fails_with(
        bytes,
        &format!(
            "box-config.toml:2:14: invalid UTF-8 at byte {at} (0xE9)\nhint: save the file as UTF-8 (in most editors: \
             \"Save with encoding\" > UTF-8)"
        ),
    );
}

#[test]
fn utf8_bom_is_accepted() {
    let bytes: Vec<u8> = b"\xEF\xBB\xBF".iter().copied().chain(BASE.bytes()).collect();
    validate(bytes).success();
}

#[test]
fn non_loopback_host_ip_is_a_warning_not_an_error() {
    let r = validate(BASE.replace("host = 18000", "host = 18000\nhost_ip = \"0.0.0.0\"")).success();
    assert!(
        r.stderr().contains(
            "warning: box-config.toml:16:11: [[forward]] #1 (\"demo-app\") listens on 0.0.0.0, not on loopback"
        ),
        "{}",
        r.stderr()
    );
    fails_with(
        BASE.replace("host = 18000", "host = 18000\nhost_ip = \"localhost\""),
        "box-config.toml:16:11: `host_ip` \"localhost\" of [[forward]] #1 (\"demo-app\") is not an IP address\nhint: \
         use 127.0.0.1 (host names are not accepted)",
    );
}

#[test]
fn json_document_lists_errors_with_positions() {
    let t = Test::new().args(["validate", "--json"]);
    tree(&t);
    t.write("box-config.toml", BASE.replace("cpus = 1", "cpus = 0"));
    let r = t.run().failure();
    let doc: serde_json::Value = serde_json::from_str(r.stdout().trim()).expect("one JSON document");
    assert_eq!(doc["valid"], false);
    assert_eq!(doc["errors"][0]["line"], 3);
    assert_eq!(doc["errors"][0]["col"], 8);
    assert_eq!(doc["errors"][0]["message"], "`cpus` must be from 1 to 256, found 0");
}

#[test]
fn health_probes_are_lab_defaults_overlaid_by_the_file() {
    let cfg = Config::from_bytes(
        Path::new("box-config.toml"),
        format!("{BASE}\n[health.demo-app]\npath = \"/ready\"\nport = 8000\nexpect_status = 204\n")
            .as_bytes(),
    )
    .unwrap();
    let p = cfg.health_probes(&provisioner::lab::PROFILE);
    assert_eq!(
        p.keys().collect::<Vec<_>>(),
        ["alertmanager", "cadvisor", "demo-app", "grafana", "node-exporter", "prometheus"]
    );
    assert_eq!((p["demo-app"].path.as_str(), p["demo-app"].expect_status), ("/ready", 204));
    assert_eq!((p["grafana"].path.as_str(), p["grafana"].port), ("/api/health", 3000));
    assert_eq!((p["cadvisor"].path.as_str(), p["cadvisor"].port), ("/healthz", 8080));
    assert_eq!(cfg.forwards[1].protocol, Protocol::Tcp);
}

/// Ways to damage a valid file.
#[derive(Debug, Clone)]
enum Mutation {
    Truncate(usize),
    FlipByte(usize, u8),
    RenameKey(usize, String),
    SwapValues(usize, usize),
    DeleteLine(usize),
    InsertLine(usize, String),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::FlipByte(i, b)),
        (any::<usize>(), "[a-z_]{1,12}").prop_map(|(i, k)| Mutation::RenameKey(i, k)),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Mutation::SwapValues(a, b)),
        any::<usize>().prop_map(Mutation::DeleteLine),
        (any::<usize>(), "[a-z\\[\\]=\" .0-9]{0,20}").prop_map(|(i, l)| Mutation::InsertLine(i, l)),
    ]
}

fn apply(text: &[u8], m: &Mutation) -> Vec<u8> {
    let s = String::from_utf8_lossy(text).into_owned();
    let mut lines: Vec<String> = s.lines().map(str::to_string).collect();
    if lines.is_empty() {
        // An earlier mutation truncated the file to nothing on a line: a line edit has nothing to act on.
        lines.push(String::new());
    }
    let n = lines.len();
    match m {
        Mutation::Truncate(i) => return text[..i % (text.len() + 1)].to_vec(),
        Mutation::FlipByte(i, b) => {
            let mut v = text.to_vec();
            if !v.is_empty() {
                let at = i % v.len();
                v[at] = *b;
            }
            return v;
        }
        Mutation::RenameKey(i, k) => {
            let l = &mut lines[i % n];
            if let Some((_, v)) = l.split_once('=') {
                *l = format!("{k} ={v}");
            }
        }
        Mutation::SwapValues(a, b) => {
            let (a, b) = (a % n, b % n);
            if let (Some((ka, va)), Some((kb, vb))) = (lines[a].split_once('='), lines[b].split_once('=')) {
                let (na, nb) = (format!("{ka}={vb}"), format!("{kb}={va}"));
                lines[a] = na;
                lines[b] = nb;
            }
        }
        Mutation::DeleteLine(i) => {
            lines.remove(i % n);
        }
        Mutation::InsertLine(i, l) => lines.insert(i % n, l.clone()),
    }
    (lines.join("\n") + "\n").into_bytes()
}

/// The shipped config plus a few optional tables, so mutations reach every part of the model.
fn rich_config() -> String {
    let shipped = std::fs::read_to_string(crate::support::repo().join("box-config.toml")).unwrap();
    format!(
        "{shipped}\n[vars]\ntag = \"1\"\n\n[health.demo-app]\npath = \"/health\"\nport = 8000\n\n[virtualbox]\n\
         vboxmanage = \"/usr/bin/VBoxManage\"\n"
    )
}

#[test]
fn mutated_configs_never_panic_and_always_say_where() {
    // One tree for all cases: the config is what is mutated.
    let t = Test::new();
    tree(&t);
    let path = t.path().join("box-config.toml");
    let shown = path.display().to_string();
    let rich = rich_config().into_bytes();
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2000),
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let strategy = proptest::collection::vec(mutation(), 1..4);
    let outcome = runner.run(&strategy, |ms| {
        let bytes = ms.iter().fold(rich.clone(), |b, m| apply(&b, m));
        let result = Config::from_bytes(&path, &bytes)
            .and_then(|cfg| provisioner::validate::all(&cfg, &provisioner::lab::PROFILE).map(|_| ()));
        if let Err(e) = result {
            let msg = format!("{e:#}");
            let positioned = e.downcast_ref::<ConfigError>().map_or_else(
                // Render errors name the template instead (`provision/x.hbs:LINE:COL`), and a rendered compose
                // file that is not YAML (a [vars] value such as `:`) its rendered position.
                || msg.contains(".hbs:") || msg.contains(" (rendered): not valid YAML"),
                |ce| ce.diagnostics.iter().all(|d| d.line.is_some() && d.col.is_some()),
            );
            prop_assert!(
                positioned || msg.contains("UTF-8"),
                "error without position: {msg}\n--- input\n{}",
                String::from_utf8_lossy(&bytes)
            );
            prop_assert!(
                msg.contains(&format!("{shown}:")) || msg.contains(".hbs:") || msg.contains(" (rendered): "),
                "{msg}"
            );
        }
        Ok(())
    });
    if let Err(e) = outcome {
        panic!("{e}");
    }
}

#[test]
fn config_built_in_code_gets_messages_without_positions() {
    let mut cfg: Config = toml::from_str(BASE).unwrap();
    cfg.machine.cpus = 0;
    cfg.path = "generated.toml".into();
    cfg.provision.enabled = Some(false); // no provision tree beside "generated.toml"
    let err = provisioner::validate::all(&cfg, &provisioner::lab::PROFILE).unwrap_err();
    let ce = err.downcast_ref::<ConfigError>().expect("a ConfigError");
    assert_eq!(ce.diagnostics.len(), 1);
    assert_eq!(
        ce.diagnostics[0].to_string().lines().next(),
        Some("generated.toml: `cpus` must be from 1 to 256, found 0")
    );
}

#[test]
fn sizes_and_durations_out_of_range_are_errors_with_the_range() {
    // The largest integer TOML has; beyond it the parser itself says so, at the value.
    let huge = "9223372036854775807";
    fails_with(
        BASE.replace("memory_mb = 512", "memory_mb = 18446744073709551615"),
        "box-config.toml:4:13: integer out of range: a TOML integer is at most 9223372036854775807\nhint: see docs/box-config.md for the range of each key",
    );
    fails_with(
        BASE.replace("cpus = 1", "cpus = 100000"),
        "box-config.toml:3:8: `cpus` must be from 1 to 256, found 100000\n\
         hint: the lab itself wants cpus = 2, memory_mb = 4096, disk_gb = 20",
    );
    let r =
        validate(BASE.replace("memory_mb = 512", &format!("memory_mb = {huge}\ndisk_gb = {huge}"))).failure();
    assert!(
        r.stderr().contains(&format!(
            "box-config.toml:4:13: `memory_mb` must be from 256 to 4194304 MiB, found {huge}"
        )),
        "{}",
        r.stderr()
    );
    assert!(
        r.stderr()
            .contains(&format!("box-config.toml:5:11: `disk_gb` must be from 2 to 65536 GiB, found {huge}")),
        "{}",
        r.stderr()
    );
    fails_with(
        BASE.replace("host_port = 2222", &format!("host_port = 2222\nconnect_timeout_secs = {huge}")),
        &format!(
            "box-config.toml:11:24: `connect_timeout_secs` must be from 1 to 86400 s, found {huge}\n\
             hint: a TCG guest needs about 60 s to reach SSH; the default is 600"
        ),
    );
    let r =
        validate(format!("{BASE}\n[health.demo-app]\npath = \"/\"\nport = 8000\ntimeout_secs = {huge}\n"))
            .failure();
    assert!(
        r.stderr().contains(&format!(
            "health probe \"demo-app\": `timeout_secs` must be from 1 to 86400 s, found {huge}"
        )),
        "{}",
        r.stderr()
    );
}

#[test]
fn libvirt_uris_that_run_programs_or_skip_checks_are_refused_at_their_position() {
    for (uri, says) in [
        ("qemu+ext:///session?command=/tmp/x", "`ext` transport"),
        ("qemu+ssh://h/system?command=/tmp/x", "parameter `command`"),
        ("qemu+ssh://h/system?netcat=/tmp/x", "parameter `netcat`"),
        ("qemu+unix:///system?socket=/tmp/s", "parameter `socket`"),
        ("qemu+tls://h/system?no_verify=1", "parameter `no_verify`"),
    ] {
        let r = validate(format!("{BASE}\n[libvirt]\nuri = \"{uri}\"\n")).failure();
        let first = r.stderr().lines().next().unwrap_or_default().to_string();
        assert!(first.starts_with("error: box-config.toml:23:7: `uri` \""), "{uri}: {}", r.stderr());
        assert!(first.contains(says), "{uri}: {}", r.stderr());
        assert!(r.stderr().contains("\nhint: "), "{uri}: {}", r.stderr());
    }
}

/// A remote libvirt host must be in known_hosts (issue 10): unknown is refused, recorded passes.
#[test]
#[cfg_attr(windows, ignore = "windows: runs ssh-keygen, and remote libvirt hosts are Linux-only")]
fn a_remote_libvirt_host_must_be_in_known_hosts() {
    let kh = tempfile::tempdir().unwrap();
    let file = kh.path().join("known_hosts");
    let remote =
        format!("qemu+ssh://root@10.0.0.2/system?keyfile=/k&no_tty=1&known_hosts={}", file.display());
    validate(format!("{BASE}\n[libvirt]\nuri = '{remote}'\n"))
        .failure()
        .stderr_contains("ssh-keyscan 10.0.0.2");
    let key = provisioner::keys::generate("h").unwrap().public_openssh;
    std::fs::write(&file, format!("10.0.0.2 {key}\n")).unwrap();
    validate(format!("{BASE}\n[libvirt]\nuri = '{remote}'\n")).success();
}

#[test]
fn echoed_values_lose_control_characters_and_are_cut() {
    let long = "x".repeat(5000);
    let r =
        validate(BASE.replace("name = \"cfg-test\"", &format!("name = \"lab\\u001b]0;owned\\u0007{long}\"")))
            .failure();
    let err = r.stderr();
    assert!(!err.contains('\u{1b}') && !err.contains('\u{7}'), "raw control characters echoed: {err:?}");
    assert!(err.contains("lab\\u{1b}]0;owned\\u{7}"), "{err}");
    assert!(err.contains("more characters)"), "{err}");
    assert!(err.len() < 1000, "a long value is cut: {} bytes", err.len());
    // Keys too: an unknown quoted key with an escape sequence.
    let r = validate(BASE.replace("cpus = 1", "\"c\\u001b[2Jpu\" = 1")).failure();
    assert!(!r.stderr().contains('\u{1b}'), "{:?}", r.stderr());
}

#[test]
fn guest_path_of_the_guests_root_is_refused() {
    let hint = "hint: use a dedicated directory such as \"/opt/provision\"";
    for gp in ["/.", "/opt/..", "/opt/../", "//./opt/../.."] {
        fails_with(
            format!("{BASE}\n[provision]\nguest_path = \"{gp}\"\n"),
            &format!(
                "box-config.toml:23:14: `guest_path` \"{gp}\" is the guest's / once `.` and `..` are resolved: the \
                 provision tree would be unpacked over the guest's root\n{hint}"
            ),
        );
    }
    fails_with(
        format!("{BASE}\n[provision]\nguest_path = \"/opt/./x/../provision\"\n"),
        &format!(
            "box-config.toml:23:14: `guest_path` \"/opt/./x/../provision\" has a `.` or `..` component; write the \
             directory it means: \"/opt/provision\"\n{hint}"
        ),
    );
    // Neighbours: a plain directory, with a trailing slash, or a name with dots.
    for gp in ["/opt/provision/", "/srv/lab..d", "/.lab"] {
        validate(format!("{BASE}\n[provision]\nguest_path = \"{gp}\"\n")).success();
    }
}

#[test]
fn reserved_machine_names_and_hostnames_are_refused() {
    fails_with(
        BASE.replace("name = \"cfg-test\"", "name = \"localhost\""),
        "box-config.toml:2:8: machine name \"localhost\" is reserved: in every guest it names the guest itself \
         (127.0.0.1), so it cannot name a machine\nhint: pick another name (e.g. \"lab\")",
    );
    fails_with(
        BASE.replace("name = \"cfg-test\"", "name = \"cfg-\""),
        "box-config.toml:2:8: machine name \"cfg-\" ends with '-': it is also the guest's host name, which cannot \
         end with '-'\nhint: end the name with a letter or digit (e.g. \"lab\")",
    );
    fails_with(
        BASE.replace("name = \"cfg-test\"", "name = \"cfg-test\"\nhostname = \"localhost\""),
        "box-config.toml:3:12: hostname \"localhost\" is reserved: in every guest it names the guest itself \
         (127.0.0.1), so it cannot name a machine\nhint: pick another hostname, or remove it to use the machine's \
         name",
    );
    validate(BASE.replace("name = \"cfg-test\"", "name = \"cfg-test\"\nhostname = \"localhost2\"")).success();
}

#[test]
fn a_datetime_is_named_as_a_datetime() {
    fails_with(
        BASE.replace("name = \"cfg-test\"", "name = 1979-05-27T07:32:00Z"),
        "box-config.toml:2:8: wrong type for `name` in [machine]: expected a string, found a datetime\nhint: TOML \
         reads an unquoted date or time as a datetime: write the value in quotes",
    );
    fails_with(
        BASE.replace("cpus = 1", "cpus = 07:32:00"),
        "box-config.toml:3:8: wrong type for `cpus` in [machine]: expected an integer, found a datetime",
    );
    // A real table is still a table.
    fails_with(
        BASE.replace("cpus = 1", "cpus = {}"),
        "box-config.toml:3:8: wrong type for `cpus` in [machine]: expected an integer, found a table",
    );
}

#[test]
fn cr_only_line_endings_are_named_at_the_first_one() {
    let expected = |col: usize| {
        format!(
            "box-config.toml:1:{col}: a carriage return (CR) without a line feed: TOML lines end with LF or CR LF, \
             and this file has CR-only (old Mac) line endings\nhint: save the file with LF (Unix) or CR LF \
             (Windows) line endings (in most editors: \"Line endings\" > LF)"
        )
    };
    fails_with(BASE.replace('\n', "\r"), &expected(10));
    fails_with(format!("# box\r{BASE}").replace('\n', "\r"), &expected(6));
    // After LF lines, the position is on its own line.
    let one = BASE.replacen("cpus = 1\n", "cpus = 1\r", 1);
    fails_with(one, &expected(9).replacen(":1:9:", ":3:9:", 1));
    // CR LF is fine.
    validate(BASE.replace('\n', "\r\n")).success();
}

#[test]
fn a_forward_on_the_default_ssh_port_names_the_default() {
    fails_with(
        BASE.replace("[ssh]\nhost_port = 2222\n", "").replace("host = 19090", "host = 2222"),
        "box-config.toml:18:8: host port 2222 of [[forward]] #2 (\"prometheus\") is already used by [ssh] host_port \
         (the SSH forward's default port)\nhint: give every forward (and [ssh] host_port) its own host port",
    );
}

/// BASE with a `[provision]` table of registry keys (a provision tree beside it, as `validate` expects).
fn with_provision(keys: &str) -> String {
    format!("{BASE}\n[provision]\nimages = \"auto\"\n{keys}")
}

#[test]
fn registry_keys_are_checked_at_their_position() {
    fails_with(
        with_provision(
            "registry_mirrors = [\"https://m.example\", \"ftp://mirror.example\"]\n\
             insecure_registries = [\"https://registry.example:5000\"]\n\
             registry_proxies = { \"gcr.io\" = \"https://harbor.example/gcr\" }\n\
             pip_index_url = \"nexus.example/simple\"\n",
        ),
        "box-config.toml:24:42: `registry_mirrors` entry \"ftp://mirror.example\" is not an http(s) URL of a \
         registry\nhint: write the mirror's URL, e.g. \"https://mirror.example.com\" (Docker uses it for Docker Hub \
         images only; see registry_proxies for the others)\n\
         box-config.toml:25:24: `insecure_registries` entry \"https://registry.example:5000\" is not a registry \
         host[:port]\nhint: write the host and port only, without scheme or path, e.g. \"registry.example:5000\"\n\
         box-config.toml:26:33: `registry_proxies` prefix \"https://harbor.example/gcr\" for gcr.io is not \
         REGISTRY[:PORT]/PATH\nhint: write the proxy project's prefix without scheme, e.g. \
         \"harbor.example.com/dockerhub-proxy\"\n\
         box-config.toml:27:17: `pip_index_url` \"nexus.example/simple\" is not an http(s) URL\nhint: write the simple \
         index's URL, e.g. \"https://nexus.example.com/repository/pypi/simple\"",
    );
    fails_with(
        with_provision("images = \"cloud\"\n").replace("images = \"auto\"\n", ""),
        "box-config.toml:23:10: bad value \"cloud\" for `images` in [provision]; expected one of: auto, registry, \
         debian\nhint: set `images` to one of: auto, registry, debian",
    );
}

#[test]
#[cfg_attr(windows, ignore = "windows: no Unix file modes (the 0600 check is Unix-only)")]
fn credentials_file_must_be_private_and_its_secret_is_never_printed() {
    const SECRET: &str = "hunter2-never-printed";
    let run = |mode: u32, json: bool| {
        let t = Test::new().arg("validate");
        let t = if json { t.arg("--json") } else { t };
        tree(&t);
        t.write("ca.pem", "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n");
        t.write("creds.toml", format!("[\"r.example:5000\"]\nusername = \"lab\"\npassword = \"{SECRET}\"\n"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(t.path().join("creds.toml"), std::fs::Permissions::from_mode(mode))
                .unwrap();
        }
        #[cfg(windows)]
        let _ = mode;
        t.write(
            "box-config.toml",
            with_provision(
                "registry_mirrors = [\"https://r.example:5000\"]\nca_certs = [\"ca.pem\", \"gone.pem\"]\n\
                 registry_credentials = \"creds.toml\"\n",
            ),
        );
        t.run()
    };
    let r = run(0o644, false).failure();
    let err = r.stderr();
    assert!(err.contains("box-config.toml:25:23: CA certificate "), "{err}");
    assert!(err.contains("gone.pem does not exist\n"), "{err}");
    assert!(err.contains("box-config.toml:26:24: registry credentials file "), "{err}");
    assert!(
        err.contains("creds.toml is readable by others (mode 0644); it holds passwords\nhint: chmod 600 "),
        "{err}"
    );
    for (mode, json) in [(0o644, true), (0o600, false), (0o600, true)] {
        let r = run(mode, json);
        assert!(!r.stdout().contains(SECRET) && !r.stderr().contains(SECRET), "mode {mode:o} json {json}");
    }
}
