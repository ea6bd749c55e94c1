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
read -r on 2>/dev/null </proc/sys/net/ipv4/conf/$nic/route_localnet || on=0
[ "$on" = 1 ] || sysctl -qw "net.ipv4.conf.$nic.route_localnet=1"
# One listing of the table (an iptables start costs ~0.1 s under TCG): a rule found in it as iptables-save spells
# it needs no `-C` of its own; any other spelling is checked with `-C` as before.
have=$(iptables-save -t nat 2>/dev/null) || have=""
added=0
for p in {ports}; do
  rule="-i $nic -p tcp --dport $p -j DNAT --to-destination 127.0.0.1:$p"
  case "$have" in
    *"-A PREROUTING -i $nic -p tcp -m tcp --dport $p -j DNAT --to-destination 127.0.0.1:$p"*) continue ;;
  esac
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

    /// A rule iptables-save lists costs no `iptables` start; a missing one is checked and inserted, as before.
    #[test]
    #[cfg_attr(windows, ignore = "windows: a guest shell command, run with /bin/sh")]
    fn rules_listed_by_iptables_save_are_not_checked_again() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("calls");
        let log = log.display();
        let logged = |name: &str, then: &str| format!("echo \"{name} $*\" >> {log}; {then}");
        let stand_ins = [
            ("ip", "echo 'default via 10.0.2.2 dev eth9 proto dhcp'".to_string()),
            ("sysctl", logged("sysctl", "")),
            (
                "iptables-save",
                "echo '-A PREROUTING -i eth9 -p tcp -m tcp --dport 8000 -j DNAT --to-destination 127.0.0.1:8000'"
                    .to_string(),
            ),
            ("iptables", logged("iptables", r#"case "$*" in *" -C "*) exit 1 ;; esac"#)),
        ];
        let stand_ins: Vec<(&str, &str)> = stand_ins.iter().map(|(n, b)| (*n, b.as_str())).collect();
        let out = crate::testing::guest_sh(
            &format!("sh -c {}", crate::ssh::shell_quote(&script(&[8000, 9090]))),
            &stand_ins,
        );
        assert_eq!(out, "nic=eth9 added=1\n");
        let calls = std::fs::read_to_string(dir.path().join("calls")).unwrap();
        assert_eq!(
            calls.lines().collect::<Vec<_>>(),
            [
                "sysctl -qw net.ipv4.conf.eth9.route_localnet=1",
                "iptables -w -t nat -C PREROUTING -i eth9 -p tcp --dport 9090 -j DNAT --to-destination 127.0.0.1:9090",
                "iptables -w -t nat -I PREROUTING 1 -i eth9 -p tcp --dport 9090 -j DNAT --to-destination 127.0.0.1:9090",
            ]
        );
    }
}
