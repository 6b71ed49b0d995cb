#!/usr/bin/env bash
# Installs and starts the services the test suite needs, on loopback ports:
#   - mongoeco (a MongoDB wire-protocol server from PyPI, see docs/MONGODB-TEST-SERVER.md)
#   - redis-server (Debian package; installed by .ci/run, or `apt-get install redis-server`)
#   - a Redis Cluster of three masters from the same redis-server (sharded pub/sub, Redis 7+)
#
# Usage:
#   eval "$(bash tools/services.sh start)"   # starts both, prints the NOOMNIM_TEST_* exports
#   bash tools/services.sh stop              # stops what `start` started
#   bash tools/services.sh install           # only builds the mongoeco virtualenv
#
# Environment (optional): NOOMNIM_SERVICES_DIR (state, default /tmp/noomnim-services),
# NOOMNIM_MONGO_PORT (default 27117), NOOMNIM_REDIS_PORT (default 6479),
# NOOMNIM_CLUSTER_PORT (first of the cluster's three ports, default 7101).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STATE="${NOOMNIM_SERVICES_DIR:-/tmp/noomnim-services}"
MONGO_PORT="${NOOMNIM_MONGO_PORT:-27117}"
REDIS_PORT="${NOOMNIM_REDIS_PORT:-6479}"
CLUSTER_PORT="${NOOMNIM_CLUSTER_PORT:-7101}"
CLUSTER_PORTS="$CLUSTER_PORT $((CLUSTER_PORT + 1)) $((CLUSTER_PORT + 2))"
VENV="$STATE/venv"
MONGOECO_VERSION="4.11.0"
PYMONGO_VERSION="4.20.1"
PYJWT_VERSION="2.10.1"

log() { echo "services: $*" >&2; }

find_python313() {
    local candidate
    for candidate in python3.14 python3.13 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[3-9]*/bin/python3 \
        /usr/local/bin/python3.13 python3; do
        if "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 13))' >/dev/null 2>&1; then
            echo "$candidate"
            return
        fi
    done
    log "mongoeco needs Python >= 3.13 and none was found (tried python3.13, pyenv versions)"
    exit 1
}

install_mongoeco() {
    mkdir -p "$STATE"
    if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import mongoeco, pymongo, jwt" 2>/dev/null; then
        return
    fi
    log "creating $VENV with mongoeco==$MONGOECO_VERSION and PyJWT==$PYJWT_VERSION"
    [ -x "$VENV/bin/python" ] || "$(find_python313)" -m venv "$VENV"
    # PyJWT: tests mint tokens with an independent JWT implementation (tests/auth.rs).
    "$VENV/bin/pip" install --quiet --disable-pip-version-check \
        "mongoeco==$MONGOECO_VERSION" "pymongo==$PYMONGO_VERSION" "PyJWT==$PYJWT_VERSION" >&2
}

# wait_for_port PORT NAME: until something accepts on 127.0.0.1:PORT (20 s at most).
wait_for_port() {
    local port="$1" name="$2" attempt
    for attempt in $(seq 1 200); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return; fi
        sleep 0.1
    done
    log "$name did not start on port $port (see $STATE/$name.log)"
    exit 1
}

start_mongoeco() {
    install_mongoeco
    rm -f "$STATE/mongo.sqlite"*
    nohup "$VENV/bin/python" "$HERE/mongoeco_server.py" --port "$MONGO_PORT" \
        --db "$STATE/mongo.sqlite" >"$STATE/mongoeco.log" 2>&1 &
    echo $! >"$STATE/mongoeco.pid"
    wait_for_port "$MONGO_PORT" mongoeco
}

start_redis() {
    command -v redis-server >/dev/null || { log "redis-server not installed (apt-get install redis-server)"; exit 1; }
    nohup redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no \
        >"$STATE/redis.log" 2>&1 &
    echo $! >"$STATE/redis.pid"
    wait_for_port "$REDIS_PORT" redis
}

# Three masters, no replicas, slots split evenly; waits until the cluster says it is ok.
start_cluster() {
    local port nodes="" attempt
    for port in $CLUSTER_PORTS; do
        rm -rf "$STATE/cluster-$port"
        mkdir -p "$STATE/cluster-$port"
        # --dir keeps each node's nodes.conf apart; $! is then redis-server itself.
        nohup redis-server --bind 127.0.0.1 --port "$port" --dir "$STATE/cluster-$port" \
            --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 2000 \
            --save "" --appendonly no >"$STATE/cluster-$port.log" 2>&1 &
        echo $! >"$STATE/cluster-$port.pid"
        wait_for_port "$port" "cluster-$port"
        nodes="$nodes 127.0.0.1:$port"
    done
    # shellcheck disable=SC2086
    redis-cli --cluster create $nodes --cluster-replicas 0 --cluster-yes >"$STATE/cluster-create.log" 2>&1 \
        || { log "redis-cli --cluster create failed (see $STATE/cluster-create.log)"; exit 1; }
    for attempt in $(seq 1 100); do
        if redis-cli -p "$CLUSTER_PORT" cluster info 2>/dev/null | grep -q "cluster_state:ok"; then return; fi
        sleep 0.1
    done
    log "the Redis Cluster did not become ok"
    exit 1
}

stop_services() {
    local name port
    for port in $CLUSTER_PORTS; do
        if [ -f "$STATE/cluster-$port.pid" ]; then
            kill "$(cat "$STATE/cluster-$port.pid")" 2>/dev/null || true
            rm -f "$STATE/cluster-$port.pid"
        fi
    done
    for name in mongoeco redis; do
        if [ -f "$STATE/$name.pid" ]; then
            kill "$(cat "$STATE/$name.pid")" 2>/dev/null || true
            rm -f "$STATE/$name.pid"
        fi
    done
}

case "${1:-start}" in
    install) install_mongoeco ;;
    start)
        mkdir -p "$STATE"
        stop_services
        start_mongoeco
        start_redis
        start_cluster
        log "mongoeco on 127.0.0.1:$MONGO_PORT, redis on 127.0.0.1:$REDIS_PORT, Redis Cluster on $CLUSTER_PORTS"
        echo "export NOOMNIM_TEST_MONGODB_URI='mongodb://127.0.0.1:$MONGO_PORT/?directConnection=true'"
        echo "export NOOMNIM_TEST_REDIS_URL='redis://127.0.0.1:$REDIS_PORT/'"
        echo "export NOOMNIM_TEST_REDIS_CLUSTER_URL='redis+cluster://$(echo $CLUSTER_PORTS | sed 's/\([0-9]*\)/127.0.0.1:\1/g; s/ /,/g')'"
        echo "export NOOMNIM_TEST_REDIS_CLUSTER_PORTS='$CLUSTER_PORTS'"
        echo "export NOOMNIM_TEST_MONGOECO='$VENV/bin/python $HERE/mongoeco_server.py'"
        echo "export NOOMNIM_TEST_PYTHON='$VENV/bin/python'"
        ;;
    stop) stop_services ;;
    *) log "usage: $0 start|stop|install"; exit 2 ;;
esac
