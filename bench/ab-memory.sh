#!/usr/bin/env bash
# A/B of two ds-server builds on the memory-mode scenarios of issue 23, back to back on one
# machine, each scenario on a fresh server, the two builds alternating which goes first:
#   records  RSS per stored 100-byte record (ds-bench run --scenario records)
#   catchup  catch-up read throughput at several record sizes
#   streams, producers  RSS per empty stream and per idempotent producer, by
#            server/examples/ram_probe.rs ($AB_DIR/ram_probe, release build; PROBE_COUNT items,
#            default 100000), printed to OUT/probe.txt
#
#   bench/ab-memory.sh OUT ROUNDS SCENARIOS [ds-bench run args...]
#   e.g. bench/ab-memory.sh /tmp/abm 2 records,catchup -- --records 1000000 --catchup-mib 1024
#
# Binaries as for bench/ab.sh: $AB_DIR/ds-server-base, $AB_DIR/ds-server-edge, $AB_DIR/ds-bench
# (default AB_DIR=/tmp/ab). AB_MODE picks the storage mode (default memory). Results:
# OUT/results.jsonl and OUT/report.md.
set -euo pipefail
OUT=$1; ROUNDS=$2; IFS=, read -r -a SCENARIOS <<<"$3"; shift 3
[[ ${1:-} == -- ]] && shift
AB_DIR=${AB_DIR:-/tmp/ab}
MODE=${AB_MODE:-memory}
BENCH=$AB_DIR/ds-bench
mkdir -p "$OUT"
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
run() {
  local tag=$1 scenario=$2 round=$3; shift 3
  local port; port=$(free_port)
  local data; data=$(mktemp -d "${AB_DATA_ROOT:-/tmp}/ab-data.XXXXXX")
  DS_SERVER__HOST=127.0.0.1 DS_SERVER__PORT=$port DS_STORAGE__MODE=$MODE DS_STORAGE__DATA_DIR=$data \
    DS_LIMITS__MAX_MEMORY_BYTES=8000000000 DS_LIMITS__MAX_STREAM_BYTES=4000000000 \
    DS_LIMITS__MAX_STREAMS=10000000 DS_LIMITS__MAX_PRODUCERS=10000000 RUST_LOG=warn \
    "$AB_DIR/ds-server-$tag" >"$OUT/$tag-$scenario-$round.log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 300); do
    "$BENCH" wait --url "http://127.0.0.1:$port" --timeout-secs 1 2>/dev/null && break
  done
  echo "== $tag $scenario round $round" >&2
  if [[ $scenario == streams || $scenario == producers ]]; then
    echo "$tag round $round: $("$AB_DIR/ram_probe" "http://127.0.0.1:$port" "$pid" "$scenario" \
      "${PROBE_COUNT:-100000}")" | tee -a "$OUT/probe.txt" >&2
  else
    "$BENCH" run --url "http://127.0.0.1:$port" --server-pid "$pid" --label "ds-$MODE $tag" \
      --about "$tag" --scenario "$scenario" --round "$round" --results "$OUT/results.jsonl" "$@" >&2 ||
      echo "ds-bench failed" >&2
  fi
  kill -TERM "$pid"; wait "$pid" || true
  rm -rf "$data"
}
for r in $(seq 1 "$ROUNDS"); do
  if ((r % 2)); then order="base edge"; else order="edge base"; fi
  for scenario in "${SCENARIOS[@]}"; do
    for tag in $order; do
      run "$tag" "$scenario" "$r" "$@"
    done
  done
done
[[ -f $OUT/results.jsonl ]] && "$BENCH" report --results "$OUT/results.jsonl" >"$OUT/report.md"
true
