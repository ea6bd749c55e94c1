//! Helpers for unit tests only.

/// A temporary directory holding an empty `bin/` for [`stand_in`]s: (the directory, its `bin`).
pub(crate) fn stand_in_dir() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    (dir, bin)
}

/// Write an executable `sh` script `bin/name` running `body`: a stand-in for a guest tool on a test's PATH.
pub(crate) fn stand_in(bin: &std::path::Path, name: &str, body: &str) {
    let f = bin.join(name);
    std::fs::write(&f, format!("#!/bin/sh\n{body}\n")).unwrap();
    crate::platform::set_mode(&f, 0o755).unwrap();
}

/// Run a guest command `cmd` with `/bin/sh -c` here, the way the guest would, with stand-ins on a PATH of their
/// own: `sudo` (drops `-n` and runs the command), each `(name, script body)` of `stand_ins`, and the system's sh,
/// grep, cut, sed, awk, printf and cat unless a stand-in of that name is given (any other tool is missing, e.g.
/// `curl`). Returns stdout; panics with stderr when the command fails.
pub(crate) fn guest_sh(cmd: &str, stand_ins: &[(&str, &str)]) -> String {
    let (_dir, bin) = stand_in_dir();
    let put = |name: &str, body: &str| stand_in(&bin, name, body);
    put("sudo", "[ \"$1\" = -n ] && shift; exec \"$@\"");
    for (name, body) in stand_ins {
        put(name, body);
    }
    for tool in ["sh", "grep", "cut", "sed", "awk", "printf", "cat"] {
        if stand_ins.iter().any(|(name, _)| *name == tool) {
            continue;
        }
        if let Ok(p) = which::which(tool) {
            crate::platform::symlink(&p, &bin.join(tool)).unwrap();
        }
    }
    let out = std::process::Command::new("/bin/sh").args(["-c", cmd]).env("PATH", &bin).output().unwrap();
    assert!(out.status.success(), "`{cmd}` failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}
