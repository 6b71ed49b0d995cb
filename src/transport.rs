//! The byte stream under a connection: plain TCP today, TLS (issue 14) next. `Connection`
//! reads, writes and asks about acknowledgements only through this trait, as sozu's
//! `SocketHandler` does, so a TLS session slots in without touching the protocol code.

use std::io::{self, IoSlice, Read, Write};

use mio::net::TcpStream;

/// A non-blocking, full-duplex byte stream over one TCP socket.
pub trait Transport {
    /// Reads decrypted/plain bytes; `Ok(0)` is the end of the stream, `WouldBlock` "later".
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize>;
    /// Takes as much of `slices` as it can now (may be less than all of them).
    fn write_vectored(&mut self, slices: &[IoSlice<'_>]) -> io::Result<usize>;
    /// Writes out what the transport itself still holds (e.g. TLS records); `Ok(true)` once
    /// nothing is left.
    fn flush_held(&mut self) -> io::Result<bool> {
        Ok(true)
    }
    /// Whether the transport still holds bytes `flush_held` has to write.
    fn holds_bytes(&self) -> bool {
        false
    }
    /// Bytes accepted by `write_vectored` that the peer has not acknowledged yet (never less
    /// than the truth; `u64::MAX` when unknown), for read marks that only cover what arrived.
    fn unacknowledged(&self) -> u64;
    /// The socket, to register with the event loop and set options on.
    fn tcp(&mut self) -> &mut TcpStream;
}

impl Transport for TcpStream {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        Read::read(self, buffer)
    }

    fn write_vectored(&mut self, slices: &[IoSlice<'_>]) -> io::Result<usize> {
        Write::write_vectored(self, slices)
    }

    fn unacknowledged(&self) -> u64 {
        kernel_send_queue(self)
    }

    fn tcp(&mut self) -> &mut TcpStream {
        self
    }
}

/// Bytes in the socket's send queue that the peer has not acknowledged (Linux `SIOCOUTQ`).
/// If the kernel cannot tell, everything written counts as unacknowledged (nothing is marked).
pub fn kernel_send_queue(socket: &TcpStream) -> u64 {
    use std::os::fd::AsRawFd;
    let mut queued: libc::c_int = 0;
    // SAFETY: TIOCOUTQ writes one c_int through the pointer, which points to a live c_int.
    let done = unsafe { libc::ioctl(socket.as_raw_fd(), libc::TIOCOUTQ, &mut queued) };
    if done == 0 && queued >= 0 {
        queued as u64
    } else {
        u64::MAX
    }
}
