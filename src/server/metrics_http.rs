//! The `/metrics` endpoint, served by the event loop itself: a few bounded HTTP clients, each timed out if it does not finish its request.

use super::*;

/// How long a scrape waits for the other loops' fresh reports before it is answered with
/// their last ones.
const SCRAPE_WAIT: Duration = Duration::from_millis(250);

/// The `/metrics` endpoint's own state: its listener and HTTP clients, and with several loops
/// the board the loops report to and the scrapes waiting for their reports.
pub(super) struct MetricsEndpoint {
    /// With several loops: where this loop reports its counters, and its number.
    pub(super) board: Option<(Arc<crate::metrics::MetricsBoard>, usize)>,
    pub(super) listener: Option<TcpListener>,
    pub(super) clients: HashMap<Token, MetricsClient>,
    pub(super) next_token: usize,
    /// Scrapes waiting for the other loops' fresh reports: client, scrape number, asked at.
    pub(super) scrapes: Vec<(Token, u64, Instant)>,
    /// The latest scrape this loop's report answered.
    pub(super) answered: u64,
}

impl Server {
    /// Closes metrics clients that have not been answered within the timeout.
    pub(super) fn expire_metrics_clients(&mut self, now: Instant) {
        let expired: Vec<Token> = self
            .metrics_http
            .clients
            .iter()
            .filter(|(_, c)| now.duration_since(c.opened_at) > METRICS_CLIENT_TIMEOUT)
            .map(|(token, _)| *token)
            .collect();
        for token in expired {
            if let Some(mut client) = self.metrics_http.clients.remove(&token) {
                let _ = self.poll.registry().deregister(&mut client.socket);
            }
        }
    }

    pub(super) fn accept_metrics_clients(&mut self) {
        let Some(listener) = &self.metrics_http.listener else {
            return;
        };
        while let Ok((mut socket, _)) = listener.accept() {
            if self.metrics_http.clients.len() >= MAX_METRICS_CLIENTS {
                // Closed at once (dropping the socket): the descriptor is back immediately.
                log::debug!("metrics client refused: {MAX_METRICS_CLIENTS} already connected");
                continue;
            }
            let token = Token(self.metrics_http.next_token);
            self.metrics_http.next_token += 1;
            let registered = self.poll.registry().register(
                &mut socket,
                token,
                Interest::READABLE | Interest::WRITABLE,
            );
            if registered.is_ok() {
                self.metrics_http
                    .clients
                    .insert(token, MetricsClient::new(socket));
            }
        }
    }

    /// Reports this loop's counters to the board the first loop renders from (`IO_THREADS`),
    /// answering the scrapes asked so far.
    pub(super) fn report_metrics(&mut self) {
        if let Some((board, index)) = &self.metrics_http.board {
            self.metrics_http.answered = self.metrics_http.answered.max(board.wanted());
            board.report(
                *index,
                crate::metrics::LoopReport {
                    metrics: self.metrics.clone(),
                    connections: self.connections.len(),
                    rooms_held_messages: self.sequencer.held(),
                    relay: self.relay_gauges(),
                    peer_link_up: self.redis_link_up(),
                    answers: self.metrics_http.answered,
                },
            );
        }
    }

    /// End of a turn: a scrape on the first loop asked for fresh counters (one atomic load
    /// per turn when nobody asked).
    pub(super) fn answer_scrapes(&mut self) {
        let asked = match &self.metrics_http.board {
            Some((board, index)) if *index > 0 => board.wanted() > self.metrics_http.answered,
            _ => false,
        };
        if asked {
            self.report_metrics();
        }
        if self.metrics_http.scrapes.is_empty() {
            return;
        }
        let now = Instant::now();
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.metrics_http.scrapes)
            .into_iter()
            .partition(|(_, scrape, asked_at)| {
                // A loop that cannot answer (stopping) does not hold the scrape for long.
                now.duration_since(*asked_at) >= SCRAPE_WAIT
                    || self
                        .metrics_http
                        .board
                        .as_ref()
                        .is_none_or(|(board, index)| board.answered(*scrape, *index))
            });
        self.metrics_http.scrapes = waiting;
        for (token, _, _) in ready {
            let body = self.render_metrics();
            if let Some(client) = self.metrics_http.clients.get_mut(&token) {
                client.respond(Some(body));
            }
            self.serve_metrics(token);
        }
    }

    fn redis_link(&self) -> Option<&PeerLink> {
        self.peer.as_ref().filter(|peer| !peer.is_local())
    }

    /// Whether this loop's Redis link is up (`None` without one).
    fn redis_link_up(&self) -> Option<bool> {
        self.redis_link().map(|_| self.relay.link_up)
    }

    /// This loop's own link to Redis (peer mode).
    fn relay_gauges(&self) -> Option<RelayGauges> {
        use std::sync::atomic::Ordering::Relaxed;
        self.redis_link().map(|peer| RelayGauges {
            subscribed_channels: peer.stats.subscribed.load(Relaxed),
            messages_in: peer.stats.messages_in.load(Relaxed),
            bytes_in: peer.stats.bytes_in.load(Relaxed),
            heartbeat_lag_ms: peer.stats.heartbeat_lag_ms.load(Relaxed),
            heartbeat_resets: peer.stats.heartbeat_resets.load(Relaxed),
            catch_ups: self.metrics.catch_ups,
            head_checks: self.metrics.head_checks,
        })
    }

    /// This loop's counters plus the other loops' last reports, as Prometheus text.
    fn render_metrics(&self) -> String {
        let (open_fds, fd_limit) = crate::fd_limit::usage();
        let others = match &self.metrics_http.board {
            Some((board, index)) => board.others(*index),
            None => Vec::new(),
        };
        let mut metrics = self.metrics.clone();
        for other in &others {
            metrics.add(&other.metrics);
        }
        let mut relay = self.relay_gauges();
        let mut peer_link_up = self.redis_link_up();
        for other in &others {
            if let (Some(mine), Some(theirs)) = (relay.as_mut(), other.relay.as_ref()) {
                mine.add(theirs);
            }
            if let (Some(mine), Some(theirs)) = (peer_link_up.as_mut(), other.peer_link_up) {
                // Up only while every loop's link is.
                *mine &= theirs;
            }
        }
        let gauges = Gauges {
            connections: self.connections.len()
                + others.iter().map(|o| o.connections).sum::<usize>(),
            presence_online: self.presence.online_count(),
            open_fds,
            fd_limit,
            rooms_held_messages: self.sequencer.held()
                + others.iter().map(|o| o.rooms_held_messages).sum::<usize>(),
            peer_link_up,
            relay,
        };
        metrics.render(gauges)
    }

    pub(super) fn serve_metrics(&mut self, token: Token) {
        if self
            .metrics_http
            .scrapes
            .iter()
            .any(|(waiting, _, _)| *waiting == token)
        {
            // Its answer waits for the other loops' reports (`answer_scrapes`).
            return;
        }
        let mut progress = match self.metrics_http.clients.get_mut(&token) {
            Some(client) => client.read(),
            None => return,
        };
        if let HttpProgress::Requested { path_ok } = progress {
            // A board exists only with several loops: ask them for fresh counters.
            if let (true, Some((board, index))) = (path_ok, &self.metrics_http.board) {
                let scrape = board.ask(*index);
                self.metrics_http
                    .scrapes
                    .push((token, scrape, Instant::now()));
                return;
            }
            let body = path_ok.then(|| self.render_metrics());
            let Some(client) = self.metrics_http.clients.get_mut(&token) else {
                return;
            };
            client.respond(body);
            progress = client.write();
        } else if progress == HttpProgress::Reading {
            if let Some(client) = self.metrics_http.clients.get_mut(&token) {
                progress = client.write();
            }
        }
        if progress == HttpProgress::Done {
            if let Some(mut client) = self.metrics_http.clients.remove(&token) {
                let _ = self.poll.registry().deregister(&mut client.socket);
            }
        }
    }
}
