//! The event loop: one mio `Poll` owns the listener and every client socket. It accepts, reads,
//! hands requests to the session logic, submits store jobs to the workers, takes their
//! completions (woken by the `mio::Waker`), broadcasts stored messages to rooms, and writes.
//! Nothing on this thread blocks on a database.
//!
//! This file holds the loop itself, request servicing and closing; by concern, `accept`
//! (listeners and admission), `delivery` (completions, sequencer, rooms, broadcast, peers),
//! `sweep` (timeouts and deadlines) and `metrics_http` (the `/metrics` endpoint).

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
use crate::connection::{Bounds, Closing, Connection, ReadState};
use crate::in_flight::EMBEDDED_PIPELINE_DEPTH;
use crate::limits::{Admission, Refusal};
use crate::metrics::{Gauges, HttpProgress, Metrics, MetricsClient, RelayGauges};
use crate::model::ReadMark;
use crate::model::{Appended, Message};
use crate::ops::dispatch::Plan;
use crate::peer::{Departure, PeerEvent, PeerLink};
use crate::protocol::{
    encode_broadcast, encode_failure, hello_data, ErrorCode, HelloInfo, ProtocolError,
};
use crate::rooms::Rooms;
use crate::sequencer::{Release, Sequencer, CATCH_UP_BATCH, RECENT_IN_PEER_MODE};
use crate::session::{self, Effect, Rules};
use crate::store::{Store, StoreError};
use crate::tls::{Certificates, TlsTransport};
use crate::transport::Transport;
use crate::workers::{Finished, Outcome, Requester, Work, WorkerPool, WriteRouting};

mod accept;
mod activity;
mod delivery;
mod devices;
mod load;
mod manage;
mod metrics_http;
mod presence;
mod start_error;
pub use presence::LoopsPresence;
pub use start_error::StartError;
mod slab;
mod sweep;

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
/// In peer mode, how often the occupied groups' newest seqs are read (one batched query) to
/// find messages a peer stored but could not relay (its Redis link is down). A peer killed
/// between storing and publishing is found by its heartbeats stopping (`peer::PEER_SILENT_AFTER`).
const TAIL_CHECK_EVERY: Duration = Duration::from_secs(2);
/// Groups one head-check query names.
const HEADS_PER_QUERY: usize = 1000;
/// How long a group's relay channel stays subscribed after its room here emptied (so a client
/// that leaves and comes back, or room churn, does not subscribe and unsubscribe each time).
const UNWATCH_LINGER: Duration = Duration::from_secs(10);
/// A resume's next backlog page is read once less than this is waiting to be written, so a
/// resuming connection holds about one page at a time however long its backlog.
const RESUME_LOW_WATER: usize = 64 * 1024;
/// Room left in `MAX_REPLY_BYTES` beside a resume page's lines.
const RESUME_PAGE_MARGIN: usize = 512;
/// How long shutdown waits for in-flight work and unsent output.
const DRAIN_LIMIT: Duration = Duration::from_secs(5);

/// What one event loop shares with the other loops of its process (`IO_THREADS` > 1).
pub struct Siblings {
    /// The in-process link to the other loops (`None` with `PEER`: Redis links them).
    pub bus: Option<crate::peer::local::BusMember>,
    /// Where this loop reports its counters for `/metrics`, and its number.
    pub board: Arc<crate::metrics::MetricsBoard>,
    pub index: usize,
    /// The first loop's certificate store (the first loop loads it).
    pub certificates: Option<Certificates>,
    /// The process's connection counts (`MAX_CONNECTIONS`, `MAX_CONNECTIONS_PER_IP` hold for
    /// the process, not per loop).
    pub admission: Arc<Admission>,
    /// Who is present on which loop (for `enter_group`'s `online`).
    pub presence: Arc<LoopsPresence>,
}

/// A listening socket; `shared`: with SO_REUSEPORT, so that every event loop listens on the
/// same port and the kernel spreads connections over them.
fn bind_listener(addr: SocketAddr, shared: bool) -> io::Result<TcpListener> {
    if !shared {
        return TcpListener::bind(addr);
    }
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(TcpListener::from_std(socket.into()))
}

/// The event loop and everything it owns.
pub struct Server {
    config: Config,
    poll: Poll,
    /// The chat listeners and the certificate new TLS connections get (`accept.rs`).
    listeners: accept::Listeners,
    waker: Arc<Waker>,
    connections: slab::Slab,
    rooms: Rooms,
    sequencer: Sequencer,
    peer: Option<PeerLink>,
    /// What the loop tracks of the relay to other instances (`delivery.rs`).
    relay: delivery::RelayState,
    pool: Option<WorkerPool>,
    completions: Receiver<Finished>,
    stop_requested: Arc<AtomicBool>,
    draining_since: Option<Instant>,
    touched: Vec<Token>,
    /// Broadcasts held for one write per client (`WRITE_DELAY_MS`, `load.rs`).
    write_delay: load::WriteDelay,
    read_buffer: Vec<u8>,
    metrics: Metrics,
    /// The `/metrics` endpoint's own state (`metrics_http.rs`).
    metrics_http: metrics_http::MetricsEndpoint,
    /// Open connections in all and per address, shared with the other loops.
    admission: Arc<Admission>,
    last_sweep: Instant,
    /// Erasures already acted on (and when they were seen), and the erasure log's read point.
    erasures: manage::Erasures,
    /// Where access ended lately: leaves, deleted groups and messages (`manage.rs`).
    access: manage::AccessEnds,
    /// A user's connections here, and typing's relay times (`devices.rs`).
    devices: devices::Devices,
    /// Activity notices' own state (`activity.rs`).
    activity: activity::Activity,
    /// Who is online, here and on the peers (`presence.rs`).
    presence: presence::Presence,
    rules: Rules,
    /// Messages one connection may have with the store at once (`in_flight.rs`).
    pipeline_depth: usize,
    /// The embedded store's lock, held while the server runs (`start::claim`).
    store_lock: Option<std::fs::File>,
}

impl Server {
    /// Binds the listener and starts the store workers.
    pub fn start(config: Config, stores: Vec<Box<dyn Store>>) -> Result<Server, StartError> {
        Server::start_loop(config, stores, None)
    }

    /// One of several event loops (`IO_THREADS`): its listeners share the port with the other
    /// loops' (SO_REUSEPORT: the kernel spreads new connections over them), and `siblings`
    /// says what it shares with them.
    pub fn start_loop(
        config: Config,
        stores: Vec<Box<dyn Store>>,
        siblings: Option<Siblings>,
    ) -> Result<Server, StartError> {
        let (bus, metrics_board, shared_certificates, admission, loops_presence) = match siblings {
            Some(Siblings {
                bus,
                board,
                index,
                certificates,
                admission,
                presence,
            }) => (
                bus,
                Some((board, index)),
                certificates,
                admission,
                (presence, index),
            ),
            None => (None, None, None, Arc::default(), Default::default()),
        };
        let poll = Poll::new().map_err(StartError::Workers)?;
        let shared_port = config.io_threads > 1;
        let listen = |addr: SocketAddr, token: Token| -> Result<TcpListener, StartError> {
            let mut listener = bind_listener(addr, shared_port)
                .map_err(|source| StartError::Listen { addr, source })?;
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
                // One certificate store for all loops: one SIGHUP reload serves every loop.
                let certificates = match shared_certificates {
                    Some(certificates) => certificates,
                    None => Certificates::load(files).map_err(StartError::Tls)?,
                };
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
            (_, false) if bus.is_some() => bus
                .map(PeerLink::local)
                .transpose()
                .map_err(StartError::Workers)?,
            (StoreKind::Mongo { database, .. }, true) => Some(
                PeerLink::start(
                    &config.redis_url,
                    database,
                    &config.node_id,
                    waker.clone(),
                    config.relay_mode,
                )
                .map_err(StartError::Peer)?,
            ),
            _ => None,
        };
        let keep_recent = if peer.is_some() {
            RECENT_IN_PEER_MODE
        } else {
            0
        };
        let rules = rules_of(&config);
        let pipeline_depth = match config.store {
            StoreKind::Mongo { .. } => 1,
            _ => EMBEDDED_PIPELINE_DEPTH,
        };
        Ok(Server {
            pipeline_depth,
            store_lock: None,
            config,
            poll,
            listeners: accept::Listeners {
                plain: listener,
                tls: tls_listener,
                certificates,
                blocked: false,
            },
            waker,
            connections: slab::Slab::default(),
            rooms: Rooms::default(),
            sequencer: Sequencer::new(keep_recent),
            peer,
            relay: delivery::RelayState::new(),
            pool: Some(pool),
            completions,
            stop_requested: Arc::new(AtomicBool::new(false)),
            draining_since: None,
            touched: Vec::new(),
            write_delay: load::WriteDelay {
                deferred: Vec::new(),
                flush_at: None,
                load: load::LoopLoad::new(Instant::now()),
            },
            read_buffer: vec![0; READ_BUFFER_BYTES],
            metrics: Metrics::default(),
            metrics_http: metrics_http::MetricsEndpoint {
                board: metrics_board,
                scrapes: Vec::new(),
                answered: 0,
                listener: metrics_listener,
                clients: HashMap::new(),
                next_token: FIRST_METRICS_CLIENT,
            },
            admission,
            last_sweep: Instant::now(),
            erasures: manage::Erasures::new(),
            access: manage::AccessEnds::default(),
            devices: devices::Devices::default(),
            activity: activity::Activity::default(),
            presence: presence::Presence::shared(loops_presence.0, loops_presence.1),
            rules,
        })
    }

    /// The plaintext chat address, or the TLS one when there is no plaintext listener.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match (&self.listeners.plain, &self.listeners.tls) {
            (Some(listener), _) | (None, Some(listener)) => listener.local_addr(),
            (None, None) => Err(io::ErrorKind::NotConnected.into()),
        }
    }

    /// Where TLS is served, when it is.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.listeners
            .tls
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// The certificate store, for SIGHUP to reload.
    pub fn certificates(&self) -> Option<Certificates> {
        self.listeners.certificates.clone()
    }

    /// Where `/metrics` is served, when it is.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_http
            .listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// This loop's waker (the other loops' bus threads wake it).
    pub fn waker(&self) -> Arc<Waker> {
        self.waker.clone()
    }

    /// Keeps the embedded store's lock for as long as this loop lives (`start::claim`).
    pub fn hold_store_lock(&mut self, lock: Option<std::fs::File>) {
        self.store_lock = lock;
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
            let woke = Instant::now();
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
                        self.touch(token);
                    }
                }
            }
            if self.listeners.blocked {
                self.accept_all();
            }
            // Peer events first: what another loop published before it answered a client is
            // on this channel before anything that answer caused can complete here.
            self.take_peer_events();
            self.take_completions();
            self.check_tails();
            self.unwatch_idle_groups();
            self.start_catch_ups();
            self.sweep();
            self.release_deferred();
            self.release_activity();
            self.service_touched();
            self.presence_from_loops();
            self.answer_scrapes();
            if let Some(peer) = &self.peer {
                peer.end_turn();
            }
            self.write_delay.load.turn(woke, Instant::now());
            if self.shutdown_step() {
                break;
            }
        }
        for token in self.connections.tokens() {
            if let Some(connection) = self.connections.get_mut(&token) {
                connection.announce(Closing::Shutdown);
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
        let accept = self.listeners.blocked.then_some(ACCEPT_RETRY);
        let deferred = self
            .write_delay
            .flush_at
            .map(|due| due.saturating_duration_since(Instant::now()));
        let activity = self
            .activity
            .wake
            .map(|due| due.saturating_duration_since(Instant::now()));
        [
            catch_up,
            draining,
            accept,
            deferred,
            activity,
            Some(SWEEP_EVERY),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Starts draining on a stop request; true once draining is complete.
    fn shutdown_step(&mut self) -> bool {
        if self.draining_since.is_none() && self.stop_requested.load(Ordering::SeqCst) {
            log::info!("shutting down: no new connections, finishing work in flight");
            crate::notify::notify("STOPPING=1");
            for mut listener in [self.listeners.plain.take(), self.listeners.tls.take()]
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
        let idle = self.connections.values().all(Connection::idle);
        if !idle && since.elapsed() < DRAIN_LIMIT {
            return false;
        }
        if !idle {
            log::warn!("shutdown: gave up waiting for slow clients");
        }
        true
    }

    fn read_from(&mut self, token: Token) {
        let Some(connection) = self.connections.get_mut(&token) else {
            return;
        };
        if let Err(e) = connection.read_available(&mut self.read_buffer) {
            log::debug!("read from {} failed: {e}", connection.peer());
            connection.doom();
        }
    }

    fn apply(&mut self, token: Token, effect: Effect) {
        match effect {
            Effect::None => {}
            Effect::Bind(username) => {
                let counts = self
                    .connections
                    .get(&token)
                    .is_none_or(|c| c.session().presence);
                self.index_user(token, &username, counts);
                if let Some(connection) = self.connections.get_mut(&token) {
                    connection.bind(username);
                }
                self.start_activity(token);
            }
            Effect::Watch(groups) => self.watch_groups(token, groups),
            // Applied in `deliver_answers` (the reply line is completed there).
            Effect::Online(effect, _) => self.apply(token, *effect),
            Effect::Presence {
                username,
                online,
                groups,
            } => self.presence_to_rooms(&username, online, groups),
            Effect::JoinedGroup {
                username,
                group_name,
            } => {
                self.joined_activity(&username, &group_name);
                let line = crate::protocol::reply::encode_line(
                    "joined_group",
                    &serde_json::json!({"group_name": group_name}),
                    None,
                );
                self.tell_user(username, line, token);
            }
            Effect::Typing {
                username,
                group_name,
            } => self.typing(
                Departure {
                    username,
                    group_name,
                    reason: None,
                },
                Some(token),
            ),
            Effect::Erased(erased) => self.erased(erased),
            Effect::RoomLine { group_name, line } => {
                self.room_line(&group_name, line, Some(token), false)
            }
            Effect::GroupDeleted { group_name, line } => {
                self.room_line(&group_name, line, Some(token), true)
            }
            Effect::Removed {
                username,
                group_name,
                reason,
                line,
            } => {
                let departure = Departure {
                    username,
                    group_name,
                    reason: Some(reason.to_string()),
                };
                self.removed(departure, line, token);
            }
            Effect::ReadMarker(state) => self.read_marker_rose(token, state),
            Effect::EnterRoom(room) => {
                self.leave_for(token, &room.group_name);
                if room.marker_rose {
                    self.entered_mark(token, &room);
                }
                self.enter_room(token, room);
            }
            Effect::Settings(settings) => {
                let Some(connection) = self.connections.get_mut(&token) else {
                    return;
                };
                connection.apply_settings(settings);
                // Back on protocol 2: no more activity notices (protocol 3's alone).
                let back_to_2 = connection.session().protocol < 3;
                match connection.session().username.clone() {
                    Some(username) if back_to_2 => self.stop_activity(token, &username),
                    _ => self.start_activity(token),
                }
            }
            Effect::Resume(cursor) => {
                self.leave_for(token, &cursor.group_name);
                if let Some(connection) = self.connections.get_mut(&token) {
                    connection.resume_from(cursor);
                }
            }
            // The stream is over; entering is the same as `enter_group`'s (a resume never
            // raises the marker).
            Effect::Resumed(room) => {
                if let Some(connection) = self.connections.get_mut(&token) {
                    connection.stream_done();
                }
                self.apply(token, Effect::EnterRoom(room));
            }
            Effect::LeftGroup {
                username,
                group_name,
            } => {
                let departure = Departure {
                    username,
                    group_name,
                    reason: None,
                };
                if let Some(peer) = &self.peer {
                    peer.publish_leave(departure.clone());
                }
                self.tell_left(&departure, Some(token));
                self.user_left(departure);
            }
        }
    }

    /// Takes a connection out of its room before it enters (or resumes in) `next`. Leaving
    /// marks read what reached the client there (the request's store call stores it); the
    /// user's other devices hear of it.
    fn leave_for(&mut self, token: Token, next: &str) {
        let Some(connection) = self.connections.get_mut(&token) else {
            return;
        };
        let mark = connection.session().leaving_mark();
        let Some(old) = connection.leave_room() else {
            return;
        };
        self.leave_room(&old.group_name, token);
        if let Some(mark) = mark.filter(|mark| mark.group_name != next) {
            self.announce_mark(token, &mark);
        }
    }

    /// Queues a line a connection did not ask for (a notice: it counts toward the client's
    /// `MAX_OUTPUT_BYTES` like a message, see `Connection::queue_notice`) and services it this
    /// turn. Nothing is queued for a connection already on its way out.
    pub(super) fn notify(&mut self, token: Token, line: Vec<u8>) {
        let Some(connection) = self.connections.get_mut(&token) else {
            return;
        };
        if connection.is_doomed() {
            return;
        }
        if connection.queue_notice(line) {
            self.metrics.slow_consumer_cuts += 1;
        }
        self.touch(token);
    }

    /// Puts a connection on this turn's list to service, once.
    pub(super) fn touch(&mut self, token: Token) {
        if self
            .connections
            .get_mut(&token)
            .is_some_and(Connection::touch)
        {
            self.touched.push(token);
        }
    }

    /// Once the deferred flush is due, every connection holding broadcasts is serviced: no
    /// line waits longer than `WRITE_DELAY_MS` plus the turn that is running.
    fn release_deferred(&mut self) {
        if self
            .write_delay
            .flush_at
            .is_none_or(|due| due > Instant::now())
        {
            return;
        }
        self.write_delay.flush_at = None;
        let mut deferred = std::mem::take(&mut self.write_delay.deferred);
        for token in deferred.drain(..) {
            if let Some(connection) = self.connections.get_mut(&token) {
                connection.undefer();
                if connection.touch() {
                    self.touched.push(token);
                }
            }
        }
        self.write_delay.deferred = deferred;
    }

    /// Services every touched connection. Servicing one may touch others (a `typing` or a
    /// line to a user's devices): those are serviced in the same turn, round after round.
    fn service_touched(&mut self) {
        while !self.touched.is_empty() {
            let mut touched = std::mem::take(&mut self.touched);
            for &token in &touched {
                self.service(token);
            }
            touched.clear();
            if self.touched.is_empty() {
                // Keep the allocation for the next turn.
                self.touched = touched;
            }
        }
    }

    /// Handles waiting requests, writes pending output, and closes the connection when done.
    fn service(&mut self, token: Token) {
        let draining = self.draining_since.is_some();
        let rules = &self.rules;
        let Some(connection) = self.connections.get_mut(&token) else {
            return;
        };
        connection.untouch();
        // Effects of immediate replies that reach beyond this connection (`typing`).
        let mut effects = Vec::new();
        while !draining && !connection.is_doomed() {
            loop {
                // A held job (not a message) starts once what was in flight is answered.
                if let Some((work, ticket)) = connection.start_held(self.access.clock) {
                    if let Some(pool) = self.pool.as_mut() {
                        pool.submit(Requester::Connection(token, ticket), work);
                    }
                }
                // A connection cut off (the third failed login) takes nothing more from what
                // it pipelined behind it.
                if connection.is_doomed() || !connection.takes_requests(REPLY_BACKLOG_BYTES) {
                    break;
                }
                let Some(frame) = connection.next_frame() else {
                    break;
                };
                // Read marks the request may imply count only what reached the client.
                if connection.has_unsettled() {
                    connection.settle();
                }
                match crate::ops::dispatch::plan(connection.session(), frame, rules) {
                    Plan::Reply(line) => {
                        count_reply(&mut self.metrics, &line);
                        connection.reply_in_order(line);
                    }
                    Plan::ReplyAnd(line, effect) => {
                        connection.reply_in_order(line);
                        // The settings apply at once (to what is planned next); the rest of
                        // the effect (activity notices) once this connection is serviced.
                        if let Effect::Settings(settings) = effect {
                            connection.apply_settings(settings);
                        }
                        effects.push(effect);
                    }
                    Plan::Refused(line) => {
                        self.metrics.error(ErrorCode::Unauthorized);
                        connection.reply_in_order(line);
                        if connection.count_auth_failure() {
                            log::warn!("closing {}: authentication failed", connection.peer());
                        }
                    }
                    Plan::Store { id, .. }
                        if !connection.take_token(
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
                        connection.reply_in_order(encode_failure(&error.into(), id.as_deref()));
                    }
                    Plan::Store { work, id } => {
                        start_job(
                            connection,
                            &mut self.pool,
                            token,
                            work,
                            id,
                            self.access.clock,
                        );
                    }
                }
            }
            if connection.read_state() == ReadState::Paused && connection.inbox_has_room() {
                if let Err(e) = connection.read_available(&mut self.read_buffer) {
                    log::debug!("read from {} failed: {e}", connection.peer());
                    connection.doom();
                }
                continue;
            }
            // Stopped by its own unwritten replies: write them now. When the socket takes
            // them all, no writable event will come to resume this client (edge-triggered),
            // so go on at once while there is room again.
            if connection.has_requests() && connection.pending_reply_bytes() > REPLY_BACKLOG_BYTES {
                if let Err(e) = connection.flush() {
                    log::debug!("write to {} failed: {e}", connection.peer());
                    connection.doom();
                }
                if connection.pending_reply_bytes() <= REPLY_BACKLOG_BYTES {
                    continue;
                }
            }
            break;
        }
        if let Err(e) = connection.flush() {
            log::debug!("write to {} failed: {e}", connection.peer());
            connection.doom();
        }
        // A resume's next page, once what was sent of it has drained (`ops/resume.rs`).
        if let Some(cursor) = connection.take_due_resume(RESUME_LOW_WATER) {
            if let Some(username) = connection.session().username.clone() {
                let budget = rules.max_reply_bytes.saturating_sub(RESUME_PAGE_MARGIN);
                let work = crate::ops::resume::next_page(username, cursor, budget);
                start_job(
                    connection,
                    &mut self.pool,
                    token,
                    work,
                    None,
                    self.access.clock,
                );
            }
        }
        if connection.is_doomed() || connection.finished() {
            self.close(token);
        }
        for effect in effects {
            self.apply(token, effect);
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
        if let Some(reason) = connection.take_closing() {
            connection.say_closing(encode_closing(reason));
            if connection.pending_output() > 0 && !draining {
                connection.linger(Instant::now());
                // Out of the room's registry (no more broadcasts), but the read mark waits for
                // the final close: lines already in the kernel's send queue keep reaching the
                // client while it lingers, and they count as read once acknowledged.
                if let Some(group_name) = connection.session().room_name().map(str::to_string) {
                    self.leave_room(&group_name, token);
                }
                return;
            }
        }
        if connection.lingering_since().is_some()
            && (connection.pending_output() > 0 || connection.awaits_acknowledgement())
            && !draining
        {
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
        if let Some(username) = connection.session().username.clone() {
            self.stop_activity(token, &username);
            self.unindex_user(token, &username, connection.session().presence);
        }
        let _ = self.poll.registry().deregister(connection.tcp());
        self.admission.release(connection.peer().ip());
        log::debug!("connection {} from {} closed", token.0, connection.peer());
        // A descriptor was freed: clients waiting in the accept queue can come in now.
        if self.listeners.blocked {
            self.accept_all();
        }
    }

    /// Takes a closing connection out of its room, marking read what reached the client.
    fn leave_room_on_close(&mut self, token: Token) {
        let Some(connection) = self.connections.get_mut(&token) else {
            return;
        };
        connection.settle();
        let mark: Option<ReadMark> = connection.session().leaving_mark();
        let Some(room) = connection.leave_room() else {
            return;
        };
        // Only what really reached this client is marked read, and only when that is more
        // than the store already has (most closes then cost no write at all).
        if let Some(mark) = mark {
            self.announce_mark(token, &mark);
            if let Some(pool) = self.pool.as_mut() {
                pool.submit(Requester::Server, Work::Mark(mark));
            }
        }
        self.leave_room(&room.group_name, token);
    }
}

/// Starts a store job for a connection (or holds it behind what is in flight, see
/// `in_flight.rs`); its answer comes back to that connection.
fn start_job(
    connection: &mut Connection,
    pool: &mut Option<WorkerPool>,
    token: Token,
    work: Work,
    id: Option<crate::protocol::RequestId>,
    leave_clock: u64,
) {
    if let Some((work, ticket)) = connection.start_or_hold(work, id, leave_clock) {
        if let Some(pool) = pool.as_mut() {
            pool.submit(Requester::Connection(token, ticket), work);
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
        node_id: config.instance_id.clone(),
        max_line_bytes: config.max_line_bytes,
        max_output_bytes: config.max_output_bytes,
        max_reply_bytes: config.max_reply_bytes,
        rate_limit: config.rate_limit,
        rate_burst: config.rate_burst,
        login_timeout_ms: config.login_timeout.as_millis() as u64,
        idle_timeout_ms,
        keepalive_hint_ms,
        write_delay_ms: config
            .write_delay
            .map_or(0, |delay| delay.as_millis() as u64),
        auth: config.auth_secret.is_some(),
        protocols: &crate::ops::hello::PROTOCOLS,
        events: crate::ops::event_names(),
    };
    Rules {
        max_reply_bytes: config.max_reply_bytes,
        max_groups_per_user: config.max_groups_per_user,
        hello: Rc::new(hello_data(&info, false)),
        hello_tls: Rc::new(hello_data(&info, true)),
        resume_max_messages: config.resume_max_messages,
        auth: config
            .auth_secret
            .as_ref()
            .map(|secret| Rc::new(Authenticator::new(secret, config.auth_audience.as_deref()))),
    }
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
    } else {
        metrics.error_line(line);
    }
}
