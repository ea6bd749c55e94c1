//! The libvirt daemon of a host, reached with virsh: the one runner of virsh calls, and what it means when the
//! daemon does not answer. On a `qemu+ssh://` host a call runs the host's own virsh through the shared SSH
//! connection ([`RemoteHost::run`]: one channel, virsh talks to its daemon there over the local socket; asked for
//! in-process on the master's control socket once the master runs, no `ssh` process); a call
//! that names a file of this machine (`define FILE`, `vol-upload`, `vol-download`), a host without virsh, and
//! `qemu+libssh://` use libvirt's remote driver (virsh here, the tool's own ssh wrapper, its key checked).
//! The storage pool a
//! remote host keeps machines' volumes in is driven through it ([`super::pool`]). The libvirt provider drives the
//! hypervisor through this; what a domain is stays the provider's.

use std::time::Duration;

use anyhow::{bail, Result};

use super::{Host, RemoteHost};
use crate::process::{Cmd, Output};

const VIRSH_TIMEOUT: Duration = Duration::from_secs(60);
/// `0`/`no`/`false`/`off`: every virsh call to a remote host goes through libvirt's remote driver, none is run on
/// the host itself.
const EXEC_ENV: &str = "PROVISIONER_REMOTE_EXEC";

/// The libvirt daemon at a URI.
pub struct Libvirtd {
    /// The URI as the user wrote it (shown in messages).
    pub uri: String,
    /// The URI virsh connects with: for a remote host, with the tool's own host key checks added.
    pub conn: String,
    /// Storage pool for a remote host's volumes.
    pub pool: String,
    /// The host the URI names: this machine, or a remote one reached over SSH.
    pub host: Host,
    /// The host answered an exec of virsh with "not found" (127): the remote driver from then on.
    no_far_virsh: std::sync::atomic::AtomicBool,
}

impl Libvirtd {
    /// The daemon at `uri` (connected to as `conn`) on `host`; a remote host's volumes go into `pool`.
    pub fn new(uri: &str, conn: String, pool: &str, host: Host) -> Self {
        Self { uri: uri.to_string(), conn, pool: pool.to_string(), host, no_far_virsh: Default::default() }
    }

    /// virsh here, connected with [`Self::conn`] (for a remote host: libvirt's remote driver). Only for calls that
    /// name files of this machine, or stream; every other call is [`Self::output`].
    pub fn virsh(&self) -> Cmd {
        Cmd::new("virsh").args(["-q", "-c", &self.conn]).timeout(VIRSH_TIMEOUT)
    }

    /// The remote host whose own virsh runs the calls ([`Self::output`]), with its local URI: a `qemu+ssh://`
    /// host, unless [`EXEC_ENV`] turns it off or it has no virsh.
    pub(super) fn far_virsh(&self) -> Option<(&RemoteHost, String)> {
        let r = self.host.remote().filter(|r| r.transport == "ssh")?;
        if self.no_far_virsh.load(std::sync::atomic::Ordering::Relaxed)
            || !super::remote::reuse_enabled(std::env::var(EXEC_ENV).ok().as_deref())
        {
            return None;
        }
        Some((r, super::remote::local_uri(&self.uri)?))
    }

    /// `virsh ARGS` on the daemon, output captured (a failure is not an error here). On a `qemu+ssh://` host it
    /// runs there, through the shared SSH connection: ssh's own failure (255) reads as virsh's "failed to connect
    /// to the hypervisor" (so every caller tells an unreachable host as before), and a host without virsh (127)
    /// is asked through libvirt's remote driver, for this call and every later one. Elsewhere virsh runs here.
    pub fn output(&self, args: &[&str]) -> Result<Output> {
        if let Some((r, local)) = self.far_virsh() {
            if let Some(out) = self.on_host(r, &local, args, None, VIRSH_TIMEOUT)? {
                return Ok(out);
            }
        }
        self.virsh().args(args).output()
    }

    /// `virsh -c LOCAL ARGS` run on the host `r` (stdin: `stdin`, or nothing), ssh's own failure made virsh's
    /// "failed to connect"; None when the host has no virsh (127: remembered, the caller asks the remote driver).
    pub(super) fn on_host(
        &self,
        r: &RemoteHost,
        local: &str,
        args: &[&str],
        stdin: Option<&std::path::Path>,
        timeout: Duration,
    ) -> Result<Option<Output>> {
        let mut argv = vec!["virsh", "-q", "-c", local];
        argv.extend_from_slice(args);
        let mut out = r.run(&argv, stdin, timeout)?;
        match out.code() {
            Some(127) => {
                self.no_far_virsh.store(true, std::sync::atomic::Ordering::Relaxed);
                return Ok(None);
            }
            Some(255) => {
                out.stderr =
                    format!("error: failed to connect to the hypervisor\nerror: {}", out.stderr.trim());
            }
            _ => {}
        }
        Ok(Some(out))
    }

    /// Run a virsh subcommand; a connection failure becomes the "daemon not reachable" error with its hint.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        self.checked(self.output(args)?, args)
    }

    /// [`Self::run`] for a call that names a file of this machine (`define FILE`, `vol-download ... --file F`):
    /// always virsh here.
    pub fn run_here(&self, args: &[&str]) -> Result<String> {
        self.checked(self.virsh().args(args).output()?, args)
    }

    fn checked(&self, out: Output, args: &[&str]) -> Result<String> {
        if !out.success() {
            let err = out.stderr.trim();
            if let Some(e) = self.host.host_key_failure(err) {
                return Err(e);
            }
            if is_connect_error(err) {
                return Err(self.unreachable(err));
            }
            bail!("`virsh -c {} {}` failed: {err}", self.uri, args.join(" "));
        }
        Ok(out.stdout)
    }

    /// A failed virsh call: the "not reachable" error (with the host key advice) when it is one, else `what` failed.
    pub fn unreachable_or(&self, err: &str, what: &str) -> anyhow::Error {
        if self.host.host_key_failure(err).is_some() || is_connect_error(err) {
            return self.unreachable(err);
        }
        anyhow::anyhow!("{what} failed: {err}")
    }

    pub fn unreachable(&self, err: &str) -> anyhow::Error {
        if err.contains("no connection driver available") {
            // The daemon (or the host) answered: it has no driver for this URI's hypervisor.
            return anyhow::anyhow!(
                "the libvirt daemon for {} on {} answered but has no QEMU driver: {err}\nhint: install it on that \
                 host (Debian: `apt install libvirt-daemon-driver-qemu qemu-system-x86`, or libvirt-daemon-system) \
                 and restart the daemon (`systemctl restart libvirtd`, or virtqemud); `virsh -c qemu:///system \
                 version` there must name QEMU",
                self.uri,
                self.host.remote().map_or_else(|| "this machine".to_string(), |r| r.destination())
            );
        }
        if let Some(e) = self.host.unreachable(&self.uri, err) {
            return e;
        }
        if err.contains("virtlogd-sock") {
            return anyhow::anyhow!(
                "virtlogd, libvirt's log daemon, is not running, so QEMU cannot start: {err}\nhint: start it \
                 (`virtlogd -d`; under systemd `systemctl start virtlogd.socket`); as root, `provisioner up` \
                 starts it itself"
            );
        }
        anyhow::anyhow!(
            "the libvirt daemon for {} is not reachable: {err}\nhint: start it (`virtqemud -d` or `libvirtd -d`, \
             with `virtlogd -d`; under systemd `systemctl start libvirtd`), check that your user may use that URI, \
             or set [libvirt] uri in box-config.toml",
            self.uri
        )
    }

    /// Local URIs (no host part) are served by a daemon on this machine, which we may start.
    pub fn is_local(&self) -> bool {
        self.uri.split_once("://").is_some_and(|(_, rest)| rest.starts_with('/'))
    }
}

/// virsh / libvirt wording for "cannot talk to the daemon".
pub fn is_connect_error(stderr: &str) -> bool {
    ["failed to connect", "Failed to connect socket", "Cannot recv data", "no connection driver available"]
        .iter()
        .any(|m| stderr.contains(m))
}

/// The hidden subcommand that runs a local libvirt daemon under a reaper.
const REAP_COMMAND: &str = "__reap";

/// Start this machine's libvirt daemon (`virtqemud` or `libvirtd`, with `-d`) where no service manager runs it
/// (root in a container or on a CI runner), under a reaper: a detached `provisioner __reap` that becomes the
/// parent of every QEMU the daemon disowns and reaps each the moment it exits. Otherwise the QEMUs go to PID 1,
/// and an init that reaps late (container inits poll; measured here: 1.6-2.0 s of every `virsh destroy` and
/// `snapshot-revert` was libvirtd waiting on a zombie) or never (a shell as PID 1) slows or hangs each stop.
/// Not waited for: the caller waits for the daemon to answer. Without our own executable, the daemon is
/// started as before, directly.
pub(crate) fn start_local(daemon: &std::path::Path) -> Result<()> {
    let mut cmd = match std::env::current_exe() {
        Ok(me) => {
            let mut c = std::process::Command::new(me);
            c.arg(REAP_COMMAND).arg("--").arg(daemon);
            c
        }
        Err(_) => std::process::Command::new(daemon),
    };
    // From `/`, so the reaper holds no directory of the command that started it.
    cmd.arg("-d").current_dir("/");
    crate::platform::spawn_detached(cmd)
        .map(drop)
        .map_err(|e| anyhow::anyhow!("start {}: {e}", daemon.display()))
}

/// `provisioner __reap -- PROGRAM ARGS...`: run it and reap all it disowns, until nothing of it is left.
pub(crate) fn reap(command: &[std::ffi::OsString]) -> Result<i32> {
    let (program, args) = command.split_first().ok_or_else(|| anyhow::anyhow!("__reap: no command given"))?;
    let mut cmd = std::process::Command::new(program);
    cmd.args(args);
    crate::platform::reap_descendants(cmd)
        .map_err(|e| anyhow::anyhow!("__reap {}: {e}", std::path::Path::new(program).display()))?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_daemon_without_the_qemu_driver_is_not_called_unreachable() {
        let uri = "qemu+ssh://root@hv1/system";
        let d = Libvirtd::new(uri, uri.to_string(), "p", Host::from_uri(uri));
        let e = d
            .unreachable("error: failed to connect to the hypervisor\nerror: no connection driver available for qemu:///system")
            .to_string();
        assert!(e.starts_with("the libvirt daemon for qemu+ssh://root@hv1/system on root@hv1 answered but has no QEMU driver"), "{e}");
        assert!(e.contains("\nhint: install it") && !e.contains("not reachable"), "{e}");
    }
}
