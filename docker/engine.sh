#!/usr/bin/env bash
# engine.sh: make sure a Docker engine answers, starting one if needed.
#
# Exit 0: `docker info` answers (it already did, or this script started dockerd).
# Exit 77: no engine and none can be started here; the last line of output says why. (77 is
#          the "skipped" code of CTest's SKIP_RETURN_CODE and of Automake.)
#
# When no engine answers and we are root (as CI is): install Debian's docker.io if dockerd is
# missing, then start dockerd in the background (its own session, so it outlives this script)
# with its log in $FEDSLICE_DOCKERD_LOG (default /var/log/fedslice-dockerd.log). Sandboxes
# differ, so it tries, in order, until one answers within 60 s:
#   1. dockerd's defaults (overlay2 storage, iptables NAT for bridges)
#   2. --iptables=false                      (no usable iptables / nf_tables in the kernel)
#   3. --storage-driver=vfs                  (no overlayfs, e.g. nested in another overlay)
#   4. --storage-driver=vfs --iptables=false
# The fleet never needs iptables: images build with --network host and containers talk over
# a bridge network of their own. Set FEDSLICE_DOCKERD_ARGS to force one set of arguments.
set -uo pipefail

say() { echo "engine: $*"; }
skip() {
  echo "engine: no Docker engine: $*"
  exit 77
}

if docker info >/dev/null 2>&1; then
  exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
  if command -v dockerd >/dev/null 2>&1; then
    skip "none answers and only root can start dockerd (as root: bash docker/engine.sh)"
  fi
  skip "none answers and Docker is not installed (as root: apt-get install docker.io)"
fi

if ! command -v dockerd >/dev/null 2>&1; then
  say "installing Debian's docker.io"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -qq --no-install-recommends docker.io >/tmp/fedslice-apt-docker.log 2>&1; then
    apt-get update -qq >/dev/null 2>&1
    apt-get install -y -qq --no-install-recommends docker.io >/tmp/fedslice-apt-docker.log 2>&1 ||
      skip "apt-get install docker.io failed: $(tail -n 2 /tmp/fedslice-apt-docker.log | tr '\n' ' ')"
  fi
fi
command -v docker >/dev/null 2>&1 || skip "docker.io is installed but has no docker client"

log=${FEDSLICE_DOCKERD_LOG:-/var/log/fedslice-dockerd.log}
mkdir -p "$(dirname "$log")"

# An engine that is still coming up (or a socket left by a dead one) is not ours to touch:
# only a dockerd process we start is ever stopped here.
# (A pid file left by a killed dockerd may name a pid reused by another program: check its name.)
pid=$(cat /var/run/docker.pid 2>/dev/null || true)
if [[ "$pid" =~ ^[0-9]+$ && "$(cat "/proc/$pid/comm" 2>/dev/null)" == dockerd ]]; then
  say "a dockerd process exists but does not answer yet; waiting for it"
  for _ in $(seq 60); do
    docker info >/dev/null 2>&1 && exit 0
    sleep 1
  done
  skip "a running dockerd did not answer within 60 s (see its log)"
fi

if [[ -n "${FEDSLICE_DOCKERD_ARGS:-}" ]]; then
  attempts=("$FEDSLICE_DOCKERD_ARGS")
else
  attempts=("" "--iptables=false" "--storage-driver=vfs" "--storage-driver=vfs --iptables=false")
fi

reasons=()
for args in "${attempts[@]}"; do
  say "starting dockerd ${args:-(defaults)}; log: $log"
  echo "=== $(date -u +%FT%TZ) dockerd $args" >>"$log"
  # shellcheck disable=SC2086  # args is a list of flags
  setsid nohup dockerd $args >>"$log" 2>&1 </dev/null &
  pid=$!
  for _ in $(seq 60); do
    if docker info >/dev/null 2>&1; then
      driver=$(docker info -f '{{.Driver}}' 2>/dev/null)
      say "dockerd (pid $pid) answers; storage driver $driver"
      exit 0
    fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 1
  done
  # Why it failed: dockerd's last error line.
  why=$(grep -E 'level=(fatal|error)|failed to start daemon' "$log" | tail -n 1 |
        sed -E 's/.*msg="?([^"]*)"?.*/\1/')
  reasons+=("[${args:-defaults}] ${why:-no answer within 60 s}")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null
    for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -9 "$pid" 2>/dev/null
  fi
  wait "$pid" 2>/dev/null
done
skip "dockerd would not start: ${reasons[*]} (log: $log)"
