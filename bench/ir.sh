#!/usr/bin/env bash
# Instructions per append (steady with many connections; with one connection it depends on how
# often the server's threads park between requests: compare servers within one run): the server runs under
# `valgrind --tool=callgrind`; wrk posts 100-byte appends to one stream (a warm-up, then the
# counters are zeroed and the measured run counts); instructions / appends answered.
#
#   bench/ir.sh                      ds-server (memory mode) and Electric, 1 and 64 connections
#   bench/ir.sh --servers ds --connections 16 --seconds 10
#
# ds-server is built in release from this checkout; Electric (`durable-streams` 0.1.5,
# `--durability memory`) is installed from crates.io into ~/.cache/ds-bench as bench/run.sh does.
# Needs valgrind and wrk (Debian packages; installed when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
SERVERS="ds,electric"; CONNECTIONS="1,64"; SECONDS_MEASURED=8; WARMUP=2
while [ $# -gt 0 ]; do
  case "$1" in
    --servers) SERVERS="$2"; shift 2 ;;
    --connections) CONNECTIONS="$2"; shift 2 ;;
    --seconds) SECONDS_MEASURED="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
for tool in valgrind wrk; do
  command -v "$tool" >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$tool" >/dev/null
done
CACHE=${DS_BENCH_CACHE:-$HOME/.cache/ds-bench}
ELECTRIC_VERSION=0.1.5
ELECTRIC_BIN=$CACHE/electric-$ELECTRIC_VERSION/bin/durable-streams-server
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/durable-streams/target}"
if [[ ",$SERVERS," == *",ds,"* ]]; then
  cargo build --release --locked -q -p ds-server
fi
if [[ ",$SERVERS," == *",electric,"* ]] && [ ! -x "$ELECTRIC_BIN" ]; then
  cargo install durable-streams --version "$ELECTRIC_VERSION" --locked --root "$CACHE/electric-$ELECTRIC_VERSION"
fi
work="$(mktemp -d)"
trap 'pkill -f "callgrind-out-file=$work" 2>/dev/null || true; rm -rf "$work"' EXIT
port=4993
cat >"$work/post.lua" <<'LUA'
wrk.method = "POST"
wrk.body = string.rep("x", 100)
wrk.headers["Content-Type"] = "application/octet-stream"
LUA
echo "| server | connections | appends measured | instructions per append |"
echo "|---|---|---|---|"
for server in ${SERVERS//,/ }; do
  for c in ${CONNECTIONS//,/ }; do
    port=$((port + 1))
    rm -rf "$work/data"; mkdir -p "$work/data"
    out="$work/cg.$server.$c"
    case "$server" in
      ds) DS_SERVER__PORT=$port DS_STORAGE__MODE=memory DS_LIMITS__MAX_STREAM_BYTES=2000000000 \
            DS_LIMITS__MAX_MEMORY_BYTES=4000000000 \
            valgrind --tool=callgrind --callgrind-out-file="$out" \
            "$CARGO_TARGET_DIR/release/ds-server" >"$work/log" 2>&1 & ;;
      electric) valgrind --tool=callgrind --callgrind-out-file="$out" "$ELECTRIC_BIN" \
            --host 127.0.0.1 --port $port --data-dir "$work/data" --durability memory \
            >"$work/log" 2>&1 & ;;
    esac
    pid=$!
    url="http://127.0.0.1:$port/v1/stream/ir"
    for _ in $(seq 300); do curl -s -o /dev/null -X PUT -H 'Content-Type: application/octet-stream' "$url" && break; sleep 0.2; done
    wrk -t1 -c"$c" -d"${WARMUP}s" -s "$work/post.lua" "$url" >/dev/null
    callgrind_control -z "$pid" >/dev/null 2>&1
    wrk -t1 -c"$c" -d"${SECONDS_MEASURED}s" -s "$work/post.lua" "$url" >"$work/wrk"
    callgrind_control -d "$pid" >/dev/null 2>&1
    kill -INT "$pid"; wait "$pid" || true
    appends=$(awk '/requests in/ {print $1}' "$work/wrk")
    errors=$(grep -c "Non-2xx" "$work/wrk" || true)
    [ "$errors" = 0 ] || { cat "$work/wrk" >&2; echo "non-2xx answers" >&2; exit 1; }
    # The dump after zeroing: the highest-numbered part file is the measured interval.
    part="$(ls "$out".* 2>/dev/null | sort -t. -k3 -n | tail -1)"
    ir=$(awk '/^totals:|^summary:/ {print $2; exit}' "$part")
    echo "| $server | $c | $appends | $((ir / appends)) |"
  done
done
