//! SSH transport over ssh2: connect with a deadline and backoff, the host key checked against the pinned key,
//! exec with merged streamed output and the real exit status, tar upload over one exec channel.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;

/// How to reach and authenticate to a machine.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub user: String,
    /// Private key file (OpenSSH format).
    pub key: PathBuf,
    /// The pinned host public key, `ssh-ed25519 AAAA...`.
    pub host_key: String,
}

/// An authenticated session.
pub struct Session {
    _private: (),
}

/// Result of a remote command.
#[derive(Debug, Clone)]
pub struct ExecOutput {
    pub status: i32,
    /// stdout and stderr merged, in order.
    pub output: String,
}

impl Session {
    /// Connect, verify the host key, authenticate; retry with backoff until `timeout`.
    pub fn connect(_ep: &Endpoint, _timeout: Duration) -> Result<Session> {
        todo!("ssh connect")
    }
    /// Run a command; `on_line` sees each output line as it arrives. Returns the exit status (not an error).
    pub fn exec_stream(&self, _cmd: &str, _timeout: Duration, _on_line: &mut dyn FnMut(&str)) -> Result<ExecOutput> {
        todo!("ssh exec")
    }
    /// Run a command and collect output.
    pub fn exec(&self, cmd: &str, timeout: Duration) -> Result<ExecOutput> {
        self.exec_stream(cmd, timeout, &mut |_| {})
    }
    /// Run a command; error (with its output) unless it exits 0.
    pub fn exec_ok(&self, cmd: &str, timeout: Duration) -> Result<String> {
        let out = self.exec(cmd, timeout)?;
        if out.status != 0 {
            anyhow::bail!("`{cmd}` failed in the guest (exit {}):\n{}", out.status, crate::process::tail(&out.output, 30));
        }
        Ok(out.output)
    }
    /// Send `stdin` to a command (e.g. `tar -xf - -C DIR`), buffered; returns its result.
    pub fn exec_with_stdin(&self, _cmd: &str, _stdin: &mut dyn std::io::Read, _timeout: Duration) -> Result<ExecOutput> {
        todo!("ssh exec_with_stdin")
    }
    /// Upload a local directory tree as one tar stream to `remote_dir` (created).
    pub fn upload_dir(&self, _local: &Path, _remote_dir: &str, _timeout: Duration) -> Result<()> {
        todo!("ssh upload_dir")
    }
}
