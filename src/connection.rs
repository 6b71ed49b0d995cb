//! One client connection: its socket, the framed requests waiting to be handled (the inbox), the
//! bytes waiting to be written (the outbox, written with vectored writes that survive partial
//! writes), and its session. Owns no policy beyond "read until told to stop, write what fits".

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Instant;

use mio::net::TcpStream;
use serde_json::Value;

use crate::framing::{Frame, LineFramer};
use crate::limits::TokenBucket;
use crate::session::Session;

/// Most buffers handed to one `writev`.
const MAX_IOVECS: usize = 64;

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

pub struct Connection {
    pub socket: TcpStream,
    pub peer: SocketAddr,
    pub session: Session,
    /// The request `id` of the store job in flight, if one is.
    pub awaiting: Option<Option<Value>>,
    pub read_state: ReadState,
    /// Set when the connection must be dropped without further writes.
    pub doomed: bool,
    pub opened_at: Instant,
    /// Store-bound requests this connection may still make (see `limits`).
    pub bucket: TokenBucket,
    framer: LineFramer,
    inbox: VecDeque<Frame>,
    outbox: VecDeque<Chunk>,
    written_of_front: usize,
    pending_bytes: usize,
}

impl Connection {
    pub fn new(socket: TcpStream, peer: SocketAddr, max_line: usize, burst: f64) -> Connection {
        let opened_at = Instant::now();
        Connection {
            opened_at,
            bucket: TokenBucket::full(burst, opened_at),
            socket,
            peer,
            session: Session::default(),
            awaiting: None,
            read_state: ReadState::Drained,
            doomed: false,
            framer: LineFramer::new(max_line),
            inbox: VecDeque::new(),
            outbox: VecDeque::new(),
            written_of_front: 0,
            pending_bytes: 0,
        }
    }

    /// Reads until the socket is drained, closed, or the inbox holds `max_inbox` frames.
    pub fn read_available(&mut self, buffer: &mut [u8], max_inbox: usize) -> io::Result<ReadState> {
        loop {
            if self.inbox.len() >= max_inbox {
                self.read_state = ReadState::Paused;
                return Ok(self.read_state);
            }
            match self.socket.read(buffer) {
                Ok(0) => {
                    self.read_state = ReadState::Closed;
                    return Ok(self.read_state);
                }
                Ok(n) => self.framer.feed(&buffer[..n], &mut self.inbox),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.read_state = ReadState::Drained;
                    return Ok(self.read_state);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    pub fn next_frame(&mut self) -> Option<Frame> {
        self.inbox.pop_front()
    }

    pub fn inbox_len(&self) -> usize {
        self.inbox.len()
    }

    /// Queues bytes for writing; returns the pending output size after.
    pub fn queue(&mut self, chunk: Chunk) -> usize {
        self.pending_bytes += chunk.bytes().len();
        self.outbox.push_back(chunk);
        self.pending_bytes
    }

    pub fn pending_output(&self) -> usize {
        self.pending_bytes
    }

    /// Writes as much of the outbox as the socket takes now.
    pub fn flush(&mut self) -> io::Result<()> {
        while !self.outbox.is_empty() {
            let slices: Vec<IoSlice<'_>> = self
                .outbox
                .iter()
                .take(MAX_IOVECS)
                .enumerate()
                .map(|(i, chunk)| {
                    IoSlice::new(if i == 0 {
                        &chunk.bytes()[self.written_of_front..]
                    } else {
                        chunk.bytes()
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
        while let Some(front) = self.outbox.front() {
            let left = front.bytes().len() - self.written_of_front;
            if written < left {
                self.written_of_front += written;
                return;
            }
            written -= left;
            self.written_of_front = 0;
            self.outbox.pop_front();
        }
    }

    /// True once the peer has closed and every request it sent is answered and written.
    pub fn finished(&self) -> bool {
        self.read_state == ReadState::Closed
            && self.inbox.is_empty()
            && self.awaiting.is_none()
            && self.outbox.is_empty()
    }
}
