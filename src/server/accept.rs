//! Accepting clients on the plaintext and TLS listeners, and admission: connection caps (total and per IP), socket options (keepalive, send buffer), and the transport (plain or TLS) a new connection gets.

use std::io::{self, Write};
use std::net::SocketAddr;

use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry, Token};

use super::{Server, StartError, KERNEL_SEND_BUFFER_BYTES, LISTENER, TLS_LISTENER};
use crate::config::Config;
use crate::connection::{Bounds, Connection};
use crate::limits::Refusal;
use crate::protocol::{encode_failure, ErrorCode, ProtocolError};
use crate::tls::{Certificates, TlsTransport};
use crate::transport::Transport;

/// The chat listeners and what accepting needs beside them.
pub(super) struct Listeners {
    /// The plaintext listener (`PORT`; none with `PLAINTEXT=false` or once draining).
    pub(super) plain: Option<TcpListener>,
    /// The TLS listener (`TLS_PORT`).
    pub(super) tls: Option<TcpListener>,
    /// The certificate new TLS connections get.
    pub(super) certificates: Option<Certificates>,
    /// Set while `accept` fails with EMFILE/ENFILE: queued clients are accepted on a timer
    /// and whenever a connection closes (an edge-triggered listener is not woken again).
    pub(super) blocked: bool,
}

/// A listening socket; `shared`: with SO_REUSEPORT, so that every event loop listens on the
/// same port and the kernel spreads connections over them.
fn bind_listener(addr: SocketAddr, shared: bool) -> io::Result<TcpListener> {
    if !shared {
        return TcpListener::bind(addr);
    }
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(TcpListener::from_std(socket.into()))
}

impl Listeners {
    /// Binds the chat listeners the configuration asks for (plaintext, TLS) and registers
    /// them. With several loops (`IO_THREADS`) they share the port; `certificates`: the first
    /// loop's store (one SIGHUP reload serves every loop).
    pub(super) fn bind(
        config: &Config,
        registry: &Registry,
        certificates: Option<Certificates>,
    ) -> Result<Listeners, StartError> {
        let shared_port = config.io_threads > 1;
        let listen = |addr: SocketAddr, token: Token| -> Result<TcpListener, StartError> {
            let mut listener = bind_listener(addr, shared_port)
                .map_err(|source| StartError::Listen { addr, source })?;
            registry
                .register(&mut listener, token, Interest::READABLE)
                .map_err(StartError::Workers)?;
            Ok(listener)
        };
        let plain = match config.plaintext {
            true => Some(listen(config.listen_addr(), LISTENER)?),
            false => None,
        };
        let (tls, certificates) = match &config.tls {
            Some(files) => {
                let certificates = match certificates {
                    Some(certificates) => certificates,
                    None => Certificates::load(files).map_err(StartError::Tls)?,
                };
                let addr = SocketAddr::new(config.bind, config.tls_port);
                (Some(listen(addr, TLS_LISTENER)?), Some(certificates))
            }
            None => (None, None),
        };
        Ok(Listeners {
            plain,
            tls,
            certificates,
            blocked: false,
        })
    }
}

impl Server {
    /// Accepts on both listeners (after descriptors were short).
    pub(super) fn accept_all(&mut self) {
        self.accept_from(false);
        self.accept_from(true);
    }

    pub(super) fn accept_from(&mut self, tls: bool) {
        loop {
            let listener = if tls {
                &self.io.listeners.tls
            } else {
                &self.io.listeners.plain
            };
            let Some(listener) = listener else {
                return;
            };
            match listener.accept() {
                Ok((socket, peer)) => {
                    if self.io.listeners.blocked {
                        log::info!("accepting again: a descriptor is free");
                    }
                    self.io.listeners.blocked = false;
                    self.admit(socket, peer, tls);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.io.listeners.blocked = false;
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE/ENFILE (or another transient failure): the client stays in the
                    // kernel's accept queue; retry on a timer and when a descriptor is freed.
                    if !self.io.listeners.blocked {
                        log::warn!("accept failed: {e}; clients wait in the accept queue");
                    }
                    self.io.listeners.blocked = true;
                    return;
                }
            }
        }
    }

    pub(super) fn admit(&mut self, mut socket: TcpStream, peer: SocketAddr, tls: bool) {
        let admitted = self.io.admission.admit(
            peer.ip(),
            self.config.max_connections,
            self.config.max_connections_per_ip,
        );
        let refusal = match admitted {
            Ok(()) => None,
            Err(Refusal::Full) => Some(("MAX_CONNECTIONS", "Server is at its connection limit.")),
            Err(Refusal::PerIp) => Some((
                "MAX_CONNECTIONS_PER_IP",
                "Too many connections from your address.",
            )),
        };
        if let Some((limit, text)) = refusal {
            log::warn!("refusing {peer}: {limit} reached");
            self.metrics.connections_refused += 1;
            self.metrics.error(ErrorCode::Unavailable);
            // Over TLS there is no session to say it in: the client just sees the close.
            if !tls {
                let error = ProtocolError::new(ErrorCode::Unavailable, text);
                let _ = socket.write(&encode_failure(&error.into(), None));
            }
            return;
        }
        self.metrics.connections_accepted += 1;
        let token = self.connections.vacant_token();
        if let Err(e) = self.io.poll.registry().register(
            &mut socket,
            token,
            Interest::READABLE | Interest::WRITABLE,
        ) {
            log::warn!("cannot register {peer}: {e}");
            self.io.admission.release(peer.ip());
            return;
        }
        let _ = socket.set_nodelay(true);
        let sock = socket2::SockRef::from(&socket);
        let _ = sock.set_send_buffer_size(KERNEL_SEND_BUFFER_BYTES);
        // Dead peers (unplugged, vanished NAT state) are found by the kernel without any help
        // from the client, and their descriptors come back.
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(self.config.keepalive_idle)
            .with_interval(self.config.keepalive_interval)
            .with_retries(self.config.keepalive_probes);
        let _ = sock.set_tcp_keepalive(&keepalive);
        log::debug!("connection {} from {peer}", token.0);
        let transport: Box<dyn Transport> = match (&self.io.listeners.certificates, tls) {
            (Some(certificates), true) => match TlsTransport::new(socket, certificates.current()) {
                Ok(transport) => Box::new(transport),
                Err(e) => {
                    log::warn!("cannot start TLS for {peer}: {e}");
                    self.io.admission.release(peer.ip());
                    return;
                }
            },
            _ => Box::new(socket),
        };
        let bounds = Bounds {
            max_line_bytes: self.config.max_line_bytes,
            max_output_bytes: self.config.max_output_bytes,
            rate_burst: self.config.rate_burst,
            pipeline_depth: self.store.pipeline_depth,
        };
        let connection = Connection::new(transport, peer, bounds, tls);
        self.connections.insert(token, connection);
    }
}
