//! Snapshot, suspend/resume, package and cached-lab commands through the binary, without a VM (fast tier). The
//! real-VM test is `vm::vm_snapshots_cached_lab_and_package`.

use crate::support::Test;

fn machine(t: &Test) {
    t.write(
        "box-config.toml",
        "[machine]\nname = \"snapless\"\nprovider = \"libvirt\"\n\n[box]\nimage = \"/nonexistent.qcow2\"\n",
    );
}

#[test]
fn machine_commands_without_a_machine_say_it_is_not_created() {
    let t = Test::new();
    machine(&t);
    for args in [
        vec!["snapshot", "save", "s1"],
        vec!["snapshot", "restore", "s1"],
        vec!["snapshot", "list"],
        vec!["snapshot", "delete", "s1"],
        vec!["suspend"],
        vec!["resume"],
        vec!["package"],
    ] {
        let r = Test::new().cwd(t.path()).args(args.clone()).run().failure();
        assert!(r.stderr().contains("\"snapless\" is not created"), "{args:?}: {}", r.stderr());
        assert!(r.stderr().contains("hint: `provisioner up` creates it"), "{args:?}: {}", r.stderr());
    }
    assert!(!t.path().join(".provisioner").exists(), "no state may be created");
}

#[test]
#[cfg_attr(
    windows,
    ignore = "windows: the recorded machine is a libvirt one, which a Windows host refuses (libvirt runs on Linux only) \
              before any command looks at the snapshot name"
)]
fn a_bad_snapshot_name_is_refused_before_the_hypervisor_is_asked() {
    let t = Test::new();
    machine(&t);
    // A recorded machine (state.json) on a libvirt URI nobody serves: the name check must come first.
    t.write(
        ".provisioner/state.json",
        r#"{"provider": "libvirt", "vm_name": "provisioner-snapless-00000000", "libvirt_uri": "test:///default"}"#,
    );
    for bad in ["a;b", "a b", "x/y", ".hidden", ""] {
        let r = Test::new().cwd(t.path()).args(["snapshot", "save", bad]).run().failure();
        assert!(r.stderr().contains("is not a valid snapshot name"), "{bad:?}: {}", r.stderr());
        assert!(r.stderr().contains("hint:"), "{}", r.stderr());
    }
}

#[test]
fn box_list_shows_cached_labs_with_their_size_and_box_remove_drops_them() {
    let cache = tempfile::tempdir().unwrap();
    let key = "ab".repeat(32);
    let entry = cache.path().join("labs").join(&key);
    std::fs::create_dir_all(entry.join("keys")).unwrap();
    std::fs::write(entry.join("memory.save"), vec![0u8; 3 << 20]).unwrap();
    let meta = serde_json::json!({
        "key": key, "machine": "lab", "vm_name": "provisioner-lab-01234567", "project_dir": "/srv/lab",
        "provider": "libvirt", "box_id": "6e3b50435800aaaa", "provider_data": "uuid",
        "created": "2026-12-02T01:00:00Z", "size": 3 << 20,
    });
    std::fs::write(entry.join("lab.json"), meta.to_string()).unwrap();
    let dir = cache.path().to_string_lossy().into_owned();

    let r = Test::new().env("PROVISIONER_CACHE_DIR", &dir).args(["box", "list"]).run().success();
    let out = r.stdout();
    assert!(out.contains("LAB") && out.contains("abababababab") && out.contains("3.0 MiB"), "{out}");
    assert!(out.contains("/srv/lab") && out.contains("6e3b50435800"), "{out}");
    let r = Test::new().env("PROVISIONER_CACHE_DIR", &dir).args(["--json", "box", "list"]).run().success();
    let lab_line = r.stdout().lines().find(|l| l.contains("\"lab\"")).map(str::to_string).unwrap();
    let v: serde_json::Value = serde_json::from_str(&lab_line).unwrap();
    assert_eq!(v["lab"]["key"], key.as_str());

    let r = Test::new().env("PROVISIONER_CACHE_DIR", &dir).args(["box", "remove", "ababab"]).run().success();
    assert!(
        r.stderr().contains("removed cached lab abababababab") && r.stderr().contains("3.0 MiB"),
        "{}",
        r.stderr()
    );
    assert!(!entry.exists());
    Test::new()
        .env("PROVISIONER_CACHE_DIR", &dir)
        .args(["box", "remove", "ababab"])
        .run()
        .failure()
        .stderr_contains("hint:");
}
