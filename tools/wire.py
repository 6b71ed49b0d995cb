"""The few lines of the wire protocol the benchmark scripts in tools/ share: connect, send a
request, and wait for its reply (lines without that id are passed over); and the percentile
they report latencies by."""

import json
import socket


def connect(addr):
    """A connection to HOST:PORT: (socket, a binary reader of its lines)."""
    host, port = addr.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)))
    return sock, sock.makefile("rb")


def send(conn, event, data, rid=None):
    line = {"event": event, "data": data}
    if rid is not None:
        line["id"] = rid
    conn[0].sendall((json.dumps(line) + "\n").encode())


def request(conn, event, data, rid=1):
    """Sends a request and returns its reply."""
    send(conn, event, data, rid)
    while True:
        line = json.loads(conn[1].readline())
        if line.get("id") == rid:
            return line


def fill(conn, group, count, size=100):
    """Stores `count` messages of about `size` bytes in `group`, pipelined, and waits for every
    reply (the connection must be logged in and a member)."""
    batch = b"".join(
        (json.dumps({"event": "send_message", "data": {"group_name": group, "text": f"message {i} " + "x" * size}}) + "\n").encode()
        for i in range(count)
    )
    conn[0].sendall(batch)
    for _ in range(count):
        conn[1].readline()


def percentile(values, share):
    """The value below which `share` of `values` lie (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * share))]
