#!/usr/bin/env python3
"""Idle rooms against one busy user, in peer mode (issue 22 item 2).

Opens N idle connections, each logged in as its own user and alone in its own group's room,
then measures one normal user's send_message acks (p50/p99/max over COUNT sends, one at a time)
and how many catch-up reads the server made meanwhile (from /metrics).

Usage: idle-rooms-bench.py HOST:PORT METRICS_HOST:PORT IDLE_ROOMS [COUNT]
Start the server first (PEER=true, MONGODB_URI, REDIS_URL, METRICS_PORT), e.g. with
tools/idle-rooms-bench.sh, which runs N=0 and N=500 against a binary.
"""

import sys
import time
import urllib.request

from wire import connect, request


def metric(addr, name):
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as page:
        for line in page.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


def main():
    addr, metrics_addr, idle = sys.argv[1], sys.argv[2], int(sys.argv[3])
    count = int(sys.argv[4]) if len(sys.argv) > 4 else 200
    tag = str(int(time.time()))
    idle_conns = []
    for i in range(idle):
        conn = connect(addr)
        user, group = f"idle{tag}u{i}", f"idle{tag}g{i}"
        request(conn, "find_user", {"username": user})
        request(conn, "create_group", {"group_name": group})
        request(conn, "enter_group", {"group_name": group})
        idle_conns.append(conn)
    busy = connect(addr)
    request(busy, "find_user", {"username": f"busy{tag}"})
    request(busy, "create_group", {"group_name": f"busy{tag}"})
    time.sleep(3)  # let the rooms' first catch-up reads settle
    reads_before = metric(metrics_addr, "noomnim_peer_catch_ups_total")
    started = time.time()
    latencies = []
    for i in range(count):
        t = time.perf_counter()
        ack = request(busy, "send_message", {"group_name": f"busy{tag}", "text": f"m{i}"}, i + 10)
        latencies.append((time.perf_counter() - t) * 1000)
        assert ack["event"] == "message_sent", ack
    elapsed = time.time() - started
    reads = metric(metrics_addr, "noomnim_peer_catch_ups_total") - reads_before
    latencies.sort()
    p = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]
    print(f"idle_rooms={idle} sends={count} ack_ms p50={p(0.5):.1f} p99={p(0.99):.1f} "
          f"max={latencies[-1]:.1f} catch_up_reads={reads:.0f} ({reads / elapsed:.1f}/s)")


if __name__ == "__main__":
    main()
