//! Forwarded ports reach services that listen on the guest's loopback.
//!
//! The lab publishes every port on 127.0.0.1 *inside* the guest (nothing listens on the guest's network address).
//! The hypervisor's port forward (QEMU `hostfwd`, VirtualBox NAT `--natpf1`) however delivers the connection to the
//! guest's NIC address. So for every forwarded TCP port (SSH excepted) the guest gets a DNAT rule, on the NIC that
//! carries the default route, to `127.0.0.1:PORT`, and `route_localnet` on that NIC so the kernel accepts it. The
//! rule is inserted first in `nat PREROUTING` (ahead of Docker's own chain), and re-checked on every `up` and
//! `provision` (rules do not survive a reboot): `iptables -C` first, so a second run changes nothing.

use std::time::Duration;

use anyhow::{Context, Result};

use crate::config::{Config, Protocol};
use crate::ssh::Session;

/// Guest TCP ports that the host reaches through a forward, excluding SSH.
pub fn guest_ports(cfg: &Config) -> Vec<u16> {
    let mut ports: Vec<u16> = cfg
        .forwards
        .iter()
        .filter(|f| f.protocol == Protocol::Tcp && f.guest != 22)
        .map(|f| f.guest)
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// The idempotent shell script that installs the rules (run with sudo).
pub fn script(ports: &[u16]) -> String {
    let list: Vec<String> = ports.iter().map(u16::to_string).collect();
    format!(
        r#"set -eu
nic=$(ip -o -4 route show default | awk '{{print $5; exit}}')
[ -n "$nic" ] || {{ echo "no default route in the guest" >&2; exit 3; }}
sysctl -qw "net.ipv4.conf.$nic.route_localnet=1"
added=0
for p in {ports}; do
  rule="-i $nic -p tcp --dport $p -j DNAT --to-destination 127.0.0.1:$p"
  if ! iptables -w -t nat -C PREROUTING $rule 2>/dev/null; then
    iptables -w -t nat -I PREROUTING 1 $rule
    added=$((added+1))
  fi
done
echo "nic=$nic added=$added"
"#,
        ports = list.join(" ")
    )
}

/// The command [`ensure`] runs (as root), None without forwarded service ports.
pub fn command(cfg: &Config) -> Option<String> {
    let ports = guest_ports(cfg);
    (!ports.is_empty()).then(|| format!("sudo -n sh -c {}", crate::ssh::shell_quote(&script(&ports))))
}

/// Make every forwarded port reach 127.0.0.1 in the guest. Returns a one-line summary.
pub fn ensure(ssh: &Session, cfg: &Config) -> Result<String> {
    let Some(cmd) = command(cfg) else {
        return Ok("no forwarded service ports".into());
    };
    let ports = guest_ports(cfg);
    let out = ssh.exec_ok(&cmd, Duration::from_secs(60)).context(
        "could not route the forwarded ports to the guest's loopback\nhint: the guest needs iptables (it comes \
         with docker.io) and passwordless sudo for the ssh user",
    )?;
    Ok(format!("{} ports -> 127.0.0.1 ({})", ports.len(), out.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_checks_before_inserting_each_port() {
        let s = script(&[8000, 9090]);
        assert!(s.contains("for p in 8000 9090; do"));
        assert!(s.contains("iptables -w -t nat -C PREROUTING $rule"));
        assert!(s.contains("-I PREROUTING 1 $rule"));
        assert!(s.contains("route_localnet=1"));
    }
}
