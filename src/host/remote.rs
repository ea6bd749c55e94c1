//! A remote libvirt host reached over SSH (`qemu+ssh://`, `qemu+libssh://`): nothing is shared with the host but
//! the connection.
//!
//! The host's own SSH key is checked like OpenSSH does, against known_hosts (`known_hosts=` in the URI, else
//! `$HOME/.ssh/known_hosts`, plus the system-wide file); an unknown host is refused with the command that adds
//! it. libvirt's `ssh` transport ignores `known_hosts=`, so the tool runs it through an ssh wrapper it writes
//! itself (never one named in the config) with `UserKnownHostsFile`, `StrictHostKeyChecking=yes` and
//! `BatchMode=yes`; for `libssh` it adds `known_hosts=` and `known_hosts_verify=normal`.

use std::path::{Path, PathBuf};

use std::time::Duration;

use anyhow::{Context, Result};

use crate::platform::MuxFailure;
use crate::process::{Cmd, Output};

/// How long an idle master connection to a libvirt host stays up after its last virsh call or ProxyCommand ended
/// (OpenSSH `ControlPersist`, seconds): long enough for the calls of one command and the next command, short
/// enough that nothing lingers.
pub const CONTROL_PERSIST: &str = "60";
/// The environment switch shared with the guest's connection reuse (`ssh::control::ENV`): `0`/`no`/`false`/`off`
/// turns the host's master connection off too.
const REUSE_ENV: &str = "PROVISIONER_SSH_REUSE";
/// `PROVISIONER_REMOTE_EXEC`, the switch of virsh calls run on the host (`host::libvirtd`): `ssh` runs each through
/// an `ssh` process even when the master could take it in-process (the way before, for comparison).
const EXEC_ENV: &str = "PROVISIONER_REMOTE_EXEC";
/// How `-v` names a command run through the master in-process (no child process): `+ 9 ms: [ssh master] HOST CMD`.
pub const MASTER_TRACE: &str = "[ssh master]";
/// `sun_path` holds 104 bytes on macOS and the BSDs; OpenSSH binds `PATH.` + 16 random characters first.
const SUN_PATH_ROOM: usize = 104 - 17;

/// The tool's cache root, as `boxes::cache_dir` (which sits above this module): `$PROVISIONER_CACHE_DIR`, else the
/// user's cache dir + `provisioner`.
fn cache_root() -> PathBuf {
    if let Some(d) = std::env::var_os("PROVISIONER_CACHE_DIR") {
        return PathBuf::from(d);
    }
    dirs::cache_dir().unwrap_or_else(|| PathBuf::from("/var/tmp")).join("provisioner")
}

/// Whether the master connection to a libvirt host is used (on unless [`REUSE_ENV`] turns it off). Pure.
pub fn reuse_enabled(env: Option<&str>) -> bool {
    !env.is_some_and(|v| ["0", "no", "false", "off"].contains(&v.trim().to_ascii_lowercase().as_str()))
}

/// The ciphers offered to a libvirt host, fastest first: AES-GCM where the CPU has AES instructions (several GB/s),
/// else ChaCha20-Poly1305 (faster than AES in software); then the other ciphers OpenSSH enables by default, so any
/// sshd since OpenSSH 6.5 finds one it shares (the server picks the first of ours it also offers). Pure.
pub fn cipher_list(aes: bool) -> String {
    let (first, second) = if aes {
        ("aes128-gcm@openssh.com", "chacha20-poly1305@openssh.com")
    } else {
        ("chacha20-poly1305@openssh.com", "aes128-gcm@openssh.com")
    };
    format!("{first},{second},aes256-gcm@openssh.com,aes128-ctr,aes192-ctr,aes256-ctr")
}

/// Does this CPU have AES instructions (x86 AES-NI, the Armv8 crypto extension)?
pub fn has_aes_instructions() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes") && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes") && std::arch::is_aarch64_feature_detected!("pmull")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// The URI the host's own virsh connects with: the driver and path of a remote URI, without the host and the
/// transport's parameters (`qemu+ssh://root@h:2200/system?keyfile=/k` is `qemu:///system` there). Pure.
pub fn local_uri(uri: &str) -> Option<String> {
    let (scheme, rest) = uri.split_once("://")?;
    let (driver, _) = scheme.split_once('+')?;
    let rest = rest.split_once('?').map_or(rest, |(r, _)| r);
    let path = &rest[rest.find('/')?..];
    Some(format!("{driver}://{path}"))
}

/// A remote libvirt host reached over SSH, parsed from a URI that passed `config::check_libvirt_uri`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteHost {
    /// "ssh" or "libssh".
    pub transport: String,
    pub user: Option<String>,
    pub host: String,
    pub port: Option<u16>,
    pub keyfile: Option<String>,
    /// The user known_hosts file the host key is checked against.
    pub known_hosts: PathBuf,
    /// `known_hosts=` was given in the URI.
    pub known_hosts_given: bool,
}

/// The user's default known_hosts file (`$HOME/.ssh/known_hosts`, as OpenSSH's `~`).
pub fn default_known_hosts() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
        .join(".ssh/known_hosts")
}

/// The remote host of an SSH URI; None for local, unix, tls and tcp URIs. Pure but for `$HOME`.
pub fn parse(uri: &str) -> Option<RemoteHost> {
    let (scheme, rest) = uri.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    let transport = scheme.split_once('+')?.1.to_string();
    if transport != "ssh" && transport != "libssh" {
        return None;
    }
    let (before_query, query) = rest.split_once('?').unwrap_or((rest, ""));
    let authority = &before_query[..before_query.find('/').unwrap_or(before_query.len())];
    let (user, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u.to_string()), h),
        None => (None, authority),
    };
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (h, p) = v6.split_once(']')?;
        (h.to_string(), p.strip_prefix(':').and_then(|p| p.parse().ok()))
    } else {
        match hostport.split_once(':') {
            Some((h, p)) => (h.to_string(), p.parse().ok()),
            None => (hostport.to_string(), None),
        }
    };
    if host.is_empty() {
        return None;
    }
    let mut keyfile = None;
    let mut known_hosts = None;
    for pair in query.split(['&', ';']).filter(|p| !p.is_empty()) {
        let (n, v) = pair.split_once('=').unwrap_or((pair, ""));
        // libvirt percent-decodes parameter names and values; so do we (the URI check refused malformed ones).
        // Validated URIs only reach here (config::check_libvirt_uri); a bad escape is kept as written.
        let decode = |x: &str| crate::text::percent_decode(x).unwrap_or_else(|| x.to_string());
        let (n, v) = (decode(n), decode(v));
        match n.to_ascii_lowercase().as_str() {
            "keyfile" => keyfile = Some(v),
            "known_hosts" => known_hosts = Some(PathBuf::from(v)),
            _ => {}
        }
    }
    Some(RemoteHost {
        transport,
        user,
        host,
        port,
        keyfile,
        known_hosts_given: known_hosts.is_some(),
        known_hosts: known_hosts.unwrap_or_else(default_known_hosts),
    })
}

impl RemoteHost {
    /// How the host appears in known_hosts: `host`, or `[host]:port` for a port other than 22.
    pub fn known_hosts_name(&self) -> String {
        match self.port {
            Some(p) if p != 22 => format!("[{}]:{p}", self.host),
            _ => self.host.clone(),
        }
    }

    /// `user@host` (or `host`).
    pub fn destination(&self) -> String {
        match &self.user {
            Some(u) => format!("{u}@{}", self.host),
            None => self.host.clone(),
        }
    }

    /// The name of the host's control socket: `cm-` and 16 hex of sha256 of `user@host:port` and the key file (one
    /// master per login). Pure.
    pub fn control_name(&self) -> String {
        use sha2::Digest;
        let id = format!(
            "{}:{}\n{}",
            self.destination(),
            self.port.unwrap_or(22),
            self.keyfile.as_deref().unwrap_or("")
        );
        format!("cm-{}", &hex::encode(sha2::Sha256::digest(id.as_bytes()))[..16])
    }

    /// Where the master connection's socket goes: `CACHE/remote/cm-HASH` when that fits a unix socket address, else
    /// `/tmp/provisioner-UID/cm-HASH`. Pure but for the environment (the cache dir).
    pub fn control_path(&self) -> PathBuf {
        let inside = cache_root().join("remote").join(self.control_name());
        if inside.as_os_str().len() < SUN_PATH_ROOM {
            return inside;
        }
        PathBuf::from(format!("/tmp/provisioner-{}", crate::platform::user_id())).join(self.control_name())
    }

    /// Make the control socket's directory (0700); None when reuse is off or the directory cannot be made (ssh then
    /// runs without a master, as before).
    fn control_socket(&self) -> Option<PathBuf> {
        if !reuse_enabled(std::env::var(REUSE_ENV).ok().as_deref()) {
            return None;
        }
        let path = self.control_path();
        let dir = path.parent()?;
        if !crate::platform::SSH_CONTROL_MASTER {
            return None;
        }
        let _ = crate::platform::create_dir(dir, 0o700, true);
        let md = std::fs::symlink_metadata(dir).ok()?;
        let mine = md.is_dir() && crate::platform::owner(&md) == Some(crate::platform::user_id());
        if !mine {
            return None;
        }
        if crate::platform::mode(&md).is_some_and(|m| m & 0o077 != 0) {
            crate::platform::set_mode(dir, 0o700).ok()?;
        }
        Some(path)
    }

    /// The `-o` options that make OpenSSH share one connection to the host (`ControlMaster auto`, the socket of
    /// [`Self::control_path`], `ControlPersist` [`CONTROL_PERSIST`]); empty when reuse is off. `%` in the path is
    /// escaped for OpenSSH's token expansion.
    pub fn control_options(&self) -> Vec<String> {
        let Some(socket) = self.control_socket() else { return vec![] };
        vec![
            "-o".into(),
            "ControlMaster=auto".into(),
            "-o".into(),
            format!("ControlPath={}", socket.display().to_string().replace('%', "%%")),
            "-o".into(),
            format!("ControlPersist={CONTROL_PERSIST}"),
        ]
    }

    /// Whether a master connection to the host answers on its socket (a connect; no process started).
    pub fn master_alive(&self) -> bool {
        crate::platform::unix_socket_alive(&self.control_path())
    }

    /// Close the master connection to the host if one runs (`ssh -O exit`), and remove a stale socket. True when a
    /// master was closed. Best effort for the caller: the master would exit [`CONTROL_PERSIST`] seconds later anyway.
    pub fn close_master(&self) -> Result<bool> {
        let socket = self.control_path();
        if std::fs::symlink_metadata(&socket).is_err() {
            return Ok(false);
        }
        let mut closed = false;
        if self.master_alive() {
            let out = Cmd::new("ssh")
                .args(["-F", "none", "-o", "LogLevel=QUIET", "-o"])
                .arg(format!("ControlPath={}", socket.display().to_string().replace('%', "%%")))
                .args(["-O", "exit", &self.host])
                .timeout(std::time::Duration::from_secs(10))
                .output()?;
            closed = out.success();
        }
        match std::fs::remove_file(&socket) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(anyhow::Error::from(e)
                    .context(format!("remove the SSH control socket {}", socket.display())))?
            }
            _ => {}
        }
        Ok(closed)
    }

    /// The `-o` options that make OpenSSH check the host key against our known_hosts and never prompt.
    pub fn host_key_options(&self) -> Vec<String> {
        vec![
            "-o".into(),
            format!("UserKnownHostsFile={}", self.known_hosts.display()),
            "-o".into(),
            "StrictHostKeyChecking=yes".into(),
            "-o".into(),
            "BatchMode=yes".into(),
            // A host that stopped answering (link down, host gone) fails the command within a minute instead of
            // hanging it: the next run then completes what was left.
            "-o".into(),
            "ConnectTimeout=10".into(),
            "-o".into(),
            "ServerAliveInterval=15".into(),
            "-o".into(),
            "ServerAliveCountMax=3".into(),
        ]
    }

    /// Every option of a system `ssh` to the host (host key checks, key file, port, user), without the host.
    pub fn ssh_args(&self) -> Vec<String> {
        let mut a = self.host_key_options();
        a.extend(self.login_args());
        a
    }

    /// The key file, port and user options of a system `ssh` to the host.
    fn login_args(&self) -> Vec<String> {
        let mut a = Vec::new();
        if let Some(k) = &self.keyfile {
            a.extend(["-i".into(), k.clone(), "-o".into(), "IdentitiesOnly=yes".into()]);
        }
        if let Some(p) = self.port {
            a.extend(["-p".into(), p.to_string()]);
        }
        if let Some(u) = &self.user {
            a.extend(["-l".into(), u.clone()]);
        }
        a
    }

    /// `ssh ... -W %h:%p HOST`, the system `ssh`'s ProxyCommand through this host (`-J` would not apply the URI's
    /// key file to the jump): every argument shell-quoted, `%` escaped but in `%h:%p`.
    pub fn proxy_command(&self) -> String {
        let mut words: Vec<String> = vec!["ssh".into()];
        let mut args = self.host_key_options();
        args.extend(self.control_options());
        args.extend(self.cipher_options());
        args.extend(self.login_args());
        words.extend(args.iter().map(|a| super::shell_quote(&a.replace('%', "%%"))));
        words.push("-W".into());
        words.push("%h:%p".into());
        words.push(super::shell_quote(&self.host.replace('%', "%%")));
        words.join(" ")
    }

    /// The command that adds the host's key to known_hosts, to run after checking its fingerprint.
    pub fn keyscan_command(&self) -> String {
        let port = match self.port {
            Some(p) if p != 22 => format!("-p {p} "),
            _ => String::new(),
        };
        let file = super::shell_quote(&self.known_hosts.to_string_lossy());
        format!(
            "ssh-keyscan {port}{host} | ssh-keygen -lf -   # compare with the host's own `ssh-keygen -lf \
             /etc/ssh/ssh_host_ed25519_key.pub`, then: ssh-keyscan {port}{host} >> {file}",
            host = self.host
        )
    }

    /// The error for a host whose key is not in known_hosts.
    pub fn unknown_host_error(&self) -> anyhow::Error {
        anyhow::anyhow!(
            "the SSH host key of the libvirt host {} is not in {} (nor in /etc/ssh/ssh_known_hosts); provisioner \
             never accepts an unknown host key\nhint: check the key's fingerprint and add it: {}",
            self.known_hosts_name(),
            self.known_hosts.display(),
            self.keyscan_command()
        )
    }

    /// Is the host in our known_hosts (or the system one)? `ssh-keygen -F` reads hashed entries too.
    pub fn is_known(&self) -> Result<bool> {
        let name = self.known_hosts_name();
        for file in [self.known_hosts.as_path(), Path::new("/etc/ssh/ssh_known_hosts")] {
            if !file.exists() {
                continue;
            }
            let out = Cmd::new("ssh-keygen")
                .arg("-F")
                .arg(&name)
                .arg("-f")
                .arg(file)
                .timeout(std::time::Duration::from_secs(10))
                .output()?;
            if out.success() && !out.stdout.trim().is_empty() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Refuse a host that is not in known_hosts (before any connection is made).
    pub fn check_known(&self) -> Result<()> {
        if self.is_known()? {
            Ok(())
        } else {
            Err(self.unknown_host_error())
        }
    }

    /// The `-o Ciphers=` option of every ssh to the host (the master's cipher carries every virsh call and upload
    /// on it): [`cipher_list`] for this machine's CPU.
    pub fn cipher_options(&self) -> Vec<String> {
        vec!["-o".into(), format!("Ciphers={}", cipher_list(has_aes_instructions()))]
    }

    /// `ssh ... HOST sh -c 'LC_ALL=C exec ARGV'`: a command run on the host itself, over the shared connection
    /// (a channel on the master, no new login) with the host key checked as for every other ssh to it. Every word
    /// of `argv` is quoted for the far `sh` (the login shell there only starts `sh`). ssh's own failures exit 255;
    /// a program missing on the host exits 127.
    pub fn exec(&self, argv: &[&str]) -> Cmd {
        let script = Self::script(argv);
        Cmd::new("ssh")
            .args(self.host_key_options())
            .args(self.control_options())
            .args(self.cipher_options())
            .args(self.login_args())
            .args(["-T", "--", &self.host, "sh", "-c"])
            .arg(super::shell_quote(&script))
    }

    /// `LC_ALL=C exec ARGV`, every word quoted for the far `sh`. Pure.
    fn script(argv: &[&str]) -> String {
        let words: Vec<String> = argv.iter().map(|a| super::shell_quote(a)).collect();
        format!("LC_ALL=C exec {}", words.join(" "))
    }

    /// Run `argv` on the host as [`Self::exec`] does (stdin: the file `stdin`, else nothing), output captured, a
    /// non-zero exit not an error: through the live master in-process ([`Self::through_master`]) when there is
    /// one, else the `ssh` process of [`Self::exec`] (which opens the master on the first call).
    pub fn run(&self, argv: &[&str], stdin: Option<&Path>, timeout: Duration) -> Result<Output> {
        if let Some(out) = self.through_master(argv, stdin, timeout)? {
            return Ok(out);
        }
        let mut cmd = self.exec(argv).timeout(timeout);
        if let Some(f) = stdin {
            cmd = cmd.stdin_file(f);
        }
        cmd.output()
    }

    /// [`Self::exec`]'s command run through the master connection's control socket in this process (OpenSSH's
    /// mux protocol, `platform::ssh_mux_exec`): a session channel on the master, no `ssh` process started. The
    /// same command string reaches the host, so its stdout, stderr and exit status are the ssh process's. None
    /// (the caller runs ssh) when there is no master yet, reuse is off, [`EXEC_ENV`] is `ssh`, the platform has no
    /// master, or the master did not open the session (a stale socket, a refusal, a protocol error: the command
    /// did not run). A master that does not answer within `timeout` is an error (ssh would hang on it too).
    pub fn through_master(
        &self,
        argv: &[&str],
        stdin: Option<&Path>,
        timeout: Duration,
    ) -> Result<Option<Output>> {
        if std::env::var(EXEC_ENV).is_ok_and(|v| v.trim().eq_ignore_ascii_case("ssh")) {
            return Ok(None);
        }
        let Some(socket) = self.control_socket() else { return Ok(None) };
        if std::fs::symlink_metadata(&socket).is_err() {
            return Ok(None);
        }
        crate::process::check_interrupted()?;
        let command = format!("sh -c {}", super::shell_quote(&Self::script(argv)));
        let file = match stdin {
            Some(f) => Some(
                std::fs::File::open(f).with_context(|| format!("open {} for `{command}`", f.display()))?,
            ),
            None => None,
        };
        let shown =
            crate::process::Shown::start(|| format!("{MASTER_TRACE} {} {command}", self.destination()));
        let cancelled = || crate::process::interrupted().is_some();
        let run = match crate::platform::ssh_mux_exec(&socket, &command, file.as_ref(), timeout, &cancelled) {
            Ok(run) => run,
            Err(MuxFailure::Unavailable(why)) => {
                shown.cancel();
                crate::process::show_ssh_instead(&socket, &why);
                return Ok(None);
            }
            Err(MuxFailure::Interrupted) => {
                crate::process::check_interrupted()?;
                anyhow::bail!("interrupted");
            }
            Err(MuxFailure::TimedOut) => {
                let path = socket.display().to_string().replace('%', "%%");
                anyhow::bail!(
                    "`{command}` on the libvirt host {} through its shared SSH connection (control socket {}) did \
                     not finish within {timeout:?}; its session was closed\nhint: if the host is up, the master \
                     connection may be stuck: close it with `ssh -O exit -o ControlPath={} {}` (or remove the \
                     socket) and run the command again",
                    self.destination(),
                    socket.display(),
                    super::shell_quote(&path),
                    self.host
                );
            }
        };
        drop(shown);
        let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
        let mut stderr = String::from_utf8_lossy(&run.stderr).into_owned();
        if run.code.is_none() {
            stderr.push_str(&format!(
                "the shared SSH connection to {} closed before the command's exit status came\n",
                self.destination()
            ));
        }
        if crate::process::verbosity() >= 2 {
            eprint!("{stdout}{stderr}");
        }
        Ok(Some(Output { status: crate::platform::exit_status(run.code.unwrap_or(255)), stdout, stderr }))
    }

    /// The ssh wrapper libvirt's `ssh` transport runs (its `command=`): OpenSSH with our host key options and
    /// every argument libvirt passes. Written by the tool itself, from values that passed the URI check.
    /// Every virsh call shares one connection to the host: the master the first one opens (ControlMaster, see
    /// [`Self::control_options`]).
    pub fn wrapper_script(&self) -> String {
        let mut opts = self.host_key_options();
        opts.extend(self.control_options());
        opts.extend(self.cipher_options());
        let opts: Vec<String> = opts.iter().map(|o| super::shell_quote(o)).collect();
        format!(
            "#!/bin/sh\n# written by provisioner: libvirt's ssh transport with the host key checked, over one \
             shared connection\nexec ssh {} \"$@\"\n",
            opts.join(" ")
        )
    }

    /// The URI handed to virsh: for `ssh`, the wrapper as `command=`; for `libssh`, our known_hosts with
    /// `known_hosts_verify=normal`.
    pub fn connect_uri(&self, uri: &str, wrapper: &Path) -> String {
        let sep = if uri.contains('?') { '&' } else { '?' };
        if self.transport == "ssh" {
            format!("{uri}{sep}command={}&no_tty=1", wrapper.display())
        } else {
            let mut u = uri.to_string();
            let mut sep = sep;
            if !self.known_hosts_given {
                u.push_str(&format!("{sep}known_hosts={}", self.known_hosts.display()));
                sep = '&';
            }
            if !uri.contains("known_hosts_verify") {
                u.push_str(&format!("{sep}known_hosts_verify=normal"));
            }
            u
        }
    }

    /// A connection error from virsh about the host key, made clear; None for other errors.
    pub fn host_key_failure(&self, stderr: &str) -> Option<anyhow::Error> {
        if stderr.contains("REMOTE HOST IDENTIFICATION HAS CHANGED") {
            return Some(anyhow::anyhow!(
                "the SSH host key of the libvirt host {} has CHANGED since it was recorded in {}: this may be an \
                 attack, or the host was reinstalled; provisioner refuses to connect\nhint: ask the host's admin \
                 for its key fingerprint; if the change is expected, remove the old key with `ssh-keygen -R {} -f \
                 {}` and add the new one: {}",
                self.known_hosts_name(),
                self.known_hosts.display(),
                self.known_hosts_name(),
                self.known_hosts.display(),
                self.keyscan_command()
            ));
        }
        if stderr.contains("Host key verification failed") || stderr.contains("No matching host key") {
            return Some(self.unknown_host_error());
        }
        if stderr.contains("no matching cipher found") {
            return Some(anyhow::anyhow!(
                "the libvirt host {} offers none of the SSH ciphers provisioner asks for ({}): {}\nhint: allow one \
                 of them in the host's /etc/ssh/sshd_config (`Ciphers`; OpenSSH's default list has them all), then \
                 `systemctl reload ssh` there",
                self.destination(),
                cipher_list(has_aes_instructions()),
                stderr.trim().lines().find(|l| l.contains("no matching cipher")).unwrap_or_default().trim()
            ));
        }
        if stderr.contains("Permission denied") {
            return Some(anyhow::anyhow!(
                "the libvirt host {} refused the SSH login: {}\nhint: give the key with `?keyfile=PATH` in the URI \
                 or load it into ssh-agent, and check that `ssh {} virsh -c qemu:///system version` works",
                self.destination(),
                stderr.trim(),
                self.destination()
            ));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ssh_uris() {
        let r = parse("qemu+ssh://root@10.201.0.2:2200/system?keyfile=/k&no_tty=1").unwrap();
        assert_eq!(r.host, "10.201.0.2");
        assert_eq!(r.port, Some(2200));
        assert_eq!(r.user.as_deref(), Some("root"));
        assert_eq!(r.keyfile.as_deref(), Some("/k"));
        assert_eq!(r.known_hosts_name(), "[10.201.0.2]:2200");
        assert!(parse("qemu:///system").is_none());
        assert!(parse("qemu+tls://h/system").is_none());
        let l = parse("qemu+libssh://h/system?known_hosts=/kh").unwrap();
        assert_eq!(l.known_hosts, PathBuf::from("/kh"));
        assert_eq!(l.known_hosts_name(), "h");
    }

    #[test]
    fn connect_uri_adds_our_checks() {
        let r = parse("qemu+ssh://root@h/system?keyfile=/k").unwrap();
        let u = r.connect_uri("qemu+ssh://root@h/system?keyfile=/k", Path::new("/c/ssh-1"));
        assert_eq!(u, "qemu+ssh://root@h/system?keyfile=/k&command=/c/ssh-1&no_tty=1");
        let l = parse("qemu+libssh://h/system").unwrap();
        let u = l.connect_uri("qemu+libssh://h/system", Path::new("/x"));
        assert!(u.starts_with("qemu+libssh://h/system?known_hosts="), "{u}");
        assert!(u.ends_with("&known_hosts_verify=normal"), "{u}");
        let w = r.wrapper_script();
        assert!(w.contains("StrictHostKeyChecking=yes") && w.contains("BatchMode=yes"), "{w}");
    }

    #[test]
    fn the_fastest_cipher_is_offered_first_and_the_defaults_after_it() {
        assert_eq!(
            cipher_list(true),
            "aes128-gcm@openssh.com,chacha20-poly1305@openssh.com,aes256-gcm@openssh.com,aes128-ctr,aes192-ctr,\
             aes256-ctr"
        );
        assert!(cipher_list(false).starts_with("chacha20-poly1305@openssh.com,aes128-gcm@openssh.com,"));
        // Every ssh to the host offers it: the wrapper libvirt runs, the guest's ProxyCommand and an exec (the
        // first of them makes the master, whose cipher the others then ride).
        let r = parse("qemu+ssh://root@h:2200/system?keyfile=/k").unwrap();
        let ciphers = format!("Ciphers={}", cipher_list(has_aes_instructions()));
        assert!(r.wrapper_script().contains(&format!(" -o {ciphers} ")), "{}", r.wrapper_script());
        assert!(r.proxy_command().contains(&format!(" -o {ciphers} ")), "{}", r.proxy_command());
        let exec = r.exec(&["virsh", "list"]).display();
        assert!(exec.contains(&format!(" -o {ciphers} ")), "{exec}");
    }

    #[test]
    fn a_host_without_a_shared_cipher_is_named_with_the_sshd_setting() {
        let r = parse("qemu+ssh://root@h/system").unwrap();
        let err =
            "error: failed to connect to the hypervisor\nerror: Cannot recv data: Unable to negotiate with \
                   10.0.0.2 port 22: no matching cipher found. Their offer: aes128-cbc";
        let e = r.host_key_failure(err).expect("made clear").to_string();
        assert!(
            e.starts_with("the libvirt host root@h offers none of the SSH ciphers provisioner asks for ("),
            "{e}"
        );
        assert!(e.contains("): error: Cannot recv data: Unable to negotiate with 10.0.0.2 port 22: no matching cipher found. Their offer: aes128-cbc\nhint: allow one of them"), "{e}");
    }

    #[test]
    fn a_command_on_the_host_is_one_quoted_sh_script_after_the_host_options() {
        let r = parse("qemu+ssh://root@h:2200/system?keyfile=/k&known_hosts=/kh").unwrap();
        let exec =
            r.exec(&["virsh", "-q", "-c", "qemu:///system", "dumpxml -- it's; domstate -- x"]).display();
        assert!(
            exec.starts_with(
                "ssh -o UserKnownHostsFile=/kh -o StrictHostKeyChecking=yes -o BatchMode=yes -o ConnectTimeout=10 "
            ),
            "{exec}"
        );
        assert!(exec.contains(" -i /k -o IdentitiesOnly=yes -p 2200 -l root -T -- h sh -c "), "{exec}");
        // The far login shell unquotes one level, `sh -c` gets the script, which unquotes the arguments.
        let script = exec.rsplit_once(" sh -c ").unwrap().1;
        let once = unquote(&unquote(script));
        assert_eq!(once, "LC_ALL=C exec virsh -q -c qemu:///system 'dumpxml -- it'\\''s; domstate -- x'");
        assert_eq!(local_uri("qemu+ssh://root@h:2200/system?keyfile=/k").as_deref(), Some("qemu:///system"));
        assert_eq!(local_uri("qemu+ssh://lab@[::1]/session").as_deref(), Some("qemu:///session"));
        assert_eq!(local_uri("qemu:///system"), None);
    }

    /// One level of POSIX shell single-quote unquoting (`'a'\''b'` is `a'b`), for the checks above.
    fn unquote(s: &str) -> String {
        let (mut out, mut quoted, mut chars) = (String::new(), false, s.chars().peekable());
        while let Some(c) = chars.next() {
            match c {
                '\'' => quoted = !quoted,
                '\\' if !quoted => out.extend(chars.next()),
                c => out.push(c),
            }
        }
        out
    }
}
