//! Accepting clients on the plaintext and TLS listeners, and admission: connection caps (total and per IP), socket options (keepalive, send buffer), and the transport (plain or TLS) a new connection gets.

use super::*;

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

impl Server {
    /// Accepts on both listeners (after descriptors were short).
    pub(super) fn accept_all(&mut self) {
        self.accept_from(false);
        self.accept_from(true);
    }

    pub(super) fn accept_from(&mut self, tls: bool) {
        loop {
            let listener = if tls {
                &self.listeners.tls
            } else {
                &self.listeners.plain
            };
            let Some(listener) = listener else {
                return;
            };
            match listener.accept() {
                Ok((socket, peer)) => {
                    if self.listeners.blocked {
                        log::info!("accepting again: a descriptor is free");
                    }
                    self.listeners.blocked = false;
                    self.admit(socket, peer, tls);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.listeners.blocked = false;
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE/ENFILE (or another transient failure): the client stays in the
                    // kernel's accept queue; retry on a timer and when a descriptor is freed.
                    if !self.listeners.blocked {
                        log::warn!("accept failed: {e}; clients wait in the accept queue");
                    }
                    self.listeners.blocked = true;
                    return;
                }
            }
        }
    }

    pub(super) fn admit(&mut self, mut socket: TcpStream, peer: SocketAddr, tls: bool) {
        let admitted = self.admission.admit(
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
        if let Err(e) = self.poll.registry().register(
            &mut socket,
            token,
            Interest::READABLE | Interest::WRITABLE,
        ) {
            log::warn!("cannot register {peer}: {e}");
            self.admission.release(peer.ip());
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
        let transport: Box<dyn Transport> = match (&self.listeners.certificates, tls) {
            (Some(certificates), true) => match TlsTransport::new(socket, certificates.current()) {
                Ok(transport) => Box::new(transport),
                Err(e) => {
                    log::warn!("cannot start TLS for {peer}: {e}");
                    self.admission.release(peer.ip());
                    return;
                }
            },
            _ => Box::new(socket),
        };
        let bounds = Bounds {
            max_line_bytes: self.config.max_line_bytes,
            max_output_bytes: self.config.max_output_bytes,
            rate_burst: self.config.rate_burst,
            pipeline_depth: self.pipeline_depth,
        };
        let connection = Connection::new(transport, peer, bounds, tls);
        self.connections.insert(token, connection);
    }
}
