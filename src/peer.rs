//! Peer relay: in peer mode, stored messages go to the other instances through Redis pub/sub.
//!
//! Two threads own the Redis side so the event loop never waits on it. The publisher takes this
//! node's stored messages from a channel and `PUBLISH`es them; the subscriber `SUBSCRIBE`s, and
//! hands other nodes' messages (its own are recognised by node id and dropped) and link state
//! changes to the loop through a channel and the `mio::Waker`. Both reconnect with back-off and
//! log each state change once. Nothing is queued across an outage: what the publisher could not
//! send is dropped, and once it can publish again it sends a resync notice. Subscribers treat
//! that notice, and their own reconnection, as "read what you missed from the database".
//! Leaves travel the same way, so a user who leaves a group on one instance is taken out of
//! the group's room on every instance.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use mio::Waker;
use serde::{Deserialize, Serialize};

use crate::model::Message;

/// The Redis channel the instances of one deployment (one database) share.
pub fn channel_for(database: &str) -> String {
    format!("noomnim:{database}:messages")
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
#[derive(Debug)]
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
}

/// A user who left a group (and so must leave its room everywhere).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Departure {
    pub username: String,
    pub group_name: String,
}

/// What this node relays.
#[derive(Debug, Clone)]
enum Relay {
    Message(Message),
    Left(Departure),
}

/// One relayed item on the wire: a message, a leave, or (neither) "resync from the store".
#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    node: String,
    message: Option<Message>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    left: Option<Departure>,
}

/// The loop's handle on the relay threads.
pub struct PeerLink {
    outgoing: Sender<Relay>,
    pub events: Receiver<PeerEvent>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl PeerLink {
    /// Starts the publisher and subscriber threads; nothing here waits for Redis.
    pub fn start(
        redis_url: &str,
        channel: &str,
        node_id: &str,
        waker: Arc<Waker>,
    ) -> std::io::Result<PeerLink> {
        let client = redis::Client::open(redis_url)
            .map_err(|e| std::io::Error::other(format!("REDIS_URL: {e}")))?;
        let (outgoing, to_publish) = crossbeam_channel::bounded(PUBLISH_QUEUE);
        let (deliver, events) = crossbeam_channel::unbounded();
        let stop = Arc::new(AtomicBool::new(false));
        let publisher = Publisher {
            client: client.clone(),
            node_id: node_id.to_string(),
            channel: channel.to_string(),
            queue: to_publish,
            stop: stop.clone(),
        };
        let subscriber = Subscriber {
            client,
            node_id: node_id.to_string(),
            channel: channel.to_string(),
            deliver,
            waker,
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
            outgoing,
            events,
            stop,
            threads,
        })
    }

    /// Queues a message this node stored for the other instances (never blocks).
    pub fn publish(&self, message: &Message) {
        if let Err(TrySendError::Full(_)) = self.outgoing.try_send(Relay::Message(message.clone()))
        {
            log::warn!("peer publish queue full; peers will read the message from the store");
        }
    }

    /// Tells the other instances that a user left a group (never blocks).
    pub fn publish_leave(&self, departure: Departure) {
        if let Err(TrySendError::Full(_)) = self.outgoing.try_send(Relay::Left(departure)) {
            log::warn!("peer publish queue full; a leave was not relayed");
        }
    }

    pub fn shutdown(self) {
        self.stop.store(true, Ordering::SeqCst);
        drop(self.outgoing);
        for thread in self.threads {
            let _ = thread.join();
        }
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
    client: redis::Client,
    node_id: String,
    channel: String,
    queue: Receiver<Relay>,
    stop: Arc<AtomicBool>,
}

impl Publisher {
    fn run(self) {
        let mut link = LinkLog {
            what: "publisher",
            up: None,
        };
        let mut connection: Option<redis::Connection> = None;
        let mut backoff = FIRST_BACKOFF;
        let mut retry_at: Option<Instant> = None;
        let mut dropped = 0u64;
        loop {
            let message = match self.queue.recv_timeout(IDLE_CHECK) {
                Ok(message) => Some(message),
                Err(RecvTimeoutError::Timeout) if self.stop.load(Ordering::SeqCst) => return,
                Err(RecvTimeoutError::Timeout) if dropped > 0 => None,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            if retry_at.is_some_and(|at| Instant::now() < at) {
                dropped += u64::from(message.is_some());
                continue;
            }
            let sent = if dropped > 0 {
                self.publish(&mut connection, None)
                    .and_then(|()| self.publish(&mut connection, message.as_ref()))
            } else {
                self.publish(&mut connection, message.as_ref())
            };
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
                    connection = None;
                    dropped += 1;
                    retry_at = Some(Instant::now() + backoff);
                    backoff = next_backoff(backoff);
                }
            }
        }
    }

    /// Publishes a message or a leave, or with `None` a resync notice.
    fn publish(
        &self,
        connection: &mut Option<redis::Connection>,
        relay: Option<&Relay>,
    ) -> redis::RedisResult<()> {
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
        };
        let payload = serde_json::to_vec(&envelope).map_err(|e| {
            redis::RedisError::from(std::io::Error::other(format!("encoding: {e}")))
        })?;
        if connection.is_none() {
            *connection = Some(self.client.get_connection_with_timeout(CONNECT_TIMEOUT)?);
        }
        let Some(open) = connection.as_mut() else {
            return Ok(());
        };
        redis::cmd("PUBLISH")
            .arg(&self.channel)
            .arg(payload)
            .query::<i64>(open)?;
        Ok(())
    }
}

struct Subscriber {
    client: redis::Client,
    node_id: String,
    channel: String,
    deliver: Sender<PeerEvent>,
    waker: Arc<Waker>,
    stop: Arc<AtomicBool>,
}

impl Subscriber {
    fn run(self) {
        let mut link = LinkLog {
            what: "subscriber",
            up: None,
        };
        let mut backoff = FIRST_BACKOFF;
        let mut reported_up = false;
        while !self.stop.load(Ordering::SeqCst) {
            let mut connection = match self.client.get_connection_with_timeout(CONNECT_TIMEOUT) {
                Ok(connection) => connection,
                Err(error) => {
                    link.down(&error);
                    std::thread::sleep(backoff);
                    backoff = next_backoff(backoff);
                    continue;
                }
            };
            let error = self.listen(&mut connection, &mut link, &mut reported_up, &mut backoff);
            if let Some(error) = error {
                link.down(&error);
            }
            if reported_up {
                self.tell(PeerEvent::LinkDown);
                reported_up = false;
            }
        }
    }

    /// Subscribes and forwards messages until the link fails (the error) or the server stops.
    fn listen(
        &self,
        connection: &mut redis::Connection,
        link: &mut LinkLog,
        reported_up: &mut bool,
        backoff: &mut Duration,
    ) -> Option<redis::RedisError> {
        let mut pubsub = connection.as_pubsub();
        if let Err(error) = pubsub
            .subscribe(&self.channel)
            .and_then(|()| pubsub.set_read_timeout(Some(IDLE_CHECK)))
        {
            return Some(error);
        }
        link.up();
        *backoff = FIRST_BACKOFF;
        *reported_up = true;
        self.tell(PeerEvent::LinkUp);
        while !self.stop.load(Ordering::SeqCst) {
            match pubsub.get_message() {
                Ok(message) => self.forward(message.get_payload_bytes()),
                Err(error) if error.is_timeout() => {
                    if let Err(error) = pubsub.ping::<redis::Value>() {
                        return Some(error);
                    }
                }
                Err(error) => return Some(error),
            }
        }
        None
    }

    fn forward(&self, payload: &[u8]) {
        match serde_json::from_slice::<Envelope>(payload) {
            Ok(envelope) if envelope.node == self.node_id => {}
            Ok(Envelope {
                message: Some(message),
                ..
            }) => self.tell(PeerEvent::Relayed(message)),
            Ok(Envelope {
                left: Some(departure),
                ..
            }) => self.tell(PeerEvent::Left(departure)),
            Ok(Envelope { message: None, .. }) => self.tell(PeerEvent::Resync),
            Err(error) => log::warn!("ignoring a malformed relayed message: {error}"),
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
        };
        let bytes = serde_json::to_vec(&Envelope {
            node: "a".into(),
            message: Some(message.clone()),
            left: None,
        })
        .expect("encode");
        let back: Envelope = serde_json::from_slice(&bytes).expect("decode");
        assert_eq!(back.message, Some(message));
    }
}
