//! Operational counters and their Prometheus text rendering, plus the tiny HTTP side that serves
//! `GET /metrics` from the event loop (one request per connection, then close).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use mio::net::TcpStream;

use crate::protocol::{ErrorCode, EventError};

/// Upper bounds (seconds) of the store latency histogram buckets.
const LATENCY_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];
/// Largest HTTP request head a metrics client may send.
const MAX_REQUEST_BYTES: usize = 8192;

/// Everything the server counts. Gauges are read from the loop's state when rendering.
#[derive(Debug, Default, Clone)]
pub struct Metrics {
    pub connections_accepted: u64,
    pub connections_refused: u64,
    pub messages_stored: u64,
    pub messages_delivered: u64,
    pub messages_relayed_in: u64,
    /// Database reads that filled rooms' missing messages (peer mode).
    pub catch_ups: u64,
    /// Connections cut off as slow consumers (`MAX_OUTPUT_BYTES` of unread broadcasts).
    pub slow_consumer_cuts: u64,
    /// Presence changes (a user came online or went offline, as this instance saw it).
    pub presence_events: u64,
    /// Batched reads of occupied groups' newest seqs (peer mode's tail check).
    pub head_checks: u64,
    errors: HashMap<&'static str, u64>,
    latency_counts: [u64; LATENCY_BUCKETS.len()],
    latency_sum: f64,
    latency_total: u64,
}

/// Gauges sampled at render time.
#[derive(Debug, Clone, Copy, Default)]
pub struct Gauges {
    pub connections: usize,
    /// Users online anywhere, as this instance knows (protocol 3 presence).
    pub presence_online: usize,
    /// Descriptors open, and the soft limit on them.
    pub open_fds: usize,
    pub fd_limit: u64,
    pub rooms_held_messages: usize,
    /// `None` when not in peer mode.
    pub peer_link_up: Option<bool>,
    /// The relay's counters (peer mode).
    pub relay: Option<RelayGauges>,
}

/// What the peer relay reports.
#[derive(Debug, Clone, Copy, Default)]
pub struct RelayGauges {
    pub subscribed_channels: u64,
    pub messages_in: u64,
    pub bytes_in: u64,
    pub heartbeat_lag_ms: u64,
    pub heartbeat_resets: u64,
    pub catch_ups: u64,
    pub head_checks: u64,
}

/// What each event loop last reported (`IO_THREADS`): the first loop renders `/metrics` as
/// the sum of its own counters and these, so the endpoint speaks for the whole process.
///
/// Loops report once a second on their own, and at once when asked: a scrape asks (`ask`),
/// every other loop reports at the end of its next turn and wakes the first, which answers
/// when all have (`answered`). So a scrape counts everything the loops did before it came
/// (a test that logs in and then scrapes sees its connection), not a second-old picture.
#[derive(Debug, Default)]
pub struct MetricsBoard {
    loops: std::sync::Mutex<Vec<Option<LoopReport>>>,
    /// The latest scrape's number: a loop whose report is older reports again.
    wanted: AtomicU64,
    wakers: std::sync::Arc<crate::loop_wakers::LoopWakers>,
}

/// One loop's counters and the gauges that add up across loops.
#[derive(Debug, Clone, Default)]
pub struct LoopReport {
    pub metrics: Metrics,
    pub connections: usize,
    pub rooms_held_messages: usize,
    /// In peer mode: the loop's own link (each loop is a peer of its own).
    pub relay: Option<RelayGauges>,
    pub peer_link_up: Option<bool>,
    /// The scrape this report answers (0: none yet).
    pub answers: u64,
}

impl MetricsBoard {
    pub fn new(
        loops: usize,
        wakers: std::sync::Arc<crate::loop_wakers::LoopWakers>,
    ) -> MetricsBoard {
        MetricsBoard {
            loops: std::sync::Mutex::new(vec![None; loops]),
            wanted: AtomicU64::new(0),
            wakers,
        }
    }

    fn reports(&self) -> std::sync::MutexGuard<'_, Vec<Option<LoopReport>>> {
        // A report is replaced whole, so a panicked holder left the list usable.
        self.loops.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Loop `index` reports (once a second, and when a scrape asked).
    pub fn report(&self, index: usize, report: LoopReport) {
        let asked = report.answers;
        if let Some(slot) = self.reports().get_mut(index) {
            *slot = Some(report);
        }
        if asked > 0 {
            self.wakers.wake(0);
        }
    }

    /// Every loop's last report but `except`'s (the caller's own, which it has fresh).
    pub fn others(&self, except: usize) -> Vec<LoopReport> {
        self.reports()
            .iter()
            .enumerate()
            .filter(|(index, _)| *index != except)
            .filter_map(|(_, report)| report.clone())
            .collect()
    }

    /// A scrape arrived at loop `asker`: the others are woken to report; returns its number.
    pub fn ask(&self, asker: usize) -> u64 {
        let scrape = self.wanted.fetch_add(1, Ordering::AcqRel) + 1;
        self.wakers.wake_others(asker);
        scrape
    }

    /// The latest scrape's number (checked by each loop at the end of its turn).
    pub fn wanted(&self) -> u64 {
        self.wanted.load(Ordering::Acquire)
    }

    /// Whether every loop but `asker` has reported for `scrape` (or a later one).
    pub fn answered(&self, scrape: u64, asker: usize) -> bool {
        self.reports()
            .iter()
            .enumerate()
            .filter(|(index, _)| *index != asker)
            .all(|(_, report)| report.as_ref().is_some_and(|r| r.answers >= scrape))
    }
}

impl RelayGauges {
    /// Adds another loop's link to this one's: counts add up, the lag is the worst.
    pub fn add(&mut self, other: &RelayGauges) {
        self.subscribed_channels += other.subscribed_channels;
        self.messages_in += other.messages_in;
        self.bytes_in += other.bytes_in;
        self.heartbeat_lag_ms = self.heartbeat_lag_ms.max(other.heartbeat_lag_ms);
        self.heartbeat_resets += other.heartbeat_resets;
        self.catch_ups += other.catch_ups;
        self.head_checks += other.head_checks;
    }
}

impl Metrics {
    /// Adds another loop's counters to these.
    pub fn add(&mut self, other: &Metrics) {
        self.connections_accepted += other.connections_accepted;
        self.connections_refused += other.connections_refused;
        self.messages_stored += other.messages_stored;
        self.messages_delivered += other.messages_delivered;
        self.messages_relayed_in += other.messages_relayed_in;
        self.catch_ups += other.catch_ups;
        self.slow_consumer_cuts += other.slow_consumer_cuts;
        self.presence_events += other.presence_events;
        self.head_checks += other.head_checks;
        for (code, count) in &other.errors {
            *self.errors.entry(code).or_default() += count;
        }
        for (mine, theirs) in self.latency_counts.iter_mut().zip(other.latency_counts) {
            *mine += theirs;
        }
        self.latency_sum += other.latency_sum;
        self.latency_total += other.latency_total;
    }

    pub fn error(&mut self, code: ErrorCode) {
        *self.errors.entry(code.as_str()).or_default() += 1;
    }

    /// Counts an error reply line by reading its code back (for lines built elsewhere): an
    /// `error` line's `code`, or one of protocol 1's own error events (`not_a_member`,
    /// `group_not_found`, ...), whose names are their codes. Other lines count nothing.
    pub fn error_line(&mut self, line: &[u8]) {
        // Every line the server writes starts with its event.
        let Some(event) = line.strip_prefix(b"{\"event\":\"").and_then(up_to_quote) else {
            return;
        };
        let code = if event == b"error" {
            text_after(line, b"\"code\":\"")
        } else {
            Some(event)
        };
        if let Some(code) = code.and_then(|code| all_codes().find(|c| c.as_bytes() == code)) {
            *self.errors.entry(code).or_default() += 1;
        }
    }

    pub fn store_latency(&mut self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        for (count, bound) in self.latency_counts.iter_mut().zip(LATENCY_BUCKETS) {
            if seconds <= bound {
                *count += 1;
            }
        }
        self.latency_sum += seconds;
        self.latency_total += 1;
    }

    /// The Prometheus text exposition.
    pub fn render(&self, gauges: Gauges) -> String {
        let mut out = String::new();
        let counter = |out: &mut String, name: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        };
        let gauge = |out: &mut String, name: &str, help: &str, value: usize| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        };
        gauge(
            &mut out,
            "noomnim_connections",
            "Open client connections.",
            gauges.connections,
        );
        gauge(
            &mut out,
            "noomnim_open_fds",
            "File descriptors the process has open.",
            gauges.open_fds,
        );
        gauge(
            &mut out,
            "noomnim_fd_limit",
            "The soft limit on open file descriptors.",
            gauges.fd_limit as usize,
        );
        gauge(
            &mut out,
            "noomnim_presence_online_users",
            "Users online on any instance, as this one knows.",
            gauges.presence_online,
        );
        counter(
            &mut out,
            "noomnim_presence_changes_total",
            "Times a user came online or went offline.",
            self.presence_events,
        );
        counter(
            &mut out,
            "noomnim_slow_consumer_cuts_total",
            "Connections cut off for leaving MAX_OUTPUT_BYTES of broadcasts unread.",
            self.slow_consumer_cuts,
        );
        counter(
            &mut out,
            "noomnim_retention_pruned_total",
            "Messages removed by retention (RETENTION_MAX_AGE, RETENTION_MAX_MESSAGES).",
            crate::retention::PRUNED.load(std::sync::atomic::Ordering::Relaxed),
        );
        let push =
            |stat: &std::sync::atomic::AtomicU64| stat.load(std::sync::atomic::Ordering::Relaxed);
        counter(
            &mut out,
            "noomnim_push_delivered_total",
            "Offline notices the push webhook accepted (2xx).",
            push(&crate::push::DELIVERED),
        );
        counter(
            &mut out,
            "noomnim_push_failed_total",
            "Push webhook deliveries that failed (each retried with backoff).",
            push(&crate::push::FAILED),
        );
        counter(
            &mut out,
            "noomnim_push_dropped_total",
            "Undelivered offline notices dropped past PUSH_QUEUE_MAX or PUSH_MAX_AGE.",
            push(&crate::push::DROPPED),
        );
        counter(
            &mut out,
            "noomnim_push_skipped_online_total",
            "Queued notices not sent because the user was online (the message reached them).",
            push(&crate::push::SKIPPED_ONLINE),
        );
        gauge(
            &mut out,
            "noomnim_push_queued",
            "Offline notices waiting in the store's queue.",
            push(&crate::push::QUEUED) as usize,
        );
        gauge(
            &mut out,
            "noomnim_push_oldest_age_seconds",
            "Age of the oldest queued offline notice (0: none).",
            (push(&crate::push::OLDEST_AGE_MS) / 1000) as usize,
        );
        counter(
            &mut out,
            "noomnim_connections_accepted_total",
            "Client connections accepted.",
            self.connections_accepted,
        );
        counter(
            &mut out,
            "noomnim_connections_refused_total",
            "Client connections refused by a limit.",
            self.connections_refused,
        );
        counter(
            &mut out,
            "noomnim_messages_stored_total",
            "Messages stored by this instance.",
            self.messages_stored,
        );
        counter(
            &mut out,
            "noomnim_messages_delivered_total",
            "message_sent lines queued to clients (replies and broadcasts).",
            self.messages_delivered,
        );
        counter(
            &mut out,
            "noomnim_messages_relayed_in_total",
            "Messages received from peers.",
            self.messages_relayed_in,
        );
        gauge(
            &mut out,
            "noomnim_messages_held",
            "Messages held back waiting for an earlier seq.",
            gauges.rooms_held_messages,
        );
        self.render_errors(&mut out);
        self.render_latency(&mut out);
        if let Some(up) = gauges.peer_link_up {
            gauge(
                &mut out,
                "noomnim_peer_link_up",
                "1 when subscribed to Redis (peer mode).",
                usize::from(up),
            );
        }
        if let Some(relay) = gauges.relay {
            let rows: [(&str, &str, u64); 7] = [
                (
                    "noomnim_peer_subscribed_channels",
                    "Redis channels subscribed now (control + groups with an occupied room).",
                    relay.subscribed_channels,
                ),
                (
                    "noomnim_peer_relay_messages_in_total",
                    "Messages received from other instances through Redis.",
                    relay.messages_in,
                ),
                (
                    "noomnim_peer_relay_bytes_in_total",
                    "Payload bytes received from Redis.",
                    relay.bytes_in,
                ),
                (
                    "noomnim_peer_heartbeat_lag_ms",
                    "Milliseconds from publishing to receiving this instance's last heartbeat.",
                    relay.heartbeat_lag_ms,
                ),
                (
                    "noomnim_peer_heartbeat_resets_total",
                    "Times the subscriber missed its own heartbeat and subscribed again.",
                    relay.heartbeat_resets,
                ),
                (
                    "noomnim_peer_catch_ups_total",
                    "Database reads that filled a room's missing messages.",
                    relay.catch_ups,
                ),
                (
                    "noomnim_peer_head_checks_total",
                    "Batched reads of the occupied groups' newest seqs (looking for unrelayed messages).",
                    relay.head_checks,
                ),
            ];
            for (name, help, value) in rows {
                gauge(&mut out, name, help, value as usize);
            }
        }
        out
    }

    fn render_errors(&self, out: &mut String) {
        out.push_str("# HELP noomnim_errors_total Error replies sent, by code.\n");
        out.push_str("# TYPE noomnim_errors_total counter\n");
        for code in all_codes() {
            let count = self.errors.get(code).copied().unwrap_or(0);
            let _ = writeln!(out, "noomnim_errors_total{{code=\"{code}\"}} {count}");
        }
    }

    fn render_latency(&self, out: &mut String) {
        let name = "noomnim_store_latency_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Time from queueing a store job to its result."
        );
        let _ = writeln!(out, "# TYPE {name} histogram");
        for (count, bound) in self.latency_counts.iter().zip(LATENCY_BUCKETS) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {count}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.latency_total);
        let _ = writeln!(out, "{name}_sum {}", self.latency_sum);
        let _ = writeln!(out, "{name}_count {}", self.latency_total);
    }
}

/// Every error code a reply can carry: the protocol's and protocol 1's error events.
fn all_codes() -> impl Iterator<Item = &'static str> {
    ErrorCode::ALL
        .iter()
        .map(|code| code.as_str())
        .chain(EventError::ALL.iter().map(|error| error.event()))
}

/// The string value that follows `key` (which ends with its opening quote) in `line`.
fn text_after<'a>(line: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    let start = line.windows(key.len()).position(|w| w == key)? + key.len();
    up_to_quote(&line[start..])
}

/// `text` up to its first quote (a JSON string's end when it holds no escapes, as codes do).
fn up_to_quote(text: &[u8]) -> Option<&[u8]> {
    let length = text.iter().position(|&b| b == b'"')?;
    Some(&text[..length])
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

/// One HTTP client of the metrics endpoint.
pub struct MetricsClient {
    pub socket: TcpStream,
    /// When it connected: a client that has not been answered within the timeout is closed.
    pub opened_at: std::time::Instant,
    request: Vec<u8>,
    response: Vec<u8>,
    written: usize,
}

/// What a metrics client needs next.
#[derive(Debug, PartialEq, Eq)]
pub enum HttpProgress {
    /// Waiting for more of the request.
    Reading,
    /// The request is complete; `path_ok` says whether it asked for `GET /metrics`.
    Requested { path_ok: bool },
    /// The response is written (or the client is gone): close it.
    Done,
}

impl MetricsClient {
    pub fn new(socket: TcpStream) -> MetricsClient {
        MetricsClient {
            socket,
            opened_at: std::time::Instant::now(),
            request: Vec::new(),
            response: Vec::new(),
            written: 0,
        }
    }

    /// Reads what arrived; reports a complete request once.
    pub fn read(&mut self) -> HttpProgress {
        if !self.response.is_empty() {
            return HttpProgress::Reading;
        }
        let mut buffer = [0u8; 1024];
        loop {
            match self.socket.read(&mut buffer) {
                Ok(0) => return HttpProgress::Done,
                Ok(n) => self.request.extend_from_slice(&buffer[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return HttpProgress::Done,
            }
            if self.request.len() > MAX_REQUEST_BYTES {
                return HttpProgress::Requested { path_ok: false };
            }
        }
        if !contains(&self.request, b"\r\n\r\n") && !contains(&self.request, b"\n\n") {
            return HttpProgress::Reading;
        }
        let path_ok = self.request.starts_with(b"GET /metrics ")
            || self.request.starts_with(b"GET /metrics?");
        HttpProgress::Requested { path_ok }
    }

    /// Sets the response: 200 with `body`, or 404.
    pub fn respond(&mut self, body: Option<String>) {
        let (status, body) = match body {
            Some(body) => ("200 OK", body),
            None => (
                "404 Not Found",
                "only GET /metrics is served here\n".to_string(),
            ),
        };
        self.response = format!(
            "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes();
    }

    /// Writes what fits; `Done` once all is written or the socket failed.
    pub fn write(&mut self) -> HttpProgress {
        while self.written < self.response.len() {
            match self.socket.write(&self.response[self.written..]) {
                Ok(0) => return HttpProgress::Done,
                Ok(n) => self.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return HttpProgress::Reading,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return HttpProgress::Done,
            }
        }
        if self.response.is_empty() {
            HttpProgress::Reading
        } else {
            HttpProgress::Done
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_errors_and_histogram() {
        let mut metrics = Metrics {
            messages_stored: 3,
            ..Metrics::default()
        };
        metrics.error(ErrorCode::RateLimited);
        metrics.error_line(br#"{"event":"error","data":{"Error":"x","code":"bad_json"}}"#);
        metrics
            .error_line(br#"{"event":"not_a_member","data":{"Error":"x","code":"not_a_member"}}"#);
        metrics.error_line(br#"{"event":"groups","data":{"groups":[]}}"#);
        metrics.store_latency(Duration::from_millis(2));
        let text = metrics.render(Gauges {
            connections: 2,
            presence_online: 0,
            open_fds: 10,
            fd_limit: 1024,
            rooms_held_messages: 0,
            peer_link_up: Some(true),
            relay: None,
        });
        assert!(text.contains("noomnim_messages_stored_total 3"));
        assert!(text.contains("noomnim_errors_total{code=\"rate_limited\"} 1"));
        assert!(text.contains("noomnim_errors_total{code=\"bad_json\"} 1"));
        assert!(text.contains("noomnim_errors_total{code=\"not_a_member\"} 1"));
        assert!(text.contains("noomnim_errors_total{code=\"group_not_found\"} 0"));
        assert!(text.contains("noomnim_store_latency_seconds_bucket{le=\"0.001\"} 0"));
        assert!(text.contains("noomnim_store_latency_seconds_bucket{le=\"0.0025\"} 1"));
        assert!(text.contains("noomnim_peer_link_up 1"));
        assert!(text.contains("noomnim_connections 2"));
    }
}
