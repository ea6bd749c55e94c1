//! A libvirt host reached over SSH, seen from the provider: the ssh wrapper libvirt's `ssh` transport runs, and the
//! virsh calls that fill the host's storage pool (`Libvirt::upload_box`, ...). What a remote host is (its
//! known_hosts pin, the SSH session and tunnel to it, the pool's names) is [`crate::host`].

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::host::pool::{box_volume, machine_volume, parse_vol_list, pool_error, pool_target, BOX_PREFIX};
use crate::host::RemoteHost;
use crate::process::Cmd;

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

/// How long an interrupted upload may take to delete its partial volume (within the interrupt grace).
const PARTIAL_DELETE: std::time::Duration = std::time::Duration::from_secs(10);

/// Upload deadline for `bytes`: generous for a slow link (1 MiB/s) plus a minute.
fn upload_timeout(bytes: u64) -> std::time::Duration {
    std::time::Duration::from_secs(60 + bytes / (1 << 20))
}

impl super::Libvirt {
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
        let out = self.virsh().arg(&batch).output()?;
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
        if super::is_connect_error(&out.stderr) || self.host.host_key_failure(&out.stderr).is_some() {
            return Err(self.unreachable(out.stderr.trim()));
        }
        let (p, t) = (q(&self.pool), q(&pool_target(&self.pool)));
        let create = format!(
            "pool-define-as --name {p} --type dir --target {t}; pool-build --pool {p}; pool-autostart --pool {p}; \
             pool-start --pool {p}"
        );
        let out = self.virsh().arg(&create).output()?;
        if !out.success() {
            return Err(pool_error(&self.pool, &host, out.stderr.trim()));
        }
        Ok(false)
    }

    pub fn vol_exists(&self, name: &str) -> Result<bool> {
        let out = self.virsh().args(self.pool_args("vol-info", name)).output()?;
        if out.success() {
            return Ok(true);
        }
        if out.stderr.contains("Storage volume not found") || out.stderr.contains("no storage vol") {
            return Ok(false);
        }
        Err(self.unreachable(out.stderr.trim()))
    }

    fn vol_path(&self, name: &str) -> Result<String> {
        Ok(self.run(&self.pool_args("vol-path", name))?.trim().to_string())
    }

    fn vol_delete(&self, name: &str) -> Result<()> {
        self.run(&self.pool_args("vol-delete", name)).map(drop)
    }

    /// Upload `file` as volume `name` (replacing a leftover of that name): sparse, in libvirt's large stream
    /// blocks, with a byte progress bar on a terminal. Returns the bytes sent.
    fn upload_file(&self, name: &str, file: &Path) -> Result<u64> {
        let size = std::fs::metadata(file).with_context(|| format!("read {}", file.display()))?.len();
        let bar = crate::ui::bytes_bar(size, name);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        // Progress: the volume's allocation on the host, polled beside the upload (the stream itself is virsh's).
        let poll = bar.clone().map(|bar| {
            let (conn, pool, name, stop) =
                (self.conn.clone(), self.pool.clone(), name.to_string(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let out = Cmd::new("virsh")
                        .args(["-q", "-c", &conn, "vol-info", "--bytes", "--pool", &pool, "--vol", &name])
                        .timeout(std::time::Duration::from_secs(20))
                        .output();
                    if let Some(n) = out.ok().and_then(|o| allocation(&o.stdout)) {
                        bar.set_position(n);
                    }
                    std::thread::sleep(std::time::Duration::from_millis(700));
                }
            })
        });
        // One virsh connection (one SSH handshake) for the three steps: a leftover of that name goes (its
        // "not found" is expected and ignored), a raw volume of the file's size is made, the file is streamed into
        // it. virsh runs `;`-separated commands in order and exits with the last one's status.
        let batch = upload_batch(&self.pool, name, size, &file.to_string_lossy());
        let res = self.virsh().arg(&batch).timeout(upload_timeout(size)).output();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = poll {
            let _ = t.join();
        }
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
        Ok(size)
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

    /// The box in the host's pool, once per host: nothing is sent when its complete marker exists. An interrupted
    /// upload has no marker and is deleted and sent again. Returns the bytes sent.
    pub fn upload_box(&self, base: &crate::provider::BoxImage) -> Result<u64> {
        let done = box_volume(&base.id, ".done");
        if self.ensure_pool(&done)? {
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
            sent += self.upload_file(vol, file).inspect_err(|_| {
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
                self.pool
            ));
        }
        self.run(&[
            "vol-create-as",
            "--pool",
            &self.pool,
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

    /// The machine's volumes (box uploaded if needed, overlay, seed) and the remote paths for its domain XML.
    pub(super) fn remote_volumes(&self, spec: &crate::provider::MachineSpec) -> Result<super::DomainPaths> {
        let host = self.host.name(&self.uri);
        let start = std::time::Instant::now();
        let sent = self.upload_box(&spec.base)?;
        let secs = start.elapsed().as_secs_f64();
        if sent == 0 {
            eprintln!(
                "    box {} already on {host} (pool {}): 0 bytes sent",
                &spec.base.id[..12.min(spec.base.id.len())],
                self.pool
            );
        } else {
            eprintln!(
                "    box {} uploaded to {host} (pool {}): {sent} bytes sent in {secs:.1} s",
                &spec.base.id[..12.min(spec.base.id.len())],
                self.pool
            );
        }
        let backing = box_volume(&spec.base.id, &format!(".{}", spec.base.format));
        let disk = machine_volume(&spec.vm_name, "disk.qcow2");
        if !self.vol_exists(&disk)? {
            self.run(&[
                "vol-create-as",
                "--pool",
                &self.pool,
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
        self.upload_file(&seed, &spec.seed_iso)?;
        let disk_path = self.vol_path(&disk)?;
        let dir = disk_path.rsplit_once('/').map(|(d, _)| d.to_string()).unwrap_or_default();
        let part = |p: &str| -> Result<String> { self.vol_path(&box_volume(&spec.base.id, p)) };
        Ok(super::DomainPaths {
            disk: disk_path,
            seed: self.vol_path(&seed)?,
            serial_log: format!("{dir}/{}", machine_volume(&spec.vm_name, "serial.log")),
            kernel: spec.base.kernel.as_ref().map(|_| part("-vmlinuz")).transpose()?,
            initrd: spec.base.initrd.as_ref().map(|_| part("-initrd")).transpose()?,
        })
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

    /// The serial console of a machine on the remote host (QEMU writes it into the pool's directory): downloaded
    /// after a pool refresh, with where it lives and the command that reads it. Empty when it cannot be read.
    pub(super) fn remote_serial_console(&self, vm_name: &str) -> (String, String) {
        let vol = machine_volume(vm_name, "serial.log");
        let place = format!(
            "the volume {vol} on {} (`virsh -c {} vol-download --pool {} {vol} /dev/stdout`)",
            self.host.name(&self.uri),
            self.uri,
            self.pool
        );
        let text = (|| -> Result<String> {
            self.run(&["pool-refresh", "--pool", &self.pool])?;
            let tmp = tempfile::NamedTempFile::new()?;
            let path = tmp.path().to_string_lossy().into_owned();
            self.run(&["vol-download", "--pool", &self.pool, "--vol", &vol, "--file", &path])?;
            Ok(String::from_utf8_lossy(&std::fs::read(tmp.path())?).into_owned())
        })()
        .unwrap_or_default();
        (text, place)
    }

    /// Delete every volume of the machine (named `<domain>-...`); the box volume stays.
    pub(super) fn delete_machine_volumes(&self, vm_name: &str) -> Result<()> {
        let out = self.virsh().args(["pool-refresh", "--pool", &self.pool]).output()?;
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
