//! `VBoxManage showvminfo VM --machinereadable`, parsed: run state, NAT rules, storage controllers, snapshots.

use crate::provider::VmState;

/// One `showvminfo --machinereadable` document (lines of `key="value"`, keys quoted when they hold spaces).
#[derive(Debug, Clone, Default)]
pub struct VmInfo {
    pairs: Vec<(String, String)>,
}

/// A NAT port-forwarding rule: `name,proto,hostip,hostport,guestip,guestport`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatRule {
    pub name: String,
    pub proto: String,
    pub host_ip: String,
    pub host_port: u16,
    pub guest_ip: String,
    pub guest_port: u16,
}

impl NatRule {
    /// The rule as `--natpf1` takes it and `Forwarding(N)` shows it.
    pub fn to_arg(&self) -> String {
        format!(
            "{},{},{},{},{},{}",
            self.name, self.proto, self.host_ip, self.host_port, self.guest_ip, self.guest_port
        )
    }
    pub fn parse(s: &str) -> Option<NatRule> {
        let f: Vec<&str> = s.split(',').collect();
        if f.len() != 6 {
            return None;
        }
        Some(NatRule {
            name: f[0].into(),
            proto: f[1].into(),
            host_ip: f[2].into(),
            host_port: f[3].parse().ok()?,
            guest_ip: f[4].into(),
            guest_port: f[5].parse().ok()?,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Controller {
    pub name: String,
    /// "IntelAhci", "PIIX4", "LsiLogic", "VirtIO", ...
    pub kind: String,
    pub port_count: u32,
    pub max_port_count: u32,
}

impl Controller {
    pub fn is_sata(&self) -> bool {
        self.kind == "IntelAhci"
    }
    pub fn is_ide(&self) -> bool {
        matches!(self.kind.as_str(), "PIIX3" | "PIIX4" | "ICH6")
    }
}

impl VmInfo {
    pub fn parse(text: &str) -> VmInfo {
        let pairs = text.lines().filter_map(parse_line).collect();
        VmInfo { pairs }
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// `VMState` mapped to the provider-neutral state (names from `machineStateToName` in VBoxManageInfo.cpp).
    pub fn state(&self) -> VmState {
        if self.inaccessible() {
            return VmState::Inaccessible;
        }
        match self.get("VMState").unwrap_or("unknown") {
            "running" => VmState::Running,
            "paused" => VmState::Paused,
            "poweroff" | "teleported" => VmState::Stopped,
            "aborted" => VmState::Aborted,
            "saved" => VmState::Saved,
            "aborted-saved" => VmState::AbortedSaved,
            other => VmState::Other(other.to_string()),
        }
    }

    /// `name="<inaccessible>"`: the settings file or a disk of the VM cannot be read.
    pub fn inaccessible(&self) -> bool {
        self.get("name") == Some("<inaccessible>")
    }

    /// NAT rules of NIC `adapter` (1-based) shown as `Forwarding(N)`. VBoxManageInfo.cpp prints, per enabled
    /// NIC, `natnetN`, `macaddressN`, `cableconnectedN`, `nicN`, ..., then that NIC's rules with `N` restarting at
    /// 0: so a rule belongs to the `nicN` line before it.
    pub fn nat_rules(&self, adapter: u32) -> Vec<NatRule> {
        let mut current = None;
        let mut rules = Vec::new();
        for (k, v) in &self.pairs {
            if let Some(n) = k.strip_prefix("nic").and_then(|n| n.parse::<u32>().ok()) {
                current = Some(n);
            } else if k.starts_with("Forwarding(") && k.ends_with(')') && current == Some(adapter) {
                rules.extend(NatRule::parse(v));
            }
        }
        rules
    }

    pub fn controllers(&self) -> Vec<Controller> {
        (0..)
            .map_while(|i| {
                let name = self.get(&format!("storagecontrollername{i}"))?;
                let num = |k: &str| self.get(&format!("{k}{i}")).and_then(|v| v.parse().ok()).unwrap_or(0);
                Some(Controller {
                    name: name.to_string(),
                    kind: self.get(&format!("storagecontrollertype{i}")).unwrap_or("").to_string(),
                    port_count: num("storagecontrollerportcount"),
                    max_port_count: num("storagecontrollermaxportcount"),
                })
            })
            .collect()
    }

    /// What is attached at controller/port/device: a medium path, "none", "emptydrive", or absent.
    pub fn attachment(&self, controller: &str, port: u32, device: u32) -> Option<&str> {
        self.get(&format!("{controller}-{port}-{device}"))
    }

    /// Names of all snapshots (`SnapshotName`, `SnapshotName-1`, `SnapshotName-1-1`, ...).
    pub fn snapshot_names(&self) -> Vec<&str> {
        self.pairs
            .iter()
            .filter(|(k, _)| k == "SnapshotName" || k.starts_with("SnapshotName-"))
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// `key="value"`, `"key with spaces"="value"` or `key=value`; `\"` and `\\` are escapes inside quotes.
fn parse_line(line: &str) -> Option<(String, String)> {
    let (key, rest) = if let Some(r) = line.strip_prefix('"') {
        let (k, after) = take_quoted(r)?;
        (k, after.strip_prefix('=')?)
    } else {
        let (k, v) = line.split_once('=')?;
        (k.to_string(), v)
    };
    let value = match rest.strip_prefix('"') {
        Some(r) => take_quoted(r)?.0,
        None => rest.to_string(),
    };
    Some((key, value))
}

/// Read up to the closing quote; returns the unescaped text and what follows the quote.
fn take_quoted(s: &str) -> Option<(String, &str)> {
    let mut out = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => out.push(chars.next()?.1),
            '"' => return Some((out, &s[i + 1..])),
            c => out.push(c),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"name="provisioner-web-1a2b3c4d"
UUID="0c4f6d2e-6a57-4ad4-9a8f-1d9c0e2f3b4a"
memory=2048
VMState="running"
storagecontrollername0="SATA Controller"
storagecontrollertype0="IntelAhci"
storagecontrollerinstance0="0"
storagecontrollermaxportcount0="30"
storagecontrollerportcount0="2"
storagecontrollerbootable0="on"
storagecontrollername1="IDE Controller"
storagecontrollertype1="PIIX4"
storagecontrollermaxportcount1="2"
storagecontrollerportcount1="2"
"SATA Controller-0-0"="/home/u/VirtualBox VMs/x/Snapshots/{1}.vmdk"
"SATA Controller-1-0"="none"
natnet1="nat"
macaddress1="080027BB1475"
cableconnected1="on"
nic1="nat"
nictype1="82540EM"
nicspeed1="0"
mtu="0"
sockSnd="64"
sockRcv="64"
tcpWndSnd="64"
tcpWndRcv="64"
Forwarding(0)="ssh,tcp,127.0.0.1,2222,,22"
Forwarding(1)="web,tcp,,8080,,80"
natnet2="nat"
macaddress2="080027DD5ADF"
cableconnected2="on"
nic2="nat"
nictype2="82540EM"
nicspeed2="0"
Forwarding(0)="other,tcp,,9999,,99"
nic3="none"
description="say \"hi\" \\ there"
SnapshotName="base"
SnapshotName-1="later"
"#;

    #[test]
    fn parses_the_parts_we_use() {
        let i = VmInfo::parse(SAMPLE);
        assert_eq!(i.state(), VmState::Running);
        assert_eq!(i.get("memory"), Some("2048"));
        assert_eq!(i.get("description"), Some(r#"say "hi" \ there"#));
        assert_eq!(i.attachment("SATA Controller", 1, 0), Some("none"));
        assert_eq!(i.snapshot_names(), ["base", "later"]);
        let c = i.controllers();
        assert_eq!(c.len(), 2);
        assert!(c[0].is_sata() && c[0].port_count == 2 && c[0].max_port_count == 30);
        assert!(c[1].is_ide());
        let r = i.nat_rules(1);
        assert_eq!(r.len(), 2, "rules of nic2 are not nic1's: {r:?}");
        assert_eq!(r[0].to_arg(), "ssh,tcp,127.0.0.1,2222,,22");
        assert_eq!((r[1].host_ip.as_str(), r[1].host_port, r[1].guest_port), ("", 8080, 80));
        assert_eq!(i.nat_rules(2).iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), ["other"]);
        assert!(i.nat_rules(3).is_empty());
    }

    #[test]
    fn states_map_to_vmstate() {
        for (s, want) in [
            ("poweroff", VmState::Stopped),
            ("aborted", VmState::Aborted),
            ("saved", VmState::Saved),
            ("aborted-saved", VmState::AbortedSaved),
            ("paused", VmState::Paused),
            ("gurumeditation", VmState::Other("gurumeditation".into())),
        ] {
            assert_eq!(VmInfo::parse(&format!("VMState=\"{s}\"")).state(), want, "{s}");
        }
        let dead = VmInfo::parse("name=\"<inaccessible>\"\nUUID=\"x\"");
        assert!(dead.inaccessible());
        assert_eq!(dead.state(), VmState::Inaccessible);
    }

    #[test]
    fn bad_rules_and_lines_are_skipped() {
        assert_eq!(NatRule::parse("ssh,tcp,,notaport,,22"), None);
        assert_eq!(NatRule::parse("a,b"), None);
        assert!(VmInfo::parse("no equals sign\n\"unterminated=1").pairs.is_empty());
    }
}
