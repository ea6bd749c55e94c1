# Docker and Compose as the guest has them, read by provisioner's parse_probe: each check's output framed by
# "@@begin LABEL" and "@@status CODE". POSIX sh; runs as the SSH user on every `up` and `provision`.

probe() {
  label=$1
  shift
  echo "@@begin $label"
  "$@" 2>&1
  echo "@@status $?"
}

# `docker-compose version` (v1) is a Python start: about 3 s under TCG, on every warm `up`. Its banner is kept
# in the user's cache, keyed by the binary's path, size and mtime, so an upgrade or reinstall runs it again.
compose_v1() {
  bin=$(command -v docker-compose) || { echo "docker-compose: not found"; return 127; }
  key="$bin $(stat -Lc %s-%Y "$bin" 2>/dev/null)"
  cache="${XDG_CACHE_HOME:-$HOME/.cache}/provisioner/compose-v1"
  if [ "$(head -n 1 "$cache" 2>/dev/null)" = "$key" ]; then
    tail -n +2 "$cache"
    return 0
  fi
  out=$(docker-compose version 2>&1)
  status=$?
  if [ "$status" -eq 0 ] && mkdir -p "${cache%/*}" 2>/dev/null; then
    printf '%s\n%s\n' "$key" "$out" >"$cache.tmp" && mv "$cache.tmp" "$cache"
  fi
  printf '%s\n' "$out"
  return "$status"
}

client_checks() {
  probe 'docker --version' docker --version
  probe 'sudo -n docker compose version' sudo -n docker compose version
  probe 'docker-compose version' compose_v1
}

# The client checks only change when a binary does, and each docker CLI start costs 0.3-0.6 s under TCG: their
# framed output is kept in the user's cache keyed by the paths, sizes and mtimes of docker, docker-compose and the
# compose plugin, so a warm `up` starts none of them (one `stat`; the rest are shell builtins).
bins=""
for b in docker docker-compose; do
  p=$(command -v "$b") && bins="$bins $p"
done
for p in /usr/local/lib/docker/cli-plugins /usr/local/libexec/docker/cli-plugins /usr/lib/docker/cli-plugins \
  /usr/libexec/docker/cli-plugins; do
  [ -e "$p/docker-compose" ] && bins="$bins $p/docker-compose"
done
key=""
[ -z "$bins" ] || key=$(stat -L --printf '%n:%s:%Y ' $bins 2>/dev/null) || key=""
client_cache="${XDG_CACHE_HOME:-$HOME/.cache}/provisioner/docker-client"
hit=""
if [ -n "$key" ] && [ -r "$client_cache" ]; then
  {
    IFS= read -r first
    if [ "$first" = "$key" ]; then
      hit=1
      while IFS= read -r line; do printf '%s\n' "$line"; done
    fi
  } <"$client_cache"
fi
if [ -z "$hit" ]; then
  out=$(client_checks)
  printf '%s\n' "$out"
  # Kept only when the docker client answered (a guest about to get Docker installed is probed again after).
  case "$out" in
    *"Docker version "*)
      if [ -n "$key" ] && mkdir -p "${client_cache%/*}" 2>/dev/null; then
        printf '%s\n%s\n' "$key" "$out" >"$client_cache.tmp" && mv "$client_cache.tmp" "$client_cache"
      fi
      ;;
  esac
fi

# The daemon, asked on every run: through its socket with curl when the guest has curl (a small program, where
# the docker CLI is a 50 MB one), else with `docker info`. Only the engine's version is printed.
server_version() {
  if command -v curl >/dev/null 2>&1 &&
    out=$(sudo -n curl -sf --max-time 30 --unix-socket /var/run/docker.sock http://localhost/version 2>/dev/null); then
    v=${out#*\"Version\":\"}
    v=${v%%\"*}
    if [ "$v" != "$out" ] && [ -n "$v" ]; then
      printf '%s\n' "$v"
      return 0
    fi
  fi
  sudo -n docker info --format '{{.ServerVersion}}'
}
# Asked last: an answer means the daemon is up, so a ready guest needs no second exec.
probe 'sudo -n docker info --format {{.ServerVersion}}' server_version

# The SSH user joins the docker group, once: the health check then reads the Engine API through the SSH connection
# itself (sshd connects to the socket as the user; no process starts in the guest), from the next login on. Every
# command still runs Docker through `sudo -n`. Checked with shell builtins, so a warm `up` starts no process here.
docker_member() {
  while IFS=: read -r name _ _ members; do
    [ "$name" = docker ] || continue
    case ",$members," in *",$1,"*) return 0 ;; esac
    return 1
  done </etc/group
  return 2
}
# As the SSH user, or as root through sudo in `up`'s batch of checks (src/ssh/mod.rs prefetch_script).
me=${SUDO_USER:-${USER:-${LOGNAME:-}}}
if [ -n "$me" ] && [ "$me" != root ]; then
  docker_member "$me"
  if [ $? -eq 1 ]; then
    sudo -n usermod -aG docker "$me" >/dev/null 2>&1 || :
  fi
fi
