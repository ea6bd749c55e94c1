//! HTTP GETs to a unix socket in the guest, carried by the SSH connection itself (`direct-streamlocal@openssh.com`,
//! what `ssh -L ./local.sock:/remote.sock` uses): the guest's sshd connects to the socket as the SSH user, so no
//! process starts in the guest. The health check reads the Docker Engine API this way
//! ([`crate::guest::containers_json`]).
//!
//! A socket the connection may not reach (sshd's `AllowStreamLocalForwarding no`, a user outside the socket's
//! group, no such socket) is refused when the channel opens, in one round trip: the answer is then `None` and the
//! caller runs a command instead. The session remembers the refusal, so it is asked once.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use super::{millis, Session, LIBSSH2_ERROR_TIMEOUT, SLICE};

/// libssh2's code for a channel the server refused to open (`SSH_MSG_CHANNEL_OPEN_FAILURE`).
const LIBSSH2_ERROR_CHANNEL_FAILURE: i32 = -21;

/// An HTTP response: its status code and its body (de-chunked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    pub status: u16,
    pub body: Vec<u8>,
}

/// GETs sent ahead ([`Session::prefetch_get`]): the open channel of each, keyed by socket and path, with how many
/// times its answer may be served; and the sockets this connection may not reach.
#[derive(Default)]
pub(super) struct Gets {
    sent: HashMap<(String, String), (ssh2::Channel, usize)>,
    answered: HashMap<(String, String), (HttpResponse, usize)>,
    refused: std::collections::HashSet<String>,
}

impl Gets {
    /// Forget every answer sent ahead (something ran that may change them); refusals stay.
    pub(super) fn clear(&mut self) {
        self.sent.clear();
        self.answered.clear();
    }
}

impl Session {
    /// Send the GET of `path` on `socket` now, and keep its answer for the first `times` [`Session::socket_get`]s
    /// of exactly that path while no command runs on this session (as [`Session::prefetch`] keeps a command's
    /// answer; a prefetch of commands leaves it, its commands only read). The guest answers while the caller
    /// does something else. False when this connection may not reach the socket.
    pub fn prefetch_get(&self, socket: &str, path: &str, times: usize) -> bool {
        match self.open_get(socket, path) {
            Ok(Some(ch)) => {
                self.gets().sent.insert((socket.to_string(), path.to_string()), (ch, times.max(1)));
                true
            }
            Ok(None) => false,
            Err(e) => {
                if crate::process::verbosity() >= 1 {
                    eprintln!("+ ssh GET {path} on {socket} not sent ahead: {e:#}");
                }
                false
            }
        }
    }

    /// GET each of `paths` on `socket` (a unix socket in the guest) through this connection: one channel each, every
    /// request sent before any answer is read, so the guest answers them side by side. `Ok(None)` when this
    /// connection may not reach the socket (said once per session: the caller then asks with a command).
    pub fn socket_get(
        &self,
        socket: &str,
        paths: &[String],
        timeout: Duration,
    ) -> Result<Option<Vec<HttpResponse>>> {
        let started = Instant::now();
        let deadline = started + timeout;
        enum Pending {
            Ready(HttpResponse),
            Reading(ssh2::Channel),
        }
        let mut pending = Vec::with_capacity(paths.len());
        for path in paths {
            let key = (socket.to_string(), path.clone());
            let mut gets = self.gets();
            if let Some((answer, times)) = gets.answered.get_mut(&key) {
                *times -= 1;
                let answer = answer.clone();
                if *times == 0 {
                    gets.answered.remove(&key);
                }
                pending.push(Pending::Ready(answer));
                continue;
            }
            if let Some((ch, times)) = gets.sent.remove(&key) {
                drop(gets);
                let answer = self.read_get(ch, path, deadline)?;
                if times > 1 {
                    self.gets().answered.insert(key, (answer.clone(), times - 1));
                }
                pending.push(Pending::Ready(answer));
                continue;
            }
            drop(gets);
            match self.open_get(socket, path)? {
                Some(ch) => pending.push(Pending::Reading(ch)),
                None => return Ok(None),
            }
        }
        let mut answers = Vec::with_capacity(paths.len());
        for (p, path) in pending.into_iter().zip(paths) {
            answers.push(match p {
                Pending::Ready(answer) => answer,
                Pending::Reading(ch) => self.read_get(ch, path, deadline)?,
            });
        }
        if crate::process::verbosity() >= 1 {
            // The path without its query (an encoded filter, long and unreadable).
            let first = paths.first().map(String::as_str).unwrap_or_default();
            let first = match first.split_once('?') {
                Some((path, _)) => format!("{path}?…"),
                None => first.to_string(),
            };
            let more = match paths.len() {
                0 | 1 => String::new(),
                n => format!(" (+{} more)", n - 1),
            };
            eprintln!(
                "+ ssh {} ms: GET {}{more} on {socket} (through the connection, no process in the guest)",
                started.elapsed().as_millis(),
                super::shown_command(&first)
            );
        }
        Ok(Some(answers))
    }

    fn gets(&self) -> std::sync::MutexGuard<'_, Gets> {
        self.gets.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Open a channel to `socket` and send the GET of `path`; None when the server refuses the channel.
    fn open_get(&self, socket: &str, path: &str) -> Result<Option<ssh2::Channel>> {
        if self.gets().refused.contains(socket) {
            return Ok(None);
        }
        self.sess.set_timeout(millis(SLICE));
        let mut ch = match self.sess.channel_direct_streamlocal(socket, None) {
            Ok(ch) => ch,
            Err(e) if e.code() == ssh2::ErrorCode::Session(LIBSSH2_ERROR_CHANNEL_FAILURE) => {
                if crate::process::verbosity() >= 1 {
                    eprintln!("+ ssh: {socket} is not reachable through the connection ({e}); a command asks instead");
                }
                self.gets().refused.insert(socket.to_string());
                return Ok(None);
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("open a channel to {socket} on {}", self.addr))
                    .context(super::RECONNECT_HINT)
            }
        };
        super::GETS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // `Connection: close`: the answer ends where the stream does. No EOF is sent: Go's server (dockerd)
        // takes a half-closed request for a client gone and may cancel it.
        let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        ch.write_all(request.as_bytes())
            .with_context(|| format!("send GET {path} to {socket} on {}", self.addr))?;
        Ok(Some(ch))
    }

    /// Read a GET's answer to the end of its stream and close its channel, by `deadline`.
    fn read_get(&self, mut ch: ssh2::Channel, path: &str, deadline: Instant) -> Result<HttpResponse> {
        let mut raw = Vec::new();
        let mut buf = [0u8; 32 * 1024];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("GET {path} through the connection to {} had no complete answer in time", self.addr);
            }
            self.sess.set_timeout(millis(left.min(SLICE)));
            match ch.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => raw.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                    self.sess.keepalive_send().context("connection lost while waiting for an answer")?;
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("read the answer to GET {path} on {}", self.addr))
                }
            }
        }
        // The answer is whole: close our side too (sshd keeps a half-open channel until then).
        let _ = ch.send_eof();
        let _ = ch.close();
        match ch.wait_close() {
            Ok(()) => {}
            Err(e) if e.code() == ssh2::ErrorCode::Session(LIBSSH2_ERROR_TIMEOUT) => {}
            Err(e) => {
                return Err(e).with_context(|| format!("close the channel of GET {path} on {}", self.addr))
            }
        }
        parse_response(&raw).with_context(|| format!("the answer to GET {path} on {}", self.addr))
    }
}

/// An HTTP/1.x response read to the end of its stream: the status, and the body as `Content-Length` or the chunked
/// encoding frames it (else all that follows the headers). Pure.
pub(crate) fn parse_response(raw: &[u8]) -> Result<HttpResponse> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| anyhow!("no end of headers"))?;
    let head = std::str::from_utf8(&raw[..end]).context("headers are not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = match status_line.split(' ').collect::<Vec<_>>()[..] {
        [version, code, ..] if version.starts_with("HTTP/1.") => code.parse::<u16>().ok(),
        _ => None,
    }
    .ok_or_else(|| anyhow!("not an HTTP/1.x status line: {status_line:?}"))?;
    let mut chunked = false;
    let mut length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else { continue };
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().split(',').any(|v| v.trim() == "chunked");
        } else if name.eq_ignore_ascii_case("content-length") {
            length = Some(value.parse::<usize>().with_context(|| format!("Content-Length {value:?}"))?);
        }
    }
    let rest = &raw[end + 4..];
    let body = if chunked {
        dechunk(rest)?
    } else if let Some(n) = length {
        rest.get(..n).ok_or_else(|| anyhow!("body cut short: {} of {n} bytes", rest.len()))?.to_vec()
    } else {
        rest.to_vec()
    };
    Ok(HttpResponse { status, body })
}

/// The body of a chunked transfer: each chunk's size line (hex, extensions ignored), its bytes and a CRLF, up
/// to the last (size 0) chunk.
fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let eol =
            rest.windows(2).position(|w| w == b"\r\n").ok_or_else(|| anyhow!("chunked body cut short"))?;
        let line = std::str::from_utf8(&rest[..eol]).context("chunk size is not text")?;
        let hex = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(hex, 16).with_context(|| format!("chunk size {hex:?}"))?;
        rest = &rest[eol + 2..];
        if size == 0 {
            return Ok(body);
        }
        let chunk =
            rest.get(..size).ok_or_else(|| anyhow!("chunk cut short: {} of {size} bytes", rest.len()))?;
        body.extend_from_slice(chunk);
        rest = rest.get(size + 2..).ok_or_else(|| anyhow!("chunked body cut short"))?;
    }
}

#[cfg(test)]
mod tests {
    use super::parse_response;

    #[test]
    fn a_response_is_framed_by_its_length_its_chunks_or_its_end() {
        let sized =
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX: y\r\n\r\nhello, and more").unwrap();
        assert_eq!((sized.status, sized.body.as_slice()), (200, &b"hello"[..]));
        let chunked = parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4;ext=1\r\n[{\"a\r\nA\r\n\":1},{}]\r\n\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(String::from_utf8(chunked.body).unwrap(), "[{\"a\":1},{}]\r\n");
        let to_end =
            parse_response(b"HTTP/1.0 404 Not Found\r\nServer: x\r\n\r\n{\"message\":\"No such\"}").unwrap();
        assert_eq!((to_end.status, to_end.body.as_slice()), (404, &b"{\"message\":\"No such\"}"[..]));
    }

    #[test]
    fn a_broken_response_is_an_error_that_says_what_broke() {
        let err = |raw: &[u8]| format!("{:#}", parse_response(raw).unwrap_err());
        assert!(err(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n").contains("no end of headers"));
        assert!(err(b"SSH-2.0-OpenSSH\r\n\r\n").contains("not an HTTP/1.x status line"));
        assert!(err(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort").contains("5 of 9 bytes"));
        assert!(err(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nshort\r\n")
            .contains("cut short"));
        assert!(err(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n").contains("chunk size"));
    }
}
