//! The CLI surface: every command declared with help, completions.

use crate::support::Test;

#[test]
fn every_command_has_help() {
    for cmd in [
        "up",
        "ssh",
        "ssh-config",
        "status",
        "halt",
        "reload",
        "provision",
        "destroy",
        "validate",
        "render",
        "health",
        "verify",
        "load",
        "box",
        "completions",
    ] {
        let r = Test::new().args([cmd, "--help"]).run().success();
        assert!(r.stdout().contains("Usage:"), "{cmd} --help: {}", r.stdout());
    }
}

#[test]
fn completions_for_bash_name_every_command() {
    let r = Test::new().args(["completions", "bash"]).run().success();
    for cmd in ["up", "destroy", "ssh-config", "health"] {
        assert!(r.stdout().contains(cmd), "bash completion lacks {cmd}");
    }
}
