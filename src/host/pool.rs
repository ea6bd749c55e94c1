//! The storage pool of a libvirt host that holds remote machines' volumes: the box goes in once per host, keyed
//! by its content hash ([`box_volume`]); machines get volumes named after the domain ([`machine_volume`]). The
//! names, the parsing and the virsh calls on the pool (through the host's [`Libvirtd`]) are here; what goes in
//! (a box, a machine's disk and seed) is the libvirt provider's.

use std::path::Path;

use anyhow::{bail, Context, Result};

use super::libvirtd::{is_connect_error, Libvirtd};

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

/// How long an interrupted upload may take to delete its partial volume (within the interrupt grace).
const PARTIAL_DELETE: std::time::Duration = std::time::Duration::from_secs(10);

/// Upload deadline for `bytes`: generous for a slow link (1 MiB/s) plus a minute.
fn upload_timeout(bytes: u64) -> std::time::Duration {
    std::time::Duration::from_secs(60 + bytes / (1 << 20))
}

impl Libvirtd {
    fn pool_args<'a>(&'a self, verb: &'a str, vol: &'a str) -> [&'a str; 5] {
        [verb, "--pool", &self.pool, "--vol", vol]
    }

    /// The pool exists and runs (made as a dir pool when missing); returns whether volume `probe` is in it.
    /// One virsh connection when the pool runs (pool-info and vol-info as one batch), two when it is made.
    pub fn ensure_pool(&self, probe: &str) -> Result<bool> {
        let host = self.host.name(&self.uri);
        let q = crate::host::shell_quote;
        let batch = format!(
            "pool-info --pool {}; vol-info --pool {} --vol {}",
            q(&self.pool),
            q(&self.pool),
            q(probe)
        );
        let out = self.output(&[&batch])?;
        let has_probe =
            out.stdout.lines().any(|l| l.strip_prefix("Name:").is_some_and(|n| n.trim() == probe));
        let pool_line = out.stdout.lines().find(|l| l.starts_with("State:"));
        if let Some(state) = pool_line {
            if state.contains("running") {
                return Ok(has_probe);
            }
            self.run(&["pool-start", "--pool", &self.pool])
                .map_err(|e| pool_error(&self.pool, &host, &format!("{e:#}")))?;
            return Ok(has_probe);
        }
        if is_connect_error(&out.stderr) || self.host.host_key_failure(&out.stderr).is_some() {
            return Err(self.unreachable(out.stderr.trim()));
        }
        let (p, t) = (q(&self.pool), q(&pool_target(&self.pool)));
        let create = format!(
            "pool-define-as --name {p} --type dir --target {t}; pool-build --pool {p}; pool-autostart --pool {p}; \
             pool-start --pool {p}"
        );
        let out = self.output(&[&create])?;
        if !out.success() {
            return Err(pool_error(&self.pool, &host, out.stderr.trim()));
        }
        Ok(false)
    }

    pub fn vol_exists(&self, name: &str) -> Result<bool> {
        let out = self.output(&self.pool_args("vol-info", name))?;
        if out.success() {
            return Ok(true);
        }
        if out.stderr.contains("Storage volume not found") || out.stderr.contains("no storage vol") {
            return Ok(false);
        }
        Err(self.unreachable(out.stderr.trim()))
    }

    pub fn vol_path(&self, name: &str) -> Result<String> {
        Ok(self.run(&self.pool_args("vol-path", name))?.trim().to_string())
    }

    fn vol_delete(&self, name: &str) -> Result<()> {
        self.run(&self.pool_args("vol-delete", name)).map(drop)
    }

    /// Upload `file` as volume `name` (replacing a leftover of that name), in libvirt's large stream blocks, with
    /// a progress bar (bytes, rate) on a terminal: a sparse file (an eighth or more holes) without its holes. Returns
    /// the bytes sent: the file's data, or its size when its few holes were sent as zeros.
    pub fn upload_file(&self, name: &str, file: &Path) -> Result<u64> {
        let f = std::fs::File::open(file).with_context(|| format!("read {}", file.display()))?;
        let size = f.metadata().with_context(|| format!("read {}", file.display()))?.len();
        let data = crate::platform::data_bytes(&f).unwrap_or(size).min(size);
        drop(f);
        // A file with few holes (under an eighth: a qcow2 box) streams fastest into the host's own virsh through
        // the shared connection (ssh reads it as stdin: no virsh here, no virt-ssh-helper there), zeros and all; a
        // sparser one goes through the remote driver, whose `--sparse` sends its data only.
        let far = self.far_virsh().filter(|_| data >= size - size / 8);
        let sent = if far.is_some() { size } else { data };
        let bar = crate::ui::bytes_bar(sent, name);
        // Dropped when the upload ends: the poll below stops at once (not after its next pause).
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        // One virsh connection (one SSH handshake) for the three steps: a leftover of that name goes (its
        // "not found" is expected and ignored), a raw volume of the file's size is made, the file is streamed into
        // it. virsh runs `;`-separated commands in order and exits with the last one's status.
        let batch = upload_batch(&self.pool, name, size, &file.to_string_lossy());
        let (res, sent) = std::thread::scope(|s| {
            // Progress: the volume's allocation on the host (its data so far), polled beside the upload (the
            // stream itself is virsh's) through the host's shared connection.
            if let Some(bar) = &bar {
                s.spawn(move || loop {
                    let out = self.output(&["vol-info", "--bytes", "--pool", &self.pool, "--vol", name]);
                    if let Some(n) = out.ok().and_then(|o| allocation(&o.stdout)) {
                        bar.set_position(n.min(sent));
                    }
                    if stopped.recv_timeout(std::time::Duration::from_millis(500))
                        != Err(std::sync::mpsc::RecvTimeoutError::Timeout)
                    {
                        break;
                    }
                });
            }
            let res = match far {
                Some((r, local)) => {
                    let on_host = upload_batch(&self.pool, name, size, "/dev/stdin").replace(" --sparse", "");
                    self.on_host(r, &local, &[&on_host], Some(file), upload_timeout(size)).transpose()
                }
                None => None,
            };
            // Through the remote driver (also when the host turned out to have no virsh): the data only.
            let res = res
                .map(|r| (r, sent))
                .unwrap_or_else(|| (self.virsh().arg(&batch).timeout(upload_timeout(data)).output(), data));
            drop(stop);
            res
        });
        if crate::process::interrupted().is_some() {
            if let Some(b) = &bar {
                b.abandon();
            }
            self.delete_partial(name);
            crate::process::check_interrupted()?;
        }
        let out = res?;
        if !out.success() {
            if let Some(b) = &bar {
                b.abandon();
            }
            // The leftover's absence is not the error.
            let err: Vec<&str> = out
                .stderr
                .lines()
                .filter(|l| !l.contains("failed to get vol") && !l.contains("Storage volume not found"))
                .filter(|l| !l.trim().is_empty())
                .collect();
            let err = err.join("\n");
            let err = err.as_str();
            if let Some(e) = self.host.host_key_failure(err) {
                return Err(e);
            }
            bail!(
                "uploading {} to the volume {name} on {} failed: {err}\nhint: run the command again: an \
                 incomplete upload is deleted and started over",
                file.display(),
                self.uri
            );
        }
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        Ok(sent)
    }

    /// After an interrupt during the upload of volume `name`: delete the partial volume within
    /// [`PARTIAL_DELETE`] (a cleanup step: it runs although the run is cancelled), and say in the interrupt
    /// message what stays on the host.
    fn delete_partial(&self, name: &str) {
        let host = self.host.name(&self.uri);
        let out =
            self.virsh().args(self.pool_args("vol-delete", name)).timeout(PARTIAL_DELETE).cleanup().output();
        let note = match out {
            Ok(o) if o.success() || o.stderr.contains("Storage volume not found") => {
                format!("the partial volume {name} was deleted from the pool {} on {host}", self.pool)
            }
            other => format!(
                "the partial volume {name} stays in the pool {} on {host} (deleting it within {} s failed: {}); \
                 the next {}",
                self.pool,
                PARTIAL_DELETE.as_secs(),
                match other {
                    Ok(o) => o.stderr.trim().lines().last().unwrap_or("no message").to_string(),
                    Err(e) => format!("{e:#}"),
                },
                if name.starts_with(&box_volume("", "")) {
                    "`box upload` or `up` deletes it and sends the box again"
                } else {
                    "`up` deletes it and sends it again"
                }
            ),
        };
        crate::process::set_interrupt_note(note);
    }

    /// The text of volume `vol` (a machine's serial log, which QEMU writes into the pool's directory), read after
    /// a pool refresh.
    pub fn download(&self, vol: &str) -> Result<String> {
        self.run(&["pool-refresh", "--pool", &self.pool])?;
        let tmp = tempfile::NamedTempFile::new()?;
        let path = tmp.path().to_string_lossy().into_owned();
        self.run_here(&["vol-download", "--pool", &self.pool, "--vol", vol, "--file", &path])?;
        Ok(String::from_utf8_lossy(&std::fs::read(tmp.path())?).into_owned())
    }

    /// Remove a box (every volume named `box-<id>...`) from the host's pool. Returns the volumes removed.
    pub fn remove_box(&self, id_prefix: &str) -> Result<Vec<String>> {
        self.run(&["pool-refresh", "--pool", &self.pool])?;
        let vols = parse_vol_list(&self.run(&["vol-list", "--pool", &self.pool])?);
        let prefix = box_volume(id_prefix, "");
        let mut mine: Vec<String> = vols.iter().filter(|v| v.starts_with(&prefix)).cloned().collect();
        let users = self.box_users(&vols, &mine)?;
        if !users.is_empty() {
            bail!(
                "the box {id_prefix} on {} is in use by {}: removing it would break those machines' disks
hint:                  `provisioner destroy -f` those machines first (in their projects), then remove the box",
                self.uri,
                users.join(", ")
            );
        }
        // The marker first: a box half removed is then uploaded again, never used half there.
        mine.sort_by_key(|v| !v.ends_with(".done"));
        for v in &mine {
            self.vol_delete(v)?;
        }
        Ok(mine)
    }

    /// What uses the box volumes `boxes` of the pool: other volumes backed by them (machine disks) and domains that
    /// name them (direct-boot kernel and initrd).
    fn box_users(&self, vols: &[String], boxes: &[String]) -> Result<Vec<String>> {
        let paths: Vec<String> = boxes.iter().map(|b| self.vol_path(b)).collect::<Result<_>>()?;
        // A path as an element's text (`<path>`, `<kernel>`) or an attribute value (`<source file=...>`).
        let names = |xml: &str| crate::xml::mentions(xml, &paths);
        let mut users = Vec::new();
        for v in vols.iter().filter(|v| !v.starts_with(BOX_PREFIX)) {
            if names(&self.run(&["vol-dumpxml", "--pool", &self.pool, v])?) {
                users.push(format!("the volume {v}"));
            }
        }
        for d in self.run(&["list", "--all", "--name"])?.lines().map(str::trim).filter(|d| !d.is_empty()) {
            if names(&self.run(&["dumpxml", "--", d])?) {
                users.push(format!("the domain {d}"));
            }
        }
        Ok(users)
    }

    /// Delete every volume of the machine (named `<domain>-...`); the box volume stays.
    pub fn delete_machine_volumes(&self, vm_name: &str) -> Result<()> {
        let out = self.output(&["pool-refresh", "--pool", &self.pool])?;
        if !out.success() {
            if out.stderr.contains("Storage pool not found") || out.stderr.contains("no storage pool") {
                return Ok(());
            }
            return Err(self.unreachable(out.stderr.trim()));
        }
        let prefix = machine_volume(vm_name, "");
        for v in parse_vol_list(&self.run(&["vol-list", "--pool", &self.pool])?) {
            if v.starts_with(&prefix) {
                self.vol_delete(&v)?;
            }
        }
        Ok(())
    }
}

/// The virsh batch that (re)creates volume `name` and uploads `file` into it. Every word is quoted for virsh's
/// own parser (the same single-quote rules as a POSIX shell). Pure.
pub fn upload_batch(pool: &str, name: &str, size: u64, file: &str) -> String {
    let q = crate::host::shell_quote;
    let (p, n) = (q(pool), q(name));
    format!(
        "vol-delete --pool {p} --vol {n}; vol-create-as --pool {p} --name {n} --capacity {size} --format raw; \
         vol-upload --pool {p} --vol {n} --file {} --sparse",
        q(file)
    )
}

/// `Allocation:` of `virsh vol-info --bytes`.
fn allocation(out: &str) -> Option<u64> {
    out.lines()
        .find_map(|l| l.strip_prefix("Allocation:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
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
