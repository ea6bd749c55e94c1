//! A libvirt host reached over SSH, seen from the provider: the ssh wrapper libvirt's `ssh` transport runs, the box
//! and the machine's volumes put into the host's storage pool (`Libvirt::upload_box`, `remote_volumes`) and its
//! serial console read from there. What a remote host is (its known_hosts pin, the SSH session and tunnel to it,
//! its libvirt daemon and the pool's volumes) is [`crate::host`]: the pool calls are [`crate::host::pool`]'s.

use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::host::pool::{box_volume, machine_volume};
use crate::host::RemoteHost;

/// Write the wrapper (0700) into the tool's cache dir, named by its contents; returns its path.
pub(super) fn write_wrapper(host: &RemoteHost) -> Result<PathBuf> {
    use sha2::Digest;
    let script = host.wrapper_script();
    let hash = hex::encode(&sha2::Sha256::digest(script.as_bytes())[..6]);
    let dir = crate::boxes::cache_dir().join("remote");
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let path = dir.join(format!("ssh-{hash}"));
    if std::fs::read_to_string(&path).ok().as_deref() != Some(script.as_str()) {
        let tmp = dir.join(format!(".ssh-{hash}.{}", std::process::id()));
        crate::machine::write_private(&tmp, script.as_bytes(), 0o700)?;
        std::fs::rename(&tmp, &path).with_context(|| format!("write {}", path.display()))?;
    }
    Ok(path)
}

impl super::Libvirt {
    /// The box in the host's pool, once per host: nothing is sent when its complete marker exists. An interrupted
    /// upload has no marker and is deleted and sent again. Returns the bytes sent.
    pub fn upload_box(&self, base: &crate::provider::BoxImage) -> Result<u64> {
        let done = box_volume(&base.id, ".done");
        if self.d.ensure_pool(&done)? {
            return Ok(0);
        }
        let mut files = vec![(box_volume(&base.id, &format!(".{}", base.format)), base.disk.clone())];
        if let Some(k) = &base.kernel {
            files.push((box_volume(&base.id, "-vmlinuz"), k.clone()));
        }
        if let Some(i) = &base.initrd {
            files.push((box_volume(&base.id, "-initrd"), i.clone()));
        }
        let mut sent = 0;
        for (n, (vol, file)) in files.iter().enumerate() {
            sent += self.d.upload_file(vol, file).inspect_err(|_| {
                // Volumes sent whole before the interrupt stay too, without the marker that makes them count.
                if let (Some(note), true) = (crate::process::interrupt_note(), n > 0) {
                    let whole: Vec<&str> = files[..n].iter().map(|(v, _)| v.as_str()).collect();
                    crate::process::set_interrupt_note(format!(
                        "{note}; {} (sent whole) stay without the box's marker {done}, and the next `box upload` \
                         or `up` sends them again",
                        whole.join(", ")
                    ));
                }
            })?;
        }
        if crate::process::interrupted().is_some() {
            crate::process::set_interrupt_note(format!(
                "the box's volumes (sent whole) stay in the pool {} without their marker {done}; the next `box \
                 upload` or `up` sends them again",
                self.d.pool
            ));
        }
        self.d.run(&[
            "vol-create-as",
            "--pool",
            &self.d.pool,
            "--name",
            &done,
            "--capacity",
            "0",
            "--format",
            "raw",
        ])?;
        Ok(sent)
    }

    /// Remove a box (every volume named `box-<id>...`) from the host's pool. Returns the volumes removed.
    pub fn remove_box(&self, id_prefix: &str) -> Result<Vec<String>> {
        self.d.remove_box(id_prefix)
    }

    /// Delete every volume of the machine (named `<domain>-...`); the box volume stays.
    pub(super) fn delete_machine_volumes(&self, vm_name: &str) -> Result<()> {
        self.d.delete_machine_volumes(vm_name)
    }

    /// The machine's volumes (box uploaded if needed, overlay, seed) and the remote paths for its domain XML.
    pub(super) fn remote_volumes(&self, spec: &crate::provider::MachineSpec) -> Result<super::DomainPaths> {
        let host = self.d.host.name(&self.d.uri);
        let start = std::time::Instant::now();
        let sent = self.upload_box(&spec.base)?;
        let secs = start.elapsed().as_secs_f64();
        if sent == 0 {
            eprintln!(
                "    box {} already on {host} (pool {}): 0 bytes sent",
                &spec.base.id[..12.min(spec.base.id.len())],
                self.d.pool
            );
        } else {
            eprintln!(
                "    box {} uploaded to {host} (pool {}): {sent} bytes sent in {secs:.1} s",
                &spec.base.id[..12.min(spec.base.id.len())],
                self.d.pool
            );
        }
        let backing = box_volume(&spec.base.id, &format!(".{}", spec.base.format));
        let disk = machine_volume(&spec.vm_name, "disk.qcow2");
        if !self.d.vol_exists(&disk)? {
            self.d
                .run(&[
                    "vol-create-as",
                    "--pool",
                    &self.d.pool,
                    "--name",
                    &disk,
                    "--capacity",
                    &format!("{}G", spec.disk_gb),
                    "--format",
                    "qcow2",
                    "--backing-vol",
                    &backing,
                    "--backing-vol-format",
                    &spec.base.format,
                ])
                .context("create the machine's disk overlay on the remote host")?;
        }
        let seed = machine_volume(&spec.vm_name, "seed.iso");
        let seeded = !spec.seed_iso.as_os_str().is_empty();
        if seeded {
            self.d.upload_file(&seed, &spec.seed_iso)?;
        }
        let disk_path = self.d.vol_path(&disk)?;
        let dir = disk_path.rsplit_once('/').map(|(d, _)| d.to_string()).unwrap_or_default();
        let part = |p: &str| -> Result<String> { self.d.vol_path(&box_volume(&spec.base.id, p)) };
        Ok(super::DomainPaths {
            disk: disk_path,
            extra_disks: Vec::new(),
            seed: if seeded { self.d.vol_path(&seed)? } else { String::new() },
            serial_log: format!("{dir}/{}", machine_volume(&spec.vm_name, "serial.log")),
            kernel: spec.base.kernel.as_ref().map(|_| part("-vmlinuz")).transpose()?,
            initrd: spec.base.initrd.as_ref().map(|_| part("-initrd")).transpose()?,
        })
    }

    /// The serial console of a machine on the remote host (QEMU writes it into the pool's directory): downloaded
    /// after a pool refresh, with where it lives and the command that reads it. Empty when it cannot be read.
    pub(super) fn remote_serial_console(&self, vm_name: &str) -> (String, String) {
        let vol = machine_volume(vm_name, "serial.log");
        let place = format!(
            "the volume {vol} on {} (`virsh -c {} vol-download --pool {} {vol} /dev/stdout`)",
            self.d.host.name(&self.d.uri),
            self.d.uri,
            self.d.pool
        );
        let text = self.d.download(&vol).unwrap_or_default();
        (text, place)
    }
}
