//! The event loop: one mio `Poll` owns the listener and every client socket. It accepts, reads,
//! hands requests to the session logic, submits store jobs to the workers, takes their
//! completions (woken by the `mio::Waker`), broadcasts stored messages to rooms, and writes.
//! Nothing on this thread blocks on a database.
//!
//! `Server` holds the sockets, the connections, a few components and the list of live
//! features; this file is the loop itself: servicing, store answers in request order, effects,
//! rooms entered and left, closing, and calling the live features' hooks (`live/`). Beside it,
//! `accept` (listeners and admission) and `sweep` (timeouts and deadlines) are the loop's
//! too; the components own their state: `delivery` (rooms, sequencer, broadcast, relay
//! channels), `manage` (where access ended, erasures), `metrics_http` (the `/metrics`
//! endpoint), `load` (the write delay's switch), `slab` (the connections by token).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use mio::{Events, Poll, Token, Waker};

use crate::auth::Authenticator;
use crate::config::{Config, StoreKind};
use crate::connection::{Closing, Connection, ReadState};
use crate::in_flight::EMBEDDED_PIPELINE_DEPTH;
use crate::limits::Admission;
use crate::live::presence::LoopsPresence;
use crate::live::{Cx, Learned, LiveFeature, LoopView, Origin, Outbox};
use crate::metrics::{Gauges, Metrics, RelayGauges};
use crate::model::{Appended, ReadMark};
use crate::ops::send_message;
use crate::ops::Plan;
use crate::peer::{Departure, PeerEvent, PeerLink, RoomLine};
use crate::protocol::{encode_failure, hello_data, ErrorCode, HelloInfo, ProtocolError};
use crate::rooms::Rooms;
use crate::sequencer::{Release, RECENT_IN_PEER_MODE};
use crate::session::Completed;
use crate::session::{self, Effect, Rules};
use crate::store::{Store, StoreError};
use crate::tls::Certificates;
use crate::workers::{Finished, Outcome, Requester, Work, WorkerPool, WriteRouting};
use serde_json::value::RawValue;

/// A closure taking this loop's `/metrics` snapshot that borrows only the fields it reads (the
/// endpoint is borrowed mutably beside it).
macro_rules! loop_snapshot {
    ($server:expr) => {
        || {
            crate::server::snapshot(
                &$server.metrics,
                &$server.connections,
                &$server.delivery,
                $server.peer.as_ref(),
                &$server.features,
            )
        }
    };
}
use loop_snapshot;

mod accept;
mod delivery;
mod load;
mod manage;
mod metrics_http;
mod start_error;
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
/// While `accept` fails for lack of descriptors, how often it is retried (also retried at
/// once whenever a connection closes).
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// Slack past `STORE_TIMEOUT_MS` before the loop answers a request whose store call has not
/// returned (the workers' own timeout answers first when they can).
const STORE_DEADLINE_MARGIN: Duration = Duration::from_millis(250);
/// How long a connection the server cut off may take to receive its `closing` line.
const CLOSING_LINGER: Duration = Duration::from_secs(5);
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

/// The event loop and everything it owns: its sockets and connections, the components
/// that hold the rest (each in its own module), and the list of live features.
pub struct Server {
    config: Config,
    /// What of the configuration shapes replies (built once; `hello` reports it).
    rules: Rules,
    /// The poll, its waker, the listeners and admission (`accept.rs`).
    io: Io,
    /// The connections by token, and this turn's list to service (`slab.rs`).
    connections: slab::Slab,
    /// Each logged-in user's connections here (lines to a user's devices, erasure).
    users: HashMap<String, Vec<Token>>,
    /// Rooms, ordering, broadcast and held writes, relay channels (`delivery.rs`).
    delivery: delivery::Delivery,
    peer: Option<PeerLink>,
    /// The store workers and what they answer through.
    store: StoreSide,
    /// Where access ended lately, and the erasure log's read point (`manage.rs`).
    moderation: manage::Moderation,
    /// The live features (`live/`), called at the loop's hooks in this order.
    features: Vec<Box<dyn LiveFeature>>,
    metrics: Metrics,
    /// The `/metrics` endpoint's own state (`metrics_http.rs`).
    metrics_http: metrics_http::MetricsEndpoint,
    /// A stop was asked for (a signal), and since when the loop drains.
    shutdown: Shutdown,
    last_sweep: Instant,
}

/// The loop's sockets apart from its clients, and what admitting a client needs.
struct Io {
    poll: Poll,
    waker: Arc<Waker>,
    /// The chat listeners and the certificate new TLS connections get (`accept.rs`).
    listeners: accept::Listeners,
    /// Open connections in all and per address, shared with the other loops.
    admission: Arc<Admission>,
    read_buffer: Vec<u8>,
}

/// The store workers, their answers, and the embedded store's lock.
struct StoreSide {
    pool: Option<WorkerPool>,
    completions: Receiver<Finished>,
    /// Messages one connection may have with the store at once (`in_flight.rs`).
    pipeline_depth: usize,
    /// The embedded store's lock, held while the server runs (`start::claim`).
    lock: Option<std::fs::File>,
}

impl StoreSide {
    /// Starts the store workers; their answers wake the loop through `waker`.
    fn start(
        config: &Config,
        stores: Vec<Box<dyn Store>>,
        waker: Arc<Waker>,
    ) -> Result<StoreSide, StartError> {
        let (done, completions) = crossbeam_channel::unbounded();
        // MongoDB takes writes to different groups at once; SQLite has one writer.
        let (routing, pipeline_depth) = match config.store {
            StoreKind::Mongo { .. } => (WriteRouting::ByGroup, 1),
            _ => (WriteRouting::OneWriter, EMBEDDED_PIPELINE_DEPTH),
        };
        let pool = WorkerPool::start(stores, done, waker, config.store_timeout, routing)
            .map_err(StartError::Workers)?;
        Ok(StoreSide {
            pool: Some(pool),
            completions,
            pipeline_depth,
            lock: None,
        })
    }
}

/// The link to the other instances (peer mode, through Redis) or to the other loops of this
/// process (`bus`), when there are any.
fn peer_link(
    config: &Config,
    bus: Option<crate::peer::local::BusMember>,
    waker: Arc<Waker>,
) -> Result<Option<PeerLink>, StartError> {
    match (&config.store, config.peer) {
        (_, false) => bus
            .map(PeerLink::local)
            .transpose()
            .map_err(StartError::Workers),
        (StoreKind::Mongo { database, .. }, true) => PeerLink::start(
            &config.redis_url,
            database,
            &config.node_id,
            waker,
            config.relay_mode,
        )
        .map(Some)
        .map_err(StartError::Peer),
        _ => Ok(None),
    }
}

/// Graceful shutdown's state.
struct Shutdown {
    requested: Arc<AtomicBool>,
    draining_since: Option<Instant>,
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
        // One push worker per process, asking the process's presence who is online.
        if loops_presence.1 == 0 {
            crate::push::start(&config, loops_presence.0.clone());
        }
        let poll = Poll::new().map_err(StartError::Workers)?;
        let listeners = accept::Listeners::bind(&config, poll.registry(), shared_certificates)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER).map_err(StartError::Workers)?);
        let metrics_http = metrics_http::MetricsEndpoint::bind(
            &config,
            poll.registry(),
            metrics_board,
            FIRST_METRICS_CLIENT,
        )?;
        let store = StoreSide::start(&config, stores, waker.clone())?;
        let peer = peer_link(&config, bus, waker.clone())?;
        // Rooms keep recent messages for late entries only where peers relay them.
        let keep_recent = match peer {
            Some(_) => RECENT_IN_PEER_MODE,
            None => 0,
        };
        let live_settings = crate::live::Settings {
            activity_interval: config.activity_interval,
            node_id: config.node_id.clone(),
        };
        Ok(Server {
            rules: rules_of(&config),
            config,
            io: Io {
                poll,
                waker,
                listeners,
                admission,
                read_buffer: vec![0; READ_BUFFER_BYTES],
            },
            connections: slab::Slab::default(),
            users: HashMap::new(),
            delivery: delivery::Delivery::new(keep_recent),
            peer,
            store,
            moderation: manage::Moderation::new(),
            features: crate::live::registered(&live_settings, loops_presence.0, loops_presence.1),
            metrics: Metrics::default(),
            metrics_http,
            shutdown: Shutdown {
                requested: Arc::new(AtomicBool::new(false)),
                draining_since: None,
            },
            last_sweep: Instant::now(),
        })
    }

    /// The plaintext chat address, or the TLS one when there is no plaintext listener.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match (&self.io.listeners.plain, &self.io.listeners.tls) {
            (Some(listener), _) | (None, Some(listener)) => listener.local_addr(),
            (None, None) => Err(io::ErrorKind::NotConnected.into()),
        }
    }

    /// Where TLS is served, when it is.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.io
            .listeners
            .tls
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// The certificate store, for SIGHUP to reload.
    pub fn certificates(&self) -> Option<Certificates> {
        self.io.listeners.certificates.clone()
    }

    /// Where `/metrics` is served, when it is.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_http.local_addr()
    }

    /// This loop's waker (the other loops' bus threads wake it).
    pub fn waker(&self) -> Arc<Waker> {
        self.io.waker.clone()
    }

    /// Keeps the embedded store's lock for as long as this loop lives (`start::claim`).
    pub fn hold_store_lock(&mut self, lock: Option<std::fs::File>) {
        self.store.lock = lock;
    }

    /// A flag and waker that make the loop shut down gracefully when set (from a signal thread).
    pub fn stop_handle(&self) -> (Arc<AtomicBool>, Arc<Waker>) {
        (self.shutdown.requested.clone(), self.io.waker.clone())
    }

    /// Runs until a graceful shutdown completes.
    pub fn run(mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = self.poll_timeout();
            if let Err(error) = self.io.poll.poll(&mut events, timeout) {
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
                    METRICS_LISTENER => self.metrics_http.accept(self.io.poll.registry()),
                    token if token.0 >= FIRST_METRICS_CLIENT => {
                        let snapshot = loop_snapshot!(self);
                        let registry = self.io.poll.registry();
                        self.metrics_http.serve(token, registry, &snapshot);
                    }
                    token => {
                        if event.is_readable() || event.is_read_closed() || event.is_error() {
                            self.read_from(token);
                        }
                        self.connections.touch(token);
                    }
                }
            }
            if self.io.listeners.blocked {
                self.accept_all();
            }
            // Peer events first: what another loop published before it answered a client is
            // on this channel before anything that answer caused can complete here.
            self.take_peer_events();
            self.take_completions();
            self.delivery.unwatch_idle_groups(self.peer.as_ref());
            if let Some(pool) = self.store.pool.as_mut() {
                if self.peer.is_some() {
                    self.delivery.check_tails(pool, &mut self.metrics);
                }
                let workers = self.config.workers;
                self.delivery
                    .start_catch_ups(pool, &mut self.metrics, workers);
            }
            self.sweep();
            self.delivery.release_deferred(&mut self.connections);
            self.live(|feature, cx| feature.end_turn(cx));
            self.service_touched();
            {
                let snapshot = loop_snapshot!(self);
                let registry = self.io.poll.registry();
                self.metrics_http.answer_scrapes(registry, &snapshot);
            }
            if let Some(peer) = &self.peer {
                peer.end_turn();
            }
            self.delivery.write_delay.load.turn(woke, Instant::now());
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
        if let Some(pool) = self.store.pool.take() {
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
        let catch_up =
            self.delivery.sequencer.next_deadline().map(|due| {
                due.saturating_duration_since(Instant::now()) + Duration::from_millis(1)
            });
        let draining = self
            .shutdown
            .draining_since
            .map(|_| Duration::from_millis(50));
        let accept = self.io.listeners.blocked.then_some(ACCEPT_RETRY);
        let deferred = self
            .delivery
            .write_delay
            .flush_at
            .map(|due| due.saturating_duration_since(Instant::now()));
        let activity = self
            .features
            .iter()
            .filter_map(|feature| feature.wake_at())
            .min()
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
        if self.shutdown.draining_since.is_none() && self.shutdown.requested.load(Ordering::SeqCst)
        {
            log::info!("shutting down: no new connections, finishing work in flight");
            crate::notify::notify("STOPPING=1");
            for mut listener in [self.io.listeners.plain.take(), self.io.listeners.tls.take()]
                .into_iter()
                .flatten()
            {
                let _ = self.io.poll.registry().deregister(&mut listener);
            }
            self.shutdown.draining_since = Some(Instant::now());
        }
        let Some(since) = self.shutdown.draining_since else {
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
        if let Err(e) = connection.read_available(&mut self.io.read_buffer) {
            log::debug!("read from {} failed: {e}", connection.peer());
            connection.doom();
        }
    }

    fn apply(&mut self, token: Token, effect: Effect) {
        match effect {
            Effect::None => {}
            Effect::Bind(username) => self.bind(token, username),
            // Applied in `deliver_answers` (the reply line is completed there).
            Effect::Online(effect, _) => self.apply(token, *effect),
            Effect::Live(effect) => {
                let addressee = (token != SERVER).then_some(token);
                // Handed over, not cloned: the feature takes its value out of the effect
                // without copying it (`LiveEffect::take`).
                let mut effect = Some(effect);
                self.live(|feature, cx| {
                    if effect.as_ref().is_some_and(|e| e.feature == feature.name()) {
                        if let Some(effect) = effect.take() {
                            feature.effect(cx, addressee, effect);
                        }
                    }
                });
            }
            Effect::JoinedGroup {
                username,
                group_name,
            } => self.live(|feature, cx| {
                feature.joined(cx, Origin::Here(token), &username, &group_name)
            }),
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
            Effect::ReadMarker(state) => {
                self.live(|feature, cx| feature.marker_rose(cx, Origin::Here(token), &state))
            }
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
                if connection.session().username.is_some() {
                    self.live(|feature, cx| feature.settings_changed(cx, token));
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
                self.user_left(departure, Origin::Here(token));
            }
        }
    }

    /// A connection logged in: indexed under its user, then the live features hear of it.
    fn bind(&mut self, token: Token, username: String) {
        let tokens = self.users.entry(username.clone()).or_default();
        let new = !tokens.contains(&token);
        if new {
            tokens.push(token);
        }
        if let Some(connection) = self.connections.get_mut(&token) {
            connection.bind(username.clone());
        }
        if new {
            self.live(|feature, cx| feature.logged_in(cx, token, &username));
        }
    }

    /// Calls one hook on every live feature, then carries out what they asked for.
    pub(super) fn live(&mut self, mut hook: impl FnMut(&mut dyn LiveFeature, &mut Cx<'_>)) {
        let mut out = Outbox::default();
        {
            let view = View {
                connections: &self.connections,
                rooms: &self.delivery.rooms,
                users: &self.users,
            };
            let mut cx = Cx::new(&view, &mut out, self.peer.is_some(), &mut self.metrics);
            for feature in &mut self.features {
                hook(feature.as_mut(), &mut cx);
            }
        }
        self.carry_out(out);
    }

    /// Does what the live features asked for: lines, relay notes and watches, store reads,
    /// and what they learned from the relay (which every feature then hears).
    fn carry_out(&mut self, out: Outbox) {
        let Outbox {
            lines,
            notes,
            watches,
            reads,
            learned,
        } = out;
        for (token, line) in lines {
            self.notify(token, line);
        }
        if let Some(peer) = &self.peer {
            for note in notes {
                peer.publish_feature(note);
            }
            for (key, on) in watches {
                match on {
                    true => peer.watch(&key),
                    false => peer.unwatch(&key),
                }
            }
        }
        for (token, work) in reads {
            match token {
                Some(token) => {
                    if let Some(connection) = self.connections.get_mut(&token) {
                        start_job(
                            connection,
                            &mut self.store.pool,
                            token,
                            work,
                            None,
                            self.moderation.access.clock,
                        );
                    }
                }
                None => {
                    if let Some(pool) = self.store.pool.as_mut() {
                        pool.submit(Requester::Server, work);
                    }
                }
            }
        }
        for learned in learned {
            match learned {
                Learned::MarkerRose(state) => {
                    self.live(|feature, cx| feature.marker_rose(cx, Origin::Peer, &state))
                }
                Learned::Joined {
                    username,
                    group_name,
                } => self
                    .live(|feature, cx| feature.joined(cx, Origin::Peer, &username, &group_name)),
                Learned::Mentioned {
                    username,
                    group_name,
                    seq,
                } => self.live(|feature, cx| feature.mentioned(cx, &username, &group_name, seq)),
            }
        }
    }

    /// An implicit read mark (a connection left a room or closed): announced like an
    /// explicit one, its `unread_count` from the newest seq this instance delivered.
    fn announce_mark(&mut self, origin: Token, mark: &ReadMark) {
        let head = self
            .delivery
            .sequencer
            .delivered(&mark.group_name)
            .unwrap_or(mark.seq)
            .max(mark.seq);
        let state = session::ReadState {
            username: mark.username.clone(),
            group_name: mark.group_name.clone(),
            last_read_seq: mark.seq,
            unread_count: head - mark.seq,
            mention_count: (head == mark.seq).then_some(0),
        };
        self.live(|feature, cx| feature.marker_rose(cx, Origin::Here(origin), &state));
    }

    /// Entering `room` raised the user's read marker to what the reply held.
    fn entered_mark(&mut self, origin: Token, room: &session::Room) {
        let Some(username) = self
            .connections
            .get(&origin)
            .and_then(|c| c.session().username.clone())
        else {
            return;
        };
        let last_read_seq = room.frontier.stored();
        let unread_count = room.floor_seq.saturating_sub(last_read_seq);
        let state = session::ReadState {
            username,
            group_name: room.group_name.clone(),
            last_read_seq,
            unread_count,
            mention_count: (unread_count == 0).then_some(0),
        };
        self.live(|feature, cx| feature.marker_rose(cx, Origin::Here(origin), &state));
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
        self.connections.touch(token);
    }

    /// Services every touched connection. Servicing one may touch others (a `typing` or a
    /// line to a user's devices): those are serviced in the same turn, round after round.
    fn service_touched(&mut self) {
        while !self.connections.touched.is_empty() {
            let mut touched = std::mem::take(&mut self.connections.touched);
            for &token in &touched {
                self.service(token);
            }
            touched.clear();
            if self.connections.touched.is_empty() {
                // Keep the allocation for the next turn.
                self.connections.touched = touched;
            }
        }
    }

    /// Handles waiting requests, writes pending output, and closes the connection when done.
    fn service(&mut self, token: Token) {
        let draining = self.shutdown.draining_since.is_some();
        let Some(connection) = self.connections.get_mut(&token) else {
            return;
        };
        connection.untouch();
        let mut servicing = Servicing {
            token,
            config: &self.config,
            rules: &self.rules,
            pool: &mut self.store.pool,
            metrics: &mut self.metrics,
            leave_clock: self.moderation.access.clock,
            read_buffer: &mut self.io.read_buffer,
            effects: Vec::new(),
        };
        if !draining {
            servicing.answer_requests(connection);
        }
        if let Err(e) = connection.flush() {
            log::debug!("write to {} failed: {e}", connection.peer());
            connection.doom();
        }
        servicing.next_resume_page(connection);
        let effects = servicing.effects;
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
        let draining = self.shutdown.draining_since.is_some();
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
            let indexed = self.users.get_mut(&username).is_some_and(|tokens| {
                let before = tokens.len();
                tokens.retain(|t| *t != token);
                tokens.len() < before
            });
            if self.users.get(&username).is_some_and(Vec::is_empty) {
                self.users.remove(&username);
            }
            if indexed {
                let session = connection.session();
                self.live(|feature, cx| feature.closed(cx, token, session));
            }
        }
        let _ = self.io.poll.registry().deregister(connection.tcp());
        self.io.admission.release(connection.peer().ip());
        log::debug!("connection {} from {} closed", token.0, connection.peer());
        // A descriptor was freed: clients waiting in the accept queue can come in now.
        if self.io.listeners.blocked {
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
            if let Some(pool) = self.store.pool.as_mut() {
                pool.submit(Requester::Server, Work::Mark(mark));
            }
        }
        self.leave_room(&room.group_name, token);
    }
}

/// The token answers to the server's own reads are applied with (no connection has it).
const SERVER: Token = Token(usize::MAX);

/// What the live features see of the loop.
struct View<'a> {
    connections: &'a slab::Slab,
    rooms: &'a Rooms,
    users: &'a HashMap<String, Vec<Token>>,
}

impl LoopView for View<'_> {
    fn session(&self, token: Token) -> Option<&session::Session> {
        self.connections.get(&token).map(Connection::session)
    }

    fn room_members(&self, group_name: &str) -> Vec<Token> {
        self.rooms.members(group_name)
    }

    fn connections_of(&self, username: &str) -> &[Token] {
        self.users.get(username).map_or(&[], Vec::as_slice)
    }
}

/// Servicing one connection: what it needs of the loop, and the effects its immediate replies
/// have beyond it (`typing`, settings), applied once it is serviced.
struct Servicing<'a> {
    token: Token,
    config: &'a Config,
    rules: &'a Rules,
    pool: &'a mut Option<WorkerPool>,
    metrics: &'a mut Metrics,
    leave_clock: u64,
    read_buffer: &'a mut Vec<u8>,
    effects: Vec<Effect>,
}

impl Servicing<'_> {
    /// Plans the connection's waiting requests, in order, until it is out of them or must
    /// wait: for its own unwritten replies (back-pressure), for its jobs in flight, or because
    /// it is being cut off. Reading resumes here when the inbox has room again.
    fn answer_requests(&mut self, connection: &mut Connection) {
        while !connection.is_doomed() {
            loop {
                // A held job (not a message) starts once what was in flight is answered.
                if let Some((work, ticket)) = connection.start_held(self.leave_clock) {
                    if let Some(pool) = self.pool.as_mut() {
                        pool.submit(Requester::Connection(self.token, ticket), work);
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
                let plan = crate::ops::dispatch::plan(connection.session(), frame, self.rules);
                self.carry_out(connection, plan);
            }
            if connection.read_state() == ReadState::Paused && connection.inbox_has_room() {
                if let Err(e) = connection.read_available(self.read_buffer) {
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
    }

    /// One request's plan: a reply now (with an effect), a refusal, or a store job (within
    /// the rate limit).
    fn carry_out(&mut self, connection: &mut Connection, plan: Plan) {
        match plan {
            Plan::Reply(line) => {
                count_reply(self.metrics, &line);
                connection.reply_in_order(line);
            }
            Plan::ReplyAnd(line, effect) => {
                connection.reply_in_order(line);
                // The settings apply at once (to what is planned next); the rest of the
                // effect (activity notices) once this connection is serviced.
                if let Effect::Settings(settings) = &effect {
                    connection.apply_settings(*settings);
                }
                self.effects.push(effect);
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
                let error =
                    ProtocolError::new(ErrorCode::RateLimited, "Too many requests; slow down.");
                connection.reply_in_order(encode_failure(&error.into(), id.as_deref()));
            }
            Plan::Store { work, id } => {
                start_job(
                    connection,
                    self.pool,
                    self.token,
                    work,
                    id,
                    self.leave_clock,
                );
            }
        }
    }

    /// A resume's next page, once what was sent of it has drained (`ops/resume.rs`).
    fn next_resume_page(&mut self, connection: &mut Connection) {
        let Some(cursor) = connection.take_due_resume(RESUME_LOW_WATER) else {
            return;
        };
        if let Some(username) = connection.session().username.clone() {
            let budget = self
                .rules
                .max_reply_bytes
                .saturating_sub(RESUME_PAGE_MARGIN);
            let work = crate::ops::resume::next_page(username, cursor, budget);
            start_job(
                connection,
                self.pool,
                self.token,
                work,
                None,
                self.leave_clock,
            );
        }
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

/// What this loop reports to `/metrics`. Over the fields it reads, not `&Server`, so that a
/// closure calling it borrows only those (the endpoint itself is borrowed mutably beside it).
fn snapshot(
    metrics: &Metrics,
    connections: &slab::Slab,
    delivery: &delivery::Delivery,
    peer: Option<&PeerLink>,
    features: &[Box<dyn LiveFeature>],
) -> metrics_http::Snapshot {
    use std::sync::atomic::Ordering::Relaxed;
    // This loop's own link to Redis (peer mode; the loops' bus has no gauges).
    let redis = peer.filter(|peer| !peer.is_local());
    let relay = redis.map(|peer| RelayGauges {
        subscribed_channels: peer.stats.subscribed.load(Relaxed),
        messages_in: peer.stats.messages_in.load(Relaxed),
        bytes_in: peer.stats.bytes_in.load(Relaxed),
        heartbeat_lag_ms: peer.stats.heartbeat_lag_ms.load(Relaxed),
        heartbeat_resets: peer.stats.heartbeat_resets.load(Relaxed),
        catch_ups: metrics.catch_ups,
        head_checks: metrics.head_checks,
    });
    let mut gauges = Gauges::default();
    for feature in features {
        feature.report(&mut gauges);
    }
    metrics_http::Snapshot {
        report: crate::metrics::LoopReport {
            metrics: metrics.clone(),
            connections: connections.len(),
            rooms_held_messages: delivery.sequencer.held(),
            relay,
            peer_link_up: redis.map(|_| delivery.link_up),
            answers: 0,
        },
        presence_online: gauges.presence_online,
    }
}

/// What turns a finished job's result into its `Completed` (reply and effect), given the
/// request's `id` and `MAX_REPLY_BYTES`.
type Finish = Box<dyn FnOnce(Option<&RawValue>, usize) -> Completed>;

/// A sent message's result, as its `Finish`.
fn sent(result: Result<Appended, StoreError>) -> Finish {
    Box::new(move |id, _| send_message::answer(result, id))
}

/// Store answers: completions become replies in request order, effects and broadcasts.
impl Server {
    fn take_completions(&mut self) {
        while let Ok(completion) = self.store.completions.try_recv() {
            self.complete(completion);
        }
    }

    fn complete(&mut self, completion: Finished) {
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
                    ..
                }) = &result
                {
                    self.metrics.messages_stored += 1;
                    if let Some(peer) = &self.peer {
                        peer.publish(message);
                    }
                    self.message_seen(&message.group_name, message.seq, true);
                    let released = self.delivery.sequencer.offer(message.clone(), requester);
                    // The sender's copy is its reply: filed now, it goes out when the
                    // sequencer releases the message (`broadcast_all`), so it neither overtakes
                    // earlier messages held for a gap nor trails later ones released with it.
                    // Only a sender in that room waits: for others there is no order to keep.
                    let held = self
                        .delivery
                        .sequencer
                        .holds(&message.group_name, message.seq)
                        && self.in_room(requester, &message.group_name);
                    let filed = self.file_answer(requester, sent(result));
                    // Marked before the release below, which may deliver this connection's
                    // earlier replies (and would take this one with them).
                    if held {
                        self.reply_waits(requester, true);
                    }
                    self.broadcast_all(released);
                    if let Some(token) = filed {
                        self.deliver_answers(token);
                    }
                    return;
                }
                sent(result)
            }
            Outcome::Called(call) => {
                Box::new(move |id: Option<&RawValue>, max_reply_bytes: usize| {
                    call.finish(id, max_reply_bytes)
                })
            }
            Outcome::CaughtUp { group_name, result } => {
                let found = result
                    .map_err(|error| log::warn!("catch-up read for {group_name} failed: {error}"))
                    .ok();
                // Read back from the store (stored elsewhere): the newest one is the activity.
                if let Some(newest) = found.as_ref().and_then(|found| found.last()) {
                    self.message_seen(&group_name, newest.seq, false);
                }
                let released = self.delivery.sequencer.caught_up(&group_name, found);
                self.broadcast_all(released);
                return;
            }
            Outcome::Heads(result) => {
                self.delivery.heads_answered(result);
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

    /// The message of `origin`'s reply went to the room (or the room is gone): the reply, and
    /// any behind it, go out now if their turn has come.
    fn release_reply(&mut self, origin: Requester) {
        self.reply_waits(origin, false);
        if let Requester::Connection(token, _) = origin {
            self.deliver_answers(token);
        }
    }

    /// Whether a sent message's reply waits for the message to be released to its room.
    fn reply_waits(&mut self, origin: Requester, waits: bool) {
        if let Requester::Connection(token, ticket) = origin {
            if let Some(connection) = self.connections.get_mut(&token) {
                connection.wait_for_release(ticket, waits);
            }
        }
    }

    /// Files a finished job's answer with its connection (to go out in request order); the
    /// connection's token when it was filed.
    fn file_answer(&mut self, requester: Requester, finish: Finish) -> Option<Token> {
        let Requester::Connection(token, ticket) = requester else {
            // The server's own reads (presence, erasures): their effect, no reply.
            let completed = finish(None, self.config.max_reply_bytes);
            self.apply(SERVER, completed.effect);
            return None;
        };
        let connection = self.connections.get_mut(&token)?;
        let max_reply_bytes = self.config.max_reply_bytes;
        let filed = connection.answer(ticket, |id| finish(id, max_reply_bytes));
        if !filed {
            // Already answered `unavailable` when it outlived STORE_TIMEOUT_MS.
            log::debug!("late store result for {} dropped", connection.peer());
            return None;
        }
        Some(token)
    }

    /// Sends a connection the answers whose turn has come (in request order) and applies their
    /// effects in that order.
    fn deliver_answers(&mut self, token: Token) {
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
                let online = self
                    .features
                    .iter()
                    .find_map(|feature| feature.online_members(&members))
                    .unwrap_or_default();
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
        self.connections.touch(token);
    }

    /// Whether the connection's user lost access to `group_name` (a leave, removal, ban, or the
    /// group's deletion) after the leave clock read `since`.
    fn access_ended(&self, token: Token, group_name: &str, since: u64) -> bool {
        self.left_since(token, group_name, since)
            || self.moderation.access.deleted_since(group_name, since)
    }

    /// Whether the connection's user left `group_name` after the leave clock read `since`.
    fn left_since(&self, token: Token, group_name: &str, since: u64) -> bool {
        let Some(username) = self
            .connections
            .get(&token)
            .and_then(|c| c.session().username.clone())
        else {
            return false;
        };
        self.moderation
            .access
            .left_since(username, group_name, since)
    }

    /// What the peer relay (or the other loops) delivered since the last turn.
    fn take_peer_events(&mut self) {
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
                    self.message_seen(&message.group_name, message.seq, false);
                    let released = self.delivery.sequencer.offer(message, Requester::Server);
                    self.broadcast_all(released);
                }
                PeerEvent::LinkUp => {
                    self.delivery.link_up = true;
                    self.delivery.sequencer.suspect_all();
                }
                PeerEvent::Resync => self.delivery.sequencer.suspect_all(),
                PeerEvent::Subscribed(group_name) => self.delivery.sequencer.suspect(&group_name),
                PeerEvent::LinkDown => self.delivery.link_up = false,
                PeerEvent::Left(departure) => self.user_left(departure, Origin::Peer),
                PeerEvent::Feature { kind, body } => {
                    self.live(|feature, cx| feature.relayed(cx, &kind, &body))
                }
                PeerEvent::Room(room) => {
                    let mut line = room.line.into_bytes();
                    line.push(b'\n');
                    self.room_line_here(&room.group_name, &line, None, room.closes);
                }
            }
        }
    }

    /// A message of `group_name` with `seq` exists (stored here when `stored_here`): the live
    /// features hear of it.
    fn message_seen(&mut self, group_name: &str, seq: u64, stored_here: bool) {
        self.live(|feature, cx| feature.message_seen(cx, group_name, seq, stored_here));
    }

    /// Broadcasts the messages the sequencer released, each followed by its sender's reply.
    fn broadcast_all(&mut self, released: Vec<Release>) {
        let write_delay = self.config.write_delay;
        for (message, origin) in released {
            self.delivery.broadcast(
                &mut self.connections,
                &mut self.metrics,
                write_delay,
                &message,
                origin,
            );
            // Right after the others' copies: the sender's reply, if its turn has come.
            self.release_reply(origin);
        }
    }
}

/// Rooms: entering, leaving, and where access to a group ends.
impl Server {
    /// Puts a connection in a room (see `Delivery::enter_room`).
    fn enter_room(&mut self, token: Token, room: session::Room) {
        self.delivery
            .enter_room(&mut self.connections, self.peer.as_ref(), token, room);
    }

    /// Takes a connection out of a room's registry; replies held for the room go out.
    fn leave_room(&mut self, group_name: &str, token: Token) {
        let peers = self.peer.is_some();
        for origin in self.delivery.leave_room(peers, group_name, token) {
            self.release_reply(origin);
        }
    }

    /// A user left a group (here or on a peer): their devices hear of it (the live features),
    /// every connection of theirs leaves its room, and the leave is remembered so that an
    /// enter already in flight does not undo it.
    fn user_left(&mut self, departure: Departure, origin: Origin) {
        self.live(|feature, cx| feature.left(cx, origin, &departure));
        // A removal or ban ends the user's resume streams of the group at once; the
        // protocol-2 ones are told why (protocol 3 heard `left_group` already).
        let told = match &departure.reason {
            Some(_) => crate::live::devices::left_group_line(&departure),
            None => Vec::new(),
        };
        self.moderation
            .access
            .left(departure.username.clone(), departure.group_name.clone());
        self.end_streams(&departure.group_name, Some(&departure.username), &told);
        for member in self.delivery.rooms.members(&departure.group_name) {
            let Some(connection) = self.connections.get_mut(&member) else {
                continue;
            };
            if connection.session().username.as_deref() == Some(departure.username.as_str()) {
                connection.leave_room();
                self.leave_room(&departure.group_name, member);
            }
        }
    }

    /// Ends the resume streams of `group_name` (of `username`'s connections, or of every
    /// connection); the protocol-2 ones among them are sent `line`.
    fn end_streams(&mut self, group_name: &str, username: Option<&str>, line: &[u8]) {
        let tokens = match username {
            Some(username) => self.users.get(username).cloned().unwrap_or_default(),
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
            self.connections.touch(token);
        }
    }

    /// A line for the group's room here and on every other instance, but `origin` (which got
    /// the reply). `closes`: the group is gone, and every connection leaves the room after it.
    fn room_line(&mut self, group_name: &str, line: Vec<u8>, origin: Option<Token>, closes: bool) {
        if let Some(peer) = &self.peer {
            let text = String::from_utf8_lossy(line.strip_suffix(b"\n").unwrap_or(&line));
            peer.publish_room(RoomLine {
                group_name: group_name.to_string(),
                line: text.into_owned(),
                closes,
            });
        }
        self.room_line_here(group_name, &line, origin, closes);
    }

    /// The local half of `room_line` (also what a peer's relayed line becomes here).
    fn room_line_here(
        &mut self,
        group_name: &str,
        line: &[u8],
        origin: Option<Token>,
        closes: bool,
    ) {
        if self.moderation.access.edit_after_delete(group_name, line) {
            log::debug!("{group_name}: an edit relayed after the message's delete dropped");
            return;
        }
        for token in self.delivery.rooms.members(group_name) {
            if Some(token) != origin {
                self.notify(token, line.to_vec());
            }
            if closes {
                if let Some(connection) = self.connections.get_mut(&token) {
                    connection.leave_room();
                }
                self.leave_room(group_name, token);
            }
            self.connections.touch(token);
        }
        if closes {
            self.live(|feature, cx| feature.group_deleted(cx, group_name, line));
            // Resume pages of it read before are not sent, and streams of it in progress
            // end; a protocol-2 resumer (no sidebar to hear it in) is sent the line.
            self.moderation.access.group_deleted(group_name);
            self.end_streams(group_name, None, line);
        }
    }

    /// A moderator took `departure.username` out of the group: the room hears `line`, and
    /// the user's connections everywhere leave it with `left_group {reason}`.
    fn removed(&mut self, departure: Departure, line: Vec<u8>, origin: Token) {
        self.room_line(&departure.group_name, line, Some(origin), false);
        if let Some(peer) = &self.peer {
            peer.publish_leave(departure.clone());
        }
        self.user_left(departure, Origin::Here(origin));
    }

    /// Closes the connections of users erased since the last read (`closing account_erased`).
    fn erased(&mut self, erased: Vec<(String, u64)>) {
        for username in self.moderation.newly_erased(erased) {
            let tokens = self.users.get(&username).cloned().unwrap_or_default();
            if !tokens.is_empty() {
                log::info!("closing {} connection(s) of an erased user", tokens.len());
            }
            for token in tokens {
                if let Some(connection) = self.connections.get_mut(&token) {
                    connection.announce(Closing::AccountErased);
                }
                self.close(token);
            }
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
