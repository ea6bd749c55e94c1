//! `ssh` and `ssh-config`: the system OpenSSH client, with the machine's key and its pinned host key.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use super::Ctx;
use crate::cli::{SshArgs, SshConfigArgs};
use crate::machine::StateDir;
use crate::platform::MuxFailure;
use crate::ssh::{control, shell_quote, Endpoint};

/// What the OpenSSH client needs: the endpoint plus the private known_hosts file that pins the host key.
struct Target {
    alias: String,
    ep: Endpoint,
    known_hosts: PathBuf,
    /// The OpenSSH control socket when connection reuse is on.
    control: Option<PathBuf>,
}

fn target(ctx: &Ctx) -> Result<Target> {
    let cfg = ctx.config()?;
    crate::lifecycle::refuse_foreign(&cfg)?;
    let state = ctx.state(&cfg);
    let ep = Endpoint::for_machine(&cfg, &state)?;
    // Re-pin from the host key and the recorded port, so the file always matches the current forward.
    crate::keys::write_known_hosts(&state, &ep.addr.ip().to_string(), ep.addr.port(), &ep.host_key)?;
    let dir = StateDir::at(ep.key.parent().context("key path has no directory")?);
    let control =
        if control::enabled_for(cfg.ssh.reuse_connection) { Some(control::socket_path(&dir)?) } else { None };
    Ok(Target { alias: cfg.machine.name.clone(), ep, known_hosts: dir.known_hosts(), control })
}

/// `-o` options shared by `ssh` and the `ssh-config` stanza, in OpenSSH config spelling (unquoted values).
fn options(t: &Target) -> Vec<(&'static str, String)> {
    let mut opts = vec![
        ("HostName", t.ep.addr.ip().to_string()),
        ("Port", t.ep.addr.port().to_string()),
        ("User", t.ep.user.clone()),
        ("IdentityFile", crate::platform::openssh_path(&t.ep.key)),
        ("IdentitiesOnly", "yes".into()),
        ("PreferredAuthentications", "publickey".into()),
        ("StrictHostKeyChecking", "yes".into()),
        ("UserKnownHostsFile", crate::platform::openssh_path(&t.known_hosts)),
        // Only the pinned key counts: no system-wide file may vouch for another key on this address.
        ("GlobalKnownHostsFile", crate::platform::NULL_FILE.into()),
        ("LogLevel", "ERROR".into()),
    ];
    // A machine on a remote libvirt host: its forward is on that host's loopback, reached through the host.
    opts.extend(t.ep.guest_addr().proxy_command().map(|proxy| ("ProxyCommand", proxy)));
    if let Some(socket) = &t.control {
        opts.extend(control::options(socket));
    }
    opts
}

pub(crate) fn ssh(ctx: &Ctx, args: &SshArgs) -> Result<i32> {
    let t = target(ctx)?;
    // Fail with a useful message rather than ssh's bare "Connection refused" when the machine is down. A live
    // master proves the machine answers, and spares the guest's sshd a connection per call.
    let via_master = t.control.as_deref().is_some_and(control::master_alive);
    if !via_master {
        if let Err(e) = t.ep.guest_addr().probe(std::time::Duration::from_secs(5)) {
            bail!(
                "machine `{}` is not reachable over SSH at {}: {e}\nhint: is it running? check `provisioner status`; \
                 `provisioner up` starts it",
                t.alias,
                t.ep.addr
            );
        }
    }
    let remote = match (&args.command, args.args.as_slice()) {
        (Some(c), _) => Some(c.clone()),
        (None, []) => None,
        // Each word after `--` stays one argument in the guest, as with `docker exec`.
        (None, words) => Some(words.iter().map(|w| shell_quote(w)).collect::<Vec<_>>().join(" ")),
    };
    // A command (no tty asked) through a live master: a session on its connection opened in-process, with our
    // stdin, stdout and stderr handed to the master, and no `ssh` process started. Where the master does not take
    // it (and so it did not run), `ssh` runs it below.
    if let (Some(socket), Some(command), true) = (t.control.as_deref(), remote.as_deref(), via_master) {
        let shown = crate::process::Shown::start(|| {
            format!("ssh (in-process, master {}) {command}", socket.display())
        });
        let cancelled = || crate::process::interrupted().is_some();
        match crate::platform::ssh_mux_exec_attached(socket, command, &cancelled) {
            Ok(code) => return Ok(code.unwrap_or(255)),
            Err(MuxFailure::Unavailable(why)) => {
                shown.cancel();
                crate::process::show_ssh_instead(socket, &why);
            }
            // Ctrl-C: the control connection is closed, so the master closes the session, as when OpenSSH's
            // client is stopped; the run ends as any interrupted one (reported, 128 + the signal).
            Err(MuxFailure::Interrupted | MuxFailure::TimedOut) => {
                return Ok(crate::process::interrupted().map_or(130, |i| i.exit_code()));
            }
        }
    }
    let ssh = which::which("ssh").map_err(|_| {
        anyhow::anyhow!(
            "the OpenSSH client `ssh` is not on PATH\nhint: {}",
            crate::platform::OPENSSH_CLIENT_HINT
        )
    })?;
    let mut cmd = std::process::Command::new(&ssh);
    for (k, v) in options(&t) {
        // `-o` is parsed like a config file line: same quoting and `%` escaping.
        cmd.arg("-o").arg(format!("{k}={}", config_value(k, &v)?));
    }
    cmd.arg(t.ep.addr.ip().to_string());
    if let Some(r) = remote {
        cmd.arg("--").arg(r);
    }
    if crate::process::verbosity() >= 1 {
        eprintln!("+ {cmd:?}");
    }
    // Replace this process: the terminal, signals and the exit status belong to ssh from here on (Windows has no
    // exec: ssh.exe runs on our console and its exit code becomes ours).
    let err = crate::platform::exec(cmd);
    Err(err).with_context(|| format!("cannot run {}", ssh.display()))
}

pub(crate) fn ssh_config(ctx: &Ctx, args: &SshConfigArgs) -> Result<i32> {
    if let Some(alias) = &args.host {
        check_alias(alias)?;
    }
    let t = target(ctx)?;
    let alias = args.host.clone().unwrap_or_else(|| t.alias.clone());
    if ctx.global.json {
        let mut doc = serde_json::Map::new();
        doc.insert("Host".into(), alias.clone().into());
        for (k, v) in options(&t) {
            doc.insert(k.into(), v.into());
        }
        println!("{}", serde_json::Value::Object(doc));
        return Ok(0);
    }
    print!("{}", stanza(&alias, &options(&t))?);
    Ok(0)
}

/// A `Host` alias OpenSSH reads back as one plain name: not a pattern (`*`, `?`, `!`, `,`), a comment (`#`), a
/// `Host=x` form (`=`), a quoted or split word (quotes, whitespace), a token (`%`) nor an option (leading `-`).
fn check_alias(alias: &str) -> Result<()> {
    let ok = (1..=255).contains(&alias.len())
        && !alias.starts_with(['-', '.'])
        && alias.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if !ok {
        bail!(
            "--host \"{}\" is not a usable OpenSSH host alias\nhint: use 1-255 letters, digits, '-', '_' and '.', \
             starting with a letter or digit (e.g. --host lab)",
            crate::text::shown(alias)
        );
    }
    Ok(())
}

/// An OpenSSH `Host` stanza; values with spaces are double-quoted and `%` is escaped in path options.
fn stanza(alias: &str, opts: &[(&'static str, String)]) -> Result<String> {
    let mut out = format!("Host {alias}\n");
    for (k, v) in opts {
        out.push_str(&format!("  {k} {}\n", config_value(k, v)?));
    }
    Ok(out)
}

/// A value as OpenSSH config syntax wants it: double-quoted if it has whitespace, and `%` written `%%` in the
/// path options where OpenSSH expands `%` tokens.
fn config_value(key: &str, v: &str) -> Result<String> {
    if key == "ProxyCommand" {
        // The rest of the line is the command, run by `sh -c`: its words are quoted for the shell already.
        return Ok(v.to_string());
    }
    if v.contains('"') {
        bail!("{key} {v:?} contains a double quote, which OpenSSH config cannot express\nhint: move the project to a path without '\"'");
    }
    let v = if matches!(key, "IdentityFile" | "UserKnownHostsFile" | "ControlPath") {
        v.replace('%', "%%")
    } else {
        v.to_string()
    };
    Ok(if v.contains(char::is_whitespace) { format!("\"{v}\"") } else { v })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_command_goes_through_the_libvirt_host_with_its_key_checked() {
        let h = crate::host::remote::parse(
            "qemu+ssh://root@10.201.3.2:2200/system?keyfile=/k%20x&known_hosts=/kh",
        )
        .unwrap();
        let p = h.proxy_command();
        assert!(
            p.starts_with("ssh -o UserKnownHostsFile=/kh -o StrictHostKeyChecking=yes -o BatchMode=yes"),
            "{p}"
        );
        assert!(p.contains(" -i '/k x' -o IdentitiesOnly=yes -p 2200 -l root -W %h:%p 10.201.3.2"), "{p}");
        assert_eq!(config_value("ProxyCommand", &p).unwrap(), p, "the command is written as is");
    }

    #[test]
    fn stanza_quotes_spaces_and_escapes_percent() {
        let s = stanza(
            "lab",
            &[("IdentityFile", "/home/a b/50%/.provisioner/id_ed25519".into()), ("Port", "2222".into())],
        )
        .unwrap();
        assert_eq!(s, "Host lab\n  IdentityFile \"/home/a b/50%%/.provisioner/id_ed25519\"\n  Port 2222\n");
        assert!(stanza("lab", &[("IdentityFile", "/x\"y".into())]).is_err());
    }
}
