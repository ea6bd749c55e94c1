//! Remote libvirt hosts reached over SSH (`qemu+ssh://`, `qemu+libssh://`): nothing is shared with the host but
//! the connection.
//!
//! - The host's own SSH key is checked like OpenSSH does, against known_hosts (`known_hosts=` in the URI, else
//!   `$HOME/.ssh/known_hosts`, plus the system-wide file); an unknown host is refused with the command that adds
//!   it. libvirt's `ssh` transport ignores `known_hosts=`, so the tool runs it through an ssh wrapper it writes
//!   itself (never one named in the config) with `UserKnownHostsFile`, `StrictHostKeyChecking=yes` and
//!   `BatchMode=yes`; for `libssh` it adds `known_hosts=` and `known_hosts_verify=normal`.
//! - The box goes into a storage pool once per host, keyed by its content hash ([`box_volume`]); machines get
//!   volumes named after the domain ([`machine_volume`]). The pure parts are here; the virsh calls are in
//!   `super` (`Libvirt::upload_box`, ...).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::process::Cmd;

/// A remote libvirt host reached over SSH, parsed from a URI that passed [`crate::config::check_libvirt_uri`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteHost {
    /// "ssh" or "libssh".
    pub transport: String,
    pub user: Option<String>,
    pub host: String,
    pub port: Option<u16>,
    pub keyfile: Option<String>,
    /// The user known_hosts file the host key is checked against.
    pub known_hosts: PathBuf,
    /// `known_hosts=` was given in the URI.
    pub known_hosts_given: bool,
}

/// The user's default known_hosts file (`$HOME/.ssh/known_hosts`, as OpenSSH's `~`).
pub fn default_known_hosts() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
        .join(".ssh/known_hosts")
}

/// The remote host of an SSH URI; None for local, unix, tls and tcp URIs. Pure but for `$HOME`.
pub fn parse(uri: &str) -> Option<RemoteHost> {
    let (scheme, rest) = uri.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    let transport = scheme.split_once('+')?.1.to_string();
    if transport != "ssh" && transport != "libssh" {
        return None;
    }
    let (before_query, query) = rest.split_once('?').unwrap_or((rest, ""));
    let authority = &before_query[..before_query.find('/').unwrap_or(before_query.len())];
    let (user, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u.to_string()), h),
        None => (None, authority),
    };
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (h, p) = v6.split_once(']')?;
        (h.to_string(), p.strip_prefix(':').and_then(|p| p.parse().ok()))
    } else {
        match hostport.split_once(':') {
            Some((h, p)) => (h.to_string(), p.parse().ok()),
            None => (hostport.to_string(), None),
        }
    };
    if host.is_empty() {
        return None;
    }
    let mut keyfile = None;
    let mut known_hosts = None;
    for pair in query.split(['&', ';']).filter(|p| !p.is_empty()) {
        let (n, v) = pair.split_once('=').unwrap_or((pair, ""));
        // libvirt percent-decodes parameter names and values; so do we (the URI check refused malformed ones).
        let (n, v) = (percent_decode(n), percent_decode(v));
        match n.to_ascii_lowercase().as_str() {
            "keyfile" => keyfile = Some(v),
            "known_hosts" => known_hosts = Some(PathBuf::from(v)),
            _ => {}
        }
    }
    Some(RemoteHost {
        transport,
        user,
        host,
        port,
        keyfile,
        known_hosts_given: known_hosts.is_some(),
        known_hosts: known_hosts.unwrap_or_else(default_known_hosts),
    })
}

/// `%XX` decoding (a malformed escape is kept as written).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        match (b[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl RemoteHost {
    /// How the host appears in known_hosts: `host`, or `[host]:port` for a port other than 22.
    pub fn known_hosts_name(&self) -> String {
        match self.port {
            Some(p) if p != 22 => format!("[{}]:{p}", self.host),
            _ => self.host.clone(),
        }
    }

    /// `user@host` (or `host`).
    pub fn destination(&self) -> String {
        match &self.user {
            Some(u) => format!("{u}@{}", self.host),
            None => self.host.clone(),
        }
    }

    /// The `-o` options that make OpenSSH check the host key against our known_hosts and never prompt.
    pub fn host_key_options(&self) -> Vec<String> {
        vec![
            "-o".into(),
            format!("UserKnownHostsFile={}", self.known_hosts.display()),
            "-o".into(),
            "StrictHostKeyChecking=yes".into(),
            "-o".into(),
            "BatchMode=yes".into(),
            // A host that stopped answering (link down, host gone) fails the command within a minute instead of
            // hanging it: the next run then completes what was left.
            "-o".into(),
            "ConnectTimeout=10".into(),
            "-o".into(),
            "ServerAliveInterval=15".into(),
            "-o".into(),
            "ServerAliveCountMax=3".into(),
        ]
    }

    /// Every option of a system `ssh` to the host (host key checks, key file, port, user), without the host.
    pub fn ssh_args(&self) -> Vec<String> {
        let mut a = self.host_key_options();
        if let Some(k) = &self.keyfile {
            a.extend(["-i".into(), k.clone(), "-o".into(), "IdentitiesOnly=yes".into()]);
        }
        if let Some(p) = self.port {
            a.extend(["-p".into(), p.to_string()]);
        }
        if let Some(u) = &self.user {
            a.extend(["-l".into(), u.clone()]);
        }
        a
    }

    /// The command that adds the host's key to known_hosts, to run after checking its fingerprint.
    pub fn keyscan_command(&self) -> String {
        let port = match self.port {
            Some(p) if p != 22 => format!("-p {p} "),
            _ => String::new(),
        };
        let file = crate::ssh::shell_quote(&self.known_hosts.to_string_lossy());
        format!(
            "ssh-keyscan {port}{host} | ssh-keygen -lf -   # compare with the host's own `ssh-keygen -lf \
             /etc/ssh/ssh_host_ed25519_key.pub`, then: ssh-keyscan {port}{host} >> {file}",
            host = self.host
        )
    }

    /// The error for a host whose key is not in known_hosts.
    pub fn unknown_host_error(&self) -> anyhow::Error {
        anyhow::anyhow!(
            "the SSH host key of the libvirt host {} is not in {} (nor in /etc/ssh/ssh_known_hosts); provisioner \
             never accepts an unknown host key\nhint: check the key's fingerprint and add it: {}",
            self.known_hosts_name(),
            self.known_hosts.display(),
            self.keyscan_command()
        )
    }

    /// Is the host in our known_hosts (or the system one)? `ssh-keygen -F` reads hashed entries too.
    pub fn is_known(&self) -> Result<bool> {
        let name = self.known_hosts_name();
        for file in [self.known_hosts.as_path(), Path::new("/etc/ssh/ssh_known_hosts")] {
            if !file.exists() {
                continue;
            }
            let out = Cmd::new("ssh-keygen")
                .arg("-F")
                .arg(&name)
                .arg("-f")
                .arg(file)
                .timeout(std::time::Duration::from_secs(10))
                .output()?;
            if out.success() && !out.stdout.trim().is_empty() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Refuse a host that is not in known_hosts (before any connection is made).
    pub fn check_known(&self) -> Result<()> {
        if self.is_known()? {
            Ok(())
        } else {
            Err(self.unknown_host_error())
        }
    }

    /// The ssh wrapper libvirt's `ssh` transport runs (its `command=`): OpenSSH with our host key options and
    /// every argument libvirt passes. Written by the tool itself, from values that passed the URI check.
    pub fn wrapper_script(&self) -> String {
        let opts: Vec<String> = self.host_key_options().iter().map(|o| crate::ssh::shell_quote(o)).collect();
        format!("#!/bin/sh\n# written by provisioner: libvirt's ssh transport with the host key checked\nexec ssh {} \"$@\"\n", opts.join(" "))
    }

    /// The URI handed to virsh: for `ssh`, the wrapper as `command=`; for `libssh`, our known_hosts with
    /// `known_hosts_verify=normal`.
    pub fn connect_uri(&self, uri: &str, wrapper: &Path) -> String {
        let sep = if uri.contains('?') { '&' } else { '?' };
        if self.transport == "ssh" {
            format!("{uri}{sep}command={}&no_tty=1", wrapper.display())
        } else {
            let mut u = uri.to_string();
            let mut sep = sep;
            if !self.known_hosts_given {
                u.push_str(&format!("{sep}known_hosts={}", self.known_hosts.display()));
                sep = '&';
            }
            if !uri.contains("known_hosts_verify") {
                u.push_str(&format!("{sep}known_hosts_verify=normal"));
            }
            u
        }
    }

    /// Write the wrapper (0700) into the tool's cache dir, named by its contents; returns its path.
    pub fn write_wrapper(&self) -> Result<PathBuf> {
        use sha2::Digest;
        let script = self.wrapper_script();
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

    /// A connection error from virsh about the host key, made clear; None for other errors.
    pub fn host_key_failure(&self, stderr: &str) -> Option<anyhow::Error> {
        if stderr.contains("REMOTE HOST IDENTIFICATION HAS CHANGED") {
            return Some(anyhow::anyhow!(
                "the SSH host key of the libvirt host {} has CHANGED since it was recorded in {}: this may be an \
                 attack, or the host was reinstalled; provisioner refuses to connect\nhint: ask the host's admin \
                 for its key fingerprint; if the change is expected, remove the old key with `ssh-keygen -R {} -f \
                 {}` and add the new one: {}",
                self.known_hosts_name(),
                self.known_hosts.display(),
                self.known_hosts_name(),
                self.known_hosts.display(),
                self.keyscan_command()
            ));
        }
        if stderr.contains("Host key verification failed") || stderr.contains("No matching host key") {
            return Some(self.unknown_host_error());
        }
        if stderr.contains("Permission denied") {
            return Some(anyhow::anyhow!(
                "the libvirt host {} refused the SSH login: {}\nhint: give the key with `?keyfile=PATH` in the URI \
                 or load it into ssh-agent, and check that `ssh {} virsh -c qemu:///system version` works",
                self.destination(),
                stderr.trim(),
                self.destination()
            ));
        }
        None
    }
}

/// The pool volume of a box: `box-<content hash>` (+ `-vmlinuz`, `-initrd`); `.done` marks a complete upload.
pub fn box_volume(box_id: &str, part: &str) -> String {
    format!("{BOX_PREFIX}{box_id}{part}")
}

/// Every box volume's name starts with it.
const BOX_PREFIX: &str = "box-";

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

/// Check a remote URI before use: the host must be in known_hosts. Local URIs pass.
pub fn check_uri_host(uri: &str) -> Result<()> {
    match parse(uri) {
        Some(r) => r.check_known(),
        None => Ok(()),
    }
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

impl super::Libvirt {
    fn pool_args<'a>(&'a self, verb: &'a str, vol: &'a str) -> [&'a str; 5] {
        [verb, "--pool", &self.pool, "--vol", vol]
    }

    /// The pool exists and runs (made as a dir pool when missing); returns whether volume `probe` is in it.
    /// One virsh connection when the pool runs (pool-info and vol-info as one batch), two when it is made.
    pub fn ensure_pool(&self, probe: &str) -> Result<bool> {
        let host = self.remote.as_ref().map(|r| r.destination()).unwrap_or_else(|| self.uri.clone());
        let q = crate::ssh::shell_quote;
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
        if super::is_connect_error(&out.stderr)
            || self.remote.as_ref().and_then(|r| r.host_key_failure(&out.stderr)).is_some()
        {
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
            if let Some(e) = self.remote.as_ref().and_then(|r| r.host_key_failure(err)) {
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
        let host = self.remote.as_ref().map(|r| r.destination()).unwrap_or_else(|| self.uri.clone());
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
        let host = self.remote.as_ref().map(|r| r.destination()).unwrap_or_default();
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
        let names = |xml: &str| {
            paths.iter().any(|p| ["<", "'", "\""].iter().any(|end| xml.contains(&format!("{p}{end}"))))
        };
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
            self.remote.as_ref().map(|r| r.destination()).unwrap_or_default(),
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
    let q = crate::ssh::shell_quote;
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
    fn parses_ssh_uris() {
        let r = parse("qemu+ssh://root@10.201.0.2:2200/system?keyfile=/k&no_tty=1").unwrap();
        assert_eq!(r.host, "10.201.0.2");
        assert_eq!(r.port, Some(2200));
        assert_eq!(r.user.as_deref(), Some("root"));
        assert_eq!(r.keyfile.as_deref(), Some("/k"));
        assert_eq!(r.known_hosts_name(), "[10.201.0.2]:2200");
        assert!(parse("qemu:///system").is_none());
        assert!(parse("qemu+tls://h/system").is_none());
        let l = parse("qemu+libssh://h/system?known_hosts=/kh").unwrap();
        assert_eq!(l.known_hosts, PathBuf::from("/kh"));
        assert_eq!(l.known_hosts_name(), "h");
    }

    #[test]
    fn connect_uri_adds_our_checks() {
        let r = parse("qemu+ssh://root@h/system?keyfile=/k").unwrap();
        let u = r.connect_uri("qemu+ssh://root@h/system?keyfile=/k", Path::new("/c/ssh-1"));
        assert_eq!(u, "qemu+ssh://root@h/system?keyfile=/k&command=/c/ssh-1&no_tty=1");
        let l = parse("qemu+libssh://h/system").unwrap();
        let u = l.connect_uri("qemu+libssh://h/system", Path::new("/x"));
        assert!(u.starts_with("qemu+libssh://h/system?known_hosts="), "{u}");
        assert!(u.ends_with("&known_hosts_verify=normal"), "{u}");
        let w = r.wrapper_script();
        assert!(w.contains("StrictHostKeyChecking=yes") && w.contains("BatchMode=yes"), "{w}");
    }

    #[test]
    fn vol_list_names() {
        let out = " Name          Path\n------------------------\n box-ab   /p/box-ab\n m-disk.qcow2  /p/m\n";
        assert_eq!(parse_vol_list(out), vec!["box-ab", "m-disk.qcow2"]);
    }
}
