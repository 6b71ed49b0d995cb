//! Delivery to rooms: the rooms here, the sequencer that orders each group's messages (stored
//! here, relayed from peers, read back to fill gaps), broadcasting a released message to its
//! room, held writes (`WRITE_DELAY_MS`), and the relay channels a room needs (watched while it
//! is occupied, unwatched after a linger; the rooms' heads checked against the store).
//! The loop owns one `Delivery` and hands it the connections and the relay link it needs.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use mio::Token;

use super::load::{LoopLoad, WriteDelay};
use super::slab::Slab;
use crate::metrics::Metrics;
use crate::model::Message;
use crate::peer::PeerLink;
use crate::protocol::encode_broadcast;
use crate::rooms::Rooms;
use crate::sequencer::{Sequencer, CATCH_UP_BATCH};
use crate::session;
use crate::workers::{Requester, Work, WorkerPool};

/// In peer mode, how often the occupied groups' newest seqs are read (one batched query) to
/// find messages a peer stored but could not relay (its Redis link is down). A peer killed
/// between storing and publishing is found by its heartbeats stopping (`peer::PEER_SILENT_AFTER`).
const TAIL_CHECK_EVERY: Duration = Duration::from_secs(2);
/// Groups one head-check query names.
const HEADS_PER_QUERY: usize = 1000;
/// How long a group's relay channel stays subscribed after its room here emptied (so a client
/// that leaves and comes back, or room churn, does not subscribe and unsubscribe each time).
const UNWATCH_LINGER: Duration = Duration::from_secs(10);

/// The rooms, their order, held writes and the relay channels they need.
pub(super) struct Delivery {
    pub(super) rooms: Rooms,
    pub(super) sequencer: Sequencer,
    /// Broadcasts held for one write per client (`WRITE_DELAY_MS`, `load.rs`).
    pub(super) write_delay: WriteDelay,
    /// The relay's link to Redis is up (metrics).
    pub(super) link_up: bool,
    /// Groups whose room emptied here, and when to stop receiving their relay channel.
    unwatch_due: HashMap<String, Instant>,
    /// When the rooms' heads were last checked against the store (peer mode).
    last_tail_check: Instant,
    /// Head-check queries not answered yet (a new round starts only after the last one).
    heads_in_flight: usize,
}

impl Delivery {
    /// `keep_recent`: messages each room keeps for late entries (peer mode).
    pub(super) fn new(keep_recent: usize) -> Delivery {
        Delivery {
            rooms: Rooms::default(),
            sequencer: Sequencer::new(keep_recent),
            write_delay: WriteDelay {
                deferred: Vec::new(),
                flush_at: None,
                load: LoopLoad::new(Instant::now()),
            },
            link_up: false,
            unwatch_due: HashMap::new(),
            last_tail_check: Instant::now(),
            heads_in_flight: 0,
        }
    }

    /// Sends a stored message to every connection in its room but the sender (who gets the
    /// reply). `write_delay`: `WRITE_DELAY_MS`, when set.
    pub(super) fn broadcast(
        &mut self,
        connections: &mut Slab,
        metrics: &mut Metrics,
        write_delay: Option<Duration>,
        message: &Message,
        sender: Requester,
    ) {
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
        let write_delay = write_delay.filter(|_| self.write_delay.load.holding());
        let deferring = write_delay.is_some();
        for token in members {
            let Some(connection) = connections.get_mut(&token) else {
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
            metrics.messages_delivered += 1;
            // A client cut off as a slow consumer is closed this turn; other broadcasts may
            // wait for the deferred flush, to leave with the ones after them.
            let cut_off = connection.queue_shared(&line, message.seq);
            if cut_off {
                metrics.slow_consumer_cuts += 1;
            }
            // Marked on the connection in hand (not `Slab::touch`: a second lookup per
            // recipient of every message).
            if cut_off || !deferring {
                if connection.touch() {
                    connections.touched.push(token);
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

    /// Once the deferred flush is due, every connection holding broadcasts is serviced: no
    /// line waits longer than `WRITE_DELAY_MS` plus the turn that is running.
    pub(super) fn release_deferred(&mut self, connections: &mut Slab) {
        if self
            .write_delay
            .flush_at
            .is_none_or(|due| due > Instant::now())
        {
            return;
        }
        self.write_delay.flush_at = None;
        for token in self.write_delay.deferred.drain(..) {
            if let Some(connection) = connections.get_mut(&token) {
                connection.undefer();
                if connection.touch() {
                    connections.touched.push(token);
                }
            }
        }
    }

    /// Puts a connection in a room and sends it what the room got after its history ended.
    pub(super) fn enter_room(
        &mut self,
        connections: &mut Slab,
        peer: Option<&PeerLink>,
        token: Token,
        room: session::Room,
    ) {
        if self.rooms.enter(&room.group_name, token) {
            // The first connection here in this room: receive the group's relay channel (a
            // pending unwatch is cancelled; watching twice is harmless).
            self.unwatch_due.remove(&room.group_name);
            if let Some(peer) = peer {
                peer.watch(&room.group_name);
            }
        }
        let missed = self.sequencer.enter(&room.group_name, room.floor_seq);
        let Some(connection) = connections.get_mut(&token) else {
            return;
        };
        connection.enter_room(room);
        for message in missed {
            if connection.queue_broadcast(encode_broadcast(&message), message.seq) {
                break;
            }
        }
    }

    /// Takes a connection out of a room's registry. When the room emptied, the replies held
    /// with its messages are returned (they go out now: the room they waited for is gone).
    pub(super) fn leave_room(
        &mut self,
        peers: bool,
        group_name: &str,
        token: Token,
    ) -> Vec<Requester> {
        if !self.rooms.leave(group_name, token) {
            return Vec::new();
        }
        // Unsubscribed only after a linger, so enter/leave churn does not thrash Redis.
        if peers {
            self.unwatch_due
                .insert(group_name.to_string(), Instant::now() + UNWATCH_LINGER);
        }
        self.sequencer.forget(group_name)
    }

    /// Unsubscribes from the channels of groups whose room stayed empty for the linger.
    pub(super) fn unwatch_idle_groups(&mut self, peer: Option<&PeerLink>) {
        let now = Instant::now();
        let due: Vec<String> = self
            .unwatch_due
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(group, _)| group.clone())
            .collect();
        for group in due {
            self.unwatch_due.remove(&group);
            if let Some(peer) = peer {
                peer.unwatch(&group);
            }
        }
    }

    /// In peer mode, asks the database for the newest seq of every occupied group in one
    /// batched query per `HEADS_PER_QUERY` groups; only groups found behind then read messages.
    pub(super) fn check_tails(&mut self, pool: &mut WorkerPool, metrics: &mut Metrics) {
        if self.heads_in_flight > 0 || self.last_tail_check.elapsed() < TAIL_CHECK_EVERY {
            return;
        }
        self.last_tail_check = Instant::now();
        let occupied = self.sequencer.occupied();
        for chunk in occupied.chunks(HEADS_PER_QUERY) {
            self.heads_in_flight += 1;
            metrics.head_checks += 1;
            pool.submit(Requester::Server, Work::Heads(chunk.to_vec()));
        }
    }

    /// A head check answered.
    pub(super) fn heads_answered(
        &mut self,
        result: Result<Vec<(String, u64)>, crate::store::StoreError>,
    ) {
        self.heads_in_flight = self.heads_in_flight.saturating_sub(1);
        match result {
            Ok(heads) => self.sequencer.heads_seen(heads),
            Err(error) => log::warn!("head check failed: {error}"),
        }
    }

    /// Submits the database reads that fill gaps in rooms' message streams, on at most half
    /// the `workers` at once (requests keep the rest).
    pub(super) fn start_catch_ups(
        &mut self,
        pool: &mut WorkerPool,
        metrics: &mut Metrics,
        workers: usize,
    ) {
        let most = (workers / 2).max(1);
        let room = most.saturating_sub(self.sequencer.fetching());
        for catch_up in self.sequencer.due_catch_ups(Instant::now(), room) {
            metrics.catch_ups += 1;
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
}
