//! The Unix side of the platform layer (Linux first; the `/proc` readers find nothing elsewhere and say so).

use std::ffi::CStr;
use std::fs::{File, Metadata};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

// ---------------------------------------------------------------------------------------------------------------
// Process trees: each child leads its own process group.

#[derive(Debug, Clone)]
pub(super) struct Tree {
    pgid: i32,
}

pub(super) fn prepare(cmd: &mut Command) {
    cmd.process_group(0);
}

impl Tree {
    pub(super) fn of(child: &Child) -> Self {
        Self { pgid: child.id() as i32 }
    }
    pub(super) fn kill(&self) {
        // SAFETY: kill(2) on the process group of a child we started and have not reaped; harmless if it is gone.
        unsafe {
            libc::kill(-self.pgid, libc::SIGKILL);
        }
    }
    pub(super) fn release(&self) {}
}

pub(super) fn exit_signal(status: &ExitStatus) -> Option<i32> {
    status.signal()
}

pub(super) fn exit_status(code: i32) -> ExitStatus {
    ExitStatus::from_raw((code & 0xff) << 8)
}

pub(super) fn exec(mut cmd: Command) -> io::Error {
    cmd.exec()
}

pub(super) fn spawn_detached(mut cmd: Command) -> io::Result<u32> {
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    // SAFETY: between fork and exec only async-signal-safe calls: setsid(2), and close_range(2) or fcntl(2) on
    // descriptors, which fail harmlessly on one that is not open.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            // Nothing we inherited stays open in a process that outlives us (a pipe a caller waits to see
            // closed, as `cmd | tee` does): every descriptor past stdio is closed at exec.
            #[cfg(target_os = "linux")]
            if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, libc::CLOSE_RANGE_CLOEXEC) == 0 {
                return Ok(());
            }
            for fd in 3..1024 {
                libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
            }
            Ok(())
        });
    }
    Ok(cmd.spawn()?.id())
}

pub(super) fn reap_descendants(mut cmd: Command) -> io::Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the default action back for a signal; no handler runs after this.
        unsafe { libc::signal(sig, libc::SIG_DFL) };
    }
    #[cfg(target_os = "linux")]
    // SAFETY: prctl(2) with PR_SET_CHILD_SUBREAPER and an integer argument only.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let _child = cmd.spawn()?;
    loop {
        let mut status = 0;
        // SAFETY: waitpid(2) for any child, with a valid pointer for the status.
        if unsafe { libc::waitpid(-1, &mut status, 0) } < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::ECHILD) => return Ok(()),
                _ => return Err(e),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Interrupts: a self-pipe the signal handler writes one byte to, read by the watcher.

/// Write end of the self-pipe (-1: no handler installed).
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);
/// Read end of the self-pipe.
static READ_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(sig: libc::c_int) {
    // Async-signal-safe only: atomic stores and write(2).
    super::note_interrupt(sig);
    let fd = WAKE_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let b = sig as u8;
        // SAFETY: writing one byte from a valid local to our own pipe.
        unsafe {
            libc::write(fd, (&b as *const u8).cast(), 1);
        }
    }
}

pub(super) fn install_interrupts() -> io::Result<bool> {
    if WAKE_FD.load(Ordering::SeqCst) >= 0 {
        return Ok(false);
    }
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 fills the two-element array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    READ_FD.store(fds[0], Ordering::SeqCst);
    WAKE_FD.store(fds[1], Ordering::SeqCst);
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: sigaction reads the current action into a zeroed struct, then installs ours: a zeroed sigaction
        // with our handler; SA_RESTART keeps other blocking calls from failing with EINTR.
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            // A signal the parent ignores (nohup, `cmd &` in a non-interactive shell) stays ignored.
            if libc::sigaction(sig, std::ptr::null(), &mut old) == 0 && old.sa_sigaction == libc::SIG_IGN {
                continue;
            }
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(sig, &sa, std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    Ok(true)
}

pub(super) fn wait_interrupt(timeout: Option<Duration>) -> bool {
    let fd = READ_FD.load(Ordering::SeqCst);
    if fd < 0 {
        return false;
    }
    let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    let ms = timeout.map(|t| t.as_millis().min(i32::MAX as u128) as i32).unwrap_or(-1);
    loop {
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n == 0 {
            return false;
        }
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return false;
        }
        let mut b = 0u8;
        // SAFETY: reading one byte into a valid local.
        if unsafe { libc::read(fd, (&mut b as *mut u8).cast(), 1) } == 1 {
            return true;
        }
    }
}

pub(super) fn exit_now(code: i32) -> ! {
    // SAFETY: _exit ends the process without running destructors of other threads' state; flocks are released by
    // the kernel.
    unsafe { libc::_exit(code) }
}

// ---------------------------------------------------------------------------------------------------------------
// Who we are

pub(super) fn terminate(pid: u32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return };
    // SAFETY: kill(2) with a plain pid (never 0 or negative: no group is signalled).
    unsafe { libc::kill(pid, libc::SIGTERM) };
}

pub(super) fn process_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
    // SAFETY: signal 0 only checks that the pid exists; EPERM means it exists but is not ours.
    let exists = unsafe { libc::kill(pid, 0) == 0 || *libc::__errno_location() == libc::EPERM };
    // A zombie has exited: a daemon we stopped (qemu-storage-daemon) is reparented to an init that may reap it
    // only a second later (container inits), or never. Linux says so in /proc; elsewhere the pid is enough.
    exists && !is_zombie(pid)
}

/// Whether /proc says the process has exited and waits to be reaped (state `Z` after the `(comm)` field).
fn is_zombie(pid: libc::pid_t) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').map(|(_, rest)| rest.trim_start().starts_with('Z')))
        .unwrap_or(false)
}

pub(super) fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

pub(super) fn user_id() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

pub(super) fn user_and_group() -> Option<(u32, u32)> {
    // SAFETY: getuid/getgid have no preconditions.
    Some(unsafe { (libc::getuid(), libc::getgid()) })
}

// ---------------------------------------------------------------------------------------------------------------
// Files

pub(super) fn set_file_mode(file: &File, _path: &Path, mode: u32, _private: bool) -> io::Result<()> {
    file.set_permissions(std::fs::Permissions::from_mode(mode))
}

pub(super) fn set_mode(path: &Path, mode: u32, _private: bool) -> io::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

pub(super) fn mode(meta: &Metadata) -> Option<u32> {
    Some(meta.mode() & 0o7777)
}

pub(super) fn owner(meta: &Metadata) -> Option<u32> {
    Some(meta.uid())
}

pub(super) fn create_dir(path: &Path, mode: u32, _private: bool, recursive: bool) -> io::Result<()> {
    std::fs::DirBuilder::new().recursive(recursive).mode(mode).create(path)
}

pub(super) fn create_new_no_follow(path: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

pub(super) fn open_no_follow(path: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path)
}

pub(super) fn rename_exchange(a: &Path, b: &Path) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::ffi::OsStrExt;
        let ca = std::ffi::CString::new(a.as_os_str().as_bytes())?;
        let cb = std::ffi::CString::new(b.as_os_str().as_bytes())?;
        // SAFETY: both are valid NUL-terminated paths; AT_FDCWD resolves them like rename(2).
        let rc = unsafe {
            libc::renameat2(libc::AT_FDCWD, ca.as_ptr(), libc::AT_FDCWD, cb.as_ptr(), libc::RENAME_EXCHANGE)
        };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if matches!(e.raw_os_error(), Some(libc::ENOSYS) | Some(libc::EINVAL)) {
            return Err(io::Error::new(io::ErrorKind::Unsupported, e));
        }
        Err(e)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (a, b);
        Err(io::Error::new(io::ErrorKind::Unsupported, "no atomic exchange of two paths on this OS"))
    }
}

pub(super) fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    file.read_exact_at(buf, offset)
}

/// The data extents of `file` (offset, length), holes left out; the whole file where holes cannot be asked for.
#[cfg(target_os = "linux")]
fn data_extents(file: &File) -> io::Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let (fd, len) = (file.as_raw_fd(), file.metadata()?.len());
    let (mut pos, mut extents) = (0u64, Vec::new());
    while pos < len {
        // SAFETY: lseek on a descriptor the File owns; it only moves that descriptor's offset.
        let start = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if start < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENXIO) => Ok(extents),
                // A filesystem that cannot say: all of it is data.
                Some(libc::EINVAL) => Ok(vec![(0, len)]),
                _ => Err(e),
            };
        }
        // SAFETY: as above.
        let end = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
        if end < 0 {
            return Err(io::Error::last_os_error());
        }
        extents.push((start as u64, (end - start) as u64));
        pos = end as u64;
    }
    Ok(extents)
}

#[cfg(not(target_os = "linux"))]
fn data_extents(file: &File) -> io::Result<Vec<(u64, u64)>> {
    Ok(vec![(0, file.metadata()?.len())])
}

pub(super) fn data_bytes(file: &File) -> io::Result<u64> {
    Ok(data_extents(file)?.iter().map(|(_, n)| n).sum())
}

pub(super) fn copy_sparse(from: &Path, to: &Path) -> io::Result<u64> {
    let src = File::open(from)?;
    let len = src.metadata()?.len();
    let dst = File::create(to)?;
    let mut buf = vec![0u8; 1 << 20];
    for (mut at, n) in data_extents(&src)? {
        let end = at + n;
        while at < end {
            let chunk = &mut buf[..(end - at).min(1 << 20) as usize];
            src.read_exact_at(chunk, at)?;
            dst.write_all_at(chunk, at)?;
            at += chunk.len() as u64;
        }
    }
    // The holes after the last extent, and the length.
    dst.set_len(len)?;
    dst.sync_all()?;
    Ok(len)
}

#[cfg(test)]
pub(super) fn write_all_at(file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    file.write_all_at(buf, offset)
}

#[cfg(test)]
pub(super) fn symlink(target: &Path, link: &Path) -> io::Result<()> {
    std::os::unix::fs::symlink(target, link)
}

pub(super) fn canonicalize(p: &Path) -> std::io::Result<std::path::PathBuf> {
    std::fs::canonicalize(p)
}

pub(super) fn openssh_path(p: &Path) -> String {
    p.display().to_string()
}

pub(super) fn path_key(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

pub(super) fn mount_table() -> String {
    std::fs::read_to_string("/proc/self/mounts").unwrap_or_default()
}

pub(super) fn cpuinfo() -> String {
    std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------------------------
// Network

pub(super) fn unix_socket_alive(path: &Path) -> bool {
    std::os::unix::net::UnixStream::connect(path).is_ok()
}

pub(super) fn port_holder(addr: SocketAddr, tcp: bool) -> Option<(u32, String)> {
    let tables: &[&str] =
        if tcp { &["/proc/net/tcp", "/proc/net/tcp6"] } else { &["/proc/net/udp", "/proc/net/udp6"] };
    let inodes: Vec<u64> = tables
        .iter()
        .filter_map(|t| std::fs::read_to_string(t).ok())
        .flat_map(|text| socket_inodes(&text, addr, tcp))
        .collect();
    if inodes.is_empty() {
        return None;
    }
    process_with_socket(&inodes)
}

/// Socket inodes in one /proc/net table bound to `addr`'s port on that address or a wildcard (TCP: listening).
fn socket_inodes(table: &str, addr: SocketAddr, tcp: bool) -> Vec<u64> {
    const TCP_LISTEN: &str = "0A";
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let (local, st, inode) = (cols.get(1)?, cols.get(3)?, cols.get(9)?);
            if tcp && *st != TCP_LISTEN {
                return None;
            }
            let (ip, port) = parse_proc_addr(local)?;
            let matches = port == addr.port()
                && (ip == addr.ip() || ip.is_unspecified() || mapped(ip) == Some(addr.ip()));
            matches.then(|| inode.parse().ok()).flatten()
        })
        .collect()
}

fn mapped(ip: IpAddr) -> Option<IpAddr> {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4),
        IpAddr::V4(_) => None,
    }
}

/// `0100007F:1F90` (IPv4) or 32 hex digits (IPv6) and a port: the kernel prints each 32-bit word of the
/// address as a native-endian number.
fn parse_proc_addr(s: &str) -> Option<(IpAddr, u16)> {
    let (ip_hex, port_hex) = s.split_once(':')?;
    let port = u16::from_str_radix(port_hex, 16).ok()?;
    if ip_hex.len() % 8 != 0 {
        return None;
    }
    let mut bytes = Vec::with_capacity(16);
    for i in 0..ip_hex.len() / 8 {
        let word = u32::from_str_radix(ip_hex.get(i * 8..i * 8 + 8)?, 16).ok()?;
        bytes.extend_from_slice(&word.to_ne_bytes());
    }
    let ip = match bytes.len() {
        4 => IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?),
        16 => IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?),
        _ => return None,
    };
    Some((ip, port))
}

/// The first process with an open fd on one of these socket inodes.
fn process_with_socket(inodes: &[u64]) -> Option<(u32, String)> {
    let wanted: Vec<String> = inodes.iter().map(|i| format!("socket:[{i}]")).collect();
    for proc_entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = proc_entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(proc_entry.path().join("fd")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|l| wanted.iter().any(|w| l.as_os_str() == w.as_str()))
        });
        if holds {
            return Some((pid, command_line(pid)));
        }
    }
    None
}

fn command_line(pid: u32) -> String {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let cmd = raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(String::from_utf8_lossy)
        .collect::<Vec<_>>()
        .join(" ");
    if cmd.is_empty() {
        std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "?".into())
    } else {
        cmd
    }
}

pub(super) fn ipv4_interfaces() -> io::Result<Vec<(String, Ipv4Addr, u8)>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we own until freeifaddrs; it is read only while alive.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the live list; its pointers are null or valid for the list's lifetime.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_netmask.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: as above; sa_family says which sockaddr the pointers hold.
        unsafe {
            if i32::from((*ifa.ifa_addr).sa_family) != libc::AF_INET {
                continue;
            }
            let addr = &*(ifa.ifa_addr as *const libc::sockaddr_in);
            let mask = &*(ifa.ifa_netmask as *const libc::sockaddr_in);
            let name = CStr::from_ptr(ifa.ifa_name).to_string_lossy().into_owned();
            let prefix = u32::from_be(mask.sin_addr.s_addr).leading_ones() as u8;
            out.push((name, Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)), prefix));
        }
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A detached child leads a session of its own and holds none of our descriptors: the write end of a pipe we
    /// opened without close-on-exec is closed once we close ours, while the child still runs.
    #[test]
    fn a_detached_child_has_its_own_session_and_none_of_our_descriptors() {
        let mut fds = [0; 2];
        // SAFETY: pipe(2) into a valid array; no close-on-exec on purpose (an inherited descriptor).
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let pid = spawn_detached(cmd).unwrap() as libc::pid_t;
        // SAFETY: getsid(2) of our child; close(2) of our own write end.
        let sid = unsafe { libc::getsid(pid) };
        unsafe { libc::close(fds[1]) };
        let mut poll = libc::pollfd { fd: fds[0], events: libc::POLLIN, revents: 0 };
        // SAFETY: poll(2) on one valid pollfd, with a deadline.
        let ready = unsafe { libc::poll(&mut poll, 1, 10_000) };
        let mut byte = [0u8; 1];
        // SAFETY: read(2) into a valid one-byte buffer; the child is killed and reaped after.
        let n = unsafe { libc::read(fds[0], byte.as_mut_ptr().cast(), 1) };
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
            libc::close(fds[0]);
        }
        assert_eq!(sid, pid, "the child does not lead a session of its own");
        assert!(
            ready == 1 && n == 0,
            "the pipe is still open in the detached child (poll {ready}, read {n})"
        );
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn a_sparse_copy_keeps_the_holes_and_the_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let (from, to) = (dir.path().join("from"), dir.path().join("to"));
        let f = File::create(&from).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(&[7u8; 1 << 20], 8 << 20).unwrap();
        f.write_all_at(b"end", (64 << 20) - 3).unwrap();
        f.sync_all().unwrap();
        let data = data_bytes(&f).unwrap();
        // A filesystem without holes (all data) proves nothing here.
        if data == 64 << 20 {
            return;
        }
        assert!(((1 << 20) + 3..=(2 << 20) + (64 << 10)).contains(&data), "{data}");
        assert_eq!(copy_sparse(&from, &to).unwrap(), 64 << 20);
        assert_eq!(std::fs::read(&from).unwrap(), std::fs::read(&to).unwrap());
        let copied = data_bytes(&File::open(&to).unwrap()).unwrap();
        assert!(copied < 4 << 20, "the copy's holes stay holes: {copied} bytes of data");
    }

    #[test]
    fn parses_kernel_addresses() {
        assert_eq!(parse_proc_addr("0100007F:1F90"), Some(("127.0.0.1".parse().unwrap(), 8080)));
        assert_eq!(
            parse_proc_addr("00000000000000000000000001000000:0016"),
            Some(("::1".parse().unwrap(), 22))
        );
        assert_eq!(
            parse_proc_addr("0000000000000000FFFF00000100007F:0016"),
            Some(("::ffff:127.0.0.1".parse().unwrap(), 22))
        );
        assert_eq!(parse_proc_addr("zz:1"), None);
    }
}
