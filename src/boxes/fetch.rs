//! `url` + `sha256` boxes: download (HTTP with Range resume, or `file://`) to `downloads/<sha256>.part`, verify,
//! then import the file by its content (disk image, Vagrant `.box`, `.ova`).

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use super::cache::{sha256_file, BoxMeta, Cache};
use super::import;
use crate::ui::{Mode, Ui};

/// Tries per `ensure` before giving up (each resumes where the last stopped when the server allows it).
const ATTEMPTS: u32 = 3;

/// The cached box for `url`, whose content must hash to `sha256`.
pub fn ensure(cache: &Cache, url: &str, sha256: &str, force: bool, ui: &Ui) -> Result<(BoxMeta, bool)> {
    let id = normalize_sha256(sha256)?;
    cache.get_or_build(&id, force, ui, |dir| {
        let part = cache.downloads_dir()?.join(format!("{id}.part"));
        let phase = ui.phase("download");
        fetch(url, &part, ui)?;
        phase.message("verifying sha256");
        let got = sha256_file(&part)?;
        if got != id {
            std::fs::remove_file(&part).with_context(|| format!("remove {}", part.display()))?;
            bail!(
                "checksum mismatch for {url}\n  expected sha256 {id}\n  got      sha256 {got}\n\
                 hint: the download was deleted; check the `sha256` in box-config.toml against the publisher's \
                 checksum list (or `sha256sum` of a copy you trust), then run again"
            );
        }
        let size = part.metadata().map(|m| m.len()).unwrap_or(0);
        phase.done(&format!("{} bytes, sha256 ok", size));
        let file = dir.join(file_name(url));
        std::fs::rename(&part, &file).with_context(|| format!("move {} into the cache", part.display()))?;
        import::unpack(&file, dir, url.to_string())
    })
}

fn normalize_sha256(s: &str) -> Result<String> {
    let s = s.trim().trim_start_matches("sha256:").to_ascii_lowercase();
    if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!(
            "[box] sha256 = {s:?} is not a sha256 (64 hex digits)\nhint: copy it from the publisher's \
             SHA256SUMS, or run `sha256sum FILE`"
        );
    }
    Ok(s)
}

/// The last path segment of a URL (for a readable file name in the cache).
fn file_name(url: &str) -> String {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    let name = path.rsplit('/').next().unwrap_or("").trim();
    if name.is_empty() || name == "." || name == ".." {
        "download".into()
    } else {
        name.into()
    }
}

/// Bring `url` into `part`, resuming what an earlier try left there.
fn fetch(url: &str, part: &Path, ui: &Ui) -> Result<()> {
    if let Some(path) = url.strip_prefix("file://") {
        let src = PathBuf::from(path);
        std::fs::copy(&src, part).with_context(|| {
            format!(
                "cannot read {url}\nhint: check the path; a file:// URL needs an absolute path (file:///...)"
            )
        })?;
        return Ok(());
    }
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        bail!("[box] url = {url:?}: only http://, https:// and file:// URLs are supported");
    }
    let agent = crate::http::agent()?
        .timeout_connect(Duration::from_secs(30))
        .timeout_read(Duration::from_secs(60))
        .build();
    let mut last = None;
    for attempt in 1..=ATTEMPTS {
        match download(&agent, url, part, ui) {
            Ok(()) => return Ok(()),
            Err(Failure::Fatal(e)) => return Err(e),
            Err(Failure::Retry(e)) => {
                if attempt < ATTEMPTS {
                    ui.warn(format!("{e:#}; retrying ({attempt}/{ATTEMPTS})"));
                }
                last = Some(e);
            }
        }
    }
    let have = part.metadata().map(|m| m.len()).unwrap_or(0);
    Err(last.expect("at least one attempt").context(format!(
        "download of {url} failed {ATTEMPTS} times ({have} bytes kept in {})\nhint: run again to resume; if the \
         server is unreachable, check the URL, DNS and any proxy",
        part.display()
    )))
}

enum Failure {
    /// Worth another try (connection dropped, timeout): the part file keeps what arrived.
    Retry(anyhow::Error),
    Fatal(anyhow::Error),
}

fn download(agent: &ureq::Agent, url: &str, part: &Path, ui: &Ui) -> Result<(), Failure> {
    let have = part.metadata().map(|m| m.len()).unwrap_or(0);
    let mut req = agent.get(url);
    if have > 0 {
        req = req.set("Range", &format!("bytes={have}-"));
    }
    let resp = match req.call() {
        Ok(r) => r,
        // Nothing left to send: the part file is already whole (the checksum decides).
        Err(ureq::Error::Status(416, _)) if have > 0 => return Ok(()),
        Err(ureq::Error::Status(code, r)) => {
            return Err(Failure::Fatal(anyhow::anyhow!(
                "{url}: HTTP {code} {}\nhint: check the URL in box-config.toml",
                r.status_text()
            )))
        }
        Err(e) if crate::http::is_certificate_error(&e) => {
            return Err(Failure::Fatal(anyhow::anyhow!(
                "{url}: {e}\nhint: {}",
                crate::http::CERTIFICATE_HINT
            )))
        }
        Err(e) => return Err(Failure::Retry(anyhow::anyhow!("{url}: {e}"))),
    };
    let resumed = have > 0
        && resp.status() == 206
        && resp.header("Content-Range").is_some_and(|v| v.starts_with(&format!("bytes {have}-")));
    let start = if resumed { have } else { 0 };
    let total = resp.header("Content-Length").and_then(|v| v.parse::<u64>().ok()).map(|n| n + start);
    let mut file =
        if resumed { std::fs::OpenOptions::new().append(true).open(part) } else { File::create(part) }
            .with_context(|| format!("open {}", part.display()))
            .map_err(Failure::Fatal)?;
    let bar = progress_bar(ui, total, start);
    let mut body = resp.into_reader();
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = start;
    loop {
        let n = match body.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                bar.abandon();
                let of = total.map(|t| format!(" of {t}")).unwrap_or_default();
                return Err(Failure::Retry(anyhow::anyhow!("{url}: interrupted after {got}{of} bytes: {e}")));
            }
        };
        file.write_all(&buf[..n])
            .with_context(|| format!("write {} (is the disk full?)", part.display()))
            .map_err(Failure::Fatal)?;
        got += n as u64;
        bar.set_position(got);
        if let Err(stop) = crate::process::check_interrupted() {
            // Kept on purpose: the next run resumes from it. Say so instead of "nothing half-made was kept".
            bar.abandon();
            let _ = file.flush();
            crate::process::set_interrupt_note(format!(
                "the {got} bytes downloaded so far stay in {}; the next run resumes from them",
                part.display()
            ));
            return Err(Failure::Fatal(stop));
        }
    }
    file.flush().map_err(|e| Failure::Fatal(e.into()))?;
    bar.finish_and_clear();
    match total {
        Some(t) if got < t => {
            Err(Failure::Retry(anyhow::anyhow!("{url}: the server closed after {got} of {t} bytes")))
        }
        _ => Ok(()),
    }
}

fn progress_bar(ui: &Ui, total: Option<u64>, pos: u64) -> ProgressBar {
    if ui.mode != Mode::Human {
        return ProgressBar::hidden();
    }
    // indicatif draws to stderr only when it is a terminal.
    let bar = ProgressBar::new(total.unwrap_or(0));
    let template = if total.is_some() {
        "  {bar:30.cyan/blue} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}"
    } else {
        "  {spinner} {bytes} {bytes_per_sec}"
    };
    bar.set_style(ProgressStyle::with_template(template).expect("valid template").progress_chars("=> "));
    bar.set_position(pos);
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_is_checked_for_shape() {
        let ok = "A".repeat(64);
        assert_eq!(normalize_sha256(&format!("sha256:{ok}")).unwrap(), "a".repeat(64));
        assert!(normalize_sha256("abc").unwrap_err().to_string().contains("64 hex"));
        assert!(normalize_sha256(&"g".repeat(64)).is_err());
    }

    #[test]
    fn file_names_from_urls() {
        assert_eq!(file_name("http://h/a/debian.qcow2?x=1"), "debian.qcow2");
        assert_eq!(file_name("http://h/"), "download");
    }
}
