#!/bin/sh
# Install Docker Engine and Compose in the guest when missing; started and enabled. Idempotent.
# Usage (as root): install-docker.sh distro|get-docker
#   distro      the distribution's packages: docker.io, docker-compose (v1 on bookworm, v2 on trixie), apparmor
#   get-docker  the https://get.docker.com convenience script (Docker's own packages, Compose v2 plugin)
set -eu
mode=${1:-distro}
export DEBIAN_FRONTEND=noninteractive
if ! command -v docker >/dev/null 2>&1 || ! { docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null 2>&1; }; then
  case "$mode" in
    distro)
      command -v apt-get >/dev/null 2>&1 || { echo "no apt-get: the distro install supports Debian/Ubuntu guests; set docker_install = \"get-docker\"" >&2; exit 3; }
      apt-get update -q
      # apparmor: without it every container fails to start on Debian ("apparmor_parser: executable file not found").
      apt-get install -y -q --no-install-recommends docker.io docker-compose apparmor ca-certificates
      ;;
    get-docker)
      command -v curl >/dev/null 2>&1 || { apt-get update -q && apt-get install -y -q --no-install-recommends curl ca-certificates; }
      curl -fsSL https://get.docker.com -o /tmp/get-docker.sh
      sh /tmp/get-docker.sh
      ;;
    *) echo "unknown docker_install mode: $mode" >&2; exit 2 ;;
  esac
fi
# Start the daemon: systemd when it is PID 1, else the SysV script.
if [ -d /run/systemd/system ]; then
  systemctl enable --now docker.service >/dev/null 2>&1 || systemctl start docker.service
elif ! docker info >/dev/null 2>&1; then
  service docker start || true
fi
