#!/usr/bin/env bash
# Render an Envoy template from envoy/ with values from the environment, and optionally exec Envoy.
#
# Usage:
#   LISTEN_HOST=... LISTEN_PORT=... ADMIN_HOST=... ADMIN_PORT=... UPSTREAM_HOST=... \
#   UPSTREAM_PORT=... UPSTREAM_SNI=... FIXTURES=... envoy/render.sh TEMPLATE [-- ENVOY_ARGS...]
#
# Without `--`, prints the rendered config. With `--`, writes it to a temp file and execs
# `envoy -c <file> ENVOY_ARGS...` (compose.yaml runs it this way). The e2e harness renders the same
# templates in Rust (e2e/src/envoy.rs); both fail on a placeholder left unfilled.
set -euo pipefail

template="${1:?usage: render.sh TEMPLATE [-- ENVOY_ARGS...]}"
shift
rendered="$(cat "$template")"
for name in LISTEN_HOST LISTEN_PORT ADMIN_HOST ADMIN_PORT UPSTREAM_HOST UPSTREAM_PORT UPSTREAM_SNI FIXTURES; do
  if [[ -n "${!name+set}" ]]; then
    rendered="${rendered//\$\{$name\}/${!name}}"
  fi
done
if leftover="$(grep -o '\${[A-Z_]*}' <<<"$rendered" | sort -u | tr '\n' ' ')" && [[ -n "$leftover" ]]; then
  echo "render.sh: unfilled placeholder(s) in $template: $leftover" >&2
  exit 1
fi

if [[ "${1:-}" == "--" ]]; then
  shift
  out="$(mktemp "${TMPDIR:-/tmp}/envoy.XXXXXX.yaml")"
  printf '%s\n' "$rendered" > "$out"
  exec envoy -c "$out" "$@"
fi
printf '%s\n' "$rendered"
