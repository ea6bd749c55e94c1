//! Known VBoxManage failure texts and what the user should do about them.

/// Advice for a failed VBoxManage call, from its stderr/stdout; `None` when the text is not one we know.
pub fn advice(text: &str) -> Option<&'static str> {
    let has = |needles: &[&str]| needles.iter().any(|n| text.contains(n));
    if has(&["VERR_VMX_MSR_ALL_VMX_DISABLED", "VERR_VMX_MSR_VMX_DISABLED", "VERR_SVM_DISABLED"]) {
        return Some(
            "hint: hardware virtualization (VT-x/AMD-V) is disabled in the firmware: enable \"Intel Virtualization \
             Technology\" / \"SVM Mode\" in the BIOS/UEFI setup, then power-cycle the host",
        );
    }
    if has(&[
        "VERR_VMX_NO_VMX",
        "VERR_SVM_NO_SVM",
        "VERR_VMX_IN_VMX_ROOT_MODE",
        "VERR_SVM_IN_USE",
        "VERR_NEM_NOT_AVAILABLE",
        "VERR_NEM_VM_CREATE_FAILED",
        "VT-x is not available",
        "AMD-V is not available",
        "Hyper-V",
    ]) {
        return Some(
            "hint: VirtualBox cannot use VT-x/AMD-V because another hypervisor holds it.\n\
             hint: on Windows, Hyper-V, WSL2, Docker Desktop, \"Virtual Machine Platform\", \"Windows Hypervisor \
             Platform\" or Memory integrity (Core isolation) take it: run `bcdedit /set hypervisorlaunchtype off` in \
             an elevated prompt, turn those features off, and reboot (`bcdedit /set hypervisorlaunchtype auto` undoes \
             it); or use VirtualBox 7 or newer, which can run on top of Hyper-V (slowly).\n\
             hint: on Linux, KVM holds it while a QEMU/libvirt VM runs or the kvm modules are loaded: stop those VMs \
             and `sudo modprobe -r kvm_intel kvm_amd`, or use `provider = \"libvirt\"` instead",
        );
    }
    if has(&["networks.conf", "not within the allowed ranges"]) {
        return Some(
            "hint: VirtualBox 6.1.28+ only allows host-only networks in 192.168.56.0/21 unless /etc/vbox/networks.conf \
             lists more (e.g. a line `* 10.0.0.0/8 192.168.0.0/16`). provisioner itself only uses NAT; if the box \
             brings a host-only adapter, allow its range there or remove the adapter from the box",
        );
    }
    if has(&["Nonexistent host networking interface"]) {
        return Some(
            "hint: the box's VM has a network adapter bound to a host interface that does not exist here; \
             provisioner only needs NAT (adapter 1): remove the extra adapter from the box, or create the interface \
             (`VBoxManage hostonlyif create`)",
        );
    }
    if text.contains("already exists") && has(&["settings file", "VBOX_E_FILE_ERROR"]) {
        return Some(
            "hint: an earlier import or clone was interrupted and left its folder behind (VirtualBox does not list \
             it): delete the folder named in the message (under \"VirtualBox VMs\") and run again",
        );
    }
    if has(&["inaccessible", "Inaccessible"]) {
        return Some(
            "hint: VirtualBox lists the VM as inaccessible: its settings file or a disk it needs was moved or deleted \
             (for a linked clone, also the provisioner-master-* VM it was cloned from). Remove the dead entry with \
             `VBoxManage list vms` + `VBoxManage unregistervm <uuid>`, then run `provisioner destroy` and `provisioner up`",
        );
    }
    if has(&["vboxdrv", "VERR_VM_DRIVER_NOT_INSTALLED", "VERR_VM_DRIVER_NOT_ACCESSIBLE"]) {
        return Some(
            "hint: the VirtualBox kernel driver is not loaded: run `sudo /sbin/vboxconfig` (install the kernel \
             headers first; with Secure Boot, sign the modules or enroll the MOK), and make sure your user is in the \
             vboxusers group",
        );
    }
    None
}

#[cfg(test)]
mod tests {
    use super::advice;

    #[test]
    fn known_texts_get_advice() {
        let vtx = "VBoxManage: error: VT-x is not available (VERR_VMX_NO_VMX)\nVBoxManage: error: Details: code E_FAIL";
        assert!(advice(vtx).unwrap().contains("bcdedit /set hypervisorlaunchtype off"));
        assert!(advice("AMD-V is not available (VERR_SVM_NO_SVM)").unwrap().contains("Hyper-V"));
        assert!(advice("VT-x is disabled in the BIOS for all CPU modes (VERR_VMX_MSR_ALL_VMX_DISABLED)")
            .unwrap()
            .contains("BIOS"));
        assert!(advice("see /etc/vbox/networks.conf").unwrap().contains("networks.conf"));
        assert!(advice("The machine is inaccessible").unwrap().contains("unregistervm"));
        assert!(advice("WARNING: The vboxdrv kernel module is not loaded.").unwrap().contains("vboxconfig"));
        let leftover = "Machine settings file '/h/VirtualBox VMs/m/m.vbox' already exists";
        assert!(advice(leftover).unwrap().contains("delete the folder"));
        assert_eq!(advice("A NAT rule of this name already exists"), None);
        assert_eq!(advice("VBoxManage: error: something new"), None);
    }
}
