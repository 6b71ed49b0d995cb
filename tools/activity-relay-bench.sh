#!/usr/bin/env bash
# Relay bytes an instance receives for a group whose members it hosts but whose room it does
# not (issue 23: activity notices, not the message stream), against an instance hosting a
# reader in the room. Two peers (PEER_RELAY=per_group) on the test MongoDB and Redis
# (eval "$(bash tools/services.sh start)"); a sender on A sends COUNT messages at RATE/s; the
# figure is B's noomnim_peer_relay_bytes_in_total over the run.
set -euo pipefail
cd "$(dirname "$0")/.."
binary="${NOOMNIM_BINARY:-target/release/noomnim}"
count="${COUNT:-300}"; rate="${RATE:-100}"
db="relaybench_$$_$RANDOM"
start() {
    MONGODB_URI="${NOOMNIM_TEST_MONGODB_URI:?start tools/services.sh}" MONGODB_DB="$db" \
        REDIS_URL="${NOOMNIM_TEST_REDIS_URL:?}" PEER=true PEER_RELAY=per_group PORT="$1" \
        METRICS_PORT="$2" NODE_ID="$3" RATE_LIMIT=0 "$binary" 2>/dev/null &
    pids+=($!)
}
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
base=$((20000 + RANDOM % 20000))
start "$base" $((base + 1)) bench_a
start $((base + 2)) $((base + 3)) bench_b
sleep 2
for mode in member reader; do
    python3 - "$base" $((base + 2)) $((base + 3)) "$mode" "$count" "$rate" <<'PY'
import json, socket, sys, time, urllib.request
a, b, bm, mode, count, rate = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), float(sys.argv[6])
def conn(port):
    s = socket.create_connection(("127.0.0.1", port)); return s, s.makefile("rb")
def req(c, ev, data, rid=1):
    c[0].sendall((json.dumps({"event": ev, "data": data, "id": rid}) + "\n").encode())
    while True:
        line = json.loads(c[1].readline())
        if line.get("id") == rid: return line
def relay_bytes():
    page = urllib.request.urlopen(f"http://127.0.0.1:{bm}/metrics", timeout=5).read().decode()
    return int(next(l.split()[1] for l in page.splitlines() if l.startswith("noomnim_peer_relay_bytes_in_total ")))
group = f"g{mode}{int(time.time())}"
sender = conn(a); req(sender, "find_user", {"username": "sender"}); req(sender, "create_group", {"group_name": group})
member = conn(b); req(member, "hello", {"protocol": 3}); req(member, "find_user", {"username": f"m{mode}"})
req(member, "join_group", {"group_name": group})
if mode == "reader": req(member, "enter_group", {"group_name": group})
time.sleep(1.5)
before = relay_bytes()
for i in range(count):
    req(sender, "send_message", {"group_name": group, "text": f"message {i} " + "x" * 100}, i + 10)
    time.sleep(1 / rate)
time.sleep(2.5)
after = relay_bytes()
print(f"{mode:>6} on B: {count} messages at {rate:.0f}/s -> relay bytes in {after - before} "
      f"({(after - before) / count:.1f} per message)")
PY
done
