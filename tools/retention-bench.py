#!/usr/bin/env python3
"""`send_message` latency while retention prunes a large group (issue 24 item 5).

Steps (embedded store): start the server once to create the schema; stop it; fill group
`big` with N messages straight into the SQLite file (fast and identical for every run); start
the server again with the retention settings given in RETENTION (e.g.
"RETENTION_MAX_MESSAGES=1 RETENTION_INTERVAL_MS=1000", or "" for none); then one client sends
to another group at RATE msg/s for SECONDS, one request at a time, timing each ack. Prints
p50/p99/max of the ack latency and how many messages of `big` are left.

Usage: retention-bench.py BINARY N RATE SECONDS "RETENTION settings"
"""

import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time

from wire import connect, request


def start(binary, data_dir, extra):
    env = {"PATH": os.environ.get("PATH", ""), "DATA_DIR": data_dir, "PORT": "0",
           "RATE_LIMIT": "0", "LOG_LEVEL": "info"}
    for item in extra.split():
        key, _, value = item.partition("=")
        env[key] = value
    server = subprocess.Popen([binary], env=env, stderr=subprocess.PIPE, text=True)
    for line in server.stderr:
        if "listening on" in line:
            port = int(line.split("listening on ")[1].split()[0].rsplit(":", 1)[1].rstrip(","))
            return server, port
    raise SystemExit("server did not start")


def stop(server):
    server.send_signal(signal.SIGTERM)
    server.wait(timeout=30)


def fill(data_dir, count):
    db = sqlite3.connect(os.path.join(data_dir, "noomnim.sqlite3"))
    db.execute("INSERT OR IGNORE INTO users (username, id) VALUES ('filler', 'f')")
    db.execute("INSERT INTO groups (group_name, id, last_seq, creator) VALUES ('big', 'b', ?, 'filler')", (count,))
    db.execute("INSERT INTO members (group_name, username, last_read, last_read_seq, role) VALUES ('big', 'filler', '', 0, 'owner')")
    stamp = "2026-01-01T00:00:00.000Z"
    rows = ((f"{seq:024x}", "big", "filler", f"old message number {seq} " + "x" * 60, stamp, seq) for seq in range(1, count + 1))
    db.executemany("INSERT INTO messages (id, group_name, username, text, timestamp, seq) VALUES (?, ?, ?, ?, ?, ?)", rows)
    db.commit()
    db.close()


def main():
    binary, count, rate, seconds, retention = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
    data_dir = tempfile.mkdtemp(prefix="retention-bench-")
    server, _ = start(binary, data_dir, "")
    stop(server)
    fill(data_dir, count)
    server, port = start(binary, data_dir, retention)
    conn = connect(f"127.0.0.1:{port}")
    request(conn, "find_user", {"username": "sender"}, "login")
    request(conn, "create_group", {"group_name": "live"}, "create")
    latencies = []
    interval = 1.0 / rate
    started = time.monotonic()
    next_at = started
    i = 0
    while time.monotonic() - started < seconds:
        now = time.monotonic()
        if now < next_at:
            time.sleep(next_at - now)
        next_at += interval
        t0 = time.perf_counter()
        reply = request(conn, "send_message", {"group_name": "live", "text": f"live {i}"}, i)
        latencies.append((time.perf_counter() - t0) * 1000)
        assert reply["event"] == "message_sent", reply
        i += 1
    left = request(conn, "fetch_messages", {"group_name": "big", "after_seq": 0, "limit": 1}, "left")
    stop(server)
    db = sqlite3.connect(os.path.join(data_dir, "noomnim.sqlite3"))
    remaining = db.execute("SELECT COUNT(*) FROM messages WHERE group_name = 'big'").fetchone()[0]
    db.close()
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]
    print(f"retention={retention or 'off'} sends={len(latencies)} p50_ms={pick(0.5):.2f} "
          f"p99_ms={pick(0.99):.2f} max_ms={latencies[-1]:.2f} big_left={remaining} "
          f"first_seq={left['data'].get('first_seq', 1)}")
    subprocess.run(["rm", "-rf", data_dir])


if __name__ == "__main__":
    main()
