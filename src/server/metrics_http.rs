//! The `/metrics` endpoint, served by the event loop itself: a few bounded HTTP clients, each
//! timed out if it does not finish its request. With several loops the first one serves it,
//! asking the others for fresh reports through the metrics board. The loop hands in what it
//! reports: a `Snapshot` of its own counters and gauges, taken only when a report is due.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpListener;
use mio::{Interest, Registry, Token};

use super::{StartError, METRICS_LISTENER};
use crate::config::Config;
use crate::metrics::{Gauges, HttpProgress, LoopReport, MetricsBoard, MetricsClient};

/// How long a scrape waits for the other loops' fresh reports before it is answered with
/// their last ones.
const SCRAPE_WAIT: Duration = Duration::from_millis(250);
/// Simultaneous metrics HTTP clients; more are closed at once, so scrapers can never use up
/// the descriptors chat clients need.
const MAX_METRICS_CLIENTS: usize = 16;
/// A metrics client that has not received its response by then (idle, or a request that
/// never ends) is closed.
const METRICS_CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// What one loop reports: its counters and gauges (`answers` is the endpoint's to fill), and
/// the gauges only this loop knows (the live features').
pub(super) struct Snapshot {
    pub(super) report: LoopReport,
    pub(super) presence_online: usize,
}

/// The `/metrics` endpoint's own state: its listener and HTTP clients, and with several loops
/// the board the loops report to and the scrapes waiting for their reports.
pub(super) struct MetricsEndpoint {
    /// With several loops: where this loop reports its counters, and its number.
    board: Option<(Arc<MetricsBoard>, usize)>,
    listener: Option<TcpListener>,
    clients: HashMap<Token, MetricsClient>,
    next_token: usize,
    /// Scrapes waiting for the other loops' fresh reports: client, scrape number, asked at.
    scrapes: Vec<(Token, u64, Instant)>,
    /// The latest scrape this loop's report answered.
    answered: u64,
}

impl MetricsEndpoint {
    /// Listens on `METRICS_PORT` when it is set. `first_token`: where metrics clients' tokens
    /// start (far from the chat clients').
    pub(super) fn bind(
        config: &Config,
        registry: &Registry,
        board: Option<(Arc<MetricsBoard>, usize)>,
        first_token: usize,
    ) -> Result<MetricsEndpoint, StartError> {
        let listener = match config.metrics_port {
            Some(port) => {
                let addr = std::net::SocketAddr::new(config.bind, port);
                let mut listener = TcpListener::bind(addr)
                    .map_err(|source| StartError::Metrics { addr, source })?;
                registry
                    .register(&mut listener, METRICS_LISTENER, Interest::READABLE)
                    .map_err(StartError::Workers)?;
                Some(listener)
            }
            None => None,
        };
        Ok(MetricsEndpoint {
            board,
            listener,
            clients: HashMap::new(),
            next_token: first_token,
            scrapes: Vec::new(),
            answered: 0,
        })
    }

    /// Where `/metrics` is served, when it is.
    pub(super) fn local_addr(&self) -> Option<std::net::SocketAddr> {
        self.listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Closes metrics clients that have not been answered within the timeout.
    pub(super) fn expire(&mut self, now: Instant, registry: &Registry) {
        self.clients.retain(|_, client| {
            let expired = now.duration_since(client.opened_at) > METRICS_CLIENT_TIMEOUT;
            if expired {
                let _ = registry.deregister(&mut client.socket);
            }
            !expired
        });
    }

    pub(super) fn accept(&mut self, registry: &Registry) {
        let Some(listener) = &self.listener else {
            return;
        };
        while let Ok((mut socket, _)) = listener.accept() {
            if self.clients.len() >= MAX_METRICS_CLIENTS {
                // Closed at once (dropping the socket): the descriptor is back immediately.
                log::debug!("metrics client refused: {MAX_METRICS_CLIENTS} already connected");
                continue;
            }
            let token = Token(self.next_token);
            self.next_token += 1;
            let registered =
                registry.register(&mut socket, token, Interest::READABLE | Interest::WRITABLE);
            if registered.is_ok() {
                self.clients.insert(token, MetricsClient::new(socket));
            }
        }
    }

    /// Reports this loop's counters to the board the first loop renders from (`IO_THREADS`),
    /// answering the scrapes asked so far.
    pub(super) fn report(&mut self, snapshot: impl FnOnce() -> Snapshot) {
        if let Some((board, index)) = &self.board {
            self.answered = self.answered.max(board.wanted());
            let mut report = snapshot().report;
            report.answers = self.answered;
            board.report(*index, report);
        }
    }

    /// End of a turn: a scrape on the first loop asked for fresh counters (one atomic load
    /// per turn when nobody asked), and scrapes whose reports are in are answered.
    pub(super) fn answer_scrapes(&mut self, registry: &Registry, snapshot: &dyn Fn() -> Snapshot) {
        let asked = match &self.board {
            Some((board, index)) if *index > 0 => board.wanted() > self.answered,
            _ => false,
        };
        if asked {
            self.report(snapshot);
        }
        if self.scrapes.is_empty() {
            return;
        }
        let now = Instant::now();
        let board = &self.board;
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.scrapes)
            .into_iter()
            .partition(|(_, scrape, asked_at)| {
                // A loop that cannot answer (stopping) does not hold the scrape for long.
                now.duration_since(*asked_at) >= SCRAPE_WAIT
                    || board
                        .as_ref()
                        .is_none_or(|(board, index)| board.answered(*scrape, *index))
            });
        self.scrapes = waiting;
        for (token, _, _) in ready {
            let body = self.render(snapshot());
            if let Some(client) = self.clients.get_mut(&token) {
                client.respond(Some(body));
            }
            self.serve(token, registry, snapshot);
        }
    }

    /// This loop's snapshot plus the other loops' last reports, as Prometheus text.
    fn render(&self, mine: Snapshot) -> String {
        let (open_fds, fd_limit) = crate::fd_limit::usage();
        let others = match &self.board {
            Some((board, index)) => board.others(*index),
            None => Vec::new(),
        };
        let LoopReport {
            mut metrics,
            connections,
            rooms_held_messages,
            mut relay,
            mut peer_link_up,
            ..
        } = mine.report;
        for other in &others {
            metrics.add(&other.metrics);
            if let (Some(mine), Some(theirs)) = (relay.as_mut(), other.relay.as_ref()) {
                mine.add(theirs);
            }
            if let (Some(mine), Some(theirs)) = (peer_link_up.as_mut(), other.peer_link_up) {
                // Up only while every loop's link is.
                *mine &= theirs;
            }
        }
        let gauges = Gauges {
            connections: connections + others.iter().map(|o| o.connections).sum::<usize>(),
            presence_online: mine.presence_online,
            open_fds,
            fd_limit,
            rooms_held_messages: rooms_held_messages
                + others.iter().map(|o| o.rooms_held_messages).sum::<usize>(),
            peer_link_up,
            relay,
        };
        metrics.render(gauges)
    }

    /// Reads a client's request and writes its response (`snapshot`: this loop's, for the
    /// body); a client done is closed.
    pub(super) fn serve(
        &mut self,
        token: Token,
        registry: &Registry,
        snapshot: &dyn Fn() -> Snapshot,
    ) {
        if self.scrapes.iter().any(|(waiting, _, _)| *waiting == token) {
            // Its answer waits for the other loops' reports (`answer_scrapes`).
            return;
        }
        let mut progress = match self.clients.get_mut(&token) {
            Some(client) => client.read(),
            None => return,
        };
        if let HttpProgress::Requested { path_ok } = progress {
            // A board exists only with several loops: ask them for fresh counters.
            if let (true, Some((board, index))) = (path_ok, &self.board) {
                let scrape = board.ask(*index);
                self.scrapes.push((token, scrape, Instant::now()));
                return;
            }
            let body = path_ok.then(|| self.render(snapshot()));
            let Some(client) = self.clients.get_mut(&token) else {
                return;
            };
            client.respond(body);
            progress = client.write();
        } else if progress == HttpProgress::Reading {
            if let Some(client) = self.clients.get_mut(&token) {
                progress = client.write();
            }
        }
        if progress == HttpProgress::Done {
            if let Some(mut client) = self.clients.remove(&token) {
                let _ = registry.deregister(&mut client.socket);
            }
        }
    }
}
