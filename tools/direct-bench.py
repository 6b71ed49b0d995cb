#!/usr/bin/env python3
"""Issue 37's benchmark of direct conversations: `open_direct` for PAIRS pairs of users, and
`my_groups` of one user who is in DMS direct conversations and GROUPS groups, against a
running server. Prints p50/p99 latency per call (one connection, one request at a time).

    python3 tools/direct-bench.py HOST:PORT [PAIRS] [DMS] [GROUPS] [MY_GROUPS_CALLS]
"""

import json
import socket
import sys
import time
import uuid


class Conn:
    def __init__(self, addr, user):
        host, port = addr.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)))
        self.file = self.sock.makefile("rw", buffering=1 << 16)
        self.next = 0
        assert self.call("find_user", {"username": user})["event"] in ("user_created", "user_found")

    def call(self, event, data):
        self.next += 1
        self.file.write(json.dumps({"event": event, "data": data, "id": self.next}) + "\n")
        self.file.flush()
        while True:
            line = json.loads(self.file.readline())
            if line.get("id") == self.next:
                return line


def pct(samples, p):
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))] * 1000


def main():
    addr = sys.argv[1]
    pairs = int(sys.argv[2]) if len(sys.argv) > 2 else 10000
    dms = int(sys.argv[3]) if len(sys.argv) > 3 else 1000
    groups = int(sys.argv[4]) if len(sys.argv) > 4 else 100
    calls = int(sys.argv[5]) if len(sys.argv) > 5 else 50
    tag = uuid.uuid4().hex[:6]
    side = max(1, int(pairs ** 0.5))
    left = [f"{tag}-l{i}" for i in range(side)]
    right = [f"{tag}-r{j}" for j in range(side)]
    for name in right:
        Conn(addr, name).sock.close()
    took = []
    for name in left:
        conn = Conn(addr, name)
        for other in right:
            start = time.perf_counter()
            reply = conn.call("open_direct", {"username": other})
            took.append(time.perf_counter() - start)
            assert reply["event"] == "direct_opened", reply
        conn.sock.close()
    print(f"open_direct pairs={len(took)} p50_ms={pct(took, 0.5):.2f} p99_ms={pct(took, 0.99):.2f}")
    hub = Conn(addr, f"{tag}-hub")
    for i in range(groups):
        assert hub.call("create_group", {"group_name": f"{tag}-g{i}"})["event"] == "group_created"
    peers = [f"{tag}-p{i}" for i in range(dms)]
    for name in peers:
        Conn(addr, name).sock.close()
        assert hub.call("open_direct", {"username": name})["event"] == "direct_opened"
    hub.call("hello", {"protocol": 3})
    took = []
    for _ in range(calls):
        start = time.perf_counter()
        rows, after = 0, None
        while True:
            data = {"limit": 1000} if after is None else {"limit": 1000, "after": after}
            page = hub.call("my_groups", data)["data"]
            rows += len(page["groups"])
            if not page["has_more"]:
                break
            after = page["next_after"]
        took.append(time.perf_counter() - start)
        assert rows == dms + groups, rows
    print(f"my_groups rows={dms + groups} calls={calls} p50_ms={pct(took, 0.5):.2f} p99_ms={pct(took, 0.99):.2f}")


if __name__ == "__main__":
    main()
