// Tests of the installed package against a running server (NOOMNIM_PORT, NOOMNIM_HOST).
'use strict';

const test = require('node:test');
const assert = require('node:assert');
const crypto = require('crypto');
const { Client, ChatError } = require('noomnim-client');

const HOST = process.env.NOOMNIM_HOST || '127.0.0.1';
const PORT = Number(process.env.NOOMNIM_PORT || 7777);
const name = (prefix) => `${prefix}_${crypto.randomBytes(5).toString('hex')}`;

// Waits (bounded) until `condition()` holds.
async function until(condition, seconds = 10) {
  for (let i = 0; i < seconds * 50 && !condition(); i += 1) {
    await new Promise((done) => setTimeout(done, 20));
  }
  return condition();
}

async function pair() {
  const group = name('pkg');
  const seen = [];
  const events = [];
  const alice = new Client(HOST, PORT, name('alice'));
  const bob = new Client(HOST, PORT, name('bob'), (m) => seen.push(m), { onEvent: (l) => events.push(l) });
  await alice.connect();
  await bob.connect();
  await alice.joinAndEnter(group);
  await bob.joinAndEnter(group);
  return { group, seen, events, alice, bob };
}

test('a sent message reaches the room once, on protocol 3', async () => {
  const { group, seen, alice, bob } = await pair();
  assert.strictEqual(bob.protocol, 3);
  const stored = await alice.send(group, 'hello');
  // What the README's example prints: the sidebar has the group.
  assert.deepStrictEqual(alice.groups.get(group), { last_seq: stored.seq, unread_count: 0 });
  assert.ok(await until(() => seen.length === 1));
  assert.strictEqual(seen[0].seq, stored.seq);
  alice.close(); bob.close();
});

test('a reconnect resumes without loss or repeat', async () => {
  const { group, seen, alice, bob } = await pair();
  await alice.send(group, 'before');
  assert.ok(await until(() => seen.length === 1));
  bob.cutOff(true);
  for (let i = 0; i < 5; i += 1) await alice.send(group, `while away ${i}`);
  await bob.connect();
  assert.ok(await until(() => seen.length === 6));
  assert.deepStrictEqual(seen.map((m) => m.seq), [1, 2, 3, 4, 5, 6]);
  alice.close(); bob.close();
});

test('refusals carry their code', async () => {
  const { alice, bob } = await pair();
  await assert.rejects(bob.request('send_message', { group_name: name('nowhere'), text: 'x' }),
    (error) => error instanceof ChatError && error.code === 'group_not_found');
  alice.close(); bob.close();
});

test('edits and deletes reach onEvent', async () => {
  const { group, events, alice, bob } = await pair();
  const stored = await alice.send(group, 'teh');
  assert.strictEqual((await alice.edit(group, stored.seq, 'the')).text, 'the');
  assert.ok(await until(() => events.some((e) => e.event === 'message_edited')));
  const tombstone = await alice.delete(group, stored.seq);
  assert.strictEqual(tombstone.deleted, true);
  assert.strictEqual(tombstone.text, undefined);
  assert.ok(await until(() => events.some((e) => e.event === 'message_deleted')));
  alice.close(); bob.close();
});

test('replies make a thread', async () => {
  const { group, alice, bob } = await pair();
  const root = await alice.send(group, 'who takes the release?');
  const first = await bob.send(group, 'I can', [], root.seq);
  assert.strictEqual(first.reply_to, root.seq);
  // A reply to a reply joins the root's thread.
  const second = await alice.send(group, 'thanks', [], first.seq);
  assert.strictEqual(second.reply_to, root.seq);
  const page = await bob.thread(group, root.seq);
  assert.deepStrictEqual(page.messages.map((m) => m.seq), [root.seq, first.seq, second.seq]);
  assert.strictEqual(page.messages[0].reply_count, 2);
  assert.strictEqual(page.messages[0].last_reply_seq, second.seq);
  await assert.rejects(alice.send(group, 'to nothing', [], 10000),
    (error) => error instanceof ChatError && error.code === 'not_found');
  alice.close(); bob.close();
});

test('direct messages, mentions, blocks and levels', async () => {
  const { group, seen, alice, bob } = await pair();
  const dm = await alice.openDirect(bob.username);
  assert.ok(dm.startsWith('@dm:'));
  assert.strictEqual(await bob.openDirect(alice.username), dm);
  await alice.send(dm, 'just us');
  await alice.send(group, 'bob?', [bob.username]);
  assert.ok(await until(() => seen.some((m) => m.mentions && m.mentions.length)));
  await bob.setNotify(dm, 'mentions');
  const rows = (await bob.request('my_groups', {})).data.groups;
  const direct = rows.find((r) => r.group_name === dm);
  assert.deepStrictEqual([direct.kind, direct.with, direct.notify], ['direct', alice.username, 'mentions']);
  assert.deepStrictEqual(await bob.block(alice.username), [alice.username]);
  await assert.rejects(alice.send(dm, 'hello?'),
    (error) => error instanceof ChatError && error.code === 'forbidden');
  assert.deepStrictEqual(await bob.unblock(alice.username), []);
  assert.deepStrictEqual(await bob.blocked(), []);
  alice.close(); bob.close();
});

// With NOOMNIM_BINARY (and the server's DATA_DIR or MONGODB_URI), the store can be reached as
// an operator would; without them this test has nothing to erase with.
test('an erased account is not logged in again', { skip: !process.env.NOOMNIM_BINARY }, async () => {
  const { alice, bob } = await pair();
  const { execFileSync } = require('child_process');
  execFileSync(process.env.NOOMNIM_BINARY, ['admin', 'erase-user', alice.username]);
  assert.ok(await until(() => alice.endedForGood !== null, 20));
  await assert.rejects(alice.connect(),
    (error) => error instanceof ChatError && error.code === 'account_erased');
  alice.close(); bob.close();
});
