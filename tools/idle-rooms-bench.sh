#!/usr/bin/env bash
# Idle rooms in peer mode against one busy user's acks (issue 22 item 2): runs
# tools/idle-rooms-bench.py with 0 and IDLE (default 500) idle rooms, each against a fresh
# server in peer mode on the test MongoDB and Redis (eval "$(bash tools/services.sh start)").
# NOOMNIM_BINARY picks another build (before/after); COUNT sends per run (default 200).
set -euo pipefail
cd "$(dirname "$0")/.."
binary="${NOOMNIM_BINARY:-target/release/noomnim}"
idle="${IDLE:-500}"
for rooms in 0 "$idle"; do
    port=$((20000 + RANDOM % 20000)); metrics=$((port + 1))
    MONGODB_URI="${NOOMNIM_TEST_MONGODB_URI:?start tools/services.sh}" MONGODB_DB="idle_$$_$RANDOM" \
        REDIS_URL="${NOOMNIM_TEST_REDIS_URL:?}" PEER=true PORT="$port" METRICS_PORT="$metrics" \
        MAX_GROUPS_PER_USER=0 RATE_LIMIT=0 "$binary" 2>/dev/null &
    pid=$!
    sleep 1
    python3 tools/idle-rooms-bench.py "127.0.0.1:$port" "127.0.0.1:$metrics" "$rooms" "${COUNT:-200}" || true
    kill "$pid"; wait "$pid" 2>/dev/null || true
done
