#!/usr/bin/env bash
# Run the upstream Durable Streams conformance suite against ds-server.
#
# Usage:
#   e2e/conformance/run.sh [MODE] [-- VITEST_ARGS...]
#
#   MODE         storage mode passed as DS_STORAGE__MODE (default: memory).
#                Non-memory modes also get DS_STORAGE__DATA_DIR=<fresh temp dir>.
#   VITEST_ARGS  extra vitest arguments, e.g. -- -t "SSE Mode"
#
# Environment:
#   CONFORMANCE_BASE_URL       target an already-running server instead of
#                              building and starting ds-server (MODE is ignored).
#                              That server must use a ~500 ms long-poll timeout.
#   CONFORMANCE_SUBSCRIPTIONS  1 (the default) also runs the opt-in "Reserved subscription
#                              APIs" block (the started server gets
#                              DS_SUBSCRIPTIONS__ALLOW_LOCAL_WEBHOOKS=true: the suite's webhook
#                              receivers are on http://127.0.0.1); 0 skips it.
#   DS_SERVER_BIN              use this ds-server binary instead of running
#                              `cargo build --release -p ds-server`.
#   CARGO_TARGET_DIR           honoured when locating the built binary.
#   CONFORMANCE_STARTUP_SECS   how long to wait for /healthz (default: 30).
#
# Exits with vitest's status (0 = all tests passed).
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
export CONFORMANCE_SUBSCRIPTIONS="${CONFORMANCE_SUBSCRIPTIONS:-1}"

log() { printf '[conformance] %s\n' "$*" >&2; }

# --- node dependencies ------------------------------------------------------
# Reinstall when node_modules is missing or older than the lockfile / manifest.
ensure_node_modules() {
  local stamp="$here/node_modules/.package-lock.json"
  if [[ ! -f "$stamp" || "$here/package-lock.json" -nt "$stamp" || "$here/package.json" -nt "$stamp" ]]; then
    log "installing node dependencies (npm ci)"
    (cd "$here" && npm ci --no-audit --no-fund)
  fi
}

# --- helpers ------------------------------------------------------------------
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$here/lib.sh"

server_pid=""
data_dir=""
server_log=""
status=1

# shellcheck disable=SC2317  # invoked via trap
cleanup() {
  if [[ -n "$server_pid" ]] && kill -0 "$server_pid" 2>/dev/null; then
    kill "$server_pid" 2>/dev/null || true
    # Give it a moment to exit cleanly, then force.
    for _ in 1 2 3 4 5 6 7 8 9 10; do
      kill -0 "$server_pid" 2>/dev/null || break
      sleep 0.2
    done
    kill -9 "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  if [[ -n "$server_log" && "$status" -ne 0 && -f "$server_log" ]]; then
    log "server log (last 200 lines of $server_log):"
    tail -n 200 "$server_log" >&2 || true
  fi
  if [[ -n "$data_dir" ]]; then
    rm -rf "$data_dir"
  fi
  if [[ -n "$server_log" && "$status" -eq 0 ]]; then
    rm -f "$server_log"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

ensure_node_modules

if [[ -n "${CONFORMANCE_BASE_URL:-}" ]]; then
  base_url="${CONFORMANCE_BASE_URL%/}"
  log "using already-running server at $base_url (not building or starting ds-server)"
else
  if [[ -n "${DS_SERVER_BIN:-}" ]]; then
    bin="$DS_SERVER_BIN"
  else
    log "building ds-server (release)"
    (cd "$repo" && cargo build --release -p ds-server)
    bin="${CARGO_TARGET_DIR:-$repo/target}/release/ds-server"
  fi
  if [[ ! -x "$bin" ]]; then
    log "binary not found at $bin"
    exit 1
  fi

  port="$(free_port)"
  base_url="http://127.0.0.1:$port"
  server_log="$(mktemp -t ds-conformance-server.XXXXXX.log)"

  server_env=(
    DS_SERVER__HOST=127.0.0.1
    "DS_SERVER__PORT=$port"
    DS_SERVER__LONG_POLL_TIMEOUT=500ms
    "DS_STORAGE__MODE=$mode"
  )
  if [[ "$CONFORMANCE_SUBSCRIPTIONS" == "1" ]]; then
    # The suite's webhook receivers listen on http://127.0.0.1: the development exception.
    server_env+=(DS_SUBSCRIPTIONS__ALLOW_LOCAL_WEBHOOKS=true)
  fi
  if [[ "$mode" != "memory" ]]; then
    data_dir="$(mktemp -d -t ds-conformance-data.XXXXXX)"
    server_env+=("DS_STORAGE__DATA_DIR=$data_dir")
  fi

  log "starting $bin on $base_url (mode=$mode${data_dir:+, data_dir=$data_dir})"
  env -u DS_SERVER_BIN "${server_env[@]}" "$bin" >"$server_log" 2>&1 &
  server_pid=$!

  startup_secs="${CONFORMANCE_STARTUP_SECS:-30}"
  deadline=$((SECONDS + startup_secs))
  until [[ "$(http_status "$base_url/healthz")" == "200" ]]; do
    if ! kill -0 "$server_pid" 2>/dev/null; then
      log "ds-server exited before becoming healthy"
      exit 1
    fi
    if ((SECONDS >= deadline)); then
      log "ds-server not healthy after ${startup_secs}s"
      exit 1
    fi
    sleep 0.1
  done
  log "ds-server is healthy"
fi

log "running conformance suite against $base_url"
set +e
(
  cd "$here"
  CONFORMANCE_BASE_URL="$base_url" "$here/node_modules/.bin/vitest" run \
    --config "$here/vitest.config.mjs" --reporter=default \
    ${vitest_args[@]+"${vitest_args[@]}"}
)
status=$?
set -e
if [[ "$status" -ne 0 ]]; then
  log "conformance suite FAILED (exit $status)"
fi
exit "$status"
