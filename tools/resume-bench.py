#!/usr/bin/env python3
"""Gapless resume of a long absence (issue 23): stores N messages in a group, then a fresh
connection resumes with `enter_group {since_seq: 0}` and reads every `message_sent` until
the head. Prints the time from the request to the last line, and the server's peak memory
(VmHWM) and current memory (VmRSS) from /proc before and after the resume.

Usage: resume-bench.py HOST:PORT SERVER_PID [N]   (start the server with RATE_LIMIT=0)
"""

import json
import sys
import time

from wire import connect, fill, send


def memory(pid):
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields["VmHWM"], fields["VmRSS"]


def main():
    addr, pid = sys.argv[1], int(sys.argv[2])
    count = int(sys.argv[3]) if len(sys.argv) > 3 else 10000
    group = f"resume{int(time.time())}"
    writer = connect(addr)
    send(writer, "find_user", {"username": "writer"}, 1)
    writer[1].readline()
    send(writer, "create_group", {"group_name": group}, 2)
    writer[1].readline()
    fill(writer, group, count)
    before = memory(pid)
    reader = connect(addr)
    send(reader, "find_user", {"username": "reader"}, 1)
    reader[1].readline()
    send(reader, "join_group", {"group_name": group}, 2)
    reader[1].readline()
    started = time.perf_counter()
    send(reader, "enter_group", {"group_name": group, "since_seq": 0}, 3)
    header = json.loads(reader[1].readline())
    last = 0
    while last < count:
        line = json.loads(reader[1].readline())
        if line["event"] == "message_sent":
            assert line["data"]["seq"] == last + 1, line
            last = line["data"]["seq"]
    elapsed = time.perf_counter() - started
    after = memory(pid)
    print(f"resume of {count} messages: {elapsed * 1000:.0f} ms ({count / elapsed:.0f} msg/s), "
          f"truncated={header['data']['truncated']}; server VmHWM {before[0]} -> {after[0]}, "
          f"VmRSS {before[1]} -> {after[1]}")


if __name__ == "__main__":
    main()
