//! The relay's receiving side: one listener thread per Redis shard (one in all for a single
//! server), and the supervisor that owns them.
//!
//! The supervisor reads the topology, starts a listener per shard with the channels that live
//! there (the control channel, the shard's heartbeat channel, the watched groups' channels),
//! routes the loop's watch/unwatch requests to the shard that owns each group's channel, and
//! reports the link up once every shard has confirmed its subscriptions. When any listener
//! fails (a dropped connection, a moved slot after a failover, or its own heartbeats no longer
//! arriving while the connection looks fine), all are stopped, the topology is read again and
//! everything is subscribed afresh; the loop hears `LinkDown` then `LinkUp`, and every room
//! reads what it may have missed from the database.
//!
//! Listeners speak RESP3 over a plain connection: `SUBSCRIBE` or, on a cluster, `SSUBSCRIBE`
//! (one channel per command, as a cluster refuses channels of different slots in one), and
//! read `message` / `smessage` push frames with a short read timeout so they can take commands.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use super::redis_target::{RedisTarget, Topology};
use super::{
    next_backoff, Channels, Command, Delivery, LinkLog, PeerEvent, COMMAND_POLL, CONNECT_TIMEOUT,
    FIRST_BACKOFF, HEARTBEAT_DEADLINE, IDLE_CHECK,
};

/// Why a listener stopped.
#[derive(Debug)]
pub(super) enum Broken {
    Redis(redis::RedisError),
    /// Connected, but our own heartbeats stopped arriving.
    Silent,
}

impl From<redis::RedisError> for Broken {
    fn from(error: redis::RedisError) -> Broken {
        Broken::Redis(error)
    }
}

/// What a listener tells the supervisor.
enum Status {
    Ready,
    Broken(Broken),
}

pub(super) struct Subscriber {
    pub(super) target: RedisTarget,
    pub(super) channels: Channels,
    pub(super) commands: Receiver<Command>,
    /// Groups whose channels this instance wants (kept across reconnects).
    pub(super) watched: HashSet<String>,
    pub(super) delivery: Delivery,
    pub(super) stop: Arc<AtomicBool>,
}

impl Subscriber {
    pub(super) fn run(mut self) {
        let mut link = LinkLog {
            what: "subscriber",
            up: None,
        };
        let mut backoff = FIRST_BACKOFF;
        while !self.stop.load(Ordering::SeqCst) {
            self.take_commands();
            let topology = match self.target.topology(CONNECT_TIMEOUT) {
                Ok(topology) => topology,
                Err(error) => {
                    link.down(&error);
                    std::thread::sleep(backoff);
                    backoff = next_backoff(backoff);
                    continue;
                }
            };
            let mut reported_up = false;
            match self.serve(&topology, &mut link, &mut backoff, &mut reported_up) {
                Some(Broken::Redis(error)) => {
                    link.down(&error);
                    if !reported_up {
                        // It never came up: do not hammer a node that refuses us.
                        std::thread::sleep(backoff);
                        backoff = next_backoff(backoff);
                    }
                }
                Some(Broken::Silent) => {
                    self.delivery
                        .stats
                        .heartbeat_resets
                        .fetch_add(1, Ordering::Relaxed);
                    log::warn!(
                        "peer subscriber: no heartbeat of our own for {HEARTBEAT_DEADLINE:?}; subscribing again"
                    );
                }
                None => {}
            }
            self.delivery.stats.subscribed.store(0, Ordering::Relaxed);
            if reported_up {
                self.delivery.tell(PeerEvent::LinkDown);
            }
        }
    }

    /// Applies watch/unwatch requests to the wanted set (while disconnected).
    fn take_commands(&mut self) {
        while let Ok(command) = self.commands.try_recv() {
            self.note(&command);
        }
    }

    fn note(&mut self, command: &Command) {
        match command {
            Command::Watch(group) => self.watched.insert(group.clone()),
            Command::Unwatch(group) => self.watched.remove(group),
        };
    }

    /// Runs one listener per shard until one breaks or the server stops.
    fn serve(
        &mut self,
        topology: &Topology,
        link: &mut LinkLog,
        backoff: &mut Duration,
        reported_up: &mut bool,
    ) -> Option<Broken> {
        let halt = Arc::new(AtomicBool::new(false));
        let (status_sender, statuses) = crossbeam_channel::unbounded();
        let mut routes: Vec<Sender<Command>> = Vec::new();
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        let control = self.channels.control();
        for (index, shard) in topology.shards.iter().enumerate() {
            let heartbeat = self.channels.heartbeat(topology, index);
            let mut initial = vec![heartbeat.clone()];
            if topology.shard_of(&control) == index && control != heartbeat {
                initial.push(control.clone());
            }
            initial.extend(
                self.watched
                    .iter()
                    .map(|group| self.channels.group(group))
                    .filter(|channel| topology.shard_of(channel) == index),
            );
            let (route, commands) = crossbeam_channel::unbounded();
            routes.push(route);
            let listener = Listener {
                url: shard.url.clone(),
                sharded: self.target.sharded(),
                initial,
                channels: self.channels.clone(),
                commands,
                status: status_sender.clone(),
                delivery: self.delivery.clone(),
                halt: halt.clone(),
                stop: self.stop.clone(),
            };
            match std::thread::Builder::new()
                .name(format!("peer-shard-{index}"))
                .spawn(move || listener.run())
            {
                Ok(thread) => threads.push(thread),
                Err(error) => {
                    log::error!("cannot start a relay listener thread: {error}");
                    halt.store(true, Ordering::SeqCst);
                    break;
                }
            }
        }
        drop(status_sender);
        let mut ready = 0;
        let mut outcome = None;
        while !self.stop.load(Ordering::SeqCst) && !halt.load(Ordering::SeqCst) {
            crossbeam_channel::select! {
                recv(statuses) -> status => match status {
                    Ok(Status::Ready) => {
                        ready += 1;
                        if ready == threads.len() {
                            link.up();
                            *backoff = FIRST_BACKOFF;
                            *reported_up = true;
                            // Every room reads what was published while it was not subscribed.
                            self.delivery.tell(PeerEvent::LinkUp);
                        }
                    }
                    Ok(Status::Broken(broken)) => {
                        outcome = Some(broken);
                        break;
                    }
                    Err(_) => break,
                },
                recv(self.commands) -> command => match command {
                    Ok(command) => {
                        self.note(&command);
                        let group = match &command {
                            Command::Watch(group) | Command::Unwatch(group) => group,
                        };
                        let index = topology.shard_of(&self.channels.group(group));
                        if let Some(route) = routes.get(index) {
                            let _ = route.send(command);
                        }
                    }
                    Err(_) => break,
                },
                default(IDLE_CHECK) => {}
            }
        }
        halt.store(true, Ordering::SeqCst);
        for thread in threads {
            let _ = thread.join();
        }
        outcome
    }
}

/// One shard's subscriptions.
struct Listener {
    url: String,
    sharded: bool,
    initial: Vec<String>,
    channels: Channels,
    commands: Receiver<Command>,
    status: Sender<Status>,
    delivery: Delivery,
    /// Set by the supervisor when another listener broke.
    halt: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

/// One reply read from a subscribed connection.
enum Incoming {
    Message(Vec<u8>),
    /// A (un)subscribe confirmation: its kind and channel.
    Confirmed(String, String),
    Other,
}

impl Listener {
    fn run(self) {
        if let Err(broken) = self.listen() {
            let _ = self.status.send(Status::Broken(broken));
        }
    }

    fn halted(&self) -> bool {
        self.halt.load(Ordering::SeqCst) || self.stop.load(Ordering::SeqCst)
    }

    fn listen(&self) -> Result<(), Broken> {
        // RESP3: messages arrive as push frames, which the connection never mistakes for the
        // reply to a command whose read timed out (it skips one reply per timeout otherwise).
        let info = redis::IntoConnectionInfo::into_connection_info(self.url.as_str())?;
        let settings = info
            .redis_settings()
            .clone()
            .set_protocol(redis::ProtocolVersion::RESP3);
        let client = redis::Client::open(info.set_redis_settings(settings))?;
        let mut connection = client.get_connection_with_timeout(CONNECT_TIMEOUT)?;
        connection.set_read_timeout(Some(COMMAND_POLL))?;
        let mut own_heartbeat = Instant::now();
        for channel in &self.initial {
            self.subscribe(&mut connection, channel, true, &mut own_heartbeat)?;
        }
        self.delivery
            .stats
            .subscribed
            .fetch_add(self.initial.len() as u64, Ordering::Relaxed);
        let _ = self.status.send(Status::Ready);
        let mut last_ping = Instant::now();
        while !self.halted() {
            while let Ok(command) = self.commands.try_recv() {
                let (group, subscribe) = match command {
                    Command::Watch(group) => (group, true),
                    Command::Unwatch(group) => (group, false),
                };
                let channel = self.channels.group(&group);
                self.subscribe(&mut connection, &channel, subscribe, &mut own_heartbeat)?;
                if subscribe {
                    self.delivery
                        .stats
                        .subscribed
                        .fetch_add(1, Ordering::Relaxed);
                    // Confirmed by Redis: anything published from now on arrives; what was
                    // published before is read from the database.
                    self.delivery.tell(PeerEvent::Subscribed(group));
                } else {
                    self.delivery
                        .stats
                        .subscribed
                        .fetch_sub(1, Ordering::Relaxed);
                }
            }
            match connection.recv_response() {
                Ok(value) => self.take(classify(value)?, &mut own_heartbeat),
                Err(error) if error.is_timeout() => {
                    if last_ping.elapsed() >= IDLE_CHECK {
                        // A dead link shows as a failed write; the reply is read like any line.
                        last_ping = Instant::now();
                        connection.send_packed_command(&redis::cmd("PING").get_packed_command())?;
                    }
                }
                Err(error) => return Err(Broken::Redis(error)),
            }
            if own_heartbeat.elapsed() > HEARTBEAT_DEADLINE {
                return Err(Broken::Silent);
            }
        }
        Ok(())
    }

    /// Forwards a message; notes our own heartbeat.
    fn take(&self, incoming: Incoming, own_heartbeat: &mut Instant) {
        if let Incoming::Message(payload) = incoming {
            self.delivery
                .stats
                .bytes_in
                .fetch_add(payload.len() as u64, Ordering::Relaxed);
            if self.delivery.forward(&payload) {
                *own_heartbeat = Instant::now();
            }
        }
    }

    /// (Un)subscribes one channel and waits for Redis to confirm it, forwarding what arrives
    /// meanwhile.
    fn subscribe(
        &self,
        connection: &mut redis::Connection,
        channel: &str,
        subscribe: bool,
        own_heartbeat: &mut Instant,
    ) -> Result<(), Broken> {
        let verb = match (self.sharded, subscribe) {
            (true, true) => "SSUBSCRIBE",
            (true, false) => "SUNSUBSCRIBE",
            (false, true) => "SUBSCRIBE",
            (false, false) => "UNSUBSCRIBE",
        };
        connection.send_packed_command(&redis::cmd(verb).arg(channel).get_packed_command())?;
        let expected = verb.to_ascii_lowercase();
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        loop {
            match connection.recv_response() {
                Ok(value) => match classify(value)? {
                    Incoming::Confirmed(kind, confirmed)
                        if kind == expected && confirmed == channel =>
                    {
                        return Ok(())
                    }
                    incoming => self.take(incoming, own_heartbeat),
                },
                Err(error) if error.is_timeout() && Instant::now() < deadline => {}
                Err(error) => return Err(Broken::Redis(error)),
            }
        }
    }
}

/// Sorts one value read from a subscribed connection.
fn classify(value: redis::Value) -> Result<Incoming, Broken> {
    let (kind, mut data) = match value {
        redis::Value::Push { kind, data } => (kind.to_string(), data),
        redis::Value::ServerError(error) => {
            return Err(Broken::Redis(redis::RedisError::from(error)))
        }
        _ => return Ok(Incoming::Other),
    };
    Ok(match kind.as_str() {
        "message" | "smessage" if data.len() >= 2 => match data.swap_remove(1) {
            redis::Value::BulkString(payload) => Incoming::Message(payload),
            _ => Incoming::Other,
        },
        "subscribe" | "ssubscribe" | "unsubscribe" | "sunsubscribe" => {
            let channel = match data.first() {
                Some(redis::Value::BulkString(bytes)) => {
                    String::from_utf8_lossy(bytes).into_owned()
                }
                _ => String::new(),
            };
            Incoming::Confirmed(kind, channel)
        }
        _ => Incoming::Other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(text: &str) -> redis::Value {
        redis::Value::BulkString(text.as_bytes().to_vec())
    }

    #[test]
    fn messages_and_confirmations_are_told_apart() {
        let message = redis::Value::Push {
            kind: redis::PushKind::SMessage,
            data: vec![bulk("c"), bulk("payload")],
        };
        assert!(matches!(classify(message), Ok(Incoming::Message(p)) if p == b"payload"));
        let confirmed = redis::Value::Push {
            kind: redis::PushKind::SSubscribe,
            data: vec![bulk("c"), redis::Value::Int(1)],
        };
        assert!(
            matches!(classify(confirmed), Ok(Incoming::Confirmed(k, c)) if k == "ssubscribe" && c == "c")
        );
        let pong = redis::Value::SimpleString("PONG".into());
        assert!(matches!(classify(pong), Ok(Incoming::Other)));
    }
}
