#!/usr/bin/env bash
# The compose stack for real, as CI runs it (`.ci/run` calls this; run it alone the same way):
#
#   1. a Docker engine with Compose v2 and the upstream images compose.yaml names, from
#      with-docker.sh (it starts dockerd when none answers and stops it again at the end, installs
#      what is missing, and builds local stand-ins for images whose tag is missing);
#   2. `docker compose build`, then the README's walkthrough, read from README.md and run as it
#      stands (it starts the stack with `docker compose up --build --wait`), its output checked;
#   3. the `metrics` profile's Prometheus started beside the stack (Grafana is not run: it is an
#      upstream image with no stand-in, and what it would show are Prometheus' answers);
#   4. writers append through Envoy while `docker compose kill -s KILL` hits ds-server, then
#      ds-sync, each started again. The stack is compose.yaml's default, a hot buffer
#      (DS_RETENTION__MODE=acked): Postgres must hold every acknowledged message exactly once;
#      what the server held mid-load must be a run of Postgres' rows without gap or duplicate,
#      and, once it releases what ds-sync acked, what it still holds a suffix of them (reads below
#      its earliest offset: 410 naming it); then it must release everything;
#   5. through Prometheus' HTTP API: every scrape target (ds-server, ds-sync, Envoy) is up, and
#      every query of the Grafana dashboard evaluates, the main ones to data from the load;
#   6. `docker compose down -v` (also on failure, after printing the services' logs).
#
# Needs root (dockerd, apt-get), python3, and 127.0.0.1:8443 free.
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$repo"
if [ "${1:-}" != --engine-ready ]; then
  exec bash e2e/compose/with-docker.sh bash e2e/compose/run.sh --engine-ready
fi

WRITERS=4
# Bounds of the phases: every wait below polls a condition against one of these.
PHASE_DEADLINE=120
MIRROR_DEADLINE=120
# ds-sync's last acks, DS_RETENTION__MIN_AGE (1 min in compose.yaml), then the retention task.
DRAIN_DEADLINE=180
# Prometheus scrapes every 5 s: a target started again is up at its next scrape.
SCRAPE_DEADLINE=60
run_start=$SECONDS

# Byte order for sort, comm and the offset comparisons ([[ a < b ]]): offsets sort as text.
export LC_ALL=C
# compose.yaml's defaults are what is checked, whatever the caller's shell exports.
unset DS_RETENTION__MODE DS_RETENTION__MIN_AGE COMPOSE_PROFILES
# With the metrics profile, `logs`, `ps` and `down` cover the Prometheus of step 3 too (`up`
# names its services, so Grafana never starts).
compose() { docker compose --profile metrics "$@"; }

log() { echo "[compose] $(date -u +%T) $*" >&2; }
# The failure is said again after the services' logs, so the end of the output names it.
fail() { log "FAILED: $*"; echo "$*" >"$work/failed"; exit 1; }

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
      # Envoy's access log is a line per request (the waits poll): fewer of its lines, so the
      # others' last words fit in what a CI log keeps.
      log "stack logs (last 60 lines per service, 15 of Envoy's):"
      compose logs --no-color --tail 60 ds-server ds-sync postgres prometheus >&2 || true
      compose logs --no-color --tail 15 envoy >&2 || true
    fi
    compose down -v --remove-orphans >/dev/null 2>&1 || log "docker compose down -v failed"
  fi
  if [ "$status" -ne 0 ]; then
    [ -s "$work/timeout-why" ] && { log "the wait's condition said:"; sed 's/^/    /' "$work/timeout-why" >&2; }
    log "FAILED: $(cat "$work/failed" 2>/dev/null || echo "exit status $status")"
  fi
  rm -rf "$work"
  exit "$status"
}
trap cleanup EXIT

# Polls `condition` (a command) every 0.2 s until it succeeds or `seconds` pass. A condition may
# say why it does not hold yet in $work/why, which a timeout prints.
wait_for() {
  local what="$1" seconds="$2"
  shift 2
  local deadline=$((SECONDS + seconds))
  rm -f "$work/why"
  until "$@"; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      [ -s "$work/why" ] && sed 's/^/    /' "$work/why" >&2 && cp "$work/why" "$work/timeout-why"
      fail "timed out after ${seconds}s waiting for $what"
    fi
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

# What the walkthrough must have shown, in this order: the PUT's 201, the token-less read's 401,
# the POST's 204, the message in the SSE tail, the message's row in Postgres.
expect_in_order() {
  local line=0 pattern found
  for pattern in "$@"; do
    # `|| true`: grep -m1 stops at its match, and `tail` writing a long output (a fresh image's
    # build log) into the closed pipe then dies of SIGPIPE, which pipefail would report as a
    # failure although the line was found. An empty result is the failure.
    found="$(tail -n +"$((line + 1))" "$work/walkthrough.out" | grep -n -m1 -E -- "$pattern" | cut -d: -f1)" \
      || true
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
log "walkthrough: PUT 201, read without token 401, POST 204, SSE event, row in Postgres"

# What compose.yaml promises beyond the walkthrough: Envoy does not run as root, and the networks
# keep ds-server away from everything but Envoy and ds-sync, and Postgres away from all but ds-sync.
envoy_uid="$(compose exec -T envoy awk '/^Uid:/ { print $2 }' /proc/1/status)"
[ "$envoy_uid" = 101 ] || fail "Envoy runs as uid $envoy_uid, not the image's envoy user (101)"
reaches() { compose exec -T "$1" bash -c "exec 3<>/dev/tcp/$2/$3" >/dev/null 2>&1; }
reaches envoy ds-server 4437 || fail "Envoy cannot reach ds-server"
! reaches postgres ds-server 4437 || fail "the postgres container reaches ds-server"
! reaches envoy postgres 5432 || fail "the envoy container reaches Postgres"
log "Envoy runs as uid 101; only Envoy and ds-sync reach ds-server, only ds-sync Postgres"

# --- 3. The metrics profile's Prometheus -------------------------------------------------------

# Its stand-in (an older Prometheus from Debian) when the engine lacks the image.
bash e2e/compose/stand-ins.sh prometheus
compose up -d --wait prometheus >"$work/prometheus.log" 2>&1 \
  || { cat "$work/prometheus.log" >&2; fail "docker compose up prometheus"; }
# Prometheus listens in Envoy's network namespace, where Grafana reaches it (envoy:9090). Its API
# is read from inside the ds-sync container (the project's image has curl), which shares Envoy's
# `streams` network: nothing is published for it.
prometheus() { compose exec -T ds-sync curl -sS --max-time 10 "$@"; }
prometheus_ready() { prometheus -f -o /dev/null http://envoy:9090/-/ready >/dev/null 2>&1; }
wait_for "Prometheus ready" "$SCRAPE_DEADLINE" prometheus_ready
prometheus_version="$(prometheus -f http://envoy:9090/api/v1/status/buildinfo \
  | python3 -c 'import json, sys; print(json.load(sys.stdin)["data"]["version"])')" \
  || fail "Prometheus' buildinfo"
log "Prometheus $prometheus_version scraping (the metrics profile's, without Grafana)"

# --- 4. Load while ds-server, then ds-sync, are killed ----------------------------------------

token="$(compose exec -T ds-sync sh /fixtures/mint-token.sh)"
edge=https://localhost:8443
curl_edge() { curl -sS --cacert fixtures/ca.pem -H "Authorization: Bearer $token" "$@"; }

for w in $(seq 1 "$WRITERS"); do
  status="$(curl_edge -D "$work/put.$w.headers" -o /dev/null -w '%{http_code}' -X PUT \
    -H 'Content-Type: application/json' "$edge/v1/stream/load-$w")"
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
# The start of the window the dashboard's queries are evaluated over (section 5).
load_start="$(date +%s)"
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
started_at() { docker inspect -f '{{.State.StartedAt}}' "$(compose ps -q "$1")"; }
# SIGKILLs `service`, waits for `while_down` more acknowledged appends (0: none), then starts it
# again with `docker compose up --wait` (a no-op if its restart policy was quicker); it must
# have been started anew.
kill_and_restart() {
  local service="$1" while_down="$2" before
  before="$(started_at "$service")"
  log "kill -s KILL $service ($(acked_count) acknowledged so far)"
  compose kill -s KILL "$service" >/dev/null 2>&1 || fail "docker compose kill $service"
  if [ "$while_down" -gt 0 ]; then wait_more_acks "$while_down"; fi
  compose up -d --wait --no-deps "$service" >/dev/null 2>&1 \
    || fail "$service did not come back healthy"
  [ "$(started_at "$service")" != "$before" ] || fail "$service was not restarted after kill"
}

# A response's header `name` (case-insensitive) from a `curl -D` file, without its CR.
header() { awk -v name="$(echo "$2" | tr 'A-Z' 'a-z')" -F': ' \
  'tolower($1) == name { sub(/\r$/, "", $2); print $2 }' "$1"; }

# Reads load stream `w` from -1 (the earliest data the server still holds) into
# $work/PREFIX.W.{headers,json}; anything but 200 fails the run.
read_all() {
  local prefix="$1" w="$2" status
  status="$(curl_edge -D "$work/$prefix.$w.headers" -o "$work/$prefix.$w.json" -w '%{http_code}' \
    "$edge/v1/stream/load-$w?offset=-1")" || fail "read of /v1/stream/load-$w"
  [ "$status" = 200 ] \
    || fail "read of /v1/stream/load-$w from -1: $status, $(head -c 300 "$work/$prefix.$w.json")"
}

wait_more_acks 50
kill_and_restart ds-server 0
wait_more_acks 50
# Appends go on while the worker is down; it catches up from its checkpoint.
kill_and_restart ds-sync 50
wait_more_acks 50
# What the server holds mid-load, read from the start (-1: the earliest offset it still holds,
# named by Stream-Earliest-Offset once something was released). Checked against Postgres below.
for w in $(seq 1 "$WRITERS"); do
  read_all held "$w"
done
wait_more_acks 50
touch "$work/stop"
wait "${writer_pids[@]}"
writer_pids=()
load_end="$(date +%s)"
sort "$work"/acked.* >"$work/acked"
log "writers stopped: $(wc -l <"$work/acked") appends acknowledged"

# ds-sync mirrors each of them into Postgres exactly once, despite both crashes.
mirrored() {
  compose exec -T postgres psql -U ds -d ds -At -c \
    "SELECT data->>'w' || '|' || (data->>'n') FROM ds_messages WHERE stream LIKE '/v1/stream/load-%'" \
    >"$work/mirrored" 2>/dev/null || return 1
  sort -u "$work/mirrored" | comm -23 "$work/acked" - >"$work/missing"
  echo "$(wc -l <"$work/missing") acknowledged appends not in Postgres yet, e.g." \
    "$(head -3 "$work/missing" | xargs)" >"$work/why"
  [ ! -s "$work/missing" ]
}
wait_for "every acknowledged append in Postgres" "$MIRROR_DEADLINE" mirrored
duplicates="$(sort "$work/mirrored" | uniq -d | head -5)"
[ -z "$duplicates" ] || fail "rows mirrored more than once, e.g. $duplicates"
log "$(wc -l <"$work/acked") acknowledged appends, each once in Postgres ($(wc -l <"$work/mirrored") rows)"

# ds-sync's checkpoint of each stream at the server's tail: Postgres then also holds the appends
# that were stored without an acknowledgement reaching their writer.
caught_up() {
  local w tail checkpoint
  : >"$work/why"
  for w in $(seq 1 "$WRITERS"); do
    curl_edge -I -o "$work/tail.$w" "$edge/v1/stream/load-$w" || return 1
    tail="$(header "$work/tail.$w" Stream-Next-Offset)"
    checkpoint="$(compose exec -T postgres psql -U ds -d ds -At -c \
      "SELECT next_offset FROM ds_checkpoints WHERE stream = '/v1/stream/load-$w'")" || return 1
    [ -n "$tail" ] && [ "$checkpoint" = "$tail" ] \
      || echo "load-$w: checkpoint ${checkpoint:-none}, tail $tail" >>"$work/why"
  done
  [ ! -s "$work/why" ]
}
wait_for "ds-sync's checkpoints at the server's tails" "$MIRROR_DEADLINE" caught_up

# Postgres' rows of each load stream in stream order (the current incarnation), for the checks of
# what the server holds: held.py PREFIX KIND checks the reads $work/PREFIX.W.{json,headers}. Every
# read is a run of those rows without gap or duplicate, in their order, that starts at the first
# row exactly when nothing was released (no Stream-Earliest-Offset); KIND `suffix`: a run that
# ends at the last row (the writers had stopped and Postgres holds everything).
compose exec -T postgres psql -U ds -d ds -At -F ' ' -c \
  "SELECT stream, data->>'w' || '|' || (data->>'n') FROM ds_current_messages
   WHERE stream LIKE '/v1/stream/load-%' ORDER BY stream, stream_offset, idx" >"$work/rows" \
  || fail "reading Postgres' rows"
cat >"$work/held.py" <<'PY'
import json, pathlib, sys
work, writers, prefix, kind = pathlib.Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
rows = {}
for line in work.joinpath("rows").read_text().splitlines():
    stream, key = line.split(" ")
    rows.setdefault(stream, []).append(key)
def header(w, name):
    for line in work.joinpath(f"{prefix}.{w}.headers").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() == name.lower():
            return value.strip()
    return None
ok = True
for w in range(1, writers + 1):
    mirror = rows.get(f"/v1/stream/load-{w}", [])
    held = [f'{m["w"]}|{m["n"]}' for m in json.loads(work.joinpath(f"{prefix}.{w}.json").read_text())]
    earliest = header(w, "Stream-Earliest-Offset")
    problems = []
    if len(set(mirror)) != len(mirror):
        problems.append("Postgres holds a message twice")
    if len(set(held)) != len(held):
        problems.append("the server holds a message twice")
    if header(w, "Stream-Up-To-Date") != "true":
        problems.append("the read did not reach the tail (no Stream-Up-To-Date)")
    if kind == "suffix":
        start = len(mirror) - len(held)
    elif held and held[0] in mirror:
        start = mirror.index(held[0])
    elif held:
        start = 0
        problems.append(f"the server holds {held[0]}, which Postgres lacks")
    else:
        start = len(mirror)
    if start < 0 or mirror[start:start + len(held)] != held:
        problems.append(f"its {len(held)} messages are not Postgres' rows from row {start} (a gap, or another order)")
    if (start > 0) != (earliest is not None):
        problems.append(f"{start} rows before what it holds, but Stream-Earliest-Offset is {earliest}")
    print(f"load-{w}: holds {len(held)} messages, the {start} before them released "
          f"(Stream-Earliest-Offset {earliest}); Postgres holds {len(mirror)}")
    for problem in problems:
        print(f"load-{w}: {problem}")
        ok = False
sys.exit(0 if ok else 1)
PY
check_held() {
  python3 "$work/held.py" "$work" "$WRITERS" "$1" "$2" >"$work/$1.out" \
    || { sed 's/^/    /' "$work/$1.out" >&2; fail "$3"; }
  sed 's/^/    /' "$work/$1.out" >&2
}
log "mid-load, the server held runs of Postgres' rows:"
check_held held run "what the server held mid-load is not a run of Postgres' rows"

# Whether every load stream released something (has Stream-Earliest-Offset), or with `all`,
# everything (its earliest offset is its tail); $work/head.W keeps each stream's HEAD.
released() {
  local w earliest tail
  : >"$work/why"
  for w in $(seq 1 "$WRITERS"); do
    curl_edge -I -o "$work/head.$w" "$edge/v1/stream/load-$w" || return 1
    earliest="$(header "$work/head.$w" Stream-Earliest-Offset)"
    tail="$(header "$work/head.$w" Stream-Next-Offset)"
    if [ -z "$earliest" ] || { [ "$1" = all ] && [ "$earliest" != "$tail" ]; }; then
      echo "load-$w: earliest offset ${earliest:-none}, tail $tail" >>"$work/why"
    fi
  done
  [ ! -s "$work/why" ]
}
# A read at `offset` of load stream `w` gets 410 naming an earliest offset after `offset`.
expect_gone() {
  local w="$1" offset="$2" status earliest
  status="$(curl_edge -D "$work/gone.headers" -o "$work/gone.body" -w '%{http_code}' \
    "$edge/v1/stream/load-$w?offset=$offset")"
  earliest="$(header "$work/gone.headers" Stream-Earliest-Offset)"
  [ "$status" = 410 ] && [[ "$offset" < "$earliest" ]] && grep -qF "$earliest" "$work/gone.body" \
    || fail "load-$w at released offset $offset: $status, earliest ${earliest:-none}, $(head -c 200 "$work/gone.body")"
}

# Once ds-sync's acks are DS_RETENTION__MIN_AGE old, the server releases them: what it still holds
# is the end of what Postgres holds, and a reader at the stream's first offset (where PUT left it)
# gets 410 naming the earliest offset.
wait_for "the server to release what ds-sync acked" "$DRAIN_DEADLINE" released some
for w in $(seq 1 "$WRITERS"); do
  read_all suffix "$w"
done
log "releasing, the server holds suffixes of Postgres' rows:"
check_held suffix suffix "what the server holds is not a suffix of Postgres' rows"
for w in $(seq 1 "$WRITERS"); do
  expect_gone "$w" "$(header "$work/put.$w.headers" Stream-Next-Offset)"
done

# Then the buffer drains: ds-sync acked everything it committed, and the server releases it all
# (its earliest offset reaches its tail). Reading from the start gets nothing; a reader still at
# an offset it was given mid-load (Stream-Next-Offset of that read) gets 410.
wait_for "the server to release everything ds-sync acked" "$DRAIN_DEADLINE" released all
log "drained: the server released everything, $(($(date +%s) - load_end))s after the writers stopped"
for w in $(seq 1 "$WRITERS"); do
  tail="$(header "$work/head.$w" Stream-Next-Offset)"
  status="$(curl_edge -D "$work/start.$w.headers" -o "$work/start.$w.body" -w '%{http_code}' \
    "$edge/v1/stream/load-$w?offset=-1")"
  [ "$status" = 200 ] && [ "$(tr -d ' \n' <"$work/start.$w.body")" = '[]' ] \
    && [ "$(header "$work/start.$w.headers" Stream-Earliest-Offset)" = "$tail" ] \
    || fail "load-$w from -1 after the release: $status, $(head -c 200 "$work/start.$w.body")"
  expect_gone "$w" "$(header "$work/held.$w.headers" Stream-Next-Offset)"
done
log "reads from -1 start at the earliest offset; reads below it get 410 naming it"

# --- 5. Prometheus: targets up, the dashboard's queries over the load ----------------------------

targets_up() {
  prometheus -f 'http://envoy:9090/api/v1/targets?state=active' >"$work/targets.json" 2>/dev/null \
    || return 1
  python3 - "$work/targets.json" >"$work/why" <<'PY'
import json, sys
targets = json.load(open(sys.argv[1]))["data"]["activeTargets"]
health = {t["labels"]["job"]: (t["health"], t.get("lastError", "")) for t in targets}
for job, (state, error) in sorted(health.items()):
    print(f"{job}: {state} {error}")
sys.exit(0 if sorted(health) == ["ds-server", "ds-sync", "envoy"]
         and all(state == "up" for state, _ in health.values()) else 1)
PY
}
wait_for "every Prometheus target up" "$SCRAPE_DEADLINE" targets_up
log "Prometheus targets up: $(awk '{ print $1 }' "$work/why" | tr -d : | xargs)"

# Prometheus 3 fails a scrape whose Content-Type it does not know, where 2.x (the stand-in) falls
# back to the text format: every target must name text/plain or OpenMetrics. Envoy's admin is on
# its loopback (bash's /dev/tcp, as its healthcheck); the binaries' listeners on `streams`.
# (Reads to the end: a reader that quits early would fail the writer with SIGPIPE.)
content_type() { tr -d '\r' | awk -F': ' 'tolower($1) == "content-type" && !seen { print $2; seen = 1 }'; }
for target in ds-server:9464 ds-sync:9465; do
  type="$(compose exec -T ds-sync curl -sS -D - -o /dev/null "http://$target/metrics" | content_type)"
  echo "$target $type"
done >"$work/content-types"
compose exec -T envoy bash -c 'exec 3<>/dev/tcp/127.0.0.1/9901 &&
  printf "GET /stats/prometheus HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n" >&3 &&
  cat <&3' | content_type | sed 's/^/envoy-admin /' >>"$work/content-types"
while read -r target type; do
  case "$type" in
    text/plain*|application/openmetrics-text*) ;;
    *) fail "$target serves metrics as '$type', which Prometheus 3 does not scrape" ;;
  esac
done <"$work/content-types"
[ "$(wc -l <"$work/content-types")" -eq 3 ] || fail "no Content-Type from a target: $(cat "$work/content-types")"
log "metrics Content-Types: $(sed 's/$/;/' "$work/content-types" | xargs)"

# Every query of every panel (rows' nested panels too), one a line; then their answers over the
# run, one JSON a line, from one `curl` per query in one exec: a range query every scrape interval
# from the load's start to now (after ds-sync's catch-up and the drain). A single instant is not
# enough: both binaries were killed and restarted mid-load, and on a slow machine ds-sync commits
# nothing in the load's last minute and catches up only after the lease of its killed self
# expired, so which instant shows its rates depends on the machine's speed.
python3 - fixtures/grafana/ds-dashboard.json >"$work/queries" <<'PY'
import json, sys
def panels(items):
    for panel in items:
        yield panel
        yield from panels(panel.get("panels", []))
for panel in panels(json.load(open(sys.argv[1]))["panels"]):
    for target in panel.get("targets", []):
        assert "\n" not in target["expr"], target["expr"]
        print(target["expr"])
PY
compose exec -T ds-sync sh -c 'while IFS= read -r query; do
    curl -sS --max-time 10 -G --data-urlencode "query=$query" --data-urlencode "start=$1" \
      --data-urlencode "end=$2" --data-urlencode "step=5" \
      http://envoy:9090/api/v1/query_range || echo "{\"status\":\"curl failed\"}"; echo
  done' sh "$load_start" "$(date +%s)" <"$work/queries" >"$work/answers" \
  || fail "querying Prometheus"
python3 - "$work/queries" "$work/answers" >"$work/dashboard.out" <<'PY' \
  || fail "the dashboard's queries against Prometheus: $(head -c 1500 "$work/dashboard.out" | tr '\n' ';')"
import json, re, sys
from collections import defaultdict
queries = open(sys.argv[1]).read().splitlines()
answers = [json.loads(line) for line in open(sys.argv[2]).read().splitlines() if line.strip()]
assert len(answers) == len(queries), f"{len(queries)} queries, {len(answers)} answers"
# The main series: every query of them without a label matcher must return data, above 0 at some
# moment of the run (a rate over a minute of the load, or of ds-sync's catch-up for its series).
main = {"ds_http_requests_total": "requests/s", "ds_appends_total": "appends/s",
        "ds_sync_rows_committed_total": "rows committed/s"}
ok, seen, numbers = True, set(), []
for query, answer in zip(queries, answers):
    if answer.get("status") != "success":
        print(f"{query}: {answer.get('status')} {answer.get('errorType', '')} {answer.get('error', '')}")
        ok = False
        continue
    result = answer["data"]["result"]
    for series, label in main.items():
        if not re.search(rf"\b{series}\b(?!\{{)", query):
            continue
        seen.add(series)
        totals = defaultdict(float)
        for r in result:
            for at, value in r["values"]:
                totals[at] += float(value)
        peak = max(totals.values(), default=0.0)
        if not peak > 0:
            print(f"{query}: no data from the load ({len(result)} series, {len(totals)} samples, peak {peak})")
            ok = False
        numbers.append(f"{label} {peak:.1f}")
for series in main.keys() - seen:
    print(f"the dashboard has no query of {series} without a label matcher")
    ok = False
print(f"{len(queries)} dashboard queries evaluate over the run; peaks: {', '.join(numbers)}")
sys.exit(0 if ok else 1)
PY
log "$(tail -1 "$work/dashboard.out")"

# --- 6. Down -------------------------------------------------------------------------------------

compose down -v --remove-orphans >/dev/null 2>&1 || fail "docker compose down -v"
stack_up=""
[ -z "$(compose ps -aq)" ] || fail "containers left after down"
log "passed in $((SECONDS - run_start))s"
