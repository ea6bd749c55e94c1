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

probe 'docker --version' docker --version
probe 'sudo -n docker compose version' sudo -n docker compose version
probe 'docker-compose version' compose_v1
# Asked last: an answer means the daemon is up, so a ready guest needs no second exec.
probe 'sudo -n docker info --format {{.ServerVersion}}' sudo -n docker info --format '{{.ServerVersion}}'
