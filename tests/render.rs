//! `provisioner render --out DIR` and `render::render_tree` on a small fixture tree: templates rendered without
//! their suffix, everything else byte for byte, modes kept, `.env` private ASCII/LF, secrets stable per machine,
//! undefined variables named with template and line.

use std::path::Path;

use provisioner::config::Config;
use provisioner::lab::secrets::Secrets;
use provisioner::render::render_tree;

use crate::support::{self, Test};

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

#[cfg(unix)]
fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

/// Windows has no file modes: the tests that read them are skipped there.
#[cfg(windows)]
fn mode(_p: &Path) -> u32 {
    unreachable!("no file modes on Windows")
}

/// A mode on Unix; nothing on Windows (no modes: a script gets 0755 in the guest from its `#!` line).
fn set_mode_of(p: &Path, m: u32) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    }
    #[cfg(windows)]
    let _ = (p, m);
}

fn set_mode(t: &Test, rel: &str, m: u32) {
    set_mode_of(&t.path().join(rel), m);
}

/// A symbolic link (Windows: needs developer mode or elevation; the tests that make links are skipped there).
fn symlink(target: impl AsRef<Path>, link: impl AsRef<Path>) -> std::io::Result<()> {
    #[cfg(unix)]
    return std::os::unix::fs::symlink(target, link);
    #[cfg(windows)]
    {
        let target = target.as_ref();
        if target.is_dir() {
            std::os::windows::fs::symlink_dir(target, link)
        } else {
            std::os::windows::fs::symlink_file(target, link)
        }
    }
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
#[cfg_attr(windows, ignore = "windows: no Unix file modes (a script gets 0755 from its #! line)")]
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
#[cfg_attr(windows, ignore = "windows: no Unix file modes (a script gets 0755 from its #! line)")]
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
    let err = support::slashes(&r.stderr());
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
    let err = support::slashes(&r.stderr());
    assert!(err.contains("tree/.env.hbs:2: .env holds a non-ASCII byte (0xC3)"), "{err}");
}

#[test]
fn out_inside_the_source_tree_is_refused() {
    let t = fixture();
    let r = render(&t, "tree/rendered").failure();
    assert!(r.stderr().contains("is inside the provision tree"), "{}", r.stderr());
    assert!(!t.path().join("tree/rendered").exists());
}

#[test]
#[cfg_attr(windows, ignore = "windows: no Unix file modes (a script gets 0755 from its #! line)")]
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

/// A file outside the project, to see whether a render writes through a link to it.
fn victim(t: &Test) -> std::path::PathBuf {
    let v = t.path().join("outside/precious.txt");
    std::fs::create_dir_all(v.parent().unwrap()).unwrap();
    std::fs::write(&v, "precious\n").unwrap();
    set_mode_of(&v, 0o600);
    v
}

#[test]
#[cfg_attr(windows, ignore = "windows: symbolic links need developer mode or elevation there")]
fn links_planted_in_the_output_are_never_followed() {
    let t = fixture();
    let v = victim(&t);
    render(&t, "out").success();
    // Plant links where the next render writes: a file, a directory on the way, and the output itself.
    std::fs::remove_file(t.path().join("out/run.sh")).unwrap();
    symlink(&v, t.path().join("out/run.sh")).unwrap();
    std::fs::remove_dir_all(t.path().join("out/app")).unwrap();
    symlink(v.parent().unwrap(), t.path().join("out/app")).unwrap();
    render(&t, "out").success();
    assert_eq!(
        std::fs::read_to_string(&v).unwrap(),
        "precious\n",
        "the file outside was written through a link"
    );
    assert_eq!(mode(&v), 0o600, "the file outside changed mode");
    assert!(!v.parent().unwrap().join("conf.yml").exists(), "wrote into a linked directory");
    let run_sh = std::fs::symlink_metadata(t.path().join("out/run.sh")).unwrap();
    assert!(run_sh.file_type().is_file() && mode(&t.path().join("out/run.sh")) == 0o755);
    assert!(std::fs::symlink_metadata(t.path().join("out/app")).unwrap().is_dir());

    symlink(v.parent().unwrap(), t.path().join("linked-out")).unwrap();
    render(&t, "linked-out").failure().stderr_contains("is a symbolic link").stderr_contains("hint:");
    assert_eq!(
        std::fs::read_dir(v.parent().unwrap()).unwrap().count(),
        1,
        "nothing written through --out link"
    );
}

#[test]
fn root_and_foreign_directories_are_refused() {
    let t = fixture();
    render(&t, "/").failure().stderr_contains("--out /").stderr_contains("hint:");
    render(&t, ".").failure().stderr_contains("holds this project");
    // Nor the machine's state (keys, disk), even with --force.
    render(&t, "out").success();
    let force = |out: &str| Test::new().cwd(t.path()).args(["render", "--out", out, "--force"]).run();
    force(".provisioner").failure().stderr_contains("the machine's state directory");
    force(".provisioner/x").failure().stderr_contains("is inside the machine's state directory");
    assert!(t.path().join(".provisioner/secrets.toml").is_file());
    let foreign = t.path().join("mine");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("keep.txt"), "mine\n").unwrap();
    // A directory render did not make is refused, --force or not (issue 16: --force used to replace it whole).
    render(&t, "mine").failure().stderr_contains("holds 1 entry render did not write: keep.txt");
    force("mine")
        .failure()
        .stderr_contains("holds 1 entry render did not write: keep.txt")
        .stderr_contains("hint:");
    assert_eq!(std::fs::read_to_string(foreign.join("keep.txt")).unwrap(), "mine\n");
    std::fs::remove_file(foreign.join("keep.txt")).unwrap();
    render(&t, "mine").success();
    assert!(foreign.join("app/conf.yml").is_file());
    // A directory render made is replaced without --force; stale files go with it.
    std::fs::write(foreign.join("stale"), "x").unwrap();
    render(&t, "mine").success();
    assert!(!foreign.join("stale").exists());
    assert!(foreign.join(".provisioner-render").is_file(), "the marker says render made it");
    // Missing parents are created.
    render(&t, "deep/er/out").success();
    assert!(t.path().join("deep/er/out/run.sh").is_file());
    // An empty directory is fine too; no temp directory is left beside the output.
    std::fs::create_dir_all(t.path().join("empty")).unwrap();
    render(&t, "empty").success();
    let leftovers: Vec<_> = std::fs::read_dir(t.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".render-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
#[cfg_attr(windows, ignore = "windows: no Unix file modes (a script gets 0755 from its #! line)")]
fn setuid_setgid_and_sticky_bits_are_dropped() {
    let t = fixture();
    set_mode(&t, "tree/run.sh", 0o6755);
    set_mode(&t, "tree/start.sh.hbs", 0o1750);
    render(&t, "out").success();
    assert_eq!(mode(&t.path().join("out/run.sh")), 0o755);
    assert_eq!(mode(&t.path().join("out/start.sh")), 0o750);
    let r = Test::new().cwd(t.path()).args(["render", "--out", "out", "--json"]).run().success();
    let doc: serde_json::Value = serde_json::from_str(r.stdout().trim()).unwrap();
    let run = doc["files"].as_array().unwrap().iter().find(|f| f["path"] == "run.sh").unwrap().clone();
    assert_eq!(run["mode"], "755", "the upload gets the same modes");
}

#[test]
#[cfg_attr(windows, ignore = "windows: symbolic links need developer mode or elevation there")]
fn links_in_the_provision_tree_are_refused_and_never_echoed() {
    let t = fixture();
    let outside = t.path().join("outside.toml");
    std::fs::write(&outside, "SECRET-FIRST-LINE hunter2\n").unwrap();
    std::fs::remove_file(t.path().join("tree/vars.toml")).unwrap();
    symlink(&outside, t.path().join("tree/vars.toml")).unwrap();
    for args in [vec!["validate"], vec!["render", "--out", "out"]] {
        let r = Test::new().cwd(t.path()).args(args).run().failure();
        assert!(r.stderr().contains("tree/vars.toml is a symbolic link"), "{}", r.stderr());
        assert!(!r.stderr().contains("hunter2"), "the linked file was read: {}", r.stderr());
    }
    // Any other link is refused the same way (not silently skipped).
    std::fs::remove_file(t.path().join("tree/vars.toml")).unwrap();
    t.write("tree/vars.toml", "greeting = \"default\"\nport = 8000\n");
    symlink(&outside, t.path().join("tree/app/extra.txt")).unwrap();
    render(&t, "out")
        .failure()
        .stderr_contains("tree/app/extra.txt is a symbolic link")
        .stderr_contains("hint:");
    assert!(!t.path().join("out").exists());
}

#[test]
fn a_damaged_vars_file_is_reported_by_position_without_quoting_it() {
    let t = fixture();
    t.write("tree/vars.toml", "greeting = \"default\"\nport = 8000 hunter2\n");
    let r = render(&t, "out").failure();
    assert!(support::slashes(&r.stderr()).contains("tree/vars.toml:2:"), "{}", r.stderr());
    assert!(!r.stderr().contains("hunter2"), "{}", r.stderr());
}

#[test]
fn names_that_render_to_dot_dotdot_or_nothing_are_refused_by_validate() {
    for name in ["tree/...hbs", "tree/..hbs", "tree/app/.hbs"] {
        let t = fixture();
        t.write(name, "x\n");
        let r = Test::new().cwd(t.path()).arg("validate").run().failure();
        assert!(r.stderr().contains("which cannot be written"), "{name}: {}", r.stderr());
        assert!(support::slashes(&r.stderr()).contains(name), "{name}: {}", r.stderr());
    }
}

#[test]
fn recursive_partials_are_refused_with_their_chain_not_a_stack_overflow() {
    let t = fixture();
    t.write(
        "tree/app/conf.yml.hbs",
        "{{#*inline \"p\"}}x{{> q}}{{/inline}}{{#*inline \"q\"}}{{> p}}{{/inline}}{{> p}}\n",
    );
    for args in [vec!["validate"], vec!["render", "--out", "out"]] {
        let r = Test::new().cwd(t.path()).args(args).run();
        assert_eq!(r.code(), Some(1), "{}", r.stderr());
        assert!(r.stderr().contains("conf.yml.hbs → p → q → p"), "{}", r.stderr());
        assert!(r.stderr().contains("hint:"), "{}", r.stderr());
    }
    // Thousands of nested blocks overflowed handlebars' recursion; they are refused before it parses them.
    let n = 20_000;
    t.write("tree/app/conf.yml.hbs", format!("{}x{}", "{{#if vars.port}}".repeat(n), "{{/if}}".repeat(n)));
    let r = render(&t, "out");
    assert_eq!(r.code(), Some(1), "{}", r.stderr());
    assert!(r.stderr().contains("conf.yml.hbs:1: blocks are nested more than 64 deep"), "{}", r.stderr());
    // A chain of partials without recursion renders.
    t.write(
        "tree/app/conf.yml.hbs",
        "{{#*inline \"p\"}}[{{> q}}]{{/inline}}{{#*inline \"q\"}}q{{/inline}}{{> p}}\n",
    );
    render(&t, "out").success();
    assert_eq!(std::fs::read_to_string(t.path().join("out/app/conf.yml")).unwrap(), "[q]\n");
}

#[test]
fn concurrent_renders_on_a_fresh_project_agree_on_the_secrets() {
    // Several rounds: the race is one of milliseconds.
    for round in 0..3 {
        let t = fixture();
        let children: Vec<_> = (0..8)
            .map(|i| {
                std::process::Command::new(crate::support::bin())
                    .current_dir(t.path())
                    .args(["render", "--out", &format!("out{i}")])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for c in children {
            let out = c.wait_with_output().unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        }
        let first = std::fs::read(t.path().join("out0/.env")).unwrap();
        for i in 1..8 {
            let env = std::fs::read(t.path().join(format!("out{i}/.env"))).unwrap();
            assert_eq!(env, first, "round {round}: render {i} used other secrets than render 0");
        }
        let saved = std::fs::read_to_string(t.path().join(".provisioner/secrets.toml")).unwrap();
        let hex = String::from_utf8(first).unwrap().lines().next().unwrap().replace("PROMETHEUS_HEX=", "");
        assert!(saved.contains(&hex), "the saved secrets are the ones rendered");
    }
}

#[test]
fn a_damaged_secrets_file_is_never_echoed() {
    let t = fixture();
    render(&t, "out").success();
    let p = t.path().join(".provisioner/secrets.toml");
    let text = std::fs::read_to_string(&p).unwrap();
    let secret = text.lines().find(|l| l.contains("grafana")).unwrap().split('"').nth(1).unwrap().to_string();
    // Cut the file in the middle of a value, as a full disk or a bad editor save would.
    let cut = text.find(&secret).unwrap() + secret.len();
    std::fs::write(&p, &text[..cut]).unwrap();
    let r = render(&t, "out").failure();
    assert!(r.stderr().contains("secrets.toml:"), "{}", r.stderr());
    assert!(r.stderr().contains("damaged") && r.stderr().contains("hint: delete it"), "{}", r.stderr());
    assert!(!r.stderr().contains(&secret[..8]), "the secret was echoed: {}", r.stderr());
}

/// `[provision] base`: the source tree overrides the base file by file (a template may replace a plain file),
/// both `vars.toml` are merged with the source's winning, links in the base are refused like in the source, and a
/// missing base is reported at its line and column.
#[test]
#[cfg_attr(windows, ignore = "windows: symbolic links need developer mode or elevation there")]
fn a_base_tree_is_overridden_file_by_file_by_the_source() {
    let t = fixture();
    t.write("base/vars.toml", "greeting = \"from the base\"\nextra = \"only in the base\"\n");
    t.write("base/run.sh", "#!/bin/sh\necho base\n");
    t.write("base/only-base.txt.hbs", "{{vars.extra}} / {{vars.port}}\n");
    t.write("base/app/conf.yml.hbs", "replaced by the source\n");
    let cfg = CONFIG.replace("source = \"tree\"", "base = \"base\"\nsource = \"tree\"");
    t.write("box-config.toml", cfg.replace("greeting = \"hello from the config\"\n", ""));
    render(&t, "out").success();
    let read = |rel: &str| std::fs::read_to_string(t.path().join("out").join(rel)).unwrap();
    assert_eq!(read("only-base.txt"), "only in the base / 8000\n", "base file with the merged vars");
    assert!(read("app/conf.yml").contains("say: default"), "the source's file and vars.toml win");
    assert_eq!(read("run.sh"), "#!/bin/sh\necho plain {{not.rendered}}\n");
    assert!(!t.path().join("out/vars.toml").exists());
    // A plain file in the source and a template of the same output in the base would both write one file.
    t.write("tree/only-base.txt", "plain\n");
    render(&t, "out3").failure().stderr_contains("both render to only-base.txt").stderr_contains("hint:");
    std::fs::remove_file(t.path().join("tree/only-base.txt")).unwrap();
    // A link in the base is refused as in the source.
    symlink("/etc/passwd", t.path().join("base/passwd")).unwrap();
    render(&t, "out2").failure().stderr_contains("base/passwd");
    std::fs::remove_file(t.path().join("base/passwd")).unwrap();
    // A missing base: validate names the key's position.
    std::fs::rename(t.path().join("base"), t.path().join("gone")).unwrap();
    let r = Test::new().cwd(t.path()).arg("validate").run().failure();
    assert!(
        r.stderr().contains("box-config.toml:8:8") && r.stderr().contains("does not exist"),
        "{}",
        r.stderr()
    );
}

/// Partials that each include the next ten times: `levels` deep, the innermost writing `inner`.
fn partial_nest(levels: usize, inner: &str) -> String {
    let mut src = format!("{{{{#*inline \"p0\"}}}}{inner}{{{{/inline}}}}\n");
    for i in 1..=levels {
        src.push_str(&format!(
            "{{{{#*inline \"p{i}\"}}}}{}{{{{/inline}}}}\n",
            format!("{{{{> p{}}}}}", i - 1).repeat(10)
        ));
    }
    src + &format!("{{{{> p{levels}}}}}\n")
}

#[test]
fn a_nest_of_partials_is_refused_before_it_expands() {
    // 12 lines of partials: 10^12 expansions of a 120-byte line; refused by counting, before rendering anything.
    let t = fixture();
    t.write("tree/app/conf.yml.hbs", partial_nest(12, &"x".repeat(120)));
    for args in [vec!["validate"], vec!["render", "--out", "out"]] {
        let start = std::time::Instant::now();
        let r = Test::new().cwd(t.path()).args(args.clone()).run();
        let took = start.elapsed();
        assert_eq!(r.code(), Some(1), "{args:?}: {}", r.stderr());
        assert!(
            r.stderr().contains("conf.yml.hbs: partials expand more than 10000 times"),
            "{args:?}: {}",
            r.stderr()
        );
        assert!(r.stderr().contains("conf.yml.hbs → p12 → p11"), "{}", r.stderr());
        assert!(r.stderr().contains("\nhint: include partials fewer times"), "{}", r.stderr());
        assert!(!r.stderr().contains("include itself"), "{}", r.stderr());
        assert!(took < std::time::Duration::from_secs(20), "{args:?} took {took:?}");
    }
    assert!(!t.path().join("out").exists(), "nothing written");
}

#[test]
fn output_past_the_size_bound_stops_rendering_at_the_bound() {
    // 1110 expansions (under the count) of a 100 kB value: 111 MB if rendered whole; stopped at 8 MiB.
    let t = fixture();
    t.write("box-config.toml", format!("{CONFIG}big = \"{}\"\n", "y".repeat(100_000)));
    t.write("tree/app/conf.yml.hbs", partial_nest(3, "{{vars.big}}"));
    let start = std::time::Instant::now();
    let r = render(&t, "out");
    let took = start.elapsed();
    assert_eq!(r.code(), Some(1), "{}", r.stderr());
    let err = r.stderr();
    assert!(err.contains("conf.yml.hbs: renders to more than 8 MiB; rendering stopped there"), "{err}");
    assert!(err.contains("hint:") && err.contains("8 MiB per template, 32 MiB in all, 10 s"), "{err}");
    assert!(took < std::time::Duration::from_secs(30), "took {took:?}");
    assert!(!t.path().join("out").exists(), "nothing written");
    // Eight templates of 5 MB each (1 MB written five times) pass the bound per file, not the bound in all.
    t.write("tree/app/conf.yml.hbs", "ok\n");
    for i in 0..8 {
        t.write(
            &format!("tree/big{i}.hbs"),
            partial_nest(1, "{{vars.big}}").replace("{{> p1}}\n", &"{{> p1}}".repeat(5)),
        );
    }
    let r = render(&t, "out");
    assert_eq!(r.code(), Some(1), "{}", r.stderr());
    assert!(
        r.stderr().contains("big6.hbs: takes the rendered templates of the tree past 32 MiB together"),
        "{}",
        r.stderr()
    );
}

/// Every file under `dir` (relative paths), to see that a refused render deleted nothing.
fn tree(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = walkdir::WalkDir::new(dir)
        .min_depth(1)
        .into_iter()
        .map(|e| e.unwrap().path().strip_prefix(dir).unwrap().display().to_string())
        .collect();
    out.sort();
    out
}

#[test]
#[cfg_attr(windows, ignore = "windows: symbolic links need developer mode or elevation there")]
fn force_never_replaces_a_directory_render_did_not_make() {
    let t = fixture();
    let run = |args: &[&str]| Test::new().cwd(t.path()).arg("render").args(args.iter().copied()).run();
    // Another project, its machine's state and disk included.
    t.write("other/box-config.toml", CONFIG);
    t.write("other/.provisioner/disk.qcow2", vec![7u8; 4096]);
    t.write("other/.provisioner/state.json", "{}");
    t.write("other/.provisioner/id_ed25519", "key");
    // A git checkout.
    t.write("repo/.git/HEAD", "ref: refs/heads/main\n");
    t.write("repo/README.md", "mine\n");
    // A file where a rendered one would go, among others (an older render's output, edited).
    t.write("mixed/run.sh", "#!/bin/sh\n");
    t.write("mixed/notes.txt", "mine\n");
    let before: Vec<_> = ["other", "repo", "mixed"].iter().map(|d| (d, tree(&t.path().join(d)))).collect();
    for (out, names) in [
        ("other", "holds 2 entries render did not write: .provisioner/, box-config.toml;"),
        ("other/.provisioner", "holds 3 entries render did not write: disk.qcow2, id_ed25519, state.json;"),
        ("repo", "holds 2 entries render did not write: .git/, README.md;"),
        ("mixed", "holds 1 entry render did not write: notes.txt;"),
    ] {
        for force in [false, true] {
            let args: &[&str] = if force { &["--out", out, "--force"] } else { &["--out", out] };
            let r = run(args).failure();
            assert_eq!(r.code(), Some(1), "{out}");
            let err = r.stderr();
            assert!(err.contains(&format!("--out {out} {names}")), "{out} {force}: {err}");
            assert!(
                err.contains("--force or not") && err.contains("\nhint: pass a new or empty directory"),
                "{err}"
            );
        }
    }
    for (dir, files) in &before {
        assert_eq!(&tree(&t.path().join(dir)), files, "{dir}: something was deleted");
    }
    assert_eq!(std::fs::read(t.path().join("other/.provisioner/disk.qcow2")).unwrap(), vec![7u8; 4096]);
    let no_temp = |d: &str| tree(&t.path().join(d)).iter().all(|p| !p.contains(".render-"));
    assert!(no_temp("."), "{:?}", tree(t.path()));

    // The marker only counts as a regular file: a link or a directory of that name is named, not trusted.
    t.write("linkmark/x", "mine\n");
    symlink("/etc/hostname", t.path().join("linkmark/.provisioner-render")).unwrap();
    run(&["--out", "linkmark", "--force"])
        .failure()
        .stderr_contains("holds 2 entries render did not write: .provisioner-render (a symbolic link), x;");
    t.write("dirmark/.provisioner-render/keep", "mine\n");
    run(&["--out", "dirmark", "--force"])
        .failure()
        .stderr_contains("holds 1 entry render did not write: .provisioner-render/;");
    assert!(
        t.path().join("linkmark/x").is_file() && t.path().join("dirmark/.provisioner-render/keep").is_file()
    );
    // A file is not a directory, --force or not.
    t.write("afile", "mine\n");
    for args in [&["--out", "afile"][..], &["--out", "afile", "--force"]] {
        run(args).failure().stderr_contains("--out afile exists and is not a directory");
    }
    assert_eq!(std::fs::read_to_string(t.path().join("afile")).unwrap(), "mine\n");

    // Its own output is replaced, with or without --force; stale files go with it.
    run(&["--out", "out"]).success();
    t.write("out/stale", "x");
    run(&["--out", "out"]).success();
    assert!(!t.path().join("out/stale").exists() && t.path().join("out/app/conf.yml").is_file());
    t.write("out/stale", "x");
    run(&["--out", "out", "--force"]).success();
    assert!(!t.path().join("out/stale").exists() && t.path().join("out/.provisioner-render").is_file());
    // An older render's output (no marker) holding only files render writes: replaced with --force only.
    std::fs::remove_file(t.path().join("out/.provisioner-render")).unwrap();
    t.write("out/run.sh", "edited\n");
    run(&["--out", "out"])
        .failure()
        .stderr_contains("--out out holds only files render writes, but no .provisioner-render marker")
        .stderr_contains("hint: add --force");
    assert_eq!(std::fs::read_to_string(t.path().join("out/run.sh")).unwrap(), "edited\n");
    run(&["--out", "out", "--force"]).success();
    assert_eq!(
        std::fs::read_to_string(t.path().join("out/run.sh")).unwrap(),
        "#!/bin/sh\necho plain {{not.rendered}}\n"
    );
    assert!(t.path().join("out/.provisioner-render").is_file());
}
