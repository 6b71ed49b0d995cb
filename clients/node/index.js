#!/usr/bin/env node
// Noomnim Chat client: Node.js 16+, no dependencies (net, readline-free framing).
//
// A client that survives its connection: every message gets a `client_msg_id` and stays in an
// outbox until its `message_sent` arrives; after a reconnect it logs in again, re-enters its
// room with `since_seq` (protocol 3's gapless resume: every message after the last one shown,
// exactly once, in order, then live) and resends the outbox (a repeat is answered with the
// original message and `"duplicate": true`, so nothing is stored twice). Messages are shown
// once each, in `seq` order. Against a server without protocol 3 it pages history and holds
// early broadcasts instead. `groups` is a sidebar of the user's groups with their unread counts,
// kept current from `group_activity` and `read_marker`. See docs/PROTOCOL.md ("Resume after a
// disconnect without loss or duplication", "Protocol 3").
//
// As a library:
//   const { Client } = require('noomnim-client');
//   const client = new Client('127.0.0.1', 7777, 'alice', (m) => console.log(m.text));
//   await client.connect(); await client.joinAndEnter('lobby'); await client.send('lobby', 'hi');
// Every other line the server sends on its own (presence, typing, edits, deletes, removals)
// goes to `client.onEvent(line)` when set.
//
// As a program, `scenario` runs the cut-off test CI runs (exit status 0 when nothing was lost,
// duplicated or reordered):
//   node index.js scenario --port 7777 --messages 300 --cutoffs 12
'use strict';

const net = require('net');
const crypto = require('crypto');

const RETRYABLE = new Set(['unavailable', 'rate_limited']);

class ChatError extends Error {
  constructor(code, text) {
    super(`${code}: ${text}`);
    this.code = code;
  }
}

function deferred() {
  let resolve;
  let reject;
  const promise = new Promise((ok, fail) => { resolve = ok; reject = fail; });
  return { promise, resolve, reject, done: false };
}

class Client {
  constructor(host, port, username, onMessage, options = {}) {
    Object.assign(this, { host, port, username, onMessage });
    this.token = options.token || null; // a JWT for servers with AUTH_SECRET
    this.onEvent = options.onEvent || null; // every other unsolicited line
    this.onBroadcast = null; // sees every broadcast as received, before de-duplication
    this.room = null; // the group whose room we are in (re-entered after a reconnect)
    this.lastSeq = new Map(); // group -> highest seq shown
    this.epoch = new Map(); // group -> epoch the seqs above belong to
    this.outbox = new Map(); // client_msg_id -> [group, text, mentions, replyTo], until acknowledged
    this.acks = new Map(); // client_msg_id -> deferred ack data
    this.duplicates = 0; // acks that said `duplicate` (retries of stored messages)
    this.pending = new Map(); // request id -> deferred reply line
    this.ids = 0;
    this.catchingUp = null; // broadcasts held while history is paged (protocol 2)
    this.backlog = null; // [group, headSeq, deferred] while a resume streams its backlog
    this.protocol = 2;
    this.gaps = 0; // broadcasts that were not exactly the next seq (must stay 0)
    this.early = new Map(); // group -> Map(seq -> message): own acks ahead of the room's stream
    this.groups = new Map(); // group -> { last_seq, unread_count }: the sidebar (protocol 3)
    this.socket = null;
    this.abandoned = []; // sockets left open on purpose (see cutOff)
    // Set when the server closed with `closing {code: account_erased}`: connect() refuses from
    // then on, since logging in again would register the erased name anew.
    this.endedForGood = null;
  }

  // (Re)connects: hello, log in, re-enter the room and catch up, resend the outbox.
  async connect() {
    if (this.endedForGood) throw this.endedForGood;
    const socket = net.connect(this.port, this.host);
    await new Promise((ok, fail) => { socket.once('connect', ok); socket.once('error', fail); });
    this.socket = socket;
    let buffered = '';
    socket.setEncoding('utf8');
    socket.on('data', (chunk) => {
      if (socket !== this.socket) return; // an abandoned connection is never read again
      buffered += chunk;
      let end;
      while ((end = buffered.indexOf('\n')) >= 0) {
        const line = buffered.slice(0, end);
        buffered = buffered.slice(end + 1);
        if (line) this.onLine(JSON.parse(line));
      }
    });
    const lost = () => { if (socket === this.socket) this.failPending(new Error('connection closed')); };
    socket.on('close', lost);
    socket.on('error', lost);
    this.hello = (await this.request('hello')).data;
    if ((this.hello.protocols || []).includes(3)) {
      this.hello = (await this.request('hello', { protocol: 3 })).data;
    }
    this.protocol = this.hello.protocol || 2;
    const login = { username: this.username };
    if (this.token) login.token = this.token;
    await this.request('find_user', login);
    if (this.room !== null) await this.enter(this.room);
    for (const [id, [group, text, mentions, replyTo]] of this.outbox) {
      this.writeSend(id, group, text, mentions, replyTo);
    }
  }

  // Drops the connection as a crash or a network fault would: `clean` closes the socket;
  // otherwise it is abandoned (left open, never read again, like a dead NAT mapping).
  cutOff(clean) {
    const socket = this.socket;
    this.socket = null;
    if (clean) socket.end(); else { socket.pause(); this.abandoned.push(socket); }
    this.failPending(new Error('cut off'));
  }

  failPending(error) {
    const pending = this.pending;
    this.pending = new Map();
    for (const d of pending.values()) d.reject(error);
  }

  onLine(line) {
    const id = line.id;
    if (typeof id === 'string' && id.startsWith('send:')) {
      this.onAck(id.slice(5), line);
    } else if (id !== undefined && this.pending.has(id)) {
      const d = this.pending.get(id);
      this.pending.delete(id);
      d.resolve(line);
    } else if (line.event === 'message_sent') {
      if (this.onBroadcast) this.onBroadcast(line.data);
      if (this.catchingUp) this.catchingUp.push(line.data); else this.show(line.data, true);
    } else if (line.event === 'group_activity' || line.event === 'read_marker') {
      const entry = this.groups.get(line.data.group_name) || {};
      if (line.data.last_seq !== undefined) entry.last_seq = line.data.last_seq;
      entry.unread_count = line.data.unread_count;
      this.groups.set(line.data.group_name, entry);
      if (this.onEvent) this.onEvent(line);
    } else {
      if (line.event === 'closing' && line.data && line.data.code === 'account_erased') {
        this.endedForGood = new ChatError('account_erased', line.data.Error || 'account erased');
      }
      if (this.onEvent) this.onEvent(line);
    }
  }

  // Sends one request and resolves with its reply line; rejects with ChatError on a failure.
  async request(event, data = {}) {
    if (!this.socket) throw new Error('not connected');
    const id = ++this.ids;
    const d = deferred();
    this.pending.set(id, d);
    this.socket.write(`${JSON.stringify({ event, data, id })}\n`);
    const reply = await d.promise;
    if (reply.data && typeof reply.data === 'object' && 'code' in reply.data) {
      throw new ChatError(reply.data.code, reply.data.Error);
    }
    return reply;
  }

  async joinAndEnter(group) {
    try {
      await this.request('join_group', { group_name: group });
    } catch (error) {
      if (error.code !== 'group_not_found') throw error;
      await this.request('create_group', { group_name: group });
    }
    await this.enter(group);
  }

  // Enters the room and catches up after the last seq shown; resolves once the backlog has
  // been shown.
  async enter(group) {
    if (this.protocol >= 3) return this.resume(group);
    return this.pageIn(group);
  }

  // Protocol 3: the server streams the backlog after `since_seq`, then live.
  async resume(group) {
    const data = { group_name: group, since_seq: this.lastSeq.get(group) || 0 };
    if (this.epoch.has(group)) data.since_epoch = this.epoch.get(group);
    const reply = (await this.request('enter_group', data)).data;
    this.room = group;
    if (reply.epoch_changed || reply.truncated) this.lastSeq.set(group, reply.first_seq - 1);
    this.epoch.set(group, reply.epoch);
    if ((this.lastSeq.get(group) || 0) >= reply.head_seq) return undefined;
    const d = deferred();
    this.backlog = [group, reply.head_seq, d];
    return d.promise;
  }

  // Protocol 2: enters the room, then pages everything after the last seq shown (broadcasts
  // that arrive meanwhile are held, then shown if still new).
  async pageIn(group) {
    this.catchingUp = [];
    let held;
    try {
      const reply = (await this.request('enter_group', { group_name: group })).data;
      this.room = group;
      if (this.epoch.has(group) && this.epoch.get(group) !== reply.epoch) {
        this.lastSeq.set(group, 0); // the numbering restarted: old seqs mean nothing
      }
      this.epoch.set(group, reply.epoch);
      for (;;) {
        const after = this.lastSeq.get(group) || 0;
        const page = (await this.request('fetch_messages',
          { group_name: group, after_seq: after, limit: 100 })).data;
        page.messages.forEach((m) => this.show(m));
        if (!page.has_more) break;
      }
    } finally {
      held = this.catchingUp;
      this.catchingUp = null;
    }
    held.forEach((m) => this.show(m));
  }

  // Queues a message; returns a promise of its stored form (kept across reconnects).
  // `mentions` names members to notify ('@room': all of them; owner and admins only);
  // `replyTo` the seq of the message it answers (the reply joins that message's thread).
  send(group, text, mentions = [], replyTo = null) {
    const id = crypto.randomUUID();
    this.outbox.set(id, [group, text, mentions, replyTo]);
    const d = deferred();
    this.acks.set(id, d);
    this.writeSend(id, group, text, mentions, replyTo);
    return d.promise;
  }

  // A page of one thread: its root (with reply_count, last_reply_seq) and its replies, in
  // seq order, after `afterSeq`; resolves with {messages, has_more}.
  async thread(group, seq, afterSeq = 0, limit = 100) {
    const reply = await this.request('fetch_messages',
      { group_name: group, thread: seq, after_seq: afterSeq, limit });
    return reply.data;
  }

  // The direct conversation with `username` (created on first use): its group name.
  async openDirect(username) {
    return (await this.request('open_direct', { username })).data.group_name;
  }

  // Blocks a user (no direct messages from them); resolves with everyone you block.
  async block(username) {
    return (await this.request('block_user', { username })).data.users;
  }

  async unblock(username) {
    return (await this.request('unblock_user', { username })).data.users;
  }

  async blocked() {
    return (await this.request('list_blocked', {})).data.users;
  }

  // Your notification level in a conversation: 'all', 'mentions' or 'none'.
  async setNotify(group, level) {
    await this.request('set_notify', { group_name: group, level });
  }

  writeSend(id, group, text, mentions = [], replyTo = null) {
    if (!this.socket) return; // resent by the next connect()
    const data = { group_name: group, text, client_msg_id: id };
    if (mentions && mentions.length) data.mentions = mentions;
    if (replyTo !== null && replyTo !== undefined) data.reply_to = replyTo;
    this.socket.write(`${JSON.stringify({ event: 'send_message', data, id: `send:${id}` })}\n`);
  }

  onAck(id, line) {
    const d = this.acks.get(id);
    if (line.event !== 'message_sent') {
      if (RETRYABLE.has(line.data.code)) {
        const [group, text, mentions, replyTo] = this.outbox.get(id);
        setTimeout(() => this.writeSend(id, group, text, mentions, replyTo), 1000);
      } else if (d && !d.done) {
        d.done = true;
        this.outbox.delete(id);
        d.reject(new ChatError(line.data.code, line.data.Error));
      }
      return;
    }
    if (line.data.duplicate) this.duplicates += 1;
    this.outbox.delete(id);
    this.show(line.data);
    if (d && !d.done) { d.done = true; d.resolve(line.data); }
  }

  show(message, broadcast = false) {
    const { group_name: group, seq } = message;
    const last = this.lastSeq.get(group) || 0;
    if (seq <= last) return; // already shown (an ack and a broadcast may overlap)
    if (seq !== last + 1 && this.protocol >= 3 && group === this.room) {
      if (broadcast) this.gaps += 1; // never expected: the room's lines come once, in order
      // An ack ahead of the room's stream (a peer's earlier message is still on its way):
      // shown when the stream reaches it, so nothing before it is skipped.
      if (!this.early.has(group)) this.early.set(group, new Map());
      this.early.get(group).set(seq, message);
      return;
    }
    this.advance(group, message);
    const early = this.early.get(group) || new Map();
    while (early.has(this.lastSeq.get(group) + 1)) {
      const next = early.get(this.lastSeq.get(group) + 1);
      early.delete(next.seq);
      this.advance(group, next);
    }
  }

  advance(group, message) {
    this.lastSeq.set(group, message.seq);
    // The sidebar knows what this client has shown, not only what group_activity said.
    const entry = this.groups.get(group) || { unread_count: 0 };
    entry.last_seq = Math.max(entry.last_seq || 0, message.seq);
    this.groups.set(group, entry);
    if (this.onMessage) this.onMessage(message);
    if (this.backlog && this.backlog[0] === group && message.seq >= this.backlog[1]) {
      const d = this.backlog[2];
      this.backlog = null;
      if (!d.done) { d.done = true; d.resolve(); }
    }
  }

  // Replaces the text of one of your messages; resolves with the message as now stored.
  async edit(group, seq, text) {
    return (await this.request('edit_message', { group_name: group, seq, text })).data;
  }

  // Deletes a message (yours, or any as an admin or owner); resolves with the tombstone.
  async delete(group, seq) {
    return (await this.request('delete_message', { group_name: group, seq })).data;
  }

  // Raises your read marker; resolves with { group_name, last_read_seq, unread_count }.
  async markRead(group, seq) {
    return (await this.request('mark_read', { group_name: group, seq })).data;
  }

  // Tells the room you are typing.
  async typing(group) {
    await this.request('typing', { group_name: group });
  }

  close() {
    if (this.socket) this.socket.destroy();
    this.socket = null;
    this.abandoned.forEach((s) => s.destroy());
  }
}

// -- the cut-off scenario --------------------------------------------------------------------
async function scenario({ host, port, messages, cutoffs, prefix }) {
  const group = `${prefix}-room`;
  const seen = [];
  const raw = [];
  const watcher = new Client(host, port, `${prefix}-watcher`, (m) => seen.push(m));
  await watcher.connect();
  await watcher.joinAndEnter(group);
  // The watcher never loses its connection, so what the server sends it must already be
  // exactly once and in order: it is checked as received, not after the client's filter.
  watcher.onBroadcast = (m) => raw.push(m);
  const sender = new Client(host, port, `${prefix}-sender`);
  await sender.connect();
  await sender.joinAndEnter(group);

  const sent = [];
  const rounds = cutoffs + 1;
  for (let round = 0; round < rounds; round += 1) {
    const batch = [];
    const from = Math.floor((round * messages) / rounds);
    const to = Math.floor(((round + 1) * messages) / rounds);
    for (let i = from; i < to; i += 1) batch.push(sender.send(group, `${prefix} message ${i}`));
    sent.push(...batch);
    // Cut off mid-stream: half the batch acknowledged, the rest still in flight.
    await Promise.all(batch.slice(0, Math.floor(batch.length / 2)));
    if (round < cutoffs) {
      sender.cutOff(round % 2 === 0);
      await sender.connect();
    }
  }
  const stored = await Promise.all(sent);
  const end = await sender.send(group, 'end');
  while (!seen.length || seen[seen.length - 1]._id !== end._id) {
    await new Promise((ok) => setTimeout(ok, 50));
  }
  const expected = new Set(stored.map((m) => m.client_msg_id));
  const received = raw.filter((m) => m._id !== end._id).map((m) => m.client_msg_id);
  const lost = [...expected].filter((id) => !received.includes(id)).length;
  const duplicated = received.length - new Set(received).size;
  const seqs = raw.map((m) => m.seq);
  const outOfOrder = seqs.slice(1).filter((s, i) => s <= seqs[i]).length;
  const history = [];
  watcher.onMessage = (m) => history.push(m.client_msg_id);
  watcher.lastSeq.set(group, 0);
  await watcher.enter(group);
  const storedTwice = history.length - new Set(history).size;
  console.log(`node client: ${messages} messages, ${cutoffs} cut-offs `
    + `(${Math.ceil(cutoffs / 2)} clean, ${Math.floor(cutoffs / 2)} abandoned), `
    + `${sender.duplicates} retries answered as duplicates: lost=${lost} `
    + `duplicated=${duplicated} out_of_order=${outOfOrder} stored_twice=${storedTwice} `
    + `protocol=${sender.protocol} gaps=${watcher.gaps + sender.gaps}`);
  watcher.close();
  sender.close();
  return lost === 0 && duplicated === 0 && outOfOrder === 0 && storedTwice === 0
    && watcher.gaps === 0 && sender.gaps === 0;
}

function parseArgs(argv) {
  const options = {
    host: '127.0.0.1', port: 7777, messages: 300, cutoffs: 12,
    prefix: `js-${crypto.randomBytes(4).toString('hex')}`,
  };
  for (let i = 1; i < argv.length; i += 2) {
    const key = argv[i].replace(/^--/, '');
    if (!(key in options)) throw new Error(`unknown option ${argv[i]}`);
    options[key] = typeof options[key] === 'number' ? Number(argv[i + 1]) : argv[i + 1];
  }
  return options;
}

if (require.main === module) {
  const argv = process.argv.slice(2);
  if (argv[0] !== 'scenario') {
    console.error('usage: node index.js scenario [--host H] [--port P] [--messages N] [--cutoffs K]');
    process.exit(2);
  }
  scenario(parseArgs(argv)).then((ok) => process.exit(ok ? 0 : 1), (error) => {
    console.error(`node client: ${error.stack || error}`);
    process.exit(1);
  });
}

module.exports = { Client, ChatError, scenario };
