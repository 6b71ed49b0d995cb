#!/usr/bin/env python3
"""A resume storm beside ordinary senders (issue 33 item 5): R readers resume a B-message backlog
at once (`enter_group {since_seq: 0}`), reading as fast as they can, while S other users each
send messages one at a time to a group of their own (wait for the reply, send the next). Prints
the senders' reply latency (p50, p99, max) during the storm, and the same without a storm
first (the baseline), so the two can be compared in one run against one server.

Usage: resume-storm-bench.py HOST:PORT [READERS] [BACKLOG] [SENDS]
  (start the server with RATE_LIMIT=0 and a DATA_DIR of its own; READERS default 200,
  BACKLOG 10000, SENDS per phase and sender 200; ulimit -n must allow READERS + 20)
"""

import selectors
import sys
import threading
import time

from wire import connect, fill, percentile, request, send

SENDERS = 5


def senders_phase(addr, tag, sends):
    """Each sender sends `sends` messages one at a time; returns every reply latency (ms)."""
    latencies = []
    lock = threading.Lock()

    def one(index):
        conn = connect(addr)
        name = f"sender{index}"
        request(conn, "find_user", {"username": name})
        group = f"{tag}-{name}"
        request(conn, "create_group", {"group_name": group})
        mine = []
        for i in range(sends):
            started = time.perf_counter()
            reply = request(conn, "send_message", {"group_name": group, "text": f"m{i}"}, i + 10)
            mine.append((time.perf_counter() - started) * 1000)
            assert reply["event"] == "message_sent", reply
        conn[0].close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(SENDERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies


def summary(latencies):
    return (f"p50 {percentile(latencies, 0.5):.1f} ms, p99 {percentile(latencies, 0.99):.1f} ms, "
            f"max {max(latencies):.1f} ms over {len(latencies)} sends")


def main():
    addr = sys.argv[1]
    readers = int(sys.argv[2]) if len(sys.argv) > 2 else 200
    backlog = int(sys.argv[3]) if len(sys.argv) > 3 else 10000
    sends = int(sys.argv[4]) if len(sys.argv) > 4 else 200
    tag = f"storm{int(time.time())}"
    group = f"{tag}-backlog"
    writer = connect(addr)
    request(writer, "find_user", {"username": "writer"})
    request(writer, "create_group", {"group_name": group})
    fill(writer, group, backlog)
    conns = []
    for i in range(readers):
        conn = connect(addr)
        request(conn, "find_user", {"username": f"reader{i}"})
        request(conn, "join_group", {"group_name": group})
        conns.append(conn)

    baseline = senders_phase(addr, f"{tag}-quiet", sends)
    print(f"without a storm: {summary(baseline)}")

    # The storm: every reader asks at once, then reads (and discards) as fast as it can until
    # it has seen the head's seq.
    selector = selectors.DefaultSelector()
    head = f'"seq":{backlog}}}'.encode()
    for conn in conns:
        conn[0].setblocking(False)
        selector.register(conn[0], selectors.EVENT_READ, bytearray())
    for conn in conns:
        conn[0].setblocking(True)
        send(conn, "enter_group", {"group_name": group, "since_seq": 0}, 3)
        conn[0].setblocking(False)
    done = threading.Event()
    finished = [0]

    def drain():
        open_readers = len(conns)
        while open_readers and not done.is_set():
            for key, _ in selector.select(timeout=0.5):
                tail = key.data
                try:
                    chunk = key.fileobj.recv(1 << 20)
                except BlockingIOError:
                    continue
                tail.extend(chunk)
                if head in tail:
                    selector.unregister(key.fileobj)
                    open_readers -= 1
                    finished[0] += 1
                del tail[:-64]

    reader = threading.Thread(target=drain)
    started = time.perf_counter()
    reader.start()
    storm = senders_phase(addr, f"{tag}-storm", sends)
    during = time.perf_counter() - started
    print(f"during a storm of {readers} resumes of {backlog} messages: {summary(storm)} "
          f"({finished[0]} of {readers} resumes finished within the {during:.1f} s of sends)")
    reader.join()
    total = time.perf_counter() - started
    print(f"all {readers} resumes finished after {total:.1f} s")


if __name__ == "__main__":
    main()
