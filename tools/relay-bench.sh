#!/usr/bin/env bash
# Relay cost per instance in peer mode: K instances on one MongoDB and one Redis, G groups
# whose members sit on one or two instances each, a steady send rate; for the single shared
# channel (PEER_RELAY=shared) and the per-group relay (PEER_RELAY=per_group), in one run.
# Reports, per instance: relayed messages and payload bytes received from Redis (from
# /metrics) and server CPU seconds (from /proc/PID/stat) over the storm.
#
# Usage: tools/relay-bench.sh            (needs NOOMNIM_TEST_MONGODB_URI and NOOMNIM_TEST_REDIS_URL,
#                                         e.g. eval "$(bash tools/services.sh start)")
# Environment: INSTANCES (6), GROUP_COUNT (12: with 6 instances every group lives on one instance;
# 9 puts each group on two), CLIENTS (600), SENDERS (60), RATE (300 msg/s in all), SECONDS_PER_RUN (10).
set -euo pipefail
cd "$(dirname "$0")/.."
instances="${INSTANCES:-6}"; groups="${GROUP_COUNT:-12}"; clients="${CLIENTS:-600}"
senders="${SENDERS:-60}"; rate="${RATE:-300}"; seconds="${SECONDS_PER_RUN:-10}"
binary="${NOOMNIM_BINARY:-target/release/noomnim}"
[ -x "$binary" ] && [ -x target/release/noomnim-load ] || cargo build --release --quiet
scratch="$(mktemp -d)"
pids=()
stop_all() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; pids=(); }
trap 'stop_all; rm -rf "$scratch"' EXIT

metric() { # metric PORT NAME
    local page
    page="$(exec 3<>"/dev/tcp/127.0.0.1/$1"; printf 'GET /metrics HTTP/1.0\r\n\r\n' >&3; cat <&3)"
    awk -v name="$2" '$1 == name {print $2; exit}' <<<"$page"
}
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

for mode in shared per_group; do
    stop_all
    base=$((20000 + RANDOM % 10000))
    database="relaybench_${mode}_$$"
    addrs=()
    for i in $(seq 0 $((instances - 1))); do
        port=$((base + 2 * i))
        env MONGODB_URI="${NOOMNIM_TEST_MONGODB_URI:?}" MONGODB_DB="$database" PEER=true \
            REDIS_URL="${NOOMNIM_TEST_REDIS_URL:?}" PEER_RELAY="$mode" NODE_ID="n$i" PORT="$port" \
            METRICS_PORT=$((port + 1)) RATE_LIMIT=0 LOGIN_TIMEOUT_MS=600000 STORE_TIMEOUT_MS=600000 \
            MAX_CONNECTIONS=20000 LOG_LEVEL=warn "$binary" 2>>"$scratch/server-$mode.log" &
        pids+=($!)
        addrs+=(--addr "127.0.0.1:$port")
    done
    for i in $(seq 0 $((instances - 1))); do
        for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$((base + 2 * i))") 2>/dev/null && break; sleep 0.05; done
    done
    sleep 1
    declare -A msgs_before bytes_before cpu_before
    for i in $(seq 0 $((instances - 1))); do
        msgs_before[$i]="$(metric $((base + 2 * i + 1)) noomnim_peer_relay_messages_in_total)"
        bytes_before[$i]="$(metric $((base + 2 * i + 1)) noomnim_peer_relay_bytes_in_total)"
        cpu_before[$i]="$(cpu_ticks "${pids[$i]}")"
    done
    out="$(target/release/noomnim-load "${addrs[@]}" --clients "$clients" --groups "$groups" \
        --senders "$senders" --rate "$rate" --seconds "$seconds" --tag "r$mode$$" 2>&1)" || true
    stored="$(grep -o 'stored/s=[0-9]*' <<<"$out" | cut -d= -f2)"
    lost="$(grep -o 'lost=[0-9]*' <<<"$out" | cut -d= -f2)"
    errors="$(grep -o '^errors=.*' <<<"$out" | cut -d= -f2-)"
    echo "## PEER_RELAY=$mode: $instances instances, $groups groups, $clients clients, $senders senders, $rate msg/s for ${seconds}s (stored/s=${stored:-?}, lost=${lost:-?}, errors=${errors:-?})"
    resets=0
    for i in $(seq 0 $((instances - 1))); do
        reset="$(metric $((base + 2 * i + 1)) noomnim_peer_heartbeat_resets_total)"
        resets=$((resets + ${reset:-0}))
    done
    echo "(heartbeat resets over all instances: $resets)"
    echo "| instance | relayed messages in | relay bytes in | server CPU s |"
    echo "|---|---|---|---|"
    hz="$(getconf CLK_TCK)"
    for i in $(seq 0 $((instances - 1))); do
        msgs="$(metric $((base + 2 * i + 1)) noomnim_peer_relay_messages_in_total)"
        bytes="$(metric $((base + 2 * i + 1)) noomnim_peer_relay_bytes_in_total)"
        cpu="$(cpu_ticks "${pids[$i]}")"
        printf '| n%s | %s | %s | %.2f |\n' "$i" "$((msgs - msgs_before[$i]))" "$((bytes - bytes_before[$i]))" \
            "$(echo "($cpu - ${cpu_before[$i]}) / $hz" | bc -l)"
    done
    unset msgs_before bytes_before cpu_before
done
