//! Docker Engine + Compose in the guest: detected, installed when missing (by `[provision] docker_install`), and
//! waited for until `docker info` answers. Docker always runs through `sudo -n`, so group membership and a reconnect
//! are never needed.

use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::compose::{parse_probe, ComposeKind, DockerProbe, PROBE_SCRIPT};
use crate::config::DockerInstall;
use crate::ssh::Session;
use crate::ui::Phase;

const INSTALL_SCRIPT: &str = include_str!("../../assets/docker/install-docker.sh");
const INSTALL_PATH: &str = "/tmp/provisioner-install-docker.sh";

/// Docker as found (or made) ready.
#[derive(Debug, Clone)]
pub struct DockerReady {
    pub compose: ComposeKind,
    /// Engine version from `docker info`.
    pub server_version: String,
    /// Whether this run installed anything.
    pub installed: bool,
}

fn probe(ssh: &Session) -> Result<DockerProbe> {
    Ok(parse_probe(&ssh.exec(PROBE_SCRIPT, Duration::from_secs(60))?.output))
}

/// Make sure Docker and Compose are installed and the daemon answers. A second run installs nothing.
pub fn ensure(ssh: &Session, how: DockerInstall, phase: &Phase) -> Result<DockerReady> {
    let mut found = probe(ssh).context("detect Docker in the guest")?;
    let mut installed = false;
    if found.docker.is_none() || found.compose.is_none() {
        let mode = match how {
            DockerInstall::Distro => "distro",
            DockerInstall::GetDocker => "get-docker",
        };
        phase.message(&format!("installing Docker ({mode}); under TCG this takes minutes"));
        install(ssh, mode, phase)?;
        installed = true;
        found = probe(ssh)?;
    }
    let Some(compose) = found.compose else {
        bail!(
            "Docker Compose is still missing in the guest after installing\nhint: install `docker-compose` (Debian) or \
             the compose plugin in the box, or set [provision] docker_install = \"get-docker\""
        );
    };
    // The probe already asked the daemon; a fresh install still waits for it to come up.
    if let Some(server_version) = found.server_version.filter(|_| !installed) {
        return Ok(DockerReady { compose, server_version, installed });
    }
    phase.message("waiting for the Docker daemon");
    let server_version = crate::process::wait_until(Duration::from_secs(180), "`docker info` in the guest", || {
        let out = ssh.exec("sudo -n docker info --format '{{.ServerVersion}}'", Duration::from_secs(30))?;
        Ok((out.status == 0 && !out.output.trim().is_empty()).then(|| out.output.trim().to_string()))
    })
    .context(
        "the Docker daemon in the guest does not answer\nhint: look at `provisioner ssh -c 'sudo journalctl -u docker \
         --no-pager | tail -50'`; on Debian without recommends `apparmor` must be installed",
    )?;
    Ok(DockerReady { compose, server_version, installed })
}

fn install(ssh: &Session, mode: &str, phase: &Phase) -> Result<()> {
    let put = ssh.exec_with_stdin(
        &format!("cat > {INSTALL_PATH}"),
        &mut INSTALL_SCRIPT.as_bytes(),
        Duration::from_secs(30),
    )?;
    anyhow::ensure!(put.status == 0, "cannot write {INSTALL_PATH} in the guest: {}", put.output);
    let out = ssh.exec_stream(
        &format!("sudo -n sh {INSTALL_PATH} {mode}"),
        Duration::from_secs(40 * 60),
        &mut |line| phase.message(line),
    )?;
    if out.status != 0 {
        bail!(
            "installing Docker in the guest failed (exit {}):\n{}\nhint: the guest needs its package mirror (or \
             get.docker.com) reachable through the VM's user-mode network; pre-bake Docker into the box instead: \
             [box.debian] packages = [\"docker.io\", \"docker-compose\", \"apparmor\"]",
            out.status,
            crate::process::tail(&out.output, 25)
        );
    }
    Ok(())
}
