//! The once-a-second sweep: login and idle timeouts, lingering closes, and store calls past their deadline.

use std::time::Instant;

use mio::Token;

use super::{Server, CLOSING_LINGER, STORE_DEADLINE_MARGIN, SWEEP_EVERY};
use crate::connection::Closing;
use crate::protocol::{encode_failure, ErrorCode, ProtocolError};
use crate::workers::Requester;

/// What the sweep found due on a connection.
pub(super) enum Overdue {
    /// Its `closing` line had `CLOSING_LINGER` to be written.
    Lingered,
    /// Its `closing` line is written: close it once what it was sent is acknowledged.
    Acknowledged,
    Timeout(Closing),
    /// Its store call outlived `STORE_TIMEOUT_MS`.
    StoreCall,
}

impl Server {
    /// Once per `SWEEP_EVERY`, in one pass over the connections: closes those past the login or
    /// idle timeout, answers requests whose store call outlived `STORE_TIMEOUT_MS`, and drops
    /// connections that lingered too long for their `closing` line; also forgets old leaves
    /// and idle metrics clients.
    pub(super) fn sweep(&mut self) {
        let now = Instant::now();
        if now.duration_since(self.last_sweep) < SWEEP_EVERY {
            return;
        }
        self.last_sweep = now;
        self.moderation.access.forget_old(now);
        self.live(|feature, cx| feature.sweep(cx));
        if let (Some(work), Some(pool)) =
            (self.moderation.erasure_poll(now), self.store.pool.as_mut())
        {
            pool.submit(Requester::Server, work);
        }
        self.metrics_http.report(super::loop_snapshot!(self));
        self.metrics_http.expire(now, self.io.poll.registry());
        let login_timeout = self.config.login_timeout;
        let idle_timeout = self.config.idle_timeout;
        let store_limit = self.config.store_timeout + STORE_DEADLINE_MARGIN;
        let due: Vec<(Token, Overdue)> = self
            .connections
            .iter()
            .filter_map(|(token, c)| {
                let overdue = if c
                    .lingering_since()
                    .is_some_and(|t| now.duration_since(t) > CLOSING_LINGER)
                {
                    Overdue::Lingered
                } else if c.lingering_since().is_some() && c.pending_output() == 0 {
                    // Its `closing` line is written; it waits only for the client's kernel to
                    // acknowledge the room lines before it (see `close`), checked here.
                    Overdue::Acknowledged
                } else if c.lingering_since().is_some() || c.is_doomed() {
                    // Already being closed for a reason of its own (a slow consumer, say):
                    // that reason stands, no timeout is announced after it.
                    return None;
                } else if c.session().username.is_none()
                    && now.duration_since(c.opened_at()) > login_timeout
                {
                    Overdue::Timeout(Closing::LoginTimeout)
                } else if idle_timeout.is_some_and(|idle| now.duration_since(c.last_heard()) > idle)
                {
                    Overdue::Timeout(Closing::IdleTimeout)
                } else if c.store_call_overdue(now, store_limit) {
                    Overdue::StoreCall
                } else {
                    return None;
                };
                Some((token, overdue))
            })
            .collect();
        for (token, overdue) in due {
            match overdue {
                Overdue::Lingered => self.close_now(token),
                Overdue::Acknowledged => self.close(token),
                Overdue::Timeout(reason) => {
                    if let Some(connection) = self.connections.get_mut(&token) {
                        log::info!("closing {}: {}", connection.peer(), reason.code());
                        connection.announce(reason);
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
    pub(super) fn answer_overdue_store_call(&mut self, token: Token) {
        let Some(connection) = self.connections.get_mut(&token) else {
            return;
        };
        let Some(id) = connection.give_up_oldest() else {
            return;
        };
        log::warn!(
            "store call for {} outlived STORE_TIMEOUT_MS",
            connection.peer()
        );
        self.metrics.error(ErrorCode::Unavailable);
        let error = ProtocolError::new(
            ErrorCode::Unavailable,
            "The store did not answer within STORE_TIMEOUT_MS; the request may not have been carried out.",
        );
        connection.queue_reply(encode_failure(&error.into(), id.as_deref()), None);
        // Answers that came back behind it may go now.
        self.deliver_answers(token);
    }
}
