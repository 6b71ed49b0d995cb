#!/usr/bin/env python3
"""Senders beside `noomnim backup` (issue 34 item 9): fills the embedded store to about SIZE_MB,
then sends RATE messages a second (one at a time per sender, paced) for a baseline phase with
no backup, then again while `noomnim backup` copies the store. Prints each phase's reply
latency (p50, p99, max) and messages per second, and how long the backup took.

Usage: backup-stall-bench.py HOST:PORT DATA_DIR [SIZE_MB] [RATE] [BASELINE_S]
  (start the server with RATE_LIMIT=0 and DATA_DIR of its own; NOOMNIM names the binary that
  runs the backup, default target/release/noomnim; SIZE_MB default 300, RATE 200/s,
  BASELINE_S 10)
"""

import os
import subprocess
import sys
import tempfile
import threading
import time

from wire import connect, fill, percentile, request

SENDERS = 4


def summary(name, latencies, seconds):
    return (f"{name}: p50 {percentile(latencies, 0.5):.1f} ms, p99 {percentile(latencies, 0.99):.1f} ms, "
            f"max {max(latencies):.1f} ms, {len(latencies) / seconds:.0f} msg/s over {seconds:.1f} s")


def paced_senders(addr, rate, keep_going):
    """SENDERS connections together send `rate` messages a second, each waiting for its reply
    before its next; runs while `keep_going()`; returns (latencies in ms, seconds)."""
    latencies = []
    lock = threading.Lock()
    interval = SENDERS / rate

    def one(index):
        conn = connect(addr)
        name = f"pacer{index}"
        request(conn, "find_user", {"username": name})
        group = f"paced-{name}"
        request(conn, "create_group", {"group_name": group})
        request(conn, "join_group", {"group_name": group})
        mine = []
        next_at = time.perf_counter()
        i = 0
        while keep_going():
            started = time.perf_counter()
            reply = request(conn, "send_message", {"group_name": group, "text": f"paced {i}"}, i + 10)
            mine.append((time.perf_counter() - started) * 1000)
            assert reply["event"] == "message_sent", reply
            i += 1
            # Paced from the schedule, not from the reply: a stalled send is followed at once
            # by the ones that fell due meanwhile, as from real users.
            next_at += interval
            pause = next_at - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
        conn[0].close()
        with lock:
            latencies.extend(mine)

    started = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(SENDERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, time.perf_counter() - started


def main():
    addr, data_dir = sys.argv[1], sys.argv[2]
    size_mb = int(sys.argv[3]) if len(sys.argv) > 3 else 300
    rate = float(sys.argv[4]) if len(sys.argv) > 4 else 200
    baseline_s = float(sys.argv[5]) if len(sys.argv) > 5 else 10
    binary = os.environ.get("NOOMNIM", "target/release/noomnim")
    database = os.path.join(data_dir, "noomnim.sqlite3")

    conn = connect(addr)
    request(conn, "find_user", {"username": "filler"})
    request(conn, "create_group", {"group_name": "filled"})
    while os.path.getsize(database) < size_mb << 20:
        fill(conn, "filled", 1000, size=1000)
    print(f"store: {os.path.getsize(database) >> 20} MB", flush=True)
    time.sleep(2)  # the checkpointer catches up before anything is measured

    deadline = time.perf_counter() + baseline_s
    baseline, seconds = paced_senders(addr, rate, lambda: time.perf_counter() < deadline)
    print(summary("without a backup", baseline, seconds), flush=True)

    target = os.path.join(tempfile.mkdtemp(prefix="noomnim-backup-bench-"), "copy.sqlite3")
    backup = subprocess.Popen([binary, "backup", target], env={**os.environ, "DATA_DIR": data_dir},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    began = time.perf_counter()
    during, seconds = paced_senders(addr, rate, lambda: backup.poll() is None)
    took = time.perf_counter() - began
    out = backup.stdout.read().decode().strip()
    print(summary("during the backup", during, seconds), flush=True)
    print(f"backup: exit {backup.returncode} in {took:.1f} s: {out}")
    os.remove(target)


if __name__ == "__main__":
    main()
