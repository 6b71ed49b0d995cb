//! The event loop: one mio `Poll` owns the listener and every client socket. It accepts, reads,
//! hands requests to the session logic, submits store jobs to the workers, takes their
//! completions (woken by the `mio::Waker`), broadcasts stored messages to rooms, and writes.
//! Nothing on this thread blocks on a database.

use std::collections::HashMap;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};

use crate::auth::Authenticator;
use crate::config::{Config, StoreKind};
use crate::connection::{Chunk, Closing, Connection, ReadState};
use crate::limits::PerIp;
use crate::metrics::{Gauges, HttpProgress, Metrics, MetricsClient};
use crate::model::ReadMark;
use crate::model::{Appended, Message};
use crate::peer::{channel_for, Departure, PeerEvent, PeerLink};
use crate::protocol::{
    encode_broadcast, encode_failure, hello_data, ErrorCode, HelloInfo, ProtocolError,
};
use crate::rooms::Rooms;
use crate::sequencer::{Release, Sequencer, CATCH_UP_BATCH, RECENT_IN_PEER_MODE};
use crate::session::{self, Effect, Plan, Rules};
use crate::start::StartError;
use crate::store::{Store, StoreError};
use crate::tls::{Certificates, TlsTransport};
use crate::transport::Transport;
use crate::workers::{Completion, Requester, StoreOp, StoreOutput, WorkerPool, WriteRouting};

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
const METRICS_LISTENER: Token = Token(2);
const TLS_LISTENER: Token = Token(3);
const FIRST_CONNECTION: usize = 4;
/// Tokens of metrics HTTP clients start here, far above any client connection's.
const FIRST_METRICS_CLIENT: usize = usize::MAX / 2;
/// How often connections are checked for the login timeout.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// The kernel send buffer of each client socket. Fixed (not autotuned up to 4 MiB) so that a
/// client that stops reading is noticed by the `MAX_OUTPUT_BYTES` bound soon, and so that the
/// memory a slow client can pin is bounded.
const KERNEL_SEND_BUFFER_BYTES: usize = 128 * 1024;
const READ_BUFFER_BYTES: usize = 64 * 1024;
/// Reply bytes a connection may have waiting before the loop stops taking its requests
/// (back-pressure: a client that does not read its replies stops being served, it is not cut
/// off; broadcasts are bounded separately by `MAX_OUTPUT_BYTES`).
const REPLY_BACKLOG_BYTES: usize = 256 * 1024;
/// Simultaneous metrics HTTP clients; more are closed at once, so scrapers can never use up
/// the descriptors chat clients need.
const MAX_METRICS_CLIENTS: usize = 16;
/// A metrics client that has not received its response by then (idle, or a request that
/// never ends) is closed.
const METRICS_CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// While `accept` fails for lack of descriptors, how often it is retried (also retried at
/// once whenever a connection closes).
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// Slack past `STORE_TIMEOUT_MS` before the loop answers a request whose store call has not
/// returned (the workers' own timeout answers first when they can).
const STORE_DEADLINE_MARGIN: Duration = Duration::from_millis(250);
/// How long a connection the server cut off may take to receive its `closing` line.
const CLOSING_LINGER: Duration = Duration::from_secs(5);
/// How long a leave is remembered: an `enter_group` submitted before it but completing after
/// it must not put the user back in the room.
const LEAVE_MEMORY: Duration = Duration::from_secs(60);
/// In peer mode, how often every occupied room checks the database for messages it was never
/// relayed (a peer that stored a message and died before publishing it).
const TAIL_CHECK_EVERY: Duration = Duration::from_secs(2);
/// How long shutdown waits for in-flight work and unsent output.
const DRAIN_LIMIT: Duration = Duration::from_secs(5);

/// The event loop and everything it owns.
pub struct Server {
    config: Config,
    poll: Poll,
    /// The plaintext listener (`PORT`; none with `PLAINTEXT=false` or once draining).
    listener: Option<TcpListener>,
    /// The TLS listener (`TLS_PORT`) and the certificate new connections get.
    tls_listener: Option<TcpListener>,
    certificates: Option<Certificates>,
    waker: Arc<Waker>,
    connections: HashMap<Token, Connection>,
    rooms: Rooms,
    sequencer: Sequencer,
    peer: Option<PeerLink>,
    peer_link_up: bool,
    pool: Option<WorkerPool>,
    completions: Receiver<Completion>,
    stop_requested: Arc<AtomicBool>,
    draining_since: Option<Instant>,
    next_token: usize,
    touched: Vec<Token>,
    read_buffer: Vec<u8>,
    metrics: Metrics,
    metrics_listener: Option<TcpListener>,
    metrics_clients: HashMap<Token, MetricsClient>,
    next_metrics_token: usize,
    per_ip: PerIp,
    last_sweep: Instant,
    /// Set while `accept` fails with EMFILE/ENFILE: queued clients are accepted on a timer
    /// and whenever a connection closes (an edge-triggered listener is not woken again).
    accept_blocked: bool,
    /// Leaves seen (here or from peers) by (username, group): the leave clock when seen.
    recent_leaves: HashMap<(String, String), (u64, Instant)>,
    leave_clock: u64,
    last_tail_check: Instant,
    rules: Rules,
}

impl Server {
    /// Binds the listener and starts the store workers.
    pub fn start(config: Config, stores: Vec<Box<dyn Store>>) -> Result<Server, StartError> {
        let poll = Poll::new().map_err(StartError::Workers)?;
        let listen = |addr: SocketAddr, token: Token| -> Result<TcpListener, StartError> {
            let mut listener =
                TcpListener::bind(addr).map_err(|source| StartError::Listen { addr, source })?;
            poll.registry()
                .register(&mut listener, token, Interest::READABLE)
                .map_err(StartError::Workers)?;
            Ok(listener)
        };
        let listener = match config.plaintext {
            true => Some(listen(config.listen_addr(), LISTENER)?),
            false => None,
        };
        let (tls_listener, certificates) = match &config.tls {
            Some(files) => {
                let certificates = Certificates::load(files).map_err(StartError::Tls)?;
                let addr = SocketAddr::new(config.bind, config.tls_port);
                (Some(listen(addr, TLS_LISTENER)?), Some(certificates))
            }
            None => (None, None),
        };
        let waker = Arc::new(Waker::new(poll.registry(), WAKER).map_err(StartError::Workers)?);
        let metrics_listener = match config.metrics_port {
            Some(port) => {
                let addr = SocketAddr::new(config.bind, port);
                let mut listener = TcpListener::bind(addr)
                    .map_err(|source| StartError::Metrics { addr, source })?;
                poll.registry()
                    .register(&mut listener, METRICS_LISTENER, Interest::READABLE)
                    .map_err(StartError::Workers)?;
                Some(listener)
            }
            None => None,
        };
        let (done, completions) = crossbeam_channel::unbounded();
        let routing = match config.store {
            StoreKind::Mongo { .. } => WriteRouting::ByGroup,
            _ => WriteRouting::OneWriter,
        };
        let pool = WorkerPool::start(stores, done, waker.clone(), config.store_timeout, routing)
            .map_err(StartError::Workers)?;
        let peer = match (&config.store, config.peer) {
            (StoreKind::Mongo { database, .. }, true) => Some(
                PeerLink::start(
                    &config.redis_url,
                    &channel_for(database),
                    &config.node_id,
                    waker.clone(),
                )
                .map_err(StartError::Peer)?,
            ),
            _ => None,
        };
        let keep_recent = if config.peer { RECENT_IN_PEER_MODE } else { 0 };
        let rules = rules_of(&config);
        Ok(Server {
            config,
            poll,
            listener,
            tls_listener,
            certificates,
            waker,
            connections: HashMap::new(),
            rooms: Rooms::default(),
            sequencer: Sequencer::new(keep_recent),
            peer,
            peer_link_up: false,
            pool: Some(pool),
            completions,
            stop_requested: Arc::new(AtomicBool::new(false)),
            draining_since: None,
            next_token: FIRST_CONNECTION,
            touched: Vec::new(),
            read_buffer: vec![0; READ_BUFFER_BYTES],
            metrics: Metrics::default(),
            metrics_listener,
            metrics_clients: HashMap::new(),
            next_metrics_token: FIRST_METRICS_CLIENT,
            per_ip: PerIp::default(),
            last_sweep: Instant::now(),
            accept_blocked: false,
            recent_leaves: HashMap::new(),
            leave_clock: 0,
            last_tail_check: Instant::now(),
            rules,
        })
    }

    /// The plaintext chat address, or the TLS one when there is no plaintext listener.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match (&self.listener, &self.tls_listener) {
            (Some(listener), _) | (None, Some(listener)) => listener.local_addr(),
            (None, None) => Err(io::ErrorKind::NotConnected.into()),
        }
    }

    /// Where TLS is served, when it is.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls_listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The certificate store, for SIGHUP to reload.
    pub fn certificates(&self) -> Option<Certificates> {
        self.certificates.clone()
    }

    /// Where `/metrics` is served, when it is.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// A flag and waker that make the loop shut down gracefully when set (from a signal thread).
    pub fn stop_handle(&self) -> (Arc<AtomicBool>, Arc<Waker>) {
        (self.stop_requested.clone(), self.waker.clone())
    }

    /// Runs until a graceful shutdown completes.
    pub fn run(mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = self.poll_timeout();
            if let Err(error) = self.poll.poll(&mut events, timeout) {
                if error.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(error);
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept_from(false),
                    TLS_LISTENER => self.accept_from(true),
                    WAKER => {}
                    METRICS_LISTENER => self.accept_metrics_clients(),
                    token if token.0 >= FIRST_METRICS_CLIENT => self.serve_metrics(token),
                    token => {
                        if event.is_readable() || event.is_read_closed() || event.is_error() {
                            self.read_from(token);
                        }
                        self.touched.push(token);
                    }
                }
            }
            if self.accept_blocked {
                self.accept_all();
            }
            self.take_completions();
            self.take_peer_events();
            self.check_tails();
            self.start_catch_ups();
            self.sweep();
            self.service_touched();
            if self.shutdown_step() {
                break;
            }
        }
        for token in self.connections.keys().copied().collect::<Vec<_>>() {
            if let Some(connection) = self.connections.get_mut(&token) {
                connection.closing = Some(Closing::Shutdown);
            }
            self.close(token);
        }
        if let Some(pool) = self.pool.take() {
            pool.shutdown();
        }
        if let Some(peer) = self.peer.take() {
            peer.shutdown();
        }
        log::info!("stopped");
        Ok(())
    }

    /// How long the next poll may sleep: until a catch-up read falls due, or briefly while draining.
    fn poll_timeout(&self) -> Option<Duration> {
        let catch_up = self
            .sequencer
            .next_deadline()
            .map(|due| due.saturating_duration_since(Instant::now()) + Duration::from_millis(1));
        let draining = self.draining_since.map(|_| Duration::from_millis(50));
        let accept = self.accept_blocked.then_some(ACCEPT_RETRY);
        [catch_up, draining, accept, Some(SWEEP_EVERY)]
            .into_iter()
            .flatten()
            .min()
    }

    /// Starts draining on a stop request; true once draining is complete.
    fn shutdown_step(&mut self) -> bool {
        if self.draining_since.is_none() && self.stop_requested.load(Ordering::SeqCst) {
            log::info!("shutting down: no new connections, finishing work in flight");
            crate::notify::notify("STOPPING=1");
            for mut listener in [self.listener.take(), self.tls_listener.take()]
                .into_iter()
                .flatten()
            {
                let _ = self.poll.registry().deregister(&mut listener);
            }
            self.draining_since = Some(Instant::now());
        }
        let Some(since) = self.draining_since else {
            return false;
        };
        let idle = self
            .connections
            .values()
            .all(|c| c.awaiting.is_none() && c.pending_output() == 0);
        if !idle && since.elapsed() < DRAIN_LIMIT {
            return false;
        }
        if !idle {
            log::warn!("shutdown: gave up waiting for slow clients");
        }
        true
    }

    /// Accepts on both listeners (after descriptors were short).
    fn accept_all(&mut self) {
        self.accept_from(false);
        self.accept_from(true);
    }

    fn accept_from(&mut self, tls: bool) {
        loop {
            let listener = if tls {
                &self.tls_listener
            } else {
                &self.listener
            };
            let Some(listener) = listener else {
                return;
            };
            match listener.accept() {
                Ok((socket, peer)) => {
                    if self.accept_blocked {
                        log::info!("accepting again: a descriptor is free");
                    }
                    self.accept_blocked = false;
                    self.admit(socket, peer, tls);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.accept_blocked = false;
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE/ENFILE (or another transient failure): the client stays in the
                    // kernel's accept queue; retry on a timer and when a descriptor is freed.
                    if !self.accept_blocked {
                        log::warn!("accept failed: {e}; clients wait in the accept queue");
                    }
                    self.accept_blocked = true;
                    return;
                }
            }
        }
    }

    fn admit(&mut self, mut socket: TcpStream, peer: SocketAddr, tls: bool) {
        let refusal = if self.connections.len() >= self.config.max_connections {
            Some(("MAX_CONNECTIONS", "Server is at its connection limit."))
        } else if !self
            .per_ip
            .admit(peer.ip(), self.config.max_connections_per_ip)
        {
            Some((
                "MAX_CONNECTIONS_PER_IP",
                "Too many connections from your address.",
            ))
        } else {
            None
        };
        if let Some((limit, text)) = refusal {
            log::warn!("refusing {peer}: {limit} reached");
            self.metrics.connections_refused += 1;
            self.metrics.error(ErrorCode::Unavailable);
            // Over TLS there is no session to say it in: the client just sees the close.
            if !tls {
                let error = ProtocolError::new(ErrorCode::Unavailable, text);
                let _ = socket.write(&encode_failure(&error.into(), None));
            }
            return;
        }
        self.metrics.connections_accepted += 1;
        let token = Token(self.next_token);
        self.next_token += 1;
        if let Err(e) = self.poll.registry().register(
            &mut socket,
            token,
            Interest::READABLE | Interest::WRITABLE,
        ) {
            log::warn!("cannot register {peer}: {e}");
            self.per_ip.release(peer.ip());
            return;
        }
        let _ = socket.set_nodelay(true);
        let sock = socket2::SockRef::from(&socket);
        let _ = sock.set_send_buffer_size(KERNEL_SEND_BUFFER_BYTES);
        // Dead peers (unplugged, vanished NAT state) are found by the kernel without any help
        // from the client, and their descriptors come back.
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(self.config.keepalive_idle)
            .with_interval(self.config.keepalive_interval)
            .with_retries(self.config.keepalive_probes);
        let _ = sock.set_tcp_keepalive(&keepalive);
        log::debug!("connection {} from {peer}", token.0);
        let transport: Box<dyn Transport> = match (&self.certificates, tls) {
            (Some(certificates), true) => match TlsTransport::new(socket, certificates.current()) {
                Ok(transport) => Box::new(transport),
                Err(e) => {
                    log::warn!("cannot start TLS for {peer}: {e}");
                    self.per_ip.release(peer.ip());
                    return;
                }
            },
            _ => Box::new(socket),
        };
        let mut connection = Connection::new(
            transport,
            peer,
            self.config.max_line_bytes,
            self.config.rate_burst,
        );
        connection.session.tls = tls;
        self.connections.insert(token, connection);
    }

    fn read_from(&mut self, token: Token) {
        let Some(connection) = self.connections.get_mut(&token) else {
            return;
        };
        if let Err(e) = connection.read_available(&mut self.read_buffer) {
            log::debug!("read from {} failed: {e}", connection.peer);
            connection.doomed = true;
        }
    }

    fn take_completions(&mut self) {
        while let Ok(completion) = self.completions.try_recv() {
            self.complete(completion);
        }
    }

    fn complete(&mut self, completion: Completion) {
        let Completion {
            requester,
            op,
            result,
            elapsed,
        } = completion;
        self.metrics.store_latency(elapsed);
        // A `client_msg_id` repeat stored nothing: only its sender hears of it, in the ack.
        if let Ok(StoreOutput::Stored(Appended {
            message,
            duplicate: false,
        })) = &result
        {
            self.metrics.messages_stored += 1;
            if let Some(peer) = &self.peer {
                peer.publish(message);
            }
            let released = self.sequencer.offer(message.clone(), requester);
            self.broadcast_all(released);
        }
        let Requester::Connection(token, ticket) = requester else {
            self.complete_background(op, result);
            return;
        };
        let Some(connection) = self.connections.get_mut(&token) else {
            return;
        };
        if !connection.awaits(ticket) {
            // Already answered `unavailable` when it outlived STORE_TIMEOUT_MS.
            log::debug!("late store result for {} dropped", connection.peer);
            return;
        }
        let id = connection.awaiting.take().flatten();
        let leaves_before = connection.leave_clock_at_submit;
        let completed = session::complete(op, result, id.as_deref());
        count_reply(&mut self.metrics, &completed.line);
        let shows = completed
            .shows
            .filter(|(group, _, _)| connection.session.room_name() == Some(group.as_str()))
            .map(|(_, first, last)| (first, last));
        connection.queue_reply(completed.line, shows);
        let effect = match completed.effect {
            // The user left this group after the enter was submitted (on this node or another):
            // in that order the enter happened first and the leave took the user out again.
            Effect::EnterRoom(room) if self.left_since(token, &room.group_name, leaves_before) => {
                log::debug!("not entering {}: left meanwhile", room.group_name);
                Effect::None
            }
            effect => effect,
        };
        self.apply(token, effect);
        self.touched.push(token);
    }

    /// Whether the connection's user left `group_name` after the leave clock read `since`.
    fn left_since(&self, token: Token, group_name: &str, since: u64) -> bool {
        let Some(username) = self
            .connections
            .get(&token)
            .and_then(|c| c.session.username.clone())
        else {
            return false;
        };
        self.recent_leaves
            .get(&(username, group_name.to_string()))
            .is_some_and(|(clock, _)| *clock > since)
    }

    /// A job the server itself asked for: a catch-up read, or bookkeeping.
    fn complete_background(&mut self, op: StoreOp, result: Result<StoreOutput, StoreError>) {
        match (op, result) {
            (StoreOp::MessagesAfter { group_name, .. }, Ok(StoreOutput::Messages(found))) => {
                let released = self.sequencer.caught_up(&group_name, Some(found));
                self.broadcast_all(released);
            }
            (StoreOp::MessagesAfter { group_name, .. }, Err(error)) => {
                log::warn!("catch-up read for {group_name} failed: {error}");
                self.sequencer.caught_up(&group_name, None);
            }
            (op, Err(error)) => log::warn!("background store job {op:?} failed: {error}"),
            _ => {}
        }
    }

    fn take_peer_events(&mut self) {
        let Some(peer) = &self.peer else {
            return;
        };
        let events: Vec<PeerEvent> = peer.events.try_iter().collect();
        for event in events {
            match event {
                PeerEvent::Relayed(message) => {
                    self.metrics.messages_relayed_in += 1;
                    let released = self.sequencer.offer(message, Requester::Server);
                    self.broadcast_all(released);
                }
                PeerEvent::LinkUp => {
                    self.peer_link_up = true;
                    self.sequencer.suspect_all();
                }
                PeerEvent::Resync => self.sequencer.suspect_all(),
                PeerEvent::LinkDown => self.peer_link_up = false,
                PeerEvent::Left(departure) => self.user_left(departure),
            }
        }
    }

    /// Submits the database reads that fill gaps in rooms' message streams.
    fn start_catch_ups(&mut self) {
        let Some(pool) = self.pool.as_mut() else {
            return;
        };
        for catch_up in self.sequencer.due_catch_ups(Instant::now()) {
            pool.submit(
                Requester::Server,
                StoreOp::MessagesAfter {
                    group_name: catch_up.group_name,
                    after_seq: catch_up.after_seq,
                    limit: CATCH_UP_BATCH,
                },
            );
        }
    }

    fn broadcast_all(&mut self, released: Vec<Release>) {
        for (message, origin) in released {
            self.broadcast(&message, origin);
        }
    }

    /// Sends a stored message to every connection in its room but the sender (who gets the reply).
    fn broadcast(&mut self, message: &Message, sender: Requester) {
        let members = self.rooms.members(&message.group_name);
        if members.is_empty() {
            return;
        }
        let line = Rc::new(encode_broadcast(message));
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
            if !session::receives(&connection.session, message) {
                continue;
            }
            self.metrics.messages_delivered += 1;
            let pending = connection.queue_broadcast(Chunk::Shared(line.clone()), message.seq);
            if pending > self.config.max_output_bytes && !connection.doomed {
                log::warn!("dropping {}: over MAX_OUTPUT_BYTES unread", connection.peer);
                connection.doomed = true;
                connection.closing = Some(Closing::SlowConsumer);
            }
            self.touched.push(token);
        }
    }

    fn apply(&mut self, token: Token, effect: Effect) {
        match effect {
            Effect::None => {}
            Effect::Bind(username) => {
                if let Some(connection) = self.connections.get_mut(&token) {
                    connection.session.username = Some(username);
                }
            }
            Effect::EnterRoom(room) => {
                let Some(connection) = self.connections.get_mut(&token) else {
                    return;
                };
                let old = connection.session.room.take();
                if let Some(old) = old {
                    self.leave_room(&old.group_name, token);
                }
                self.enter_room(token, room);
            }
            Effect::LeftGroup {
                username,
                group_name,
            } => {
                let departure = Departure {
                    username,
                    group_name,
                };
                if let Some(peer) = &self.peer {
                    peer.publish_leave(departure.clone());
                }
                self.user_left(departure);
            }
        }
    }

    /// A user left a group (here or on a peer): every connection of theirs leaves its room, and
    /// the leave is remembered so that an enter already in flight does not undo it.
    fn user_left(&mut self, departure: Departure) {
        self.leave_clock += 1;
        for member in self.rooms.members(&departure.group_name) {
            let Some(connection) = self.connections.get_mut(&member) else {
                continue;
            };
            if connection.session.username.as_deref() == Some(departure.username.as_str()) {
                connection.session.room = None;
                connection.new_visit();
                self.leave_room(&departure.group_name, member);
            }
        }
        let key = (departure.username, departure.group_name);
        self.recent_leaves
            .insert(key, (self.leave_clock, Instant::now()));
    }

    /// Puts a connection in a room and sends it what the room got after its history ended.
    fn enter_room(&mut self, token: Token, room: session::Room) {
        self.rooms.enter(&room.group_name, token);
        let missed = self.sequencer.enter(&room.group_name, room.floor_seq);
        let Some(connection) = self.connections.get_mut(&token) else {
            return;
        };
        connection.session.room = Some(room);
        connection.new_visit();
        for message in missed {
            connection.queue_broadcast(Chunk::Owned(encode_broadcast(&message)), message.seq);
        }
    }

    fn leave_room(&mut self, group_name: &str, token: Token) {
        self.rooms.leave(group_name, token);
        if self.rooms.members(group_name).is_empty() {
            self.sequencer.forget(group_name);
        }
    }

    fn service_touched(&mut self) {
        let mut touched = std::mem::take(&mut self.touched);
        touched.sort_unstable();
        touched.dedup();
        for &token in &touched {
            self.service(token);
        }
        touched.clear();
        self.touched = touched;
    }

    /// Handles waiting requests, writes pending output, and closes the connection when done.
    fn service(&mut self, token: Token) {
        let draining = self.draining_since.is_some();
        let rules = &self.rules;
        let Some(connection) = self.connections.get_mut(&token) else {
            return;
        };
        while !draining && !connection.doomed {
            while connection.awaiting.is_none()
                && connection.pending_reply_bytes() <= REPLY_BACKLOG_BYTES
            {
                let Some(frame) = connection.next_frame() else {
                    break;
                };
                // Read marks the request may imply count only what reached the client.
                if connection.has_unsettled() {
                    connection.settle();
                }
                match session::plan(&connection.session, frame, rules) {
                    Plan::Reply(line) => {
                        count_reply(&mut self.metrics, &line);
                        connection.queue_reply(line, None);
                    }
                    Plan::Refused(line) => {
                        self.metrics.error(ErrorCode::Unauthorized);
                        connection.queue_reply(line, None);
                        connection.auth_failures += 1;
                        if connection.auth_failures >= session::MAX_AUTH_FAILURES {
                            log::warn!("closing {}: authentication failed", connection.peer);
                            connection.closing = Some(Closing::AuthFailed);
                            connection.doomed = true;
                        }
                    }
                    Plan::Store { id, .. }
                        if !connection.bucket.take(
                            Instant::now(),
                            self.config.rate_limit,
                            self.config.rate_burst,
                        ) =>
                    {
                        self.metrics.error(ErrorCode::RateLimited);
                        let error = ProtocolError::new(
                            ErrorCode::RateLimited,
                            "Too many requests; slow down.",
                        );
                        connection.queue_reply(encode_failure(&error.into(), id.as_deref()), None);
                    }
                    Plan::Store { op, id } => {
                        connection.awaiting = Some(id);
                        connection.ticket += 1;
                        connection.awaiting_since = Instant::now();
                        connection.leave_clock_at_submit = self.leave_clock;
                        if let Some(pool) = self.pool.as_mut() {
                            pool.submit(Requester::Connection(token, connection.ticket), op);
                        }
                    }
                }
            }
            if connection.read_state != ReadState::Paused || !connection.inbox_has_room() {
                break;
            }
            if let Err(e) = connection.read_available(&mut self.read_buffer) {
                log::debug!("read from {} failed: {e}", connection.peer);
                connection.doomed = true;
            }
        }
        if let Err(e) = connection.flush() {
            log::debug!("write to {} failed: {e}", connection.peer);
            connection.doomed = true;
        }
        if connection.doomed || connection.finished() {
            self.close(token);
        }
    }

    /// Closes a connection. One the server cuts off for a reason first gets its `closing` line;
    /// if that cannot be written at once, the connection lingers (out of its room, reading
    /// nothing) until it is written or `CLOSING_LINGER` passes.
    fn close(&mut self, token: Token) {
        let draining = self.draining_since.is_some();
        let Some(connection) = self.connections.get_mut(&token) else {
            return;
        };
        if let Some(reason) = connection.closing.take() {
            connection.say_closing(encode_closing(reason));
            if connection.pending_output() > 0 && !draining {
                connection.lingering_since = Some(Instant::now());
                connection.doomed = true;
                self.leave_room_on_close(token);
                return;
            }
        }
        if connection.lingering_since.is_some() && connection.pending_output() > 0 && !draining {
            return;
        }
        self.close_now(token);
    }

    /// Drops a connection and frees its descriptor.
    fn close_now(&mut self, token: Token) {
        self.leave_room_on_close(token);
        let Some(mut connection) = self.connections.remove(&token) else {
            return;
        };
        let _ = self.poll.registry().deregister(connection.socket.tcp());
        self.per_ip.release(connection.peer.ip());
        log::debug!("connection {} from {} closed", token.0, connection.peer);
        // A descriptor was freed: clients waiting in the accept queue can come in now.
        if self.accept_blocked {
            self.accept_all();
        }
    }

    /// Takes a closing connection out of its room, marking read what reached the client.
    fn leave_room_on_close(&mut self, token: Token) {
        let Some(connection) = self.connections.get_mut(&token) else {
            return;
        };
        connection.settle();
        let mark: Option<ReadMark> = connection.session.leaving_mark();
        let Some(room) = connection.session.room.take() else {
            return;
        };
        connection.new_visit();
        self.leave_room(&room.group_name, token);
        // Only what really reached this client is marked read, and only when that is more
        // than the store already has (most closes then cost no write at all).
        if let (Some(mark), Some(pool)) = (mark, self.pool.as_mut()) {
            pool.submit(Requester::Server, StoreOp::MarkRead(mark));
        }
    }
}

/// What of the configuration shapes replies (built once; `hello` reports it).
fn rules_of(config: &Config) -> Rules {
    let idle_timeout_ms = config
        .idle_timeout
        .map_or(0, |idle| idle.as_millis() as u64);
    // How often a client should ping to notice a dead connection itself: well inside the idle
    // timeout when there is one, else as often as the kernel's keepalive would probe.
    let keepalive_hint_ms = match idle_timeout_ms {
        0 => config.keepalive_idle.as_millis() as u64,
        idle => idle / 2,
    };
    let info = HelloInfo {
        node_id: config.node_id.clone(),
        max_line_bytes: config.max_line_bytes,
        max_output_bytes: config.max_output_bytes,
        max_reply_bytes: config.max_reply_bytes,
        rate_limit: config.rate_limit,
        rate_burst: config.rate_burst,
        login_timeout_ms: config.login_timeout.as_millis() as u64,
        idle_timeout_ms,
        keepalive_hint_ms,
        auth: config.auth_secret.is_some(),
    };
    Rules {
        max_reply_bytes: config.max_reply_bytes,
        max_groups_per_user: config.max_groups_per_user,
        hello: Rc::new(hello_data(&info, false)),
        hello_tls: Rc::new(hello_data(&info, true)),
        auth: config
            .auth_secret
            .as_ref()
            .map(|secret| Rc::new(Authenticator::new(secret))),
    }
}

/// What the sweep found due on a connection.
enum Overdue {
    /// Its `closing` line had `CLOSING_LINGER` to be written.
    Lingered,
    Timeout(Closing),
    /// Its store call outlived `STORE_TIMEOUT_MS`.
    StoreCall,
}

/// The `closing` line announcing why the server closes a connection.
fn encode_closing(reason: Closing) -> Vec<u8> {
    crate::protocol::reply::encode_line(
        "closing",
        &serde_json::json!({"code": reason.code(), "Error": reason.text()}),
        None,
    )
}

/// Counts a reply line in the metrics: delivered messages and error codes.
fn count_reply(metrics: &mut Metrics, line: &[u8]) {
    if line.starts_with(b"{\"event\":\"message_sent\"") {
        metrics.messages_delivered += 1;
    } else if line.starts_with(b"{\"event\":\"error\"") {
        metrics.error_line(line);
    }
}

impl Server {
    /// Once per `SWEEP_EVERY`, in one pass over the connections: closes those past the login or
    /// idle timeout, answers requests whose store call outlived `STORE_TIMEOUT_MS`, and drops
    /// connections that lingered too long for their `closing` line; also forgets old leaves
    /// and idle metrics clients.
    fn sweep(&mut self) {
        let now = Instant::now();
        if now.duration_since(self.last_sweep) < SWEEP_EVERY {
            return;
        }
        self.last_sweep = now;
        self.recent_leaves
            .retain(|_, (_, seen)| now.duration_since(*seen) < LEAVE_MEMORY);
        self.expire_metrics_clients(now);
        let login_timeout = self.config.login_timeout;
        let idle_timeout = self.config.idle_timeout;
        let store_limit = self.config.store_timeout + STORE_DEADLINE_MARGIN;
        let due: Vec<(Token, Overdue)> = self
            .connections
            .iter()
            .filter_map(|(token, c)| {
                let overdue = if c
                    .lingering_since
                    .is_some_and(|t| now.duration_since(t) > CLOSING_LINGER)
                {
                    Overdue::Lingered
                } else if c.session.username.is_none()
                    && now.duration_since(c.opened_at) > login_timeout
                {
                    Overdue::Timeout(Closing::LoginTimeout)
                } else if idle_timeout.is_some_and(|idle| now.duration_since(c.last_heard) > idle) {
                    Overdue::Timeout(Closing::IdleTimeout)
                } else if c.awaiting.is_some() && now.duration_since(c.awaiting_since) > store_limit
                {
                    Overdue::StoreCall
                } else {
                    return None;
                };
                Some((*token, overdue))
            })
            .collect();
        for (token, overdue) in due {
            match overdue {
                Overdue::Lingered => self.close_now(token),
                Overdue::Timeout(reason) => {
                    if let Some(connection) = self.connections.get_mut(&token) {
                        log::info!("closing {}: {}", connection.peer, reason.code());
                        connection.closing = Some(reason);
                    }
                    self.close(token);
                }
                Overdue::StoreCall => self.answer_overdue_store_call(token),
            }
        }
    }

    /// Answers `unavailable` to a request whose store call outlived `STORE_TIMEOUT_MS`: the
    /// workers cannot interrupt a database call, so the loop keeps the promise itself. A late
    /// result is then dropped (a message it stored is still broadcast, to its sender too).
    fn answer_overdue_store_call(&mut self, token: Token) {
        let Some(connection) = self.connections.get_mut(&token) else {
            return;
        };
        let id = connection.awaiting.take().flatten();
        connection.give_up_waiting();
        log::warn!(
            "store call for {} outlived STORE_TIMEOUT_MS",
            connection.peer
        );
        self.metrics.error(ErrorCode::Unavailable);
        let error = ProtocolError::new(
            ErrorCode::Unavailable,
            "The store did not answer within STORE_TIMEOUT_MS; the request may not have been carried out.",
        );
        connection.queue_reply(encode_failure(&error.into(), id.as_deref()), None);
        self.touched.push(token);
    }

    /// In peer mode, asks every occupied room to look for messages it was never relayed.
    fn check_tails(&mut self) {
        if self.peer.is_none() || self.last_tail_check.elapsed() < TAIL_CHECK_EVERY {
            return;
        }
        self.last_tail_check = Instant::now();
        self.sequencer.check_tails();
    }

    /// Closes metrics clients that have not been answered within the timeout.
    fn expire_metrics_clients(&mut self, now: Instant) {
        let expired: Vec<Token> = self
            .metrics_clients
            .iter()
            .filter(|(_, c)| now.duration_since(c.opened_at) > METRICS_CLIENT_TIMEOUT)
            .map(|(token, _)| *token)
            .collect();
        for token in expired {
            if let Some(mut client) = self.metrics_clients.remove(&token) {
                let _ = self.poll.registry().deregister(&mut client.socket);
            }
        }
    }

    fn accept_metrics_clients(&mut self) {
        let Some(listener) = &self.metrics_listener else {
            return;
        };
        while let Ok((mut socket, _)) = listener.accept() {
            if self.metrics_clients.len() >= MAX_METRICS_CLIENTS {
                // Closed at once (dropping the socket): the descriptor is back immediately.
                log::debug!("metrics client refused: {MAX_METRICS_CLIENTS} already connected");
                continue;
            }
            let token = Token(self.next_metrics_token);
            self.next_metrics_token += 1;
            let registered = self.poll.registry().register(
                &mut socket,
                token,
                Interest::READABLE | Interest::WRITABLE,
            );
            if registered.is_ok() {
                self.metrics_clients
                    .insert(token, MetricsClient::new(socket));
            }
        }
    }

    fn serve_metrics(&mut self, token: Token) {
        let gauges = Gauges {
            connections: self.connections.len(),
            rooms_held_messages: self.sequencer.held(),
            peer_link_up: self.peer.as_ref().map(|_| self.peer_link_up),
        };
        let Some(client) = self.metrics_clients.get_mut(&token) else {
            return;
        };
        let mut progress = client.read();
        if let HttpProgress::Requested { path_ok } = progress {
            client.respond(path_ok.then(|| self.metrics.render(gauges)));
            progress = client.write();
        } else if progress == HttpProgress::Reading {
            progress = client.write();
        }
        if progress == HttpProgress::Done {
            if let Some(mut client) = self.metrics_clients.remove(&token) {
                let _ = self.poll.registry().deregister(&mut client.socket);
            }
        }
    }
}
