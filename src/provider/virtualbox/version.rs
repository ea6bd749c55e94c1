//! Everything that differs between VirtualBox releases, in ONE place, chosen once per run from
//! `VBoxManage --version` (the way Vagrant picks one `driver/version_X_Y.rb`).
//!
//! What differs, with the sources:
//! - `unregistervm --delete-all` (also deletes files in the VM folder, e.g. an attached seed ISO there) exists from
//!   7.0; 6.1 only has `--delete` (VirtualBox manual, chapter 8 "unregistervm", 6.1 vs 7.0).
//! - VirtualBox 7.0.0 printed no `Forwarding(N)` lines in `showvminfo --machinereadable` once a NIC had more than
//!   one rule. Vagrant's `version_7_0.rb` (`read_forwarded_ports`, used by `version_7_1.rb` too) reads the NAT
//!   rules from the VM's settings file (`CfgFile=`) for exactly that release; Vagrant PR #12953 says the defect is
//!   isolated to 7.0.0 and Oracle's comment there says 7.0.2 fixed it. VBoxManageInfo.cpp of 7.0.14, 7.1.6 and
//!   trunk prints every rule (`strNatForwardings.appendPrintf("Forwarding(%d)=...")`). We do the same as Vagrant:
//!   the settings file for 7.0.0 (and any 7.0 pre-release), `showvminfo` otherwise.

use std::fmt;

/// Oldest release whose VBoxManage grammar we use.
pub const MIN: Version = Version { major: 6, minor: 1, build: 0 };

/// A VirtualBox release, from `VBoxManage --version` (`7.0.20r163906`, `6.1.50_Ubuntur161033`, `7.1.0_BETA1r...`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
    pub build: u32,
}

/// Where a release shows a VM's NAT port-forwarding rules reliably.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RulesFrom {
    /// `Forwarding(N)` lines of `showvminfo --machinereadable`, attributed to the `nicN` line before them.
    ShowVmInfo,
    /// The VM's settings file (`.vbox` XML), `Machine/Hardware/Network/Adapter/NAT/Forwarding`.
    SettingsFile,
}

impl Version {
    /// Parse the first line of `VBoxManage --version`; `None` when it is not `MAJOR.MINOR.BUILD...`.
    pub fn parse(text: &str) -> Option<Version> {
        let line =
            text.lines().map(str::trim).find(|l| l.chars().next().is_some_and(|c| c.is_ascii_digit()))?;
        let mut parts = line.splitn(3, '.');
        let num = |s: Option<&str>| -> Option<u32> {
            let digits: String = s?.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        };
        Some(Version { major: num(parts.next())?, minor: num(parts.next())?, build: num(parts.next())? })
    }

    pub fn supported(&self) -> bool {
        *self >= MIN
    }

    /// The `unregistervm` flag that also deletes the VM's disks and files.
    pub fn delete_flag(&self) -> &'static str {
        if self.major >= 7 {
            "--delete-all"
        } else {
            "--delete"
        }
    }

    /// Where this release's NAT rules are read from.
    pub fn rules_from(&self) -> RulesFrom {
        if (self.major, self.minor, self.build) == (7, 0, 0) {
            RulesFrom::SettingsFile
        } else {
            RulesFrom::ShowVmInfo
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.build)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_and_choose_their_behaviour() {
        let v = |s| Version::parse(s).unwrap();
        assert_eq!(v("7.0.20r163906\n"), Version { major: 7, minor: 0, build: 20 });
        assert_eq!(v("6.1.50_Ubuntur161033"), Version { major: 6, minor: 1, build: 50 });
        assert_eq!(v("WARNING: something\n7.1.0_BETA1r164000"), Version { major: 7, minor: 1, build: 0 });
        assert_eq!(Version::parse("garbage"), None);
        assert!(!v("5.2.44r139111").supported() && !v("6.0.24r1").supported() && v("6.1.0r1").supported());
        assert_eq!(v("6.1.50r1").delete_flag(), "--delete");
        assert_eq!(v("7.1.4r1").delete_flag(), "--delete-all");
        assert_eq!(v("7.0.0r153978").rules_from(), RulesFrom::SettingsFile);
        for s in ["6.1.50r1", "7.0.2r154219", "7.0.20r163906", "7.1.4r165100"] {
            assert_eq!(v(s).rules_from(), RulesFrom::ShowVmInfo, "{s}");
        }
    }
}
