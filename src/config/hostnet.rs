//! The IPv4 networks this host is on, read from the kernel with `getifaddrs(3)` (no packet is sent, no program
//! run), and the check of a project's private subnet against them: a guest whose private subnet overlaps a
//! network its host is on routes that network's addresses (the LAN, a mirror, a registry) into the private
//! segment instead of out through its NAT.
//!
//! The check is pure ([`overlapping`]); the reader ([`read`]) is its only contact with the system, so tests
//! inject the host's networks.

use std::net::Ipv4Addr;

use anyhow::Result;

/// One IPv4 address of a host interface, with its prefix length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostNet {
    pub interface: String,
    pub addr: Ipv4Addr,
    /// 0-32.
    pub prefix: u8,
}

impl HostNet {
    pub fn new(interface: &str, addr: Ipv4Addr, prefix: u8) -> HostNet {
        HostNet { interface: interface.to_string(), addr, prefix: prefix.min(32) }
    }

    /// The network the address is in (`192.168.1.0` for 192.168.1.7/24).
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & mask(self.prefix))
    }

    /// `eth0 192.168.1.7/24`.
    pub fn describe(&self) -> String {
        format!("{} {}/{}", self.interface, self.addr, self.prefix)
    }
}

fn mask(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix.min(32))).unwrap_or(0)
}

/// Whether `a/pa` and `b/pb` share an address.
pub fn nets_overlap(a: Ipv4Addr, pa: u8, b: Ipv4Addr, pb: u8) -> bool {
    let m = mask(pa.min(pb));
    u32::from(a) & m == u32::from(b) & m
}

/// The host networks `subnet/prefix` overlaps. Pure.
pub fn overlapping(subnet: Ipv4Addr, prefix: u8, host: &[HostNet]) -> Vec<&HostNet> {
    host.iter().filter(|h| nets_overlap(subnet, prefix, h.addr, h.prefix)).collect()
}

/// A private subnet from `candidates` that overlaps none of the host's networks (for the hint).
pub fn free_subnet<'c>(host: &[HostNet], candidates: &[(&'c str, Ipv4Addr, u8)]) -> Option<&'c str> {
    candidates.iter().find(|(_, a, p)| overlapping(*a, *p, host).is_empty()).map(|(s, _, _)| *s)
}

/// Every IPv4 address of this host's interfaces (loopback included), in the kernel's order.
pub fn read() -> Result<Vec<HostNet>> {
    let list = crate::platform::ipv4_interfaces()
        .map_err(|e| anyhow::anyhow!("cannot list this host's network interfaces: {e}"))?;
    Ok(list.into_iter().map(|(name, addr, prefix)| HostNet::new(&name, addr, prefix)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlap_is_symmetric_and_prefix_aware() {
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        assert!(nets_overlap(ip("10.10.0.0"), 24, ip("10.10.0.7"), 16));
        assert!(nets_overlap(ip("10.10.3.7"), 16, ip("10.10.0.0"), 24));
        assert!(!nets_overlap(ip("10.10.0.0"), 24, ip("10.10.1.7"), 24));
        assert!(nets_overlap(ip("10.10.0.0"), 24, ip("1.2.3.4"), 0));
        let host = [HostNet::new("eth0", ip("10.77.0.5"), 24)];
        assert_eq!(free_subnet(&host, &[("a", ip("10.77.0.0"), 24), ("b", ip("10.78.0.0"), 24)]), Some("b"));
    }
}
