//! Host port collision check, run before any provider boots a machine: every forward's `host_ip:host` must be
//! free. A taken port is reported with the process holding it (PID + command line, found through
//! `/proc/net/{tcp,tcp6,udp,udp6}` socket inodes and `/proc/*/fd`) and what to do about it.

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
        write!(f, "PID {} ({})", self.pid, self.command)
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

/// Who holds a socket bound to `addr` (or to the wildcard address on that port).
pub(crate) fn holder(addr: SocketAddr, proto: Protocol) -> Option<Holder> {
    let tables: &[&str] = match proto {
        Protocol::Tcp => &["/proc/net/tcp", "/proc/net/tcp6"],
        Protocol::Udp => &["/proc/net/udp", "/proc/net/udp6"],
    };
    let inodes: Vec<u64> = tables
        .iter()
        .filter_map(|t| std::fs::read_to_string(t).ok())
        .flat_map(|text| socket_inodes(&text, addr, proto))
        .collect();
    if inodes.is_empty() {
        return None;
    }
    process_with_socket(&inodes)
}

/// Socket inodes in one /proc/net table bound to `addr`'s port on that address or a wildcard (TCP: listening).
fn socket_inodes(table: &str, addr: SocketAddr, proto: Protocol) -> Vec<u64> {
    const TCP_LISTEN: &str = "0A";
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let (local, st, inode) = (cols.get(1)?, cols.get(3)?, cols.get(9)?);
            if proto == Protocol::Tcp && *st != TCP_LISTEN {
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
fn process_with_socket(inodes: &[u64]) -> Option<Holder> {
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
            return Some(Holder { pid, command: command_line(pid) });
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn taken_udp_port_is_detected() {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = s.local_addr().unwrap().port();
        let e = check_free(&[fwd(port, Protocol::Udp)]).unwrap_err().to_string();
        assert!(e.contains(&format!("PID {}", std::process::id())) && e.contains("/udp"), "{e}");
    }

    #[test]
    fn wildcard_listener_blocks_loopback() {
        let l = TcpListener::bind("0.0.0.0:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let h = holder(SocketAddr::from(([127, 0, 0, 1], port)), Protocol::Tcp).expect("holder found");
        assert_eq!(h.pid, std::process::id());
    }

    #[test]
    fn bad_host_ip_is_explained() {
        let mut f = fwd(1, Protocol::Tcp);
        f.host_ip = "localhost".into();
        let e = format!("{:#}", check_free(&[f]).unwrap_err());
        assert!(e.contains("not an IP address"), "{e}");
    }
}
