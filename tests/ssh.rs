//! Tests: the SSH transport, `provisioner ssh` and `ssh-config`, against a real OpenSSH server on 127.0.0.1.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use provisioner::keys::{self, KeyPair};
use provisioner::machine::state::MachineState;
use provisioner::machine::StateDir;
use provisioner::process::Cmd;
use provisioner::ssh::{Endpoint, Session};
use sha2::{Digest, Sha256};

use crate::support::{self, Proc};

/// A throwaway sshd on 127.0.0.1:free port, trusting the user key of `state` and presenting its host key.
struct Sshd {
    _dir: tempfile::TempDir,
    proc: Proc,
    port: u16,
    state: StateDir,
    host: KeyPair,
}

fn current_user() -> String {
    let out = Command::new("id").arg("-un").output().expect("id -un");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

impl Sshd {
    /// Start sshd with fresh machine keys in a new temp state dir.
    fn start() -> Sshd {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::at(dir.path().join(".provisioner"));
        Self::start_for(dir, state, "")
    }

    /// Start sshd for the keys in `state` (created if missing); `dir` holds its config and log. `extra` lines go
    /// first in sshd_config (the first value of an option wins; HostKey lines add up in order).
    fn start_for(dir: tempfile::TempDir, state: StateDir, extra: &str) -> Sshd {
        let (user, host) = keys::ensure_machine_keys(&state, "sshtest").unwrap();
        let d = dir.path();
        std::fs::write(d.join("authorized_keys"), format!("{}\n", user.public_openssh)).unwrap();
        std::fs::create_dir_all("/run/sshd").unwrap();
        let port = support::free_port();
        let config = format!(
            "{extra}Port {port}\nListenAddress 127.0.0.1\nHostKey \"{hk}\"\nAuthorizedKeysFile \"{ak}\"\nPidFile \"{pid}\"\n\
             StrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             PubkeyAuthentication yes\nPermitRootLogin prohibit-password\nAllowUsers {me}\nLogLevel VERBOSE\n",
            hk = state.host_key().display(),
            ak = d.join("authorized_keys").display(),
            pid = d.join("sshd.pid").display(),
            me = current_user(),
        );
        std::fs::write(d.join("sshd_config"), config).unwrap();
        let mut cmd = Command::new("/usr/sbin/sshd");
        cmd.args(["-D", "-e", "-f"]).arg(d.join("sshd_config"));
        let proc = Proc::spawn("sshd", cmd, d.join("sshd.log"));
        support::wait_until(Duration::from_secs(10), "sshd to listen", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
        Sshd { _dir: dir, proc, port, state, host }
    }

    fn endpoint(&self) -> Endpoint {
        Endpoint {
            addr: SocketAddr::from(([127, 0, 0, 1], self.port)),
            user: current_user(),
            key: self.state.user_key(),
            host_key: self.host.public_openssh.clone(),
            via: None,
        }
    }

    fn session(&self) -> Session {
        Session::connect(&self.endpoint(), Duration::from_secs(20)).expect("connect to test sshd")
    }
}

const T: Duration = Duration::from_secs(60);

#[test]
fn exec_reports_exit_codes() {
    let sshd = Sshd::start();
    let s = sshd.session();
    assert_eq!(s.exec("true", T).unwrap().status, 0);
    let out = s.exec("echo out; echo err >&2; exit 3", T).unwrap();
    assert_eq!(out.status, 3);
    assert!(out.output.contains("out\n") && out.output.contains("err\n"), "{:?}", out.output);
    assert_eq!(s.exec("exit 255", T).unwrap().status, 255);
    let killed = s.exec("kill -KILL $$", T).unwrap();
    assert_eq!(killed.status, 255, "{killed:?}");
    assert!(killed.output.contains("SIGKILL"), "{killed:?}");
    let err = s.exec_ok("echo nope; exit 4", T).unwrap_err().to_string();
    assert!(err.contains("exit 4") && err.contains("nope"), "{err}");
    // The session stays usable after all of that.
    assert_eq!(s.exec_ok("echo still", T).unwrap(), "still\n");
}

#[test]
fn a_quiet_command_outlives_the_read_slice_and_a_hung_one_hits_the_deadline() {
    let sshd = Sshd::start();
    let s = sshd.session();
    // Silent for longer than one 10 s read slice: the wait resumes (with a keepalive) instead of failing.
    let out = s.exec("sleep 12; echo woke", Duration::from_secs(40)).unwrap();
    assert_eq!((out.status, out.output.as_str()), (0, "woke\n"));
    let start = Instant::now();
    let err = s.exec("echo started; sleep 60", Duration::from_secs(3)).unwrap_err();
    let msg = format!("{err:#}");
    // Far below the command's 60 s: the 3 s deadline was kept (the margin absorbs a loaded 2-core host).
    assert!(start.elapsed() < Duration::from_secs(15), "deadline not kept: {:?}", start.elapsed());
    assert!(
        msg.contains("did not finish within 3s") && msg.contains("started") && msg.contains("hint:"),
        "{msg}"
    );
}

#[test]
fn ten_megabytes_on_stderr_do_not_deadlock() {
    let sshd = Sshd::start();
    let s = sshd.session();
    let start = Instant::now();
    let out = s
        .exec(
            "head -c 10000000 /dev/zero | tr '\\0' x | fold -w 99 >&2; echo small-stdout",
            Duration::from_secs(120),
        )
        .unwrap();
    assert_eq!(out.status, 0);
    // stdout and stderr travel in separate pipes in the guest, so only each stream's own order is defined
    // (the stdout line may even land inside a stderr line).
    assert_eq!(out.output.bytes().filter(|&b| b == b'x').count(), 10_000_000);
    assert_eq!(out.output.matches("small-stdout\n").count(), 1, "stdout line lost");
    eprintln!("bench: 10 MB merged stderr in {:.2?}", start.elapsed());
}

#[test]
fn lines_stream_in_order_as_they_arrive() {
    let sshd = Sshd::start();
    let s = sshd.session();
    let start = Instant::now();
    let mut seen: Vec<(String, Duration)> = Vec::new();
    let out = s
        .exec_stream("for i in $(seq 1 300); do echo line $i; done; sleep 2; printf 'last'", T, &mut |l| {
            seen.push((l.to_string(), start.elapsed()))
        })
        .unwrap();
    assert_eq!(out.status, 0);
    let lines: Vec<&str> = seen.iter().map(|(l, _)| l.as_str()).collect();
    let expected: Vec<String> = (1..=300).map(|i| format!("line {i}")).chain(["last".to_string()]).collect();
    assert_eq!(lines, expected);
    // Streamed, not collected at the end: the 300th line arrived well before the final one.
    let gap = seen[300].1 - seen[299].1;
    assert!(gap >= Duration::from_millis(1500), "lines were not streamed (gap {gap:?})");
}

#[test]
fn exec_with_stdin_streams_input() {
    let sshd = Sshd::start();
    let s = sshd.session();
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let out = s.exec_with_stdin("sha256sum", &mut data.as_slice(), T).unwrap();
    assert_eq!(out.status, 0);
    assert!(out.output.starts_with(&hex::encode(Sha256::digest(&data))), "{}", out.output);
}

/// Deterministic pseudo-random bytes (xorshift), so the big file does not compress or repeat.
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        v.extend_from_slice(&seed.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// sha256 and permission bits of every file under `root`, keyed by relative path.
fn manifest(root: &Path) -> std::collections::BTreeMap<PathBuf, (String, u32)> {
    use std::os::unix::fs::PermissionsExt;
    walkdir::WalkDir::new(root)
        .into_iter()
        .map(Result::unwrap)
        .filter(|e| e.file_type().is_file())
        .map(|e| {
            let data = std::fs::read(e.path()).unwrap();
            let mode = e.metadata().unwrap().permissions().mode() & 0o7777;
            (e.path().strip_prefix(root).unwrap().to_path_buf(), (hex::encode(Sha256::digest(&data)), mode))
        })
        .collect()
}

/// `prefetch`: the commands run at once (concurrently) in one exec; each is then served once (a command listed twice,
/// twice), with the status and output its own exec gives, without running again; any other command drops what is
/// held.
#[test]
fn prefetched_commands_run_together_once_and_are_served_until_another_command_runs() {
    for sshd in [Sshd::start(), sshd_with_sudo()] {
        let s = sshd.session();
        let dir = tempfile::tempdir().unwrap();
        let (runs, met) = (dir.path().join("runs"), dir.path().join("met"));
        let (runs, met) = (runs.display(), met.display());
        // `wait` sees the file `touch` makes only when both run at the same time (in order, it would give up).
        let wait = format!(
            "echo wait >> {runs}; i=0; while [ ! -e {met} ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done; \
             [ -e {met} ] && echo met || echo alone"
        );
        let touch = format!("echo touch >> {runs}; touch {met}; printf 'out\\n\\t\\303\\277 last'; exit 3");
        let plain = "printf 'x\\ny\\n'; echo e >&2; exit 5".to_string();
        let direct = s.exec(&plain, T).unwrap();
        // `wait` is listed twice: it runs once and is held for two execs.
        assert_eq!(s.prefetch(&[wait.clone(), touch.clone(), plain.clone(), wait.clone()], T), 4);
        let count = |what: &str| {
            std::fs::read_to_string(dir.path().join("runs")).unwrap().lines().filter(|l| *l == what).count()
        };
        assert_eq!((count("wait"), count("touch")), (1, 1), "each ran once, duplicates included");
        let served = s.exec(&plain, T).unwrap();
        assert_eq!((served.status, served.output.as_str()), (direct.status, direct.output.as_str()));
        assert_eq!(s.exec_ok(&wait, T).unwrap(), "met\n", "the commands ran concurrently");
        assert_eq!(s.exec_ok(&wait, T).unwrap(), "met\n", "listed twice: served twice");
        assert_eq!(count("wait"), 1, "served twice without running again");
        let t = s.exec(&touch, T).unwrap();
        assert_eq!((t.status, t.output.as_str()), (3, "out\n\tÿ last"));
        assert_eq!((count("wait"), count("touch")), (1, 1), "served without running again");
        // Served once: a second exec runs the command.
        s.exec(&touch, T).unwrap();
        assert_eq!(count("touch"), 2);
        // Another command drops every prefetched result.
        assert_eq!(s.prefetch(std::slice::from_ref(&touch), T), 1);
        s.exec_ok("true", T).unwrap();
        s.exec(&touch, T).unwrap();
        assert_eq!(count("touch"), 4, "prefetched once, then run again after another command");
        // One command runs as it is, not inside the batch (whose shell is named `root` or `user`).
        let zero = "echo \"$0\"".to_string();
        assert_eq!(s.prefetch(std::slice::from_ref(&zero), T), 1);
        let served = s.exec_ok(&zero, T).unwrap();
        assert!(!matches!(served.trim(), "root" | "user") && !served.trim().is_empty(), "{served}");
    }
}

#[test]
fn a_started_command_runs_while_the_session_does_other_work_and_is_collected_after() {
    let sshd = Sshd::start();
    let s = sshd.session();
    let dir = tempfile::tempdir().unwrap();
    let flag = dir.path().join("flag");
    let flag = flag.display();
    // It waits (up to 10 s) for a file that only a later command of the same session makes.
    let run = s
        .start(
            &format!(
                "i=0; while [ ! -e {flag} ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done; \
                 [ -e {flag} ] && echo saw it; exit 7"
            ),
            T,
        )
        .unwrap();
    s.exec_ok(&format!("touch {flag}"), T).unwrap();
    let out = run.finish().unwrap();
    assert_eq!((out.status, out.output.as_str()), (7, "saw it\n"));
    assert_eq!(s.exec_ok("echo still", T).unwrap(), "still\n");
}

/// A unix socket in `dir` answering each GET with a chunked body naming its path and the connection's number
/// (from 1), one request per connection, as dockerd does with `Connection: close`. Returns its path and the
/// request lines it was sent, in order.
fn http_socket(dir: &Path) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::{BufRead, BufReader, Write};
    let path = dir.join("api.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let request = line.trim_end().to_string();
            while line != "\r\n" && !line.is_empty() {
                line.clear();
                reader.read_line(&mut line).unwrap();
            }
            let n = {
                let mut seen = log.lock().unwrap();
                seen.push(request.clone());
                seen.len()
            };
            let path = request.split(' ').nth(1).unwrap_or_default();
            let body = format!("{{\"path\":\"{path}\",\"n\":{n}}}");
            let (a, b) = body.split_at(body.len() / 2);
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n\
                 {:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
                a.len(),
                b.len()
            );
        }
    });
    (path.display().to_string(), seen)
}

#[test]
fn a_guest_socket_is_read_through_the_connection_and_a_refused_one_says_so_once() {
    let sshd = Sshd::start();
    let s = sshd.session();
    let dir = tempfile::tempdir().unwrap();
    let (socket, seen) = http_socket(dir.path());
    let body = |r: &provisioner::ssh::HttpResponse| String::from_utf8(r.body.clone()).unwrap();
    let paths = ["/a?x=%7B%7D".to_string(), "/b".to_string()];
    let got = s.socket_get(&socket, &paths, T).unwrap().expect("the socket is reachable");
    assert_eq!(got.iter().map(|r| r.status).collect::<Vec<_>>(), [200, 200]);
    assert!(body(&got[0]).starts_with(r#"{"path":"/a?x=%7B%7D","#), "{}", body(&got[0]));
    assert!(body(&got[1]).starts_with(r#"{"path":"/b","#), "{}", body(&got[1]));
    assert_eq!(seen.lock().unwrap()[..2], ["GET /a?x=%7B%7D HTTP/1.1", "GET /b HTTP/1.1"]);

    // Sent ahead: a batch of commands (they only read) keeps it; it is served twice, asked once.
    assert!(s.prefetch_get(&socket, "/c", 2));
    assert_eq!(s.prefetch(&["true".to_string()], T), 1);
    s.exec_ok("true", T).unwrap();
    let first = s.socket_get(&socket, &["/c".to_string()], T).unwrap().unwrap();
    let second = s.socket_get(&socket, &["/c".to_string()], T).unwrap().unwrap();
    assert_eq!(
        (body(&first[0]), body(&second[0])),
        (r#"{"path":"/c","n":3}"#.into(), r#"{"path":"/c","n":3}"#.into())
    );
    assert_eq!(seen.lock().unwrap().len(), 3, "served twice, asked once");
    // A command that was not prefetched may change the answer: the one sent ahead is dropped and asked again.
    assert!(s.prefetch_get(&socket, "/c", 1));
    s.exec_ok("true", T).unwrap();
    let again = s.socket_get(&socket, &["/c".to_string()], T).unwrap().unwrap();
    assert_eq!(body(&again[0]), r#"{"path":"/c","n":5}"#);

    // No such socket: refused at the channel's opening, remembered, and the session stays usable.
    let missing = dir.path().join("none.sock").display().to_string();
    assert!(s.socket_get(&missing, &paths, T).unwrap().is_none());
    assert!(!s.prefetch_get(&missing, "/a", 1));
    assert_eq!(s.exec_ok("echo still", T).unwrap(), "still\n");

    // An sshd that forbids socket forwarding (a hardened guest) refuses it the same way.
    let hardened_dir = tempfile::tempdir().unwrap();
    let state = StateDir::at(hardened_dir.path().join(".provisioner"));
    let hardened = Sshd::start_for(hardened_dir, state, "AllowStreamLocalForwarding no\n");
    let h = hardened.session();
    assert!(h.socket_get(&socket, &paths, T).unwrap().is_none());
    assert_eq!(seen.lock().unwrap().len(), 5, "nothing reached the socket");
    assert_eq!(h.exec_ok("echo usable", T).unwrap(), "usable\n");
}

/// An sshd whose sessions find a `sudo` that runs its command as is (the test user is the one the files belong
/// to): the guest upload runs `sudo -n tar ...` as in a real guest.
fn sshd_with_sudo() -> Sshd {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let sudo = bin.join("sudo");
    std::fs::write(&sudo, "#!/bin/sh\nwhile [ \"${1#-}\" != \"$1\" ]; do shift; done\nexec \"$@\"\n")
        .unwrap();
    std::fs::set_permissions(&sudo, std::fs::Permissions::from_mode(0o755)).unwrap();
    let state = StateDir::at(dir.path().join(".provisioner"));
    let extra = format!("SetEnv PATH={}:/usr/local/bin:/usr/bin:/bin\n", bin.display());
    Sshd::start_for(dir, state, &extra)
}

/// A tree as the upload sends it: every file under `root`, with its bytes and permission bits.
fn tree_of(root: &Path) -> provisioner::render::Rendered {
    use std::os::unix::fs::PermissionsExt;
    let mut files: Vec<provisioner::render::RenderedFile> = walkdir::WalkDir::new(root)
        .into_iter()
        .map(Result::unwrap)
        .filter(|e| e.file_type().is_file())
        .map(|e| provisioner::render::RenderedFile {
            path: e.path().strip_prefix(root).unwrap().to_string_lossy().into_owned(),
            contents: std::fs::read(e.path()).unwrap(),
            mode: e.metadata().unwrap().permissions().mode() & 0o7777,
        })
        .collect();
    files.sort_by(|a, b| a.path.cmp(&b.path));
    provisioner::render::Rendered { files }
}

/// Send all of `tree` (as to an empty guest) into `dest` with the one tar upload the tool has.
fn upload_all(s: &Session, dest: &str, tree: &provisioner::render::Rendered) -> anyhow::Result<usize> {
    use provisioner::guest::upload::{apply, diff, Manifest};
    apply(s, dest, tree, &diff(&Manifest::default(), &Manifest::of(tree)))
}

#[test]
fn upload_is_byte_identical_and_keeps_modes() {
    use std::os::unix::fs::PermissionsExt;
    let sshd = sshd_with_sudo();
    let s = sshd.session();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let modes = [0o644, 0o755, 0o600, 0o640];
    for i in 0..2000usize {
        let p = src.join(format!("d{}/sub{}/file-{i}.txt", i % 20, i % 3));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, noise(i % 700, i as u64 + 1)).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(modes[i % modes.len()])).unwrap();
    }
    const BIG: usize = 32 << 20;
    std::fs::write(src.join("big.bin"), noise(BIG, 42)).unwrap();
    let total: u64 =
        walkdir::WalkDir::new(&src).into_iter().map(|e| e.unwrap().metadata().unwrap().len()).sum();

    let dest = tmp.path().join("remote dir/with 'quotes'");
    let tree = tree_of(&src);
    let start = Instant::now();
    upload_all(&s, dest.to_str().unwrap(), &tree).unwrap();
    let took = start.elapsed();
    eprintln!(
        "bench: upload 2001 files, {:.1} MiB in {took:.2?}: {:.0} files/s, {:.1} MiB/s",
        total as f64 / 1048576.0,
        2001.0 / took.as_secs_f64(),
        total as f64 / 1048576.0 / took.as_secs_f64()
    );
    let (want, got) = (manifest(&src), manifest(&dest));
    assert_eq!(want.len(), 2001);
    assert_eq!(want, got, "uploaded tree differs");
}

#[test]
fn upload_writes_one_file_with_mode() {
    use std::os::unix::fs::PermissionsExt;
    let sshd = sshd_with_sudo();
    let s = sshd.session();
    let tmp = tempfile::tempdir().unwrap();
    let one = |data: &[u8], mode: u32| provisioner::render::Rendered {
        files: vec![provisioner::render::RenderedFile {
            path: "dir/secret.env".into(),
            contents: data.to_vec(),
            mode,
        }],
    };
    let dest = tmp.path().join("new");
    let target = dest.join("dir/secret.env");
    upload_all(&s, dest.to_str().unwrap(), &one(b"TOKEN=1\n", 0o600)).unwrap();
    assert_eq!(std::fs::read(&target).unwrap(), b"TOKEN=1\n");
    assert_eq!(std::fs::metadata(&target).unwrap().permissions().mode() & 0o777, 0o600);
    // Replacing works too, and a failing extraction is an error that says what happened.
    upload_all(&s, dest.to_str().unwrap(), &one(b"TOKEN=2\n", 0o644)).unwrap();
    assert_eq!(std::fs::read(&target).unwrap(), b"TOKEN=2\n");
    assert_eq!(std::fs::metadata(&target).unwrap().permissions().mode() & 0o777, 0o644);
    std::fs::write(tmp.path().join("file"), "x").unwrap();
    let err = upload_all(&s, tmp.path().join("file/below").to_str().unwrap(), &one(b"y", 0o644)).unwrap_err();
    assert!(format!("{err:#}").contains("failed"), "{err:#}");
}

#[test]
fn different_host_key_is_refused_before_authenticating() {
    let sshd = Sshd::start();
    let mut ep = sshd.endpoint();
    let other = keys::generate("impostor").unwrap();
    ep.host_key = other.public_openssh.clone();
    let start = Instant::now();
    let err = Session::connect(&ep, Duration::from_secs(30)).err().expect("mismatch must be refused");
    let msg = format!("{err:#}");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "a mismatch must not be retried ({:?})",
        start.elapsed()
    );
    assert!(msg.contains("HOST KEY MISMATCH"), "{msg}");
    assert!(msg.contains(&sshd.host.fingerprint().unwrap()), "presented fingerprint missing: {msg}");
    assert!(msg.contains(&other.fingerprint().unwrap()), "pinned fingerprint missing: {msg}");
    assert!(msg.contains("provisioner destroy -f && provisioner up"), "{msg}");
    // The server saw no authentication attempt at all.
    let log = support::wait_until(Duration::from_secs(5), "sshd to log the closed connection", || {
        let log = sshd.proc.log_text();
        log.contains("preauth").then_some(log)
    });
    assert!(
        !log.contains("Accepted") && !log.contains("Failed publickey") && !log.contains("userauth"),
        "{log}"
    );
    // The pinned key still works on the same server.
    assert_eq!(sshd.session().exec("true", T).unwrap().status, 0);
}

#[test]
fn the_pinned_key_is_requested_when_the_server_has_several() {
    // A box whose old host keys survived: sshd offers ECDSA first, which libssh2 would otherwise prefer.
    let dir = tempfile::tempdir().unwrap();
    let ecdsa = dir.path().join("ssh_host_ecdsa_key");
    Cmd::new("ssh-keygen").args(["-q", "-t", "ecdsa", "-N", "", "-f"]).arg(&ecdsa).run().unwrap();
    let extra = format!("HostKey \"{}\"\n", ecdsa.display());
    let state = StateDir::at(dir.path().join(".provisioner"));
    let sshd = Sshd::start_for(dir, state, &extra);
    assert_eq!(sshd.session().exec("true", T).unwrap().status, 0);
}

#[test]
fn wrong_user_key_is_permission_denied_with_a_hint() {
    let sshd = Sshd::start();
    let mut ep = sshd.endpoint();
    let tmp = tempfile::tempdir().unwrap();
    keys::ensure_machine_keys(&StateDir::at(tmp.path()), "other").unwrap();
    ep.key = StateDir::at(tmp.path()).user_key();
    let err = Session::connect(&ep, Duration::from_secs(60)).err().expect("unknown key must be refused");
    let msg = format!("{err:#}");
    assert!(msg.contains("SSH authentication failed") && msg.contains("hint:"), "{msg}");
}

#[test]
fn closed_port_is_retried_until_the_deadline() {
    let ep = Endpoint {
        addr: SocketAddr::from(([127, 0, 0, 1], support::free_port())),
        user: current_user(),
        key: PathBuf::from("/nonexistent"),
        host_key: keys::generate("h").unwrap().public_openssh,
        via: None,
    };
    let start = Instant::now();
    let err = Session::connect(&ep, Duration::from_secs(3)).err().expect("nothing listens there");
    let took = start.elapsed();
    let msg = format!("{err:#}");
    assert!(
        took >= Duration::from_millis(2500) && took < Duration::from_secs(8),
        "gave up after {took:?}: {msg}"
    );
    assert!(msg.contains("no SSH connection to") && msg.contains("attempts"), "{msg}");
    assert!(msg.to_lowercase().contains("refused"), "last error missing: {msg}");
}

/// A project dir (path with a space) whose state points at a fresh test sshd, as `provisioner up` leaves it.
fn project_with_sshd() -> (support::Test, PathBuf, Sshd) {
    project_with_sshd_in("my lab")
}

/// [`project_with_sshd`] in a project directory of the given name.
fn project_with_sshd_in(dir_name: &str) -> (support::Test, PathBuf, Sshd) {
    let t = support::Test::new();
    let project = t.path().join(dir_name);
    std::fs::create_dir_all(&project).unwrap();
    let config = std::fs::read_to_string(support::repo().join("box-config.toml"))
        .unwrap()
        .replace("user = \"provisioner\"", &format!("user = \"{}\"", current_user()));
    std::fs::write(project.join("box-config.toml"), config).unwrap();
    support::copy_dir(&support::repo().join("provision"), &project.join("provision"));
    let state = StateDir::at(project.join(".provisioner"));
    let sshd = Sshd::start_for(tempfile::tempdir().unwrap(), state.clone(), "");
    let ms = MachineState {
        provider: "libvirt".into(),
        vm_name: "sshtest".into(),
        ssh_host: Some("127.0.0.1".into()),
        ssh_port: Some(sshd.port),
        ..Default::default()
    };
    ms.save(&state).unwrap();
    (t, project, sshd)
}

#[test]
fn provisioner_ssh_runs_a_command_and_exits_with_its_status() {
    let (_t, project, _sshd) = project_with_sshd();
    let cfg = project.join("box-config.toml");
    let run = support::Test::new()
        .cwd(&project)
        .env("PROVISIONER_SSH_REUSE", "0")
        .args(["ssh", "-c", "echo hi; exit 7"])
        .run();
    assert_eq!(run.code(), Some(7), "stdout {:?} stderr {:?}", run.stdout(), run.stderr());
    assert_eq!(run.stdout(), "hi\n");
    // The client's command line (-v prints it) pins the key the same way as ssh-config.
    let run = support::Test::new()
        .cwd(&project)
        .env("PROVISIONER_SSH_REUSE", "0")
        .args(["-v", "ssh", "-c", "true"])
        .run()
        .success();
    assert!(run.stderr().contains("\"GlobalKnownHostsFile=/dev/null\""), "{}", run.stderr());
    // `--` keeps each word one argument in the guest.
    support::Test::new()
        .env("PROVISIONER_SSH_REUSE", "0")
        .args(["--config", cfg.to_str().unwrap(), "ssh", "--", "printf", "<%s>", "a b", "c"])
        .run()
        .success()
        .stdout_contains("<a b><c>");
}

/// Logins the test sshd accepted so far (one per TCP connection + authentication).
fn logins(sshd: &Sshd) -> usize {
    sshd.proc.log_text().matches("Accepted publickey").count()
}

/// `ssh -O CMD` against a control socket: (exit ok, stderr).
fn control(socket: &Path, cmd: &str) -> (bool, String) {
    let out = Command::new("ssh")
        .args(["-F", "none", "-o"])
        .arg(format!("ControlPath=\"{}\"", socket.display()))
        .args(["-O", cmd, "machine"])
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Stops the master on `socket` when the test ends, however it ends.
struct Master(PathBuf);

impl Drop for Master {
    fn drop(&mut self) {
        if self.0.exists() {
            control(&self.0, "exit");
        }
    }
}

/// Through a live master, `ssh -c` opens its session in-process (OpenSSH's mux protocol, our stdin, stdout and
/// stderr handed to the master): it runs with no `ssh` on PATH, on the master's one login, and keeps the command's
/// exit status, its two streams apart, and what it reads on stdin.
#[test]
fn provisioner_ssh_through_a_live_master_starts_no_ssh_process() {
    let (_t, project, sshd) = project_with_sshd();
    let socket = project.join(".provisioner/ssh-control");
    let _master = Master(socket.clone());
    let ssh = |path: &str, cmd: &str, stdin: &str| {
        support::Test::new()
            .cwd(&project)
            .env("PROVISIONER_SSH_REUSE", "1")
            .env("PATH", path)
            .stdin(stdin)
            .args(["ssh", "-c", cmd])
            .run()
    };
    let path = std::env::var("PATH").unwrap();
    // The first call finds no master: `ssh` runs, and leaves one.
    ssh(&path, "true", "").success();
    assert!(control(&socket, "check").0, "no master after the first call");
    let no_ssh = tempfile::tempdir().unwrap();
    let bare = no_ssh.path().display().to_string();
    let run = ssh(&bare, "echo out; echo err >&2; cat; exit 7", "from stdin\n");
    assert_eq!(run.code(), Some(7), "stdout {:?} stderr {:?}", run.stdout(), run.stderr());
    assert_eq!(run.stdout(), "out\nfrom stdin\n");
    assert_eq!(run.stderr(), "err\n");
    // `--` words, quoted for the guest's shell, through the same path.
    support::Test::new()
        .cwd(&project)
        .env("PROVISIONER_SSH_REUSE", "1")
        .env("PATH", &bare)
        .args(["ssh", "--", "printf", "<%s>", "a b", "c"])
        .run()
        .success()
        .stdout_contains("<a b><c>");
    assert_eq!(logins(&sshd), 1, "a call through the master logged in again:\n{}", sshd.proc.log_text());
    // Without a master (closed), no `ssh` on PATH is the clear error it was, not a hang.
    assert!(control(&socket, "exit").0);
    support::wait_until(Duration::from_secs(10), "the master to remove its socket", || {
        (!socket.exists()).then_some(())
    });
    ssh(&bare, "true", "").failure().stderr_contains("the OpenSSH client `ssh` is not on PATH");
}

#[test]
fn provisioner_ssh_reuses_one_connection_and_can_opt_out() {
    let (_t, project, sshd) = project_with_sshd();
    let socket = project.join(".provisioner/ssh-control");
    let _master = Master(socket.clone());
    let ssh = |env: &[(&str, &str)]| {
        let mut t = support::Test::new()
            .cwd(&project)
            .env("PROVISIONER_SSH_REUSE", "1")
            .args(["ssh", "-c", "echo hi"]);
        for (k, v) in env {
            t = t.env(k, *v);
        }
        t.run().success().stdout_contains("hi");
    };
    ssh(&[]);
    assert_eq!(logins(&sshd), 1);
    assert!(socket.exists(), "no control socket at {}", socket.display());
    let (ok, msg) = control(&socket, "check");
    assert!(ok && msg.contains("Master running"), "{msg}");
    // The second call is a channel on the master's connection: no new login.
    ssh(&[]);
    ssh(&[]);
    assert_eq!(logins(&sshd), 1, "a second `ssh -c` logged in again:\n{}", sshd.proc.log_text());
    // Opted out, every call logs in on its own, whatever master exists.
    ssh(&[("PROVISIONER_SSH_REUSE", "0")]);
    assert_eq!(logins(&sshd), 2);
    let (ok, msg) = control(&socket, "exit");
    assert!(ok, "{msg}");
    support::wait_until(Duration::from_secs(10), "the master to remove its socket", || {
        (!socket.exists()).then_some(())
    });
    // Off in the config (and no override in the environment): no socket, new logins.
    let cfg = project.join("box-config.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("[ssh]\n", "[ssh]\nreuse_connection = false\n")).unwrap();
    ssh(&[("PROVISIONER_SSH_REUSE", "")]);
    assert_eq!(logins(&sshd), 3);
    assert!(!socket.exists());
}

#[test]
fn a_state_dir_too_long_for_a_socket_puts_it_in_a_private_runtime_dir() {
    use std::os::unix::fs::PermissionsExt;
    let (_t, project, sshd) =
        project_with_sshd_in("a-project-directory-whose-path-is-far-too-long-for-a-unix-socket-address-x");
    let runtime = tempfile::tempdir().unwrap();
    let run = || {
        support::Test::new()
            .cwd(&project)
            .env("XDG_RUNTIME_DIR", runtime.path().to_str().unwrap())
            .env("PROVISIONER_SSH_REUSE", "1")
            .args(["ssh", "-c", "true"])
            .run()
            .success();
    };
    run();
    run();
    assert_eq!(logins(&sshd), 1);
    let dir = runtime.path().join("provisioner");
    assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
    let sockets: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.path()).collect();
    let _masters: Vec<Master> = sockets.iter().cloned().map(Master).collect();
    assert_eq!(sockets.len(), 1, "{sockets:?}");
    assert!(!project.join(".provisioner/ssh-control").exists());
    let (ok, msg) = control(&sockets[0], "exit");
    assert!(ok, "{msg}");
}

#[test]
fn provisioner_ssh_without_state_says_to_run_up() {
    let t = support::Test::with_lab();
    t.arg("ssh").arg("-c").arg("true").run().failure().stderr_contains("not created; run `provisioner up`");
}

#[test]
fn provisioner_ssh_to_a_stopped_machine_says_so() {
    let (_t, project, sshd) = project_with_sshd();
    let port = sshd.port;
    drop(sshd);
    support::Test::new()
        .cwd(&project)
        .args(["ssh", "-c", "true"])
        .run()
        .failure()
        .stderr_contains(&format!("not reachable over SSH at 127.0.0.1:{port}"))
        .stderr_contains("provisioner up");
}

#[test]
fn ssh_config_stanza_parses_and_connects() {
    let (t, project, sshd) = project_with_sshd();
    let _master = Master(project.join(".provisioner/ssh-control"));
    let run = support::Test::new()
        .cwd(&project)
        .env("PROVISIONER_SSH_REUSE", "1")
        .args(["ssh-config", "--host", "labvm"])
        .run()
        .success();
    let file = t.path().join("ssh_config");
    std::fs::write(&file, run.stdout()).unwrap();
    let g = Command::new("ssh").arg("-G").arg("-F").arg(&file).arg("labvm").output().unwrap();
    assert!(g.status.success(), "{}", String::from_utf8_lossy(&g.stderr));
    let g = String::from_utf8_lossy(&g.stdout).to_string();
    for want in [
        format!("port {}", sshd.port),
        "hostname 127.0.0.1".to_string(),
        format!("user {}", current_user()),
        "stricthostkeychecking true".to_string(),
        format!("identityfile {}", project.join(".provisioner/id_ed25519").display()),
        format!("userknownhostsfile {}", project.join(".provisioner/known_hosts").display()),
        // Only the pinned key counts: no system-wide known_hosts file may vouch for this address.
        "globalknownhostsfile /dev/null".to_string(),
        "controlmaster auto".to_string(),
        format!("controlpath {}", project.join(".provisioner/ssh-control").display()),
        "controlpersist 600".to_string(),
    ] {
        assert!(g.contains(&want), "ssh -G lacks {want:?}:\n{g}");
    }
    let out = Cmd::new("ssh")
        .args(["-F".as_ref(), file.as_os_str(), "labvm".as_ref(), "echo connected".as_ref()])
        .timeout(Duration::from_secs(30))
        .run()
        .unwrap();
    assert_eq!(out.stdout, "connected\n");
    let (ok, msg) = control(&project.join(".provisioner/ssh-control"), "exit");
    assert!(ok, "the stanza's connection left no master: {msg}");
}

// `[box] keys = "insecure-once"`: the one login with Vagrant's published insecure key.

/// A box that follows Vagrant's contract (its authorized_keys holds both published insecure keys, the last line
/// without a newline: hashicorp/vagrant#8362): the first login tries each user in turn (sshd allows no change of
/// user within one connection), logs in with the ed25519 key, and accepts the box's own host key for that session.
#[test]
fn the_first_login_uses_vagrants_insecure_key_and_accepts_the_box_host_key_once() {
    use provisioner::boxes::inject::{VAGRANT_INSECURE_ED25519, VAGRANT_INSECURE_RSA};
    use provisioner::lifecycle::insecure_once::INSECURE_KEYS;
    let sshd = Sshd::start();
    std::fs::write(
        sshd._dir.path().join("authorized_keys"),
        format!("{VAGRANT_INSECURE_RSA}\n{VAGRANT_INSECURE_ED25519}"),
    )
    .unwrap();
    let addr = SocketAddr::from(([127, 0, 0, 1], sshd.port));
    let pinned = keys::generate("the machine's new host key").unwrap();
    let users = vec!["nosuchuser".to_string(), current_user()];
    let login = Session::connect_first_login(addr, &users, &INSECURE_KEYS, &pinned.public_openssh, T)
        .unwrap()
        .expect("the box's own host key is not the pinned one");
    assert_eq!(login.user, current_user());
    assert_eq!(login.key, "Vagrant's insecure ed25519 key");
    assert_eq!(login.host_fingerprint, sshd.host.fingerprint().unwrap());
    assert_eq!(login.session.exec_ok("echo in", T).unwrap(), "in\n");
    // Nothing about the box's host key was written down.
    assert!(!sshd.state.root.join("known_hosts").exists());

    // With only the RSA key in authorized_keys, the RSA key logs in (an older box).
    std::fs::write(sshd._dir.path().join("authorized_keys"), VAGRANT_INSECURE_RSA).unwrap();
    let login = Session::connect_first_login(addr, &users[1..], &INSECURE_KEYS, &pinned.public_openssh, T)
        .unwrap()
        .unwrap();
    assert_eq!(login.key, "Vagrant's insecure RSA key");
}

/// A guest that already presents the pinned host key had its keys replaced by an earlier run: no insecure key is
/// offered to it at all.
#[test]
fn no_insecure_key_is_offered_to_a_guest_presenting_the_pinned_host_key() {
    use provisioner::lifecycle::insecure_once::INSECURE_KEYS;
    let sshd = Sshd::start();
    let addr = SocketAddr::from(([127, 0, 0, 1], sshd.port));
    let login =
        Session::connect_first_login(addr, &[current_user()], &INSECURE_KEYS, &sshd.host.public_openssh, T)
            .unwrap();
    assert!(login.is_none());
    let log = support::wait_until(Duration::from_secs(10), "sshd to log the closed connection", || {
        let log = sshd.proc.log_text();
        (log.contains("Connection closed") || log.contains("Disconnected")).then_some(log)
    });
    // sshd logs every key offered at LogLevel VERBOSE ("Failed publickey for ...").
    assert!(!log.contains("publickey"), "a key was offered:\n{log}");
}

/// A box that does not take the insecure key is refused with what to do; an address that is not loopback is
/// refused before any packet is sent.
#[test]
fn the_first_login_is_refused_off_loopback_and_says_when_the_box_takes_no_insecure_key() {
    use provisioner::lifecycle::insecure_once::INSECURE_KEYS;
    let sshd = Sshd::start(); // authorized_keys: the machine key only
    let pinned = keys::generate("h").unwrap();
    let addr = SocketAddr::from(([127, 0, 0, 1], sshd.port));
    let started = Instant::now();
    let e = Session::connect_first_login(addr, &[current_user()], &INSECURE_KEYS, &pinned.public_openssh, T)
        .err()
        .expect("the insecure key logged in");
    let e = format!("{e:#}");
    assert!(e.contains("did not accept Vagrant's insecure key"), "{e}");
    assert!(
        e.contains("hint: keys = \"insecure-once\" needs a box that follows Vagrant's box contract"),
        "{e}"
    );
    assert!(started.elapsed() < Duration::from_secs(20), "{:?}", started.elapsed());

    let started = Instant::now();
    let far = SocketAddr::from(([192, 0, 2, 1], 22));
    let e = Session::connect_first_login(far, &[current_user()], &INSECURE_KEYS, &pinned.public_openssh, T)
        .err()
        .expect("a login off loopback was tried");
    let e = format!("{e:#}");
    assert!(e.contains("only a loopback address (127.0.0.1) is allowed"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(1));
}
