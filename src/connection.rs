//! One client connection: its socket, the framed requests waiting to be handled (the inbox), its
//! requests in flight (answered in order, `in_flight.rs`), the bytes waiting to be written (the
//! outbox, written with vectored writes that survive partial writes), and its session.
//!
//! It keeps its own bounds: the line length and inbox size (reading pauses when full), the
//! unread broadcast bytes (`MAX_OUTPUT_BYTES`: over it the client is cut off as a slow
//! consumer), the rate-limit bucket, failed authentications, and the requests in flight.
//! Replies and broadcasts are counted apart (only unread broadcasts make a slow consumer), and
//! it knows which of its room's messages have really reached the client (for read marks).
//! Its fields are private: the event loop asks and tells, it does not reach in.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::framing::{Frame, LineFramer};
use crate::in_flight::{Answered, InFlight};
use crate::limits::TokenBucket;
use crate::pages::Run;
use crate::protocol::RequestId;
use crate::session::Completed;
use crate::session::{ResumeCursor, Room, Session, MAX_AUTH_FAILURES};
use crate::transport::Transport;
use crate::workers::Work;

/// Most buffers handed to one `writev`.
const MAX_IOVECS: usize = 64;
/// Held output this large is written at once: a longer wait would not save a write.
const WRITE_NOW_BYTES: usize = 64 * 1024;
/// Framed requests a connection may have waiting before its socket is no longer read.
pub const MAX_INBOX_FRAMES: usize = 256;
/// Bytes of framed requests a connection may have waiting before its socket is no longer read.
/// With the frame cap this bounds the inbox to this plus one read (64 KiB) of new lines, so a
/// client that sends 64 KB lines and never reads its replies cannot make the server buffer
/// 256 of them (16 MiB).
pub const MAX_INBOX_BYTES: usize = 64 * 1024;
/// Unwritten replies past which telnet negotiation answers are dropped (see `framing`).
const TELNET_ANSWER_BACKLOG: usize = 64 * 1024;
/// Runs of a room's shared pages one connection may have queued; past this, a line that starts
/// a new run is queued as a copy of its own. A run keeps its whole page (`pages::PAGE_BYTES`)
/// alive, so this bounds the pages a client that does not read can pin to about
/// `MAX_OUTPUT_BYTES` (1 MiB by default) however its lines fall on them.
const MAX_SHARED_RUNS: usize = 32;
/// Room lines written but not yet known to be acknowledged by the client's kernel, kept before
/// the connection asks the kernel (one `ioctl`) how far the client got.
const SETTLE_AFTER: usize = 512;

/// Bytes waiting to be written: a reply of its own, or a run of room lines on a page shared with
/// the room's other connections (`pages`).
#[derive(Debug, Clone)]
enum Chunk {
    Owned(Vec<u8>),
    Shared(Run),
}

impl Chunk {
    fn bytes(&self) -> &[u8] {
        match self {
            Chunk::Owned(bytes) => bytes,
            Chunk::Shared(run) => run.bytes(),
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
    /// The logged-in user was erased (`noomnim admin erase-user`).
    AccountErased,
}

impl Closing {
    pub fn code(self) -> &'static str {
        match self {
            Closing::LoginTimeout => "login_timeout",
            Closing::IdleTimeout => "idle_timeout",
            Closing::Shutdown => "shutdown",
            Closing::SlowConsumer => "slow_consumer",
            Closing::AuthFailed => "auth_failed",
            Closing::AccountErased => "account_erased",
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
            Closing::AccountErased => "This account was erased by an operator; closing.",
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
    /// A page of a resume's backlog: dropped, unwritten, when access to the group ends.
    backlog: bool,
}

impl Outgoing {
    /// Takes in room line `next` (message `seq`, queued in room visit `visit`) when it follows
    /// this run on its page and in seq order; true when it did.
    fn continued_by(&mut self, next: &Run, seq: u64, visit: u64) -> bool {
        let (Chunk::Shared(run), Some(shows)) = (&mut self.chunk, self.shows.as_mut()) else {
            return false;
        };
        if !self.broadcast || shows.visit != visit || shows.last + 1 != seq || !run.extend(next) {
            return false;
        }
        shows.last = seq;
        true
    }

    /// Lines of a run written whole by the `written` bytes from `offset` (where an earlier
    /// partial write stopped): the seqs they carry are taken off the front of `shows`, and the
    /// bytes from `offset` to the end of the last whole line returned.
    fn lines_done(&mut self, offset: usize, written: usize) -> Option<(usize, Shows)> {
        let shows = self.shows.as_mut()?;
        if shows.first >= shows.last || !matches!(self.chunk, Chunk::Shared(_)) {
            return None;
        }
        let part = &self.chunk.bytes()[offset..offset + written];
        let whole = part.iter().filter(|&&b| b == b'\n').count() as u64;
        let last_end = part.iter().rposition(|&b| b == b'\n')? + 1;
        let done = Shows {
            first: shows.first,
            last: shows.first + whole - 1,
            visit: shows.visit,
        };
        shows.first += whole;
        Some((last_end, done))
    }
}

/// The bounds one connection keeps by itself.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Longest request line (`MAX_LINE_BYTES`).
    pub max_line_bytes: usize,
    /// Unread broadcast bytes after which the client is cut off (`MAX_OUTPUT_BYTES`).
    pub max_output_bytes: usize,
    /// Store-bound requests a new connection may make at once (`RATE_BURST`).
    pub rate_burst: f64,
    /// Messages it may have with the store at once (see `in_flight`).
    pub pipeline_depth: usize,
}

pub struct Connection {
    socket: Box<dyn Transport>,
    peer: SocketAddr,
    session: Session,
    /// Store requests out and replies waiting for their turn (see `in_flight`).
    in_flight: InFlight,
    /// A planned store job that must wait until nothing is in flight (not a message).
    held: Option<(Work, Option<RequestId>)>,
    read_state: ReadState,
    /// Set when the connection must be dropped without further writes.
    doomed: bool,
    /// Already in the loop's list of connections to service this turn.
    touched: bool,
    /// Broadcasts wait here for the next deferred flush (`WRITE_DELAY_MS`); the flag keeps the
    /// connection once in the loop's list of them.
    deferred: bool,
    opened_at: Instant,
    max_output_bytes: usize,
    /// Store-bound requests this connection may still make (see `limits`).
    bucket: TokenBucket,
    /// When the client last sent anything (for `IDLE_TIMEOUT_MS`).
    last_heard: Instant,
    /// Why the server is cutting this connection off, announced in a `closing` line.
    closing: Option<Closing>,
    /// `find_user` attempts refused by authentication so far.
    auth_failures: u32,
    /// Set once the `closing` line is queued and the connection only waits for it to be written.
    lingering_since: Option<Instant>,
    framer: LineFramer,
    inbox: VecDeque<Frame>,
    inbox_bytes: usize,
    outbox: VecDeque<Outgoing>,
    /// Entries of the outbox that are runs of shared pages (at most `MAX_SHARED_RUNS`).
    shared_runs: usize,
    written_of_front: usize,
    pending_bytes: usize,
    pending_broadcast_bytes: usize,
    /// Counts room entries, so lines queued for an earlier visit are told apart.
    visit: u64,
    /// The group whose resume backlog is being streamed (see `end_resume`).
    streaming: Option<String>,
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
        bounds: Bounds,
        tls: bool,
    ) -> Connection {
        let opened_at = Instant::now();
        Connection {
            opened_at,
            bucket: TokenBucket::full(bounds.rate_burst, opened_at),
            max_output_bytes: bounds.max_output_bytes,
            in_flight: InFlight::new(bounds.pipeline_depth),
            held: None,
            last_heard: opened_at,
            closing: None,
            auth_failures: 0,
            lingering_since: None,
            socket,
            peer,
            session: Session {
                tls,
                ..Session::default()
            },
            read_state: ReadState::Drained,
            doomed: false,
            touched: false,
            deferred: false,
            framer: LineFramer::new(bounds.max_line_bytes),
            inbox: VecDeque::new(),
            inbox_bytes: 0,
            outbox: VecDeque::new(),
            shared_runs: 0,
            written_of_front: 0,
            pending_bytes: 0,
            pending_broadcast_bytes: 0,
            visit: 0,
            streaming: None,
            written_total: 0,
            unsettled: VecDeque::new(),
        }
    }

    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    pub fn session(&self) -> &Session {
        &self.session
    }

    /// Binds the connection to a user (`find_user` succeeded); earlier failed attempts are
    /// forgiven.
    pub fn bind(&mut self, username: String) {
        self.session.username = Some(username);
        self.auth_failures = 0;
    }

    /// Applies what a `hello` asked for: the protocol version, implicit read marks.
    pub fn apply_settings(&mut self, settings: crate::session::Settings) {
        if let Some(version) = settings.protocol {
            self.session.protocol = version;
        }
        if let Some(implicit_read) = settings.implicit_read {
            self.session.implicit_read = implicit_read;
        }
        if let Some(presence) = settings.presence {
            self.session.presence = presence;
        }
    }

    /// A resume goes on after `cursor` once the output drains (see `take_due_resume`).
    pub fn resume_from(&mut self, cursor: ResumeCursor) {
        if self.streaming.as_deref() != Some(cursor.group_name.as_str()) {
            self.streaming = Some(cursor.group_name.clone());
        }
        self.session.resume = Some(cursor);
    }

    /// The resume cursor, taken, when its next page is due: nothing in flight or held, and
    /// less than `low_water` bytes waiting to be written. Taken, so a page that fails ends
    /// the resume instead of retrying forever; a page that succeeds puts it back.
    pub fn take_due_resume(&mut self, low_water: usize) -> Option<ResumeCursor> {
        if self.session.resume.is_none()
            || self.doomed
            || !self.in_flight.is_empty()
            || self.held.is_some()
            || self.pending_bytes > low_water
        {
            return None;
        }
        self.session.resume.take()
    }

    /// Puts the connection in a room; lines queued for an earlier room count for nothing.
    pub fn enter_room(&mut self, room: Room) {
        self.session.resume = None;
        self.session.room = Some(room);
        self.new_visit();
    }

    /// Takes the connection out of its room, if it is in one.
    pub fn leave_room(&mut self) -> Option<Room> {
        let room = self.session.room.take()?;
        self.new_visit();
        Some(room)
    }

    pub fn opened_at(&self) -> Instant {
        self.opened_at
    }

    pub fn last_heard(&self) -> Instant {
        self.last_heard
    }

    pub fn read_state(&self) -> ReadState {
        self.read_state
    }

    /// The TCP socket under the transport (for registering with the poll).
    pub fn tcp(&mut self) -> &mut mio::net::TcpStream {
        self.socket.tcp()
    }

    /// Takes one store-bound request from the rate limit's bucket; false when it is empty.
    pub fn take_token(&mut self, now: Instant, rate: f64, burst: f64) -> bool {
        self.bucket.take(now, rate, burst)
    }

    /// Counts a `find_user` refused by authentication; after `MAX_AUTH_FAILURES` consecutive
    /// failures the connection is cut off (`auth_failed`). True when that happened now. A
    /// connection already logged in is not cut off by a failed refresh (the failure count is
    /// about guessing a way in; it keeps the login it proved).
    pub fn count_auth_failure(&mut self) -> bool {
        if self.session.username.is_some() {
            return false;
        }
        self.auth_failures += 1;
        if self.auth_failures < MAX_AUTH_FAILURES {
            return false;
        }
        self.cut_off(Closing::AuthFailed);
        true
    }

    /// Drops the connection without further writes (a failed read or write).
    pub fn doom(&mut self) {
        self.doomed = true;
    }

    pub fn is_doomed(&self) -> bool {
        self.doomed
    }

    /// Marks the connection for servicing this turn; true when it was not marked yet (the
    /// loop keeps each connection once in its list without sorting it).
    pub fn touch(&mut self) -> bool {
        !std::mem::replace(&mut self.touched, true)
    }

    /// The loop is servicing it now.
    pub fn untouch(&mut self) {
        self.touched = false;
    }

    /// Marks the connection for the next deferred flush of broadcasts; true when it was not
    /// marked yet.
    pub fn defer(&mut self) -> bool {
        !std::mem::replace(&mut self.deferred, true)
    }

    /// The deferred flush is due: the loop services it now.
    pub fn undefer(&mut self) {
        self.deferred = false;
    }

    /// Announces a `closing` reason; the connection is closed after it (see `take_closing`).
    /// A connection already cut off keeps its first reason.
    pub fn announce(&mut self, reason: Closing) {
        if self.lingering_since.is_none() {
            self.closing.get_or_insert(reason);
        }
    }

    /// Cuts the connection off for `reason`: no more requests are handled, and the `closing`
    /// line is the last thing it is sent.
    pub fn cut_off(&mut self, reason: Closing) {
        if !self.doomed {
            self.closing = Some(reason);
            self.doomed = true;
        }
    }

    /// The reason announced for closing, taken (it is said once).
    pub fn take_closing(&mut self) -> Option<Closing> {
        self.closing.take()
    }

    /// The connection only waits for its `closing` line to be written.
    pub fn linger(&mut self, now: Instant) {
        self.lingering_since = Some(now);
        self.doomed = true;
    }

    pub fn lingering_since(&self) -> Option<Instant> {
        self.lingering_since
    }

    /// Whether another request may be taken from the inbox now: nothing is held, no barrier job
    /// is in flight, the pipeline depth is not reached, and replies are not piling up.
    pub fn takes_requests(&self, reply_backlog: usize) -> bool {
        self.held.is_none()
            && self.in_flight.accepts_requests()
            && self.pending_reply_bytes() <= reply_backlog
    }

    /// Queues an immediate reply behind any request still in flight.
    pub fn reply_in_order(&mut self, line: Vec<u8>) {
        if let Some(line) = self.in_flight.in_order(line) {
            self.queue_reply(line, None);
        }
    }

    /// A planned store job: returns it with its ticket when it may start now; otherwise it is
    /// held until what is in flight is answered (see `in_flight`).
    pub fn start_or_hold(
        &mut self,
        work: Work,
        id: Option<RequestId>,
        leave_clock: u64,
    ) -> Option<(Work, u64)> {
        let pipelined = work.pipelines();
        if !self.in_flight.admits(pipelined) {
            self.held = Some((work, id));
            return None;
        }
        let ticket = self
            .in_flight
            .start(id, leave_clock, pipelined, Instant::now());
        Some((work, ticket))
    }

    /// The held job, once nothing is in flight any more.
    pub fn start_held(&mut self, leave_clock: u64) -> Option<(Work, u64)> {
        if !self.in_flight.is_empty() {
            return None;
        }
        let (work, id) = self.held.take()?;
        self.start_or_hold(work, id, leave_clock)
    }

    /// Files the answer of store job `ticket`; false when it is no longer awaited (answered
    /// by the store timeout).
    pub fn answer(
        &mut self,
        ticket: u64,
        finish: impl FnOnce(Option<&serde_json::value::RawValue>) -> Completed,
    ) -> bool {
        self.in_flight.answer(ticket, finish)
    }

    /// Store job `ticket`'s answer waits (or no longer waits) for its message to be released
    /// to the room: answers behind it wait with it.
    pub fn wait_for_release(&mut self, ticket: u64, waits: bool) {
        self.in_flight.wait_for_release(ticket, waits);
    }

    /// The next answer whose turn has come.
    pub fn next_answer(&mut self) -> Option<Answered> {
        self.in_flight.next_ready()
    }

    /// Whether the oldest store job has been out longer than `limit`.
    pub fn store_call_overdue(&self, now: Instant, limit: Duration) -> bool {
        self.in_flight.overdue(now, limit)
    }

    /// Gives up on the oldest store job; returns its request id to answer `unavailable` with.
    pub fn give_up_oldest(&mut self) -> Option<Option<RequestId>> {
        self.in_flight.give_up_oldest()
    }

    /// Whether store job `ticket` was answered by the store timeout.
    pub fn timed_out(&self, ticket: u64) -> bool {
        self.in_flight.timed_out(ticket)
    }

    /// No request is in flight or held, and nothing waits to be written.
    pub fn idle(&self) -> bool {
        self.in_flight.is_empty() && self.held.is_none() && self.pending_bytes == 0
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
                    // Telnet answers to a client that does not read its replies are dropped:
                    // a client asking for TIMING-MARK in a loop must not grow the outbox.
                    if let Some(answers) = self.framer.take_telnet_answers() {
                        if self.pending_reply_bytes() < TELNET_ANSWER_BACKLOG {
                            self.queue_reply(answers, None);
                        }
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

    /// Whether framed requests wait in the inbox.
    pub fn has_requests(&self) -> bool {
        !self.inbox.is_empty()
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

    /// Queues a line the client did not ask for (a room's edit, delete, typing, presence,
    /// activity notice, a line to the user's devices): it counts toward `MAX_OUTPUT_BYTES`
    /// like a message, so a client that does not read is cut off as a slow consumer whatever
    /// it is sent. True when it was cut off now (or a write failed).
    pub fn queue_notice(&mut self, line: Vec<u8>) -> bool {
        self.push(Chunk::Owned(line), true, None);
        self.bound_output()
    }

    /// Queues one message of the room on its own (a catch-up line). A client with more than
    /// `max_output_bytes` of broadcasts unread is cut off as a slow consumer: true when that
    /// happened now (or a write failed), so the loop closes it this turn.
    pub fn queue_broadcast(&mut self, line: Vec<u8>, seq: u64) -> bool {
        self.push(Chunk::Owned(line), true, Some((seq, seq)));
        self.bound_output()
    }

    /// Queues one message of the room from the room's shared page: when it follows the last
    /// line queued (same page, next seq, same visit) that entry only grows. Cut off as
    /// `queue_broadcast`.
    pub fn queue_shared(&mut self, line: &Run, seq: u64) -> bool {
        let visit = self.visit;
        let continued = self
            .outbox
            .back_mut()
            .is_some_and(|back| back.continued_by(line, seq, visit));
        if continued {
            self.pending_bytes += line.len();
            self.pending_broadcast_bytes += line.len();
        } else if self.shared_runs < MAX_SHARED_RUNS {
            self.shared_runs += 1;
            self.push(Chunk::Shared(line.clone()), true, Some((seq, seq)));
        } else {
            self.push(Chunk::Owned(line.bytes().to_vec()), true, Some((seq, seq)));
        }
        self.bound_output()
    }

    /// Writes what is held once it is a full write's worth or over the bound, and cuts the
    /// client off if what the kernel refused is still over it.
    fn bound_output(&mut self) -> bool {
        // Lines held for a shared write (`WRITE_DELAY_MS`) are not unread: past a full write's
        // worth, or past the bound, they go to the kernel now and only what it refuses counts.
        if self.pending_bytes >= WRITE_NOW_BYTES
            || self.pending_broadcast_bytes > self.max_output_bytes
        {
            if let Err(e) = self.flush() {
                log::debug!("write to {} failed: {e}", self.peer);
                self.doom();
                return true;
            }
        }
        if self.pending_broadcast_bytes > self.max_output_bytes && !self.doomed {
            log::warn!("dropping {}: over MAX_OUTPUT_BYTES unread", self.peer);
            self.cut_off(Closing::SlowConsumer);
            return true;
        }
        false
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
            backlog: false,
        });
    }

    /// Queues a page of a resume's backlog (dropped by `end_resume`; the stream itself is
    /// named by the cursor its page sets, `resume_from`).
    pub fn queue_backlog(&mut self, line: Vec<u8>) {
        self.push(Chunk::Owned(line), false, None);
        if let Some(out) = self.outbox.back_mut() {
            out.backlog = true;
        }
    }

    /// Access to `group_name` ended (a leave, removal, ban or deletion): a resume streaming it
    /// stops now. Its cursor is dropped and what of its backlog is still unwritten too (a line
    /// being written is finished, so the stream stays line-aligned). True when a stream of that
    /// group was in progress.
    pub fn end_resume(&mut self, group_name: &str) -> bool {
        if self.streaming.as_deref() != Some(group_name) {
            return false;
        }
        self.streaming = None;
        if self
            .session
            .resume
            .as_ref()
            .is_some_and(|cursor| cursor.group_name == group_name)
        {
            self.session.resume = None;
        }
        let partly_written = self.written_of_front > 0;
        let mut kept = VecDeque::with_capacity(self.outbox.len());
        for (index, out) in std::mem::take(&mut self.outbox).into_iter().enumerate() {
            if !out.backlog || (index == 0 && partly_written) {
                kept.push_back(out);
                continue;
            }
            let len = out.chunk.bytes().len();
            self.pending_bytes -= len;
            if out.broadcast {
                self.pending_broadcast_bytes -= len;
            }
            self.forget(&out);
        }
        self.outbox = kept;
        if partly_written && self.outbox.front().is_some_and(|out| out.backlog) {
            self.finish_line_only();
        }
        true
    }

    /// The resume reached the head and entered the room.
    pub fn stream_done(&mut self) {
        self.streaming = None;
    }

    /// The connection entered a room (or left one): lines queued before count for nothing.
    fn new_visit(&mut self) {
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
            // On the stack: a flush per connection per loop turn is the hottest path there is.
            let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
            let mut count = 0;
            for (slice, out) in slices.iter_mut().zip(&self.outbox) {
                *slice = IoSlice::new(if count == 0 {
                    &out.chunk.bytes()[self.written_of_front..]
                } else {
                    out.chunk.bytes()
                });
                count += 1;
            }
            match self.socket.write_vectored(&slices[..count]) {
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
                // A run written in part: its whole lines count as written now.
                let offset = self.written_of_front;
                self.written_of_front += written;
                let stream_offset = self.written_total - written as u64;
                let visit = self.visit;
                if let Some((end, shows)) = self
                    .outbox
                    .front_mut()
                    .and_then(|front| front.lines_done(offset, written))
                    .filter(|(_, shows)| shows.visit == visit)
                {
                    self.unsettled
                        .push_back((stream_offset + end as u64, shows));
                }
                break;
            }
            written -= left;
            self.written_of_front = 0;
            if let Some(out) = self.outbox.pop_front() {
                self.forget(&out);
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

    /// Whether room lines written to the socket are still unacknowledged by the client's
    /// kernel (a connection the server cut off lingers for them, so its implicit read mark
    /// counts what reached the client after the cut too, not only what had before it).
    pub fn awaits_acknowledgement(&mut self) -> bool {
        self.settle();
        self.session.room.is_some() && !self.unsettled.is_empty()
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
            self.forget(&out);
            let len = out.chunk.bytes().len();
            self.pending_bytes -= len;
            if out.broadcast {
                self.pending_broadcast_bytes -= len;
            }
        }
        if keep == 1 {
            self.finish_line_only();
        }
        self.queue_reply(line, None);
        let _ = self.flush();
    }

    /// An entry left the outbox.
    fn forget(&mut self, out: &Outgoing) {
        if matches!(out.chunk, Chunk::Shared(_)) {
            self.shared_runs -= 1;
        }
    }

    /// Cuts a partly written entry at the end of the line being written.
    fn finish_line_only(&mut self) {
        let offset = self.written_of_front;
        let Some(front) = self.outbox.front_mut() else {
            return;
        };
        let Some(line_end) = front.chunk.bytes()[offset..]
            .iter()
            .position(|&b| b == b'\n')
        else {
            return;
        };
        let keep = offset + line_end + 1;
        let before = front.chunk.bytes().len();
        match &mut front.chunk {
            Chunk::Shared(run) => run.truncate(keep),
            Chunk::Owned(bytes) => bytes.truncate(keep),
        }
        let dropped = before - keep;
        self.pending_bytes -= dropped;
        if front.broadcast {
            self.pending_broadcast_bytes -= dropped;
        }
        if let Some(shows) = front.shows.as_mut() {
            shows.last = shows.first;
        }
    }

    /// True once the peer has closed and every request it sent is answered and written.
    pub fn finished(&self) -> bool {
        self.read_state == ReadState::Closed
            && self.inbox.is_empty()
            && self.in_flight.is_empty()
            && self.held.is_none()
            && self.outbox.is_empty()
            && !self.socket.holds_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pages::RoomPage;
    use std::io::Read;

    /// A connection over a real loopback socket, and the client's end of it.
    fn connected() -> (Connection, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let client =
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (server, peer) = listener.accept().expect("accept");
        server.set_nonblocking(true).expect("nonblocking");
        let bounds = Bounds {
            max_line_bytes: 1 << 20,
            max_output_bytes: 64 << 20,
            rate_burst: 10.0,
            pipeline_depth: 4,
        };
        let socket = Box::new(mio::net::TcpStream::from_std(server));
        (Connection::new(socket, peer, bounds, false), client)
    }

    /// Line `seq` of `len` bytes, newline included.
    fn line(seq: u64, len: usize) -> Vec<u8> {
        let mut line = format!("{seq:08}").into_bytes();
        line.resize(len - 1, b'.');
        line.push(b'\n');
        line
    }

    /// Queues lines 1..=20,000 of `len` bytes as one run and flushes: far more than the socket
    /// buffers take while the client reads nothing, so the write is partial.
    fn queue_past_the_socket(connection: &mut Connection, len: usize) {
        let mut page = RoomPage::default();
        for seq in 1..=20_000 {
            connection.queue_shared(&page.share(&line(seq, len)), seq);
        }
        connection.flush().expect("flush");
    }

    /// Flushes and reads on the client until `expected` bytes arrived.
    fn drain(
        connection: &mut Connection,
        client: &mut std::net::TcpStream,
        expected: usize,
    ) -> Vec<u8> {
        let mut got = Vec::new();
        let mut buffer = vec![0; 1 << 16];
        while got.len() < expected {
            connection.flush().expect("flush");
            let n = client.read(&mut buffer).expect("read");
            assert!(n > 0, "closed early");
            got.extend_from_slice(&buffer[..n]);
        }
        got
    }

    #[test]
    fn consecutive_room_lines_are_one_entry_and_arrive_in_order() {
        let (mut connection, mut client) = connected();
        let mut page = RoomPage::default();
        let mut expected = Vec::new();
        for seq in 1..=100 {
            let bytes = line(seq, 50);
            expected.extend_from_slice(&bytes);
            assert!(!connection.queue_shared(&page.share(&bytes), seq));
        }
        assert_eq!(connection.outbox.len(), 1);
        // A seq that does not follow (a line this client skipped) starts a new entry.
        let bytes = line(102, 50);
        expected.extend_from_slice(&bytes);
        connection.queue_shared(&page.share(&bytes), 102);
        assert_eq!(connection.outbox.len(), 2);
        assert_eq!(
            drain(&mut connection, &mut client, expected.len()),
            expected
        );
        assert_eq!(connection.shared_runs, 0);
    }

    #[test]
    fn a_run_written_in_part_counts_its_whole_lines() {
        let (mut connection, _client) = connected();
        connection.enter_room(Room::new("g".into(), 0, 0));
        let len = 1000;
        queue_past_the_socket(&mut connection, len);
        let written = connection.written_total;
        assert!(
            written > 0 && written < 20_000 * len as u64,
            "a partial write"
        );
        let whole = written / len as u64;
        let (end, shows) = *connection.unsettled.back().expect("lines counted");
        assert_eq!(shows.last, whole, "every whole line written, no more");
        assert_eq!(end, whole * len as u64);
    }

    #[test]
    fn runs_a_client_keeps_are_bounded_and_lines_past_them_are_copied() {
        let (mut connection, mut client) = connected();
        // Lines alternate between two rooms' pages, so none continues the entry before it.
        let (mut even, mut odd) = (RoomPage::default(), RoomPage::default());
        let mut expected = Vec::new();
        for seq in 1..=100 {
            let bytes = line(seq, 40);
            expected.extend_from_slice(&bytes);
            let page = if seq % 2 == 0 { &mut even } else { &mut odd };
            connection.queue_shared(&page.share(&bytes), seq);
        }
        assert_eq!(connection.outbox.len(), 100);
        assert_eq!(connection.shared_runs, MAX_SHARED_RUNS);
        assert_eq!(
            drain(&mut connection, &mut client, expected.len()),
            expected
        );
        assert_eq!(connection.shared_runs, 0);
    }

    #[test]
    fn closing_cuts_a_partly_written_run_at_a_line_end() {
        let (mut connection, mut client) = connected();
        let len = 1000;
        queue_past_the_socket(&mut connection, len);
        assert!(connection.written_of_front > 0, "a partial write");
        connection.say_closing(b"{\"event\":\"closing\"}\n".to_vec());
        let expected = connection.written_total as usize + connection.pending_output();
        let got = drain(&mut connection, &mut client, expected);
        let text = String::from_utf8(got).expect("utf-8");
        let lines: Vec<&str> = text.lines().collect();
        let (closing, room_lines) = lines.split_last().expect("lines");
        assert_eq!(*closing, "{\"event\":\"closing\"}");
        for (index, room_line) in room_lines.iter().enumerate() {
            assert_eq!(
                format!("{room_line}\n").into_bytes(),
                line(index as u64 + 1, len)
            );
        }
        assert_eq!(connection.pending_output(), 0);
        assert_eq!(connection.shared_runs, 0);
    }
}
