#!/usr/bin/env bash
# The compose stack for real, as CI runs it (`.ci/run` calls this; run it alone the same way):
#
#   1. a Docker engine with Compose v2 and the upstream images compose.yaml names, from
#      with-docker.sh (it starts dockerd when none answers and stops it again at the end, installs
#      what is missing, and builds local stand-ins for images whose tag is missing);
#   2. `docker compose build`, then the README's walkthrough, read from README.md and run as it
#      stands (it starts the stack with `docker compose up --build --wait`), its output checked;
#   3. writers append through Envoy while `docker compose kill -s KILL` hits ds-server, then
#      ds-sync, each started again; every acknowledged message must be in the server's stream and
#      in Postgres exactly once;
#   4. `docker compose down -v` (also on failure, after printing the services' logs).
#
# Needs root (dockerd, apt-get), python3, and 127.0.0.1:8443 free.
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$repo"
if [ "${1:-}" != --engine-ready ]; then
  exec bash e2e/compose/with-docker.sh bash e2e/compose/run.sh --engine-ready
fi

WRITERS=4
# Bounds of the load phase: every wait below polls a condition against one of these.
PHASE_DEADLINE=120
MIRROR_DEADLINE=120

log() { echo "[compose] $(date -u +%T) $*" >&2; }
fail() { log "FAILED: $*"; exit 1; }

work="$(mktemp -d "${TMPDIR:-/tmp}/ds-compose.XXXXXX")"
writer_pids=()
stack_up=""

cleanup() {
  local status=$?
  touch "$work/stop"
  for pid in "${writer_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ -n "$stack_up" ]; then
    if [ "$status" -ne 0 ]; then
      log "stack logs (last 60 lines per service):"
      docker compose logs --no-color --tail 60 >&2 || true
    fi
    docker compose down -v --remove-orphans >/dev/null 2>&1 || log "docker compose down -v failed"
  fi
  rm -rf "$work"
  exit "$status"
}
trap cleanup EXIT

# Polls `condition` (a command) every 0.2 s until it succeeds or `seconds` pass.
wait_for() {
  local what="$1" seconds="$2"
  shift 2
  local deadline=$((SECONDS + seconds))
  until "$@"; do
    [ "$SECONDS" -lt "$deadline" ] || fail "timed out after ${seconds}s waiting for $what"
    sleep 0.2
  done
}

if (exec 3<>/dev/tcp/127.0.0.1/8443) 2>/dev/null; then
  fail "something already listens on 127.0.0.1:8443 (a stack left running? docker compose down -v)"
fi

# --- 2. Build, then the README's walkthrough --------------------------------------------------

log "docker compose build"
build_start=$SECONDS
docker compose build --progress plain >"$work/build.log" 2>&1 \
  || { tail -60 "$work/build.log" >&2; fail "docker compose build"; }
log "built in $((SECONDS - build_start))s"

# The walkthrough is the fenced block after this marker in README.md, whatever it says.
marker='<!-- e2e/compose/run.sh runs the next block verbatim -->'
awk -v marker="$marker" '
  $0 == marker { found = 1; next }
  found == 1 && /^```/ { if (inside) exit; inside = 1; next }
  inside { print }
' README.md >"$work/walkthrough.sh"
[ -s "$work/walkthrough.sh" ] || fail "README.md has no block after '$marker'"

log "README walkthrough:"
sed 's/^/    /' "$work/walkthrough.sh" >&2
stack_up=1
bash -euo pipefail "$work/walkthrough.sh" >"$work/walkthrough.out" 2>&1 \
  || { cat "$work/walkthrough.out" >&2; fail "the README walkthrough exited with $?"; }
sed 's/^/    | /' "$work/walkthrough.out" >&2

# What the walkthrough must have shown, in this order: the PUT's 201, the token-less POST's 401,
# the POST's 204, the message in the SSE tail, the message's row in Postgres.
expect_in_order() {
  local line=0 pattern found
  for pattern in "$@"; do
    found="$(tail -n +"$((line + 1))" "$work/walkthrough.out" | grep -n -m1 -E -- "$pattern" | cut -d: -f1)" \
      || fail "walkthrough output lacks /$pattern/ (after line $line)"
    [ -n "$found" ] || fail "walkthrough output lacks /$pattern/ (after line $line)"
    line=$((line + found))
  done
}
expect_in_order \
  '^HTTP/[0-9.]+ 201' \
  '^HTTP/[0-9.]+ 401' \
  '^HTTP/[0-9.]+ 204' \
  '^data:\[\{"hello":"world"\}\]$' \
  '/v1/stream/demo +\| +[-0-9_]+ +\| +0 \| \{"hello": "world"\}'
log "walkthrough: PUT 201, POST without token 401, POST 204, SSE event, row in Postgres"

# What compose.yaml promises beyond the walkthrough: Envoy does not run as root, and the networks
# keep ds-server away from everything but Envoy and ds-sync, and Postgres away from all but ds-sync.
envoy_uid="$(docker compose exec -T envoy awk '/^Uid:/ { print $2 }' /proc/1/status)"
[ "$envoy_uid" = 101 ] || fail "Envoy runs as uid $envoy_uid, not the image's envoy user (101)"
reaches() { docker compose exec -T "$1" bash -c "exec 3<>/dev/tcp/$2/$3" >/dev/null 2>&1; }
reaches envoy ds-server 4437 || fail "Envoy cannot reach ds-server"
! reaches postgres ds-server 4437 || fail "the postgres container reaches ds-server"
! reaches envoy postgres 5432 || fail "the envoy container reaches Postgres"
log "Envoy runs as uid 101; only Envoy and ds-sync reach ds-server, only ds-sync Postgres"

# --- 3. Load while ds-server, then ds-sync, are killed ----------------------------------------

token="$(docker compose exec -T ds-sync sh /fixtures/mint-token.sh)"
edge=https://localhost:8443
curl_edge() { curl -sS --cacert fixtures/ca.pem -H "Authorization: Bearer $token" "$@"; }

for w in $(seq 1 "$WRITERS"); do
  status="$(curl_edge -o /dev/null -w '%{http_code}' -X PUT -H 'Content-Type: application/json' \
    "$edge/v1/stream/load-$w")"
  [ "$status" = 201 ] || fail "PUT /v1/stream/load-$w answered $status"
done

# A writer appends {"w":W,"n":N} for N = 1, 2, ... and records N once the server answered 204
# (acknowledged: durable). Failures (the server is down) are retried with the next N: an
# unacknowledged append may or may not be stored, and is allowed either way.
writer() {
  local w="$1" n=0 status
  while [ ! -e "$work/stop" ] && [ "$n" -lt 20000 ]; do
    n=$((n + 1))
    status="$(curl_edge --max-time 10 -o /dev/null -w '%{http_code}' -X POST \
      -H 'Content-Type: application/json' -d "{\"w\":$w,\"n\":$n}" \
      "$edge/v1/stream/load-$w" 2>/dev/null)" || status=000
    if [ "$status" = 204 ]; then echo "$w|$n" >>"$work/acked.$w"; fi
  done
}
for w in $(seq 1 "$WRITERS"); do
  : >"$work/acked.$w"
  writer "$w" &
  writer_pids+=($!)
done

acked_count() { cat "$work"/acked.* | wc -l; }
acks_reach() { [ "$(acked_count)" -ge "$1" ]; }
# Waits until at least `more` further appends are acknowledged.
wait_more_acks() {
  local more="$1" target
  target=$(($(acked_count) + more))
  wait_for "$target acknowledged appends" "$PHASE_DEADLINE" acks_reach "$target"
}

# When `service`'s container last started (a new value means it was started again).
started_at() { docker inspect -f '{{.State.StartedAt}}' "$(docker compose ps -q "$1")"; }
# SIGKILLs `service`, waits for `while_down` more acknowledged appends (0: none), then starts it
# again with `docker compose up --wait` (a no-op if its restart policy was quicker); it must
# have been started anew.
kill_and_restart() {
  local service="$1" while_down="$2" before
  before="$(started_at "$service")"
  log "kill -s KILL $service ($(acked_count) acknowledged so far)"
  docker compose kill -s KILL "$service" >/dev/null 2>&1 || fail "docker compose kill $service"
  if [ "$while_down" -gt 0 ]; then wait_more_acks "$while_down"; fi
  docker compose up -d --wait --no-deps "$service" >/dev/null 2>&1 \
    || fail "$service did not come back healthy"
  [ "$(started_at "$service")" != "$before" ] || fail "$service was not restarted after kill"
}

wait_more_acks 50
kill_and_restart ds-server 0
wait_more_acks 50
# Appends go on while the worker is down; it catches up from its checkpoint.
kill_and_restart ds-sync 50
wait_more_acks 50
touch "$work/stop"
wait "${writer_pids[@]}"
writer_pids=()
sort "$work"/acked.* >"$work/acked"
log "writers stopped: $(wc -l <"$work/acked") appends acknowledged"

# Every acknowledged append is in the server's stream once (a catch-up read through Envoy).
for w in $(seq 1 "$WRITERS"); do
  curl_edge "$edge/v1/stream/load-$w?offset=-1" >"$work/stream.$w.json"
done
python3 - "$work" "$WRITERS" <<'PY' || fail "the server's streams do not hold every acknowledged append exactly once"
import collections, json, pathlib, sys
work, writers = pathlib.Path(sys.argv[1]), int(sys.argv[2])
acked = set(work.joinpath("acked").read_text().split())
for w in range(1, writers + 1):
    stored = collections.Counter(f'{m["w"]}|{m["n"]}' for m in json.loads(work.joinpath(f"stream.{w}.json").read_text()))
    twice = [k for k, c in stored.items() if c > 1]
    missing = [k for k in acked if k.startswith(f"{w}|") and k not in stored]
    if twice or missing:
        print(f"load-{w}: stored twice {twice[:10]}, acknowledged but missing {missing[:10]}")
        sys.exit(1)
PY

# ... and ds-sync mirrors each of them into Postgres exactly once, despite both crashes.
mirrored() {
  docker compose exec -T postgres psql -U ds -d ds -At -c \
    "SELECT data->>'w' || '|' || (data->>'n') FROM ds_messages WHERE stream LIKE '/v1/stream/load-%'" \
    >"$work/mirrored" 2>/dev/null || return 1
  [ -z "$(sort -u "$work/mirrored" | comm -23 "$work/acked" -)" ]
}
wait_for "every acknowledged append in Postgres" "$MIRROR_DEADLINE" mirrored
duplicates="$(sort "$work/mirrored" | uniq -d | head -5)"
[ -z "$duplicates" ] || fail "rows mirrored more than once, e.g. $duplicates"
log "$(wc -l <"$work/acked") acknowledged appends, each once in the server's streams and in Postgres ($(wc -l <"$work/mirrored") rows)"

# --- 4. Down -------------------------------------------------------------------------------------

docker compose down -v --remove-orphans >/dev/null 2>&1 || fail "docker compose down -v"
stack_up=""
[ -z "$(docker compose ps -aq)" ] || fail "containers left after down"
log "passed"
