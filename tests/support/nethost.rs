//! A second libvirt host for tests (DESIGN §8): a network namespace reached over a veth pair (10.201.N.1 here,
//! 10.201.N.2 there for a process' first host, .5 and .6 for its second; IPv6 off on both ends), and inside it, under `unshare -m`, tmpfs over /run, /var/lib/libvirt,
//! /var/cache/libvirt, /var/log/libvirt, /tmp, /var/tmp and /root, a copy of /etc/libvirt without networks or
//! domains, and its own virtlogd, libvirtd and sshd (own config, `UsePAM no`, listening on 10.201.N.2 only). Nothing
//! of the local filesystem under those paths is visible there: only the SSH connection is shared.
//!
//! [`NetHost::start`] waits for readiness with deadlines; drop stops every daemon by PID (domains destroyed first),
//! deletes the veth pair and the namespace.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::{wait_until, Proc};

/// The script run inside the namespace: mounts, daemons, then waits on them.
const HOST_SCRIPT: &str = r#"set -e
FIX="$1"
# Opened before the tmpfs mounts hide $FIX: where the host side reads PIDs and logs.
exec 3>"$FIX/pids" 4>"$FIX/virtlogd.log" 5>"$FIX/libvirtd.log" 6>"$FIX/sshd.log"
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /run/fix && cp -a "$FIX"/. /run/fix/
for d in /var/lib/libvirt /var/cache/libvirt /var/log/libvirt /tmp /var/tmp /root; do
  mkdir -p "$d"; mount -t tmpfs -o mode=0755 tmpfs "$d"
done
chmod 1777 /tmp /var/tmp; chmod 0700 /root
mkdir -p /run/fix/etc-libvirt && cp -a /etc/libvirt/. /run/fix/etc-libvirt/
rm -rf /run/fix/etc-libvirt/qemu/networks /run/fix/etc-libvirt/qemu/autostart /run/fix/etc-libvirt/storage
find /run/fix/etc-libvirt/qemu -maxdepth 1 -name '*.xml' -delete
printf 'user = "root"\ngroup = "root"\n' >> /run/fix/etc-libvirt/qemu.conf
mount --bind /run/fix/etc-libvirt /etc/libvirt
# A PATH with what libvirt's ssh transport runs there but no virsh (sshd_config `SetEnv PATH=/run/fix/bin`).
mkdir -p /run/fix/bin && for p in sh which virt-ssh-helper; do ln -s "$(command -v $p)" /run/fix/bin/; done
mkdir -p /run/sshd /run/libvirt /var/lib/libvirt/images /var/lib/libvirt/qemu /var/log/libvirt/qemu /var/cache/libvirt/qemu
/usr/sbin/virtlogd >&4 2>&1 & echo $! >&3
/usr/sbin/libvirtd >&5 2>&1 & echo $! >&3
/usr/sbin/sshd -D -e -f /run/fix/sshd_config >&6 2>&1 & echo $! >&3
exec 3>&-
echo started
wait
"#;

/// A PATH on the host with `sh`, `which` and `virt-ssh-helper` (what libvirt's ssh transport runs) but no `virsh`:
/// `NetHost::start_with("SetEnv PATH=...\n")` makes a host whose logins do not find virsh.
pub const PATH_WITHOUT_VIRSH: &str = "/run/fix/bin";

pub struct NetHost {
    pub ns: String,
    veth: String,
    /// The namespace's address (sshd, libvirt over SSH).
    pub addr: String,
    /// The local end of the veth pair.
    pub local_addr: String,
    /// Fixture files (keys, configs, logs of the script).
    pub dir: tempfile::TempDir,
    /// The root login key for the namespaced sshd (OpenSSH format).
    pub key: PathBuf,
    /// The sshd's host public key line (`ssh-ed25519 AAAA...`).
    pub host_pub: String,
    proc: Option<Proc>,
    pids: Vec<i32>,
}

fn sh(cmd: &str) -> std::process::Output {
    Command::new("sh").arg("-c").arg(cmd).output().expect("run sh")
}

#[track_caller]
fn must(cmd: &str) {
    let out = sh(cmd);
    assert!(out.status.success(), "`{cmd}` failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// Can this machine make the test host (root, ip, unshare, libvirtd, sshd)?
pub fn available() -> bool {
    // SAFETY: geteuid has no preconditions.
    (unsafe { geteuid() } == 0)
        && ["/usr/sbin/libvirtd", "/usr/sbin/virtlogd", "/usr/sbin/sshd", "/usr/bin/virt-ssh-helper"]
            .iter()
            .all(|p| Path::new(p).exists())
}

extern "C" {
    fn geteuid() -> u32;
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

impl NetHost {
    /// Make the namespace and start its daemons; panics (after cleaning up) if it is not ready within a minute.
    pub fn start() -> NetHost {
        Self::start_with("")
    }

    /// [`NetHost::start`] with `sshd_extra` lines first in the sshd's config (the first value of an option wins):
    /// e.g. `AllowTcpForwarding no` for a hardened host.
    pub fn start_with(sshd_extra: &str) -> NetHost {
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let pid = std::process::id();
        // The how-manieth host of this process (a benchmark makes two).
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 64;
        // One /30 per host: 10.201.N.(4 seq)/30 with N from the PID (tests run in their own processes).
        let n = 20 + pid % 200;
        let ns = format!("prov-remote-{pid}-{seq}");
        let veth = format!("vr{seq}x{}", pid % 10_000_000);
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join("id_ed25519");
        must(&format!("ssh-keygen -q -t ed25519 -N '' -f {} -C test-root", key.display()));
        must(&format!("ssh-keygen -q -t ed25519 -N '' -f {}/host_key -C nethost", dir.path().display()));
        std::fs::copy(key.with_extension("pub"), dir.path().join("authorized_keys")).unwrap();
        let host_pub = std::fs::read_to_string(dir.path().join("host_key.pub")).unwrap();
        let host_pub = host_pub.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
        let addr = format!("10.201.{n}.{}", 4 * seq + 2);
        let local_addr = format!("10.201.{n}.{}", 4 * seq + 1);
        std::fs::write(
            dir.path().join("sshd_config"),
            format!(
                "{sshd_extra}ListenAddress {addr}\nPort 22\nHostKey /run/fix/host_key\nAuthorizedKeysFile \
                 /run/fix/authorized_keys\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPidFile /run/sshd.pid\n\
                 AllowTcpForwarding yes\nSubsystem sftp internal-sftp\nMaxStartups 50\nMaxSessions 50\n"
            ),
        )
        .unwrap();
        std::fs::write(dir.path().join("host.sh"), HOST_SCRIPT).unwrap();
        let mut host = NetHost {
            ns: ns.clone(),
            veth: veth.clone(),
            addr: addr.clone(),
            local_addr: local_addr.clone(),
            key,
            host_pub,
            proc: None,
            pids: vec![],
            dir,
        };
        must(&format!("ip netns add {ns}"));
        must(&format!("ip link add {veth} type veth peer name {veth}n"));
        must(&format!("ip link set {veth}n netns {ns}"));
        must(&format!(
            "sysctl -qw net.ipv6.conf.{veth}.disable_ipv6=1 && ip addr add {local_addr}/30 dev {veth} && ip link set \
             {veth} up"
        ));
        must(&format!(
            "ip netns exec {ns} sh -c 'sysctl -qw net.ipv6.conf.{veth}n.disable_ipv6=1; ip link set lo up; ip addr \
             add {addr}/30 dev {veth}n; ip link set {veth}n up'"
        ));
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns, "unshare", "-m", "--propagation", "private", "sh"])
            .arg(host.dir.path().join("host.sh"))
            .arg(host.dir.path());
        host.proc = Some(Proc::spawn("nethost", cmd, host.dir.path().join("host.log")));
        let pids_file = host.dir.path().join("pids");
        host.pids = wait_until(Duration::from_secs(30), "the test host's daemons to start", || {
            let t = std::fs::read_to_string(&pids_file).ok()?;
            let p: Vec<i32> = t.lines().filter_map(|l| l.trim().parse().ok()).collect();
            (p.len() == 3).then_some(p)
        });
        let sock = format!("{addr}:22");
        wait_until(Duration::from_secs(30), "the test host's sshd", || {
            std::net::TcpStream::connect_timeout(&sock.parse().unwrap(), Duration::from_millis(500)).ok()
        });
        wait_until(Duration::from_secs(60), "the test host's libvirtd", || host.virsh(&["version"]).ok());
        host
    }

    /// `known_hosts` line for this host.
    pub fn known_hosts_line(&self) -> String {
        format!("{} {}\n", self.addr, self.host_pub)
    }

    /// A libvirt URI for this host (root, the test key).
    pub fn uri(&self) -> String {
        format!("qemu+ssh://root@{}/system?keyfile={}", self.addr, self.key.display())
    }

    /// virsh on the host itself (in its namespaces, not over SSH): for checks the tool cannot influence.
    pub fn virsh(&self, args: &[&str]) -> Result<String, String> {
        let mut all = vec!["virsh", "-q", "-c", "qemu:///system"];
        all.extend_from_slice(args);
        self.exec(&all)
    }

    /// Take the link to the host down (a lost connection) or up again.
    pub fn link(&self, up: bool) {
        must(&format!("ip link set {} {}", self.veth, if up { "up" } else { "down" }));
        if up {
            must(&format!("ip addr replace {}/30 dev {}", self.local_addr, self.veth));
            let sock = format!("{}:22", self.addr);
            wait_until(Duration::from_secs(30), "the link to the test host", || {
                std::net::TcpStream::connect_timeout(&sock.parse().unwrap(), Duration::from_millis(500)).ok()
            });
        }
    }

    /// Limit what this side sends to the host to `rate` (tc syntax, e.g. "16mbit"), or lift the limit (`None`):
    /// a slow link, so an upload takes seconds.
    pub fn throttle(&self, rate: Option<&str>) {
        match rate {
            Some(r) => must(&format!(
                "tc qdisc replace dev {} root tbf rate {r} burst 32kbit latency 400ms",
                self.veth
            )),
            None => must(&format!("tc qdisc del dev {} root", self.veth)),
        }
    }

    /// The PID of the host's libvirtd (inside its namespaces: `nsenter -t PID -m -n`).
    pub fn libvirtd_pid(&self) -> i32 {
        self.pids[1]
    }

    /// A command on the host itself (its mount and network namespaces).
    pub fn exec(&self, args: &[&str]) -> Result<String, String> {
        let pid = self.pids.get(1).copied().ok_or("no libvirtd")?;
        let out = Command::new("nsenter")
            .args(["-t", &pid.to_string(), "-m", "-n"])
            .args(args)
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// Volume names in `pool` (empty when the pool does not exist).
    pub fn volumes(&self, pool: &str) -> Vec<String> {
        let _ = self.virsh(&["pool-refresh", pool]);
        match self.virsh(&["vol-list", "--pool", pool]) {
            Ok(out) => out
                .lines()
                .filter_map(|l| l.split_whitespace().next().map(str::to_string))
                .filter(|n| n != "Name" && !n.starts_with("---"))
                .collect(),
            Err(_) => vec![],
        }
    }

    /// The bytes this side has sent to the host so far (its end of the veth pair: everything on the wire to it).
    pub fn bytes_sent_to_host(&self) -> u64 {
        let f = format!("/sys/class/net/{}/statistics/tx_bytes", self.veth);
        std::fs::read_to_string(&f).unwrap_or_else(|e| panic!("{f}: {e}")).trim().parse().unwrap()
    }

    /// How many SSH logins the host's sshd accepted so far (its log's `Accepted publickey` lines).
    pub fn sshd_logins(&self) -> usize {
        let log = std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default();
        log.lines().filter(|l| l.contains("Accepted publickey")).count()
    }

    /// The daemons' logs (for a failing test).
    pub fn logs(&self) -> String {
        let mut s = String::new();
        if let Some(p) = &self.proc {
            s.push_str(&p.log_text());
        }
        s
    }

    fn stop(&mut self) {
        // Domains first (QEMU is not in our process group), then the daemons by PID.
        if let Ok(list) = self.virsh(&["list", "--name"]) {
            for d in list.lines().map(str::trim).filter(|d| !d.is_empty()) {
                let _ = self.virsh(&["destroy", d]);
            }
        }
        for pid in self.pids.drain(..) {
            // SAFETY: signalling a PID we started.
            unsafe { libc_kill(pid, 15) };
            let gone = (0..50).any(|_| {
                std::thread::sleep(Duration::from_millis(100));
                !Path::new(&format!("/proc/{pid}")).exists()
                    || std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "))
            });
            if !gone {
                unsafe { libc_kill(pid, 9) };
            }
        }
        drop(self.proc.take());
        let _ = sh(&format!("ip link del {} 2>/dev/null; ip netns del {}", self.veth, self.ns));
    }
}

impl Drop for NetHost {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for f in ["libvirtd.log", "sshd.log"] {
                let text = std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default();
                eprintln!("--- {f}\n{}", super::tail(&text, 30));
            }
        }
        self.stop();
    }
}
