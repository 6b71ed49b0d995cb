#!/usr/bin/env bash
# Measures the embedded store's write-ahead log under a full-speed write run: starts a fresh
# server, runs noomnim-load for SECONDS (default 60), samples the WAL size every second, then
# keeps sampling for 10 s of idleness. Prints one "t=<s> wal=<bytes>" line per sample and a
# summary line (largest, at the end of the run, after idling).
#
# Usage: tools/wal-growth.sh [extra server env, e.g. EMBEDDED_WAL_LIMIT_BYTES=1000000000000]
# Environment: SECONDS_PER_RUN (default 60), BINARY (default target/release/noomnim).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${SECONDS_PER_RUN:-60}"
binary="${BINARY:-target/release/noomnim}"
[ -x target/release/noomnim-load ] || cargo build --release --bin noomnim-load
scratch="$(mktemp -d)"
port=$((10000 + RANDOM % 15000))
env DATA_DIR="$scratch/data" PORT="$port" RATE_LIMIT=0 LOG_LEVEL=warn "$@" "$binary" 2>"$scratch/server.log" &
server=$!
trap 'kill $server 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$scratch"' EXIT
for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.05; done
wal="$scratch/data/noomnim.sqlite3-wal"
size() { stat -c %s "$wal" 2>/dev/null || echo 0; }
target/release/noomnim-load --addr "127.0.0.1:$port" --tag "wal$$" --clients 200 --groups 10 \
    --senders 50 --text-bytes 1000 --seconds "$seconds" >"$scratch/load.txt" &
load=$!
largest=0; t=0
while kill -0 "$load" 2>/dev/null; do
    s=$(size); [ "$s" -gt "$largest" ] && largest=$s
    echo "t=$t wal=$s"; sleep 1; t=$((t + 1))
done
wait "$load" || true
at_end=$(size)
sleep 10
idle=$(size)
db=$(stat -c %s "$scratch/data/noomnim.sqlite3")
grep -E "messages|deliver|p99" "$scratch/load.txt" | head -5 || true
echo "summary: largest_wal=$largest wal_at_end=$at_end wal_after_10s_idle=$idle database=$db"
