//! `[box] keys = "insecure-once"` (issue 20), an explicit opt-in and never a fallback: a box that follows
//! Vagrant's box contract boots with its disk untouched, and provisioner logs in ONCE as the box user with
//! Vagrant's published insecure private key, over loopback only, accepting the box's host key for that one session
//! (never pinned, never written to known_hosts). In that same session, as root: the machine's key becomes the only
//! key of `authorized_keys` (every insecure key gone; a file without a final newline, hashicorp/vagrant#8362, is
//! read like any other), the guest gets the ed25519 host key provisioner made, the box's shared host keys are
//! deleted, and sshd is reloaded. Then the session is closed and provisioner reconnects with the machine key and
//! the new host key pinned. Any failure powers the machine off and says what state its keys are in.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};

use super::Machine;
use crate::boxes::inject::VAGRANT_INSECURE_KEYS;
use crate::config::Config;
use crate::keys::KeyPair;
use crate::machine::state::MachineState;
use crate::provider::{vm_ref, Provider};
use crate::ssh::{Endpoint, Session};
use crate::ui::Ui;

/// Vagrant's published insecure RSA private key: hashicorp/vagrant `keys/vagrant`
/// (<https://github.com/hashicorp/vagrant/tree/main/keys>); public, everybody has it.
pub const VAGRANT_INSECURE_RSA_PRIVATE: &str = "-----BEGIN RSA PRIVATE KEY-----
MIIEogIBAAKCAQEA6NF8iallvQVp22WDkTkyrtvp9eWW6A8YVr+kz4TjGYe7gHzI
w+niNltGEFHzD8+v1I2YJ6oXevct1YeS0o9HZyN1Q9qgCgzUFtdOKLv6IedplqoP
kcmF0aYet2PkEDo3MlTBckFXPITAMzF8dJSIFo9D8HfdOV0IAdx4O7PtixWKn5y2
hMNG0zQPyUecp4pzC6kivAIhyfHilFR61RGL+GPXQ2MWZWFYbAGjyiYJnAmCP3NO
Td0jMZEnDkbUvxhMmBYSdETk1rRgm+R4LOzFUGaHqHDLKLX+FIPKcF96hrucXzcW
yLbIbEgE98OHlnVYCzRdK8jlqm8tehUc9c9WhQIBIwKCAQEA4iqWPJXtzZA68mKd
ELs4jJsdyky+ewdZeNds5tjcnHU5zUYE25K+ffJED9qUWICcLZDc81TGWjHyAqD1
Bw7XpgUwFgeUJwUlzQurAv+/ySnxiwuaGJfhFM1CaQHzfXphgVml+fZUvnJUTvzf
TK2Lg6EdbUE9TarUlBf/xPfuEhMSlIE5keb/Zz3/LUlRg8yDqz5w+QWVJ4utnKnK
iqwZN0mwpwU7YSyJhlT4YV1F3n4YjLswM5wJs2oqm0jssQu/BT0tyEXNDYBLEF4A
sClaWuSJ2kjq7KhrrYXzagqhnSei9ODYFShJu8UWVec3Ihb5ZXlzO6vdNQ1J9Xsf
4m+2ywKBgQD6qFxx/Rv9CNN96l/4rb14HKirC2o/orApiHmHDsURs5rUKDx0f9iP
cXN7S1uePXuJRK/5hsubaOCx3Owd2u9gD6Oq0CsMkE4CUSiJcYrMANtx54cGH7Rk
EjFZxK8xAv1ldELEyxrFqkbE4BKd8QOt414qjvTGyAK+OLD3M2QdCQKBgQDtx8pN
CAxR7yhHbIWT1AH66+XWN8bXq7l3RO/ukeaci98JfkbkxURZhtxV/HHuvUhnPLdX
3TwygPBYZFNo4pzVEhzWoTtnEtrFueKxyc3+LjZpuo+mBlQ6ORtfgkr9gBVphXZG
YEzkCD3lVdl8L4cw9BVpKrJCs1c5taGjDgdInQKBgHm/fVvv96bJxc9x1tffXAcj
3OVdUN0UgXNCSaf/3A/phbeBQe9xS+3mpc4r6qvx+iy69mNBeNZ0xOitIjpjBo2+
dBEjSBwLk5q5tJqHmy/jKMJL4n9ROlx93XS+njxgibTvU6Fp9w+NOFD/HvxB3Tcz
6+jJF85D5BNAG3DBMKBjAoGBAOAxZvgsKN+JuENXsST7F89Tck2iTcQIT8g5rwWC
P9Vt74yboe2kDT531w8+egz7nAmRBKNM751U/95P9t88EDacDI/Z2OwnuFQHCPDF
llYOUI+SpLJ6/vURRbHSnnn8a/XG+nzedGH5JGqEJNQsz+xT2axM0/W/CRknmGaJ
kda/AoGANWrLCz708y7VYgAtW2Uf1DPOIYMdvo6fxIB5i9ZfISgcJ/bbCUkFrhoH
+vq/5CIWxCPp0f85R4qxxQ5ihxJ0YDQT9Jpx4TMss4PSavPaBH3RXow5Ohe+bYoQ
NE5OgEXk2wVfZczCZpigBKbKZHNYcelXtTt/nP3rsCuGcM4h53s=
-----END RSA PRIVATE KEY-----
";

/// Vagrant's published insecure ed25519 private key (Vagrant 2.3+): hashicorp/vagrant `keys/vagrant.key.ed25519`.
pub const VAGRANT_INSECURE_ED25519_PRIVATE: &str = "-----BEGIN OPENSSH PRIVATE KEY-----
b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW
QyNTUxOQAAACDdWHcQaTZc8Q6nycsP0CqMNRfsLxvYVxqKosrHyTp+WAAAAJj2TBMT9kwT
EwAAAAtzc2gtZWQyNTUxOQAAACDdWHcQaTZc8Q6nycsP0CqMNRfsLxvYVxqKosrHyTp+WA
AAAEAveRHRHSCjIxbNKHDRzezD0U3R3UEEmS7R33fzvPQAD91YdxBpNlzxDqfJyw/QKow1
F+wvG9hXGoqiysfJOn5YAAAAEHNwb3hAdmFncmFudC1kZXYBAgMEBQ==
-----END OPENSSH PRIVATE KEY-----
";

/// The keys offered in the one login, ed25519 first (a box of Vagrant 2.3+ has both; older ones only RSA).
pub const INSECURE_KEYS: [(&str, &str); 2] = [
    ("Vagrant's insecure ed25519 key", VAGRANT_INSECURE_ED25519_PRIVATE),
    ("Vagrant's insecure RSA key", VAGRANT_INSECURE_RSA_PRIVATE),
];

/// Before anything is created: the one login with a published key happens only where nothing but this host's
/// loopback can reach the guest's sshd. Refused: a remote libvirt host, an SSH forward (or any forward to guest
/// port 22) on an address that is not loopback, and a machine of a `[[machine]]` file (its private network
/// reaches the guest's sshd from the other machines).
pub fn check_allowed(cfg: &Config) -> Result<()> {
    const CHOICES: &str =
        "or use keys = \"disk\" (the key is written into the disk before the first boot; ext2/3/4 \
                           roots) or a box that runs cloud-init";
    if crate::host::Host::from_uri(&cfg.libvirt.uri).is_remote() {
        bail!(
            "[box] keys = \"insecure-once\" is refused on a remote libvirt host ({}): the one login with Vagrant's \
             published insecure key happens over 127.0.0.1 only, and the guest's SSH port would be on that \
             host\nhint: run this machine on the local host (qemu:///session or qemu:///system), {CHOICES}",
            crate::text::shown(&cfg.libvirt.uri)
        );
    }
    for f in cfg.all_forwards().iter().filter(|f| f.guest == 22) {
        let loopback = f.host_ip.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
        if !loopback {
            bail!(
                "[box] keys = \"insecure-once\" is refused with the guest's SSH port forwarded on {}: until its key \
                 is replaced, anyone who reaches that address could log in with Vagrant's published insecure \
                 key\nhint: set [ssh] host_ip = \"127.0.0.1\" (and no forward of guest port 22 elsewhere), {CHOICES}",
                crate::text::shown(&f.host_ip)
            );
        }
    }
    if let Some(member) = &cfg.member {
        bail!(
            "[box] keys = \"insecure-once\" is refused for a machine of a [[machine]] file: its private network \
             \"{}\" would reach the guest's sshd from the other machines before its insecure key is \
             replaced\nhint: use keys = \"disk\" (the key is written into the disk before the first boot; ext2/3/4 \
             roots) or a box that runs cloud-init",
            member.network.name
        );
    }
    Ok(())
}

/// The script the one session runs as root (`sudo -n sh -s`... with the host private key on stdin): the machine's
/// key as the only line of `user`'s authorized_keys, the host key, sshd reloaded. Progress markers (`@keys N M`,
/// `@hostkey`, `@reloaded`) tell a failure's caller how far it got.
pub fn swap_script(user: &str, user_key: &str, host_pub: &str) -> String {
    let q = |s: &str| format!("'{}'", s.replace('\'', "'\\''"));
    let blobs: Vec<&str> = VAGRANT_INSECURE_KEYS.iter().filter_map(|k| k.split_whitespace().nth(1)).collect();
    format!(
        r#"set -e
umask 077
cat > /etc/ssh/ssh_host_ed25519_key.provisioner
u={user}
home=$(getent passwd "$u" | cut -d: -f6)
[ -n "$home" ] || {{ echo "no home directory for $u in /etc/passwd" >&2; exit 3; }}
g=$(id -g "$u")
ak="$home/.ssh/authorized_keys"
insecure=0; others=0
if [ -f "$ak" ]; then
  while IFS= read -r line || [ -n "$line" ]; do
    case "$line" in ''|'#'*) continue ;; *{b0}*|*{b1}*) insecure=$((insecure+1)) ;; *) others=$((others+1)) ;; esac
  done < "$ak"
fi
install -d -m 700 -o "$u" -g "$g" "$home/.ssh"
printf '%s\n' {key} > "$ak.provisioner"
chown "$u:$g" "$ak.provisioner"
chmod 600 "$ak.provisioner"
mv -f "$ak.provisioner" "$ak"
if grep -qF -e {b0} -e {b1} "$ak"; then echo "an insecure key is still in $ak" >&2; exit 4; fi
echo "@keys $insecure $others"
rm -f /etc/ssh/ssh_host_rsa_key /etc/ssh/ssh_host_rsa_key.pub /etc/ssh/ssh_host_ecdsa_key /etc/ssh/ssh_host_ecdsa_key.pub /etc/ssh/ssh_host_dsa_key /etc/ssh/ssh_host_dsa_key.pub
chown root:root /etc/ssh/ssh_host_ed25519_key.provisioner
chmod 600 /etc/ssh/ssh_host_ed25519_key.provisioner
mv -f /etc/ssh/ssh_host_ed25519_key.provisioner /etc/ssh/ssh_host_ed25519_key
printf '%s\n' {host} > /etc/ssh/ssh_host_ed25519_key.pub
chmod 644 /etc/ssh/ssh_host_ed25519_key.pub
echo "@hostkey"
sshd=$(command -v sshd || echo /usr/sbin/sshd)
"$sshd" -t
if command -v systemctl >/dev/null && systemctl is-active -q ssh.service; then systemctl reload ssh.service
elif command -v systemctl >/dev/null && systemctl is-active -q sshd.service; then systemctl reload sshd.service
elif command -v systemctl >/dev/null && systemctl is-active -q ssh.socket; then :
elif [ -s /run/sshd.pid ]; then kill -HUP "$(cat /run/sshd.pid)"
elif [ -s /var/run/sshd.pid ]; then kill -HUP "$(cat /var/run/sshd.pid)"
else echo "found no running sshd to reload" >&2; exit 5
fi
echo "@reloaded"
"#,
        user = q(user),
        key = q(user_key.trim()),
        host = q(host_pub.trim()),
        b0 = blobs[0],
        b1 = blobs[1],
    )
}

/// What the script's markers say was done when it stopped.
#[derive(Debug, PartialEq, Eq)]
struct Progress {
    /// (insecure keys removed, other keys dropped), once authorized_keys was replaced.
    keys: Option<(u32, u32)>,
    host_key: bool,
    reloaded: bool,
}

fn progress(output: &str) -> Progress {
    let mut p = Progress { keys: None, host_key: false, reloaded: false };
    for line in output.lines() {
        let mut w = line.split_whitespace();
        match w.next() {
            Some("@keys") => {
                let mut n = || w.next().and_then(|s| s.parse().ok()).unwrap_or(0);
                p.keys = Some((n(), n()));
            }
            Some("@hostkey") => p.host_key = true,
            Some("@reloaded") => p.reloaded = true,
            _ => {}
        }
    }
    p
}

/// A machine of `keys = "insecure-once"` whose first login has not happened (`first_login_pending`): log in once
/// with Vagrant's insecure key, replace the keys, reconnect pinned. Records the user and clears the flag in
/// `recorded` (and state.json); returns the pinned session. A guest that already presents the pinned host key had
/// its keys replaced by an earlier run (stopped before it recorded so): nothing insecure is offered to it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn first_login(
    ui: &Ui,
    m: &Machine,
    p: &dyn Provider,
    recorded: &mut Option<MachineState>,
    addr: SocketAddr,
    timeout: Duration,
    user_key: &KeyPair,
    host_key: &KeyPair,
) -> Result<Session> {
    let ph = ui.phase("keys");
    let started = Instant::now();
    let vm = vm_ref(recorded.as_ref(), &m.vm_name);
    let powered_off = |what: String| power_off(p, &vm, what);
    // Checked again here (the config may have changed since the machine was made, and a running machine was not
    // booted by this run).
    check_allowed(&m.cfg).map_err(|e| powered_off(format!("{e:#}")))?;
    let mut users = vec![m.cfg.ssh.user.clone()];
    if m.cfg.ssh.user != "vagrant" {
        users.push("vagrant".into());
    }
    let login =
        Session::connect_first_login(addr, &users, &INSECURE_KEYS, &host_key.public_openssh, timeout)
            .map_err(|e| {
                let (text, place) = p.serial_console(&m.vm_name, &m.state);
                let e = e.context(super::serial_tail(&text, &place));
                powered_off(format!(
                    "{e:#}\nthe first login with Vagrant's insecure key did not happen: the machine's disk still \
                     holds the box's keys as shipped"
                ))
            })?;
    let swap_started = Instant::now();
    let Some(login) = login else {
        // The pinned host key already answers: the keys were replaced by an earlier `up`.
        let session = reconnect(m, recorded, addr, host_key, timeout)?;
        ph.done("insecure-once: the keys were replaced by an earlier run; the pinned host key answers");
        return Ok(session);
    };
    // Recorded before the swap: a run stopped after it (the guest then presents the pinned host key) still logs
    // in as the right user.
    let st = recorded.get_or_insert_with(MachineState::default);
    st.ssh_user = (login.user != m.cfg.ssh.user).then(|| login.user.clone());
    st.save(&m.state).map_err(|e| powered_off(format!("{e:#}\nnothing was changed in the guest yet")))?;
    let script = swap_script(&login.user, &user_key.public_openssh, &host_key.public_openssh);
    let cmd = format!("sudo -n sh -c {}", crate::ssh::shell_quote(&script));
    let out = login.session.exec_with_stdin(
        &cmd,
        &mut host_key.private_openssh.as_bytes(),
        Duration::from_secs(120),
    );
    let (status, output) = match out {
        Ok(o) => (Some(o.status), o.output),
        Err(e) => (None, format!("{e:#}")),
    };
    let done = progress(&output);
    drop(login.session);
    if status != Some(0) || !done.reloaded {
        let state = match done.keys {
            None => "Vagrant's insecure key is still in authorized_keys (nothing was changed)",
            Some(_) if !done.host_key => {
                "the insecure keys were removed from authorized_keys, the host key was not set"
            }
            Some(_) => "the insecure keys were removed and the host key written, but sshd was not reloaded",
        };
        return Err(powered_off(format!(
            "replacing the box's keys over the one insecure login as {} failed ({}):\n{}\n{state}",
            login.user,
            status.map_or("no exit status".to_string(), |s| format!("exit {s}")),
            crate::process::tail(&output, 20)
        )));
    }
    let (insecure, others) = done.keys.unwrap_or_default();
    let session = reconnect(m, recorded, addr, host_key, Duration::from_secs(60)).map_err(|e| {
        powered_off(format!(
            "{e:#}\nthe box's keys were replaced (Vagrant's insecure key removed, host key set, sshd reloaded) but \
             the machine key with the pinned host key did not log in"
        ))
    })?;
    let removed = match insecure {
        0 => "no insecure key was there".to_string(),
        1 => "insecure key removed".to_string(),
        n => format!("{n} insecure keys removed"),
    };
    let others = match others {
        0 => String::new(),
        n => format!(", {n} other key(s) dropped"),
    };
    ph.done(&format!(
        "insecure-once ([box] keys): one login as {user} with {key} on {addr} (box host key {fp} accepted for that \
         session only); machine key written for {user}, {removed}{others}, host key set, sshd reloaded, \
         reconnected pinned ({secs:.1} s; first login after {boot:.0} s)",
        user = login.user,
        key = login.key,
        fp = login.host_fingerprint,
        secs = swap_started.elapsed().as_secs_f64(),
        boot = (swap_started - started).as_secs_f64(),
    ));
    Ok(session)
}

/// Power the machine off after a failed first login (so it does not stay up in a state nobody checked) and say
/// what happened and what to do.
fn power_off(p: &dyn Provider, vm: &str, what: String) -> anyhow::Error {
    let off = match p.halt(vm, Duration::from_secs(60), true) {
        Ok(()) => "the machine was powered off".to_string(),
        Err(e) => format!("powering the machine off failed too ({e:#}); `provisioner halt -f` does it"),
    };
    anyhow!(
        "{what}; {off}\nhint: `provisioner up` tries the first login again, `provisioner destroy -f` removes the \
         machine; or use keys = \"disk\" or a box that runs cloud-init"
    )
}

/// Connect with the machine key and the pinned host key; on success the first login is recorded as done.
fn reconnect(
    m: &Machine,
    recorded: &mut Option<MachineState>,
    addr: SocketAddr,
    host_key: &KeyPair,
    timeout: Duration,
) -> Result<Session> {
    let ep = Endpoint::from_state(&m.cfg, &m.state, recorded.as_ref(), &host_key.public_openssh)?;
    debug_assert_eq!(ep.addr, addr);
    let session = Session::connect(&ep, timeout)?;
    let st = recorded.get_or_insert_with(MachineState::default);
    st.first_login_pending = false;
    st.save(&m.state)?;
    Ok(session)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_markers_say_how_far_the_swap_got() {
        assert_eq!(progress(""), Progress { keys: None, host_key: false, reloaded: false });
        assert_eq!(
            progress("@keys 2 1\nsome warning\n@hostkey\n"),
            Progress { keys: Some((2, 1)), host_key: true, reloaded: false }
        );
        assert!(progress("@keys 0 0\n@hostkey\n@reloaded\n").reloaded);
    }

    fn cfg(extra: &str, uri: &str) -> Config {
        let text = format!(
            "[machine]\nname = \"t\"\n\n[box]\nimage = \"b.qcow2\"\nkeys = \"insecure-once\"\n\n{extra}\n[libvirt]\n\
             uri = \"{uri}\"\n"
        );
        Config::from_bytes(std::path::Path::new("/p/box-config.toml"), text.as_bytes()).unwrap()
    }

    fn refusal(c: &Config) -> String {
        format!("{:#}", check_allowed(c).unwrap_err())
    }

    #[test]
    fn insecure_once_is_allowed_only_where_loopback_alone_reaches_the_guest_sshd() {
        check_allowed(&cfg("", "qemu:///session")).unwrap();
        check_allowed(&cfg("[ssh]\nhost_ip = \"127.0.0.2\"\n", "qemu:///system")).unwrap();
        check_allowed(&cfg(
            "[[forward]]\nguest = 80\nhost = 8080\nhost_ip = \"0.0.0.0\"\n",
            "qemu:///session",
        ))
        .unwrap();

        let e = refusal(&cfg("[ssh]\nhost_ip = \"0.0.0.0\"\n", "qemu:///session"));
        assert!(e.contains("forwarded on 0.0.0.0") && e.contains("Vagrant's published insecure key"), "{e}");
        assert!(e.contains("hint: set [ssh] host_ip = \"127.0.0.1\""), "{e}");
        let e = refusal(&cfg(
            "[[forward]]\nguest = 22\nhost = 2200\nhost_ip = \"192.168.1.5\"\n",
            "qemu:///session",
        ));
        assert!(e.contains("forwarded on 192.168.1.5"), "{e}");
        let e = refusal(&cfg("", "qemu+ssh://root@10.0.0.2/system"));
        assert!(
            e.contains("refused on a remote libvirt host")
                && e.contains("hint: run this machine on the local"),
            "{e}"
        );
    }

    /// Each private key is the pair of a published public key (ssh-keygen -y derives the public half).
    #[test]
    #[cfg_attr(windows, ignore = "ssh-keygen is not on the Windows tier's PATH")]
    fn the_private_keys_are_the_published_pairs_of_the_public_keys() {
        let dir = tempfile::tempdir().unwrap();
        for (i, (name, pem)) in INSECURE_KEYS.iter().enumerate() {
            let f = dir.path().join(format!("k{i}"));
            std::fs::write(&f, pem).unwrap();
            crate::platform::set_mode(&f, 0o600).unwrap();
            let out = std::process::Command::new("ssh-keygen").arg("-y").arg("-f").arg(&f).output().unwrap();
            assert!(out.status.success(), "{name}: {out:?}");
            let public = String::from_utf8(out.stdout).unwrap();
            let blob = public.split_whitespace().nth(1).unwrap();
            assert!(
                VAGRANT_INSECURE_KEYS.iter().any(|p| p.split_whitespace().nth(1) == Some(blob)),
                "{name}"
            );
        }
    }
}
