//! The private network between the machines of one project: pure naming helpers (MAC addresses, multicast
//! group and port, libvirt network names and XML), shared by the providers and the seed.
//!
//! How each provider joins the machines (docs/multi-machine.md, "Private network"):
//! - libvirt, `qemu:///session` (default): a second virtio NIC on a QEMU multicast socket
//!   (`-netdev socket,mcast=GROUP:PORT,localaddr=127.0.0.1`): every guest of the project on one L2 segment, no
//!   bridge, no host address. `localaddr=127.0.0.1` makes QEMU send and join the group on the loopback interface
//!   only, so no frame leaves the host (libvirt's `<interface type='mcast'>` has no local address and would let
//!   the kernel pick the default route's interface).
//! - libvirt, `qemu:///system` when the user asks: an isolated libvirt network (no `<forward>`, no `<ip>`).
//! - VirtualBox: an internal network (`--nic2 intnet --intnet2 NAME`).

use std::net::Ipv4Addr;

use sha2::{Digest, Sha256};

/// The MAC address of every machine's FIRST NIC (the NAT / user-mode one) when it has a private NIC, so the
/// guest's network-config can match it by MAC. QEMU gives this address to a first NIC without one; each NIC sits
/// alone on its own user-mode network, so all machines may share it.
pub const PRIMARY_MAC: &str = "52:54:00:12:34:56";

/// The private NIC of one machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrivateNic {
    pub ip: Ipv4Addr,
    pub prefix: u8,
    /// `52:54:00:xx:xx:xx`, stable per machine ([`mac_for`]).
    pub mac: String,
    pub net: PrivateNet,
}

/// The network the private NICs of a project join.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrivateNet {
    /// Project-unique, e.g. `provisioner-<project hash8>-<net>` ([`net_name`]): the libvirt network or the
    /// VirtualBox internal network name, and the seed of the multicast group.
    pub name: String,
    /// 239.x.y.z ([`mcast_for`]).
    pub mcast_group: Ipv4Addr,
    pub port: u16,
    /// Use an isolated libvirt network instead of the multicast socket (qemu:///system, when the user asks).
    pub isolated_libvirt_network: bool,
}

impl PrivateNet {
    /// The network called `name`, with its multicast group and port derived from the name.
    /// The network a `[network]` asking for `isolated` gets on the libvirt instance of `libvirt_uri`: an isolated
    /// libvirt network on the system instance, else (session, VirtualBox) the multicast socket.
    pub fn for_uri(name: &str, isolated: bool, libvirt_uri: &str) -> PrivateNet {
        PrivateNet::new(name, isolated && crate::config::is_system_instance(libvirt_uri))
    }

    pub fn new(name: &str, isolated_libvirt_network: bool) -> PrivateNet {
        let (mcast_group, port) = mcast_for(name);
        PrivateNet { name: name.to_string(), mcast_group, port, isolated_libvirt_network }
    }
}

fn digest(parts: &[&str]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    h.finalize().into()
}

/// The private NIC's MAC of machine `machine` in the project `project_id` (any stable project identity, e.g. its
/// canonical directory): QEMU's locally administered prefix 52:54:00 and 24 bits of a SHA-256. Stable across
/// runs; two machines of one project collide with a probability of about n²/2²⁵ (1 in 300 000 for 10 machines);
/// never equal to [`PRIMARY_MAC`].
pub fn mac_for(project_id: &str, machine: &str) -> String {
    let d = digest(&["mac", project_id, machine]);
    let mac = format!("52:54:00:{:02x}:{:02x}:{:02x}", d[0], d[1], d[2]);
    if mac == PRIMARY_MAC {
        return format!("52:54:00:{:02x}:{:02x}:{:02x}", d[3], d[4], d[5]);
    }
    mac
}

/// The project-unique network name: `provisioner-<8 hex of the project id>-<net>`.
pub fn net_name(project_id: &str, net: &str) -> String {
    format!("provisioner-{}-{net}", &hex::encode(digest(&["net", project_id]))[..8])
}

/// The multicast group and UDP port of the network `name`: a group in 239.0.0.0/8 (administratively scoped,
/// RFC 2365) outside 239.255.0.0/16 (the local scope where SSDP, SLP and mDNS-like services live) and a port in
/// 10000-29999 (below Linux's ephemeral range, so no ephemeral socket holds it). 22 + 15 bits of a SHA-256 of the
/// name: two names collide with a probability of 2⁻³⁷ per pair. A collision would put two projects' guests on
/// one segment (they would see each other's frames, and clash if they use the same subnet); renaming either
/// network separates them. Different groups on the same port do not interfere: QEMU binds the group address.
pub fn mcast_for(name: &str) -> (Ipv4Addr, u16) {
    let d = digest(&["mcast", name]);
    // Second octet 0-254 (never 255), then two free octets.
    let b = d[0] % 255;
    let group = Ipv4Addr::new(239, b, d[1], d[2]);
    let port = 10000 + u16::from_be_bytes([d[3], d[4]]) % 20000;
    (group, port)
}

/// The `-netdev` argument of the private NIC in `qemu:///session`: a multicast socket bound to the loopback
/// interface only.
pub fn mcast_netdev(net: &PrivateNet) -> String {
    format!("socket,id=net1,mcast={}:{},localaddr=127.0.0.1", net.mcast_group, net.port)
}

/// The `-device` argument of the private NIC (virtio, its own MAC, the PCI slot after the first NIC's).
pub fn private_device(mac: &str) -> String {
    format!("virtio-net-pci,netdev=net1,mac={mac},bus=pcie.0,addr=0x11")
}

/// The isolated libvirt network (qemu:///system): no `<forward>` (nothing routed or NATed), no `<ip>` (no host
/// address, no DHCP server): a bare bridge that only the guests' private NICs join.
pub fn isolated_network_xml(name: &str) -> String {
    let name = crate::xml::escape(name);
    format!(
        "<network>\n  <name>{name}</name>\n  <!-- provisioner private network: isolated (no forward, no host \
         address) -->\n  <bridge stp='off' delay='0'/>\n</network>\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_is_stable_local_and_per_machine() {
        let a = mac_for("/home/u/lab", "web");
        assert_eq!(a, mac_for("/home/u/lab", "web"));
        assert_ne!(a, mac_for("/home/u/lab", "db"));
        assert_ne!(a, mac_for("/home/u/other", "web"));
        assert!(a.starts_with("52:54:00:"), "{a}");
        assert_eq!(a.len(), 17);
        assert!(a.split(':').all(|o| o.len() == 2 && u8::from_str_radix(o, 16).is_ok()), "{a}");
        // Unicast, locally administered prefix (0x52: bit 0 clear, bit 1 set).
        for i in 0..500 {
            assert_ne!(mac_for("p", &format!("m{i}")), PRIMARY_MAC);
        }
    }

    #[test]
    fn mcast_group_is_administratively_scoped_and_port_below_ephemeral() {
        let mut seen = std::collections::HashSet::new();
        for i in 0..2000 {
            let name = net_name(&format!("/p/{i}"), "default");
            let (g, port) = mcast_for(&name);
            assert_eq!(g.octets()[0], 239, "{g}");
            assert_ne!(g.octets()[1], 255, "{g} is in the local scope 239.255/16");
            assert!(g.is_multicast());
            assert!((10000..30000).contains(&port), "{port}");
            assert_eq!((g, port), mcast_for(&name), "stable");
            seen.insert((g, port));
        }
        assert_eq!(seen.len(), 2000, "no collision among 2000 projects");
    }

    #[test]
    fn net_name_is_project_unique() {
        let a = net_name("/home/u/lab", "private");
        assert!(a.starts_with("provisioner-") && a.ends_with("-private"), "{a}");
        assert_eq!(a.len(), "provisioner-".len() + 8 + "-private".len());
        assert_ne!(a, net_name("/home/u/lab2", "private"));
        assert_eq!(a, net_name("/home/u/lab", "private"));
        let n = PrivateNet::new(&a, false);
        assert_eq!((n.mcast_group, n.port), mcast_for(&a));
    }

    #[test]
    fn qemu_arguments_bind_the_loopback() {
        let n = PrivateNet {
            name: "x".into(),
            mcast_group: Ipv4Addr::new(239, 1, 2, 3),
            port: 12345,
            isolated_libvirt_network: false,
        };
        assert_eq!(mcast_netdev(&n), "socket,id=net1,mcast=239.1.2.3:12345,localaddr=127.0.0.1");
        assert_eq!(
            private_device("52:54:00:aa:bb:cc"),
            "virtio-net-pci,netdev=net1,mac=52:54:00:aa:bb:cc,bus=pcie.0,addr=0x11"
        );
    }

    #[test]
    fn isolated_network_has_no_forward_and_no_ip() {
        let xml = isolated_network_xml("provisioner-0123abcd-private");
        assert!(xml.contains("<name>provisioner-0123abcd-private</name>"));
        assert!(!xml.contains("<forward") && !xml.contains("<ip") && !xml.contains("<dhcp"), "{xml}");
    }

    #[test]
    fn only_the_system_instance_gets_an_isolated_network() {
        assert!(PrivateNet::for_uri("n", true, "qemu:///system").isolated_libvirt_network);
        assert!(PrivateNet::for_uri("n", true, "qemu+ssh://root@h/system").isolated_libvirt_network);
        assert!(!PrivateNet::for_uri("n", true, "qemu:///session").isolated_libvirt_network);
        assert!(!PrivateNet::for_uri("n", false, "qemu:///system").isolated_libvirt_network);
    }
}
