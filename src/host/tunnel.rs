//! Reaching a machine on a remote libvirt host: its forwards listen on the host's 127.0.0.1, so this process
//! mirrors them on the local 127.0.0.1 (same port numbers) through `direct-tcpip` channels of one ssh2 session to
//! the libvirt host. That session checks the host's key against known_hosts (as OpenSSH: the user's file, then
//! /etc/ssh/ssh_known_hosts; unknown or changed keys refused) and logs in with the URI's `keyfile`, the agent, or
//! the user's default keys. Everything that talks to the guest (ssh2 with the pinned guest key, HTTP probes) then
//! works unchanged; the tunnel lives as long as the command (one thread, non-blocking).

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use super::RemoteHost;

/// libssh2's "would block".
const EAGAIN: i32 = -37;
const BUF: usize = 256 * 1024;

/// The open tunnel of this process (one remote machine per command).
/// (host, mirrored ports) of each open tunnel.
type Open = Vec<(String, Vec<u16>)>;
static OPEN: OnceLock<Mutex<Open>> = OnceLock::new();

/// Mirror `ports` of `host`'s 127.0.0.1 on the local 127.0.0.1, once per process. Errors say what to do.
pub fn ensure(host: &RemoteHost, ports: &[u16]) -> Result<()> {
    let open = OPEN.get_or_init(|| Mutex::new(Vec::new()));
    let mut open = open.lock().map_err(|_| anyhow!("tunnel lock poisoned"))?;
    let key = host_key(host);
    let missing: Vec<u16> =
        ports.iter().copied().filter(|p| !open.iter().any(|(k, ps)| *k == key && ps.contains(p))).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let mut listeners = Vec::new();
    for p in &missing {
        let l = TcpListener::bind(("127.0.0.1", *p)).map_err(|e| {
            anyhow!(
                "cannot mirror the remote machine's port {p} on 127.0.0.1:{p} here: {e}\nhint: another program (or a \
                 local machine) uses that port; stop it, or give the remote machine other host ports in \
                 box-config.toml ([ssh] host_port, [[forward]] host)"
            )
        })?;
        l.set_nonblocking(true)?;
        listeners.push((l, *p));
    }
    let sess = match take_checked(&key) {
        Some(sess) => sess,
        None => connect_host(host)?,
    };
    // A host whose sshd forbids forwarding (`AllowTcpForwarding no`, `DisableForwarding yes`, a `PermitOpen` that
    // leaves out its loopback) refuses every channel: say so now, not after the callers' SSH deadline.
    probe_forwarding(&sess, host, missing[0])?;
    sess.set_blocking(false);
    let stop = Arc::new(AtomicBool::new(false));
    std::thread::Builder::new()
        .name("tunnel".into())
        .spawn(move || pump(sess, listeners, stop))
        .context("start the tunnel thread")?;
    open.push((key, missing));
    Ok(())
}

/// Sessions [`check_forwarding`] logged in, not yet taken by [`ensure`]: (host key, when checked, session).
type Checked = Vec<(String, Instant, ssh2::Session)>;
static CHECKED: OnceLock<Mutex<Checked>> = OnceLock::new();
/// How long a checked session waits for [`ensure`]. A warm `up` takes it within a second; a new machine's boot
/// (a minute or more under TCG) outlasts it, and its `ensure` logs in anew rather than trust a session idle that
/// long.
const CHECKED_FOR: Duration = Duration::from_secs(20);

/// Before anything is made on `host`: does its sshd forward TCP connections to its loopback (`port`: the
/// machine's SSH forward there)? One login and one channel; the login is kept for this process' [`ensure`].
pub fn check_forwarding(host: &RemoteHost, port: u16) -> Result<()> {
    let sess = connect_host(host)?;
    probe_forwarding(&sess, host, port)?;
    let checked = CHECKED.get_or_init(|| Mutex::new(Vec::new()));
    if let Ok(mut checked) = checked.lock() {
        checked.push((host_key(host), Instant::now(), sess));
    }
    Ok(())
}

/// The session [`check_forwarding`] left for `key`, if it is recent enough (older ones are dropped).
fn take_checked(key: &str) -> Option<ssh2::Session> {
    let mut checked = CHECKED.get()?.lock().ok()?;
    checked.retain(|(_, at, _)| at.elapsed() < CHECKED_FOR);
    let i = checked.iter().position(|(k, _, _)| k == key)?;
    Some(checked.swap_remove(i).2)
}

/// What tells one host's tunnel and checked session from another's: its SSH destination and port.
fn host_key(host: &RemoteHost) -> String {
    host.destination() + &host.port.map(|p| format!(":{p}")).unwrap_or_default()
}

/// Open one `direct-tcpip` channel to the host's 127.0.0.1:`port` (blocking session) and close it again. Nothing
/// listening there is fine (the guest may still be booting); a channel the sshd refuses by policy ("administratively
/// prohibited") is the error that names the setting to change.
fn probe_forwarding(sess: &ssh2::Session, host: &RemoteHost, port: u16) -> Result<()> {
    match sess.channel_direct_tcpip("127.0.0.1", port, None) {
        Ok(mut ch) => {
            let _ = ch.close();
            Ok(())
        }
        Err(e) if forwarding_prohibited(e.message()) => {
            Err(forwarding_refused_error(host, port, e.message()))
        }
        Err(_) => Ok(()),
    }
}

/// Is this channel-open failure the sshd's policy (not a port without a listener)? Pure.
pub fn forwarding_prohibited(message: &str) -> bool {
    message.contains("administratively prohibited")
}

/// The error for a libvirt host whose sshd refuses TCP forwarding, with the setting that fixes it.
pub fn forwarding_refused_error(host: &RemoteHost, port: u16, detail: &str) -> anyhow::Error {
    let user = host.user.clone().unwrap_or_else(|| "USER".to_string());
    anyhow!(
        "the libvirt host {} refuses to forward TCP connections (its sshd answered a channel to its 127.0.0.1:{port} \
         with \"{detail}\"): the machine's SSH and forwards listen on that host's loopback and cannot be \
         reached through it\nhint: on the host, allow local forwarding in /etc/ssh/sshd_config, for everyone \
         (`AllowTcpForwarding yes`, or `local`) or only for this login (`Match User {user}` followed by \
         `AllowTcpForwarding local`), make sure no `DisableForwarding yes` or `PermitOpen` excludes 127.0.0.1, then \
         reload sshd (`systemctl reload ssh`) and run the command again",
        host.destination()
    )
}

/// An authenticated ssh2 session to the libvirt host, its key checked against known_hosts.
pub fn connect_host(host: &RemoteHost) -> Result<ssh2::Session> {
    use std::net::ToSocketAddrs;
    let port = host.port.unwrap_or(22);
    let addr = (host.host.as_str(), port)
        .to_socket_addrs()
        .with_context(|| format!("resolve the libvirt host {}", host.host))?
        .next()
        .with_context(|| format!("the libvirt host {} has no address", host.host))?;
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(15)).map_err(|e| {
        anyhow!(
            "cannot connect to the libvirt host {addr} over SSH: {e}\nhint: check the host is up and reachable \
             (`ssh {} true`), then run the command again",
            host.destination()
        )
    })?;
    let mut sess = ssh2::Session::new()?;
    sess.set_tcp_stream(tcp);
    sess.set_timeout(30_000);
    sess.handshake().with_context(|| format!("SSH handshake with the libvirt host {addr}"))?;
    check_host_key(&sess, host)?;
    let user = host.user.clone().or_else(|| std::env::var("USER").ok()).unwrap_or_else(|| "root".to_string());
    authenticate(&sess, host, &user)?;
    sess.set_keepalive(true, 15);
    Ok(sess)
}

fn check_host_key(sess: &ssh2::Session, host: &RemoteHost) -> Result<()> {
    let (key, _) = sess.host_key().context("the libvirt host sent no host key")?;
    let port = host.port.unwrap_or(22);
    let mut mismatch = false;
    for file in [host.known_hosts.as_path(), Path::new("/etc/ssh/ssh_known_hosts")] {
        if !file.exists() {
            continue;
        }
        let mut kh = sess.known_hosts()?;
        kh.read_file(file, ssh2::KnownHostFileKind::OpenSSH)
            .with_context(|| format!("read known_hosts file {}", file.display()))?;
        match kh.check_port(&host.host, port, key) {
            ssh2::CheckResult::Match => return Ok(()),
            ssh2::CheckResult::Mismatch => mismatch = true,
            _ => {}
        }
    }
    if mismatch {
        return Err(host
            .host_key_failure("REMOTE HOST IDENTIFICATION HAS CHANGED")
            .unwrap_or_else(|| host.unknown_host_error()));
    }
    Err(host.unknown_host_error())
}

fn authenticate(sess: &ssh2::Session, host: &RemoteHost, user: &str) -> Result<()> {
    if let Some(k) = &host.keyfile {
        sess.userauth_pubkey_file(user, None, Path::new(k), None).map_err(|e| {
            anyhow!(
                "the libvirt host {} refused the key {k} for {user}: {e}\nhint: check the key is in the host's \
                 authorized_keys (`ssh -i {k} {} true`)",
                host.host,
                host.destination()
            )
        })?;
        return Ok(());
    }
    if sess.userauth_agent(user).is_ok() && sess.authenticated() {
        return Ok(());
    }
    let home = super::default_known_hosts();
    let ssh_dir = home.parent().map(Path::to_path_buf).unwrap_or_default();
    for name in ["id_ed25519", "id_ecdsa", "id_rsa"] {
        let k = ssh_dir.join(name);
        if k.exists() && sess.userauth_pubkey_file(user, None, &k, None).is_ok() {
            return Ok(());
        }
    }
    bail!(
        "no SSH key was accepted by the libvirt host {} for {user} (tried ssh-agent and ~/.ssh/id_*)\nhint: name \
         the key in the URI (`?keyfile=PATH`) or add it to ssh-agent",
        host.host
    )
}

/// One forwarded connection: a local TCP stream and its channel, with bytes not yet written either way.
struct Conn {
    tcp: TcpStream,
    port: u16,
    chan: Option<ssh2::Channel>,
    to_chan: Vec<u8>,
    to_tcp: Vec<u8>,
    tcp_eof: bool,
    chan_eof: bool,
    opened: Instant,
}

fn would_block(e: &ssh2::Error) -> bool {
    matches!(e.code(), ssh2::ErrorCode::Session(EAGAIN))
}

fn pump(sess: ssh2::Session, listeners: Vec<(TcpListener, u16)>, stop: Arc<AtomicBool>) {
    let mut conns: Vec<Conn> = Vec::new();
    let mut buf = vec![0u8; BUF];
    let mut last_keepalive = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let mut busy = false;
        for (l, port) in &listeners {
            while let Ok((tcp, _)) = l.accept() {
                let _ = tcp.set_nonblocking(true);
                let _ = tcp.set_nodelay(true);
                conns.push(Conn {
                    tcp,
                    port: *port,
                    chan: None,
                    to_chan: vec![],
                    to_tcp: vec![],
                    tcp_eof: false,
                    chan_eof: false,
                    opened: Instant::now(),
                });
                busy = true;
            }
        }
        // libssh2 keeps one channel-open in progress per session (a non-blocking open is resumed by calling it
        // again): open one at a time, oldest first.
        let mut may_open = true;
        conns.retain_mut(|c| step(&sess, c, &mut buf, &mut busy, &mut may_open));
        if last_keepalive.elapsed() > Duration::from_secs(10) {
            let _ = sess.keepalive_send();
            last_keepalive = Instant::now();
        }
        if !busy {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// Move bytes of one connection; false when it is finished (dropped).
fn step(sess: &ssh2::Session, c: &mut Conn, buf: &mut [u8], busy: &mut bool, may_open: &mut bool) -> bool {
    if c.chan.is_none() {
        if !*may_open {
            return true;
        }
        *may_open = false;
        match sess.channel_direct_tcpip("127.0.0.1", c.port, None) {
            Ok(ch) => {
                c.chan = Some(ch);
                *busy = true;
                *may_open = true;
            }
            Err(e) if would_block(&e) && c.opened.elapsed() < Duration::from_secs(30) => return true,
            // The far side refused (no listener yet: the guest is booting) or the session is gone: close.
            Err(_) => return false,
        }
    }
    let Some(ch) = c.chan.as_mut() else { return true };
    // local -> channel
    if c.to_chan.is_empty() && !c.tcp_eof {
        match c.tcp.read(buf) {
            Ok(0) => {
                c.tcp_eof = true;
                let _ = ch.send_eof();
            }
            Ok(n) => {
                c.to_chan.extend_from_slice(&buf[..n]);
                *busy = true;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(_) => return false,
        }
    }
    if !c.to_chan.is_empty() {
        match ch.write(&c.to_chan) {
            Ok(n) => {
                c.to_chan.drain(..n);
                *busy = true;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(_) => return false,
        }
    }
    // channel -> local
    if c.to_tcp.is_empty() && !c.chan_eof {
        match ch.read(buf) {
            Ok(0) if ch.eof() => {
                c.chan_eof = true;
                let _ = c.tcp.shutdown(std::net::Shutdown::Write);
            }
            Ok(0) => {}
            Ok(n) => {
                c.to_tcp.extend_from_slice(&buf[..n]);
                *busy = true;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(_) => return false,
        }
    }
    if !c.to_tcp.is_empty() {
        match c.tcp.write(&c.to_tcp) {
            Ok(n) => {
                c.to_tcp.drain(..n);
                *busy = true;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(_) => return false,
        }
    }
    !(c.chan_eof && c.to_tcp.is_empty() && (c.tcp_eof || ch.eof()))
}
