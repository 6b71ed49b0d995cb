//! Delivery: store completions become replies and broadcasts, peer messages and catch-up reads go through the sequencer, and rooms are entered and left.

use super::*;
use crate::ops::{send_message, Call};

/// What the loop tracks of the relay to other instances.
#[derive(Debug)]
pub(super) struct RelayState {
    /// The relay's link to Redis is up (metrics).
    pub(super) link_up: bool,
    /// Groups whose room emptied here, and when to stop receiving their relay channel.
    pub(super) unwatch_due: HashMap<String, Instant>,
    /// When the rooms' heads were last checked against the store (peer mode).
    pub(super) last_tail_check: Instant,
    /// Head-check queries not answered yet (a new round starts only after the last one).
    pub(super) heads_in_flight: usize,
}

impl RelayState {
    pub(super) fn new() -> RelayState {
        RelayState {
            link_up: false,
            unwatch_due: HashMap::new(),
            last_tail_check: Instant::now(),
            heads_in_flight: 0,
        }
    }
}

/// What a connection's finished job answers with.
enum Answer {
    Sent(Result<Appended, StoreError>),
    Call(Box<dyn Call>),
}

impl Server {
    pub(super) fn take_completions(&mut self) {
        while let Ok(completion) = self.completions.try_recv() {
            self.complete(completion);
        }
    }

    pub(super) fn complete(&mut self, completion: Finished) {
        let Finished {
            requester,
            outcome,
            elapsed,
        } = completion;
        self.metrics.store_latency(elapsed);
        let answer = match outcome {
            Outcome::Appended(result) => {
                // A `client_msg_id` repeat stored nothing: only its sender hears of it, in the ack.
                if let Ok(Appended {
                    message,
                    duplicate: false,
                }) = &result
                {
                    self.metrics.messages_stored += 1;
                    if let Some(peer) = &self.peer {
                        peer.publish(message);
                    }
                    self.activity_seen(&message.group_name, message.seq, true);
                    let released = self.sequencer.offer(message.clone(), requester);
                    // The sender's copy is its reply: filed now, it goes out when the
                    // sequencer releases the message (`broadcast_all`), so it neither overtakes
                    // earlier messages held for a gap nor trails later ones released with it.
                    // Only a sender in that room waits: for others there is no order to keep.
                    let held = self.sequencer.holds(&message.group_name, message.seq)
                        && self.in_room(requester, &message.group_name);
                    let filed = self.file_answer(requester, Answer::Sent(result));
                    // Marked before the release below, which may deliver this connection's
                    // earlier replies (and would take this one with them).
                    if held {
                        self.hold_reply(requester);
                    }
                    self.broadcast_all(released);
                    if let Some(token) = filed {
                        self.deliver_answers(token);
                    }
                    return;
                }
                Answer::Sent(result)
            }
            Outcome::Called(call) => Answer::Call(call),
            Outcome::CaughtUp { group_name, result } => {
                let found = result
                    .map_err(|error| log::warn!("catch-up read for {group_name} failed: {error}"))
                    .ok();
                // Read back from the store (stored elsewhere): the newest one is the activity.
                if let Some(newest) = found.as_ref().and_then(|found| found.last()) {
                    self.activity_seen(&group_name, newest.seq, false);
                }
                let released = self.sequencer.caught_up(&group_name, found);
                self.broadcast_all(released);
                return;
            }
            Outcome::Heads(result) => {
                self.relay.heads_in_flight = self.relay.heads_in_flight.saturating_sub(1);
                match result {
                    Ok(heads) => self.sequencer.heads_seen(heads),
                    Err(error) => log::warn!("head check failed: {error}"),
                }
                return;
            }
            Outcome::Marked(result) => {
                if let Err(error) = result {
                    log::warn!("read mark failed: {error}");
                }
                return;
            }
        };
        if let Some(token) = self.file_answer(requester, answer) {
            self.deliver_answers(token);
        }
    }

    /// Whether the requesting connection is in `group_name`'s room.
    fn in_room(&self, requester: Requester, group_name: &str) -> bool {
        let Requester::Connection(token, _) = requester else {
            return false;
        };
        self.connections
            .get(&token)
            .is_some_and(|c| c.session().room_name() == Some(group_name))
    }

    /// A sent message's reply waits for the message to be released to its room.
    fn hold_reply(&mut self, origin: Requester) {
        self.reply_waits(origin, true);
    }

    /// The message of `origin`'s reply went to the room (or the room is gone): the reply, and
    /// any behind it, go out now if their turn has come.
    fn release_reply(&mut self, origin: Requester) {
        self.reply_waits(origin, false);
        if let Requester::Connection(token, _) = origin {
            self.deliver_answers(token);
        }
    }

    fn reply_waits(&mut self, origin: Requester, waits: bool) {
        if let Requester::Connection(token, ticket) = origin {
            if let Some(connection) = self.connections.get_mut(&token) {
                connection.wait_for_release(ticket, waits);
            }
        }
    }

    /// Files a finished job's answer with its connection (to go out in request order); the
    /// connection's token when it was filed.
    fn file_answer(&mut self, requester: Requester, answer: Answer) -> Option<Token> {
        let Requester::Connection(token, ticket) = requester else {
            // The server's own reads (presence): their effect, no reply.
            if let Answer::Call(call) = answer {
                let completed = call.finish(None, self.config.max_reply_bytes);
                self.apply(Token(usize::MAX), completed.effect);
            }
            return None;
        };
        let connection = self.connections.get_mut(&token)?;
        let max_reply_bytes = self.config.max_reply_bytes;
        let filed = connection.answer(ticket, |id| match answer {
            Answer::Sent(result) => send_message::answer(result, id),
            Answer::Call(call) => call.finish(id, max_reply_bytes),
        });
        if !filed {
            // Already answered `unavailable` when it outlived STORE_TIMEOUT_MS.
            log::debug!("late store result for {} dropped", connection.peer());
            return None;
        }
        Some(token)
    }

    /// Sends a connection the answers whose turn has come (in request order) and applies their
    /// effects in that order.
    pub(super) fn deliver_answers(&mut self, token: Token) {
        loop {
            let Some(connection) = self.connections.get_mut(&token) else {
                return;
            };
            let Some(answered) = connection.next_answer() else {
                break;
            };
            let mut completed = answered.completed;
            // A protocol-3 `enter_group` reply names the members online now.
            if let Effect::Online(effect, members) = completed.effect {
                let online = self.online_members(members);
                completed.line = with_online(completed.line, &online);
                completed.effect = *effect;
            }
            let Some(connection) = self.connections.get_mut(&token) else {
                return;
            };
            count_reply(&mut self.metrics, &completed.line);
            let shows = completed
                .shows
                .filter(|(group, _, _)| connection.session().room_name() == Some(group.as_str()))
                .map(|(_, first, last)| (first, last));
            let backlog_of = match &completed.effect {
                Effect::Resume(cursor) => Some(cursor.group_name.clone()),
                Effect::Resumed(room) => Some(room.group_name.clone()),
                _ => None,
            };
            if let Some(group_name) = backlog_of {
                // A resume page: its backlog is dropped, unwritten, if access to the group ends
                // (and not sent at all if it ended while the page was read).
                let ended = self.access_ended(token, &group_name, answered.leave_clock);
                let Some(connection) = self.connections.get_mut(&token) else {
                    return;
                };
                let backlog = split_reply_header(&mut completed.line, connection);
                if ended {
                    log::debug!("resume of {group_name} ended: access ended meanwhile");
                    connection.end_resume(&group_name);
                    continue;
                }
                if !backlog.is_empty() {
                    connection.queue_backlog(backlog);
                }
                self.apply(token, completed.effect);
                continue;
            }
            // A server-side read (activity memberships) has no line of its own.
            if !completed.line.is_empty() {
                connection.queue_reply(completed.line, shows);
            }
            let effect = match completed.effect {
                // The user left this group after the enter was submitted (on this node or
                // another): in that order the enter happened first and the leave took the user
                // out again.
                Effect::EnterRoom(room)
                    if self.left_since(token, &room.group_name, answered.leave_clock) =>
                {
                    log::debug!("not entering {}: left meanwhile", room.group_name);
                    Effect::None
                }
                effect => effect,
            };
            self.apply(token, effect);
        }
        self.touch(token);
    }

    /// Whether the connection's user lost access to `group_name` (a leave, removal, ban, or the
    /// group's deletion) after the leave clock read `since`.
    pub(super) fn access_ended(&self, token: Token, group_name: &str, since: u64) -> bool {
        self.left_since(token, group_name, since)
            || self
                .access
                .group_deletes
                .get(group_name)
                .is_some_and(|(clock, _)| *clock > since)
    }

    /// A group was deleted (here or on a peer): resume pages of it read before are not sent,
    /// and streams of it in progress end; a protocol-2 resumer (no sidebar to hear it in) is
    /// sent `line`, the room's `group_deleted`.
    pub(super) fn group_deleted_for_resumes(&mut self, group_name: &str, line: &[u8]) {
        self.access.clock += 1;
        self.access
            .group_deletes
            .insert(group_name.to_string(), (self.access.clock, Instant::now()));
        self.end_streams(group_name, None, line);
    }

    /// Ends the resume streams of `group_name` (of `username`'s connections, or of every
    /// connection); the protocol-2 ones among them are sent `line`.
    pub(super) fn end_streams(&mut self, group_name: &str, username: Option<&str>, line: &[u8]) {
        let tokens = match username {
            Some(username) => self.devices.connections_of(username),
            None => self.connections.tokens(),
        };
        for token in tokens {
            let Some(connection) = self.connections.get_mut(&token) else {
                continue;
            };
            if !connection.end_resume(group_name) {
                continue;
            }
            if connection.session().protocol < 3 && !line.is_empty() {
                self.notify(token, line.to_vec());
            }
            self.touch(token);
        }
    }

    /// Whether the connection's user left `group_name` after the leave clock read `since`.
    pub(super) fn left_since(&self, token: Token, group_name: &str, since: u64) -> bool {
        let Some(username) = self
            .connections
            .get(&token)
            .and_then(|c| c.session().username.clone())
        else {
            return false;
        };
        self.access
            .leaves
            .get(&(username, group_name.to_string()))
            .is_some_and(|(clock, _)| *clock > since)
    }

    pub(super) fn take_peer_events(&mut self) {
        let Some(peer) = &self.peer else {
            return;
        };
        // Between the loops of one instance a message is handed over, not relayed in.
        let from_instances = !peer.is_local();
        let events: Vec<PeerEvent> = peer.events.try_iter().collect();
        for event in events {
            match event {
                PeerEvent::Relayed(message) => {
                    if from_instances {
                        self.metrics.messages_relayed_in += 1;
                    }
                    self.activity_seen(&message.group_name, message.seq, false);
                    let released = self.sequencer.offer(message, Requester::Server);
                    self.broadcast_all(released);
                }
                PeerEvent::LinkUp => {
                    self.relay.link_up = true;
                    self.sequencer.suspect_all();
                }
                PeerEvent::Resync => self.sequencer.suspect_all(),
                PeerEvent::Subscribed(group_name) => self.sequencer.suspect(&group_name),
                PeerEvent::LinkDown => self.relay.link_up = false,
                PeerEvent::Left(departure) => {
                    self.tell_left(&departure, None);
                    self.user_left(departure);
                }
                PeerEvent::Typing(typing) => self.typing(typing, None),
                PeerEvent::User(notice) => {
                    let mut line = notice.line.into_bytes();
                    line.push(b'\n');
                    self.note_user_line(&notice.username, &line);
                    self.tell_user_here(&notice.username, &line, None);
                }
                PeerEvent::Activity(activity) => {
                    self.activity_seen(&activity.group_name, activity.last_seq, false)
                }
                PeerEvent::Presence(snapshot) => self.presence_snapshot(snapshot),
                PeerEvent::Room(room) => {
                    let mut line = room.line.into_bytes();
                    line.push(b'\n');
                    self.room_line_here(&room.group_name, &line, None, room.closes);
                }
            }
        }
    }

    /// Submits the database reads that fill gaps in rooms' message streams.
    pub(super) fn start_catch_ups(&mut self) {
        let Some(pool) = self.pool.as_mut() else {
            return;
        };
        // Catch-up reads take at most half the workers at once: requests keep the rest.
        let most = (self.config.workers / 2).max(1);
        let room = most.saturating_sub(self.sequencer.fetching());
        for catch_up in self.sequencer.due_catch_ups(Instant::now(), room) {
            self.metrics.catch_ups += 1;
            pool.submit(
                Requester::Server,
                Work::CatchUp {
                    group_name: catch_up.group_name,
                    after_seq: catch_up.after_seq,
                    limit: CATCH_UP_BATCH,
                },
            );
        }
    }

    pub(super) fn broadcast_all(&mut self, released: Vec<Release>) {
        for (message, origin) in released {
            self.broadcast(&message, origin);
            // Right after the others' copies: the sender's reply, if its turn has come.
            self.release_reply(origin);
        }
    }

    /// Sends a stored message to every connection in its room but the sender (who gets the reply).
    pub(super) fn broadcast(&mut self, message: &Message, sender: Requester) {
        let members = self.rooms.members(&message.group_name);
        if members.is_empty() {
            return;
        }
        let Some(line) = self
            .rooms
            .share(&message.group_name, &encode_broadcast(message))
        else {
            return;
        };
        // Held only while the loop is short of time: a quiet server writes at once.
        let write_delay = self
            .config
            .write_delay
            .filter(|_| self.write_delay.load.holding());
        let deferring = write_delay.is_some();
        for token in members {
            let Some(connection) = self.connections.get_mut(&token) else {
                continue;
            };
            // The sender gets its own message as the reply to its request, unless that request
            // was answered `unavailable` after the store timeout: then as a broadcast.
            if matches!(sender, Requester::Connection(asker, ticket) if asker == token && !connection.timed_out(ticket))
            {
                continue;
            }
            if !session::receives(connection.session(), message) {
                continue;
            }
            self.metrics.messages_delivered += 1;
            // A client cut off as a slow consumer is closed this turn; other broadcasts may
            // wait for the deferred flush, to leave with the ones after them.
            let cut_off = connection.queue_shared(&line, message.seq);
            if cut_off {
                self.metrics.slow_consumer_cuts += 1;
            }
            if cut_off || !deferring {
                if connection.touch() {
                    self.touched.push(token);
                }
            } else if connection.defer() {
                self.write_delay.deferred.push(token);
            }
        }
        // The delay runs from the first line held. This may be the last step of a turn: the
        // next poll must already wake for it.
        if let (Some(delay), None) = (write_delay, self.write_delay.flush_at) {
            if !self.write_delay.deferred.is_empty() {
                self.write_delay.flush_at = Some(Instant::now() + delay);
            }
        }
    }

    /// A user left a group (here or on a peer): every connection of theirs leaves its room, and
    /// the leave is remembered so that an enter already in flight does not undo it.
    pub(super) fn user_left(&mut self, departure: Departure) {
        self.access.clock += 1;
        // A removal or ban ends the user's resume streams of the group at once; the
        // protocol-2 ones are told why (protocol 3 heard `left_group` already).
        let told = match &departure.reason {
            Some(reason) => crate::protocol::reply::encode_line(
                "left_group",
                &serde_json::json!({"group_name": departure.group_name, "reason": reason}),
                None,
            ),
            None => Vec::new(),
        };
        self.end_streams(&departure.group_name, Some(&departure.username), &told);
        self.left_activity(&departure.username, &departure.group_name);
        for member in self.rooms.members(&departure.group_name) {
            let Some(connection) = self.connections.get_mut(&member) else {
                continue;
            };
            if connection.session().username.as_deref() == Some(departure.username.as_str()) {
                connection.leave_room();
                self.leave_room(&departure.group_name, member);
            }
        }
        let key = (departure.username, departure.group_name);
        self.access
            .leaves
            .insert(key, (self.access.clock, Instant::now()));
    }

    /// Puts a connection in a room and sends it what the room got after its history ended.
    pub(super) fn enter_room(&mut self, token: Token, room: session::Room) {
        if self.rooms.enter(&room.group_name, token) {
            // The first connection here in this room: receive the group's relay channel (a
            // pending unwatch is cancelled; watching twice is harmless).
            self.relay.unwatch_due.remove(&room.group_name);
            if let Some(peer) = &self.peer {
                peer.watch(&room.group_name);
            }
        }
        let missed = self.sequencer.enter(&room.group_name, room.floor_seq);
        let Some(connection) = self.connections.get_mut(&token) else {
            return;
        };
        connection.enter_room(room);
        for message in missed {
            if connection.queue_broadcast(encode_broadcast(&message), message.seq) {
                break;
            }
        }
    }

    pub(super) fn leave_room(&mut self, group_name: &str, token: Token) {
        if self.rooms.leave(group_name, token) {
            // Replies held with their messages go out now: the room they waited for is gone.
            for origin in self.sequencer.forget(group_name) {
                self.release_reply(origin);
            }
            // Unsubscribed only after a linger, so enter/leave churn does not thrash Redis.
            if self.peer.is_some() {
                self.relay
                    .unwatch_due
                    .insert(group_name.to_string(), Instant::now() + UNWATCH_LINGER);
            }
        }
    }

    /// Unsubscribes from the channels of groups whose room stayed empty for the linger.
    pub(super) fn unwatch_idle_groups(&mut self) {
        let now = Instant::now();
        let due: Vec<String> = self
            .relay
            .unwatch_due
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(group, _)| group.clone())
            .collect();
        for group in due {
            self.relay.unwatch_due.remove(&group);
            if let Some(peer) = &self.peer {
                peer.unwatch(&group);
            }
        }
    }

    /// In peer mode, asks the database for the newest seq of every occupied group in one
    /// batched query per `HEADS_PER_QUERY` groups; only groups found behind then read messages.
    pub(super) fn check_tails(&mut self) {
        if self.peer.is_none()
            || self.relay.heads_in_flight > 0
            || self.relay.last_tail_check.elapsed() < TAIL_CHECK_EVERY
        {
            return;
        }
        self.relay.last_tail_check = Instant::now();
        let Some(pool) = self.pool.as_mut() else {
            return;
        };
        let occupied = self.sequencer.occupied();
        for chunk in occupied.chunks(HEADS_PER_QUERY) {
            self.relay.heads_in_flight += 1;
            self.metrics.head_checks += 1;
            pool.submit(Requester::Server, Work::Heads(chunk.to_vec()));
        }
    }
}

/// `{"event":"enter_group","data":{...` with `"online":[...]` put first in `data`.
fn with_online(line: Vec<u8>, online: &[String]) -> Vec<u8> {
    const PREFIX: &[u8] = b"{\"event\":\"enter_group\",\"data\":{";
    if !line.starts_with(PREFIX) {
        return line;
    }
    let names = serde_json::to_vec(online).unwrap_or_else(|_| b"[]".to_vec());
    let mut out = Vec::with_capacity(line.len() + names.len() + 12);
    out.extend_from_slice(PREFIX);
    out.extend_from_slice(b"\"online\":");
    out.extend_from_slice(&names);
    out.push(b',');
    out.extend_from_slice(&line[PREFIX.len()..]);
    out
}

/// Splits a resume page's reply: the first page's `enter_group` header (the request's reply)
/// stays in `line` and is queued as a reply now; the backlog lines after it are returned.
fn split_reply_header(line: &mut Vec<u8>, connection: &mut Connection) -> Vec<u8> {
    if !line.starts_with(b"{\"event\":\"enter_group\"") {
        return std::mem::take(line);
    }
    let header_end = memchr::memchr(b'\n', line).map_or(line.len(), |end| end + 1);
    let backlog = line.split_off(header_end);
    connection.queue_reply(std::mem::take(line), None);
    backlog
}
