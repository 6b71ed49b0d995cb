"""Noomnim Chat client: Python 3.8+, standard library only (asyncio).

A client that survives its connection: every message gets a `client_msg_id` and stays in an
outbox until its `message_sent` arrives; after a reconnect it logs in again, re-enters its room
with `since_seq` (protocol 3's gapless resume: the server streams every message after the last
one shown, exactly once, in order, then live) and resends the outbox (a repeat is answered with
the original message and `"duplicate": true`, so nothing is stored twice). Messages are shown
once each, in `seq` order. Against a server without protocol 3 it pages history and holds
early broadcasts instead. It also keeps `groups`, a sidebar of the user's groups with their
unread counts, current from `group_activity` and `read_marker`. See docs/PROTOCOL.md ("Resume
after a disconnect without loss or duplication", "Protocol 3").

As a library:
    client = Client("127.0.0.1", 7777, "alice", on_message=print)
    await client.connect()
    await client.join_and_enter("lobby")
    await client.send("lobby", "hello")

Every other line the server sends on its own (presence, typing, edits, deletes, removals) goes
to `on_event` with the whole line.

As a program, `scenario` runs the cut-off test CI runs (exit status 0 when nothing was lost,
duplicated or reordered):
    python -m noomnim_client scenario --port 7777 --messages 300 --cutoffs 12
"""

import argparse
import asyncio
import json
import sys
import uuid
from typing import Any, Callable, Dict, List, Optional

Message = Dict[str, Any]
Line = Dict[str, Any]

__version__ = "0.4.0"

RETRYABLE = {"unavailable", "rate_limited"}
# Longest line accepted from the server: above its `max_reply_bytes` (1 MiB by default; a
# history reply can be that long, and asyncio's default limit of 64 KiB would choke on it).
MAX_LINE = 8 * 1024 * 1024


class ChatError(Exception):
    """A request the server refused: `code` is the stable machine code."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(f"{code}: {text}")
        self.code = code


class Client:
    def __init__(
        self,
        host: str,
        port: int,
        username: str,
        on_message: Optional[Callable[[Message], None]] = None,
        on_event: Optional[Callable[[Line], None]] = None,
        token: Optional[str] = None,
    ) -> None:
        self.host, self.port, self.username = host, port, username
        self.token = token  # a JWT for servers with AUTH_SECRET
        self.on_message = on_message
        self.on_event = on_event
        self.on_broadcast = None  # sees every broadcast as received, before de-duplication
        self.room = None  # the group whose room we are in (re-entered after a reconnect)
        self.last_seq = {}  # group -> highest seq shown
        self.epoch = {}  # group -> epoch the seqs above belong to
        self.outbox = {}  # client_msg_id -> (group, text, mentions, reply_to), until acknowledged
        self.acks = {}  # client_msg_id -> future of the ack's data
        self.duplicates = 0  # acks that said `duplicate` (retries of stored messages)
        self.hello = None
        self._pending = {}  # request id -> future of the reply line
        self._ids = 0
        self._catching_up = None  # broadcasts held while history is paged (protocol 2)
        self._backlog = None  # (group, head_seq, future) while a resume streams its backlog
        self.protocol = 2
        self.gaps = 0  # broadcasts that were not exactly the next seq (must stay 0)
        self._early = {}  # group -> {seq: message}: own acks ahead of the room's stream
        self.groups = {}  # group -> {"last_seq", "unread_count"}: the sidebar (protocol 3)
        self._writer = None
        self._reader_task = None
        self._abandoned = []  # transports left open on purpose (see `cut_off`)
        self._closed = True
        # Set when the server closed with `closing {code: account_erased}`: connect() refuses
        # from then on, since logging in again would register the erased name anew.
        self.ended_for_good = None

    # -- connection -------------------------------------------------------------------------
    async def connect(self) -> None:
        """(Re)connects: hello, log in, re-enter the room and catch up, resend the outbox.
        Raises ChatError `account_erased` once the account was erased."""
        if self.ended_for_good is not None:
            raise self.ended_for_good
        reader, self._writer = await asyncio.open_connection(self.host, self.port, limit=MAX_LINE)
        self._closed = False
        self._reader_task = asyncio.ensure_future(self._read_loop(reader))
        self.hello = (await self.request("hello"))["data"]
        if 3 in self.hello.get("protocols", []):
            self.hello = (await self.request("hello", {"protocol": 3}))["data"]
        self.protocol = self.hello.get("protocol", 2)
        login: Dict[str, Any] = {"username": self.username}
        if self.token is not None:
            login["token"] = self.token
        await self.request("find_user", login)
        if self.room is not None:
            await self.enter(self.room)
        for client_msg_id, (group, text, mentions, reply_to) in list(self.outbox.items()):
            self._write_send(client_msg_id, group, text, mentions, reply_to)

    def cut_off(self, clean):
        """Drops the connection as a crash or a network fault would: `clean` closes the socket;
        otherwise it is abandoned (left open, never read again, like a dead NAT mapping)."""
        if self._reader_task is not None:
            self._reader_task.cancel()
        if clean:
            self._writer.close()
        else:
            self._abandoned.append(self._writer)
        self._closed = True
        self._fail_pending(ConnectionError("cut off"))

    async def _read_loop(self, reader):
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                self._on_line(json.loads(line))
        except (ConnectionError, ValueError, asyncio.IncompleteReadError):
            pass  # closed, reset, or a line longer than MAX_LINE: the connection is unusable
        self._closed = True
        self._fail_pending(ConnectionError("connection closed"))

    def _fail_pending(self, error):
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(error)

    def _on_line(self, line):
        request_id = line.get("id")
        if isinstance(request_id, str) and request_id.startswith("send:"):
            self._on_ack(request_id[5:], line)
        elif request_id is not None and request_id in self._pending:
            future = self._pending.pop(request_id)
            if not future.done():
                future.set_result(line)
        elif line.get("event") == "message_sent":
            if self.on_broadcast is not None:
                self.on_broadcast(line["data"])
            if self._catching_up is not None:
                self._catching_up.append(line["data"])
            else:
                self._show(line["data"], broadcast=True)
        elif line.get("event") in ("group_activity", "read_marker"):
            data = line["data"]
            entry = self.groups.setdefault(data["group_name"], {})
            if "last_seq" in data:
                entry["last_seq"] = data["last_seq"]
            entry["unread_count"] = data["unread_count"]
            if self.on_event is not None:
                self.on_event(line)
        else:
            data = line.get("data") or {}
            if line.get("event") == "closing" and data.get("code") == "account_erased":
                self.ended_for_good = ChatError("account_erased", data.get("Error", ""))
            if self.on_event is not None:
                self.on_event(line)

    # -- requests ---------------------------------------------------------------------------
    async def request(self, event: str, data: Optional[Dict[str, Any]] = None) -> Line:
        """Sends one request and returns its reply line; raises ChatError on a failure."""
        if self._closed:
            raise ConnectionError("not connected")
        self._ids += 1
        future = asyncio.get_running_loop().create_future()
        self._pending[self._ids] = future
        self._write({"event": event, "data": data or {}, "id": self._ids})
        reply = await future
        data = reply.get("data")
        if isinstance(data, dict) and "code" in data:
            raise ChatError(data["code"], data.get("Error", ""))
        return reply

    def _write(self, request):
        self._writer.write(json.dumps(request).encode() + b"\n")

    async def join_and_enter(self, group: str) -> None:
        try:
            await self.request("join_group", {"group_name": group})
        except ChatError as error:
            if error.code != "group_not_found":
                raise
            await self.request("create_group", {"group_name": group})
        await self.enter(group)

    async def enter(self, group: str) -> None:
        """Enters the room and catches up after the last seq shown; returns once the backlog
        has been shown."""
        if self.protocol >= 3:
            await self._resume(group)
            return
        await self._page_in(group)

    async def _resume(self, group):
        """Protocol 3: the server streams the backlog after `since_seq`, then live."""
        data = {"group_name": group, "since_seq": self.last_seq.get(group, 0)}
        if group in self.epoch:
            data["since_epoch"] = self.epoch[group]
        done = asyncio.get_running_loop().create_future()
        reply = (await self.request("enter_group", data))["data"]
        self.room = group
        if reply.get("epoch_changed"):
            self.last_seq[group] = reply["first_seq"] - 1  # the numbering restarted
        elif reply.get("truncated"):
            self.last_seq[group] = reply["first_seq"] - 1  # older ones: fetch_messages
        self.epoch[group] = reply["epoch"]
        if self.last_seq.get(group, 0) >= reply["head_seq"]:
            return
        self._backlog = (group, reply["head_seq"], done)
        await done

    async def _page_in(self, group):
        """Protocol 2: enters the room, then pages everything after the last seq shown
        (broadcasts that arrive meanwhile are held, then shown if still new)."""
        self._catching_up = []
        try:
            reply = (await self.request("enter_group", {"group_name": group}))["data"]
            self.room = group
            if self.epoch.get(group) not in (None, reply["epoch"]):
                self.last_seq[group] = 0  # the numbering restarted: old seqs mean nothing
            self.epoch[group] = reply["epoch"]
            while True:
                after = self.last_seq.get(group, 0)
                page = await self.request(
                    "fetch_messages", {"group_name": group, "after_seq": after, "limit": 100}
                )
                for message in page["data"]["messages"]:
                    self._show(message)
                if not page["data"]["has_more"]:
                    break
        finally:
            held, self._catching_up = self._catching_up, None
        for message in held:
            self._show(message)

    def send_nowait(
        self,
        group: str,
        text: str,
        mentions: Optional[List[str]] = None,
        reply_to: Optional[int] = None,
    ) -> "asyncio.Future[Message]":
        """Queues a message; returns a future of its stored form (kept across reconnects).
        `mentions` names members to notify (`"@room"`: all of them; owner and admins only);
        `reply_to` the seq of the message it answers (it joins that message's thread)."""
        client_msg_id = str(uuid.uuid4())
        self.outbox[client_msg_id] = (group, text, list(mentions or []), reply_to)
        self.acks[client_msg_id] = asyncio.get_running_loop().create_future()
        self._write_send(client_msg_id, *self.outbox[client_msg_id])
        return self.acks[client_msg_id]

    async def send(
        self,
        group: str,
        text: str,
        mentions: Optional[List[str]] = None,
        reply_to: Optional[int] = None,
    ) -> Message:
        return await self.send_nowait(group, text, mentions, reply_to)

    async def thread(
        self, group: str, seq: int, after_seq: int = 0, limit: int = 100
    ) -> Dict[str, Any]:
        """A page of one thread: its root (with `reply_count`, `last_reply_seq`) and its
        replies in seq order after `after_seq`: `{"messages": [...], "has_more": bool}`."""
        data = {"group_name": group, "thread": seq, "after_seq": after_seq, "limit": limit}
        return (await self.request("fetch_messages", data))["data"]

    async def open_direct(self, username: str) -> str:
        """The direct conversation with `username` (created on first use): its group name, to
        send to, enter and read like a group's."""
        return (await self.request("open_direct", {"username": username}))["data"]["group_name"]

    async def block(self, username: str) -> List[str]:
        """Blocks a user (no direct messages from them); returns everyone you block."""
        return (await self.request("block_user", {"username": username}))["data"]["users"]

    async def unblock(self, username: str) -> List[str]:
        return (await self.request("unblock_user", {"username": username}))["data"]["users"]

    async def blocked(self) -> List[str]:
        return (await self.request("list_blocked", {}))["data"]["users"]

    async def set_notify(self, group: str, level: str) -> None:
        """Your notification level in a conversation: "all", "mentions" or "none"."""
        await self.request("set_notify", {"group_name": group, "level": level})

    async def edit(self, group: str, seq: int, text: str) -> Message:
        """Replaces the text of one of your messages (`message_edited`)."""
        data = {"group_name": group, "seq": seq, "text": text}
        return (await self.request("edit_message", data))["data"]

    async def delete(self, group: str, seq: int) -> Message:
        """Deletes a message (yours, or any as an admin or owner); returns the tombstone."""
        return (await self.request("delete_message", {"group_name": group, "seq": seq}))["data"]

    async def mark_read(self, group: str, seq: int) -> Dict[str, Any]:
        """Raises your read marker; the reply has `last_read_seq` and `unread_count`."""
        return (await self.request("mark_read", {"group_name": group, "seq": seq}))["data"]

    async def typing(self, group: str) -> None:
        """Tells the room you are typing (send it as often as keys are pressed)."""
        await self.request("typing", {"group_name": group})

    def close(self) -> None:
        """Closes the connection (nothing is resent afterwards unless `connect` is called)."""
        if self._reader_task is not None:
            self._reader_task.cancel()
        if self._writer is not None:
            self._writer.close()
        for writer in self._abandoned:
            writer.close()
        self._closed = True

    def _write_send(self, client_msg_id, group, text, mentions=(), reply_to=None):
        data = {"group_name": group, "text": text, "client_msg_id": client_msg_id}
        if mentions:
            data["mentions"] = list(mentions)
        if reply_to is not None:
            data["reply_to"] = reply_to
        try:
            self._write({"event": "send_message", "data": data, "id": "send:" + client_msg_id})
        except (ConnectionError, RuntimeError):
            pass  # resent by the next connect()

    def _on_ack(self, client_msg_id, line):
        data = line["data"]
        future = self.acks.get(client_msg_id)
        if line["event"] != "message_sent":
            if data.get("code") in RETRYABLE:
                asyncio.get_running_loop().call_later(
                    1, self._write_send, client_msg_id, *self.outbox[client_msg_id]
                )
            elif future is not None and not future.done():
                self.outbox.pop(client_msg_id, None)
                future.set_exception(ChatError(data.get("code"), data.get("Error", "")))
            return
        if data.get("duplicate"):
            self.duplicates += 1
        self.outbox.pop(client_msg_id, None)
        self._show(data)
        if future is not None and not future.done():
            future.set_result(data)

    def _show(self, message, broadcast=False):
        group, seq = message["group_name"], message["seq"]
        last = self.last_seq.get(group, 0)
        if seq <= last:
            return  # already shown (an ack and a broadcast, or a page, may overlap)
        if seq != last + 1 and self.protocol >= 3 and group == self.room:
            if broadcast:
                self.gaps += 1  # never expected: the room's lines come once each, in order
            # An ack ahead of the room's stream (a peer's earlier message is still on its
            # way): shown when the stream reaches it, so nothing before it is skipped.
            self._early.setdefault(group, {})[seq] = message
            return
        self._advance(group, message)
        early = self._early.get(group, {})
        while self.last_seq[group] + 1 in early:
            self._advance(group, early.pop(self.last_seq[group] + 1))

    def _advance(self, group, message):
        seq = message["seq"]
        self.last_seq[group] = seq
        # The sidebar knows what this client has shown, not only what group_activity said.
        entry = self.groups.setdefault(group, {"unread_count": 0})
        entry["last_seq"] = max(entry.get("last_seq", 0), seq)
        if self.on_message is not None:
            self.on_message(message)
        if self._backlog is not None and self._backlog[0] == group and seq >= self._backlog[1]:
            _, _, done = self._backlog
            self._backlog = None
            if not done.done():
                done.set_result(None)


# -- the cut-off scenario --------------------------------------------------------------------
async def scenario(host, port, messages, cutoffs, prefix, hop_port=None):
    """With `hop_port` (a peer instance): the sender reconnects to either instance in turn, and
    halfway through the watcher itself is cut off and resumes on the other instance, so the
    printing loop is checked across a peer hop too."""
    group = f"{prefix}-room"
    seen, raw = [], []
    watcher = Client(host, port, f"{prefix}-watcher", on_message=seen.append)
    await watcher.connect()
    await watcher.join_and_enter(group)
    # The watcher never loses its connection, so what the server sends it must already be
    # exactly once and in order: it is checked as received, not after the client's filter.
    watcher.on_broadcast = raw.append
    sender = Client(host, port, f"{prefix}-sender")
    await sender.connect()
    await sender.join_and_enter(group)

    sent, rounds = [], cutoffs + 1
    for round_number in range(rounds):
        batch = [
            sender.send_nowait(group, f"{prefix} message {i}")
            for i in range(round_number * messages // rounds, (round_number + 1) * messages // rounds)
        ]
        sent.extend(batch)
        # Cut off mid-stream: half the batch acknowledged, the rest still in flight.
        await asyncio.gather(*batch[: len(batch) // 2])
        if round_number < cutoffs:
            sender.cut_off(clean=round_number % 2 == 0)
            if hop_port is not None:
                sender.port = hop_port if round_number % 2 == 0 else port
            await sender.connect()
        if hop_port is not None and round_number == rounds // 2:
            watcher.cut_off(clean=True)
            watcher.port = hop_port
            await watcher.connect()
    stored = await asyncio.wait_for(asyncio.gather(*sent), 60)
    end = await sender.send(group, "end")

    async def watcher_reached_end():
        while not seen or seen[-1]["_id"] != end["_id"]:
            await asyncio.sleep(0.05)

    await asyncio.wait_for(watcher_reached_end(), 60)
    expected = {m["client_msg_id"] for m in stored}
    received = [m.get("client_msg_id") for m in raw if m["_id"] != end["_id"]]
    seqs = [m["seq"] for m in raw]
    lost = len(expected - set(received))
    duplicated = len(received) - len(set(received))
    out_of_order = sum(1 for a, b in zip(seqs, seqs[1:]) if a >= b)
    history = []
    watcher.on_message = history.append
    watcher.last_seq[group] = 0
    await watcher.enter(group)
    history_ids = [m.get("client_msg_id") for m in history]
    stored_twice = len(history_ids) - len(set(history_ids))
    print(
        f"python client: {messages} messages, {cutoffs} cut-offs "
        f"{'and a peer hop ' if hop_port else ''}"
        f"({(cutoffs + 1) // 2} clean, {cutoffs // 2} abandoned), "
        f"{sender.duplicates} retries answered as duplicates: lost={lost} "
        f"duplicated={duplicated} out_of_order={out_of_order} stored_twice={stored_twice} "
        f"protocol={sender.protocol} gaps={watcher.gaps + sender.gaps}"
    )
    ok = lost == 0 and duplicated == 0 and out_of_order == 0 and stored_twice == 0
    return ok and watcher.gaps == 0 and sender.gaps == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["scenario"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7777)
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--cutoffs", type=int, default=12)
    parser.add_argument("--prefix", default="py-" + uuid.uuid4().hex[:8])
    parser.add_argument("--hop-port", type=int, default=None, help="a peer instance's port")
    args = parser.parse_args()
    ok = asyncio.run(
        scenario(args.host, args.port, args.messages, args.cutoffs, args.prefix, args.hop_port)
    )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
