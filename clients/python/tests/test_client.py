"""Tests of the installed package against a running server (`NOOMNIM_PORT`, `NOOMNIM_HOST`)."""

import asyncio
import os
import unittest
import uuid

from noomnim_client import ChatError, Client, __version__

HOST = os.environ.get("NOOMNIM_HOST", "127.0.0.1")
PORT = int(os.environ.get("NOOMNIM_PORT", "7777"))


def name(prefix):
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


async def until(condition, seconds=10):
    """Waits (bounded) until `condition()` holds."""
    for _ in range(int(seconds * 50)):
        if condition():
            return True
        await asyncio.sleep(0.02)
    return condition()


class ClientTest(unittest.IsolatedAsyncioTestCase):
    async def asyncSetUp(self):
        self.group = name("pkg")
        self.seen, self.events = [], []
        self.alice = Client(HOST, PORT, name("alice"))
        self.bob = Client(HOST, PORT, name("bob"), on_message=self.seen.append, on_event=self.events.append)
        await self.alice.connect()
        await self.bob.connect()
        await self.alice.join_and_enter(self.group)
        await self.bob.join_and_enter(self.group)

    async def asyncTearDown(self):
        self.alice.close()
        self.bob.close()

    def test_version_and_protocol(self):
        self.assertRegex(__version__, r"^\d+\.\d+\.\d+$")
        self.assertEqual(self.bob.protocol, 3)

    async def test_a_sent_message_reaches_the_room_once(self):
        stored = await self.alice.send(self.group, "hello")
        self.assertEqual(stored["text"], "hello")
        # What the README's example prints: the sidebar has the group.
        self.assertEqual(self.alice.groups[self.group], {"last_seq": stored["seq"], "unread_count": 0})
        self.assertTrue(await until(lambda: len(self.seen) == 1))
        self.assertEqual(self.seen[0]["seq"], stored["seq"])

    async def test_a_reconnect_resumes_without_loss_or_repeat(self):
        await self.alice.send(self.group, "before")
        self.assertTrue(await until(lambda: len(self.seen) == 1))
        self.bob.cut_off(clean=True)
        for i in range(5):
            await self.alice.send(self.group, f"while away {i}")
        await self.bob.connect()
        self.assertTrue(await until(lambda: len(self.seen) == 6))
        self.assertEqual([m["seq"] for m in self.seen], list(range(1, 7)))

    async def test_refusals_carry_their_code(self):
        with self.assertRaises(ChatError) as caught:
            await self.bob.request("send_message", {"group_name": name("nowhere"), "text": "x"})
        self.assertEqual(caught.exception.code, "group_not_found")

    async def test_edits_and_deletes_reach_on_event(self):
        stored = await self.alice.send(self.group, "teh")
        edited = await self.alice.edit(self.group, stored["seq"], "the")
        self.assertEqual(edited["text"], "the")
        self.assertTrue(await until(lambda: any(e["event"] == "message_edited" for e in self.events)))
        tombstone = await self.alice.delete(self.group, stored["seq"])
        self.assertTrue(tombstone["deleted"])
        self.assertNotIn("text", tombstone)
        self.assertTrue(await until(lambda: any(e["event"] == "message_deleted" for e in self.events)))

    async def test_replies_make_a_thread(self):
        root = await self.alice.send(self.group, "who takes the release?")
        first = await self.bob.send(self.group, "I can", reply_to=root["seq"])
        self.assertEqual(first["reply_to"], root["seq"])
        # A reply to a reply joins the root's thread.
        second = await self.alice.send(self.group, "thanks", reply_to=first["seq"])
        self.assertEqual(second["reply_to"], root["seq"])
        page = await self.bob.thread(self.group, root["seq"])
        self.assertEqual([m["seq"] for m in page["messages"]],
                         [root["seq"], first["seq"], second["seq"]])
        self.assertEqual(page["messages"][0]["reply_count"], 2)
        self.assertEqual(page["messages"][0]["last_reply_seq"], second["seq"])
        with self.assertRaises(ChatError) as refused:
            await self.alice.send(self.group, "to nothing", reply_to=10_000)
        self.assertEqual(refused.exception.code, "not_found")

    async def test_direct_messages_mentions_blocks_and_levels(self):
        dm = await self.alice.open_direct(self.bob.username)
        self.assertTrue(dm.startswith("@dm:"))
        self.assertEqual(await self.bob.open_direct(self.alice.username), dm)
        await self.alice.send(dm, "just us")
        await self.alice.send(self.group, "bob?", mentions=[self.bob.username])
        # Bob is in the group's room: the mention arrives as the message itself.
        self.assertTrue(await until(lambda: any(m.get("mentions") for m in self.seen)))
        await self.bob.set_notify(dm, "mentions")
        rows = (await self.bob.request("my_groups", {}))["data"]["groups"]
        direct = next(r for r in rows if r["group_name"] == dm)
        self.assertEqual((direct["kind"], direct["with"], direct["notify"]),
                         ("direct", self.alice.username, "mentions"))
        self.assertEqual(await self.bob.block(self.alice.username), [self.alice.username])
        with self.assertRaises(ChatError) as refused:
            await self.alice.send(dm, "hello?")
        self.assertEqual(refused.exception.code, "forbidden")
        self.assertEqual(await self.bob.unblock(self.alice.username), [])
        self.assertEqual(await self.bob.blocked(), [])

    async def test_the_sidebar_counts_unread_in_other_groups(self):
        other = name("side")
        await self.alice.join_and_enter(other)
        await self.bob.request("join_group", {"group_name": other})
        await self.alice.send(other, "psst")
        self.assertTrue(await until(lambda: self.bob.groups.get(other, {}).get("unread_count") == 1))
        marked = await self.bob.mark_read(other, 1)
        self.assertEqual(marked["unread_count"], 0)

    async def test_an_erased_account_is_not_logged_in_again(self):
        # NOOMNIM_BINARY (with the server's DATA_DIR or MONGODB_URI) reaches the store as an
        # operator would; without them there is nothing to erase with.
        binary = os.environ.get("NOOMNIM_BINARY")
        if binary is None:
            self.skipTest("NOOMNIM_BINARY is not set")
        erasing = await asyncio.create_subprocess_exec(
            binary, "admin", "erase-user", self.alice.username, stdout=asyncio.subprocess.DEVNULL
        )
        self.assertEqual(await erasing.wait(), 0)
        self.assertTrue(await until(lambda: self.alice.ended_for_good is not None, 20))
        with self.assertRaises(ChatError) as refused:
            await self.alice.connect()
        self.assertEqual(refused.exception.code, "account_erased")


if __name__ == "__main__":
    unittest.main()
