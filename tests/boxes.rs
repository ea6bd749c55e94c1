//! Base boxes: downloads (file:// and a real HTTP server on 127.0.0.1 with Range), checksum failures, interrupted
//! downloads, Vagrant .box (tar / tar.gz, libvirt / virtualbox), provider mismatch, concurrent builders, and
//! `box list/build/remove` through the binary. The Debian mirror build is in the VM tier (slow, needs root).

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use provisioner::boxes::{self, Cache};
use provisioner::config::Config;
use provisioner::ui::Ui;

use crate::support::{self, Test};

fn sha256(data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(data))
}

fn run_ok(cmd: &mut std::process::Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {out:?}");
}

/// A raw disk at `path` holding an ext4 filesystem of `kib` KiB (sparse) with a file of `data` patterned bytes:
/// what a box import accepts (it refuses disks with nothing bootable on them).
fn ext4_raw(path: &Path, kib: usize, data: usize) {
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("data"), payload_bytes(data)).unwrap();
    run_ok(
        std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(src.path())
            .arg(path)
            .arg(format!("{kib}K")),
    );
}

/// A tiny real qcow2 made by qemu-img (an ext4 filesystem in a 16 MiB disk).
fn qcow2(dir: &Path) -> Vec<u8> {
    let raw = dir.join("tiny.raw");
    ext4_raw(&raw, 16 * 1024, 64 * 1024);
    let p = dir.join("tiny.qcow2");
    run_ok(std::process::Command::new("qemu-img").args(["convert", "-q", "-O", "qcow2"]).arg(&raw).arg(&p));
    std::fs::remove_file(raw).unwrap();
    std::fs::read(p).unwrap()
}

/// Bytes that are not all equal (so a shifted resume would change the hash).
fn payload_bytes(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

/// A raw disk image of exactly `len` bytes (an ext4 filesystem, then patterned bytes past its end).
fn payload(len: usize) -> Vec<u8> {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("disk.raw");
    ext4_raw(&p, len / 1024, len / 3);
    let mut b = std::fs::read(&p).unwrap();
    let fs = b.len();
    b.extend(payload_bytes(len)[fs..].iter());
    assert_eq!(b.len(), len);
    b
}

/// A Vagrant .box: tar (optionally gzipped) of metadata.json plus the provider's files.
fn vagrant_box(provider: &str, files: &[(&str, &[u8])], gzip: bool) -> Vec<u8> {
    let md = format!(r#"{{"provider":"{provider}","format":"qcow2","virtual_size":1}}"#);
    let mut entries: Vec<(&str, &[u8])> =
        vec![("metadata.json", md.as_bytes()), ("Vagrantfile", b"# empty\n")];
    entries.extend_from_slice(files);
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, data).unwrap();
    }
    let tar = b.into_inner().unwrap();
    if !gzip {
        return tar;
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    gz.finish().unwrap()
}

fn config(dir: &Path, provider: &str, box_toml: &str) -> Config {
    let text = format!("[machine]\nname = \"t\"\nprovider = \"{provider}\"\n\n[box]\n{box_toml}\n");
    let path = dir.join("box-config.toml");
    std::fs::write(&path, &text).unwrap();
    Config::from_bytes(&path, text.as_bytes()).unwrap()
}

fn quiet() -> Ui {
    Ui::new(false, true)
}

/// What the test HTTP server does and saw.
#[derive(Default)]
struct ServerState {
    /// Close the connection after half of the body.
    truncate: AtomicBool,
    /// Ignore Range headers (answer 200 with the whole file).
    ignore_range: AtomicBool,
    /// Pause between 64 KiB chunks (a slow server, so concurrent clients overlap).
    slow: AtomicBool,
    /// The Range start of every request (None = no Range header).
    requests: Mutex<Vec<Option<u64>>>,
}

/// A std-only HTTP/1.1 server on 127.0.0.1 serving `body` at any path, honouring `Range: bytes=N-`.
struct Server {
    url: String,
    state: Arc<ServerState>,
}

impl Server {
    fn start(body: Vec<u8>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/boxes/test.img", listener.local_addr().unwrap());
        let state = Arc::new(ServerState::default());
        let st = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let st = st.clone();
                let body = body.clone();
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(conn.try_clone().unwrap());
                    let mut range = None;
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
                            break;
                        }
                        let lower = line.to_ascii_lowercase();
                        if let Some(v) = lower.strip_prefix("range: bytes=") {
                            range = v.trim().trim_end_matches('-').parse::<u64>().ok();
                        }
                    }
                    st.requests.lock().unwrap().push(range);
                    let start = match range {
                        Some(s) if !st.ignore_range.load(Ordering::SeqCst) => s as usize,
                        _ => 0,
                    };
                    let head = if start >= body.len() && start > 0 {
                        let _ = conn
                            .write_all(b"HTTP/1.1 416 Range Not Satisfiable\r\nContent-Length: 0\r\n\r\n");
                        return;
                    } else if start > 0 {
                        format!(
                            "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{}/{}\r\n\
                             Connection: close\r\n\r\n",
                            body.len() - start,
                            body.len() - 1,
                            body.len()
                        )
                    } else {
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            body.len()
                        )
                    };
                    let _ = conn.write_all(head.as_bytes());
                    let rest = &body[start..];
                    let send =
                        if st.truncate.load(Ordering::SeqCst) { &rest[..rest.len() / 2] } else { rest };
                    for chunk in send.chunks(64 * 1024) {
                        if conn.write_all(chunk).is_err() {
                            return;
                        }
                        if st.slow.load(Ordering::SeqCst) {
                            std::thread::sleep(Duration::from_millis(40));
                        }
                    }
                    let _ = conn.flush();
                    let _ = conn.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        Server { url, state }
    }
    fn requests(&self) -> Vec<Option<u64>> {
        self.state.requests.lock().unwrap().clone()
    }
}

fn entries(cache: &Cache) -> Vec<String> {
    cache.list().unwrap().into_iter().map(|m| m.id).collect()
}

#[test]
#[cfg_attr(
    windows,
    ignore = "windows: makes its disk images with Linux tools (mkfs.ext4, qemu-img), which Wine and Windows hosts lack"
)]
fn file_url_with_right_sum_is_cached_and_reused() {
    let tmp = tempfile::tempdir().unwrap();
    let img = qcow2(tmp.path());
    let src = tmp.path().join("tiny.qcow2");
    let sum = sha256(&img);
    let cache = Cache::at(tmp.path().join("cache")).unwrap();
    let cfg =
        config(tmp.path(), "libvirt", &format!("url = \"file://{}\"\nsha256 = \"{sum}\"", src.display()));
    let (image, built) = boxes::ensure_in(&cache, &cfg, "libvirt", false, &quiet()).unwrap();
    assert!(built);
    assert_eq!((image.id.as_str(), image.format.as_str()), (sum.as_str(), "qcow2"));
    assert_eq!(std::fs::read(&image.disk).unwrap(), img, "the cached disk is the file");
    assert!(image.kernel.is_none(), "a downloaded image boots with its own bootloader");
    let (again, built) = boxes::ensure_in(&cache, &cfg, "libvirt", false, &quiet()).unwrap();
    assert!(!built, "second ensure must be a cache hit");
    assert_eq!(again.disk, image.disk);
    assert_eq!(entries(&cache), vec![sum]);
}

#[test]
#[cfg_attr(
    windows,
    ignore = "windows: makes its disk images with Linux tools (mkfs.ext4, qemu-img), which Wine and Windows hosts lack"
)]
fn wrong_sum_fails_naming_both_sums_and_url_and_caches_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let img = qcow2(tmp.path());
    let real = sha256(&img);
    let wrong = "0".repeat(64);
    let cache = Cache::at(tmp.path().join("cache")).unwrap();
    let server = Server::start(img);
    for url in [format!("file://{}", tmp.path().join("tiny.qcow2").display()), server.url.clone()] {
        let cfg = config(tmp.path(), "libvirt", &format!("url = \"{url}\"\nsha256 = \"{wrong}\""));
        let err = format!("{:#}", boxes::ensure_in(&cache, &cfg, "libvirt", false, &quiet()).unwrap_err());
        assert!(err.contains(&real) && err.contains(&wrong) && err.contains(&url), "{err}");
        assert!(entries(&cache).is_empty());
        let downloads = cache.downloads_dir().unwrap();
        assert_eq!(std::fs::read_dir(&downloads).unwrap().count(), 0, "the bad download is deleted");
    }
}

#[test]
#[cfg_attr(
    windows,
    ignore = "windows: makes its disk images with Linux tools (mkfs.ext4, qemu-img), which Wine and Windows hosts lack"
)]
fn http_download_is_cached() {
    let tmp = tempfile::tempdir().unwrap();
    let img = qcow2(tmp.path());
    let sum = sha256(&img);
    let server = Server::start(img.clone());
    let cache = Cache::at(tmp.path().join("cache")).unwrap();
    let cfg = config(tmp.path(), "libvirt", &format!("url = \"{}\"\nsha256 = \"{sum}\"", server.url));
    let (image, built) = boxes::ensure_in(&cache, &cfg, "libvirt", false, &quiet()).unwrap();
    assert!(built);
    assert_eq!(std::fs::read(&image.disk).unwrap(), img);
    assert_eq!(server.requests(), vec![None]);
    boxes::ensure_in(&cache, &cfg, "libvirt", false, &quiet()).unwrap();
    assert_eq!(server.requests().len(), 1, "a cache hit makes no request");
}

/// The server drops every connection half-way: ensure fails, nothing counts as cached, and the next run resumes
/// with a Range request (or restarts when the server ignores Range) and ends with the right file.
fn interrupted_then(ignore_range: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let body = payload(3 * 1024 * 1024 + 123);
    let sum = sha256(&body);
    let server = Server::start(body.clone());
    server.state.truncate.store(true, Ordering::SeqCst);
    let cache = Cache::at(tmp.path().join("cache")).unwrap();
    let cfg = config(tmp.path(), "libvirt", &format!("url = \"{}\"\nsha256 = \"{sum}\"", server.url));
    let err = format!("{:#}", boxes::ensure_in(&cache, &cfg, "libvirt", false, &quiet()).unwrap_err());
    assert!(err.contains("run again to resume"), "{err}");
    assert!(entries(&cache).is_empty(), "an interrupted download is not a cached box");
    let part = cache.downloads_dir().unwrap().join(format!("{sum}.part"));
    let kept = std::fs::metadata(&part).expect("the partial download is kept").len();
    assert!(kept > 0 && kept < body.len() as u64);
    let first = server.requests();
    assert_eq!(first.len(), 3, "three attempts: {first:?}");
    assert!(first[1].is_some_and(|s| s > 0), "later attempts resume: {first:?}");

    server.state.truncate.store(false, Ordering::SeqCst);
    server.state.ignore_range.store(ignore_range, Ordering::SeqCst);
    let (image, built) = boxes::ensure_in(&cache, &cfg, "libvirt", false, &quiet()).unwrap();
    assert!(built);
    let last = *server.requests().last().unwrap();
    assert_eq!(last, Some(kept), "the next run asks for the rest");
    // The payload is a bare disk (no qcow2 header), so it is imported as raw.
    assert_eq!(image.format, "raw");
    assert_eq!(sha256(&std::fs::read(&image.disk).unwrap()), sum);
    assert!(!part.exists());
}

#[test]
#[cfg_attr(
    windows,
    ignore = "windows: makes its disk images with Linux tools (mkfs.ext4, qemu-img), which Wine and Windows hosts lack"
)]
fn interrupted_download_resumes_with_range() {
    interrupted_then(false);
}

#[test]
#[cfg_attr(
    windows,
    ignore = "windows: makes its disk images with Linux tools (mkfs.ext4, qemu-img), which Wine and Windows hosts lack"
)]
fn interrupted_download_restarts_when_server_ignores_range() {
    interrupted_then(true);
}

/// Ctrl-C during a download: the run stops at once (the download is in-process, no child to kill), exits 130, and
/// the message says exactly what stays (the part file, kept for the resume) instead of "nothing half-made was
/// kept"; the next run resumes from it with a Range request.
#[test]
#[cfg_attr(
    windows,
    ignore = "windows: sends SIGINT with kill(2); a console Ctrl-C is sent by the tests in tests/windows.rs"
)]
fn interrupted_download_says_what_stays_and_the_next_run_resumes() {
    #[cfg(unix)]
    {
        let body = payload(8 << 20);
        let sum = sha256(&body);
        let server = Server::start(body.clone());
        server.state.slow.store(true, Ordering::SeqCst);
        let t = Test::new();
        t.write(
            "box-config.toml",
            format!(
            "[machine]\nname = \"t\"\nprovider = \"libvirt\"\n\n[box]\nurl = \"{}\"\nsha256 = \"{sum}\"\n",
            server.url
        ),
        );
        let cache = t.path().join("cache");
        let part = cache.join(format!("boxes/downloads/{sum}.part"));
        let mut c = std::process::Command::new(support::bin());
        c.args(["box", "build"]).current_dir(t.path()).env("PROVISIONER_CACHE_DIR", &cache);
        // SAFETY: only async-signal-safe signal(2) between fork and exec (a background runner may ignore SIGINT).
        unsafe {
            use std::os::unix::process::CommandExt;
            c.pre_exec(|| {
                libc::signal(libc::SIGINT, libc::SIG_DFL);
                Ok(())
            });
        }
        let mut p = support::Proc::spawn("box build", c, t.path().join("build.log"));
        support::wait_until(Duration::from_secs(60), "the download to begin", || {
            if let Some(st) = p.child.try_wait().unwrap() {
                panic!("box build ended before the interrupt ({st}):\n{}", p.log_text());
            }
            part.metadata().is_ok_and(|m| m.len() > 0).then_some(())
        });
        // SAFETY: kill(2) on the child we started.
        unsafe { libc::kill(p.child.id() as i32, libc::SIGINT) };
        let st =
            support::wait_until(Duration::from_secs(10), "box build to exit", || p.child.try_wait().unwrap());
        let log = p.log_text();
        assert_eq!(st.code(), Some(130), "{log}");
        let kept = part.metadata().unwrap().len();
        assert!(kept > 0 && kept < body.len() as u64, "{kept}");
        let last: Vec<&str> = log.lines().rev().take(2).collect();
        assert_eq!(
        last,
        [
            "hint: run the same command again; it continues from the last consistent state",
            &*format!(
                "error: interrupted by SIGINT: child processes were stopped and the {kept} bytes downloaded so far \
                 stay in {}; the next run resumes from them",
                part.display()
            ),
        ],
        "{log}"
    );
        server.state.slow.store(false, Ordering::SeqCst);
        Test::new()
            .cwd(t.path())
            .env("PROVISIONER_CACHE_DIR", cache.display().to_string())
            .args(["box", "build"])
            .run()
            .success();
        assert_eq!(server.requests(), vec![None, Some(kept)], "the second run resumed from the part file");
    }
}

#[test]
#[cfg_attr(
    windows,
    ignore = "windows: makes its disk images with Linux tools (mkfs.ext4, qemu-img), which Wine and Windows hosts lack"
)]
fn vagrant_boxes_tar_and_targz_for_both_providers() {
    let tmp = tempfile::tempdir().unwrap();
    let img = qcow2(tmp.path());
    let cache = Cache::at(tmp.path().join("cache")).unwrap();
    let ovf = b"<?xml version=\"1.0\"?><Envelope><References><File ovf:href=\"box-disk001.vmdk\"/></References></Envelope>";
    for gzip in [false, true] {
        let lv = tmp.path().join(format!("libvirt-{gzip}.box"));
        std::fs::write(&lv, vagrant_box("libvirt", &[("box.img", &img)], gzip)).unwrap();
        let cfg = config(tmp.path(), "libvirt", &format!("vagrant = '{}'", lv.display()));
        let (image, built) = boxes::ensure_in(&cache, &cfg, "libvirt", false, &quiet()).unwrap();
        assert!(built);
        assert_eq!(image.format, "qcow2");
        assert_eq!(image.disk.file_name().unwrap(), "box.img");
        assert_eq!(std::fs::read(&image.disk).unwrap(), img);

        let vb = tmp.path().join(format!("virtualbox-{gzip}.box"));
        let vmdk = std::fs::read(support::repo().join("tests/fixtures/vbox/box-disk001.vmdk")).unwrap();
        let files: [(&str, &[u8]); 2] = [("box.ovf", ovf), ("box-disk001.vmdk", &vmdk)];
        std::fs::write(&vb, vagrant_box("virtualbox", &files, gzip)).unwrap();
        let cfg = config(tmp.path(), "virtualbox", &format!("vagrant = '{}'", vb.display()));
        let (image, _) = boxes::ensure_in(&cache, &cfg, "virtualbox", false, &quiet()).unwrap();
        assert_eq!(image.format, "ovf");
        assert_eq!(image.disk.file_name().unwrap(), "box.ovf");
        assert!(image.disk.with_file_name("box-disk001.vmdk").is_file());
    }
    assert_eq!(entries(&cache).len(), 4);
}

#[test]
fn provider_mismatch_names_both_providers() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::at(tmp.path().join("cache")).unwrap();
    let vb = tmp.path().join("vb.box");
    std::fs::write(&vb, vagrant_box("virtualbox", &[("box.ovf", b"<Envelope/>")], true)).unwrap();
    let cfg = config(tmp.path(), "libvirt", &format!("vagrant = '{}'", vb.display()));
    let err = format!("{:#}", boxes::ensure_in(&cache, &cfg, "libvirt", false, &quiet()).unwrap_err());
    assert!(err.contains("virtualbox") && err.contains("libvirt"), "{err}");

    let odd = tmp.path().join("odd.box");
    std::fs::write(&odd, vagrant_box("hyperv", &[("x.vhdx", b"x")], false)).unwrap();
    let cfg = config(tmp.path(), "libvirt", &format!("vagrant = '{}'", odd.display()));
    let err = format!("{:#}", boxes::ensure_in(&cache, &cfg, "libvirt", false, &quiet()).unwrap_err());
    assert!(err.contains("hyperv"), "{err}");
}

#[test]
fn unknown_archive_layout_says_what_was_found() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::at(tmp.path().join("cache")).unwrap();
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(5);
    h.set_cksum();
    b.append_data(&mut h, "readme.txt", &b"hello"[..]).unwrap();
    let p = tmp.path().join("x.box");
    std::fs::write(&p, b.into_inner().unwrap()).unwrap();
    let cfg = config(tmp.path(), "libvirt", &format!("vagrant = '{}'", p.display()));
    let err = format!("{:#}", boxes::ensure_in(&cache, &cfg, "libvirt", false, &quiet()).unwrap_err());
    assert!(err.contains("unknown box layout") && err.contains("readme.txt"), "{err}");
    assert!(entries(&cache).is_empty());
}

#[test]
#[cfg_attr(
    windows,
    ignore = "windows: makes its disk images with Linux tools (mkfs.ext4, qemu-img), which Wine and Windows hosts lack"
)]
fn local_image_is_copied_by_content_hash() {
    let tmp = tempfile::tempdir().unwrap();
    let img = qcow2(tmp.path());
    let cache = Cache::at(tmp.path().join("cache")).unwrap();
    let cfg = config(tmp.path(), "libvirt", "image = \"tiny.qcow2\"");
    let (image, _) = boxes::ensure_in(&cache, &cfg, "libvirt", false, &quiet()).unwrap();
    assert_eq!(image.id, sha256(&img));
    assert_eq!(image.format, "qcow2");
    let other = payload(1 << 20);
    std::fs::write(tmp.path().join("tiny.qcow2"), &other).unwrap();
    assert_eq!(std::fs::read(&image.disk).unwrap(), img, "the cache keeps its own copy");
    let (changed, built) = boxes::ensure_in(&cache, &cfg, "libvirt", false, &quiet()).unwrap();
    assert!(built, "a changed file is a new box");
    assert_eq!((changed.id, changed.format), (sha256(&other), "raw".to_string()));
}

/// A `box.json`-free view of the binary's JSON document on stdout (the last line).
fn last_json(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout.lines().last().expect("a JSON line")).expect("JSON")
}

fn box_dir(server: &Server, sum: &str) -> Test {
    let t = Test::new();
    t.write(
        "box-config.toml",
        format!(
            "[machine]\nname = \"t\"\nprovider = \"libvirt\"\n\n[box]\nurl = \"{}\"\nsha256 = \"{sum}\"\n",
            server.url
        ),
    );
    t
}

#[test]
#[cfg_attr(
    windows,
    ignore = "windows: makes its disk images with Linux tools (mkfs.ext4, qemu-img), which Wine and Windows hosts lack"
)]
fn concurrent_builds_of_one_box_download_once() {
    let body = payload(2 * 1024 * 1024);
    let sum = sha256(&body);
    let server = Server::start(body);
    server.state.slow.store(true, Ordering::SeqCst);
    let cache = tempfile::tempdir().unwrap();
    let t = box_dir(&server, &sum);
    let dir = t.path().to_path_buf();
    let cache_path = cache.path().to_path_buf();
    let started = Instant::now();
    let runs: Vec<_> = (0..2)
        .map(|_| {
            let (dir, cache_path) = (dir.clone(), cache_path.clone());
            std::thread::spawn(move || {
                Test::new()
                    .cwd(&dir)
                    .env("PROVISIONER_CACHE_DIR", cache_path.display().to_string())
                    .args(["--json", "box", "build"])
                    .run()
                    .success()
                    .stdout()
            })
        })
        .collect();
    let outs: Vec<String> = runs.into_iter().map(|h| h.join().unwrap()).collect();
    let docs: Vec<serde_json::Value> = outs.iter().map(|o| last_json(o)).collect();
    let built: Vec<bool> = docs.iter().map(|d| d["built"].as_bool().unwrap()).collect();
    assert_eq!(built.iter().filter(|b| **b).count(), 1, "exactly one builds: {outs:?}");
    assert_eq!(docs[0]["id"], docs[1]["id"]);
    assert_eq!(server.requests(), vec![None], "one download for two builders");
    assert!(outs.iter().any(|o| o.contains("\"box_wait\"")), "the second waited on the lock: {outs:?}");
    eprintln!("two concurrent builds took {:?}", started.elapsed());
}

#[test]
#[cfg_attr(
    windows,
    ignore = "windows: makes its disk images with Linux tools (mkfs.ext4, qemu-img), which Wine and Windows hosts lack"
)]
fn box_list_build_remove_through_the_binary() {
    let tmp = tempfile::tempdir().unwrap();
    let img = qcow2(tmp.path());
    let sum = sha256(&img);
    let server = Server::start(img);
    let cache = tmp.path().join("cache").display().to_string();
    let t = box_dir(&server, &sum);
    let run = |args: &[&str]| {
        Test::new().cwd(t.path()).env("PROVISIONER_CACHE_DIR", cache.clone()).args(args.to_vec()).run()
    };

    let list = last_json(&run(&["--json", "box", "list"]).success().stdout());
    assert_eq!(list, serde_json::json!([]));
    run(&["box", "build"]).success().stderr_contains("built");
    let list = last_json(&run(&["--json", "box", "list"]).success().stdout());
    let b = &list[0];
    assert_eq!(b["id"], sum);
    assert_eq!((b["provider"].as_str(), b["format"].as_str()), (Some("libvirt"), Some("qcow2")));
    assert_eq!(b["source"], server.url);
    assert!(b["size"].as_u64().unwrap() > 0 && b["created"].as_str().unwrap().ends_with('Z'));
    run(&["box", "list"]).success().stdout_contains(&sum[..12]).stdout_contains("qcow2");
    run(&["box", "build"]).success().stderr_contains("already cached");

    run(&["box", "remove", "ffffffffffff"]).failure().stderr_contains("no cached box has the id");
    run(&["box", "remove", &sum[..12]]).success().stderr_contains("removed box");
    assert_eq!(last_json(&run(&["--json", "box", "list"]).success().stdout()), serde_json::json!([]));
    run(&["box", "remove", &sum]).failure().stderr_contains("box list");
}

/// The real thing: debootstrap from the configured mirror into the shared cache (reused across CI runs).
#[test]
#[ignore = "vm: builds a Debian box from the mirror"]
fn debian_box_builds_from_the_mirror_and_is_then_a_cache_hit() {
    let (t, doc) = build_lab_box();
    let disk = PathBuf::from(doc["disk"].as_str().unwrap());
    let check = std::process::Command::new("qemu-img").args(["check", "-U"]).arg(&disk).output().unwrap();
    assert!(check.status.success(), "qemu-img check: {check:?}");
    assert_eq!(doc["format"], "qcow2");
    for key in ["kernel", "initrd"] {
        let p = PathBuf::from(doc[key].as_str().unwrap());
        assert!(std::fs::metadata(&p).unwrap().len() > 1 << 20, "{key} {p:?}");
    }
    assert!(doc["cmdline"].as_str().unwrap().contains("root="));

    let started = Instant::now();
    let again = Test::new().cwd(t.path()).args(["--json", "box", "build"]).run().success();
    let doc2 = last_json(&again.stdout());
    assert_eq!(doc2["built"], false);
    assert_eq!(doc2["id"], doc["id"]);
    assert!(started.elapsed() < Duration::from_secs(10), "a cache hit is fast: {:?}", started.elapsed());
}

/// `box build --json` for the repo's own box-config.toml in a fresh dir: the dir and the box's JSON document.
fn build_lab_box() -> (Test, serde_json::Value) {
    let t = Test::new();
    let lab = std::fs::read_to_string(support::repo().join("box-config.toml")).unwrap();
    t.write("box-config.toml", lab);
    let doc = last_json(&Test::new().cwd(t.path()).args(["--json", "box", "build"]).run().success().stdout());
    (t, doc)
}

/// The mirror-built box really boots: direct kernel boot under QEMU (TCG, user networking with no outside
/// access), root on /dev/vda, systemd up, and cloud-init runs to the end on the console.
#[test]
#[ignore = "vm: boots the Debian box under QEMU"]
fn debian_box_boots_to_cloud_init_finished() {
    let (t, doc) = build_lab_box();
    let path = |k: &str| PathBuf::from(doc[k].as_str().unwrap());
    let overlay = t.path().join("overlay.qcow2");
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(path("disk"))
        .arg(&overlay)
        .arg("8G")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let mut qemu = std::process::Command::new("qemu-system-x86_64");
    qemu.args(["-accel", "tcg,thread=multi", "-cpu", "max", "-m", "1024", "-smp", "2", "-kernel"])
        .arg(path("kernel"))
        .arg("-initrd")
        .arg(path("initrd"))
        .args(["-append", doc["cmdline"].as_str().unwrap()])
        .arg("-drive")
        .arg(format!("file={},if=virtio,format=qcow2", overlay.display()))
        .args(["-netdev", "user,id=n0,restrict=on", "-device", "virtio-net-pci,netdev=n0"])
        .args(["-display", "none", "-monitor", "none", "-serial", "stdio"]);
    let vm = support::Proc::spawn("qemu", qemu, t.path().join("serial.log"));
    let started = Instant::now();
    support::wait_until(Duration::from_secs(15 * 60), "cloud-init to finish on the serial console", || {
        let log = vm.log_text();
        assert!(!log.contains("Kernel panic"), "kernel panic:\n{}", support::tail(&log, 40));
        (log.contains("Cloud-init v.") && log.contains("finished at")).then_some(())
    });
    let log = vm.log_text();
    assert!(log.contains("Welcome to") && log.contains("Debian GNU/Linux"), "{}", support::tail(&log, 40));
    eprintln!("boot to cloud-init finished: {:?}", started.elapsed());
}

/// Names in a private cache's `boxes/` that are neither lock files nor the hash memo: entries and leftovers.
fn cache_entries(cache: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(cache.join("boxes"))
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names
        .retain(|n| !n.ends_with(".lock") && !n.ends_with(".build.log") && n != "hashes" && n != "downloads");
    names.sort();
    names
}

/// A truncated qcow2 (its first half; also a 64 KiB stub) passes `qemu-img info`; a raw stub and an all-zero disk
/// have no qcow2 structure to check at all. Each must be refused on import with a clear error and a hint, and
/// nothing may be cached; the whole image is accepted.
#[test]
#[cfg_attr(
    windows,
    ignore = "windows: makes its disk images with Linux tools (mkfs.ext4, qemu-img), which Wine and Windows hosts lack"
)]
fn truncated_and_stub_images_are_refused_and_nothing_is_cached() {
    let t = Test::new();
    let dir = t.path().to_path_buf();
    let cache = dir.join("cache");
    // A 1 GiB disk with an ext4 filesystem holding 48 MiB of data, as qcow2 (~50 MB) and cut copies of it.
    let raw = dir.join("full.raw");
    ext4_raw(&raw, 1 << 20, 48 << 20);
    let full = dir.join("full.qcow2");
    run_ok(
        std::process::Command::new("qemu-img").args(["convert", "-q", "-O", "qcow2"]).arg(&raw).arg(&full),
    );
    let bytes = std::fs::read(&full).unwrap();
    let cut = |name: &str, from: &[u8], len: usize| {
        std::fs::write(dir.join(name), &from[..len]).unwrap();
        name.to_string()
    };
    let raw_bytes = std::fs::read(&raw).unwrap();
    let cases = [
        (cut("half.qcow2", &bytes, bytes.len() / 2), "qemu-img check` found"),
        (cut("stub.qcow2", &bytes, 64 * 1024), "qemu-img check` found"),
        (cut("stub.raw", &raw_bytes, 64 * 1024), "its ext2/3/4 filesystem needs 1073741824 bytes"),
        (cut("zero.raw", &vec![0u8; 1 << 20], 1 << 20), "all zeros"),
    ];
    let build = |image: &str| {
        t.write(
            "box-config.toml",
            format!("[machine]\nname = \"t\"\nprovider = \"libvirt\"\n\n[box]\nimage = \"{image}\"\n"),
        );
        Test::new()
            .cwd(&dir)
            .env("PROVISIONER_CACHE_DIR", cache.display().to_string())
            .args(["box", "build"])
            .run()
    };
    for (image, why) in &cases {
        // `qemu-img info` has no complaint about any of them: that is why import must look further.
        let info = std::process::Command::new("qemu-img")
            .args(["info", "-U"])
            .arg(dir.join(image))
            .output()
            .unwrap();
        assert!(info.status.success(), "{image}: {info:?}");
        let r = build(image).failure();
        let err = r.stderr();
        assert!(err.contains("is not a usable") && err.contains(why), "{image}:\n{err}");
        assert!(err.contains("hint: the file is probably truncated or damaged"), "{image}:\n{err}");
        assert!(cache_entries(&cache).is_empty(), "{image} left {:?} in the cache", cache_entries(&cache));
    }
    build("full.qcow2").success().stderr_contains("built");
    assert_eq!(cache_entries(&cache), vec![sha256(&bytes)]);
}

/// A VMDK of a 64 MiB disk with 3 MB of data, as qemu-img writes `subformat` (streamOptimized: compressed grains;
/// monolithicSparse; monolithicFlat: a descriptor and a `-flat` file). Returns the file the `.ovf` names.
fn qemu_vmdk(dir: &Path, subformat: &str) -> PathBuf {
    let raw = dir.join("data.raw");
    if !raw.exists() {
        let mut data = payload_bytes(3 << 20);
        data.resize(64 << 20, 0);
        std::fs::write(&raw, data).unwrap();
    }
    let out = dir.join(format!("{subformat}.vmdk"));
    run_ok(
        std::process::Command::new("qemu-img")
            .args(["convert", "-q", "-f", "raw", "-O", "vmdk", "-o", &format!("subformat={subformat}")])
            .arg(&raw)
            .arg(&out),
    );
    out
}

/// The check is pure Rust (no qemu-img on a VirtualBox host), so it is held against what a real tool writes:
/// every whole VMDK qemu-img makes passes, and each cut one is refused with what is wrong.
#[test]
#[cfg_attr(
    windows,
    ignore = "windows: makes its disk images with Linux tools (mkfs.ext4, qemu-img), which Wine and Windows hosts lack"
)]
fn vmdks_qemu_img_writes_pass_and_their_truncated_copies_fail() {
    use provisioner::boxes::integrity::check_vmdk;
    let t = tempfile::tempdir().unwrap();
    for (sub, cut_why) in
        [("streamOptimized", "a compressed grain is cut off"), ("monolithicSparse", "a grain is cut off")]
    {
        let f = qemu_vmdk(t.path(), sub);
        check_vmdk(&f).unwrap_or_else(|e| panic!("{sub}: {e}"));
        let bytes = std::fs::read(&f).unwrap();
        let cut = t.path().join(format!("cut-{sub}.vmdk"));
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        let e = check_vmdk(&cut).unwrap_err();
        assert!(e.contains(cut_why) && e.contains("(truncated)"), "{sub}: {e}");
    }
    let flat = qemu_vmdk(t.path(), "monolithicFlat");
    check_vmdk(&flat).unwrap();
    let extent = t.path().join("monolithicFlat-flat.vmdk");
    std::fs::OpenOptions::new().write(true).open(&extent).unwrap().set_len(1 << 20).unwrap();
    assert_eq!(
        check_vmdk(&flat).unwrap_err(),
        "its flat extent monolithicFlat-flat.vmdk has 1048576 bytes, the descriptor needs 67108864"
    );
}

/// A VirtualBox `.box` whose VMDK is truncated or garbage is refused on import with what is wrong and what to
/// do, and nothing of it stays in the cache (it used to be cached and stay after VirtualBox's import failed). The
/// same box with its whole VMDK is then cached.
#[test]
#[cfg_attr(
    windows,
    ignore = "windows: makes its disk images with Linux tools (mkfs.ext4, qemu-img), which Wine and Windows hosts lack"
)]
fn virtualbox_box_with_a_bad_vmdk_is_refused_and_not_cached() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::at(tmp.path().join("c/boxes")).unwrap();
    let vmdk = std::fs::read(qemu_vmdk(tmp.path(), "streamOptimized")).unwrap();
    let ovf = std::fs::read(support::repo().join("tests/fixtures/vbox/box.ovf")).unwrap();
    let cases: [(&str, &[u8], &str); 3] = [
        ("truncated", &vmdk[..vmdk.len() / 3], "grain is cut off"),
        ("garbage", b"<html>404 Not Found</html>", "it starts with neither the sparse-extent magic KDMV"),
        ("empty", b"", "the file is empty"),
    ];
    for (name, disk, why) in cases {
        let vb = tmp.path().join(format!("{name}.box"));
        std::fs::write(
            &vb,
            vagrant_box("virtualbox", &[("box.ovf", &ovf), ("box-disk001.vmdk", disk)], true),
        )
        .unwrap();
        let cfg = config(tmp.path(), "virtualbox", &format!("vagrant = '{}'", vb.display()));
        let e = boxes::ensure_in(&cache, &cfg, "virtualbox", false, &quiet()).unwrap_err();
        let e = format!("{e:#}");
        assert!(
            e.starts_with(&format!(
                "the box {} is not usable: box-disk001.vmdk is not a usable VMDK disk: ",
                vb.display()
            )),
            "{name}: {e}"
        );
        assert!(e.contains(why), "{name}: {e}");
        assert!(
            e.contains("\nhint: the box file is probably truncated or damaged (an interrupted download or copy): get it \
                        again and compare its sha256 with the publisher's, or export it again; it was not added to the \
                        box cache"),
            "{name}: {e}"
        );
        assert!(entries(&cache).is_empty(), "{name}: cached");
        assert_eq!(
            cache_entries(&tmp.path().join("c")),
            Vec::<String>::new(),
            "{name}: left in the cache dir"
        );
    }
    let vb = tmp.path().join("whole.box");
    std::fs::write(&vb, vagrant_box("virtualbox", &[("box.ovf", &ovf), ("box-disk001.vmdk", &vmdk)], true))
        .unwrap();
    let cfg = config(tmp.path(), "virtualbox", &format!("vagrant = '{}'", vb.display()));
    let (image, built) = boxes::ensure_in(&cache, &cfg, "virtualbox", false, &quiet()).unwrap();
    assert!(built);
    assert_eq!(std::fs::read(image.disk.with_file_name("box-disk001.vmdk")).unwrap(), vmdk);
}

/// `up --json` on a cold box cache: the box import reports through the command's Ui, so stdout carries only JSON
/// events and stderr no human phase lines (it did print `==> box hash` / `✓ box hash` there). Runs against the
/// VBoxManage double; `up` stops at its one-second SSH deadline.
/// A project in `dir` for the VBoxManage double (linked into `dir/vbox`, its state beside it) with a loose `.ovf` box.
fn vbox_project(t: &Test, name: &str) {
    let dir = t.path();
    let exe = support::vboxmanage_double(&dir.join("vbox"));
    let fixtures = support::repo().join("tests/fixtures/vbox");
    std::fs::create_dir_all(dir.join("box")).unwrap();
    std::fs::create_dir_all(dir.join("provision")).unwrap();
    std::fs::copy(fixtures.join("box.ovf"), dir.join("box/box.ovf")).unwrap();
    std::fs::copy(fixtures.join("box-disk001.vmdk"), dir.join("box/box-disk001.vmdk")).unwrap();
    t.write(
        "box-config.toml",
        format!(
            "[machine]\nname = \"{name}\"\nprovider = \"virtualbox\"\ncpus = 1\nmemory_mb = 1024\n\n[box]\n\
             vagrant = \"box/box.ovf\"\n\n[ssh]\nhost_port = {}\n\n[virtualbox]\nvboxmanage = {:?}\n",
            support::free_port(),
            exe.to_str().unwrap()
        ),
    );
}

#[test]
fn up_json_with_a_cold_box_cache_prints_only_json() {
    let t = Test::new();
    let dir = t.path().to_path_buf();
    vbox_project(&t, "vbj");
    let cache = dir.join("cache").display().to_string();
    let r = Test::new()
        .cwd(&dir)
        .env("PROVISIONER_CACHE_DIR", cache.clone())
        .args(["--json", "up", "--boot-timeout", "1"])
        .run();
    let (out, err) = (r.stdout(), r.stderr());
    let events: Vec<serde_json::Value> = out
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON on stdout ({e}): {l:?}\n{out}")))
        .collect();
    assert!(
        events.iter().any(|e| e["event"] == "phase_start" && e["phase"] == "box hash"),
        "the box import's phase is a JSON event:\n{out}"
    );
    assert!(events.iter().any(|e| e["event"] == "box" && e["built"] == true), "{out}");
    let human: Vec<&str> =
        err.lines().filter(|l| l.starts_with("==> ") || l.starts_with("✓ ") || l.starts_with("✗ ")).collect();
    assert!(human.is_empty(), "human progress lines under --json: {human:?}\n{err}");
    Test::new().cwd(&dir).env("PROVISIONER_CACHE_DIR", cache).args(["destroy", "-f"]).run().success();
}

/// A mirror on 127.0.0.1 that accepts every connection, reads the request and never answers: debootstrap (its
/// wget) then waits, so a test can interrupt a box build in the middle of debootstrap without any network. Unix
/// only, like debootstrap.
#[cfg(unix)]
struct HangingMirror {
    url: String,
    requests: Arc<std::sync::atomic::AtomicUsize>,
}

#[cfg(unix)]
impl HangingMirror {
    fn start() -> Self {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/debian", l.local_addr().unwrap());
        let requests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = requests.clone();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for s in l.incoming().flatten() {
                let mut line = String::new();
                let _ = BufReader::new(&s).read_line(&mut line);
                if line.starts_with("GET ") {
                    seen.fetch_add(1, Ordering::SeqCst);
                }
                held.push(s);
            }
        });
        HangingMirror { url, requests }
    }
}

/// Ctrl-C (and then SIGTERM) while `box build` runs debootstrap: the build stops within seconds with 130 (143),
/// no process of the run survives (debootstrap and wget ran in their own process groups, which a terminal's
/// SIGINT does not reach: they used to go on alone), no partial entry is left, the lock is free, and the next
/// build starts clean and gets to the same point. Needs root (debootstrap), like every mirror build.
#[test]
#[cfg_attr(
    windows,
    ignore = "windows: debootstrap needs root on Linux, and the signals are sent with kill(2)"
)]
fn box_build_interrupted_during_debootstrap_leaves_nothing_and_reruns() {
    #[cfg(unix)]
    {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: building a box from a mirror needs root");
            return;
        }
        let mirror = HangingMirror::start();
        let t = Test::new();
        t.write(
        "box-config.toml",
        format!(
            "[machine]\nname = \"t\"\nprovider = \"libvirt\"\n\n[box.debian]\nsuite = \"bookworm\"\nmirror = \"{}\"\n\
             packages = []\n",
            mirror.url
        ),
    );
        let cache = t.path().join("cache");
        for (round, (sig, code)) in [(libc::SIGINT, 130), (libc::SIGTERM, 143)].into_iter().enumerate() {
            let marker = format!("PROVISIONER_TEST_RUN=boxintr-{}-{round}", std::process::id());
            let (key, value) = marker.split_once('=').unwrap();
            let mut c = std::process::Command::new(support::bin());
            c.args(["--json", "box", "build"])
                .current_dir(t.path())
                .env("PROVISIONER_CACHE_DIR", &cache)
                .env(key, value);
            // SAFETY: only async-signal-safe signal(2) between fork and exec: a runner started in the background may
            // have left SIGINT ignored, and the build must see it as a user's Ctrl-C would.
            unsafe {
                use std::os::unix::process::CommandExt;
                c.pre_exec(|| {
                    libc::signal(libc::SIGINT, libc::SIG_DFL);
                    Ok(())
                });
            }
            let mut p = support::Proc::spawn("box build", c, t.path().join(format!("build{round}.log")));
            let before = mirror.requests.load(Ordering::SeqCst);
            support::wait_until(Duration::from_secs(120), "debootstrap to ask the mirror", || {
                if let Some(st) = p.child.try_wait().unwrap() {
                    panic!("box build ended before the interrupt ({st}):\n{}", p.log_text());
                }
                (mirror.requests.load(Ordering::SeqCst) > before).then_some(())
            });
            let running = support::processes_with_env(&marker);
            assert!(
                running.iter().any(|p| p.ends_with(" debootstrap")),
                "debootstrap is running: {running:?}"
            );
            let started = Instant::now();
            // SAFETY: kill(2) on the child we started.
            unsafe { libc::kill(p.child.id() as i32, sig) };
            let st = support::wait_until(Duration::from_secs(30), "box build to exit", || {
                p.child.try_wait().unwrap()
            });
            eprintln!("round {round}: exited {st} {:?} after the signal", started.elapsed());
            assert_eq!(st.code(), Some(code), "exit code for signal {sig}:\n{}", p.log_text());
            let log = p.log_text();
            assert!(log.contains("\"event\":\"interrupted\""), "{log}");
            assert!(log.contains("hint: run the same command again"), "{log}");
            support::wait_until(Duration::from_secs(10), "every process of the run to be gone", || {
                support::processes_with_env(&marker).is_empty().then_some(())
            });
            assert!(cache_entries(&cache).is_empty(), "left in the cache: {:?}", cache_entries(&cache));
            // The build lock is free again.
            for e in std::fs::read_dir(cache.join("boxes")).unwrap().flatten() {
                if e.file_name().to_string_lossy().ends_with(".lock") {
                    let f = std::fs::File::open(e.path()).unwrap();
                    assert!(
                        fs4::fs_std::FileExt::try_lock_exclusive(&f).unwrap(),
                        "{:?} still locked",
                        e.path()
                    );
                }
            }
        }
        assert_eq!(mirror.requests.load(Ordering::SeqCst), 2, "the re-run started debootstrap again");
    }
}

/// A box that passes every import check but has no bootloader (a bare ext4 filesystem, booted by BIOS from its
/// disk): SeaBIOS now writes to the serial console, so `up` fails naming the firmware's verdict instead of an empty
/// serial log. Costs one short TCG boot (~30-60 s).
#[test]
#[ignore = "vm: boots a libvirt guest into SeaBIOS with nothing to boot"]
fn vm_unbootable_box_reports_the_firmware_error() {
    let t = Test::new();
    let dir = t.path().to_path_buf();
    ext4_raw(&dir.join("blank.raw"), 64 * 1024, 4096);
    let name = format!("nb{}", std::process::id() % 100_000);
    t.write(
        "box-config.toml",
        format!(
            "[machine]\nname = \"{name}\"\nprovider = \"libvirt\"\ncpus = 1\nmemory_mb = 512\ndisk_gb = 2\n\n\
             [box]\nimage = \"blank.raw\"\n\n[ssh]\nhost_port = {}\n\n[provision]\nenabled = false\n\n\
             [libvirt]\nuri = \"qemu:///session\"\n",
            support::free_port()
        ),
    );
    let cache = dir.join("cache").display().to_string();
    let run = |args: &[&str]| {
        Test::new().cwd(&dir).env("PROVISIONER_CACHE_DIR", cache.clone()).args(args.iter().copied()).run()
    };
    struct Destroy<'a>(&'a dyn Fn(&[&str]) -> support::Run);
    impl Drop for Destroy<'_> {
        fn drop(&mut self) {
            let r = (self.0)(&["destroy", "-f"]);
            if !r.out.status.success() {
                eprintln!("cleanup destroy failed: {}", r.stderr());
            }
        }
    }
    let _cleanup = Destroy(&run);
    let started = Instant::now();
    let r = run(&["up", "--no-provision", "--boot-timeout", "45"]).failure();
    eprintln!("up failed after {:?}", started.elapsed());
    let serial = std::fs::read_to_string(dir.join(".provisioner/serial.log")).unwrap_or_default();
    assert!(serial.contains("SeaBIOS"), "firmware output on the serial console:\n{serial}\n{}", r.stderr());
    assert!(serial.contains("Boot failed") || serial.contains("No bootable device"), "{serial}");
    r.stderr_contains("the firmware found nothing to boot on the disk");
}

/// Ctrl-C while `up` waits for SSH (here: a VM of the VBoxManage double that never answers): `up` stops at once
/// with 130 and an `interrupted` event instead of dying by the signal, and the next `up` goes on from the recorded
/// state (the machine exists and runs: no second import, no second VM).
#[test]
#[cfg_attr(
    windows,
    ignore = "windows: sends SIGINT with kill(2); a console Ctrl-C is sent by the tests in tests/windows.rs"
)]
fn up_interrupted_while_waiting_for_ssh_exits_130_and_reruns() {
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        let t = Test::new();
        let dir = t.path().to_path_buf();
        vbox_project(&t, "vbi");
        let cache = dir.join("cache");
        let mut c = std::process::Command::new(support::bin());
        c.args(["--json", "up", "--boot-timeout", "600"])
            .current_dir(&dir)
            .env("PROVISIONER_CACHE_DIR", &cache);
        // SAFETY: only async-signal-safe signal(2) between fork and exec (a background runner may ignore SIGINT).
        unsafe {
            c.pre_exec(|| {
                libc::signal(libc::SIGINT, libc::SIG_DFL);
                Ok(())
            });
        }
        let mut up = support::Proc::spawn("up", c, dir.join("up.log"));
        support::wait_until(Duration::from_secs(120), "`up` to wait for SSH", || {
            if let Some(st) = up.child.try_wait().unwrap() {
                panic!("`up` ended early ({st}):\n{}", up.log_text());
            }
            up.log_text().contains(r#"{"event":"phase_start","phase":"ssh"}"#).then_some(())
        });
        let signalled = Instant::now();
        // SAFETY: kill(2) on the child we started.
        unsafe { libc::kill(up.child.id() as i32, libc::SIGINT) };
        let st =
            support::wait_until(Duration::from_secs(15), "`up` to exit", || up.child.try_wait().unwrap());
        let took = signalled.elapsed();
        assert_eq!(st.code(), Some(130), "{}", up.log_text());
        assert!(took < Duration::from_secs(5), "Ctrl-C took {took:?} to stop `up`");
        let interrupted = up
            .log_text()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["event"] == "interrupted")
            .unwrap_or_else(|| panic!("no interrupted event:\n{}", up.log_text()));
        assert_eq!(
            (interrupted["signal"].as_str(), interrupted["exit_code"].as_i64()),
            (Some("SIGINT"), Some(130))
        );
        let again = Test::new()
            .cwd(&dir)
            .env("PROVISIONER_CACHE_DIR", cache.display().to_string())
            .args(["--json", "up", "--boot-timeout", "1"])
            .run()
            .failure();
        assert!(again.stderr().contains("did not answer SSH"), "{}", again.stderr());
        let calls = std::fs::read_to_string(dir.join("vbox/vboxdouble/calls.log")).unwrap_or_default();
        assert_eq!(calls.lines().filter(|l| l.starts_with("import ")).count(), 1, "{calls}");
        Test::new()
            .cwd(&dir)
            .env("PROVISIONER_CACHE_DIR", cache.display().to_string())
            .args(["destroy", "-f"])
            .run()
            .success();
    }
}

/// A tar of `metadata.json` (as given) and `files`.
fn box_with_metadata(md: &str, files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut entries: Vec<(&str, &[u8])> = vec![("metadata.json", md.as_bytes())];
    entries.extend_from_slice(files);
    for (name, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, data).unwrap();
    }
    b.into_inner().unwrap()
}

/// vagrant-libvirt box format v2: `disks: [{path}]`, the first the boot disk. Issue 20 changes what a box with
/// several disks gets: it used to be refused; now every disk is cached, the others (which may be blank data disks)
/// in the box's order, and a cache hit gives them back. A truncated data disk is refused like a boot disk, and so
/// is a disk named twice.
#[test]
#[cfg_attr(
    windows,
    ignore = "windows: makes its disk images with Linux tools (mkfs.ext4, qemu-img), which Wine and Windows hosts lack"
)]
fn vagrant_libvirt_v2_boxes_name_their_disks() {
    let tmp = tempfile::tempdir().unwrap();
    let img = qcow2(tmp.path());
    let cache = Cache::at(tmp.path().join("cache")).unwrap();
    let md = r#"{"provider":"libvirt","format":"qcow2","disks":[{"path":"disk0.qcow2","format":"qcow2"}]}"#;
    let v2 = tmp.path().join("v2.box");
    std::fs::write(&v2, box_with_metadata(md, &[("disk0.qcow2", &img)])).unwrap();
    let cfg = config(tmp.path(), "libvirt", &format!("vagrant = \"{}\"", v2.display()));
    let (image, _) = boxes::ensure_in(&cache, &cfg, "libvirt", false, &quiet()).unwrap();
    assert_eq!(image.disk.file_name().unwrap(), "disk0.qcow2");
    assert_eq!(std::fs::read(&image.disk).unwrap(), img);
    assert!(image.extra_disks.is_empty());

    // A blank data disk, as `qemu-img create` makes it: nothing bootable, and not asked to be.
    let blank = tmp.path().join("blank.qcow2");
    run_ok(
        std::process::Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&blank).arg("8M"),
    );
    let blank = std::fs::read(&blank).unwrap();
    let md = r#"{"provider":"libvirt","format":"qcow2","disks":[{"path":"b.qcow2"},{"path":"a.qcow2","format":"qcow2"},{"path":"c.raw"}]}"#;
    let three = tmp.path().join("three.box");
    let raw = vec![0u8; 1 << 20];
    std::fs::write(&three, box_with_metadata(md, &[("a.qcow2", &blank), ("b.qcow2", &img), ("c.raw", &raw)]))
        .unwrap();
    let cfg = config(tmp.path(), "libvirt", &format!("vagrant = \"{}\"", three.display()));
    for hit in [false, true] {
        let (image, built) = boxes::ensure_in(&cache, &cfg, "libvirt", false, &quiet()).unwrap();
        assert_eq!(built, !hit);
        assert_eq!(image.disk.file_name().unwrap(), "b.qcow2", "the first listed is the boot disk");
        let dir = image.disk.parent().unwrap().to_path_buf();
        assert_eq!(
            image.extra_disks,
            vec![(dir.join("a.qcow2"), "qcow2".to_string()), (dir.join("c.raw"), "raw".to_string())],
            "hit: {hit}"
        );
        assert_eq!(std::fs::read(dir.join("a.qcow2")).unwrap(), blank);
    }

    let md = r#"{"provider":"libvirt","format":"qcow2","disks":[{"path":"a.qcow2"},{"path":"b.qcow2"}]}"#;
    let cut = tmp.path().join("cut.box");
    std::fs::write(&cut, box_with_metadata(md, &[("a.qcow2", &img), ("b.qcow2", &img[..img.len() / 2])]))
        .unwrap();
    let cfg = config(tmp.path(), "libvirt", &format!("vagrant = \"{}\"", cut.display()));
    let e = format!("{:#}", boxes::ensure_in(&cache, &cfg, "libvirt", false, &quiet()).unwrap_err());
    assert!(e.contains("b.qcow2 is not a usable qcow2 disk image") && e.contains("\nhint: "), "{e}");

    let md = r#"{"provider":"libvirt","format":"qcow2","disks":[{"path":"a.qcow2"},{"path":"a.qcow2"}]}"#;
    let twice = tmp.path().join("twice.box");
    std::fs::write(&twice, box_with_metadata(md, &[("a.qcow2", &img)])).unwrap();
    let cfg = config(tmp.path(), "libvirt", &format!("vagrant = \"{}\"", twice.display()));
    let e = format!("{:#}", boxes::ensure_in(&cache, &cfg, "libvirt", false, &quiet()).unwrap_err());
    assert!(e.contains("names the disk \"a.qcow2\" twice\nhint: "), "{e}");
    // Only the two good boxes are cached.
    assert_eq!(entries(&cache).len(), 2);
}

/// A Vagrant catalog (`metadata.json` with versions and providers) over file://: the newest version matching
/// `version` is picked and downloaded against the catalog's sha256; a wrong checksum is refused, nothing cached.
#[test]
#[cfg_attr(
    windows,
    ignore = "windows: makes its disk images with Linux tools (mkfs.ext4, qemu-img), which Wine and Windows hosts lack"
)]
fn vagrant_catalog_picks_a_version_and_checks_its_checksum() {
    let tmp = tempfile::tempdir().unwrap();
    let img = qcow2(tmp.path());
    let cache = Cache::at(tmp.path().join("cache")).unwrap();
    let boxfile = tmp.path().join("v1.2.box");
    std::fs::write(&boxfile, vagrant_box("libvirt", &[("box.img", &img)], true)).unwrap();
    let good = sha256(&std::fs::read(&boxfile).unwrap());
    let catalog = |sum: &str| {
        format!(
            r#"{{"name":"acme/t","versions":[
              {{"version":"1.2.0","providers":[{{"name":"libvirt","url":"file://{b}","checksum_type":"sha256","checksum":"{sum}"}}]}},
              {{"version":"2.0.0","providers":[{{"name":"libvirt","url":"file:///nonexistent.box","checksum_type":"sha256","checksum":"{sum}"}}]}}]}}"#,
            b = boxfile.display()
        )
    };
    let md = tmp.path().join("metadata.json");
    let bad = "0".repeat(64);
    std::fs::write(&md, catalog(&bad)).unwrap();
    let box_toml = format!("url = \"file://{}\"\nversion = \">= 1.2, < 2\"", md.display());
    let cfg = config(tmp.path(), "libvirt", &box_toml);
    let e = format!("{:#}", boxes::ensure_in(&cache, &cfg, "libvirt", false, &quiet()).unwrap_err());
    assert!(e.contains("checksum mismatch"), "{e}");
    assert!(entries(&cache).is_empty(), "a refused download is not cached");

    std::fs::write(&md, catalog(&good)).unwrap();
    let (image, built) = boxes::ensure_in(&cache, &cfg, "libvirt", false, &quiet()).unwrap();
    assert!(built);
    assert_eq!(image.id, good);

    // `version` without a catalog: refused at its line and column.
    let text = format!(
        "[machine]\nname = \"t\"\n\n[box]\nurl = \"file://{}\"\nsha256 = \"{good}\"\nversion = \"1\"\n",
        boxfile.display()
    );
    let e = format!(
        "{:#}",
        Config::from_bytes(&tmp.path().join("box-config.toml"), text.as_bytes()).unwrap_err()
    );
    assert!(e.contains("box-config.toml:7:") && e.contains("needs `url` to name a Vagrant catalog"), "{e}");
}
