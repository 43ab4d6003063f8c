#!/usr/bin/env bash
# Runs the benchmark: ds-server in each storage mode against the Node reference server and
# Electric's Rust server, side by side in one run, and prints Markdown tables.
#
#   bench/run.sh                 # full run (~65 min)
#   bench/run.sh --quick         # development run (~3 min)
#   bench/run.sh --servers ds-memory,electric-wal --scenarios append,catchup
#   DATABASE_URL=postgres://postgres@127.0.0.1:5432/test \
#     bench/run.sh --servers ds-memory --scenarios sync   # ds-sync into Postgres (~2 min)
#
# Options:
#   --quick              shorter cells, fewer readers, smaller catch-up stream
#   --servers LIST       comma list of: ds-memory ds-file-fast ds-file-durable ds-acid
#                        node-memory node-file electric-wal electric-memory (default: all)
#   --scenarios LIST     comma list of: append fanout idle-sse idle-long-poll catchup records
#                        restart sync subscriptions (default: all but sync, which needs Postgres, and
#                        subscriptions, which only ds-server speaks); with fanout, the
#                        loopback floor (`ds-bench floor`, raw TCP, no server) runs first
#   --rounds N           run the append scenario N times (default 3, 1 with --quick): each
#                        round starts every server, then measures each cell on every server
#                        in turn (rotating who goes first); the report takes each cell's
#                        median round. A VM's speed drifts over minutes: measuring a cell on
#                        all servers within a minute or so, in rounds, keeps one server's
#                        bad minute from deciding a comparison
#   --out DIR            where results.jsonl and report.md go (default: a new dir in the cache)
#   -- ARGS...           passed to every `ds-bench run` (e.g. -- --append-secs 10)
#
# Environment:
#   DS_BENCH_CACHE       competitors and scratch data (default ~/.cache/ds-bench); outside the repo
#   CARGO_TARGET_DIR     where ds-server, ds-sync and ds-bench are built (default <repo>/target)
#   DATABASE_URL         for the sync scenario: a Postgres it may create and drop databases in
#
# Every server listens on 127.0.0.1 only. Each scenario gets a freshly started server and an
# empty data directory, so no scenario inherits another's heap or files.
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$BENCH_DIR")
CACHE=${DS_BENCH_CACHE:-$HOME/.cache/ds-bench}
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO_DIR/target}

NODE_SERVER_VERSION=0.3.7
ELECTRIC_VERSION=0.1.5
NODE_DIR=$CACHE/node-$NODE_SERVER_VERSION
ELECTRIC_BIN=$CACHE/electric-$ELECTRIC_VERSION/bin/durable-streams-server

ALL_SERVERS=(ds-memory ds-file-fast ds-file-durable ds-acid node-memory node-file electric-wal electric-memory)
ALL_SCENARIOS=(append fanout idle-sse idle-long-poll catchup records restart)

# The command as typed: words that need no quoting shown as they are (printf %q would also
# escape the commas of --servers a,b), the others quoted.
COMMAND_LINE=bench/run.sh
for word in "$@"; do
  if [[ $word =~ ^[A-Za-z0-9_./,=:@+-]+$ ]]; then
    COMMAND_LINE+=" $word"
  else
    COMMAND_LINE+=" $(printf '%q' "$word")"
  fi
done
QUICK=()
SERVERS=("${ALL_SERVERS[@]}")
SCENARIOS=("${ALL_SCENARIOS[@]}")
OUT_DIR=""
ROUNDS=""
EXTRA_ARGS=()
while (($#)); do
  case "$1" in
    --quick) QUICK=(--quick) ;;
    --servers) IFS=, read -r -a SERVERS <<<"${2:?--servers needs a list}"; shift ;;
    --scenarios) IFS=, read -r -a SCENARIOS <<<"${2:?--scenarios needs a list}"; shift ;;
    --out) OUT_DIR=${2:?--out needs a directory}; shift ;;
    --rounds) ROUNDS=${2:?--rounds needs a number}; shift ;;
    --) shift; EXTRA_ARGS=("$@"); break ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "run.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

log() { printf '[run.sh] %s\n' "$*" >&2; }

if [[ -z $ROUNDS ]]; then
  if ((${#QUICK[@]})); then ROUNDS=1; else ROUNDS=3; fi
fi
if ! [[ $ROUNDS =~ ^[1-9][0-9]*$ ]]; then
  echo "run.sh: --rounds needs a positive whole number, got '$ROUNDS'" >&2
  exit 2
fi

# --- competitors, installed once into the cache (never into the repo) ---------------------------

install_competitors() {
  mkdir -p "$CACHE"
  if [[ " ${SERVERS[*]} " == *" node-"* ]] &&
    [[ ! -f $NODE_DIR/node_modules/@durable-streams/server/package.json ]]; then
    log "installing @durable-streams/server@$NODE_SERVER_VERSION into $NODE_DIR"
    mkdir -p "$NODE_DIR"
    [[ -f $NODE_DIR/package.json ]] || echo '{"private": true}' >"$NODE_DIR/package.json"
    npm install --prefix "$NODE_DIR" --no-audit --no-fund \
      "@durable-streams/server@$NODE_SERVER_VERSION" >&2
  fi
  if [[ " ${SERVERS[*]} " == *" electric-"* ]] && [[ ! -x $ELECTRIC_BIN ]]; then
    log "installing durable-streams $ELECTRIC_VERSION (crates.io) into $CACHE/electric-$ELECTRIC_VERSION"
    cargo install durable-streams --version "$ELECTRIC_VERSION" --locked \
      --root "$CACHE/electric-$ELECTRIC_VERSION" >&2
  fi
}

build_ours() {
  # The commit that was built, read now: the tree may move on during a long run.
  BUILT_COMMIT=$(git -C "$REPO_DIR" rev-parse --short HEAD 2>/dev/null || echo '?')
  if [[ -n $(git -C "$REPO_DIR" status --porcelain --untracked-files=no 2>/dev/null) ]]; then
    BUILT_COMMIT="$BUILT_COMMIT+uncommitted changes"
  fi
  log "building ds-server and ds-bench (release) into $TARGET_DIR"
  # Separate builds, not one: built together, cargo would unify ds-bench's hyper client features
  # into ds-server's dependency graph, and ds-server would not be the binary users build.
  (cd "$REPO_DIR" && CARGO_TARGET_DIR=$TARGET_DIR cargo build --release -p ds-server >&2)
  (cd "$REPO_DIR" && CARGO_TARGET_DIR=$TARGET_DIR cargo build --release -p ds-bench >&2)
  DS_SERVER=$TARGET_DIR/release/ds-server
  DS_BENCH=$TARGET_DIR/release/ds-bench
  DS_SYNC=$TARGET_DIR/release/ds-sync
  if wants_sync; then
    log "building ds-sync (release) into $TARGET_DIR"
    (cd "$REPO_DIR" && CARGO_TARGET_DIR=$TARGET_DIR cargo build --release -p ds-sync >&2)
  fi
}

wants_sync() { [[ " ${SCENARIOS[*]} " == *" sync "* ]]; }

# Extra `ds-bench run` arguments of a scenario.
scenario_args() {
  case "$1" in
    sync) printf '%s\n' --sync-bin "$DS_SYNC" --database-url "$DATABASE_URL" ;;
  esac
}

# --- one server at a time -------------------------------------------------------------------------

SERVER_PID=""
DATA_DIR=""

stop_server() {
  if [[ -n $SERVER_PID ]]; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 1 100); do
      kill -0 "$SERVER_PID" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
  fi
  if [[ -n $DATA_DIR ]]; then
    rm -rf "$DATA_DIR"
    DATA_DIR=""
  fi
}
trap stop_server EXIT
trap 'stop_server; exit 130' INT TERM

free_port() {
  # Below the ephemeral range (32768+), so a client socket never holds the port we pick.
  local port
  for _ in $(seq 1 100); do
    port=$((20000 + RANDOM % 10000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "$port"
      return 0
    fi
  done
  echo "run.sh: no free port found" >&2
  return 1
}

about() {
  case "$1" in
    ds-memory) echo "in RAM; lost on restart" ;;
    ds-file-fast) echo "written to the OS page cache, synced in the background every second; survives a process crash, a power loss takes about the last second" ;;
    ds-file-durable) echo "fdatasync'd before the response (group commit)" ;;
    ds-acid) echo "synced in the commit log shared by all shards (redb checkpointed)" ;;
    node-memory) echo "@durable-streams/server $NODE_SERVER_VERSION, in-memory store (the reference implementation)" ;;
    node-file) echo "@durable-streams/server $NODE_SERVER_VERSION, file-backed store (log files + LMDB): fdatasync per append, coalesced per file" ;;
    electric-wal) echo "durable-streams $ELECTRIC_VERSION \`--durability wal\` (its default): group-commit fdatasync of a sharded WAL before the ack" ;;
    electric-memory) echo "durable-streams $ELECTRIC_VERSION \`--durability memory\`: page-cache write, no WAL, no fsync" ;;
  esac
}

label() {
  case "$1" in
    ds-*) echo "ds-server ${1#ds-}" ;;
    node-*) echo "node reference ${1#node-}" ;;
    electric-*) echo "electric ${1#electric-}" ;;
  esac
}

# Spawns server $1 on port $2 with the data directory $DATA_DIR (a fresh one when unset); its
# output is appended to $3. Sets SERVER_PID; does not wait for it to answer.
spawn_server() {
  local id=$1 port=$2 logfile=$3
  [[ -n $DATA_DIR ]] || DATA_DIR=$(mktemp -d "$CACHE/data.XXXXXX")
  case "$id" in
    ds-*)
      DS_SERVER__HOST=127.0.0.1 DS_SERVER__PORT=$port \
        DS_STORAGE__MODE=${id#ds-} DS_STORAGE__DATA_DIR=$DATA_DIR \
        DS_SERVER__LONG_POLL_TIMEOUT=60s \
        DS_LIMITS__MAX_MEMORY_BYTES=4000000000 DS_LIMITS__MAX_STREAM_BYTES=2000000000 \
        RUST_LOG=warn "$DS_SERVER" >>"$logfile" 2>&1 &
      ;;
    node-memory)
      DS_BENCH_NODE_MODULES=$NODE_DIR/node_modules PORT=$port LONG_POLL_TIMEOUT_MS=60000 \
        node "$BENCH_DIR/node-server.mjs" >>"$logfile" 2>&1 &
      ;;
    node-file)
      DS_BENCH_NODE_MODULES=$NODE_DIR/node_modules PORT=$port LONG_POLL_TIMEOUT_MS=60000 \
        DATA_DIR=$DATA_DIR node "$BENCH_DIR/node-server.mjs" >>"$logfile" 2>&1 &
      ;;
    electric-*)
      "$ELECTRIC_BIN" --host 127.0.0.1 --port "$port" --data-dir "$DATA_DIR" \
        --long-poll-timeout-ms 60000 --durability "${id#electric-}" >>"$logfile" 2>&1 &
      ;;
    *) echo "run.sh: unknown server $id" >&2; return 2 ;;
  esac
  SERVER_PID=$!
}

# Starts server $1 on $2 with a fresh data dir; its output goes to $3. Sets SERVER_PID.
start_server() {
  local id=$1 port=$2 logfile=$3
  DATA_DIR=""
  : >"$logfile"
  spawn_server "$id" "$port" "$logfile" || return
  for _ in $(seq 1 60); do
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
      wait "$SERVER_PID" 2>/dev/null || true
      SERVER_PID=""
      return 1
    fi
    if "$DS_BENCH" wait --url "http://127.0.0.1:$port" --timeout-secs 1 2>/dev/null; then
      return 0
    fi
  done
  return 1
}

machine() {
  local cpu mem
  cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
  mem=$(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo)
  echo "$(nproc) cores, ${cpu:-unknown CPU}, $mem RAM, Linux $(uname -r)"
}

# --- main -----------------------------------------------------------------------------------------

if wants_sync && [[ -z ${DATABASE_URL:-} ]]; then
  echo "run.sh: the sync scenario needs DATABASE_URL, a Postgres it may create databases in" \
    "(e.g. postgres://postgres@127.0.0.1:5432/test)" >&2
  exit 2
fi

install_competitors
build_ours

# 10 000 SSE readers need 10 000 descriptors in the server and as many in ds-bench.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if (($(ulimit -n) < 10100)); then
  log "warning: open files limit is $(ulimit -n); the 10 000-reader cells will fail"
fi

if [[ -z $OUT_DIR ]]; then
  OUT_DIR=$CACHE/results-$(date +%Y%m%d-%H%M%S)
fi
mkdir -p "$OUT_DIR"
RESULTS=$OUT_DIR/results.jsonl
: >"$RESULTS"
RUN_START=$(date +%s)

# The fan-out table's first row: the same fan-out over raw loopback TCP with no server, the
# floor under every server's latency on this machine.
if [[ " ${SCENARIOS[*]} " == *" fanout "* ]]; then
  FLOOR_ARGS=()
  for ((i = 0; i < ${#EXTRA_ARGS[@]}; i++)); do
    case "${EXTRA_ARGS[i]}" in
      --fanout-readers | --fanout-rate | --fanout-secs)
        FLOOR_ARGS+=("${EXTRA_ARGS[i]}" "${EXTRA_ARGS[i + 1]:-}")
        i=$((i + 1))
        ;;
      --fanout-readers=* | --fanout-rate=* | --fanout-secs=*) FLOOR_ARGS+=("${EXTRA_ARGS[i]}") ;;
    esac
  done
  log "loopback floor: fanout (raw TCP, no server)"
  "$DS_BENCH" floor --results "$RESULTS" "${QUICK[@]}" "${FLOOR_ARGS[@]}" ||
    log "the loopback floor failed; going on without it"
fi

SKIPPED=()

# Starts server $1 on port $2 (output to $3) like start_server; if it does not start, records
# it as skipped (with its last log line as the reason, and leaves it out from then on) and
# returns 1.
start_or_skip() {
  local id=$1 port=$2 logfile=$3 lbl reason
  lbl=$(label "$id")
  start_server "$id" "$port" "$logfile" && return 0
  reason=$(grep -v '^\s*$' "$logfile" | tail -n 1 || true)
  log "$lbl did not start: ${reason:-no output}; skipping it"
  stop_server
  "$DS_BENCH" skip --results "$RESULTS" --label "$lbl" \
    --reason "refused to start: ${reason:-no output}"
  SKIPPED+=("$id")
  return 1
}

# Runs scenario $2 against server $1 in a fresh process; returns 1 if the server did not start.
run_one() {
  local id=$1 scenario=$2
  local lbl port logfile
  lbl=$(label "$id")
  port=$(free_port)
  logfile=$OUT_DIR/$id-$scenario.log
  log "$lbl: $scenario (port $port)"
  start_or_skip "$id" "$port" "$logfile" || return 1
  mapfile -t SCENARIO_ARGS < <(scenario_args "$scenario")
  "$DS_BENCH" run --url "http://127.0.0.1:$port" --server-pid "$SERVER_PID" \
    --label "$lbl" --about "$(about "$id")" --scenario "$scenario" \
    --results "$RESULTS" "${QUICK[@]}" "${SCENARIO_ARGS[@]}" "${EXTRA_ARGS[@]}" ||
    log "ds-bench failed on $lbl $scenario (see above)"
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    log "$lbl exited during $scenario; its log: $logfile"
  fi
  stop_server
}

skipped() { [[ " ${SKIPPED[*]} " == *" $1 "* ]]; }

# Scenario i on server $1 (bench/src/restart.rs): fill one stream, `kill -9`, restart on the same
# directory and check; stop cleanly, restart and check again. In-memory modes keep nothing
# across a restart and are not run. Returns 1 if the server did not start.
run_restart() {
  local id=$1 lbl port logfile state spawned
  lbl=$(label "$id")
  case "$id" in
    ds-memory | node-memory)
      log "$lbl: restart not run (keeps nothing across a restart)"
      return 0
      ;;
  esac
  port=$(free_port)
  logfile=$OUT_DIR/$id-restart.log
  state=$OUT_DIR/$id-restart.json
  log "$lbl: restart (port $port)"
  start_or_skip "$id" "$port" "$logfile" || return 1
  local args=(--url "http://127.0.0.1:$port" --label "$lbl" --about "$(about "$id")"
    --scenario restart --results "$RESULTS" --restart-state "$state"
    "${QUICK[@]}" "${EXTRA_ARGS[@]}")
  if "$DS_BENCH" run --server-pid "$SERVER_PID" "${args[@]}" --restart-step fill; then
    kill -KILL "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    log "$lbl: killed (-9) after the fill; restarting"
    spawned=$(date +%s%3N)
    spawn_server "$id" "$port" "$logfile"
    if "$DS_BENCH" run --server-pid "$SERVER_PID" "${args[@]}" --restart-step crash \
      --spawned-at-ms "$spawned"; then
      kill -TERM "$SERVER_PID" 2>/dev/null || true
      for _ in $(seq 1 600); do
        kill -0 "$SERVER_PID" 2>/dev/null || break
        sleep 0.1
      done
      if kill -0 "$SERVER_PID" 2>/dev/null; then
        log "$lbl did not stop within 60 s of SIGTERM; killing it"
        kill -KILL "$SERVER_PID" 2>/dev/null || true
      fi
      wait "$SERVER_PID" 2>/dev/null || true
      log "$lbl: stopped cleanly; restarting"
      spawned=$(date +%s%3N)
      spawn_server "$id" "$port" "$logfile"
      "$DS_BENCH" run --server-pid "$SERVER_PID" "${args[@]}" --restart-step clean \
        --spawned-at-ms "$spawned" || true
    fi
  fi
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    log "$lbl exited during restart; its log: $logfile"
  fi
  stop_server
}

# The append cells (writers × streams): ds-bench's matrix, or the one given after `--`.
APPEND_WRITERS=1,64
APPEND_STREAMS=1,100
APPEND_ARGS=()
for ((i = 0; i < ${#EXTRA_ARGS[@]}; i++)); do
  case "${EXTRA_ARGS[i]}" in
    --writers) APPEND_WRITERS=${EXTRA_ARGS[i + 1]:-}; i=$((i + 1)) ;;
    --writers=*) APPEND_WRITERS=${EXTRA_ARGS[i]#--writers=} ;;
    --streams) APPEND_STREAMS=${EXTRA_ARGS[i + 1]:-}; i=$((i + 1)) ;;
    --streams=*) APPEND_STREAMS=${EXTRA_ARGS[i]#--streams=} ;;
    *) APPEND_ARGS+=("${EXTRA_ARGS[i]}") ;;
  esac
done

# The servers of one append round, all started (fresh, empty data directories) before its
# first cell and stopped after its last: id -> pid, port, data directory.
declare -A ROUND_PID=() ROUND_PORT=() ROUND_DIR=()
ROUND_IDS=()

stop_round() {
  local id
  for id in "${ROUND_IDS[@]}"; do
    SERVER_PID=${ROUND_PID[$id]} DATA_DIR=${ROUND_DIR[$id]}
    stop_server
  done
  ROUND_IDS=()
  ROUND_PID=() ROUND_PORT=() ROUND_DIR=()
}
trap 'stop_round; stop_server' EXIT
trap 'stop_round; stop_server; exit 130' INT TERM

# The append scenario first, in rounds, measured cell by cell: each round starts every server,
# then runs each cell on every server in turn before the next cell, so that one cell's
# measurements on all servers are a minute or so apart rather than several (this VM's speed
# drifts by tens of percent over minutes: memory mode measured 53k and 80k appends/s in cells
# minutes apart on 2026-12-03), and the share of memory mode is taken within a round. Each
# round and each cell starts one server further along the list, so no server always runs at
# the same point (on 2026-12-03 acid, always sixth, met 6-20% hypervisor steal in all three
# rounds while the servers before it met 0.3-3%). Servers not being measured are idle.
if [[ " ${SCENARIOS[*]} " == *" append "* ]]; then
  IFS=, read -r -a writer_counts <<<"$APPEND_WRITERS"
  IFS=, read -r -a stream_counts <<<"$APPEND_STREAMS"
  for ((round = 1; round <= ROUNDS; round++)); do
    for id in "${SERVERS[@]}"; do
      skipped "$id" && continue
      port=$(free_port)
      logfile=$OUT_DIR/$id-append-round$round.log
      log "$(label "$id"): starting for append round $round (port $port)"
      start_or_skip "$id" "$port" "$logfile" || continue
      ROUND_IDS+=("$id")
      ROUND_PID[$id]=$SERVER_PID ROUND_PORT[$id]=$port ROUND_DIR[$id]=$DATA_DIR
      SERVER_PID="" DATA_DIR=""
    done
    n=${#ROUND_IDS[@]}
    turn=0
    for w in "${writer_counts[@]}"; do
      for s in "${stream_counts[@]}"; do
        for ((i = 0; i < n; i++)); do
          id=${ROUND_IDS[(i + round - 1 + turn) % n]}
          pid=${ROUND_PID[$id]}
          if ! kill -0 "$pid" 2>/dev/null; then
            log "$(label "$id") has exited; its log: $OUT_DIR/$id-append-round$round.log"
          fi
          log "$(label "$id"): append round $round, $w writers, $s streams"
          "$DS_BENCH" run --url "http://127.0.0.1:${ROUND_PORT[$id]}" --server-pid "$pid" \
            --label "$(label "$id")" --about "$(about "$id")" --scenario append \
            --round "$round" --writers "$w" --streams "$s" --results "$RESULTS" \
            "${QUICK[@]}" "${APPEND_ARGS[@]}" ||
            log "ds-bench failed on $(label "$id") append (see above)"
        done
        turn=$((turn + 1))
      done
    done
    stop_round
  done
fi
for id in "${SERVERS[@]}"; do
  for scenario in "${SCENARIOS[@]}"; do
    [[ $scenario == append ]] && continue
    # Subscriptions (protocol sections 6-7) are ds-server's alone among these servers.
    [[ $scenario == subscriptions && $id != ds-* ]] && continue
    skipped "$id" && continue 2
    if [[ $scenario == restart ]]; then
      run_restart "$id" || continue 2
      continue
    fi
    run_one "$id" "$scenario" || continue 2
  done
done

{
  echo "### Benchmark results"
  echo
  echo "Command: \`$COMMAND_LINE\` (took $(($(date +%s) - RUN_START)) s after the build)"
  echo
  echo "Machine: $(machine). Load generator and server share these cores; server CPU is read"
  echo "from /proc/<pid>/stat, so the CPU-per-append column is the server's own cost."
  echo
  echo "Versions: ds-server $BUILT_COMMIT," \
    "node $(node --version 2>/dev/null || echo '?')," \
    "@durable-streams/server $NODE_SERVER_VERSION, durable-streams (Electric) $ELECTRIC_VERSION."
  if wants_sync; then
    echo
    echo "ds-sync: the same commit, release build, defaults (\`linger\` 20 ms, 256 connections)" \
      "unless a row says otherwise; Postgres" \
      "$(psql "$DATABASE_URL" -Atc 'SHOW server_version' 2>/dev/null || echo '?') on this machine."
  fi
  echo
  "$DS_BENCH" report --results "$RESULTS"
} | tee "$OUT_DIR/report.md"
log "results: $RESULTS, report: $OUT_DIR/report.md"
