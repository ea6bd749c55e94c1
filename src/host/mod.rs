//! The host a machine's VM runs on: this machine ([`Host::Local`]), or a remote libvirt host reached over SSH
//! ([`Host::Remote`]). A host owns what reaching it means: its known_hosts pin and the one OpenSSH master
//! connection to it that virsh and the guest's ProxyCommand share ([`remote`]), the ssh2 session to it and the
//! tunnel that mirrors a guest's forwards from its loopback ([`tunnel`], one session per host and process), the
//! `ssh -W` ProxyCommand through it, its libvirt daemon ([`libvirtd`], the one virsh runner) and the storage pool
//! on it ([`pool`]: the volumes' names and the virsh calls on them).
//!
//! Below both `ssh/` (guest sessions) and `provider/` (hypervisors): they use this module, it uses neither.

pub mod libvirtd;
pub mod pool;
pub mod remote;
pub mod tunnel;

use std::net::SocketAddr;

use anyhow::Result;

pub use remote::{default_known_hosts, RemoteHost};

/// Where a machine's VM runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    /// This machine: forwards listen on its own loopback.
    Local,
    /// A libvirt host reached over SSH: forwards listen on that host's loopback.
    Remote(RemoteHost),
}

impl Host {
    /// The host of a libvirt URI: remote for `qemu+ssh://` and `qemu+libssh://`, local for every other URI.
    pub fn from_uri(uri: &str) -> Host {
        remote::parse(uri).map_or(Host::Local, Host::Remote)
    }

    /// The remote host, None for this machine.
    pub fn remote(&self) -> Option<&RemoteHost> {
        match self {
            Host::Local => None,
            Host::Remote(r) => Some(r),
        }
    }

    pub fn is_remote(&self) -> bool {
        matches!(self, Host::Remote(_))
    }

    /// The refusal for a remote host whose key is not in known_hosts, None when it is known (or local). Errors
    /// only when known_hosts cannot be searched.
    pub fn unknown_key(&self) -> Result<Option<anyhow::Error>> {
        match self {
            Host::Remote(r) if !r.is_known()? => Ok(Some(r.unknown_host_error())),
            _ => Ok(None),
        }
    }

    /// Refuse a remote host whose key is not in known_hosts, before any connection is made. Local passes.
    pub fn check_known(&self) -> Result<()> {
        match self {
            Host::Local => Ok(()),
            Host::Remote(r) => r.check_known(),
        }
    }

    /// Can a machine's forwards be reached through this host? A remote host's sshd must forward TCP connections
    /// to its loopback, where the machine's SSH forward (`ssh_port`) will listen: checked before anything is sent
    /// or made there, with one login that the tunnel then uses. This machine passes.
    pub fn check_route(&self, ssh_port: u16) -> Result<()> {
        match self {
            Host::Local => Ok(()),
            Host::Remote(r) => tunnel::check_forwarding(r, ssh_port),
        }
    }

    /// The host as messages name it: the SSH destination of a remote host (`user@host`), else `uri`.
    pub fn name(&self, uri: &str) -> String {
        match self {
            Host::Local => uri.to_string(),
            Host::Remote(r) => r.destination(),
        }
    }

    /// Why the libvirt daemon at `uri` on a remote host did not answer (`err`: virsh's message): its key, or the
    /// host not reachable over SSH. None for this machine (the caller says what a local daemon needs).
    pub fn unreachable(&self, uri: &str, err: &str) -> Option<anyhow::Error> {
        let r = self.remote()?;
        Some(r.host_key_failure(err).unwrap_or_else(|| {
            anyhow::anyhow!(
                "the libvirt host {} is not reachable over SSH (URI {uri}): {err}\nhint: check the host is up and \
                 `ssh {} virsh -c qemu:///system version` works; a connection lost during `up` is resumed by \
                 running `provisioner up` again",
                r.destination(),
                r.destination()
            )
        }))
    }

    /// A connection error about a remote host's key (or login) made clear; None for this machine and other errors.
    pub fn host_key_failure(&self, stderr: &str) -> Option<anyhow::Error> {
        self.remote().and_then(|r| r.host_key_failure(stderr))
    }
}

/// How a guest's SSH is reached (as Vagrant's `ssh_info`): the address its forward listens on and the route there.
#[derive(Debug, Clone)]
pub struct GuestAddr {
    /// The forward's address on the host it runs on (127.0.0.1:PORT for a remote host: that host's loopback).
    pub addr: SocketAddr,
    /// The route: direct for [`Host::Local`], through the host (tunnel, ProxyCommand) for [`Host::Remote`].
    pub host: Host,
    /// The host ports to mirror here for a remote host (SSH first, then the other forwards).
    pub ports: Vec<u16>,
}

impl GuestAddr {
    /// Reached directly (the forward is on this machine's loopback).
    pub fn is_direct(&self) -> bool {
        !self.host.is_remote()
    }

    /// For a guest on a remote host: mirror its forwards on the local 127.0.0.1 for this process (so the recorded
    /// 127.0.0.1:PORT addresses work here). Nothing for a local guest.
    pub fn open_route(&self) -> Result<()> {
        match &self.host {
            Host::Local => Ok(()),
            Host::Remote(r) => tunnel::ensure(r, &self.ports),
        }
    }

    /// Does the guest's forward accept a TCP connection within `timeout`? Only a direct route is probed: a remote
    /// host's loopback is reached through the host (ProxyCommand), whose own errors say more.
    pub fn probe(&self, timeout: std::time::Duration) -> std::io::Result<()> {
        match self.host {
            Host::Local => std::net::TcpStream::connect_timeout(&self.addr, timeout).map(drop),
            Host::Remote(_) => Ok(()),
        }
    }

    /// The system `ssh`'s ProxyCommand through the remote host; None for a local guest.
    pub fn proxy_command(&self) -> Option<String> {
        self.host.remote().map(RemoteHost::proxy_command)
    }
}

/// Quote a string for a POSIX shell (single quotes).
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_uri_names_this_host_or_a_remote_one() {
        let r = Host::from_uri("qemu+ssh://root@10.201.0.2:2200/system?keyfile=/k");
        assert_eq!(r.remote().map(|r| r.known_hosts_name()).as_deref(), Some("[10.201.0.2]:2200"));
        assert!(Host::from_uri("qemu+libssh://h/system").is_remote());
        for local in ["qemu:///system", "qemu:///session", "qemu+unix:///system", "qemu+tls://h/system"] {
            assert_eq!(Host::from_uri(local), Host::Local, "{local}");
        }
    }

    #[test]
    fn a_guest_is_reached_directly_or_through_its_host() {
        let addr: SocketAddr = "127.0.0.1:2222".parse().unwrap();
        let local = GuestAddr { addr, host: Host::Local, ports: vec![2222] };
        assert!(local.is_direct());
        assert_eq!(local.proxy_command(), None);
        local.open_route().unwrap();
        let open = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let up = GuestAddr { addr: open.local_addr().unwrap(), host: Host::Local, ports: vec![] };
        up.probe(std::time::Duration::from_secs(5)).unwrap();
        drop(open);
        // Nothing listens there now: a direct route is refused, a route through a host is not probed here.
        assert!(up.probe(std::time::Duration::from_secs(5)).is_err());
        let far = GuestAddr {
            addr,
            host: Host::from_uri("qemu+ssh://root@10.201.3.2/system?known_hosts=/kh"),
            ports: vec![2222, 8080],
        };
        assert!(!far.is_direct());
        GuestAddr { addr: up.addr, ..far.clone() }.probe(std::time::Duration::from_secs(5)).unwrap();
        let p = far.proxy_command().unwrap();
        assert!(p.starts_with("ssh -o UserKnownHostsFile=/kh -o StrictHostKeyChecking=yes"), "{p}");
        assert!(p.ends_with(" -l root -W %h:%p 10.201.3.2"), "{p}");
    }

    #[test]
    #[cfg_attr(windows, ignore = "windows: runs ssh-keygen, and remote libvirt hosts are Linux-only")]
    fn an_unknown_remote_host_is_refused_with_the_command_that_adds_it() {
        let dir = tempfile::tempdir().unwrap();
        let kh = dir.path().join("known_hosts");
        std::fs::write(&kh, "").unwrap();
        let h = Host::from_uri(&format!(
            "qemu+ssh://root@unknown.invalid:2299/system?known_hosts={}",
            kh.display()
        ));
        let e = h.unknown_key().unwrap().expect("an unknown host is refused").to_string();
        assert!(e.contains("[unknown.invalid]:2299 is not in"), "{e}");
        assert!(
            e.contains("\nhint: check the key's fingerprint and add it: ssh-keyscan -p 2299 unknown.invalid"),
            "{e}"
        );
        assert!(h.check_known().is_err());
        assert!(Host::Local.unknown_key().unwrap().is_none());
        Host::Local.check_known().unwrap();
    }
}
