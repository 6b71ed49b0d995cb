//! The `/metrics` endpoint, served by the event loop itself: a few bounded HTTP clients, each timed out if it does not finish its request.

use super::*;

impl Server {
    /// Closes metrics clients that have not been answered within the timeout.
    pub(super) fn expire_metrics_clients(&mut self, now: Instant) {
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

    pub(super) fn accept_metrics_clients(&mut self) {
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

    /// Reports this loop's counters to the board the first loop renders from (`IO_THREADS`).
    pub(super) fn report_metrics(&self) {
        if let Some((board, index)) = &self.metrics_board {
            board.report(
                *index,
                crate::metrics::LoopReport {
                    metrics: self.metrics.clone(),
                    connections: self.connections.len(),
                    rooms_held_messages: self.sequencer.held(),
                },
            );
        }
    }

    pub(super) fn serve_metrics(&mut self, token: Token) {
        let (open_fds, fd_limit) = crate::fd_limit::usage();
        // With several loops: this loop's counters plus the others' last reports.
        let others = match &self.metrics_board {
            Some((board, index)) => board.others(*index),
            None => Vec::new(),
        };
        let mut metrics = self.metrics.clone();
        for other in &others {
            metrics.add(&other.metrics);
        }
        let gauges = Gauges {
            connections: self.connections.len()
                + others.iter().map(|o| o.connections).sum::<usize>(),
            presence_online: self.presence.online_count(),
            open_fds,
            fd_limit,
            rooms_held_messages: self.sequencer.held()
                + others.iter().map(|o| o.rooms_held_messages).sum::<usize>(),
            peer_link_up: self.peer.as_ref().map(|_| self.peer_link_up),
            relay: self.peer.as_ref().map(|peer| {
                use std::sync::atomic::Ordering::Relaxed;
                RelayGauges {
                    subscribed_channels: peer.stats.subscribed.load(Relaxed),
                    messages_in: peer.stats.messages_in.load(Relaxed),
                    bytes_in: peer.stats.bytes_in.load(Relaxed),
                    heartbeat_lag_ms: peer.stats.heartbeat_lag_ms.load(Relaxed),
                    heartbeat_resets: peer.stats.heartbeat_resets.load(Relaxed),
                    catch_ups: self.metrics.catch_ups,
                    head_checks: self.metrics.head_checks,
                }
            }),
        };
        let Some(client) = self.metrics_clients.get_mut(&token) else {
            return;
        };
        let mut progress = client.read();
        if let HttpProgress::Requested { path_ok } = progress {
            client.respond(path_ok.then(|| metrics.render(gauges)));
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
