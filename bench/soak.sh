#!/usr/bin/env bash
# bench/soak.sh [MODE...]: the long form of the hot-buffer soak (issue 21), release build.
#
# Runs e2e/tests/hot_buffer_soak.rs (Envoy with JWT and TLS, ds-server with
# DS_RETENTION__MODE=acked, ds-sync, Postgres; see that file's docs for the phases and what is
# asserted) against release binaries, one mode at a time (default: memory file-durable acid),
# and prints a Markdown table of the `soak result` lines. Sizing (defaults below, the CI variant's
# in the test file): DS_SOAK_BUDGET (bytes), DS_SOAK_BUDGETS (budgets written while ds-sync keeps
# up, 10 at least), DS_SOAK_WRITERS, DS_SOAK_MESSAGE_BYTES, DS_SOAK_SEGMENT_BYTES.
#
# Needs what the e2e suite needs: Envoy on PATH, Postgres (DATABASE_URL, or initdb/pg_ctl).
# Logs and the table go to OUT (default ~/.cache/ds-bench/soak-<time>).
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
export DS_SOAK_BUDGET=${DS_SOAK_BUDGET:-8000000}
export DS_SOAK_BUDGETS=${DS_SOAK_BUDGETS:-50}
export DS_SOAK_WRITERS=${DS_SOAK_WRITERS:-20}
export DS_SOAK_MESSAGE_BYTES=${DS_SOAK_MESSAGE_BYTES:-1024}
export DS_SOAK_SEGMENT_BYTES=${DS_SOAK_SEGMENT_BYTES:-1048576}
export DS_SOAK_DEADLINE_SECS=${DS_SOAK_DEADLINE_SECS:-3600}
OUT=${OUT:-$HOME/.cache/ds-bench/soak-$(date -u +%Y%m%dT%H%M%SZ)}
MODES=("$@")
[ ${#MODES[@]} -gt 0 ] || MODES=(memory file-durable acid)
mkdir -p "$OUT"

test_name() {
  case $1 in
    memory) echo memory_mode_drains_into_postgres_and_pushes_back_at_the_budget ;;
    file-durable) echo file_durable_disk_stays_bounded_while_the_buffer_drains ;;
    acid) echo acid_disk_stays_bounded_while_the_buffer_drains ;;
    *) echo "unknown mode $1 (memory, file-durable, acid)" >&2; exit 2 ;;
  esac
}

cargo build --release -p ds-server -p ds-sync --bins
cargo test --release -p ds-e2e --test hot_buffer_soak --no-run
# The harness takes the binaries from here (not the newest of debug and release).
export DS_E2E_BIN_DIR=$CARGO_TARGET_DIR/release

for mode in "${MODES[@]}"; do
  name=$(test_name "$mode")
  echo "== $mode: $name" >&2
  cargo test --release -p ds-e2e --test hot_buffer_soak -- --exact "$name" --nocapture \
    >"$OUT/$mode.log" 2>&1 || {
    echo "$mode failed: see $OUT/$mode.log" >&2
    tail -30 "$OUT/$mode.log" >&2
    exit 1
  }
  grep '^soak result:' "$OUT/$mode.log" >>"$OUT/results.txt"
done

python3 - "$OUT/results.txt" <<'EOF' | tee "$OUT/report.md"
import sys
MB = 1e6
print("| mode | written (budgets) | appends | phase 1: ds-sync keeps up | refused in phase 1 "
      "| ds-sync killed: 503s / held | server RSS: start / max (bound) | data dir: max (bound) |")
print("|---|---|---|---|---|---|---|---|")
for line in open(sys.argv[1]):
    r = dict(p.split("=", 1) for p in line.split()[2:] if "=" in p)
    mb = lambda key: f"{int(r[key]) / MB:.1f} MB"
    memory = r["mode"] == "memory"
    refused = r["phase2_refused"] if memory else "none (no budget)"
    disk = "n/a" if memory else f"{mb('disk_max')} ({mb('disk_bound')})"
    rss_bound = f" ({mb('rss_bound')})" if memory else ""
    print(
        f"| {r['mode']} | {mb('written')} ({r['budgets']}) | {r['appends']} "
        f"| {mb('phase1_written')} in {r['phase1_secs']} s ({r['phase1_MBps']} MB/s) "
        f"| {r['phase1_refused']} | {refused} / {mb('phase2_held')} "
        f"| {mb('rss_start')} / {mb('rss_max')}{rss_bound} | {disk} |"
    )
EOF
echo "results in $OUT" >&2
