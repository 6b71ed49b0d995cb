//! Peer relay: in peer mode, stored messages go to the other instances through Redis pub/sub.
//!
//! Dedicated threads own the Redis side so the event loop never waits on it. The publisher takes
//! this node's stored messages from a channel and `PUBLISH`es them; the subscriber `SUBSCRIBE`s, and
//! hands other nodes' messages (its own are recognised by node id and dropped) and link state
//! changes to the loop through a channel and the `mio::Waker`. Both reconnect with back-off and
//! log each state change once. Nothing is queued across an outage: what the publisher could not
//! send is dropped, and once it can publish again it sends a resync notice. Subscribers treat
//! that notice, and their own reconnection, as "read what you missed from the database".
//! Leaves travel the same way, so a user who leaves a group on one instance is taken out of
//! the group's room on every instance.
//!
//! Channels (`PEER_RELAY=per_group`, the default): messages go to the group's own channel, and
//! an instance subscribes to it only while one of its connections is in that group's room (the
//! loop asks with `watch` / `unwatch`, unwatching after a linger). So relay traffic an
//! instance receives grows with the groups it hosts, not with all traffic. Leaves, resync
//! notices and heartbeats use one control channel every instance subscribes to. Each newly
//! confirmed group subscription is reported (`Subscribed`) so the room reads from the database
//! what was published before the subscription took effect. `PEER_RELAY=shared` keeps the
//! former single channel for everything (for comparison).
//!
//! Health: the publisher sends a heartbeat every second on each shard's heartbeat channel (the
//! control channel on a single server); each shard's listener expects to see its own. If none
//! arrives for `HEARTBEAT_DEADLINE` while the connection looks fine (the known "link up,
//! messages stopped" failure), the subscriber drops its connections, subscribes again and
//! tells the loop to catch up.
//!
//! Redis Cluster (`REDIS_URL=redis+cluster://…`, `redis_target.rs`): channels are sharded
//! (`SPUBLISH` / `SSUBSCRIBE`), each on the master owning its hash slot; the publisher keeps a
//! connection per master and the subscriber a listener thread per master (`subscriber.rs`). Any
//! error (a dead node, a failover's moved slots) makes both read the slot map again.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use mio::Waker;
use serde::{Deserialize, Serialize};

use crate::model::Message;
use redis_target::{RedisTarget, Topology};
use subscriber::Subscriber;

pub mod local;
mod redis_target;
mod subscriber;

/// The Redis channel the instances of one deployment (one database) share in `shared` mode.
pub fn channel_for(database: &str) -> String {
    format!("noomnim:{database}:messages")
}

/// Leaves, resync notices and heartbeats (every instance subscribes).
fn control_channel(database: &str) -> String {
    format!("noomnim:{database}:control")
}

/// One group's messages (`per_group` mode).
fn group_channel(database: &str, group_name: &str) -> String {
    format!("noomnim:{database}:g:{group_name}")
}

/// One group's coalesced activity notices (`per_group` mode): what an instance whose users
/// are members, but not in the room, receives instead of the message stream.
fn activity_channel(database: &str, group_name: &str) -> String {
    format!("noomnim:{database}:a:{group_name}")
}

/// Watch keys starting with this name a group's activity channel instead of its message
/// channel (group names cannot contain control characters, so no group is mistaken for one).
pub const ACTIVITY_KEY: &str = "\u{1}activity:";

/// Where a live feature's relay note goes (`per_group` mode; in `shared` mode everything
/// goes to the one channel): to every instance (the control channel), to the instances
/// hosting a group's room (its message channel, in order with its messages), or to those
/// whose users follow a group's activity (its activity channel).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reach {
    Everyone,
    Room(String),
    Activity(String),
}

/// A live feature's own relay item (`live/`): the relay carries it without knowing it. On the
/// wire it is one key of the envelope, `kind`, whose value is `body`; the feature that
/// publishes a kind is the one that reads it (`PeerEvent::Feature`).
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureNote {
    pub kind: &'static str,
    pub reach: Reach,
    pub body: serde_json::Value,
}

/// How messages are spread over Redis channels (`PEER_RELAY`).
pub use crate::config::RelayMode;

/// How often the publisher sends a heartbeat.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
/// How long the subscriber may go without its own heartbeat before it resubscribes.
const HEARTBEAT_DEADLINE: Duration = Duration::from_secs(5);
/// How long `get_message` waits before the subscriber looks at its commands.
const COMMAND_POLL: Duration = Duration::from_millis(20);

/// Relay counters the metrics endpoint reports (shared with the relay threads).
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Relayed messages received from other instances.
    pub messages_in: AtomicU64,
    /// Payload bytes received from Redis (all channels).
    pub bytes_in: AtomicU64,
    /// Channels subscribed right now.
    pub subscribed: AtomicU64,
    /// Times the subscriber found its heartbeat missing and resubscribed.
    pub heartbeat_resets: AtomicU64,
    /// Milliseconds between publishing and receiving the last own heartbeat.
    pub heartbeat_lag_ms: AtomicU64,
}
/// Messages waiting to be published before new ones are dropped (peers then read them from
/// the database when they notice the gap).
const PUBLISH_QUEUE: usize = 65536;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the subscriber waits for a message before checking the link with a `PING`.
const IDLE_CHECK: Duration = Duration::from_secs(1);
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// What the subscriber tells the event loop.
#[derive(Debug, Clone)]
pub enum PeerEvent {
    /// Another instance stored this message.
    Relayed(Message),
    /// Subscribed (again): anything published meanwhile must be read from the database.
    LinkUp,
    /// A peer could not publish for a while: read what it stored from the database.
    Resync,
    LinkDown,
    /// A user left a group on another instance.
    Left(Departure),
    /// The subscription to this group's channel is confirmed: read what the room may have
    /// missed before it took effect.
    Subscribed(String),
    /// A line for a group's room (a change to its messages, members or the group itself).
    Room(RoomLine),
    /// A live feature's note from another instance (or loop): `kind` names the feature.
    Feature {
        kind: String,
        body: serde_json::Value,
    },
}

/// What the loop asks of the subscriber.
#[derive(Debug)]
enum Command {
    Watch(String),
    Unwatch(String),
}

/// A user who left a group (and so must leave its room everywhere).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Departure {
    pub username: String,
    pub group_name: String,
    /// Why the user is out of the group when it was not their own leave: `removed` or
    /// `banned` (by a moderator).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A line for every connection in a group's room on every instance (`message_edited`,
/// `message_deleted`, `role_changed`, `member_removed`, `group_deleted`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomLine {
    pub group_name: String,
    /// The whole line, as the connections get it (without its newline).
    pub line: String,
    /// The group is gone: after the line every connection leaves the room.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub closes: bool,
}

/// A line for every protocol-3 connection of one user, on every instance (devices in sync:
/// `read_marker`, `joined_group`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserNotice {
    pub username: String,
    /// The whole line, as the connections get it (without its newline).
    pub line: String,
}

/// What this node relays.
#[derive(Debug, Clone)]
enum Relay {
    Message(Message),
    Left(Departure),
    /// "I am alive", with the time it was sent (milliseconds since the Unix epoch).
    Heartbeat(u64),
    /// A live feature's note (where its `reach` says).
    Feature(FeatureNote),
    /// A line for a group's room (on the group's channel, after its messages).
    Room(RoomLine),
}

/// One relayed item on the wire: a message, a leave, a heartbeat, or (none of them) "resync
/// from the store".
#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    node: String,
    message: Option<Message>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    left: Option<Departure>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    heartbeat: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    room: Option<RoomLine>,
    /// A live feature's note, under its kind (`typing`, `user`, `activity`, `presence`: the
    /// keys these had when the envelope named them, so instances of either build relay to
    /// each other).
    #[serde(flatten)]
    features: serde_json::Map<String, serde_json::Value>,
}

fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Where what a loop publishes goes.
enum Outbound {
    /// To the publisher thread, which sends it to Redis.
    Redis(Sender<Relay>),
    /// Straight onto the other loops' event channels (`IO_THREADS` without `PEER`); they are
    /// woken once at the end of the turn (`end_turn`). Sent at once, so anything a loop does
    /// after publishing (a reply written to a client) comes after the event is on every other
    /// loop's channel: a loop reading its channel before its completions never acts on what
    /// such a reply caused before the event that preceded it (a leave, then a message).
    Loops {
        member: local::BusMember,
        unwoken: std::cell::Cell<bool>,
    },
}

/// The loop's handle on the relay threads.
pub struct PeerLink {
    outgoing: Outbound,
    commands: Sender<Command>,
    pub events: Receiver<PeerEvent>,
    pub stats: Arc<RelayStats>,
    pub mode: RelayMode,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl PeerLink {
    /// Starts the publisher and subscriber threads; nothing here waits for Redis.
    pub fn start(
        redis_url: &str,
        database: &str,
        node_id: &str,
        waker: Arc<Waker>,
        mode: RelayMode,
    ) -> std::io::Result<PeerLink> {
        let target = RedisTarget::parse(redis_url)
            .map_err(|e| std::io::Error::other(format!("REDIS_URL: {e}")))?;
        let (outgoing, to_publish) = crossbeam_channel::bounded(PUBLISH_QUEUE);
        let (commands, to_subscriber) = crossbeam_channel::unbounded();
        let (deliver, events) = crossbeam_channel::unbounded();
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(RelayStats::default());
        let channels = Channels {
            database: database.to_string(),
            mode,
        };
        let publisher = Publisher {
            links: Links {
                target: target.clone(),
                topology: None,
                connections: HashMap::new(),
            },
            node_id: node_id.to_string(),
            channels: channels.clone(),
            queue: to_publish,
            stop: stop.clone(),
        };
        let subscriber = Subscriber {
            target,
            channels,
            commands: to_subscriber,
            watched: HashSet::new(),
            delivery: Delivery {
                node_id: node_id.to_string(),
                deliver,
                waker,
                stats: stats.clone(),
                peers: Arc::default(),
            },
            stop: stop.clone(),
        };
        let threads = vec![
            std::thread::Builder::new()
                .name("peer-publish".into())
                .spawn(move || publisher.run())?,
            std::thread::Builder::new()
                .name("peer-subscribe".into())
                .spawn(move || subscriber.run())?,
        ];
        Ok(PeerLink {
            outgoing: Outbound::Redis(outgoing),
            commands,
            events,
            stats,
            mode,
            stop,
            threads,
        })
    }

    /// The link between this process's event loops (`IO_THREADS`): the same interface, over
    /// in-process channels: what this loop publishes goes onto the other loops' channels as
    /// the events their subscribers would have delivered.
    pub fn local(member: local::BusMember) -> std::io::Result<PeerLink> {
        let (commands, _unused) = crossbeam_channel::unbounded();
        // The loop starts linked: nothing can have been missed before it existed.
        if let Some(own) = member.senders.get(member.index) {
            let _ = own.send(PeerEvent::LinkUp);
        }
        let events = member.events.clone();
        Ok(PeerLink {
            outgoing: Outbound::Loops {
                member,
                unwoken: std::cell::Cell::new(false),
            },
            commands,
            events,
            stats: Arc::new(RelayStats::default()),
            mode: RelayMode::Shared,
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
        })
    }

    /// Hands `relay` on; false when the publish queue was full.
    fn relay(&self, relay: Relay) -> bool {
        match &self.outgoing {
            Outbound::Redis(queue) => !matches!(queue.try_send(relay), Err(TrySendError::Full(_))),
            Outbound::Loops { member, unwoken } => {
                let event = match relay {
                    Relay::Message(message) => PeerEvent::Relayed(message),
                    Relay::Left(departure) => PeerEvent::Left(departure),
                    Relay::Feature(note) => PeerEvent::Feature {
                        kind: note.kind.to_string(),
                        body: note.body,
                    },
                    Relay::Room(room) => PeerEvent::Room(room),
                    Relay::Heartbeat(_) => return true,
                };
                member.send_to_others(event);
                unwoken.set(true);
                true
            }
        }
    }

    /// The link between this process's loops, not to Redis (it has no relay gauges).
    pub fn is_local(&self) -> bool {
        matches!(self.outgoing, Outbound::Loops { .. })
    }

    /// End of the loop's turn: the other loops are woken once for what it published.
    pub fn end_turn(&self) {
        if let Outbound::Loops { member, unwoken } = &self.outgoing {
            if unwoken.replace(false) {
                member.wake_others();
            }
        }
    }

    /// Queues a message this node stored for the other instances (never blocks).
    pub fn publish(&self, message: &Message) {
        if !self.relay(Relay::Message(message.clone())) {
            log::warn!("peer publish queue full; peers will read the message from the store");
        }
    }

    /// Tells the other instances that a user left a group (never blocks).
    pub fn publish_leave(&self, departure: Departure) {
        if !self.relay(Relay::Left(departure)) {
            log::warn!("peer publish queue full; a leave was not relayed");
        }
    }

    /// Hands a live feature's note on (never blocks; dropped when the queue is full: a
    /// feature's notes are hints, repeated or made good by the feature itself).
    pub fn publish_feature(&self, note: FeatureNote) {
        self.relay(Relay::Feature(note));
    }

    /// Sends a line to a group's room on every other instance (never blocks).
    pub fn publish_room(&self, room: RoomLine) {
        if !self.relay(Relay::Room(room)) {
            log::warn!("peer publish queue full; a room notice was not relayed");
        }
    }

    /// A room of this group is occupied here: receive its messages (per-group mode).
    pub fn watch(&self, group_name: &str) {
        if self.mode == RelayMode::PerGroup {
            let _ = self.commands.send(Command::Watch(group_name.to_string()));
        }
    }

    /// The group's room has been empty here for a while: stop receiving its messages.
    pub fn unwatch(&self, group_name: &str) {
        if self.mode == RelayMode::PerGroup {
            let _ = self.commands.send(Command::Unwatch(group_name.to_string()));
        }
    }

    pub fn shutdown(self) {
        self.stop.store(true, Ordering::SeqCst);
        self.end_turn();
        drop(self.outgoing);
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}

/// Which Redis channel carries what.
#[derive(Debug, Clone)]
struct Channels {
    database: String,
    mode: RelayMode,
}

impl Channels {
    fn control(&self) -> String {
        match self.mode {
            RelayMode::Shared => channel_for(&self.database),
            RelayMode::PerGroup => control_channel(&self.database),
        }
    }

    /// Where a relayed item is published.
    fn for_relay(&self, relay: Option<&Relay>) -> String {
        match (self.mode, relay) {
            (RelayMode::PerGroup, Some(Relay::Message(message))) => {
                group_channel(&self.database, &message.group_name)
            }
            (RelayMode::PerGroup, Some(Relay::Feature(note))) => match &note.reach {
                Reach::Everyone => self.control(),
                Reach::Room(group_name) => group_channel(&self.database, group_name),
                Reach::Activity(group_name) => activity_channel(&self.database, group_name),
            },
            (RelayMode::PerGroup, Some(Relay::Room(room))) => {
                group_channel(&self.database, &room.group_name)
            }
            _ => self.control(),
        }
    }

    /// The channel a watch key names: a group's messages, or its activity (`ACTIVITY_KEY`).
    fn group(&self, key: &str) -> String {
        match key.strip_prefix(ACTIVITY_KEY) {
            Some(group_name) => activity_channel(&self.database, group_name),
            None => group_channel(&self.database, key),
        }
    }

    /// Shard `index`'s heartbeat channel: the control channel on a single server; on a
    /// cluster one per shard, so each shard's subscriptions are proven alive separately.
    fn heartbeat(&self, topology: &Topology, index: usize) -> String {
        if topology.shards.len() == 1 {
            return self.control();
        }
        topology.channel_on(index, &format!("noomnim:{}:hb", self.database))
    }
}

/// The publisher's Redis connections: one per shard it has published to.
struct Links {
    target: RedisTarget,
    /// Read at first use and again after any error (a failover moves slots).
    topology: Option<Topology>,
    connections: HashMap<String, redis::Connection>,
}

impl Links {
    fn topology(&mut self) -> redis::RedisResult<&Topology> {
        if self.topology.is_none() {
            self.topology = Some(self.target.topology(CONNECT_TIMEOUT)?);
        }
        self.topology
            .as_ref()
            .ok_or_else(|| std::io::Error::other("no topology").into())
    }

    /// Publishes on the shard that owns the channel.
    fn publish(&mut self, channel: &str, payload: &[u8]) -> redis::RedisResult<()> {
        let topology = self.topology()?;
        let url = topology.shards[topology.shard_of(channel)].url.clone();
        if !self.connections.contains_key(&url) {
            let client = redis::Client::open(url.as_str())?;
            let connection = client.get_connection_with_timeout(CONNECT_TIMEOUT)?;
            self.connections.insert(url.clone(), connection);
        }
        let Some(connection) = self.connections.get_mut(&url) else {
            return Ok(());
        };
        let verb = if self.target.sharded() {
            "SPUBLISH"
        } else {
            "PUBLISH"
        };
        let sent = redis::cmd(verb)
            .arg(channel)
            .arg(payload)
            .query::<i64>(connection);
        if sent.is_err() {
            self.connections.remove(&url);
            if self.target.sharded() {
                self.topology = None;
            }
        }
        sent.map(drop)
    }

    /// Where heartbeats go: one channel per shard.
    fn heartbeat_channels(&mut self, channels: &Channels) -> redis::RedisResult<Vec<String>> {
        let topology = self.topology()?;
        Ok((0..topology.shards.len())
            .map(|index| channels.heartbeat(topology, index))
            .collect())
    }
}

/// Doubles a back-off delay up to the maximum.
fn next_backoff(delay: Duration) -> Duration {
    (delay * 2).min(MAX_BACKOFF)
}

/// Logs a link state once per change.
struct LinkLog {
    what: &'static str,
    up: Option<bool>,
}

impl LinkLog {
    fn up(&mut self) {
        if self.up != Some(true) {
            log::info!("peer {}: connected to Redis", self.what);
        }
        self.up = Some(true);
    }

    fn down(&mut self, error: &redis::RedisError) {
        if self.up != Some(false) {
            log::warn!(
                "peer {}: Redis link down ({error}); retrying with back-off",
                self.what
            );
        }
        self.up = Some(false);
    }
}

struct Publisher {
    links: Links,
    node_id: String,
    channels: Channels,
    queue: Receiver<Relay>,
    stop: Arc<AtomicBool>,
}

impl Publisher {
    fn run(mut self) {
        let mut link = LinkLog {
            what: "publisher",
            up: None,
        };
        let mut backoff = FIRST_BACKOFF;
        let mut retry_at: Option<Instant> = None;
        let mut dropped = 0u64;
        let mut last_heartbeat = Instant::now() - HEARTBEAT_EVERY;
        loop {
            let wait = HEARTBEAT_EVERY.saturating_sub(last_heartbeat.elapsed());
            let message = match self.queue.recv_timeout(wait.min(IDLE_CHECK)) {
                Ok(message) => Some(message),
                Err(RecvTimeoutError::Timeout) if self.stop.load(Ordering::SeqCst) => return,
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            if retry_at.is_some_and(|at| Instant::now() < at) {
                dropped += u64::from(message.is_some());
                continue;
            }
            // A message, or after an outage the resync notice even with no message at hand.
            let sent = match (message, dropped) {
                (None, 0) => Ok(()),
                (message, 0) => self.publish(message.as_ref()),
                (message, _) => self
                    .publish(None)
                    .and_then(|()| self.publish(message.as_ref())),
            };
            // Every second whatever the traffic (a busy queue never times out), through the
            // same connection as messages: the subscribers' proof that this path works.
            let sent = sent.and_then(|()| {
                if last_heartbeat.elapsed() < HEARTBEAT_EVERY {
                    return Ok(());
                }
                last_heartbeat = Instant::now();
                self.publish(Some(&Relay::Heartbeat(unix_millis())))
            });
            match sent {
                Ok(()) => {
                    if dropped > 0 {
                        log::info!("peer publisher: {dropped} message(s) not relayed during the outage; peers read them from the store");
                    }
                    link.up();
                    backoff = FIRST_BACKOFF;
                    retry_at = None;
                    dropped = 0;
                }
                Err(error) => {
                    link.down(&error);
                    dropped += 1;
                    retry_at = Some(Instant::now() + backoff);
                    backoff = next_backoff(backoff);
                }
            }
        }
    }

    /// Publishes a message, a leave or a heartbeat (on every shard), or with `None` a resync
    /// notice.
    fn publish(&mut self, relay: Option<&Relay>) -> redis::RedisResult<()> {
        let envelope = Envelope {
            node: self.node_id.clone(),
            message: match relay {
                Some(Relay::Message(message)) => Some(message.clone()),
                _ => None,
            },
            left: match relay {
                Some(Relay::Left(departure)) => Some(departure.clone()),
                _ => None,
            },
            heartbeat: match relay {
                Some(Relay::Heartbeat(sent)) => Some(*sent),
                _ => None,
            },
            room: match relay {
                Some(Relay::Room(room)) => Some(room.clone()),
                _ => None,
            },
            features: match relay {
                Some(Relay::Feature(note)) => {
                    std::iter::once((note.kind.to_string(), note.body.clone())).collect()
                }
                _ => serde_json::Map::new(),
            },
        };
        let payload = serde_json::to_vec(&envelope).map_err(|e| {
            redis::RedisError::from(std::io::Error::other(format!("encoding: {e}")))
        })?;
        if let Some(Relay::Heartbeat(_)) = relay {
            for channel in self.links.heartbeat_channels(&self.channels)? {
                self.links.publish(&channel, &payload)?;
            }
            return Ok(());
        }
        self.links
            .publish(&self.channels.for_relay(relay), &payload)
    }
}

/// How the relay threads hand events to the loop: the channel, the waker, and the counters.
#[derive(Clone)]
struct Delivery {
    node_id: String,
    deliver: Sender<PeerEvent>,
    waker: Arc<Waker>,
    stats: Arc<RelayStats>,
    /// When each other instance's heartbeat was last heard (shared by the cluster listeners).
    peers: Arc<std::sync::Mutex<HashMap<String, Instant>>>,
}

/// An instance whose heartbeats stop for this long is taken for dead: it may have stored a
/// message it never published (killed between the two), so the rooms here read the database
/// once. This, a resync notice, and this node's own relay link coming back are the only
/// reasons an idle room reads the database (besides the batched head check).
pub const PEER_SILENT_AFTER: Duration = Duration::from_secs(3);

impl Delivery {
    /// Hands an envelope to the loop; true when it was this node's own heartbeat.
    fn forward(&self, payload: &[u8]) -> bool {
        match serde_json::from_slice::<Envelope>(payload) {
            Ok(Envelope {
                node,
                heartbeat: Some(sent),
                ..
            }) => {
                let own = node == self.node_id;
                if own {
                    let lag = unix_millis().saturating_sub(sent);
                    self.stats.heartbeat_lag_ms.store(lag, Ordering::Relaxed);
                    // Our own heartbeat arrives every second while the link is healthy: the
                    // moment to notice peers that fell silent.
                    self.notice_silent_peers();
                } else {
                    self.heard_from(node);
                }
                own
            }
            Ok(envelope) if envelope.node == self.node_id => false,
            Ok(Envelope {
                message: Some(message),
                ..
            }) => {
                self.stats.messages_in.fetch_add(1, Ordering::Relaxed);
                self.tell(PeerEvent::Relayed(message));
                false
            }
            Ok(Envelope {
                left: Some(departure),
                ..
            }) => {
                self.tell(PeerEvent::Left(departure));
                false
            }
            Ok(Envelope { features, .. }) if !features.is_empty() => {
                for (kind, body) in features {
                    self.tell(PeerEvent::Feature { kind, body });
                }
                false
            }
            Ok(Envelope {
                room: Some(room), ..
            }) => {
                self.tell(PeerEvent::Room(room));
                false
            }
            Ok(Envelope { message: None, .. }) => {
                self.tell(PeerEvent::Resync);
                false
            }
            Err(error) => {
                log::warn!("ignoring a malformed relayed message: {error}");
                false
            }
        }
    }

    fn heard_from(&self, node: String) {
        if let Ok(mut peers) = self.peers.lock() {
            peers.insert(node, Instant::now());
        }
    }

    /// Forgets peers silent for `PEER_SILENT_AFTER` and, if there were any, tells the loop to
    /// read what they may have stored unannounced.
    fn notice_silent_peers(&self) {
        let silent: Vec<String> = match self.peers.lock() {
            Ok(mut peers) => {
                let silent: Vec<String> = peers
                    .iter()
                    .filter(|(_, heard)| heard.elapsed() > PEER_SILENT_AFTER)
                    .map(|(node, _)| node.clone())
                    .collect();
                for node in &silent {
                    peers.remove(node);
                }
                silent
            }
            Err(_) => return,
        };
        if !silent.is_empty() {
            log::info!("peer(s) {silent:?} fell silent; reading what they may have stored");
            self.tell(PeerEvent::Resync);
        }
    }

    fn tell(&self, event: PeerEvent) {
        if self.deliver.send(event).is_ok() {
            let _ = self.waker.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        assert_eq!(next_backoff(FIRST_BACKOFF), FIRST_BACKOFF * 2);
        assert_eq!(next_backoff(MAX_BACKOFF), MAX_BACKOFF);
    }

    #[test]
    fn envelopes_round_trip() {
        let message = Message {
            id: "0".repeat(24),
            group_name: "g".into(),
            username: "u".into(),
            text: "hi\n\"there\"".into(),
            timestamp: "2026-11-25T00:00:00.000Z".into(),
            seq: 9,
            client_msg_id: Some("k-1".into()),
            ..Message::default()
        };
        let bytes = serde_json::to_vec(&Envelope {
            node: "a".into(),
            message: Some(message.clone()),
            left: None,
            heartbeat: None,
            room: None,
            features: serde_json::Map::new(),
        })
        .expect("encode");
        let back: Envelope = serde_json::from_slice(&bytes).expect("decode");
        assert_eq!(back.message, Some(message));
        assert!(back.features.is_empty());
    }

    /// A live feature's note travels under its kind, as the envelope's own key did before
    /// features declared their notes (`"typing": {...}`), so both builds read each other.
    #[test]
    fn feature_notes_travel_under_their_kind() {
        let body = serde_json::json!({"username": "ann", "group_name": "g"});
        let older = br#"{"node":"a","message":null,"typing":{"username":"ann","group_name":"g"}}"#;
        let back: Envelope = serde_json::from_slice(older).expect("decode");
        assert_eq!(back.features.get("typing"), Some(&body));
        assert!(back.message.is_none() && back.room.is_none());
        let envelope = Envelope {
            node: "b".into(),
            message: None,
            left: None,
            heartbeat: None,
            room: None,
            features: std::iter::once(("typing".to_string(), body.clone())).collect(),
        };
        let text = serde_json::to_string(&envelope).expect("encode");
        assert!(text.contains(r#""typing":{"#), "{text}");
    }
}
