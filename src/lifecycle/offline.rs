//! The keys route of a machine (issue 20): a box that runs cloud-init gets its keys from the NoCloud seed; one
//! that does not (Vagrant's `generic/*`, `bento/*`, `debian/*`, `vagrant package`) gets them written into the
//! machine's own disk before its first boot ([`crate::boxes::inject`]); what cloud-init did besides (hostname,
//! `/etc/hosts`, the private NIC, growing the root filesystem) is then done in the first SSH session.

use std::time::Duration;

use anyhow::{bail, Result};

use super::Machine;
use crate::boxes::inject::{self, Route};
use crate::boxes::BoxImage;
use crate::config::{KeysRoute, ProviderKind};
use crate::keys::KeyPair;
use crate::provider::{PrivateNic, Provider};
use crate::ssh::Session;
use crate::ui::Ui;

/// The box's boot disk, when the provider gives each machine its own copy of it that can be edited before the
/// first boot: libvirt's qcow2/raw (under the machine's overlay), VirtualBox's VMDK/VDI (under the clone's
/// differencing image). (path, qemu format).
fn box_disk(p: &dyn Provider, base: &BoxImage) -> Result<Option<(std::path::PathBuf, String)>> {
    Ok(match p.kind() {
        ProviderKind::Libvirt if matches!(base.format.as_str(), "qcow2" | "raw") => {
            Some((base.disk.clone(), base.format.clone()))
        }
        ProviderKind::Virtualbox if base.format == "ovf" => {
            crate::boxes::integrity::ovf_disks(&base.disk)?.into_iter().next()
        }
        _ => None,
    })
}

/// The route for a machine created now, and why (for the phase line).
pub(crate) fn decide(m: &Machine, p: &dyn Provider, base: &BoxImage) -> Result<(Route, String)> {
    let disk = box_disk(p, base)?;
    match m.cfg.base_box.keys {
        KeysRoute::CloudInit => Ok((Route::CloudInit, "[box] keys".into())),
        KeysRoute::InsecureOnce => {
            super::insecure_once::check_allowed(&m.cfg)?;
            Ok((Route::InsecureOnce, "[box] keys".into()))
        }
        KeysRoute::Disk if disk.is_none() => bail!(
            "[box] keys = \"disk\" is not supported for this {} box ({} disk): only libvirt's qcow2/raw disks and \
             VirtualBox's VMDK/VDI disks are edited before the first boot\nhint: use a box that runs cloud-init \
             (keys = \"cloud-init\"), or the libvirt or VirtualBox version of the box",
            p.name(),
            base.format
        ),
        KeysRoute::Disk | KeysRoute::Auto
            if p.kind() == ProviderKind::Libvirt
                && crate::host::Host::from_uri(&m.cfg.libvirt.uri).is_remote() =>
        {
            if m.cfg.base_box.keys == KeysRoute::Disk {
                bail!(
                    "[box] keys = \"disk\" is not yet supported on a remote libvirt host: the machine's disk is \
                     edited on this host before its first boot\nhint: run the machine on the local host, or use a box \
                     that runs cloud-init"
                );
            }
            Ok((Route::CloudInit, "remote libvirt host".into()))
        }
        KeysRoute::Disk => Ok((Route::Disk, "[box] keys".into())),
        KeysRoute::Auto => match disk {
            None => Ok((Route::CloudInit, format!("a {} disk is not read here", base.format))),
            // VirtualBox hosts (Windows, macOS) often have no qemu: the box is not read, it keeps the seed route.
            Some(_) if p.kind() == ProviderKind::Virtualbox && which::which("qemu-storage-daemon").is_err() => Ok((
                Route::CloudInit,
                "the box's disk was not read: no qemu-storage-daemon on this host (keys = \"disk\" needs it)".into(),
            )),
            Some((path, format)) => inject::detect_remembered(&path, &format, &m.state.path("inject")),
        },
    }
}

/// Write the machine's key, host key and hostname into its disk (before its first boot); returns the guest user
/// the key went to and the phase line.
/// The disk is the one the provider made for the machine `vm` (libvirt's overlay, VirtualBox's clone).
pub(crate) fn inject(
    m: &Machine,
    p: &dyn Provider,
    vm: &str,
    why: &str,
    user_key: &KeyPair,
    host_key: &KeyPair,
) -> Result<(String, String)> {
    let disk = p.offline_disk(vm, &m.state)?;
    if !disk.path.is_file() {
        bail!(
            "the machine's disk {} is not on this host, so it cannot be edited before the first boot (a remote \
             libvirt host)\nhint: use a box that runs cloud-init there, or run this machine on the local host",
            disk.path.display()
        );
    }
    let mut users = vec![m.cfg.ssh.user.clone()];
    if m.cfg.ssh.user != "vagrant" {
        users.push("vagrant".into());
    }
    let done = inject::inject_disk(
        &disk,
        &m.state.path("inject"),
        &inject::Injection {
            users,
            user_key: &user_key.public_openssh,
            host_key,
            hostname: m.cfg.hostname(),
        },
    )?;
    let removed = match done.insecure_removed {
        0 => "no insecure key was there".to_string(),
        1 => "insecure key removed".to_string(),
        n => format!("{n} insecure keys removed"),
    };
    let others = match done.others_removed {
        0 => String::new(),
        n => format!(", {n} other key(s) dropped"),
    };
    Ok((
        done.user.clone(),
        format!(
            "disk ({why}): machine key written for {}, {removed}{others}, host key set ({:.1} s)",
            done.user, done.seconds
        ),
    ))
}

/// The first SSH session of a disk-route machine: as root (sudo), what cloud-init did from the seed.
pub(crate) fn setup_script(hostname: &str, hosts: Option<&str>, nic: Option<&PrivateNic>) -> String {
    let q = |s: &str| format!("'{}'", s.replace('\'', "'\\''"));
    let mut s = String::from("set -e\n");
    s.push_str(&format!("hostname {} 2>/dev/null || true\n", q(hostname)));
    match hosts {
        Some(h) => s.push_str(&format!("printf '%s' {} > /etc/hosts\n", q(h))),
        None => s.push_str(&format!(
            "grep -qw {h} /etc/hosts || printf '127.0.1.1\\t%s\\n' {h} >> /etc/hosts\n",
            h = q(hostname)
        )),
    }
    if let Some(n) = nic {
        s.push_str(&format!(
            "dev=$(ip -o link | awk -v m={mac} 'index(tolower($0), m) {{ sub(\":\", \"\", $2); sub(\"@.*\", \"\", $2); print $2; exit }}')\n\
             if [ -n \"$dev\" ]; then ip link set \"$dev\" up; ip addr replace {ip}/{prefix} dev \"$dev\"; \
             else echo \"no NIC with MAC {mac}\" >&2; exit 3; fi\n",
            mac = q(&n.mac.to_ascii_lowercase()),
            ip = n.ip,
            prefix = n.prefix
        ));
    }
    // Grow the root filesystem to the disk: its partition first (growpart, when the box has cloud-guest-utils).
    s.push_str(
        "src=$(findmnt -no SOURCE /)\n\
         case \"$src\" in\n\
         /dev/vd[a-z][0-9]*|/dev/sd[a-z][0-9]*) if command -v growpart >/dev/null; then \
         growpart \"${src%%[0-9]*}\" \"${src##*[!0-9]}\" >/dev/null || true; fi ;;\n\
         esac\n\
         resize2fs \"$src\" >/dev/null 2>&1 || echo \"resize2fs $src failed\" >&2\n",
    );
    s
}

/// The command that runs [`setup_script`] as root (built before the session's checks, which it joins on a warm
/// `up`).
pub(crate) fn setup_command(
    cfg: &crate::config::Config,
    nic: Option<&PrivateNic>,
    hosts: Option<String>,
) -> String {
    format!("sudo -n sh -c {}", shell_quote(&setup_script(cfg.hostname(), hosts.as_deref(), nic)))
}

/// Run the [`setup_command`] `cmd` over `session`.
pub(crate) fn setup(session: &Session, ui: &Ui, cmd: &str) -> Result<()> {
    let ph = ui.phase("guest setup");
    let out = session.exec(cmd, Duration::from_secs(300))?;
    if out.status != 0 {
        bail!(
            "setting up the guest over SSH failed (exit {}):\n{}\nhint: the box's user needs password-less sudo \
             (Vagrant's box contract); check /etc/sudoers.d in the box",
            out.status,
            crate::process::tail(&out.output, 20)
        );
    }
    if !out.output.trim().is_empty() {
        ui.warn(out.output.trim());
    }
    ph.done("hostname, /etc/hosts, root filesystem grown (no cloud-init)");
    Ok(())
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setup_script_sets_hostname_hosts_nic_and_grows() {
        let s = setup_script("web", None, None);
        assert!(s.contains("hostname 'web'"));
        assert!(s.contains("127.0.1.1"));
        assert!(s.contains("resize2fs \"$src\""));
        assert!(!s.contains("ip addr"));
        let nic = PrivateNic {
            ip: "10.0.0.5".parse().unwrap(),
            prefix: 24,
            mac: "52:54:00:AA:bb:cc".into(),
            net: crate::provider::PrivateNet::for_uri("n", true, "qemu:///session"),
        };
        let s = setup_script("web", Some("10.0.0.5\tweb\n"), Some(&nic));
        assert!(s.contains("printf '%s' '10.0.0.5\tweb\n' > /etc/hosts"));
        assert!(s.contains("ip addr replace 10.0.0.5/24"));
        assert!(s.contains("'52:54:00:aa:bb:cc'"));
    }
}
