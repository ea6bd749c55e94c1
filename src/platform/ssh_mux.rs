//! A client of OpenSSH's connection-multiplexing protocol (OpenSSH's `PROTOCOL.mux`, version 4), spoken to a
//! running master's control socket: a command runs on the master's connection as a new session channel with no
//! `ssh` process started here. The master gets our stdin/stdout/stderr as file descriptors (`SCM_RIGHTS`, one per
//! message as OpenSSH's own client sends them) and writes the command's output into our pipes itself ([`exec`],
//! output captured) or into our own stdout and stderr ([`exec_attached`], `provisioner ssh -c`); its exit status
//! comes back as `MUX_S_EXIT_MESSAGE`.
//!
//! Unix only (the control socket is a unix socket); the Windows side answers [`super::MuxFailure::Unavailable`].

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use super::{MuxFailure, MuxRun};

const MUX_MSG_HELLO: u32 = 0x0000_0001;
const MUX_C_NEW_SESSION: u32 = 0x1000_0002;
const MUX_S_PERMISSION_DENIED: u32 = 0x8000_0002;
const MUX_S_FAILURE: u32 = 0x8000_0003;
const MUX_S_EXIT_MESSAGE: u32 = 0x8000_0004;
const MUX_S_SESSION_OPENED: u32 = 0x8000_0006;
const SSHMUX_VER: u32 = 4;
/// OpenSSH's "no escape character" (`-e none`); it applies to tty sessions only, and ours never ask for one.
const ESCAPE_NONE: u32 = 0xffff_ffff;
/// The request id of our one request (any value: the master echoes it).
const REQUEST_ID: u32 = 1;
/// How long one wait for the master may run before the interrupt flag is looked at again.
const SLICE: Duration = Duration::from_millis(100);

/// One packet: the body's length (u32, big endian) and the body. Pure.
fn packet(body: &[u8]) -> Vec<u8> {
    let mut p = (body.len() as u32).to_be_bytes().to_vec();
    p.extend_from_slice(body);
    p
}

fn put_u32(b: &mut Vec<u8>, v: u32) {
    b.extend_from_slice(&v.to_be_bytes());
}

fn put_str(b: &mut Vec<u8>, s: &[u8]) {
    put_u32(b, s.len() as u32);
    b.extend_from_slice(s);
}

/// `MUX_MSG_HELLO` with our protocol version and no extensions. Pure.
pub(super) fn hello() -> Vec<u8> {
    let mut b = Vec::new();
    put_u32(&mut b, MUX_MSG_HELLO);
    put_u32(&mut b, SSHMUX_VER);
    packet(&b)
}

/// `MUX_C_NEW_SESSION` for `command`: no tty, no X11 or agent forwarding, not a subsystem, no environment (as
/// `ssh -T HOST COMMAND` with no `SendEnv`). Pure.
pub(super) fn new_session(command: &str) -> Vec<u8> {
    let mut b = Vec::new();
    put_u32(&mut b, MUX_C_NEW_SESSION);
    put_u32(&mut b, REQUEST_ID);
    put_str(&mut b, b""); // reserved
    for flag in [0u32; 4] {
        put_u32(&mut b, flag); // want tty, X11, agent, subsystem
    }
    put_u32(&mut b, ESCAPE_NONE);
    put_str(&mut b, b""); // terminal type
    put_str(&mut b, command.as_bytes());
    packet(&b)
}

/// A reader of the u32s and strings of one packet body.
struct Body<'a>(&'a [u8]);

impl Body<'_> {
    fn u32(&mut self) -> Result<u32, String> {
        if self.0.len() < 4 {
            return Err("a message of the master ended early".into());
        }
        let (v, rest) = self.0.split_at(4);
        self.0 = rest;
        Ok(u32::from_be_bytes([v[0], v[1], v[2], v[3]]))
    }
    fn string(&mut self) -> Result<String, String> {
        let n = self.u32()? as usize;
        if self.0.len() < n {
            return Err("a message of the master ended early".into());
        }
        let (v, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(String::from_utf8_lossy(v).into_owned())
    }
}

/// Wait until `fd` can be read (`events` POLLIN) or written (POLLOUT), up to `deadline`, looking at `cancelled`
/// every [`SLICE`]. Err(TimedOut / Interrupted) otherwise.
fn wait_fd(
    fd: RawFd,
    events: i16,
    deadline: Instant,
    cancelled: &dyn Fn() -> bool,
) -> Result<(), MuxFailure> {
    loop {
        if cancelled() {
            return Err(MuxFailure::Interrupted);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(MuxFailure::TimedOut);
        }
        let mut pfd = libc::pollfd { fd, events, revents: 0 };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, left.min(SLICE).as_millis().max(1) as i32) };
        if n > 0 {
            return Ok(());
        }
        if n < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return Err(MuxFailure::Unavailable(format!("poll: {}", io::Error::last_os_error())));
        }
    }
}

/// Read one whole packet body from the (non-blocking) control socket.
fn read_packet(
    sock: &mut UnixStream,
    deadline: Instant,
    cancelled: &dyn Fn() -> bool,
) -> Result<Option<Vec<u8>>, MuxFailure> {
    let mut len = [0u8; 4];
    if !read_full(sock, &mut len, deadline, cancelled)? {
        return Ok(None);
    }
    let n = u32::from_be_bytes(len) as usize;
    if n > 256 * 1024 {
        return Err(MuxFailure::Unavailable(format!("a message of {n} bytes from the master")));
    }
    let mut body = vec![0u8; n];
    if !read_full(sock, &mut body, deadline, cancelled)? {
        return Err(MuxFailure::Unavailable("the master closed the control connection mid-message".into()));
    }
    Ok(Some(body))
}

/// Fill `buf`; false at EOF before its first byte.
fn read_full(
    sock: &mut UnixStream,
    buf: &mut [u8],
    deadline: Instant,
    cancelled: &dyn Fn() -> bool,
) -> Result<bool, MuxFailure> {
    let mut got = 0;
    while got < buf.len() {
        match sock.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(MuxFailure::Unavailable("the master closed the control connection".into())),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                wait_fd(sock.as_raw_fd(), libc::POLLIN, deadline, cancelled)?
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(MuxFailure::Unavailable(format!("read from the control socket: {e}"))),
        }
    }
    Ok(true)
}

fn write_full(
    sock: &mut UnixStream,
    mut buf: &[u8],
    deadline: Instant,
    cancelled: &dyn Fn() -> bool,
) -> Result<(), MuxFailure> {
    while !buf.is_empty() {
        match sock.write(buf) {
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                wait_fd(sock.as_raw_fd(), libc::POLLOUT, deadline, cancelled)?
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(MuxFailure::Unavailable(format!("write to the control socket: {e}"))),
        }
    }
    Ok(())
}

/// Send one file descriptor with one byte of data (`mm_send_fd`, what the master's `mm_receive_fd` reads).
fn send_fd(
    sock: &UnixStream,
    fd: RawFd,
    deadline: Instant,
    cancelled: &dyn Fn() -> bool,
) -> Result<(), MuxFailure> {
    let mut byte = [0u8; 1];
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
    let mut control = vec![0u8; space];
    loop {
        let mut iov = libc::iovec { iov_base: byte.as_mut_ptr().cast(), iov_len: 1 };
        // SAFETY: a zeroed msghdr is valid; every pointer set below points into live locals of the right size.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: msg_control holds CMSG_SPACE(one fd) bytes, so the first header and its data fit.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
        }
        // SAFETY: a valid socket and a msghdr built above.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, 0) };
        if n == 1 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::WouldBlock => wait_fd(sock.as_raw_fd(), libc::POLLOUT, deadline, cancelled)?,
            io::ErrorKind::Interrupted => {}
            _ => return Err(MuxFailure::Unavailable(format!("pass a file descriptor to the master: {e}"))),
        }
    }
}

/// Read what `fd` has now into `into`; false at EOF.
fn drain(fd: &mut File, into: &mut Vec<u8>) -> io::Result<bool> {
    let mut buf = [0u8; 65536];
    loop {
        match fd.read(&mut buf) {
            Ok(0) => return Ok(false),
            Ok(n) => into.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on an fd we own.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A pipe as (read end, non-blocking; write end).
fn pipe() -> Result<(File, OwnedFd), MuxFailure> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe fills the two-element array.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return Err(MuxFailure::Unavailable(format!("pipe: {}", io::Error::last_os_error())));
    }
    // SAFETY: two fresh descriptors nobody else owns.
    let (r, w) = unsafe { (File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    for fd in fds {
        // SAFETY: fcntl on our own descriptors (not inherited by the children we start).
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    set_nonblocking(r.as_raw_fd()).map_err(|e| MuxFailure::Unavailable(format!("pipe: {e}")))?;
    Ok((r, w))
}

/// Connect to the master on `socket`, open a session for `command` and hand it `fds` (stdin, stdout, stderr):
/// the control connection (non-blocking), once the master said the session is open.
fn open_session(
    socket: &Path,
    command: &str,
    fds: [RawFd; 3],
    deadline: Instant,
    cancelled: &dyn Fn() -> bool,
) -> Result<UnixStream, MuxFailure> {
    let mut sock = UnixStream::connect(socket)
        .map_err(|e| MuxFailure::Unavailable(format!("connect to {}: {e}", socket.display())))?;
    sock.set_nonblocking(true).map_err(|e| MuxFailure::Unavailable(format!("control socket: {e}")))?;
    write_full(&mut sock, &hello(), deadline, cancelled)?;
    let Some(reply) = read_packet(&mut sock, deadline, cancelled)? else {
        return Err(MuxFailure::Unavailable("the master closed the control connection at once".into()));
    };
    let mut b = Body(&reply);
    let (kind, version) =
        (b.u32().map_err(MuxFailure::Unavailable)?, b.u32().map_err(MuxFailure::Unavailable)?);
    if kind != MUX_MSG_HELLO || version != SSHMUX_VER {
        return Err(MuxFailure::Unavailable(format!(
            "the master answered {kind:#x} version {version}, not hello version {SSHMUX_VER}"
        )));
    }
    write_full(&mut sock, &new_session(command), deadline, cancelled)?;
    for fd in fds {
        send_fd(&sock, fd, deadline, cancelled)?;
    }
    let Some(reply) = read_packet(&mut sock, deadline, cancelled)? else {
        return Err(MuxFailure::Unavailable(
            "the master closed the control connection before the session".into(),
        ));
    };
    let mut b = Body(&reply);
    let kind = b.u32().map_err(MuxFailure::Unavailable)?;
    let _request = b.u32().map_err(MuxFailure::Unavailable)?;
    match kind {
        MUX_S_SESSION_OPENED => Ok(sock),
        MUX_S_PERMISSION_DENIED | MUX_S_FAILURE => {
            let why = b.string().unwrap_or_default();
            Err(MuxFailure::Unavailable(format!("the master refused the session: {why}")))
        }
        other => Err(MuxFailure::Unavailable(format!("the master answered {other:#x} to a new session"))),
    }
}

/// Take the whole packets at the front of `buf`: the exit status when the exit message is among them (a tty
/// failure cannot come: no tty is asked).
fn exit_status(buf: &mut Vec<u8>) -> Option<u32> {
    let mut code = None;
    while buf.len() >= 4 {
        let n = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if buf.len() < 4 + n {
            break;
        }
        let body: Vec<u8> = buf.drain(..4 + n).skip(4).collect();
        let mut b = Body(&body);
        if let Ok(MUX_S_EXIT_MESSAGE) = b.u32() {
            let _session = b.u32();
            code = b.u32().ok();
        }
    }
    code
}

/// Run `command` on the master's connection with this process' own stdin, stdout and stderr (the master reads
/// and writes them itself, as for OpenSSH's `ssh -S SOCKET HOST COMMAND`), until its exit status comes: no
/// deadline (the command is the user's). `Ok(None)`: the connection ended without a status (`ssh`'s 255).
/// Returns when the master closes the control connection.
pub(super) fn exec_attached(
    socket: &Path,
    command: &str,
    cancelled: &dyn Fn() -> bool,
) -> Result<Option<i32>, MuxFailure> {
    // Far enough to be no deadline, near enough that `Instant` arithmetic cannot overflow.
    let deadline = Instant::now() + Duration::from_secs(100 * 365 * 86400);
    let mut sock = open_session(socket, command, [0, 1, 2], deadline, cancelled)?;
    let (mut buf, mut code) = (Vec::new(), None);
    // As OpenSSH's client: the status comes first, then the master closes the control connection once the
    // session's output is written to our descriptors; returning at the close leaves none of it unwritten.
    loop {
        wait_fd(sock.as_raw_fd(), libc::POLLIN, deadline, cancelled)?;
        let mut chunk = [0u8; 512];
        match sock.read(&mut chunk) {
            Ok(0) => return Ok(code),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {}
            Err(_) => return Ok(code),
        }
        if let Some(c) = exit_status(&mut buf) {
            code = Some(c as i32);
        }
    }
}

pub(super) fn exec(
    socket: &Path,
    command: &str,
    stdin: Option<&File>,
    timeout: Duration,
    cancelled: &dyn Fn() -> bool,
) -> Result<MuxRun, MuxFailure> {
    let deadline = Instant::now() + timeout;
    let null;
    let stdin = match stdin {
        Some(f) => f,
        None => {
            null = File::open("/dev/null").map_err(|e| MuxFailure::Unavailable(format!("/dev/null: {e}")))?;
            &null
        }
    };
    let (mut out_r, out_w) = pipe()?;
    let (mut err_r, err_w) = pipe()?;
    let fds = [stdin.as_raw_fd(), out_w.as_raw_fd(), err_w.as_raw_fd()];
    let mut sock = open_session(socket, command, fds, deadline, cancelled)?;
    // The master holds its own copies now: ours would keep the pipes open after it closes them.
    drop((out_w, err_w));

    // The command runs: from here on a failure is the command's (it is never run again through ssh).
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let (mut out_open, mut err_open, mut ctl_open) = (true, true, true);
    let mut code = None;
    let mut ctl_buf = Vec::new();
    while out_open || err_open || (ctl_open && code.is_none()) {
        if cancelled() {
            return Err(MuxFailure::Interrupted);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(MuxFailure::TimedOut);
        }
        let fds = [
            (out_open, out_r.as_raw_fd()),
            (err_open, err_r.as_raw_fd()),
            (ctl_open && code.is_none(), sock.as_raw_fd()),
        ];
        let mut pfds: Vec<libc::pollfd> = fds
            .iter()
            .map(|&(on, fd)| libc::pollfd { fd: if on { fd } else { -1 }, events: libc::POLLIN, revents: 0 })
            .collect();
        // SAFETY: a valid array of pollfds (negative fds are ignored by poll).
        let n = unsafe {
            libc::poll(pfds.as_mut_ptr(), pfds.len() as _, left.min(SLICE).as_millis().max(1) as i32)
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            // Nothing to wait on any more (not met in practice): what came so far, no exit status (ssh's 255).
            code = None;
            break;
        }
        if pfds[0].revents != 0 {
            out_open = drain(&mut out_r, &mut stdout).unwrap_or(false);
        }
        if pfds[1].revents != 0 {
            err_open = drain(&mut err_r, &mut stderr).unwrap_or(false);
        }
        if pfds[2].revents != 0 {
            let mut buf = [0u8; 512];
            match sock.read(&mut buf) {
                Ok(0) => ctl_open = false,
                Ok(n) => ctl_buf.extend_from_slice(&buf[..n]),
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {}
                Err(_) => ctl_open = false,
            }
            if let Some(c) = exit_status(&mut ctl_buf) {
                code = Some(c);
            }
        }
    }
    Ok(MuxRun { code: code.map(|c| c as i32), stdout, stderr })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_messages_are_openssh_mux_packets() {
        assert_eq!(hello(), [0, 0, 0, 8, 0, 0, 0, 1, 0, 0, 0, 4]);
        let s = new_session("echo 'a b'");
        let mut want = vec![0, 0, 0, 0];
        want.extend([0x10, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 0]); // type, request id, reserved ""
        want.extend([0u8; 16]); // tty, X11, agent, subsystem: all off
        want.extend([0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]); // no escape char, no terminal type
        want.extend([0, 0, 0, 10]);
        want.extend(b"echo 'a b'");
        let len = (want.len() - 4) as u32;
        want[..4].copy_from_slice(&len.to_be_bytes());
        assert_eq!(s, want);
    }
}
