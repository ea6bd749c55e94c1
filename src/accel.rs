//! Choosing between KVM and TCG (software emulation).
//!
//! `/dev/kvm` existing is not enough: nested setups (e.g. PVM) expose a device node on CPUs without the vmx/svm
//! flag, and a stock kernel then hangs in its decompressor. `auto` picks KVM only when the node opens read-write
//! AND `/proc/cpuinfo` has vmx or svm; the decision is a pure function of those two facts so it can be tested.

use anyhow::{bail, Result};

use crate::config::Accel;

/// What the host offers, as probed (or given by a test).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostAccel {
    /// `Ok` when `/dev/kvm` opens read-write; otherwise why not.
    pub kvm_node: Result<(), String>,
    /// The CPU flags line names `vmx` (Intel VT-x) or `svm` (AMD-V).
    pub virt_flag: bool,
}

impl HostAccel {
    /// Probe this host.
    pub fn probe() -> Self {
        let kvm_node = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .map(drop)
            .map_err(|e| format!("/dev/kvm: {e}"));
        let cpuinfo = crate::platform::cpuinfo();
        Self { kvm_node, virt_flag: cpuinfo_has_virt_flag(&cpuinfo) }
    }
}

/// Whether any `flags` line of a /proc/cpuinfo text names vmx or svm.
pub(crate) fn cpuinfo_has_virt_flag(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .filter_map(|l| l.split_once(':'))
        .any(|(_, flags)| flags.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

/// The outcome: KVM or not, and a warning to show when `auto` fell back to TCG.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub kvm: bool,
    pub warning: Option<String>,
}

impl Decision {
    /// "kvm" or "tcg", as recorded in state.json.
    pub fn label(&self) -> &'static str {
        if self.kvm {
            "kvm"
        } else {
            "tcg"
        }
    }
}

/// Decide the accelerator for a requested mode on a host.
pub fn decide_accel(requested: Accel, host: &HostAccel) -> Result<Decision> {
    let why_not = match (&host.kvm_node, host.virt_flag) {
        (Ok(()), true) => None,
        (Err(e), _) => Some(e.to_string()),
        (Ok(()), false) => Some(
            "/dev/kvm exists but the CPU flags in /proc/cpuinfo have neither vmx nor svm (nested or paravirtual \
             KVM cannot run a stock guest kernel)"
                .to_string(),
        ),
    };
    match (requested, why_not) {
        (Accel::Tcg, _) => Ok(Decision { kvm: false, warning: None }),
        (Accel::Kvm | Accel::Auto, None) => Ok(Decision { kvm: true, warning: None }),
        (Accel::Kvm, Some(why)) => bail!(
            "accel = \"kvm\" was requested but KVM is not usable here: {why}\n\
             hint: enable virtualization (VT-x/AMD-V) in the firmware or for this VM, load kvm_intel/kvm_amd, make \
             /dev/kvm readable and writable for your user (group kvm), or set accel = \"tcg\" (or \"auto\") in \
             [machine] of box-config.toml"
        ),
        (Accel::Auto, Some(why)) => Ok(Decision {
            kvm: false,
            warning: Some(format!(
                "KVM is not usable ({why}); using TCG software emulation, which is much slower (about 40 s to SSH)"
            )),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTEL: &str = "processor\t: 0\nflags\t\t: fpu vme de pse vmx sse2\n";
    const PVM: &str = "processor\t: 0\nflags\t\t: fpu vme de pse sse2 hypervisor\n";

    fn host(node: bool, cpuinfo: &str) -> HostAccel {
        HostAccel {
            kvm_node: if node { Ok(()) } else { Err("/dev/kvm: No such file or directory".into()) },
            virt_flag: cpuinfo_has_virt_flag(cpuinfo),
        }
    }

    #[test]
    fn flag_parsing_needs_whole_words() {
        assert!(cpuinfo_has_virt_flag(INTEL));
        assert!(cpuinfo_has_virt_flag("flags : svm\n"));
        assert!(!cpuinfo_has_virt_flag(PVM));
        assert!(!cpuinfo_has_virt_flag("flags : vmxx svmy\nmodel name : vmx\n"));
    }

    #[test]
    fn auto_uses_kvm_only_with_node_and_flag() {
        assert!(decide_accel(Accel::Auto, &host(true, INTEL)).unwrap().kvm);
        for h in [host(true, PVM), host(false, INTEL), host(false, PVM)] {
            let d = decide_accel(Accel::Auto, &h).unwrap();
            assert!(!d.kvm, "{h:?}");
            assert!(d.warning.as_deref().unwrap().contains("TCG"), "{d:?}");
        }
    }

    #[test]
    fn kvm_requested_but_unusable_explains_why() {
        let e = decide_accel(Accel::Kvm, &host(true, PVM)).unwrap_err().to_string();
        assert!(e.contains("neither vmx nor svm") && e.contains("hint:"), "{e}");
        let e = decide_accel(Accel::Kvm, &host(false, INTEL)).unwrap_err().to_string();
        assert!(e.contains("No such file"), "{e}");
        assert!(decide_accel(Accel::Kvm, &host(true, INTEL)).unwrap().kvm);
    }

    #[test]
    fn tcg_is_always_tcg_without_warning() {
        let d = decide_accel(Accel::Tcg, &host(true, INTEL)).unwrap();
        assert_eq!(d, Decision { kvm: false, warning: None });
    }
}
