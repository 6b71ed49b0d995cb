#!/usr/bin/env bash
# Runs one benchmark scenario against a fresh server and prints the load generator's report.
#
# Usage: tools/bench.sh STORE SCENARIO [extra noomnim-load flags]
#   STORE:    embedded | mongo | noop   (noop needs: cargo build --release --features bench-noop
#             --target-dir target/noop; mongo needs NOOMNIM_TEST_MONGODB_URI, see tools/services.sh)
#   SCENARIO: a (1000 clients, 10 groups, 50 senders) | b (one group of 1000) |
#             c (10000 idle logged-in connections) | d (enter_group on 100000 messages) |
#             e (peer mode, 3 instances; mongo only, needs NOOMNIM_TEST_REDIS_URL)
# Environment: SECONDS_PER_RUN (default 10), RATE (fixed total send rate; default full speed),
# SERVER_ENV (extra server settings, e.g. "EMBEDDED_SYNC=normal WORKERS=2"),
# NOOMNIM_BINARY (another server build, e.g. an older commit's, for before/after runs),
# LOAD_BINARY (another noomnim-load build, to compare generators against one server),
# TLS=1 (clients speak TLS to TLS_PORT; a CA and certificate are made for the run),
# AUTH=1 (the server has AUTH_SECRET; clients log in with tokens).
set -euo pipefail
cd "$(dirname "$0")/.."
store="${1:?store}"; scenario="${2:?scenario}"; shift 2
seconds="${SECONDS_PER_RUN:-10}"
binary="${NOOMNIM_BINARY:-target/release/noomnim}"
[ "$store" = noop ] && binary="${NOOMNIM_BINARY:-target/noop/release/noomnim}"
[ -x "$binary" ] || { echo "bench: build $binary first" >&2; exit 1; }
load_binary="${LOAD_BINARY:-target/release/noomnim-load}"
[ -x "$load_binary" ] || cargo build --release --bin noomnim-load

scratch="$(mktemp -d)"
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$scratch"; }
trap cleanup EXIT

store_env=()
case "$store" in
    embedded) store_env=(DATA_DIR="$scratch/data") ;;
    noop) store_env=(BENCH_STORE=noop) ;;
    mongo) store_env=(MONGODB_URI="${NOOMNIM_TEST_MONGODB_URI:?start tools/services.sh}" MONGODB_DB="bench_$$_$RANDOM") ;;
    *) echo "bench: unknown store $store" >&2; exit 2 ;;
esac

security_env=()
load_security=()
if [ -n "${TLS:-}" ]; then
    ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
    openssl req -x509 "${ec[@]}" -keyout "$scratch/ca.key" -out "$scratch/ca.pem" -days 1 -subj /CN=bench-ca 2>/dev/null
    openssl req "${ec[@]}" -keyout "$scratch/key.pem" -out "$scratch/req.csr" -subj /CN=localhost 2>/dev/null
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n' >"$scratch/ext"
    openssl x509 -req -in "$scratch/req.csr" -CA "$scratch/ca.pem" -CAkey "$scratch/ca.key" -CAcreateserial \
        -out "$scratch/cert.pem" -days 1 -extfile "$scratch/ext" 2>/dev/null
    security_env+=(TLS_CERT="$scratch/cert.pem" TLS_KEY="$scratch/key.pem")
    load_security+=(--tls "$scratch/ca.pem")
fi
if [ -n "${AUTH:-}" ]; then
    secret="bench-secret-$RANDOM-$RANDOM-$RANDOM-0123456789"
    security_env+=(AUTH_SECRET="$secret")
    load_security+=(--token-secret "$secret")
fi

# start_server PORT [more env]: starts an instance, records its pid (clients go to PORT, or to
# PORT+1 over TLS).
start_server() {
    local port="$1"; shift
    local tls_env=()
    [ -n "${TLS:-}" ] && tls_env=(TLS_PORT=$((port + 1)))
    # shellcheck disable=SC2086
    env "${store_env[@]}" "${security_env[@]}" "${tls_env[@]}" PORT="$port" RATE_LIMIT=0 MAX_CONNECTIONS=20000 LOGIN_TIMEOUT_MS=600000 STORE_TIMEOUT_MS=600000 LOG_LEVEL=warn ${SERVER_ENV:-} "$@" \
        "$binary" 2>>"$scratch/server.log" &
    pids+=($!)
    for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return; sleep 0.05; done
    echo "bench: server on $port did not start" >&2; cat "$scratch/server.log" >&2; exit 1
}

base_port=$((10000 + RANDOM % 15000))
client_offset=0
[ -n "${TLS:-}" ] && client_offset=1
load=("$load_binary" --tag "b$$" --seconds "$seconds" "${load_security[@]}")
[ -n "${RATE:-}" ] && load+=(--rate "$RATE")
case "$scenario" in
    a|b|c|d) start_server "$base_port"; load+=(--addr "127.0.0.1:$((base_port + client_offset))" --server-pid "${pids[0]}") ;;
    e)
        [ "$store" = mongo ] || { echo "bench: scenario e needs the mongo store" >&2; exit 2; }
        for i in 0 1 2; do
            start_server $((base_port + 2 * i)) PEER=true REDIS_URL="${NOOMNIM_TEST_REDIS_URL:?}" NODE_ID="n$i"
            load+=(--addr "127.0.0.1:$((base_port + 2 * i + client_offset))" --server-pid "${pids[$i]}")
        done
        sleep 1 ;;
esac
case "$scenario" in
    a) load+=(--clients 1000 --groups 10 --senders 50) ;;
    b) load+=(--clients 1000 --groups 1 --senders 10) ;;
    c) load+=(--clients 10000 --groups 100 --idle) ;;
    d) load+=(--clients 2 --groups 1 --history 100000) ;;
    e) load+=(--clients 300 --groups 3 --senders 15) ;;
esac
echo "# $store/$scenario: ${load[*]} $*"
"${load[@]}" "$@"
