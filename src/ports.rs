//! Host port collision check, run before any provider boots a machine: every forward's `host_ip:host` must be
//! free. A taken port is reported with the process holding it (PID + command line, found by
//! `platform::port_holder`: Linux's socket tables and process fds; unknown on Windows) and what to do about it.

use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};

use anyhow::{bail, Context, Result};

use crate::config::{Forward, Protocol};

/// A process that holds a socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Holder {
    pub pid: u32,
    pub command: String,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PID {} ({})", self.pid, shown_command(&self.command))
    }
}

/// A holder's command line as an error shows it: whole when short; QEMU's (5,000 characters under libvirt) as its
/// program and guest name, which says which machine holds the port; any other long one cut. Pure.
fn shown_command(command: &str) -> String {
    const MAX: usize = 160;
    let mut words = command.split_whitespace();
    let program = words.next().unwrap_or("");
    let base = program.rsplit(['/', '\\']).next().unwrap_or(program);
    if base.starts_with("qemu-system-") {
        let value = words.skip_while(|w| *w != "-name").nth(1).unwrap_or("");
        let guest = value.split(',').find_map(|p| p.strip_prefix("guest=")).unwrap_or(value);
        if !guest.is_empty() {
            return format!("{base}, the virtual machine {guest}");
        }
    }
    match command.char_indices().nth(MAX) {
        Some((at, _)) => format!("{} ...", &command[..at]),
        None => command.to_string(),
    }
}

/// Check that every forward's host address can be bound; the first taken one is an error naming its holder.
pub(crate) fn check_free(forwards: &[Forward]) -> Result<()> {
    for f in forwards {
        let ip: IpAddr = f.host_ip.parse().with_context(|| {
            format!(
                "forward {}: host_ip {:?} is not an IP address; use e.g. \"127.0.0.1\"",
                label(f),
                f.host_ip
            )
        })?;
        let addr = SocketAddr::new(ip, f.host);
        let bound = match f.protocol {
            Protocol::Tcp => TcpListener::bind(addr).map(drop),
            Protocol::Udp => UdpSocket::bind(addr).map(drop),
        };
        let Err(e) = bound else { continue };
        let who = match holder(addr, f.protocol) {
            Some(h) => format!("held by {h}"),
            // Windows: who holds a port is not looked up (platform::port_holder); its own tool says.
            None if crate::platform::WINDOWS => {
                format!("held by another process (find it with `netstat -ano | findstr :{}`)", addr.port())
            }
            None => {
                "held by a process this user cannot see (another user's, or a different network namespace)"
                    .to_string()
            }
        };
        bail!(
            "host port {addr}/{} for forward {} is not free ({e}): {who}\n\
             hint: change `host` of this forward (or [ssh] host_port) in box-config.toml, or stop that process",
            proto_name(f.protocol),
            label(f)
        );
    }
    Ok(())
}

fn label(f: &Forward) -> String {
    match &f.name {
        Some(n) => format!("{n:?} (guest port {})", f.guest),
        None => format!("to guest port {}", f.guest),
    }
}

fn proto_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
    }
}

/// Who holds a socket bound to `addr` (or to the wildcard address on that port), when the platform can tell.
pub(crate) fn holder(addr: SocketAddr, proto: Protocol) -> Option<Holder> {
    crate::platform::port_holder(addr, proto == Protocol::Tcp).map(|(pid, command)| Holder { pid, command })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fwd(port: u16, proto: Protocol) -> Forward {
        Forward {
            guest: 80,
            host: port,
            host_ip: "127.0.0.1".into(),
            protocol: proto,
            name: Some("web".into()),
        }
    }

    #[test]
    #[cfg_attr(windows, ignore = "windows: who holds a port is not looked up there (unknown)")]
    fn taken_tcp_port_names_our_pid() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let e = check_free(&[fwd(port, Protocol::Tcp)]).unwrap_err().to_string();
        assert!(e.contains(&format!("PID {}", std::process::id())), "{e}");
        assert!(e.contains("\"web\"") && e.contains("hint:"), "{e}");
        drop(l);
        check_free(&[fwd(port, Protocol::Tcp)]).unwrap();
    }

    #[test]
    #[cfg_attr(windows, ignore = "windows: who holds a port is not looked up there (unknown)")]
    fn taken_udp_port_is_detected() {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = s.local_addr().unwrap().port();
        let e = check_free(&[fwd(port, Protocol::Udp)]).unwrap_err().to_string();
        assert!(e.contains(&format!("PID {}", std::process::id())) && e.contains("/udp"), "{e}");
    }

    #[test]
    #[cfg_attr(windows, ignore = "windows: who holds a port is not looked up there (unknown)")]
    fn wildcard_listener_blocks_loopback() {
        let l = TcpListener::bind("0.0.0.0:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let h = holder(SocketAddr::from(([127, 0, 0, 1], port)), Protocol::Tcp).expect("holder found");
        assert_eq!(h.pid, std::process::id());
    }

    #[test]
    fn a_long_command_line_is_shown_short_and_qemus_by_its_guest() {
        let qemu = format!(
            "/usr/bin/qemu-system-x86_64 -name guest=provisioner-lab-b1a57397,debug-threads=on -S {}",
            "-device x ".repeat(500)
        );
        let h = Holder { pid: 7, command: qemu };
        assert_eq!(h.to_string(), "PID 7 (qemu-system-x86_64, the virtual machine provisioner-lab-b1a57397)");
        let long = format!("/usr/bin/python3 {}", "a".repeat(300));
        let shown = Holder { pid: 8, command: long.clone() }.to_string();
        assert_eq!(shown, format!("PID 8 ({} ...)", &long[..160]));
        assert_eq!(Holder { pid: 9, command: "nc -l 8000".into() }.to_string(), "PID 9 (nc -l 8000)");
    }

    #[test]
    fn bad_host_ip_is_explained() {
        let mut f = fwd(1, Protocol::Tcp);
        f.host_ip = "localhost".into();
        let e = format!("{:#}", check_free(&[f]).unwrap_err());
        assert!(e.contains("not an IP address"), "{e}");
    }
}
