//! The libvirt connection URI: only what a user of this tool needs, and nothing that makes libvirt run a program.
//!
//! libvirt's URI is `driver[+transport]://[user@][host][:port]/path[?param=value&...]` (libvirt docs: uri.rst,
//! "Remote URIs" and "Extra parameters"). Accepted: the `qemu` driver, paths `/session` and `/system`, the
//! transports local (none), `unix`, `ssh`, `libssh`, `tls` and `tcp`, and the parameters `keyfile`, `no_tty`,
//! `pkipath`, `known_hosts`, `known_hosts_verify=normal`, `sshauth`, `tls_priority`, `mode` and `proxy`
//! (auto|netcat|native: a choice among libvirt's own helpers). Refused, each with its reason:
//! - the `ext` transport and `command=` (a local program libvirt executes: the ext command, or the ssh binary);
//! - `netcat=` (the program libvirt runs on the remote host) and `socket=` (a socket path of the URI's choosing);
//! - `no_verify` and `known_hosts_verify=auto|ignore` (host key / certificate checks off);
//! - `name=` (a second URI handed to the remote daemon, checked by nobody);
//! - `libssh2` (removed upstream; use `libssh`), any other driver, transport or parameter.
//!
//! Parameter names and values are percent-decoded and names compared case-insensitively before the check, as
//! libvirt does, so `%63ommand=` or `COMMAND=` are refused as `command`.
//! [`check_libvirt_uri`] is pure and used wherever a URI comes from: box-config.toml (validation, with line and
//! column), `.provisioner/state.json`, and the libvirt provider's constructor.

use std::fmt;

/// Why a URI was refused, and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UriProblem {
    pub message: String,
    pub hint: String,
}

impl fmt::Display for UriProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}\nhint: {}", self.message, self.hint)
    }
}

const TRANSPORTS: &str = "none (local), unix, ssh, libssh, tls, tcp";
const PARAMS: &str =
    "keyfile, no_tty, pkipath, known_hosts, known_hosts_verify=normal, sshauth, tls_priority, \
                      mode, proxy";
const EXAMPLES: &str =
    "use qemu:///session (no root), qemu:///system, or qemu+ssh://user@host/system for a remote \
                        host (your OpenSSH client with its known_hosts)";

fn problem(message: impl Into<String>, hint: impl Into<String>) -> Result<(), UriProblem> {
    Err(UriProblem { message: message.into(), hint: hint.into() })
}

/// Whether `uri` names libvirt's system instance (`qemu:///system`, `qemu+ssh://HOST/system`): the one that may
/// make host-side networks such as an isolated private network (a session instance cannot).
pub fn is_system_instance(uri: &str) -> bool {
    uri.ends_with("/system")
}

/// Check a libvirt URI against the rules in the module docs.
pub fn check_libvirt_uri(uri: &str) -> Result<(), UriProblem> {
    if uri.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return problem("contains a space or a control character", EXAMPLES);
    }
    let Some((scheme, rest)) = uri.split_once("://") else {
        return problem("is not a libvirt URI (driver[+transport]://[user@][host][:port]/path)", EXAMPLES);
    };
    let scheme = scheme.to_ascii_lowercase();
    let (driver, transport) = scheme.split_once('+').unwrap_or((&scheme, ""));
    if driver != "qemu" {
        return problem(
            format!(
                "uses the libvirt driver `{}`; provisioner drives QEMU domains only",
                crate::text::shown(driver)
            ),
            EXAMPLES,
        );
    }
    match transport {
        "" | "unix" | "ssh" | "libssh" | "tls" | "tcp" => {}
        "ext" => return problem(
            "uses the `ext` transport, which makes libvirt run the program named in `command=`; provisioner \
                 never runs a program named in its configuration",
            EXAMPLES,
        ),
        "libssh2" => {
            return problem(
                "uses the `libssh2` transport, which libvirt removed",
                "use qemu+libssh:// or qemu+ssh://",
            )
        }
        other => {
            return problem(
                format!("uses the unknown transport `{}`; accepted: {TRANSPORTS}", crate::text::shown(other)),
                EXAMPLES,
            )
        }
    }
    if rest.contains('#') {
        return problem("has a fragment (`#...`), which libvirt URIs do not use", EXAMPLES);
    }
    let (before_query, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (authority, path) = match before_query.find('/') {
        Some(i) => before_query.split_at(i),
        None => return problem("has no path; end it with /session or /system", EXAMPLES),
    };
    if path != "/session" && path != "/system" {
        return problem(
            format!(
                "has the path `{}`; the QEMU driver's paths are /session and /system",
                crate::text::shown(path)
            ),
            EXAMPLES,
        );
    }
    check_authority(authority, transport)?;
    for pair in query.split(['&', ';']).filter(|p| !p.is_empty()) {
        let (raw_name, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
        let (Some(name), Some(value)) =
            (crate::text::percent_decode(raw_name), crate::text::percent_decode(raw_value))
        else {
            return problem(format!("has a malformed %-escape in `{}`", crate::text::shown(pair)), EXAMPLES);
        };
        check_param(&name.to_ascii_lowercase(), &value)?;
    }
    Ok(())
}

fn check_authority(authority: &str, transport: &str) -> Result<(), UriProblem> {
    let (user, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let word_ok = |s: &str, extra: &str| {
        !s.is_empty()
            && !s.starts_with('-')
            && s.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c) || extra.contains(c))
    };
    if let Some(u) = user {
        if !word_ok(u, "") {
            return problem(
                format!(
                    "has the user name `{}`; use letters, digits, '.', '_' and '-' (not first)",
                    crate::text::shown(u)
                ),
                EXAMPLES,
            );
        }
    }
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        match v6.split_once(']') {
            Some((h, p)) if h.parse::<std::net::Ipv6Addr>().is_ok() => (h, p.strip_prefix(':')),
            _ => return problem("has a malformed [IPv6] host", EXAMPLES),
        }
    } else {
        match hostport.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    };
    if !host.is_empty() && !hostport.starts_with('[') && !word_ok(host, "") {
        return problem(
            format!("has the host `{}`; use a host name or an IP address", crate::text::shown(host)),
            EXAMPLES,
        );
    }
    if let Some(p) = port {
        if p.parse::<u16>().map_or(true, |p| p == 0) {
            return problem(format!("has the port `{}`; use 1-65535", crate::text::shown(p)), EXAMPLES);
        }
    }
    if host.is_empty() && matches!(transport, "ssh" | "libssh" | "tls" | "tcp") {
        return problem(format!("uses the `{transport}` transport without a host"), EXAMPLES);
    }
    Ok(())
}

fn check_param(name: &str, value: &str) -> Result<(), UriProblem> {
    let refused = |why: &str| {
        problem(
            format!("has the parameter `{name}`, {why}"),
            format!("remove `{name}=...` from the URI; accepted parameters: {PARAMS}"),
        )
    };
    match name {
        "command" => refused("which names a program for libvirt to run; provisioner never runs a program named in its configuration"),
        "netcat" => refused("which names a program for libvirt to run on the remote host"),
        "socket" => refused("which points libvirt at a socket of the URI's choosing; the daemon's own socket is used"),
        "no_verify" => refused("which turns off the check of the remote host's key or certificate"),
        "name" => refused("which hands a second, unchecked URI to the remote daemon"),
        "known_hosts_verify" if value != "normal" => {
            refused("with a value other than `normal`, which accepts unknown or changed host keys")
        }
        "proxy" if !matches!(value, "auto" | "netcat" | "native") => {
            problem(format!("has proxy={}; use auto, netcat or native", crate::text::shown(value)), EXAMPLES)
        }
        "mode" if !matches!(value, "auto" | "legacy" | "direct") => {
            problem(format!("has mode={}; use auto, legacy or direct", crate::text::shown(value)), EXAMPLES)
        }
        "keyfile" | "no_tty" | "pkipath" | "known_hosts" | "known_hosts_verify" | "sshauth" | "tls_priority"
        | "mode" | "proxy" => Ok(()),
        other => problem(
            format!("has the unknown parameter `{}`", crate::text::shown(other)),
            format!("accepted parameters: {PARAMS}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::check_libvirt_uri as check;

    #[test]
    fn accepts_what_users_need() {
        for ok in [
            "qemu:///session",
            "qemu:///system",
            "qemu+unix:///system?mode=direct",
            "qemu+ssh://root@10.201.0.2/system?keyfile=/home/u/.ssh/id&no_tty=1",
            "qemu+libssh://u@host.example:2200/system?known_hosts=/k&known_hosts_verify=normal&sshauth=privkey",
            "qemu+tls://host/system?pkipath=/etc/pki/x",
            "qemu+tcp://[::1]:16509/system",
            "QEMU+SSH://h/system?proxy=native",
        ] {
            assert_eq!(check(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn refuses_programs_sockets_and_unchecked_hosts() {
        for (bad, says) in [
            ("qemu+ext:///session?command=/tmp/x", "`ext` transport"),
            ("qemu+ssh://h/system?command=/tmp/x", "parameter `command`"),
            ("qemu+ssh://h/system?%63ommand=/tmp/x", "parameter `command`"),
            ("qemu+ssh://h/system?keyfile=/k;COMMAND=/tmp/x", "parameter `command`"),
            ("qemu+ssh://h/system?netcat=/tmp/x", "parameter `netcat`"),
            ("qemu+unix:///system?socket=/tmp/s", "parameter `socket`"),
            ("qemu+tls://h/system?no_verify=1", "parameter `no_verify`"),
            ("qemu+libssh://h/system?known_hosts_verify=ignore", "parameter `known_hosts_verify`"),
            ("qemu+ssh://h/system?name=qemu%2Bext:///system", "parameter `name`"),
            ("qemu+ssh://h/system?foo=1", "unknown parameter `foo`"),
            ("qemu+ssh://-oProxyCommand=x/system", "host"),
            ("qemu+ssh:///system", "without a host"),
            ("qemu:///embed?root=/tmp", "path"),
            ("xen:///system", "driver `xen`"),
            ("qemu+libssh2://h/system", "libssh2"),
            ("qemu:///session\u{1b}", "control character"),
            ("session", "not a libvirt URI"),
            ("qemu+ssh://h/system?command=%zz", "malformed"),
        ] {
            let e = check(bad).expect_err(bad);
            assert!(e.message.contains(says), "{bad}: {e}");
        }
    }
}
