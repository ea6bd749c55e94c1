//! The one place for what differs between operating systems: everything else in the crate is portable and calls
//! these functions (`tests/architecture.rs` fails the fast tier on `libc::`, `std::os::unix`, `std::os::windows`
//! or a `/proc/` path anywhere else). This module is the bottom room: it imports nothing of the crate.
//!
//! | concern | Unix (`unix.rs`) | Windows (`windows.rs`) |
//! |---|---|---|
//! | a child's whole tree | own process group, `killpg(SIGKILL)` | a Job Object, `JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE` |
//! | interrupts | SIGINT/SIGTERM/SIGHUP -> 130/143/129 | Ctrl-C -> 130; Ctrl-Break, console close, logoff, shutdown -> 143 |
//! | root | `geteuid() == 0` | an elevated token (root matters only for Linux tools) |
//! | private files | mode 0600 / 0700 | a protected DACL granting the current user only (OpenSSH demands it) |
//! | other file modes | as asked | no-ops: Windows has no mode bits |
//! | who holds a port | Linux `/proc/net` + `/proc/*/fd` | unknown (`None`) |
//! | OpenSSH ControlMaster | yes | no: Windows' OpenSSH has none, every `ssh` is a fresh connection |
//! | host IPv4 networks | `getifaddrs` | unknown (empty: no overlap check) |
//! | a daemon's disowned children | reaped by us as a child subreaper (Linux `prctl`) | not applicable (the command is waited for) |
//! | a command through an OpenSSH master in-process | `ssh_mux.rs`: the mux protocol, fds passed with `SCM_RIGHTS` | no (no master) |
//!
//! Signal numbers are the portable POSIX values ([`SIGINT`], [`SIGTERM`], [`SIGHUP`]): the Windows side maps its
//! console events onto them, so exit codes (128 + number) are the same everywhere.

use std::fs::{File, Metadata};
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

#[cfg(unix)]
mod ssh_mux;
#[cfg(unix)]
mod unix;
#[cfg(unix)]
use unix as imp;
#[cfg(windows)]
mod windows;
#[cfg(windows)]
use windows as imp;

/// Hang-up (Unix); exit code 129.
pub(crate) const SIGHUP: i32 = 1;
/// Ctrl-C (both); exit code 130.
pub(crate) const SIGINT: i32 = 2;
/// Termination (Unix SIGTERM; Windows Ctrl-Break, console close, logoff, shutdown); exit code 143.
pub(crate) const SIGTERM: i32 = 15;

/// The name of a portable signal number, for messages.
pub(crate) fn signal_name(sig: i32) -> &'static str {
    match sig {
        SIGINT => "SIGINT",
        SIGTERM => "SIGTERM",
        SIGHUP => "SIGHUP",
        _ => "a signal",
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Child process trees

/// A child's whole process tree (its process group on Unix, its Job Object on Windows). Clones name the same tree.
#[derive(Debug, Clone)]
pub(crate) struct ProcessTree(imp::Tree);

impl ProcessTree {
    /// Before spawning: make the child the root of a tree of its own (Unix: a new process group, so a terminal's
    /// Ctrl-C reaches only us; Windows: a new console process group, for the same reason).
    pub(crate) fn prepare(cmd: &mut Command) {
        imp::prepare(cmd);
    }
    /// After spawning: the tree of `child` (Windows: the child joins a new Job Object here; a grandchild it
    /// started in the microseconds before is not in it).
    pub(crate) fn of(child: &std::process::Child) -> Self {
        Self(imp::Tree::of(child))
    }
    /// Kill every process of the tree at once (SIGKILL / TerminateJobObject). Harmless if it is gone.
    pub(crate) fn kill(&self) {
        self.0.kill();
    }
    /// The root was reaped: forget the tree without killing what is left of it, as on Unix a process group
    /// outlives its leader (Windows: the kill-on-close limit is lifted before the job's handle is closed).
    pub(crate) fn release(&self) {
        self.0.release();
    }
}

/// The signal that ended a child, if one did (Unix only; Windows has none).
pub(crate) fn exit_signal(status: &ExitStatus) -> Option<i32> {
    imp::exit_signal(status)
}

/// An exit status with this exit code (for a command that ran elsewhere, e.g. through an SSH master).
pub(crate) fn exit_status(code: i32) -> ExitStatus {
    imp::exit_status(code)
}

/// Hand this process over to `cmd`: on Unix it replaces us (exec); on Windows, which has no exec, it runs with our
/// console and this process exits with its code. Returns only on failure to start it.
pub(crate) fn exec(cmd: Command) -> io::Error {
    imp::exec(cmd)
}

/// Start `cmd` detached from us: a session of its own (Unix; a detached console process on Windows), so no
/// terminal signal reaches it, its stdio on the null device, never waited for. Returns its pid.
pub(crate) fn spawn_detached(cmd: Command) -> io::Result<u32> {
    imp::spawn_detached(cmd)
}

/// Run `cmd` as the reaper of everything it disowns, and return when nothing of it is left. On Linux this
/// process becomes a child subreaper: a daemon that forks into the background, and each process that daemon
/// starts and disowns (libvirtd's QEMUs), become our children and are reaped the moment they exit, where an
/// init that reaps late (container inits poll) keeps them as zombies that `virsh destroy` waits on. Elsewhere:
/// `cmd` is run and waited for. The interrupts get their default action back first (a reaper is stopped by its
/// pid, as any daemon).
pub(crate) fn reap_descendants(cmd: Command) -> io::Result<()> {
    imp::reap_descendants(cmd)
}

// ---------------------------------------------------------------------------------------------------------------
// Interrupts

/// The first interrupt received (a portable signal number; 0: none).
static INTERRUPT: AtomicI32 = AtomicI32::new(0);

fn note_interrupt(sig: i32) {
    let _ = INTERRUPT.compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst);
}

/// The first interrupt received, if any.
pub(crate) fn interrupt() -> Option<i32> {
    match INTERRUPT.load(Ordering::SeqCst) {
        0 => None,
        sig => Some(sig),
    }
}

/// Catch the interrupts (see the module docs): each one is recorded for [`interrupt`] and wakes
/// [`wait_interrupt`]. `Ok(true)` the first time, `Ok(false)` when already installed. An interrupt the parent
/// ignores (nohup) stays ignored. On Unix exec(2) resets the handlers, so a program we exec into gets the default
/// behaviour back.
pub(crate) fn install_interrupts() -> io::Result<bool> {
    imp::install_interrupts()
}

/// Block until the next interrupt (true) or the timeout (false). Only after [`install_interrupts`].
pub(crate) fn wait_interrupt(timeout: Option<Duration>) -> bool {
    imp::wait_interrupt(timeout)
}

/// End the process at once with `code`: no destructors, no atexit (locks are released by the OS).
pub(crate) fn exit_now(code: i32) -> ! {
    imp::exit_now(code)
}

/// Ask the process `pid` (not our child: e.g. a daemon that wrote its pid file) to stop: SIGTERM on Unix,
/// TerminateProcess on Windows. Best effort; [`process_alive`] tells when it is gone.
pub(crate) fn terminate(pid: u32) {
    imp::terminate(pid)
}

/// Whether a process with this pid still exists.
pub(crate) fn process_alive(pid: u32) -> bool {
    imp::process_alive(pid)
}

// ---------------------------------------------------------------------------------------------------------------
// Who we are

/// Whether this process runs as root (Unix) or elevated (Windows). Root matters for the Linux tools only
/// (debootstrap, starting virtlogd, mounting); on Windows the answer is the token's elevation, for messages.
pub(crate) fn is_root() -> bool {
    imp::is_root()
}

/// The user id (Unix); 0 on Windows, where it only names Unix-only paths that are never used there.
pub(crate) fn user_id() -> u32 {
    imp::user_id()
}

/// The real user and group id, for a libvirt DAC label (`None` on Windows: libvirt is Linux-only).
pub(crate) fn user_and_group() -> Option<(u32, u32)> {
    imp::user_and_group()
}

// ---------------------------------------------------------------------------------------------------------------
// Files

/// Bytes available to this user on the filesystem of `dir`.
pub(crate) fn free_space(dir: &Path) -> io::Result<u64> {
    fs4::available_space(dir)
}

/// Whether `mode` keeps a file from everyone but its owner (no group or other bits).
fn is_private(mode: u32) -> bool {
    mode & 0o077 == 0
}

/// Give an open file the permission bits `mode` (setuid, setgid and sticky dropped). On Windows a private mode
/// (no group/other bits, e.g. 0600) becomes a DACL for the current user only; any other mode is a no-op there
/// (files inherit their directory's ACL, which is what 0644/0755 mean to a Windows user).
/// `path` names the same file (Windows sets an ACL by name: a write handle has no right to change it).
pub(crate) fn set_file_mode(file: &File, path: &Path, mode: u32) -> io::Result<()> {
    imp::set_file_mode(file, path, mode & 0o777, is_private(mode))
}

/// [`set_file_mode`] by path.
pub(crate) fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    imp::set_mode(path, mode & 0o777, is_private(mode))
}

/// The permission bits of a file (`None` on Windows, which has none).
pub(crate) fn mode(meta: &Metadata) -> Option<u32> {
    imp::mode(meta)
}

/// The permission bits a file of a tree sent to a Linux guest carries: its own where the host has modes; on a host
/// without (Windows) 0755 for a script (`#!`) and 0644 for anything else.
pub(crate) fn mode_or_guess(meta: &Metadata, contents: &[u8]) -> u32 {
    match imp::mode(meta) {
        Some(m) => m,
        None if contents.starts_with(b"#!") => 0o755,
        None => 0o644,
    }
}

/// The owner's user id (`None` on Windows).
pub(crate) fn owner(meta: &Metadata) -> Option<u32> {
    imp::owner(meta)
}

/// Whether a regular file may be run: an execute bit on Unix; any regular file on Windows.
pub(crate) fn is_executable(meta: &Metadata) -> bool {
    meta.is_file() && !matches!(imp::mode(meta), Some(m) if m & 0o111 == 0)
}

/// Create a directory with `mode` (parents too with `recursive`); a private mode makes it the current user's only
/// on Windows too. An existing directory is an `AlreadyExists` error unless `recursive`.
pub(crate) fn create_dir(path: &Path, mode: u32, recursive: bool) -> io::Result<()> {
    imp::create_dir(path, mode & 0o777, is_private(mode), recursive)
}

/// Create a file that must not exist yet, never following a link put in its place, with `mode`.
pub(crate) fn create_new_no_follow(path: &Path, mode: u32) -> io::Result<File> {
    let f = imp::create_new_no_follow(path)?;
    set_file_mode(&f, path, mode)?;
    Ok(f)
}

/// Open a file for reading, refusing a symbolic link (and, on Unix, not blocking on a FIFO): the caller checks the
/// opened file is a regular one.
pub(crate) fn open_no_follow(path: &Path) -> io::Result<File> {
    imp::open_no_follow(path)
}

/// Swap two paths atomically (Linux `renameat2(RENAME_EXCHANGE)`); an `Unsupported` error where the OS or the
/// filesystem cannot (the caller then renames in two steps).
pub(crate) fn rename_exchange(a: &Path, b: &Path) -> io::Result<()> {
    imp::rename_exchange(a, b)
}

/// Read exactly `buf.len()` bytes at `offset` (Windows: moves the file's cursor, which callers do not use).
pub(crate) fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    imp::read_exact_at(file, buf, offset)
}

/// The bytes of `file` that hold data, holes left out (what a sparse-aware copy sends): the sum of its data
/// extents (Linux `SEEK_DATA`/`SEEK_HOLE`); its length where holes cannot be asked for.
pub(crate) fn data_bytes(file: &File) -> io::Result<u64> {
    imp::data_bytes(file)
}

/// Copy the file `from` to `to` keeping its holes (only the data extents are read and written; Windows: a plain
/// copy). Returns its length.
pub(crate) fn copy_sparse(from: &Path, to: &Path) -> io::Result<u64> {
    imp::copy_sparse(from, to)
}

/// Write all of `buf` at `offset`.
#[cfg(test)]
pub(crate) fn write_all_at(file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    imp::write_all_at(file, buf, offset)
}

/// Make a symbolic link `link` to `target` (Windows: a directory or file link, as `target` is; it needs developer
/// mode or elevation there).
#[cfg(test)]
pub(crate) fn symlink(target: &Path, link: &Path) -> io::Result<()> {
    imp::symlink(target, link)
}

/// `std::fs::canonicalize` in the spelling other programs and users expect. Unix: as is. Windows: without the
/// `\\?\` verbatim prefix std adds (`\\?\C:\lab` becomes `C:\lab`, `\\?\UNC\srv\share` becomes
/// `\\srv\share`) when the plain spelling names the same file (not longer than MAX_PATH, no component Windows
/// would reinterpret); VBoxManage refuses a verbatim path as "not absolute" and messages should not show one.
pub(crate) fn canonicalize(p: impl AsRef<Path>) -> io::Result<std::path::PathBuf> {
    imp::canonicalize(p.as_ref())
}

/// The command that stops process `pid`, for hints: `kill PID` on Unix, `taskkill /PID PID` on Windows.
pub(crate) fn stop_process_command(pid: u32) -> String {
    if cfg!(windows) {
        format!("taskkill /PID {pid}")
    } else {
        format!("kill {pid}")
    }
}

/// How to find the process holding the file `path` open, for hints: `fuser -v` on Unix; Windows has no such
/// command-line tool built in, so Resource Monitor's handle search. `shell_quoted` is `path` quoted for a POSIX
/// shell.
pub(crate) fn file_holder_hint(path: &Path, shell_quoted: &str) -> String {
    if cfg!(windows) {
        format!(
            "Resource Monitor (`resmon`, CPU tab, Associated Handles) finds which process holds {}",
            path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned())
        )
    } else {
        format!("`fuser -v {shell_quoted}` shows which process holds it")
    }
}

/// The key two spellings of one path compare by: as is on Unix, case-folded on Windows (case-insensitive names).
pub(crate) fn path_key(p: &Path) -> String {
    imp::path_key(p)
}

/// The mount table, one mount a line with the mount point second, octal escapes as the kernel writes them (Linux
/// `/proc/self/mounts`; empty elsewhere: nothing here mounts there).
pub(crate) fn mount_table() -> String {
    imp::mount_table()
}

/// The CPU description the kernel gives (Linux `/proc/cpuinfo`; empty elsewhere).
pub(crate) fn cpuinfo() -> String {
    imp::cpuinfo()
}

// ---------------------------------------------------------------------------------------------------------------
// Network, hypervisors and SSH

/// Whether this is a Windows host, for the pure functions that take the OS as an argument so both sides are tested
/// everywhere (VBoxManage.exe discovery in `provider::virtualbox::find`).
pub(crate) const WINDOWS: bool = cfg!(windows);

/// Whether this host can run the libvirt provider (virsh, QEMU/KVM): Unix hosts only. On Windows the libvirt code
/// compiles but `provider::select` refuses it with a hint to use VirtualBox.
pub(crate) const LIBVIRT_HOST: bool = cfg!(unix);

/// How to get the OpenSSH client `ssh` on this OS (the hint when it is not on PATH).
pub(crate) const OPENSSH_CLIENT_HINT: &str = if cfg!(windows) {
    "install Windows' OpenSSH Client (Settings > System > Optional features, or \
     `Add-WindowsCapability -Online -Name OpenSSH.Client~~~~0.0.1.0`)"
} else {
    "install it (Debian/Ubuntu: `apt-get install openssh-client`)"
};

/// What to do when an HTTPS server's certificate is not trusted (HTTPS goes through native-tls: OpenSSL's store on
/// Unix, the Windows certificate store on Windows).
pub(crate) const CERTIFICATE_HINT: &str = if cfg!(windows) {
    "the server's TLS certificate is not trusted here (expired, for another name, or from a private CA): fix the \
     server's certificate, or add its CA to the Windows certificate store (certmgr), then run again"
} else {
    "the server's TLS certificate is not trusted here (expired, for another name, or from a private CA): fix the \
     server's certificate, or trust its CA (copy it to /usr/local/share/ca-certificates/ and run \
     update-ca-certificates, or point SSL_CERT_FILE at a PEM bundle holding it), then run again"
};

/// A path as an OpenSSH config value or `-o` option wants it. Unix: as is. Windows: forward slashes (OpenSSH reads
/// a backslash as an escape in config lines) and no `\\?\` verbatim prefix, so `C:\Users\A B\lab` becomes
/// `C:/Users/A B/lab` (the caller quotes it for the space).
pub(crate) fn openssh_path(p: &Path) -> String {
    imp::openssh_path(p)
}

/// The file that is always empty, as OpenSSH spells it here (`GlobalKnownHostsFile`): `/dev/null` on Unix, `NUL`
/// on Windows.
pub(crate) const NULL_FILE: &str = if cfg!(windows) { "NUL" } else { "/dev/null" };

/// Whether OpenSSH connection sharing (ControlMaster over a unix socket) exists: Windows' OpenSSH has none, so
/// there every `provisioner ssh` is a fresh connection.
pub(crate) const SSH_CONTROL_MASTER: bool = cfg!(unix);

/// Whether something accepts connections on the unix socket at `path` (always false on Windows).
pub(crate) fn unix_socket_alive(path: &Path) -> bool {
    imp::unix_socket_alive(path)
}

/// The process (pid, command line) holding a socket bound to `addr`'s port on that address or the wildcard (TCP:
/// listening). `None` when nobody does or it cannot be known (Windows: not looked up).
pub(crate) fn port_holder(addr: SocketAddr, tcp: bool) -> Option<(u32, String)> {
    imp::port_holder(addr, tcp)
}

/// Every IPv4 address of this host's interfaces: (interface, address, prefix length). Empty on Windows (unknown).
pub(crate) fn ipv4_interfaces() -> io::Result<Vec<(String, Ipv4Addr, u8)>> {
    imp::ipv4_interfaces()
}

/// What a command run through an OpenSSH master ([`ssh_mux_exec`]) gave: its exit code (None when the master's
/// connection ended without one, where `ssh` exits 255) and its output.
#[derive(Debug)]
#[cfg_attr(not(unix), allow(dead_code))] // made by the unix client only
pub(crate) struct MuxRun {
    pub code: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Why [`ssh_mux_exec`] gave no [`MuxRun`].
#[derive(Debug)]
#[cfg_attr(not(unix), allow(dead_code))] // Windows answers Unavailable only
pub(crate) enum MuxFailure {
    /// No session was opened (no master on the socket, a refusal, a protocol error, Windows): the command did
    /// not run, so `ssh` may run it.
    Unavailable(String),
    /// The deadline passed (before or after the session opened); the control connection is closed.
    TimedOut,
    /// A signal came (`cancelled` answered true); the control connection is closed.
    Interrupted,
}

/// Run `command` through the OpenSSH master on `socket` with this process' own stdin, stdout and stderr, as
/// `ssh -S SOCKET HOST COMMAND` does but with no `ssh` process: its exit status (None: the connection ended
/// without one, `ssh`'s 255). No deadline; `cancelled` is asked at least every 100 ms.
pub(crate) fn ssh_mux_exec_attached(
    socket: &Path,
    command: &str,
    cancelled: &dyn Fn() -> bool,
) -> Result<Option<i32>, MuxFailure> {
    #[cfg(unix)]
    return ssh_mux::exec_attached(socket, command, cancelled);
    #[cfg(not(unix))]
    {
        let _ = (socket, command, cancelled);
        Err(MuxFailure::Unavailable("no OpenSSH master on this platform".into()))
    }
}

/// Run `command` (one string, as `ssh HOST COMMAND` sends it) through the OpenSSH master listening on the control
/// socket `socket`, with no `ssh` process: OpenSSH's mux protocol, our stdin (`stdin`, else the null device) and
/// two pipes passed to the master. Ends by `timeout`; `cancelled` is asked at least every 100 ms.
pub(crate) fn ssh_mux_exec(
    socket: &Path,
    command: &str,
    stdin: Option<&File>,
    timeout: Duration,
    cancelled: &dyn Fn() -> bool,
) -> Result<MuxRun, MuxFailure> {
    #[cfg(unix)]
    return ssh_mux::exec(socket, command, stdin, timeout, cancelled);
    #[cfg(not(unix))]
    {
        let _ = (socket, command, stdin, timeout, cancelled);
        Err(MuxFailure::Unavailable("no OpenSSH master on this platform".into()))
    }
}
