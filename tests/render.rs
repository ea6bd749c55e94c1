//! `provisioner render --out DIR` and `render::render_tree` on a small fixture tree: templates rendered without
//! their suffix, everything else byte for byte, modes kept, `.env` private ASCII/LF, secrets stable per machine,
//! undefined variables named with template and line.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use provisioner::config::Config;
use provisioner::render::{render_tree, Secrets};

use crate::support::Test;

const CONFIG: &str = r#"[machine]
name = "render-test"

[box]
image = "base.qcow2"

[provision]
source = "tree"
guest_path = "/srv/lab"

[vars]
greeting = "hello from the config"
"#;

/// Bytes that are not UTF-8 and contain handlebars-looking text: must come out untouched.
const BINARY: &[u8] = b"\x00\xFF{{vars.greeting}}\r\n\xC3\x28 end";

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

fn set_mode(t: &Test, rel: &str, m: u32) {
    std::fs::set_permissions(t.path().join(rel), std::fs::Permissions::from_mode(m)).unwrap();
}

/// A config and a template tree in a temp dir.
fn fixture() -> Test {
    let t = Test::new();
    t.write("box-config.toml", CONFIG);
    t.write("tree/vars.toml", "greeting = \"default\"\nport = 8000\n");
    t.write(
        "tree/app/conf.yml.hbs",
        "name: {{machine.name}}\nport: {{vars.port}}\nsay: {{vars.greeting}}\nroot: {{provision.guest_path}}\n",
    );
    t.write("tree/run.sh", "#!/bin/sh\necho plain {{not.rendered}}\n");
    set_mode(&t, "tree/run.sh", 0o755);
    t.write("tree/start.sh.hbs", "#!/bin/sh\necho {{machine.name}}\n");
    set_mode(&t, "tree/start.sh.hbs", 0o750);
    t.write("tree/data.bin", BINARY);
    t.write(
        "tree/.env.hbs",
        "PROMETHEUS_HEX={{secrets.prometheus_hex}}\r\nGF_PASSWORD={{secrets.grafana_admin_password}}\r\n",
    );
    set_mode(&t, "tree/.env.hbs", 0o644);
    t
}

fn render(t: &Test, out: &str) -> crate::support::Run {
    Test::new().cwd(t.path()).args(["render", "--out", out]).run()
}

#[test]
fn templates_lose_their_suffix_and_other_files_are_byte_identical() {
    let t = fixture();
    let r = render(&t, "out").success();
    assert!(r.stderr().contains("rendered 5 files"), "{}", r.stderr());
    let out = t.path().join("out");
    assert_eq!(
        std::fs::read_to_string(out.join("app/conf.yml")).unwrap(),
        "name: render-test\nport: 8000\nsay: hello from the config\nroot: /srv/lab\n"
    );
    assert_eq!(std::fs::read(out.join("data.bin")).unwrap(), BINARY);
    assert_eq!(
        std::fs::read(out.join("run.sh")).unwrap(),
        std::fs::read(t.path().join("tree/run.sh")).unwrap()
    );
    for absent in ["app/conf.yml.hbs", "start.sh.hbs", ".env.hbs", "vars.toml"] {
        assert!(!out.join(absent).exists(), "{absent} must not be in the output");
    }
}

#[test]
fn modes_are_kept_and_env_is_private_ascii_lf() {
    let t = fixture();
    render(&t, "out").success();
    let out = t.path().join("out");
    assert_eq!(mode(&out.join("run.sh")), 0o755);
    assert_eq!(mode(&out.join("start.sh")), 0o750);
    assert_eq!(mode(&out.join("app/conf.yml")), mode(&t.path().join("tree/app/conf.yml.hbs")));
    let env_path = out.join(".env");
    assert_eq!(mode(&env_path), 0o600);
    let env = std::fs::read(&env_path).unwrap();
    assert!(env.is_ascii(), ".env is ASCII");
    assert!(!env.contains(&b'\r'), ".env has LF line ends only");
    let text = String::from_utf8(env).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2);
    assert!(lines[0].starts_with("PROMETHEUS_HEX=") && lines[0].len() == "PROMETHEUS_HEX=".len() + 64);
    assert!(lines[1].starts_with("GF_PASSWORD=") && lines[1].len() == "GF_PASSWORD=".len() + 24);
}

#[test]
fn rendering_twice_gives_identical_secrets_kept_private() {
    let t = fixture();
    render(&t, "a").success();
    render(&t, "b").success();
    let a = std::fs::read(t.path().join("a/.env")).unwrap();
    assert_eq!(a, std::fs::read(t.path().join("b/.env")).unwrap());
    assert_eq!(mode(&t.path().join(".provisioner/secrets.toml")), 0o600);
    // Another machine (another state dir) gets other secrets.
    let other = fixture();
    render(&other, "a").success();
    assert_ne!(a, std::fs::read(other.path().join("a/.env")).unwrap());
}

#[test]
fn undefined_variable_names_template_and_line() {
    let t = fixture();
    t.write("tree/app/conf.yml.hbs", "name: {{machine.name}}\n\nport: {{vars.prot}}\n");
    let r = render(&t, "out").failure();
    let err = r.stderr();
    assert!(err.contains("tree/app/conf.yml.hbs:3:"), "names template and line: {err}");
    assert!(err.contains("conf.yml.hbs:3:7: undefined variable `vars.prot`"), "names the variable: {err}");
    assert!(err.contains("hint: define the variable under [vars]"), "{err}");
    assert!(!t.path().join("out").exists(), "nothing written when a template fails");
}

#[test]
fn non_ascii_env_value_is_refused() {
    let t = fixture();
    t.write("tree/.env.hbs", "A=1\nGREETING={{vars.greeting}}\n");
    t.write("box-config.toml", CONFIG.replace("hello from the config", "grüße"));
    let r = render(&t, "out").failure();
    assert!(r.stderr().contains("tree/.env.hbs:2: .env holds a non-ASCII byte (0xC3)"), "{}", r.stderr());
}

#[test]
fn out_inside_the_source_tree_is_refused() {
    let t = fixture();
    let r = render(&t, "tree/rendered").failure();
    assert!(r.stderr().contains("is inside the provision tree"), "{}", r.stderr());
    assert!(!t.path().join("tree/rendered").exists());
}

#[test]
fn json_lists_every_file_with_mode_and_hash() {
    let t = fixture();
    let r = Test::new().cwd(t.path()).args(["render", "--out", "out", "--json"]).run().success();
    let doc: serde_json::Value = serde_json::from_str(r.stdout().trim()).unwrap();
    let files: Vec<(String, String)> = doc["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["path"].as_str().unwrap().to_string(), f["mode"].as_str().unwrap().to_string()))
        .collect();
    let paths: Vec<&str> = files.iter().map(|f| f.0.as_str()).collect();
    assert_eq!(paths, [".env", "app/conf.yml", "data.bin", "run.sh", "start.sh"]);
    assert_eq!(files[0].1, "600");
    assert_eq!(files[3].1, "755");
}

#[test]
fn render_tree_in_process_uses_the_given_secrets() {
    let t = fixture();
    let cfg = Config::load(&t.path().join("box-config.toml")).unwrap();
    let secrets = Secrets::generate();
    let r1 = render_tree(&cfg, &t.path().join("tree"), &secrets).unwrap();
    let r2 = render_tree(&cfg, &t.path().join("tree"), &secrets).unwrap();
    assert_eq!(r1.files, r2.files, "rendering is deterministic for fixed secrets");
    let env = String::from_utf8(r1.get(".env").unwrap().contents.clone()).unwrap();
    assert!(env.contains(&secrets.prometheus_hex) && env.contains(&secrets.grafana_admin_password));
}
