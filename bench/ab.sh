#!/usr/bin/env bash
# A/B of two ds-server builds in memory mode, back to back on one machine: the append scenario
# (64 writers x 100 streams: server CPU per append) and the idle-reader scenarios (RSS per idle
# SSE and long-poll reader), each on a fresh server, the two builds alternating which goes first.
#
#   bench/ab.sh OUT ROUNDS IDLE_ROUNDS [ds-bench run args for append...]
#
# Expects release builds copied to $AB_DIR/ds-server-base, $AB_DIR/ds-server-edge and
# $AB_DIR/ds-bench (default AB_DIR=/tmp/ab): build each tree with `cargo build --release -p
# ds-server` (and ds-bench separately) and copy the binaries, since one target dir holds one.
# Results: OUT/results.jsonl and OUT/report.md (`ds-bench report`).
# AB_MODE picks the storage mode (default memory); durable modes get a fresh data directory
# under AB_DATA_ROOT (default /tmp) per server, deleted after it.
set -euo pipefail
OUT=$1; ROUNDS=${2:-3}; IDLE_ROUNDS=${3:-$ROUNDS}; shift 3
AB_DIR=${AB_DIR:-/tmp/ab}
MODE=${AB_MODE:-memory}
BENCH=$AB_DIR/ds-bench
ulimit -n "$(ulimit -Hn)"
mkdir -p "$OUT"
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
run() {
  local tag=$1 scenario=$2 round=$3; shift 3
  local port; port=$(free_port)
  local data; data=$(mktemp -d "${AB_DATA_ROOT:-/tmp}/ab-data.XXXXXX")
  DS_SERVER__HOST=127.0.0.1 DS_SERVER__PORT=$port DS_STORAGE__MODE=$MODE DS_STORAGE__DATA_DIR=$data \
    DS_SERVER__LONG_POLL_TIMEOUT=60s DS_LIMITS__MAX_MEMORY_BYTES=4000000000 \
    DS_LIMITS__MAX_STREAM_BYTES=2000000000 RUST_LOG=warn \
    "$AB_DIR/ds-server-$tag" >"$OUT/$tag-$scenario-$round.log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 300); do
    "$BENCH" wait --url "http://127.0.0.1:$port" --timeout-secs 1 2>/dev/null && break
  done
  echo "== $tag $scenario round $round" >&2
  "$BENCH" run --url "http://127.0.0.1:$port" --server-pid "$pid" --label "ds-$MODE $tag" \
    --about "$tag" --scenario "$scenario" --round "$round" --results "$OUT/results.jsonl" "$@" >&2 || echo "ds-bench failed" >&2
  kill -TERM "$pid"; wait "$pid" || true
  rm -rf "$data"
}
for r in $(seq 1 "$ROUNDS"); do
  if (( r % 2 )); then order="base edge"; else order="edge base"; fi
  for tag in $order; do
    run "$tag" append "$r" --writers 64 --streams 100 "$@"
  done
  if (( r <= IDLE_ROUNDS )); then
    for tag in $order; do
      run "$tag" idle-sse "$r"
      run "$tag" idle-long-poll "$r"
    done
  fi
done
"$BENCH" report --results "$OUT/results.jsonl" > "$OUT/report.md"
