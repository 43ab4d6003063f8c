#!/usr/bin/env bash
# bench/ab-sync.sh OUT ROUNDS: same-binary A/B of ds-sync acks (needs DATABASE_URL; PROFILE=release
# for release builds in $CARGO_TARGET_DIR): each cell a fresh ds-server (memory) and `ds-bench run
# --scenario sync --quick`, acks off/on alternating which goes first.
set -uo pipefail
T=${CARGO_TARGET_DIR:-/work/targets/syncsub}/${PROFILE:-debug}
OUT=${1:-/tmp/ab-sync/out}; ROUNDS=${2:-2}
mkdir -p "$OUT"
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
cell() {
  local acks=$1 round=$2 port; port=$(free_port)
  DS_SERVER__HOST=127.0.0.1 DS_SERVER__PORT=$port DS_STORAGE__MODE=memory \
    DS_LIMITS__MAX_MEMORY_BYTES=4000000000 RUST_LOG=warn "$T/ds-server" >"$OUT/server-$acks-$round.log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 300); do "$T/ds-bench" wait --url "http://127.0.0.1:$port" --timeout-secs 1 2>/dev/null && break; done
  echo "== acks $acks round $round" >&2
  "$T/ds-bench" run --url "http://127.0.0.1:$port" --server-pid "$pid" --label "acks-$acks" --about "acks $acks" \
    --scenario sync --quick --round "$round" --results "$OUT/results.jsonl" \
    --sync-bin "$T/ds-sync" --database-url "$DATABASE_URL" --sync-subscriptions "$acks" >&2 || echo "ds-bench failed" >&2
  kill -TERM "$pid"; wait "$pid" || true
}
for r in $(seq 1 "$ROUNDS"); do
  if (( r % 2 )); then order="false true"; else order="true false"; fi
  for a in $order; do cell "$a" "$r"; done
done
"$T/ds-bench" report --results "$OUT/results.jsonl" > "$OUT/report.md"
