//! `provisioner package`: a machine's disk as a vagrant-libvirt box (format v1, as vagrant-libvirt's own
//! `package` writes it): a tar holding `box.img` (the overlay flattened onto its base with `qemu-img convert`),
//! `metadata.json` and a `Vagrantfile`. A box that boots its kernel directly (ours, built from a Debian mirror,
//! has no bootloader) also carries `vmlinuz` and `initrd.img`, named in the Vagrantfile for vagrant-libvirt and
//! picked up by `[box] vagrant =`.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};

use super::BoxImage;
use crate::process::Cmd;

pub const KERNEL: &str = "vmlinuz";
pub const INITRD: &str = "initrd.img";
const CONVERT_TIMEOUT: Duration = Duration::from_secs(60 * 60);

/// `metadata.json` (vagrant-libvirt box format v1): virtual size in whole GiB, rounded up.
pub fn metadata_json(virtual_bytes: u64) -> String {
    let gib = virtual_bytes.div_ceil(1 << 30);
    format!("{{\n  \"provider\": \"libvirt\",\n  \"format\": \"qcow2\",\n  \"virtual_size\": {gib}\n}}\n")
}

/// The box's `Vagrantfile`; with `cmdline`, the kernel and initrd beside it boot the disk directly.
pub fn vagrantfile(cmdline: Option<&str>) -> String {
    let mut s = String::from(
        "# Written by `provisioner package`.\nVagrant.configure(\"2\") do |config|\n  \
         config.vm.provider :libvirt do |libvirt|\n    libvirt.driver = \"kvm\"\n",
    );
    if let Some(cmdline) = cmdline {
        let quoted = cmdline.replace('\\', "\\\\").replace('"', "\\\"");
        s.push_str(&format!(
            "    # No bootloader in this image: boot the kernel shipped beside it.\n    \
             libvirt.kernel = File.expand_path(\"{KERNEL}\", __dir__)\n    \
             libvirt.initrd = File.expand_path(\"{INITRD}\", __dir__)\n    libvirt.cmd_line = \"{quoted}\"\n"
        ));
    }
    s.push_str("  end\nend\n");
    s
}

/// Flatten `disk` into `work/box.img`, add the metadata (and kernel), and write the tar to `out` atomically.
/// Returns the size of the box file.
pub fn write_box(disk: &Path, base: &BoxImage, work: &Path, out: &Path) -> Result<u64> {
    let img = work.join("box.img");
    Cmd::new("qemu-img")
        .args(["convert", "-O", "qcow2"])
        .arg(disk)
        .arg(&img)
        .timeout(CONVERT_TIMEOUT)
        .run()
        .with_context(|| format!("flatten {} into a box image", disk.display()))?;
    let info = Cmd::new("qemu-img").args(["info", "--output=json"]).arg(&img).run()?;
    let v: serde_json::Value = serde_json::from_str(&info.stdout).context("parse `qemu-img info` output")?;
    let virtual_bytes = v["virtual-size"].as_u64().context("`qemu-img info` reports no virtual-size")?;
    std::fs::write(work.join("metadata.json"), metadata_json(virtual_bytes))?;
    let mut files = vec!["metadata.json", "Vagrantfile", "box.img"];
    let cmdline = match (&base.kernel, &base.initrd) {
        (Some(k), Some(i)) => {
            std::fs::copy(k, work.join(KERNEL)).with_context(|| format!("copy {}", k.display()))?;
            std::fs::copy(i, work.join(INITRD)).with_context(|| format!("copy {}", i.display()))?;
            files.extend([KERNEL, INITRD]);
            Some(base.cmdline.clone().unwrap_or_else(|| super::debian::CMDLINE.to_string()))
        }
        _ => None,
    };
    std::fs::write(work.join("Vagrantfile"), vagrantfile(cmdline.as_deref()))?;

    let partial = work.join("out.box.partial");
    let file = std::fs::File::create(&partial).with_context(|| format!("create {}", partial.display()))?;
    let mut tar = tar::Builder::new(std::io::BufWriter::new(file));
    tar.sparse(true);
    for f in files {
        tar.append_path_with_name(work.join(f), f).with_context(|| format!("add {f} to the box"))?;
    }
    tar.into_inner()?.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    std::fs::rename(&partial, out).with_context(|| format!("move the box to {}", out.display()))?;
    Ok(std::fs::metadata(out)?.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_rounds_the_virtual_size_up_to_gib() {
        let md: serde_json::Value = serde_json::from_str(&metadata_json((8 << 30) + 1)).unwrap();
        assert_eq!(md, serde_json::json!({"provider": "libvirt", "format": "qcow2", "virtual_size": 9}));
        let md: serde_json::Value = serde_json::from_str(&metadata_json(8 << 30)).unwrap();
        assert_eq!(md["virtual_size"], 8);
    }

    #[test]
    fn vagrantfile_names_the_kernel_only_for_direct_boot() {
        let plain = vagrantfile(None);
        assert!(plain.contains("config.vm.provider :libvirt") && !plain.contains("kernel"), "{plain}");
        let direct = vagrantfile(Some("root=/dev/vda rw console=\"ttyS0\""));
        assert!(direct.contains("libvirt.kernel = File.expand_path(\"vmlinuz\", __dir__)"), "{direct}");
        assert!(direct.contains("libvirt.initrd = File.expand_path(\"initrd.img\", __dir__)"), "{direct}");
        assert!(direct.contains(r#"libvirt.cmd_line = "root=/dev/vda rw console=\"ttyS0\"""#), "{direct}");
    }
}
