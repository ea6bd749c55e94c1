//! SSH transport over ssh2: connect with a deadline and backoff, the host key checked against the pinned key,
//! exec with merged streamed output and the real exit status, tar upload over one exec channel.
//!
//! Every blocking libssh2 call runs under `set_timeout` with a short slice ([`SLICE`]); when a slice passes
//! without data the overall deadline is checked and a keepalive is sent, so a long silent command neither hangs
//! forever nor lets the connection idle out.

pub mod control;
mod socket_get;

pub use socket_get::HttpResponse;

use std::io::{BufWriter, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};

use crate::config::Config;
use crate::keys;
use crate::machine::state::MachineState;
use crate::machine::StateDir;

/// Longest single blocking libssh2 call; also the keepalive period while waiting for a quiet command.
const SLICE: Duration = Duration::from_secs(10);
/// libssh2's code for a blocking call that ran past `set_timeout`.
const LIBSSH2_ERROR_TIMEOUT: i32 = -9;
/// Writes into an exec channel are buffered to this size.
const WRITE_BUF: usize = 64 * 1024;

/// How to reach and authenticate to a machine.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub user: String,
    /// Private key file (OpenSSH format).
    pub key: PathBuf,
    /// The pinned host public key, `ssh-ed25519 AAAA...`.
    pub host_key: String,
    /// A machine on a remote libvirt host: `addr` is on that host's loopback, reached through it (these ports
    /// mirrored locally by [`crate::host::tunnel`] for ssh2 and HTTP; ProxyCommand for the system `ssh`).
    pub via: Option<Via>,
}

/// The libvirt host a remote machine's forwards listen on, and the host ports to mirror (SSH first).
#[derive(Debug, Clone)]
pub struct Via {
    pub host: crate::host::RemoteHost,
    pub ports: Vec<u16>,
}

impl Endpoint {
    /// How the guest is reached: its address and the route there (direct, or through its remote host).
    pub fn guest_addr(&self) -> crate::host::GuestAddr {
        use crate::host::{GuestAddr, Host};
        match &self.via {
            Some(v) => {
                GuestAddr { addr: self.addr, host: Host::Remote(v.host.clone()), ports: v.ports.clone() }
            }
            None => GuestAddr { addr: self.addr, host: Host::Local, ports: vec![self.addr.port()] },
        }
    }

    /// For a machine on a remote host: mirror its forwards on the local 127.0.0.1 for this process (so the
    /// recorded 127.0.0.1:PORT addresses work here). Nothing for a local machine.
    pub fn open_tunnel(&self) -> Result<()> {
        self.guest_addr().open_route()
    }
}

impl Endpoint {
    /// The endpoint of a created machine: address from `state.json`, user from the config, keys from the state dir.
    pub fn for_machine(cfg: &Config, state: &StateDir) -> Result<Endpoint> {
        let mut ep = Self::from_state(cfg, state, MachineState::load(state)?.as_ref(), "")?;
        let host_pub = state.host_key().with_extension("pub");
        let host_key = std::fs::read_to_string(&host_pub).with_context(|| {
            format!(
                "read the pinned host key {}\nhint: the machine state is incomplete; `provisioner destroy -f && provisioner up` recreates it",
                host_pub.display()
            )
        })?;
        ep.host_key = host_key.trim().to_string();
        Ok(ep)
    }

    /// The one place an endpoint is made: address from the recorded state (`up` passes the state it read once
    /// per run), user from the config, key paths from the state dir, the pinned host public key as given.
    pub fn from_state(
        cfg: &Config,
        state: &StateDir,
        ms: Option<&MachineState>,
        host_key: &str,
    ) -> Result<Endpoint> {
        let ms = ms.ok_or_else(|| not_created(cfg, state))?;
        let port = ms.ssh_port.ok_or_else(|| not_created(cfg, state))?;
        let host = ms.ssh_host.clone().unwrap_or_else(|| cfg.ssh.host_ip.clone());
        let ip: std::net::IpAddr = host
            .parse()
            .with_context(|| format!("state.json has SSH host \"{}\", not an IP address; `provisioner destroy -f && provisioner up` resets it", crate::text::shown(&host)))?;
        let root =
            std::path::absolute(&state.root).with_context(|| format!("resolve {}", state.root.display()))?;
        // The provider says how the guest is reached.
        let guest = crate::provider::ssh_info(cfg, ms, SocketAddr::new(ip, port));
        let via = guest.host.remote().cloned().map(|host| Via { host, ports: guest.ports });
        Ok(Endpoint {
            addr: SocketAddr::new(ip, port),
            user: ms.ssh_user.clone().unwrap_or_else(|| cfg.ssh.user.clone()),
            key: StateDir::at(root).user_key(),
            host_key: host_key.trim().to_string(),
            via,
        })
    }
}

fn not_created(cfg: &Config, state: &StateDir) -> anyhow::Error {
    anyhow!(
        "machine `{}` not created; run `provisioner up`\n(no SSH endpoint recorded in {})",
        cfg.machine.name,
        state.state_file().display()
    )
}

/// An authenticated session.
pub struct Session {
    sess: ssh2::Session,
    addr: SocketAddr,
    /// Results of [`Session::prefetch`], each served once while no other command has run since.
    /// Each prefetched command's result and how many more times it may be served.
    prefetched: std::sync::Mutex<std::collections::HashMap<String, (Prefetched, usize)>>,
    /// GETs to guest sockets sent ahead, and the sockets this connection may not reach ([`Session::socket_get`]).
    gets: std::sync::Mutex<socket_get::Gets>,
}

/// Commands this process ran in guests (each an exec channel; a prefetch is one) and those answered from a
/// prefetch: `up --json` reports both (`run_counts`), which shows a warm `up` costs one round trip.
static EXECS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static SERVED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
/// GETs sent to guest sockets through the connection ([`Session::socket_get`]; no process in the guest).
static GETS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// (execs run, results served from a prefetch, GETs on guest sockets) by this process so far.
pub fn exec_counts() -> (usize, usize, usize) {
    use std::sync::atomic::Ordering::Relaxed;
    (EXECS.load(Relaxed), SERVED.load(Relaxed), GETS.load(Relaxed))
}

/// A result of [`Session::prefetch`], and how long the command took in the guest (with `-v`).
#[derive(Clone)]
struct Prefetched {
    out: ExecOutput,
    guest_ms: Option<u64>,
}

/// Result of a remote command.
#[derive(Debug, Clone)]
pub struct ExecOutput {
    pub status: i32,
    /// stdout and stderr merged, in order.
    pub output: String,
}

/// Why one connection attempt failed: worth retrying (the guest may still be booting), the key was refused
/// (retried [`AUTH_RETRIES`] times), or hopeless.
enum Attempt {
    Retry(anyhow::Error),
    Auth(anyhow::Error),
    Fatal(anyhow::Error),
}

/// Authentication attempts before giving up: the host key matched, so cloud-init has run and a refused key will
/// stay refused; a couple of retries only cover a guest still settling.
const AUTH_RETRIES: u32 = 3;

impl Session {
    /// Connect, verify the host key, authenticate; retry with backoff until `timeout`.
    ///
    /// Refused / reset connections, banner and handshake failures are retried until the deadline (the guest is
    /// booting); a host key that differs from the pinned one is refused at once, before authenticating.
    pub fn connect(ep: &Endpoint, timeout: Duration) -> Result<Session> {
        let pinned = keys::public_blob(&ep.host_key)
            .context("the pinned host key in the machine state is unreadable")?;
        ep.open_tunnel()?;
        let sess = retry(ep.addr, timeout, |deadline| attempt(ep, &pinned, deadline))?;
        Ok(Session::new(sess, ep.addr))
    }

    fn new(sess: ssh2::Session, addr: SocketAddr) -> Session {
        Session { sess, addr, prefetched: Default::default(), gets: Default::default() }
    }

    /// Run `cmds` at once, concurrently in the guest, in one exec (one round trip instead of one each); each
    /// result is then served by the first [`Session::exec`] of exactly that command (by as many as the times it is
    /// listed: it runs once), as long as no other command ran on this session since (any other exec may change
    /// what they read, so it drops them all). The commands must not depend on each other's effects. Best effort:
    /// a failed prefetch leaves each to run on its own. Returns how many answers are held.
    pub fn prefetch(&self, cmds: &[String], timeout: Duration) -> usize {
        // A command listed twice (two steps that read the same thing) runs once and is served twice.
        let mut wanted: Vec<(&String, usize)> = Vec::new();
        for c in cmds {
            match wanted.iter_mut().find(|(w, _)| *w == c) {
                Some((_, n)) => *n += 1,
                None => wanted.push((c, 1)),
            }
        }
        // The commands only read: GETs sent ahead stay.
        self.prefetched.lock().unwrap_or_else(|e| e.into_inner()).clear();
        if wanted.is_empty() {
            return 0;
        }
        let started = Instant::now();
        let timed = crate::process::verbosity() >= 1;
        if let [(cmd, times)] = wanted[..] {
            // One command: run as it is, without the batch's sudo, shell and files around it (a restored lab's
            // registry probe, or the clock after `snapshot restore`: 0.1-0.2 s less of a cold guest's time).
            let out = Exec::start(self, cmd, timeout, &mut |_| {}).and_then(|mut ex| ex.finish());
            trace_exec(cmd, started);
            let Ok(out) = out else { return 0 };
            let held = Prefetched { out, guest_ms: None };
            self.prefetched.lock().unwrap_or_else(|e| e.into_inner()).insert(cmd.clone(), (held, times));
            return times;
        }
        let distinct: Vec<&String> = wanted.iter().map(|(c, _)| *c).collect();
        let token = batch_token();
        let script = prefetch_script(&distinct, timed, &token);
        let out = Exec::start(self, &script, timeout, &mut |_| {}).and_then(|mut ex| ex.finish());
        if timed {
            eprintln!(
                "+ ssh {} ms: {} commands at once (each served below as `prefetched`)",
                started.elapsed().as_millis(),
                distinct.len()
            );
        }
        let results = match out {
            Ok(out) if out.status == 0 => parse_prefetch(&out.output, distinct.len(), &token),
            _ => None,
        };
        let Some(results) = results else { return 0 };
        let mut held = self.prefetched.lock().unwrap_or_else(|e| e.into_inner());
        for ((cmd, times), result) in wanted.into_iter().zip(results) {
            held.insert(cmd.clone(), (result, times));
        }
        held.values().map(|(_, times)| times).sum()
    }

    /// The prefetched result of `cmd` (served as many times as it was listed), or None; any other command drops
    /// every prefetched result.
    fn take_prefetched(&self, cmd: &str) -> Option<Prefetched> {
        let mut held = self.prefetched.lock().unwrap_or_else(|e| e.into_inner());
        let Some((result, times)) = held.get_mut(cmd) else {
            held.clear();
            drop(held);
            self.gets.lock().unwrap_or_else(|e| e.into_inner()).clear();
            return None;
        };
        *times -= 1;
        if *times == 0 {
            held.remove(cmd).map(|(r, _)| r)
        } else {
            Some(result.clone())
        }
    }

    /// Forget every answer held or sent ahead: a command that was not prefetched may change what they read.
    fn drop_prefetched(&self) {
        self.prefetched.lock().unwrap_or_else(|e| e.into_inner()).clear();
        self.gets.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Run a command; `on_line` sees each output line as it arrives. Returns the exit status (not an error).
    pub fn exec_stream(
        &self,
        cmd: &str,
        timeout: Duration,
        on_line: &mut dyn FnMut(&str),
    ) -> Result<ExecOutput> {
        let started = Instant::now();
        if let Some(Prefetched { out, guest_ms }) = self.take_prefetched(cmd) {
            SERVED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            for line in out.output.lines() {
                on_line(line.trim_end_matches('\r'));
            }
            if crate::process::verbosity() >= 1 {
                let took = guest_ms.map(|ms| format!(" ({ms} ms in the guest)")).unwrap_or_default();
                eprintln!("+ ssh prefetched{took}: {}", shown_command(cmd));
            }
            return Ok(out);
        }
        let mut ex = Exec::start(self, cmd, timeout, on_line)?;
        let out = ex.finish();
        trace_exec(cmd, started);
        out
    }
    /// Start `cmd` now and collect its result later ([`Running::finish`]): the guest runs it while this session
    /// does other work (a restored lab's clock is set while its checks and health round run). Like any command
    /// that was not prefetched, it drops the answers held or sent ahead.
    pub fn start(&self, cmd: &str, timeout: Duration) -> Result<Running<'_>> {
        self.drop_prefetched();
        // No caller reads its lines; a closure without captures is zero-sized, so leaking its box costs nothing.
        let quiet: &'static mut dyn FnMut(&str) = Box::leak(Box::new(|_: &str| {}));
        Ok(Running { ex: Exec::start(self, cmd, timeout, quiet)?, started: Instant::now() })
    }

    /// Run a command and collect output.
    pub fn exec(&self, cmd: &str, timeout: Duration) -> Result<ExecOutput> {
        self.exec_stream(cmd, timeout, &mut |_| {})
    }
    /// Run a command; error (with its output) unless it exits 0.
    pub fn exec_ok(&self, cmd: &str, timeout: Duration) -> Result<String> {
        let out = self.exec(cmd, timeout)?;
        if out.status != 0 {
            anyhow::bail!(
                "`{cmd}` failed in the guest (exit {}):\n{}",
                out.status,
                crate::process::tail(&out.output, 30)
            );
        }
        Ok(out.output)
    }
    /// Send `stdin` to a command (e.g. `tar -xf - -C DIR`), buffered; returns its result.
    pub fn exec_with_stdin(&self, cmd: &str, stdin: &mut dyn Read, timeout: Duration) -> Result<ExecOutput> {
        self.exec_feeding(cmd, timeout, &mut |w| std::io::copy(stdin, w).map(|_| ()))
    }
    /// Run `cmd`, write its stdin through a 64 KiB buffer with `feed`, then send EOF and collect the result.
    fn exec_feeding(
        &self,
        cmd: &str,
        timeout: Duration,
        feed: &mut dyn FnMut(&mut dyn Write) -> std::io::Result<()>,
    ) -> Result<ExecOutput> {
        let started = Instant::now();
        self.drop_prefetched();
        let _trace = Defer(Some(move || trace_exec(cmd, started)));
        let mut quiet = |_: &str| {};
        let mut ex = Exec::start(self, cmd, timeout, &mut quiet)?;
        let sent = {
            let mut w = BufWriter::with_capacity(WRITE_BUF, &mut ex);
            feed(&mut w).and_then(|()| w.flush())
        };
        // Even if sending failed, collect what the remote said: it usually explains why (disk full, permissions).
        let out = ex.finish();
        match (sent, out) {
            (Ok(()), out) => out,
            (Err(e), Ok(out)) => Err(anyhow!(e).context(format!(
                "sending input to `{cmd}` on {} failed (exit {}):\n{}",
                self.addr,
                out.status,
                crate::process::tail(&out.output, 20)
            ))),
            (Err(e), Err(e2)) => {
                Err(e2.context(format!("sending input to `{cmd}` on {} failed: {e}", self.addr)))
            }
        }
    }
}

/// The one login of `[box] keys = "insecure-once"` ([`crate::lifecycle::insecure_once`]): who logged in with
/// which key, and the host key the guest presented (accepted for this session only, never pinned or recorded).
pub struct FirstLogin {
    pub session: Session,
    pub user: String,
    /// The name of the key that was accepted (as given to [`Session::connect_first_login`]).
    pub key: &'static str,
    /// `SHA256:...` of the host key the box presented.
    pub host_fingerprint: String,
}

impl Session {
    /// Log in once with one of `keys` (name, OpenSSH private key) as the first of `users` that accepts one,
    /// accepting whatever host key the guest presents, for this session only; retried like [`Session::connect`]
    /// until `timeout` while the guest boots. Only over loopback: anywhere else is refused before any packet.
    /// `None` when the guest already presents `pinned` (the keys were replaced before): no key is offered then.
    pub fn connect_first_login(
        addr: SocketAddr,
        users: &[String],
        keys: &[(&'static str, &str)],
        pinned: &str,
        timeout: Duration,
    ) -> Result<Option<FirstLogin>> {
        let pinned =
            keys::public_blob(pinned).context("the pinned host key in the machine state is unreadable")?;
        if !addr.ip().is_loopback() {
            anyhow::bail!(
                "refusing to log in with a published insecure key at {addr}: only a loopback address (127.0.0.1) \
                 is allowed, so nothing else can reach the guest before its key is replaced\nhint: set [ssh] host_ip \
                 = \"127.0.0.1\", or use keys = \"disk\" or a box that runs cloud-init"
            );
        }
        retry(addr, timeout, |deadline| first_login_attempt(addr, users, keys, &pinned, deadline))
    }
}

/// Run `attempt` until it succeeds, with backoff (0.2 s doubling to 2 s) until `timeout`: a retryable failure
/// (the guest is booting) is tried again, a fatal one ends at once, and an authentication refusal ends after
/// [`AUTH_RETRIES`] (the host key matched, so a refused key stays refused). Ctrl-C ends the wait.
fn retry<T>(
    addr: SocketAddr,
    timeout: Duration,
    mut attempt: impl FnMut(Instant) -> std::result::Result<T, Attempt>,
) -> Result<T> {
    let start = Instant::now();
    let deadline = start + timeout;
    let mut pause = Duration::from_millis(200);
    let mut attempts = 0u32;
    let mut refusals = 0u32;
    loop {
        attempts += 1;
        let last = match attempt(deadline) {
            Ok(done) => return Ok(done),
            Err(Attempt::Fatal(e)) => return Err(e),
            Err(Attempt::Auth(e)) => {
                refusals += 1;
                if refusals >= AUTH_RETRIES {
                    return Err(e);
                }
                e
            }
            Err(Attempt::Retry(e)) => e,
        };
        let now = Instant::now();
        if now >= deadline {
            return Err(last.context(format!(
                "no SSH connection to {addr} after {attempts} attempts in {:.0?}\n\
                 hint: the guest may still be booting or failed to boot: check `provisioner status` and the \
                 serial console log (.provisioner/serial.log); a slow (TCG) boot may need a longer \
                 `--boot-timeout` or [ssh] connect_timeout_secs",
                now - start
            )));
        }
        if crate::process::verbosity() >= 1 {
            // Where a slow `ssh` phase goes: each failed attempt, its cause and the pause before the next.
            eprintln!(
                "+ ssh attempt {attempts} to {addr} failed after {} ms ({}); again in {} ms",
                (now - start).as_millis(),
                format!("{last:#}").lines().next().unwrap_or_default(),
                pause.min(deadline - now).as_millis()
            );
        }
        crate::process::sleep_interruptible(pause.min(deadline - now));
        crate::process::check_interrupted()?;
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}

/// TCP and SSH handshake with `addr`, every blocking call bounded by `deadline`.
fn handshake(addr: SocketAddr, deadline: Instant) -> std::result::Result<ssh2::Session, Attempt> {
    let slice = deadline.saturating_duration_since(Instant::now()).clamp(Duration::from_millis(100), SLICE);
    let tcp = TcpStream::connect_timeout(&addr, slice)
        .map_err(|e| Attempt::Retry(anyhow!(e).context(format!("TCP connect to {addr}"))))?;
    let _ = tcp.set_nodelay(true);
    let mut sess =
        ssh2::Session::new().map_err(|e| Attempt::Fatal(anyhow!(e).context("initialise libssh2")))?;
    sess.set_tcp_stream(tcp);
    sess.set_timeout(millis(slice));
    sess.handshake().map_err(|e| Attempt::Retry(anyhow!(e).context(format!("SSH handshake with {addr}"))))?;
    Ok(sess)
}

/// One round of the first login: a connection per user (sshd allows no change of user within one), each key
/// offered in turn.
fn first_login_attempt(
    addr: SocketAddr,
    users: &[String],
    keys: &[(&'static str, &str)],
    pinned: &[u8],
    deadline: Instant,
) -> std::result::Result<Option<FirstLogin>, Attempt> {
    let mut refused = Vec::new();
    for user in users {
        let sess = handshake(addr, deadline)?;
        let (blob, _) =
            sess.host_key().ok_or_else(|| Attempt::Retry(anyhow!("{addr} presented no host key")))?;
        if blob == pinned {
            return Ok(None);
        }
        let host_fingerprint = keys::fingerprint_blob(blob).unwrap_or_else(|| "(undecodable key)".into());
        for (name, pem) in keys {
            match sess.userauth_pubkey_memory(user, None, pem, None) {
                Ok(()) if sess.authenticated() => {
                    sess.set_keepalive(false, SLICE.as_secs() as u32);
                    return Ok(Some(FirstLogin {
                        session: Session::new(sess, addr),
                        user: user.clone(),
                        key: name,
                        host_fingerprint,
                    }));
                }
                // The connection itself went away (socket error, timeout, disconnect: a guest still settling):
                // the round is retried.
                Err(e) if matches!(e.code(), ssh2::ErrorCode::Session(-7 | -9 | -13 | -43)) => {
                    return Err(Attempt::Retry(anyhow!(e).context(format!("log in as {user} at {addr}"))));
                }
                Err(e) => refused.push(format!("{user} with {name}: {}", e.message())),
                Ok(()) => refused.push(format!("{user} with {name}")),
            }
        }
    }
    Err(Attempt::Auth(anyhow!(
        "the box at {addr} did not accept Vagrant's insecure key ({} refused)\nhint: keys = \"insecure-once\" needs a \
         box that follows Vagrant's box contract (user `vagrant`, or [ssh] user, with Vagrant's insecure public key \
         in ~/.ssh/authorized_keys); for another box use keys = \"disk\" or a box that runs cloud-init",
        refused.join(", ")
    )))
}

/// One connection attempt: TCP, handshake, host key check, public key auth.
fn attempt(ep: &Endpoint, pinned: &[u8], deadline: Instant) -> std::result::Result<ssh2::Session, Attempt> {
    let slice = deadline.saturating_duration_since(Instant::now()).clamp(Duration::from_millis(100), SLICE);
    let tcp = TcpStream::connect_timeout(&ep.addr, slice)
        .map_err(|e| Attempt::Retry(anyhow!(e).context(format!("TCP connect to {}", ep.addr))))?;
    let _ = tcp.set_nodelay(true);
    let mut sess =
        ssh2::Session::new().map_err(|e| Attempt::Fatal(anyhow!(e).context("initialise libssh2")))?;
    sess.set_tcp_stream(tcp);
    sess.set_timeout(millis(slice));
    // Ask for the pinned key's algorithm, so a guest that also has other host keys presents the pinned one.
    sess.method_pref(ssh2::MethodType::HostKey, &hostkey_methods(&ep.host_key))
        .map_err(|e| Attempt::Fatal(anyhow!(e).context("set host key algorithm")))?;
    sess.handshake().map_err(|e| {
        Attempt::Retry(anyhow!(e).context(format!(
            "SSH handshake with {} (asking for the pinned {} host key)",
            ep.addr,
            hostkey_methods(&ep.host_key)
        )))
    })?;

    let (blob, _) =
        sess.host_key().ok_or_else(|| Attempt::Retry(anyhow!("{} presented no host key", ep.addr)))?;
    if blob != pinned {
        let pinned_fp = keys::fingerprint_openssh(&ep.host_key).unwrap_or_else(|_| "?".into());
        let got_fp = keys::fingerprint_blob(blob).unwrap_or_else(|| "(undecodable key)".into());
        return Err(Attempt::Fatal(anyhow!(
            "HOST KEY MISMATCH at {}: the machine presented {got_fp}, but {pinned_fp} is pinned; refusing to log in\n\
             hint: if the VM was recreated outside provisioner (or the port now belongs to another machine), reset it \
             with `provisioner destroy -f && provisioner up`, or remove the stale .provisioner/ state directory; \
             if you did not expect this, someone may be intercepting the connection",
            ep.addr
        )));
    }

    // Hand libssh2 the key file's contents rather than the path, so an unreadable file gets a clear message.
    let pem = std::fs::read_to_string(&ep.key).map_err(|e| {
        Attempt::Fatal(anyhow!(e).context(format!(
            "read SSH key {}\nhint: the machine state is incomplete; `provisioner destroy -f && provisioner up` recreates it",
            ep.key.display()
        )))
    })?;
    if let Err(e) = sess.userauth_pubkey_memory(&ep.user, None, &pem, None) {
        return Err(Attempt::Auth(anyhow!(
            "SSH authentication failed for user {:?} at {} with key {}: {e}\n\
             hint: the guest did not accept the machine key: check [ssh] user in box-config.toml matches the box \
             user, and that cloud-init ran (serial.log); an old box may only accept RSA SHA-1 keys (see docs/ssh.md)",
            ep.user,
            ep.addr,
            ep.key.display()
        )));
    }
    if !sess.authenticated() {
        return Err(Attempt::Auth(anyhow!(
            "SSH authentication failed for user {:?} at {}",
            ep.user,
            ep.addr
        )));
    }
    sess.set_keepalive(false, SLICE.as_secs() as u32);
    Ok(sess)
}

/// libssh2 host key method names for a public key line (RSA keys are signed with SHA-2 where possible).
fn hostkey_methods(public: &str) -> String {
    match public.split_whitespace().next().unwrap_or_default() {
        "ssh-rsa" => "rsa-sha2-512,rsa-sha2-256,ssh-rsa".to_string(),
        other => other.to_string(),
    }
}

fn millis(d: Duration) -> u32 {
    d.as_millis().clamp(1, u32::MAX as u128) as u32
}

pub use crate::host::shell_quote;

/// A running remote command: its channel (stderr merged into stdout), output split into lines, and a deadline.
/// With `-v`: how long one guest command took, on stderr (where a warm `up` spends its time, exec by exec).
fn trace_exec(cmd: &str, started: Instant) {
    if crate::process::verbosity() >= 1 {
        eprintln!("+ ssh {} ms: {}", started.elapsed().as_millis(), shown_command(cmd));
    }
}

/// A command as `-v` shows it: its first line that is not a comment, cut at 100 characters.
fn shown_command(cmd: &str) -> String {
    let first = cmd.lines().find(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#')).unwrap_or("");
    let shown: String = first.chars().take(100).collect();
    let more = if shown.len() < cmd.trim_end().len() { " ..." } else { "" };
    format!("{shown}{more}")
}

/// 128 random bits as hex: a [`prefetch_script`]'s token, new for every batch.
fn batch_token() -> String {
    use rand_core::RngCore as _;
    let mut b = [0u8; 16];
    rand_core::OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

/// The one guest script of [`Session::prefetch`]: each command in a subshell of its own, all started at once,
/// its stdout and stderr to a file of its own followed by a trailer line `@pf-TOKEN I STATUS MS` (`MS` is its time
/// with `-v`, else `-`); then every file by one `cat`, after a line `@pf-TOKEN begin`. `token` is random per batch
/// (see [`Session::prefetch`]), so no output can forge a trailer.
///
/// Under TCG a process start costs 20-50 ms of guest CPU (more right after a restore, when every program runs
/// cold), and each `sudo` ~0.2 s; so the script starts as few as it can:
/// - the batch runs as root through one `sudo -n`, and a shell function `sudo` then only drops `-n` and runs the
///   command (root already); HOME stays the SSH user's (tilde expansion, no `getent`), so what a command keeps in
///   its cache is the user's. Without passwordless sudo it runs as the user and each command's own `sudo` decides;
/// - each command is `eval`ed in a subshell (a fork, no new shell to exec), so it sees that function; a `sudo`
///   inside a shell the command starts itself is the real one, which root may run;
/// - the files are made by the shell's own redirection, `$HOME/.provisioner-pf-TOKEN.I` (the SSH user's home,
///   where no one but that user and root may write; `set -C` besides: a file or link already there fails that
///   command, and the batch is then asked one by one), and read back by one `cat`; an `rm` left running in the
///   background removes them after the answer. This replaced a `mktemp -d`, a `tar | base64` and an `rm -rf`: four
///   processes fewer on the answer's path, 0.2 s of a restored TCG guest's time (stop 29).
///
/// The commands are POSIX sh (they run in the guest's `/bin/sh`, where an exec runs them in the login shell).
fn prefetch_script(cmds: &[&String], timed: bool, token: &str) -> String {
    let mut batch = format!(
        "__pf_um=$(umask); umask 077; set -C\n\
         if [ \"$0\" = root ] && [ -n \"${{SUDO_USER:-}}\" ]; then\n  sudo() {{ [ \"$1\" = -n ] && shift; \"$@\"; }}\n  \
         eval \"HOME=~$SUDO_USER\"; export HOME\nfi\n__pf=\"$HOME/.provisioner-pf-{token}\"\n",
    );
    let mut files = String::new();
    for (i, cmd) in cmds.iter().enumerate() {
        // With `-v` each command's own time in the guest, from /proc/uptime (read by the shell, no process
        // started; monotonic, so a command that sets the clock does not skew it), else `-`.
        let (start, took) = if timed {
            (
                "read __pf_t _ </proc/uptime; ",
                "read __pf_e _ </proc/uptime; \
                 __pf_ms=$(( (${__pf_e%.*}${__pf_e#*.} - ${__pf_t%.*}${__pf_t#*.}) * 10 ))",
            )
        } else {
            ("", "__pf_ms=-")
        };
        // The batch's `umask 077` and `set -C` are for its own files: each command runs with the caller's umask,
        // and its redirections may overwrite files.
        batch.push_str(&format!(
            "{{ {start}( umask \"$__pf_um\"; set +C; eval {} ) 2>&1 </dev/null; __pf_s=$?; {took}; \
             printf '\\n@pf-%s %s %s %s\\n' {token} {i} \"$__pf_s\" \"$__pf_ms\"; }} >\"$__pf.{i}\" &\n",
            shell_quote(cmd)
        ));
        files.push_str(&format!(" \"$__pf.{i}\""));
    }
    batch.push_str(&format!(
        "wait\nprintf '@pf-%s begin\\n' {token}; cat{files}\n\
         rm -f{files} >/dev/null 2>&1 </dev/null &\nexit 0\n"
    ));
    let quoted = shell_quote(&batch);
    // `$0` says which of the two runs it is (as root through sudo, or as the user), without a process to ask. The
    // batch itself always exits 0 (a result missing shows in the parse), so only a refused `sudo` runs it again.
    format!("sudo -n sh -c {quoted} root 2>/dev/null || sh -c {quoted} user")
}

/// The results of a [`prefetch_script`] run with `token`, in order; None unless all `n` are there, in order,
/// each with its trailer.
fn parse_prefetch(output: &str, n: usize, token: &str) -> Option<Vec<Prefetched>> {
    let begin = format!("@pf-{token} begin\n");
    let mut rest = &output[output.find(&begin)? + begin.len()..];
    let trailer = format!("\n@pf-{token} ");
    let mut results = Vec::with_capacity(n);
    for i in 0..n {
        let at = rest.find(&trailer)?;
        let out = &rest[..at];
        let after = &rest[at + trailer.len()..];
        let end = after.find('\n')?;
        let mut f = after[..end].split_whitespace();
        if f.next()?.parse::<usize>().ok()? != i {
            return None;
        }
        let status = f.next()?.parse().ok()?;
        let guest_ms = f.next()?.parse().ok();
        results.push(Prefetched { out: ExecOutput { status, output: out.to_string() }, guest_ms });
        rest = &after[end + 1..];
    }
    Some(results)
}

/// A command started with [`Session::start`], running in the guest.
pub struct Running<'a> {
    ex: Exec<'a>,
    started: Instant,
}

impl Running<'_> {
    /// Wait for the command (within the timeout it was started with) and collect its result.
    pub fn finish(mut self) -> Result<ExecOutput> {
        let out = self.ex.finish();
        trace_exec(&self.ex.cmd, self.started);
        out
    }
}

/// Runs its closure when dropped (timing an exec however it ends).
struct Defer<F: FnOnce()>(Option<F>);

impl<F: FnOnce()> Drop for Defer<F> {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f()
        }
    }
}

struct Exec<'a> {
    sess: &'a Session,
    ch: ssh2::Channel,
    cmd: String,
    deadline: Instant,
    timeout: Duration,
    on_line: &'a mut dyn FnMut(&str),
    partial: Vec<u8>,
    output: String,
}

impl<'a> Exec<'a> {
    fn start(
        sess: &'a Session,
        cmd: &str,
        timeout: Duration,
        on_line: &'a mut dyn FnMut(&str),
    ) -> Result<Exec<'a>> {
        EXECS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let deadline = Instant::now() + timeout;
        let s = &sess.sess;
        s.set_timeout(millis(timeout.min(SLICE)));
        let ctx = || format!("start `{cmd}` on {}", sess.addr);
        let mut ch = s.channel_session().with_context(ctx).context(RECONNECT_HINT)?;
        ch.handle_extended_data(ssh2::ExtendedData::Merge).with_context(ctx)?;
        ch.exec(cmd).with_context(ctx)?;
        Ok(Exec {
            sess,
            ch,
            cmd: cmd.to_string(),
            deadline,
            timeout,
            on_line,
            partial: Vec::new(),
            output: String::new(),
        })
    }

    /// Arm the per-call timeout for the next blocking call; error once the overall deadline passed.
    fn arm(&self) -> std::io::Result<()> {
        // Not ErrorKind::Interrupted: io::copy and write_all retry those.
        if let Some(sig) = crate::process::interrupted() {
            return Err(std::io::Error::other(sig));
        }
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let last = crate::process::tail(&self.output, 20);
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "`{}` did not finish within {:?} on {}; last output:\n{last}\n\
                     hint: the command may be hung or just slow (a TCG guest is slow): look at it with \
                     `provisioner ssh`, then retry",
                    self.cmd, self.timeout, self.sess.addr
                ),
            ));
        }
        self.sess.sess.set_timeout(millis(left.min(SLICE)));
        Ok(())
    }

    /// After a slice passed without progress: keep the connection alive (errors mean it is gone).
    fn idle(&self) -> std::io::Result<()> {
        self.sess.sess.keepalive_send().map(|_| ()).map_err(std::io::Error::from)
    }

    fn take(&mut self, data: &[u8]) {
        self.partial.extend_from_slice(data);
        while let Some(i) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=i).collect();
            self.emit(&line);
        }
    }

    fn emit(&mut self, raw: &[u8]) {
        let text = String::from_utf8_lossy(raw);
        self.output.push_str(&text);
        let line = text.trim_end_matches('\n').trim_end_matches('\r');
        (self.on_line)(line);
    }

    /// Read whatever output is already buffered locally, without blocking (keeps the remote from stalling on a
    /// full window while we are sending).
    fn drain_available(&mut self) -> std::io::Result<()> {
        let mut buf = [0u8; 32 * 1024];
        while self.ch.read_window().available > 0 {
            let n = self.ch.read(&mut buf)?;
            if n == 0 {
                break;
            }
            self.take(&buf[..n]);
        }
        Ok(())
    }

    /// Read to EOF, close, and collect the exit status.
    fn finish(&mut self) -> Result<ExecOutput> {
        let what = format!("`{}` on {}", self.cmd, self.sess.addr);
        let _ = self.ch.send_eof();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            self.arm()?;
            match self.ch.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let chunk = buf[..n].to_vec();
                    self.take(&chunk);
                }
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                    self.idle().with_context(|| format!("connection lost while running {}", what))?
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("read output of {}", what)).context(RECONNECT_HINT)
                }
            }
        }
        if !self.partial.is_empty() {
            let rest = std::mem::take(&mut self.partial);
            self.emit(&rest);
        }
        loop {
            self.arm()?;
            match self.ch.wait_close() {
                Ok(()) => break,
                Err(e) if e.code() == ssh2::ErrorCode::Session(LIBSSH2_ERROR_TIMEOUT) => {
                    self.idle().with_context(|| format!("connection lost while closing {}", what))?
                }
                Err(e) => return Err(e).with_context(|| format!("close channel of {}", what)),
            }
        }
        let mut status = self.ch.exit_status().with_context(|| format!("exit status of {}", what))?;
        if let Ok(sig) = self.ch.exit_signal() {
            if let Some(name) = sig.exit_signal {
                // Like OpenSSH's client: a command killed by a signal reports 255.
                status = 255;
                self.output.push_str(&format!("[killed by signal SIG{name}]\n"));
            }
        }
        Ok(ExecOutput { status, output: std::mem::take(&mut self.output) })
    }
}

/// Hint attached to transport errors that mean the session is unusable.
const RECONNECT_HINT: &str =
    "hint: the SSH connection to the machine failed or timed out; check it is running (`provisioner status`) and retry";

impl Write for Exec<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        loop {
            self.arm()?;
            match self.ch.write(data) {
                Ok(n) => {
                    self.drain_available()?;
                    return Ok(n);
                }
                // libssh2 wants the same write repeated after a timeout (a packet may be half sent), and
                // nothing else sent in between: no keepalive, no reads (they may send a window adjust).
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(e) => return Err(e),
            }
        }
    }
    /// Writes are sent as they are made. (Not `Channel::flush`: libssh2 "flush" discards unread *incoming* data.)
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::shell_quote;

    /// The batch as the guest runs it, with a `sudo` on PATH that logs each start and, when `grant`, runs its command
    /// as sudo does (with `SUDO_USER`, here the current user), else refuses as `sudo -n` does without a rule.
    fn run_batch(cmds: &[&str], grant: bool) -> (Vec<super::Prefetched>, usize, String) {
        let token = super::batch_token();
        let (results, starts, home) = run_batch_as(cmds, grant, &token);
        (results.expect("every result, in order"), starts, home)
    }

    fn run_batch_as(
        cmds: &[&str],
        grant: bool,
        token: &str,
    ) -> (Option<Vec<super::Prefetched>>, usize, String) {
        let (dir, bin) = crate::testing::stand_in_dir();
        let log = dir.path().join("sudo.log");
        let body = match grant {
            true => {
                format!("echo start >> {log:?}\n[ \"$1\" = -n ] && shift\nSUDO_USER=$(id -un) exec \"$@\"")
            }
            false => format!("echo refused >> {log:?}\nexit 1"),
        };
        std::fs::write(bin.join("sudo"), format!("#!/bin/sh\n{body}\n")).unwrap();
        crate::platform::set_mode(&bin.join("sudo"), 0o755).unwrap();
        let cmds: Vec<String> = cmds.iter().map(|c| c.to_string()).collect();
        let script = super::prefetch_script(&cmds.iter().collect::<Vec<_>>(), false, token);
        let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
        let out = std::process::Command::new("/bin/sh")
            .args(["-c", &script])
            .env("PATH", path)
            .env("HOME", dir.path())
            .env_remove("SUDO_USER")
            .output()
            .unwrap();
        let results = super::parse_prefetch(&String::from_utf8_lossy(&out.stdout), cmds.len(), token);
        let starts = std::fs::read_to_string(&log).unwrap_or_default().lines().count();
        (results, starts, dir.path().display().to_string())
    }

    #[test]
    #[cfg_attr(windows, ignore = "windows: a guest shell script, run with /bin/sh")]
    fn the_batch_runs_as_root_through_one_sudo_and_its_commands_sudo_is_a_function_there() {
        let whoami = "sudo -n sh -c 'echo \"root? $0\"'; echo \"home=$HOME\"";
        let (results, sudo_starts, _) =
            run_batch(&[whoami, "exit 4", "printf 'no newline \\303\\277'"], true);
        // One `sudo` for the whole batch; the command's own `sudo -n` is the batch's function (no start).
        assert_eq!(sudo_starts, 1);
        // HOME is the sudo user's own (its passwd entry), as in the user's session.
        let out =
            std::process::Command::new("/bin/sh").args(["-c", "eval echo ~$(id -un)"]).output().unwrap();
        let home = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert_eq!(results[0].out.output, format!("root? sh\nhome={home}\n"));
        assert_eq!((results[0].out.status, results[1].out.status), (0, 4));
        assert_eq!(results[2].out.output, "no newline \u{ff}");
        // Without passwordless sudo the batch runs as the user, and each command's own `sudo` decides (refused).
        let (results, sudo_starts, dir) = run_batch(&[whoami], false);
        assert_eq!(sudo_starts, 2, "the batch's refused sudo, then the command's own");
        assert_eq!(results[0].out.output, format!("home={dir}\n"));
    }

    #[test]
    #[cfg_attr(windows, ignore = "windows: a guest shell script, run with /bin/sh")]
    fn the_batch_keeps_outputs_exact_leaves_no_file_and_never_writes_through_a_file_already_there() {
        let token = super::batch_token();
        // The batch runs as root through the test's `sudo`, with the user's HOME.
        let out =
            std::process::Command::new("/bin/sh").args(["-c", "eval echo ~$(id -un)"]).output().unwrap();
        let home = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let files: Vec<std::path::PathBuf> =
            (0..3).map(|i| std::path::PathBuf::from(format!("{home}/.provisioner-pf-{token}.{i}"))).collect();
        // An output that looks like a trailer (another token, or none) stays output; `>` in a command overwrites
        // (`set -C` is the batch's only).
        let dir = tempfile::tempdir().unwrap();
        let over = dir.path().join("over");
        std::fs::write(&over, "old").unwrap();
        let overwrite = format!("printf '@pf-{} 0 0 -\\n\\n'; echo new > {over:?}", "f".repeat(32));
        let (results, _, _) = run_batch_as(&[&overwrite, "printf '\\n\\n'", "umask"], true, &token);
        let results = results.expect("every result");
        // The batch's own `umask 077` is not its commands'.
        let umask = std::process::Command::new("/bin/sh").args(["-c", "umask"]).output().unwrap();
        assert_eq!(results[2].out.output, String::from_utf8_lossy(&umask.stdout));
        assert_eq!(results[0].out.output, format!("@pf-{} 0 0 -\n\n", "f".repeat(32)));
        assert_eq!((results[0].out.status, std::fs::read_to_string(&over).unwrap().as_str()), (0, "new\n"));
        assert_eq!(results[1].out.output, "\n\n");
        // The background `rm` removes the batch's files.
        crate::process::wait_until(std::time::Duration::from_secs(10), "the batch's files removed", || {
            Ok(files.iter().all(|f| f.symlink_metadata().is_err()).then_some(()))
        })
        .unwrap();
        // A link planted at a batch's path (only the user or root could; the name is random per batch: this plants
        // it knowing the token) is not followed: that command does not run, the batch gives no answers, and the target is untouched.
        let target = dir.path().join("target");
        std::fs::write(&target, "mine").unwrap();
        crate::platform::symlink(&target, &files[0]).unwrap();
        let (results, _, _) = run_batch_as(&["echo ran > /dev/null; echo out", "true"], true, &token);
        let _ = std::fs::remove_file(&files[0]);
        assert!(results.is_none(), "a batch with a command that could not run gives no answers");
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "mine");
    }

    #[test]
    fn the_recorded_libvirt_host_decides_the_route_to_the_guest() {
        use super::{Endpoint, MachineState, StateDir};
        let dir = tempfile::tempdir().unwrap();
        let text = "[machine]\nname = \"t\"\n\n[box]\nurl = \"https://example.org/b.box\"\nsha256 = \"{}\"\n";
        let path = dir.path().join("box-config.toml");
        let text = text.replace("{}", &"a".repeat(64));
        let cfg = crate::config::Config::from_bytes(&path, text.as_bytes()).unwrap();
        let state = StateDir::at(dir.path().join(".provisioner"));
        let far = "qemu+ssh://root@10.201.0.2/system?known_hosts=/kh";
        let ms = |provider: &str, uri: &str| MachineState {
            provider: provider.into(),
            ssh_port: Some(2222),
            libvirt_uri: Some(uri.into()),
            ..Default::default()
        };
        let ep = Endpoint::from_state(&cfg, &state, Some(&ms("libvirt", far)), "").unwrap();
        let g = ep.guest_addr();
        assert!(!g.is_direct() && g.ports[0] == 2222, "{g:?}");
        assert!(g.proxy_command().unwrap().ends_with(" -l root -W %h:%p 10.201.0.2"));
        for (provider, uri) in [("libvirt", "qemu:///system"), ("virtualbox", far)] {
            let ep = Endpoint::from_state(&cfg, &state, Some(&ms(provider, uri)), "").unwrap();
            assert!(ep.guest_addr().is_direct(), "{provider} {uri}");
            assert_eq!(ep.guest_addr().proxy_command(), None);
        }
    }

    #[test]
    fn shell_quote_quotes_only_when_needed() {
        assert_eq!(shell_quote("/opt/lab"), "/opt/lab");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }
}
