//! OpenSSH connection reuse for the system `ssh` (`provisioner ssh`, the `ssh-config` stanza): `ControlMaster auto`
//! with a control socket per machine and `ControlPersist`, so a second `ssh -c` opens a channel on the connection
//! the first one left instead of a new TCP + key exchange + authentication (~0.4 s to a TCG guest).
//!
//! The socket lives in the state dir when its path fits a unix socket address, else in a private (0700) directory
//! under `$XDG_RUNTIME_DIR` or `/tmp`. `halt`, `reload` and `destroy` close the master, so no ssh process outlives
//! the machine. Opt out with `[ssh] reuse_connection = false` or `PROVISIONER_SSH_REUSE=0`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::machine::StateDir;

/// How long an idle master stays up after its last client ends (OpenSSH `ControlPersist`).
pub const PERSIST: &str = "10m";
/// File name of the control socket in the state dir.
pub const SOCKET_NAME: &str = "ssh-control";
/// The environment switch: `0`, `no`, `false` or `off` turns reuse off whatever the config says.
pub const ENV: &str = "PROVISIONER_SSH_REUSE";
/// `sun_path` holds 104 bytes on macOS and the BSDs (108 on Linux); keep to the smaller, NUL included.
const SUN_PATH_MAX: usize = 104;
/// OpenSSH binds `PATH.XXXXXXXXXXXXXXXX` first and renames it into place, so that much more must fit.
const TEMP_SUFFIX: usize = 17;

/// Whether connection reuse is on: the config's `[ssh] reuse_connection`, overridden by [`ENV`]. Pure.
pub fn enabled(config: bool, env: Option<&str>) -> bool {
    match env.map(|v| v.trim().to_ascii_lowercase()) {
        Some(v) if ["0", "no", "false", "off"].contains(&v.as_str()) => false,
        Some(v) if ["1", "yes", "true", "on"].contains(&v.as_str()) => true,
        _ => config,
    }
}

/// Whether reuse is on for this config and process environment.
/// Always off on Windows: its OpenSSH has no ControlMaster, so each `provisioner ssh` is a fresh connection.
pub fn enabled_for(config: bool) -> bool {
    crate::platform::SSH_CONTROL_MASTER && enabled(config, std::env::var(ENV).ok().as_deref())
}

/// Whether a unix socket can be bound at `path` by OpenSSH (temp name included). Pure.
pub fn fits(path: &Path) -> bool {
    path.as_os_str().len() + TEMP_SUFFIX < SUN_PATH_MAX
}

/// Where the control socket of the machine whose (absolute) state dir is `state_root` goes: in the state dir when
/// the path fits, else `fallback_dir/<16 hex of sha256(state dir)>`. Pure.
pub fn choose(state_root: &Path, fallback_dir: &Path) -> PathBuf {
    let inside = state_root.join(SOCKET_NAME);
    if fits(&inside) {
        return inside;
    }
    let digest = hex::encode(Sha256::digest(state_root.as_os_str().as_encoded_bytes()));
    fallback_dir.join(&digest[..16])
}

/// The private directory for sockets whose state dir path is too long: `$XDG_RUNTIME_DIR/provisioner` when that is
/// set, absolute and short enough, else `/tmp/provisioner-UID`. Pure.
pub fn fallback_dir(xdg_runtime_dir: Option<&Path>, uid: u32) -> PathBuf {
    if let Some(x) = xdg_runtime_dir.filter(|x| x.is_absolute()) {
        let dir = x.join("provisioner");
        if fits(&dir.join("0123456789abcdef")) {
            return dir;
        }
    }
    PathBuf::from(format!("/tmp/provisioner-{uid}"))
}

/// The control socket path for a machine, making (and checking) the private fallback directory when it is used.
pub fn socket_path(state: &StateDir) -> Result<PathBuf> {
    // Canonical, so a project reached through a symlink finds the same socket (and the same fallback name).
    let root = match crate::platform::canonicalize(&state.root) {
        Ok(p) => p,
        Err(_) => {
            std::path::absolute(&state.root).with_context(|| format!("resolve {}", state.root.display()))?
        }
    };
    let uid = crate::platform::user_id();
    let xdg = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from);
    let fallback = fallback_dir(xdg.as_deref(), uid);
    let path = choose(&root, &fallback);
    if path.parent() == Some(fallback.as_path()) {
        private_dir(&fallback, uid)?;
    }
    Ok(path)
}

/// Create `dir` 0700 if missing; refuse one that another user owns or others can enter (e.g. a squatted /tmp name).
fn private_dir(dir: &Path, uid: u32) -> Result<()> {
    match crate::platform::create_dir(dir, 0o700, false) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(e).with_context(|| format!("create the SSH control directory {}", dir.display()))
        }
    }
    let md = std::fs::symlink_metadata(dir).with_context(|| format!("stat {}", dir.display()))?;
    let (owner, mode) =
        (crate::platform::owner(&md).unwrap_or(uid), crate::platform::mode(&md).unwrap_or(0o700));
    if !md.is_dir() || owner != uid || mode & 0o077 != 0 {
        bail!(
            "the SSH control directory {} is not a private directory of this user (owner uid {}, mode {:o})\n\
             hint: remove it (it only holds control sockets), or set {ENV}=0 or [ssh] reuse_connection = false to \
             turn connection reuse off",
            dir.display(),
            owner,
            mode
        );
    }
    Ok(())
}

/// The OpenSSH options that turn reuse on, in config spelling.
pub fn options(socket: &Path) -> Vec<(&'static str, String)> {
    vec![
        ("ControlMaster", "auto".into()),
        ("ControlPath", socket.display().to_string()),
        ("ControlPersist", PERSIST.into()),
    ]
}

/// `ControlPath="..."` for `ssh -o`: quoted (project paths may have spaces) with `%` escaped. Pure.
pub fn path_option(socket: &Path) -> String {
    format!("ControlPath=\"{}\"", socket.display().to_string().replace('%', "%%"))
}

/// Whether a master answers on `socket` (a connect on the unix socket; no process started).
pub fn master_alive(socket: &Path) -> bool {
    crate::platform::unix_socket_alive(socket)
}

/// Stop the machine's master connection if one runs (`ssh -O exit`) and remove its socket. Best effort: a machine
/// going down takes the connection with it anyway; this makes sure no ssh process outlives it.
pub fn close_master(state: &StateDir) -> Result<bool> {
    if !crate::platform::SSH_CONTROL_MASTER {
        return Ok(false);
    }
    let socket = socket_path(state)?;
    if std::fs::symlink_metadata(&socket).is_err() {
        return Ok(false);
    }
    let mut closed = false;
    if master_alive(&socket) {
        if let Ok(ssh) = which::which("ssh") {
            let out = crate::process::Cmd::new(ssh)
                .args(["-F", "none", "-o", "LogLevel=QUIET", "-o"])
                .arg(path_option(&socket))
                .args(["-O", "exit", "provisioner-machine"])
                .timeout(Duration::from_secs(10))
                .output()?;
            closed = out.success();
        }
    }
    match std::fs::remove_file(&socket) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("remove the SSH control socket {}", socket.display()))?
        }
        _ => {}
    }
    Ok(closed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_path_option_is_quoted_and_escaped() {
        assert_eq!(path_option(Path::new("/a b/50%/s")), "ControlPath=\"/a b/50%%/s\"");
    }

    #[test]
    fn env_overrides_config_both_ways() {
        assert!(enabled(true, None));
        assert!(!enabled(false, None));
        assert!(!enabled(true, Some("0")));
        assert!(!enabled(true, Some(" Off ")));
        assert!(enabled(false, Some("yes")));
        assert!(enabled(true, Some("garbage")), "an unknown value keeps the config's choice");
    }

    #[test]
    #[cfg_attr(
        windows,
        ignore = "windows: ControlMaster sockets and their private Unix dir do not exist there"
    )]
    fn short_state_dirs_keep_the_socket_long_ones_fall_back() {
        let fb = Path::new("/run/user/1000/provisioner");
        let short = Path::new("/home/ann/lab/.provisioner");
        assert_eq!(choose(short, fb), short.join(SOCKET_NAME));
        let long = PathBuf::from(format!("/home/ann/{}/.provisioner", "d".repeat(80)));
        let p = choose(&long, fb);
        assert_eq!(p.parent(), Some(fb));
        assert_eq!(p.file_name().unwrap().len(), 16);
        assert!(fits(&p));
        assert_ne!(choose(&long.join("x"), fb), p, "one socket per state dir");
        // The limit counts OpenSSH's temporary suffix: 86 bytes fit, 87 do not.
        assert!(fits(Path::new(&"a".repeat(86))));
        assert!(!fits(Path::new(&"a".repeat(87))));
    }

    #[test]
    #[cfg_attr(
        windows,
        ignore = "windows: ControlMaster sockets and their private Unix dir do not exist there"
    )]
    fn fallback_prefers_a_usable_runtime_dir() {
        assert_eq!(fallback_dir(Some(Path::new("/run/user/7")), 7), Path::new("/run/user/7/provisioner"));
        assert_eq!(fallback_dir(None, 7), Path::new("/tmp/provisioner-7"));
        assert_eq!(fallback_dir(Some(Path::new("relative")), 7), Path::new("/tmp/provisioner-7"));
        let long = PathBuf::from(format!("/{}", "r".repeat(90)));
        assert_eq!(fallback_dir(Some(&long), 7), Path::new("/tmp/provisioner-7"));
    }

    #[test]
    #[cfg_attr(
        windows,
        ignore = "windows: ControlMaster sockets and their private Unix dir do not exist there"
    )]
    fn a_fallback_dir_others_can_enter_is_refused() {
        use crate::platform;
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("ctl");
        let uid = platform::user_id();
        private_dir(&dir, uid).unwrap();
        assert_eq!(platform::mode(&std::fs::metadata(&dir).unwrap()), Some(0o700));
        platform::set_mode(&dir, 0o755).unwrap();
        let e = format!("{:#}", private_dir(&dir, uid).unwrap_err());
        assert!(e.contains("not a private directory") && e.contains("hint:"), "{e}");
        assert!(private_dir(&dir, uid + 1).is_err(), "another owner");
    }
}
