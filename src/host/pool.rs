//! The storage pool of a libvirt host that holds remote machines' volumes: the box goes in once per host, keyed
//! by its content hash ([`box_volume`]); machines get volumes named after the domain ([`machine_volume`]). The
//! names and parsing are here; the virsh calls that fill the pool are the libvirt provider's.

/// The pool volume of a box: `box-<content hash>` (+ `-vmlinuz`, `-initrd`); `.done` marks a complete upload.
pub fn box_volume(box_id: &str, part: &str) -> String {
    format!("{BOX_PREFIX}{box_id}{part}")
}

/// Every box volume's name starts with it.
pub const BOX_PREFIX: &str = "box-";

/// A machine's volume: `<domain name>-<what>`, so `destroy` finds all of them by prefix.
pub fn machine_volume(vm_name: &str, what: &str) -> String {
    format!("{vm_name}-{what}")
}

/// The target directory of a pool the tool creates on a remote host.
pub fn pool_target(pool: &str) -> String {
    format!("/var/lib/libvirt/images/{pool}")
}

/// `virsh vol-list --pool P` output to volume names. Pure.
pub fn parse_vol_list(out: &str) -> Vec<String> {
    out.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("Name") && !l.starts_with("---"))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

/// Errors about a pool that cannot be made.
pub fn pool_error(pool: &str, host: &str, err: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "cannot create or start the storage pool {pool:?} on {host}: {err}\nhint: the tool makes a dir pool at {} \
         on qemu:///system; for another URI define one yourself (`virsh pool-define-as {pool} dir --target DIR; \
         virsh pool-build {pool}; virsh pool-start {pool}`) or name an existing pool in [libvirt] pool",
        pool_target(pool)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vol_list_names() {
        let out = " Name          Path\n------------------------\n box-ab   /p/box-ab\n m-disk.qcow2  /p/m\n";
        assert_eq!(parse_vol_list(out), vec!["box-ab", "m-disk.qcow2"]);
    }
}
