#!/usr/bin/env bash
# The churn proof's long form (issue 21, README *Retention*): short-lived streams shaped like
# chat sessions (create, 0-3 appends, delete once the mirror holds them) through the hot buffer,
# with release builds: ds-server in memory mode with DS_RETENTION__MODE=acked and a 1 MB budget,
# ds-sync following the prefix into Postgres. The test is e2e/tests/churn.rs (its CI run does
# 3 000 cycles in a debug build); this runs it at scale.
#
#   DATABASE_URL=postgres://postgres@127.0.0.1:5432/test bench/churn.sh [CYCLES] [CONCURRENCY]
#
# CYCLES defaults to 1 000 000, CONCURRENCY (sessions at a time) to 128. Every 5% of the cycles
# it prints a `churn-sample` line: RSS of ds-server and ds-sync, the server's streams and
# memory budget in use, the subscription's links, the registry's retained bytes, the wake
# stream's bytes, ds-sync's followed streams and /status entries; then a summary, and the
# checks (every stream with data in Postgres exactly once, nothing refused, the bookkeeping
# back where it started). Output also goes to $OUT (default /tmp/churn-CYCLES.log).
# Without DATABASE_URL the harness starts a throwaway Postgres (testcontainers or initdb).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CYCLES=${1:-1000000}
CONCURRENCY=${2:-128}
TARGET=${CARGO_TARGET_DIR:-$REPO/target}
OUT=${OUT:-/tmp/churn-$CYCLES.log}
cd "$REPO"
cargo build --release -p ds-server -p ds-sync --bins
echo "bench/churn.sh $CYCLES $CONCURRENCY at $(git rev-parse --short HEAD), $(nproc) cores" | tee "$OUT"
DS_E2E_BIN_DIR=$TARGET/release DS_CHURN_CYCLES=$CYCLES DS_CHURN_CONCURRENCY=$CONCURRENCY \
  cargo test --release -p ds-e2e --test churn -- --nocapture 2>&1 | tee -a "$OUT"
