//! One client connection: its socket, the framed requests waiting to be handled (the inbox), the
//! bytes waiting to be written (the outbox, written with vectored writes that survive partial
//! writes), and its session. Owns no policy beyond "read until told to stop, write what fits",
//! and the bookkeeping the limits need: bytes waiting in the inbox, broadcast bytes and reply
//! bytes waiting in the outbox (counted apart: only unread broadcasts make a slow consumer),
//! and which of its room's messages have really reached the client (for read marks).

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Instant;

use crate::framing::{Frame, LineFramer};
use crate::limits::TokenBucket;
use crate::protocol::RequestId;
use crate::session::Session;
use crate::transport::Transport;

/// Most buffers handed to one `writev`.
const MAX_IOVECS: usize = 64;
/// Framed requests a connection may have waiting before its socket is no longer read.
pub const MAX_INBOX_FRAMES: usize = 256;
/// Bytes of framed requests a connection may have waiting before its socket is no longer read.
/// With the frame cap this bounds the inbox to this plus one read (64 KiB) of new lines, so a
/// client that sends 64 KB lines and never reads its replies cannot make the server buffer
/// 256 of them (16 MiB).
pub const MAX_INBOX_BYTES: usize = 64 * 1024;
/// Room lines written but not yet known to be acknowledged by the client's kernel, kept before
/// the connection asks the kernel (one `ioctl`) how far the client got.
const SETTLE_AFTER: usize = 512;

/// Bytes waiting to be written: a reply of its own, or a broadcast shared with other connections.
#[derive(Debug, Clone)]
pub enum Chunk {
    Owned(Vec<u8>),
    Shared(Rc<Vec<u8>>),
}

impl Chunk {
    fn bytes(&self) -> &[u8] {
        match self {
            Chunk::Owned(bytes) => bytes,
            Chunk::Shared(bytes) => bytes,
        }
    }
}

/// Outcome of draining the socket's readable data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadState {
    /// Read everything the socket had.
    Drained,
    /// Stopped because the inbox is full; call again once it has room.
    Paused,
    /// The peer closed its sending side.
    Closed,
}

/// Why the server closes a connection on its own (the `code` of the `closing` line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closing {
    LoginTimeout,
    IdleTimeout,
    Shutdown,
    SlowConsumer,
    /// `MAX_AUTH_FAILURES` `find_user` attempts failed authentication.
    AuthFailed,
}

impl Closing {
    pub fn code(self) -> &'static str {
        match self {
            Closing::LoginTimeout => "login_timeout",
            Closing::IdleTimeout => "idle_timeout",
            Closing::Shutdown => "shutdown",
            Closing::SlowConsumer => "slow_consumer",
            Closing::AuthFailed => "auth_failed",
        }
    }

    pub fn text(self) -> &'static str {
        match self {
            Closing::LoginTimeout => "No find_user within LOGIN_TIMEOUT_MS; closing.",
            Closing::IdleTimeout => "Nothing received within IDLE_TIMEOUT_MS; closing.",
            Closing::Shutdown => "The server is shutting down.",
            Closing::SlowConsumer => {
                "Too much unread output (over MAX_OUTPUT_BYTES); closing. Reconnect and fetch what you missed."
            }
            Closing::AuthFailed => "Too many failed authentication attempts; closing.",
        }
    }
}

/// Which messages of the connection's room a queued line carries: seqs `first..=last`, queued
/// during room visit `visit` (lines queued for a room since left count for nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shows {
    pub first: u64,
    pub last: u64,
    visit: u64,
}

#[derive(Debug)]
struct Outgoing {
    chunk: Chunk,
    broadcast: bool,
    shows: Option<Shows>,
}

pub struct Connection {
    pub socket: Box<dyn Transport>,
    pub peer: SocketAddr,
    pub session: Session,
    /// The request `id` of the store job in flight, if one is.
    pub awaiting: Option<Option<RequestId>>,
    pub read_state: ReadState,
    /// Set when the connection must be dropped without further writes.
    pub doomed: bool,
    pub opened_at: Instant,
    /// Store-bound requests this connection may still make (see `limits`).
    pub bucket: TokenBucket,
    /// The server's leave clock when this connection's job in flight was submitted.
    pub leave_clock_at_submit: u64,
    /// Numbers this connection's store requests; the one in flight has the current number.
    pub ticket: u64,
    /// When the request in flight was submitted.
    pub awaiting_since: Instant,
    /// The latest requests answered `unavailable` by the store timeout (a few are kept: their
    /// late results must reach the client as broadcasts).
    timed_out: VecDeque<u64>,
    /// When the client last sent anything (for `IDLE_TIMEOUT_MS`).
    pub last_heard: Instant,
    /// Why the server is cutting this connection off, announced in a `closing` line.
    pub closing: Option<Closing>,
    /// `find_user` attempts refused by authentication so far.
    pub auth_failures: u32,
    /// Set once the `closing` line is queued and the connection only waits for it to be written.
    pub lingering_since: Option<Instant>,
    framer: LineFramer,
    inbox: VecDeque<Frame>,
    inbox_bytes: usize,
    outbox: VecDeque<Outgoing>,
    written_of_front: usize,
    pending_bytes: usize,
    pending_broadcast_bytes: usize,
    /// Counts room entries, so lines queued for an earlier visit are told apart.
    visit: u64,
    /// Bytes written to the socket since it opened.
    written_total: u64,
    /// Room lines written to the kernel, with the `written_total` at their end, not yet known
    /// to have reached the client: a written line is not a delivered one (a client cut off as
    /// a slow consumer loses what sat in the kernel's send buffer), so read marks count a line
    /// only once the client's kernel acknowledged it.
    unsettled: VecDeque<(u64, Shows)>,
}

impl Connection {
    pub fn new(
        socket: Box<dyn Transport>,
        peer: SocketAddr,
        max_line: usize,
        burst: f64,
    ) -> Connection {
        let opened_at = Instant::now();
        Connection {
            opened_at,
            bucket: TokenBucket::full(burst, opened_at),
            leave_clock_at_submit: 0,
            ticket: 0,
            awaiting_since: opened_at,
            timed_out: VecDeque::new(),
            last_heard: opened_at,
            closing: None,
            auth_failures: 0,
            lingering_since: None,
            socket,
            peer,
            session: Session::default(),
            awaiting: None,
            read_state: ReadState::Drained,
            doomed: false,
            framer: LineFramer::new(max_line),
            inbox: VecDeque::new(),
            inbox_bytes: 0,
            outbox: VecDeque::new(),
            written_of_front: 0,
            pending_bytes: 0,
            pending_broadcast_bytes: 0,
            visit: 0,
            written_total: 0,
            unsettled: VecDeque::new(),
        }
    }

    /// Reads until the socket is drained, closed, or the inbox is full (`MAX_INBOX_FRAMES` or
    /// `MAX_INBOX_BYTES`).
    pub fn read_available(&mut self, buffer: &mut [u8]) -> io::Result<ReadState> {
        loop {
            if self.inbox_full() {
                self.read_state = ReadState::Paused;
                return Ok(self.read_state);
            }
            match self.socket.read(buffer) {
                Ok(0) => {
                    self.read_state = ReadState::Closed;
                    return Ok(self.read_state);
                }
                Ok(n) => {
                    self.last_heard = Instant::now();
                    let before = self.inbox.len();
                    self.framer.feed(&buffer[..n], &mut self.inbox);
                    if let Some(answers) = self.framer.take_telnet_answers() {
                        self.queue_reply(answers, None);
                    }
                    self.inbox_bytes += self
                        .inbox
                        .range(before..)
                        .map(Frame::bytes_held)
                        .sum::<usize>();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.read_state = ReadState::Drained;
                    return Ok(self.read_state);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn inbox_full(&self) -> bool {
        self.inbox.len() >= MAX_INBOX_FRAMES || self.inbox_bytes >= MAX_INBOX_BYTES
    }

    /// Whether a paused socket should be read again: the inbox has drained to half its bounds
    /// (hysteresis, so a busy client is not read one line at a time).
    pub fn inbox_has_room(&self) -> bool {
        self.inbox.len() < MAX_INBOX_FRAMES / 2 && self.inbox_bytes < MAX_INBOX_BYTES / 2
    }

    pub fn next_frame(&mut self) -> Option<Frame> {
        let frame = self.inbox.pop_front()?;
        self.inbox_bytes -= frame.bytes_held();
        Some(frame)
    }

    /// Queues a reply line; `shows` names the room messages it carries, if any.
    pub fn queue_reply(&mut self, line: Vec<u8>, shows: Option<(u64, u64)>) {
        self.push(Chunk::Owned(line), false, shows);
    }

    /// Queues one message of the room, shared with the room's other connections (or owned,
    /// for a catch-up line). Returns the broadcast bytes now waiting (the slow-consumer measure).
    pub fn queue_broadcast(&mut self, chunk: Chunk, seq: u64) -> usize {
        self.push(chunk, true, Some((seq, seq)));
        self.pending_broadcast_bytes
    }

    fn push(&mut self, chunk: Chunk, broadcast: bool, shows: Option<(u64, u64)>) {
        let len = chunk.bytes().len();
        self.pending_bytes += len;
        if broadcast {
            self.pending_broadcast_bytes += len;
        }
        let visit = self.visit;
        let shows = shows.map(|(first, last)| Shows { first, last, visit });
        self.outbox.push_back(Outgoing {
            chunk,
            broadcast,
            shows,
        });
    }

    /// The connection entered a room (or left one): lines queued before count for nothing.
    pub fn new_visit(&mut self) {
        self.visit += 1;
        self.unsettled.clear();
    }

    pub fn pending_output(&self) -> usize {
        self.pending_bytes
    }

    /// Bytes of replies (not broadcasts) waiting to be written.
    pub fn pending_reply_bytes(&self) -> usize {
        // Saturating: a broadcast partly written counts whole in the broadcast bytes.
        self.pending_bytes
            .saturating_sub(self.pending_broadcast_bytes)
    }

    /// Writes as much of the outbox as the socket takes now.
    pub fn flush(&mut self) -> io::Result<()> {
        if !self.socket.flush_held()? {
            return Ok(());
        }
        while !self.outbox.is_empty() {
            let slices: Vec<IoSlice<'_>> = self
                .outbox
                .iter()
                .take(MAX_IOVECS)
                .enumerate()
                .map(|(i, out)| {
                    IoSlice::new(if i == 0 {
                        &out.chunk.bytes()[self.written_of_front..]
                    } else {
                        out.chunk.bytes()
                    })
                })
                .collect();
            match self.socket.write_vectored(&slices) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.consume(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn consume(&mut self, mut written: usize) {
        self.pending_bytes -= written;
        self.written_total += written as u64;
        while let Some(front) = self.outbox.front() {
            let len = front.chunk.bytes().len();
            let left = len - self.written_of_front;
            if written < left {
                self.written_of_front += written;
                return;
            }
            written -= left;
            self.written_of_front = 0;
            if let Some(out) = self.outbox.pop_front() {
                if out.broadcast {
                    self.pending_broadcast_bytes -= len;
                }
                if let Some(shows) = out.shows.filter(|s| s.visit == self.visit) {
                    let end = self.written_total - written as u64;
                    self.unsettled.push_back((end, shows));
                }
            }
        }
        if self.unsettled.len() >= SETTLE_AFTER {
            self.settle();
        }
    }

    /// Moves the room's read frontier over the lines the client's kernel has acknowledged
    /// (everything written minus what is still in the socket's send queue). Call before
    /// reading `session.leaving_mark()`.
    pub fn settle(&mut self) {
        if self.unsettled.is_empty() {
            return;
        }
        let acked = self
            .written_total
            .saturating_sub(self.socket.unacknowledged());
        while let Some(&(end, shows)) = self.unsettled.front() {
            if end > acked {
                break;
            }
            self.unsettled.pop_front();
            if let Some(room) = self
                .session
                .room
                .as_mut()
                .filter(|_| shows.visit == self.visit)
            {
                room.frontier.written(shows.first, shows.last);
            }
        }
    }

    /// Whether the store request numbered `ticket` is the one this connection awaits.
    pub fn awaits(&self, ticket: u64) -> bool {
        self.awaiting.is_some() && self.ticket == ticket
    }

    /// The request in flight was answered by the store timeout.
    pub fn give_up_waiting(&mut self) {
        if self.timed_out.len() >= 16 {
            self.timed_out.pop_front();
        }
        self.timed_out.push_back(self.ticket);
    }

    /// Whether the request numbered `ticket` was answered by the store timeout.
    pub fn timed_out(&self, ticket: u64) -> bool {
        self.timed_out.contains(&ticket)
    }

    /// Whether some room lines wait for `settle`.
    pub fn has_unsettled(&self) -> bool {
        !self.unsettled.is_empty()
    }

    /// Says goodbye: whatever is still unwritten is dropped (a line already partly written is
    /// kept whole, so the stream stays line-aligned), one `closing` line takes its place, and
    /// what the socket takes now is written. Best effort: a client that does not read may
    /// never see it.
    pub fn say_closing(&mut self, line: Vec<u8>) {
        let keep = usize::from(self.written_of_front > 0);
        while self.outbox.len() > keep {
            let Some(out) = self.outbox.pop_back() else {
                break;
            };
            let len = out.chunk.bytes().len();
            self.pending_bytes -= len;
            if out.broadcast {
                self.pending_broadcast_bytes -= len;
            }
        }
        self.queue_reply(line, None);
        let _ = self.flush();
    }

    /// True once the peer has closed and every request it sent is answered and written.
    pub fn finished(&self) -> bool {
        self.read_state == ReadState::Closed
            && self.inbox.is_empty()
            && self.awaiting.is_none()
            && self.outbox.is_empty()
            && !self.socket.holds_bytes()
    }
}
