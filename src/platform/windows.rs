//! The Windows side of the platform layer (windows-sys; tested under Wine, see docs/windows.md).

use std::fs::{File, Metadata};
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::windows::ffi::OsStrExt;
use std::os::windows::fs::{FileExt, OpenOptionsExt};
use std::os::windows::io::AsRawHandle;
use std::os::windows::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use windows_sys::Win32::Foundation::{CloseHandle, HANDLE};
use windows_sys::Win32::Security::Authorization::{SetNamedSecurityInfoW, SE_FILE_OBJECT};
use windows_sys::Win32::Security::{
    AddAccessAllowedAceEx, GetLengthSid, GetTokenInformation, InitializeAcl, TokenElevation, TokenUser, ACL,
    ACL_REVISION, CONTAINER_INHERIT_ACE, DACL_SECURITY_INFORMATION, OBJECT_INHERIT_ACE,
    PROTECTED_DACL_SECURITY_INFORMATION, TOKEN_ELEVATION, TOKEN_QUERY, TOKEN_USER,
};
use windows_sys::Win32::System::Console::{
    SetConsoleCtrlHandler, CTRL_BREAK_EVENT, CTRL_CLOSE_EVENT, CTRL_C_EVENT, CTRL_LOGOFF_EVENT,
    CTRL_SHUTDOWN_EVENT,
};
use windows_sys::Win32::System::JobObjects::{
    AssignProcessToJobObject, CreateJobObjectW, JobObjectExtendedLimitInformation, SetInformationJobObject,
    TerminateJobObject, JOBOBJECT_EXTENDED_LIMIT_INFORMATION, JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE,
};
use windows_sys::Win32::System::Threading::{GetCurrentProcess, OpenProcessToken, CREATE_NEW_PROCESS_GROUP};

// ---------------------------------------------------------------------------------------------------------------
// Process trees: each child in a Job Object of its own that kills every process in it when its last handle closes.

/// A job handle (kept as an integer so the tree can cross threads; only this module turns it back into a HANDLE).
#[derive(Debug)]
struct Job(usize);

impl Job {
    fn handle(&self) -> HANDLE {
        self.0 as HANDLE
    }
    /// Set (or lift) the kill-on-close limit.
    fn kill_on_close(&self, on: bool) -> bool {
        // SAFETY: a zeroed JOBOBJECT_EXTENDED_LIMIT_INFORMATION is valid (no limits); the handle is our job's.
        unsafe {
            let mut info: JOBOBJECT_EXTENDED_LIMIT_INFORMATION = std::mem::zeroed();
            if on {
                info.BasicLimitInformation.LimitFlags = JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE;
            }
            SetInformationJobObject(
                self.handle(),
                JobObjectExtendedLimitInformation,
                (&info as *const JOBOBJECT_EXTENDED_LIMIT_INFORMATION).cast(),
                std::mem::size_of::<JOBOBJECT_EXTENDED_LIMIT_INFORMATION>() as u32,
            ) != 0
        }
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        // SAFETY: our own job handle, closed once (kill-on-close ends what is still in it unless released).
        unsafe {
            CloseHandle(self.handle());
        }
    }
}

#[derive(Debug, Clone)]
pub(super) struct Tree {
    /// `None` when no job could be made or joined (then only the child itself is killed, by its `Child`).
    job: Option<Arc<Job>>,
}

pub(super) fn prepare(cmd: &mut Command) {
    // A console process group of its own: a Ctrl-C in the console reaches us, not the child (as a Unix process
    // group keeps the terminal's SIGINT from it); we kill it ourselves.
    cmd.creation_flags(CREATE_NEW_PROCESS_GROUP);
}

impl Tree {
    pub(super) fn of(child: &Child) -> Self {
        // SAFETY: a job with default security and no name; the handle is owned by the `Job` from here on.
        let raw = unsafe { CreateJobObjectW(std::ptr::null(), std::ptr::null()) };
        if raw.is_null() {
            return Self { job: None };
        }
        let job = Job(raw as usize);
        // SAFETY: the child's process handle is valid while `child` lives.
        let joined = job.kill_on_close(true)
            && unsafe { AssignProcessToJobObject(job.handle(), child.as_raw_handle() as HANDLE) } != 0;
        Self { job: joined.then(|| Arc::new(job)) }
    }
    pub(super) fn kill(&self) {
        if let Some(job) = &self.job {
            // SAFETY: our own job handle.
            unsafe {
                TerminateJobObject(job.handle(), 1);
            }
        }
    }
    pub(super) fn release(&self) {
        if let Some(job) = &self.job {
            job.kill_on_close(false);
        }
    }
}

pub(super) fn exit_signal(_status: &ExitStatus) -> Option<i32> {
    None
}

pub(super) fn exit_status(code: i32) -> ExitStatus {
    std::os::windows::process::ExitStatusExt::from_raw(code as u32)
}

pub(super) fn exec(mut cmd: Command) -> io::Error {
    // No exec(2) on Windows: run it on our console and exit with its code. A Ctrl-C reaches both; ours is noted
    // and the child decides (an interactive ssh.exe reads Ctrl-C as a key).
    match cmd.status() {
        Ok(st) => std::process::exit(st.code().unwrap_or(1)),
        Err(e) => e,
    }
}

pub(super) fn spawn_detached(mut cmd: Command) -> io::Result<u32> {
    use windows_sys::Win32::System::Threading::DETACHED_PROCESS;
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    cmd.creation_flags(DETACHED_PROCESS | CREATE_NEW_PROCESS_GROUP);
    Ok(cmd.spawn()?.id())
}

pub(super) fn reap_descendants(mut cmd: Command) -> io::Result<()> {
    // Windows has no zombies to reap: a process that exits is gone.
    cmd.status().map(drop)
}

// ---------------------------------------------------------------------------------------------------------------
// Interrupts: a console control handler (run by Windows on a thread of its own) wakes the watcher.

static INSTALLED: Mutex<bool> = Mutex::new(false);
/// Interrupts not yet taken by `wait_interrupt`.
static PENDING: Mutex<u32> = Mutex::new(0);
static WAKE: Condvar = Condvar::new();

/// How long a console close, logoff or shutdown handler may hold the process (Windows ends it after ~5 s).
const CLOSE_GRACE: Duration = Duration::from_millis(4500);

unsafe extern "system" fn on_console_event(event: u32) -> windows_sys::core::BOOL {
    let sig = match event {
        CTRL_C_EVENT => super::SIGINT,
        CTRL_BREAK_EVENT | CTRL_CLOSE_EVENT | CTRL_LOGOFF_EVENT | CTRL_SHUTDOWN_EVENT => super::SIGTERM,
        _ => return 0,
    };
    super::note_interrupt(sig);
    *PENDING.lock().unwrap_or_else(|e| e.into_inner()) += 1;
    WAKE.notify_all();
    if matches!(event, CTRL_CLOSE_EVENT | CTRL_LOGOFF_EVENT | CTRL_SHUTDOWN_EVENT) {
        // Returning lets Windows end the process: give the unwind (children killed, partial entries removed)
        // the time Windows allows; the watcher exits the process sooner when it is done.
        std::thread::sleep(CLOSE_GRACE);
    }
    1
}

pub(super) fn install_interrupts() -> io::Result<bool> {
    let mut installed = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
    if *installed {
        return Ok(false);
    }
    // SAFETY: registers a handler with the signature Windows expects.
    if unsafe { SetConsoleCtrlHandler(Some(on_console_event), 1) } == 0 {
        return Err(io::Error::last_os_error());
    }
    *installed = true;
    Ok(true)
}

pub(super) fn wait_interrupt(timeout: Option<Duration>) -> bool {
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut pending = PENDING.lock().unwrap_or_else(|e| e.into_inner());
    while *pending == 0 {
        pending = match deadline {
            None => WAKE.wait(pending).unwrap_or_else(|e| e.into_inner()),
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return false;
                }
                WAKE.wait_timeout(pending, left).unwrap_or_else(|e| e.into_inner()).0
            }
        };
    }
    *pending -= 1;
    true
}

pub(super) fn exit_now(code: i32) -> ! {
    std::process::exit(code)
}

// ---------------------------------------------------------------------------------------------------------------
// Who we are

/// The current process token, closed on drop.
struct Token(HANDLE);

impl Token {
    fn open() -> io::Result<Self> {
        let mut h: HANDLE = std::ptr::null_mut();
        // SAFETY: GetCurrentProcess is a pseudo-handle; `h` receives a token handle we close on drop.
        if unsafe { OpenProcessToken(GetCurrentProcess(), TOKEN_QUERY, &mut h) } == 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self(h))
    }
    /// One `GetTokenInformation` class, in a u64-aligned buffer.
    fn info(&self, class: i32) -> io::Result<Vec<u64>> {
        let mut len = 0u32;
        // SAFETY: a size query (null buffer, length 0) fills `len`.
        unsafe { GetTokenInformation(self.0, class, std::ptr::null_mut(), 0, &mut len) };
        let mut buf = vec![0u64; (len as usize).div_ceil(8).max(1)];
        // SAFETY: `buf` holds at least `len` bytes.
        if unsafe { GetTokenInformation(self.0, class, buf.as_mut_ptr().cast(), len, &mut len) } == 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(buf)
    }
}

impl Drop for Token {
    fn drop(&mut self) {
        // SAFETY: our own token handle, closed once.
        unsafe {
            CloseHandle(self.0);
        }
    }
}

pub(super) fn terminate(pid: u32) {
    use windows_sys::Win32::System::Threading::{OpenProcess, TerminateProcess, PROCESS_TERMINATE};
    // SAFETY: a handle opened here and closed here; TerminateProcess on it.
    unsafe {
        let h = OpenProcess(PROCESS_TERMINATE, 0, pid);
        if !h.is_null() {
            TerminateProcess(h, 1);
            CloseHandle(h);
        }
    }
}

pub(super) fn process_alive(pid: u32) -> bool {
    use windows_sys::Win32::Foundation::STILL_ACTIVE;
    use windows_sys::Win32::System::Threading::{
        GetExitCodeProcess, OpenProcess, PROCESS_QUERY_LIMITED_INFORMATION,
    };
    // SAFETY: a handle opened here and closed here; the exit code written into a local.
    unsafe {
        let h = OpenProcess(PROCESS_QUERY_LIMITED_INFORMATION, 0, pid);
        if h.is_null() {
            return false;
        }
        let mut code = 0u32;
        let ok = GetExitCodeProcess(h, &mut code) != 0;
        CloseHandle(h);
        ok && code == STILL_ACTIVE as u32
    }
}

pub(super) fn is_root() -> bool {
    Token::open()
        .and_then(|t| t.info(TokenElevation))
        // SAFETY: the buffer holds a TOKEN_ELEVATION (GetTokenInformation succeeded for that class).
        .map(|buf| unsafe { (*(buf.as_ptr() as *const TOKEN_ELEVATION)).TokenIsElevated != 0 })
        .unwrap_or(false)
}

pub(super) fn user_id() -> u32 {
    0
}

pub(super) fn user_and_group() -> Option<(u32, u32)> {
    None
}

// ---------------------------------------------------------------------------------------------------------------
// Files

/// Replace `path`'s ACL with one entry: full control for the current user, nothing inherited from above (a
/// directory passes the entry on to what is made in it). This is what Windows' OpenSSH checks a private key for (it
/// refuses one others can read), and what 0600/0700 mean here.
fn restrict_to_current_user(path: &Path) -> io::Result<()> {
    let inherit = if path.is_dir() { OBJECT_INHERIT_ACE | CONTAINER_INHERIT_ACE } else { 0 };
    const FILE_ALL_ACCESS: u32 = 0x001F_01FF;
    let token = Token::open()?;
    let user = token.info(TokenUser)?;
    // SAFETY: the buffer holds a TOKEN_USER whose SID points into the same buffer, alive until the end.
    let sid = unsafe { (*(user.as_ptr() as *const TOKEN_USER)).User.Sid };
    // SAFETY: `sid` is a valid SID (above).
    let sid_len = unsafe { GetLengthSid(sid) } as usize;
    // ACL header + one ACCESS_ALLOWED_ACE (header 4, mask 4, then the SID in place of its 4-byte SidStart).
    let acl_len = std::mem::size_of::<ACL>() + 8 + sid_len;
    let mut acl = vec![0u64; acl_len.div_ceil(8)];
    let acl_ptr = acl.as_mut_ptr() as *mut ACL;
    let wide: Vec<u16> = path.as_os_str().encode_wide().chain(std::iter::once(0)).collect();
    // SAFETY: `acl` holds `acl_len` bytes, u64-aligned; `sid` is valid; `wide` is NUL-terminated.
    unsafe {
        if InitializeAcl(acl_ptr, acl_len as u32, ACL_REVISION) == 0
            || AddAccessAllowedAceEx(acl_ptr, ACL_REVISION, inherit, FILE_ALL_ACCESS, sid) == 0
        {
            return Err(io::Error::last_os_error());
        }
        let rc = SetNamedSecurityInfoW(
            wide.as_ptr(),
            SE_FILE_OBJECT,
            DACL_SECURITY_INFORMATION | PROTECTED_DACL_SECURITY_INFORMATION,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            acl_ptr,
            std::ptr::null(),
        );
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc as i32));
        }
    }
    Ok(())
}

pub(super) fn set_file_mode(_file: &File, path: &Path, mode: u32, private: bool) -> io::Result<()> {
    set_mode(path, mode, private)
}

pub(super) fn set_mode(path: &Path, _mode: u32, private: bool) -> io::Result<()> {
    // Only "private" has a meaning here; other modes (0644, 0755) are what an inherited ACL gives already.
    if private {
        restrict_to_current_user(path)
    } else {
        Ok(())
    }
}

pub(super) fn mode(_meta: &Metadata) -> Option<u32> {
    None
}

pub(super) fn owner(_meta: &Metadata) -> Option<u32> {
    None
}

pub(super) fn create_dir(path: &Path, mode: u32, private: bool, recursive: bool) -> io::Result<()> {
    let existed = path.is_dir();
    std::fs::DirBuilder::new().recursive(recursive).create(path)?;
    if !existed {
        set_mode(path, mode, private)?;
    }
    Ok(())
}

pub(super) fn create_new_no_follow(path: &Path) -> io::Result<File> {
    // CREATE_NEW fails on any existing name, a link included: nothing is followed.
    std::fs::OpenOptions::new().write(true).create_new(true).open(path)
}

pub(super) fn open_no_follow(path: &Path) -> io::Result<File> {
    // FILE_FLAG_OPEN_REPARSE_POINT opens a link itself, not its target; the caller then sees it is no regular file.
    const FILE_FLAG_OPEN_REPARSE_POINT: u32 = 0x0020_0000;
    std::fs::OpenOptions::new().read(true).custom_flags(FILE_FLAG_OPEN_REPARSE_POINT).open(path)
}

pub(super) fn rename_exchange(_a: &Path, _b: &Path) -> io::Result<()> {
    Err(io::Error::new(io::ErrorKind::Unsupported, "no atomic exchange of two paths on Windows"))
}

pub(super) fn data_bytes(file: &File) -> io::Result<u64> {
    Ok(file.metadata()?.len())
}

pub(super) fn copy_sparse(from: &Path, to: &Path) -> io::Result<u64> {
    std::fs::copy(from, to)
}

pub(super) fn read_exact_at(file: &File, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        match file.seek_read(buf, offset) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "failed to fill whole buffer")),
            Ok(n) => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
pub(super) fn write_all_at(file: &File, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        match file.seek_write(buf, offset) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "failed to write whole buffer")),
            Ok(n) => {
                buf = &buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
pub(super) fn symlink(target: &Path, link: &Path) -> io::Result<()> {
    if target.is_dir() {
        std::os::windows::fs::symlink_dir(target, link)
    } else {
        std::os::windows::fs::symlink_file(target, link)
    }
}

pub(super) fn openssh_path(p: &Path) -> String {
    openssh_path_of(&p.display().to_string())
}

/// [`openssh_path`] on a string (pure, so its tests run anywhere the module compiles).
fn openssh_path_of(s: &str) -> String {
    let s = match s.strip_prefix(r"\\?\UNC\") {
        Some(unc) => format!(r"\\{unc}"),
        None => s.strip_prefix(r"\\?\").unwrap_or(s).to_string(),
    };
    s.replace('\\', "/")
}

pub(super) fn canonicalize(p: &Path) -> std::io::Result<std::path::PathBuf> {
    let c = std::fs::canonicalize(p)?;
    Ok(match c.to_str().and_then(simplified_verbatim) {
        Some(plain) => std::path::PathBuf::from(plain),
        None => c,
    })
}

/// The plain spelling of a verbatim path, when it names the same file (pure, so its tests run anywhere).
fn simplified_verbatim(s: &str) -> Option<String> {
    let (plain, rest) = if let Some(unc) = s.strip_prefix(r"\\?\UNC\") {
        (format!(r"\\{unc}"), unc)
    } else {
        let rest = s.strip_prefix(r"\\?\")?;
        let b = rest.as_bytes();
        if b.len() < 3 || !b[0].is_ascii_alphabetic() || b[1] != b':' || b[2] != b'\\' {
            return None;
        }
        (rest.to_string(), &rest[3..])
    };
    // MAX_PATH is 260 including the terminating NUL.
    if plain.len() >= 260 {
        return None;
    }
    const RESERVED: [&str; 22] = [
        "CON", "PRN", "AUX", "NUL", "COM1", "COM2", "COM3", "COM4", "COM5", "COM6", "COM7", "COM8", "COM9",
        "LPT1", "LPT2", "LPT3", "LPT4", "LPT5", "LPT6", "LPT7", "LPT8", "LPT9",
    ];
    for comp in rest.split('\\').filter(|c| !c.is_empty()) {
        let stem = comp.split('.').next().unwrap_or("").trim_end().to_ascii_uppercase();
        if comp == "."
            || comp == ".."
            || comp.ends_with('.')
            || comp.ends_with(' ')
            || RESERVED.contains(&stem.as_str())
        {
            return None;
        }
        if comp
            .chars()
            .any(|ch| matches!(ch, '/' | '<' | '>' | '"' | '|' | '?' | '*' | ':') || (ch as u32) < 32)
        {
            return None;
        }
    }
    Some(plain)
}

pub(super) fn path_key(p: &Path) -> String {
    p.to_string_lossy().to_lowercase()
}

pub(super) fn mount_table() -> String {
    String::new()
}

pub(super) fn cpuinfo() -> String {
    String::new()
}

// ---------------------------------------------------------------------------------------------------------------
// Network

pub(super) fn unix_socket_alive(_path: &Path) -> bool {
    false
}

pub(super) fn port_holder(_addr: SocketAddr, _tcp: bool) -> Option<(u32, String)> {
    // Unknown: the TCP table (GetExtendedTcpTable) would say; the bind error already names the port.
    None
}

pub(super) fn ipv4_interfaces() -> io::Result<Vec<(String, Ipv4Addr, u8)>> {
    // Unknown: the host-network overlap check is for libvirt's NAT networks, which are Linux-only.
    Ok(Vec::new())
}

#[cfg(test)]
mod tests {
    use super::{openssh_path_of, simplified_verbatim};

    #[test]
    fn verbatim_paths_are_simplified_only_when_the_plain_spelling_is_the_same_file() {
        assert_eq!(simplified_verbatim(r"\\?\C:\Users\A B\lab").as_deref(), Some(r"C:\Users\A B\lab"));
        assert_eq!(simplified_verbatim(r"\\?\UNC\srv\share\lab").as_deref(), Some(r"\\srv\share\lab"));
        assert_eq!(simplified_verbatim(r"C:\lab"), None);
        assert_eq!(simplified_verbatim(r"\\?\C:\lab\nul.txt"), None);
        assert_eq!(simplified_verbatim(r"\\?\C:\lab\trailing."), None);
        assert_eq!(simplified_verbatim(r"\\?\Volume{1}\lab"), None);
        assert_eq!(simplified_verbatim(&format!(r"\\?\C:\{}", "a".repeat(300))), None);
    }

    #[test]
    fn openssh_paths_have_forward_slashes_and_no_verbatim_prefix() {
        assert_eq!(
            openssh_path_of(r"C:\Users\A B\lab\.provisioner\id_ed25519"),
            "C:/Users/A B/lab/.provisioner/id_ed25519"
        );
        assert_eq!(openssh_path_of(r"\\?\C:\Users\A B\lab"), "C:/Users/A B/lab");
        assert_eq!(openssh_path_of(r"\\?\UNC\srv\share\lab"), "//srv/share/lab");
    }
}
