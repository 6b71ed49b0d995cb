//! TLS (rustls, TLS 1.2 and 1.3) under the same protocol: a `Transport` that encrypts, and the
//! certificate store that SIGHUP reloads.
//!
//! The TLS session lives with its connection on the event loop: bytes read from the socket go
//! through `read_tls` / `process_new_packets`, plaintext comes out of the session's reader, and
//! what the loop writes is sealed into records that `flush_held` pushes out as the socket takes
//! them. Nothing here blocks; a handshake is just more bytes in both directions.

use std::io::{self, IoSlice, Read, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};

use mio::net::TcpStream;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ServerConfig, ServerConnection};

use crate::config::TlsFiles;
use crate::transport::{kernel_send_queue, Transport};

/// TLS records a connection may hold sealed but unsent before its writes are refused (then
/// `WouldBlock`, so the outbox keeps the rest and its limits apply as over plain TCP).
const SEALED_LIMIT: usize = 64 * 1024;

/// Reads and checks a certificate chain and its key into a server configuration.
pub fn load(files: &TlsFiles) -> Result<Arc<ServerConfig>, String> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
    };
    let cert_pem = read(&files.cert)?;
    let certs = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("TLS_CERT {}: {e}", files.cert.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "TLS_CERT {}: no certificate in it",
            files.cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(&read(&files.key)?)
        .map_err(|e| format!("TLS_KEY {}: {e}", files.key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("TLS: {e}"))?
        .with_no_client_auth()
        // Also checks that the key belongs to the certificate.
        .with_single_cert(certs, key)
        .map_err(|e| format!("TLS_CERT/TLS_KEY do not make a usable pair: {e}"))?;
    Ok(Arc::new(config))
}

/// The configuration new TLS connections get; SIGHUP swaps in a freshly loaded one.
/// Connections already open keep the one they started with.
#[derive(Clone)]
pub struct Certificates {
    files: TlsFiles,
    current: Arc<Mutex<Arc<ServerConfig>>>,
}

impl Certificates {
    pub fn load(files: &TlsFiles) -> Result<Certificates, String> {
        Ok(Certificates {
            current: Arc::new(Mutex::new(load(files)?)),
            files: files.clone(),
        })
    }

    /// Reads the files again; a pair that does not load is refused and the old one kept.
    pub fn reload(&self) -> Result<(), String> {
        let fresh = load(&self.files)?;
        match self.current.lock() {
            Ok(mut current) => *current = fresh,
            Err(poisoned) => *poisoned.into_inner() = fresh,
        }
        Ok(())
    }

    pub fn current(&self) -> Arc<ServerConfig> {
        match self.current.lock() {
            Ok(current) => current.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

/// A TCP socket carrying a server-side TLS session.
pub struct TlsTransport {
    tcp: TcpStream,
    tls: ServerConnection,
}

impl TlsTransport {
    pub fn new(tcp: TcpStream, config: Arc<ServerConfig>) -> io::Result<TlsTransport> {
        let mut tls = ServerConnection::new(config).map_err(io::Error::other)?;
        tls.set_buffer_limit(Some(SEALED_LIMIT));
        Ok(TlsTransport { tcp, tls })
    }
}

impl Transport for TlsTransport {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.tls.reader().read(buffer) {
                // Ok(0): the peer sent close_notify.
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            match self.tls.read_tls(&mut self.tcp) {
                Ok(0) => return Ok(0),
                Ok(_) => {
                    if let Err(error) = self.tls.process_new_packets() {
                        // Garbage, plain text or a failed handshake: send the alert rustls
                        // queued, then report the connection broken.
                        let _ = self.flush_held();
                        return Err(io::Error::new(io::ErrorKind::InvalidData, error));
                    }
                    // Handshake replies and key updates go out without waiting for a reply.
                    self.flush_held()?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn write_vectored(&mut self, slices: &[IoSlice<'_>]) -> io::Result<usize> {
        let taken = self.tls.writer().write_vectored(slices)?;
        self.flush_held()?;
        if taken == 0 && slices.iter().any(|s| !s.is_empty()) {
            // The sealed-records buffer is full: the socket is behind.
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(taken)
    }

    fn flush_held(&mut self) -> io::Result<bool> {
        while self.tls.wants_write() {
            match self.tls.write_tls(&mut self.tcp) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    fn holds_bytes(&self) -> bool {
        self.tls.wants_write()
    }

    fn unacknowledged(&self) -> u64 {
        if self.tls.wants_write() {
            // Sealed records not yet handed to the kernel: how much plaintext they hold is
            // not known, so nothing written counts as arrived yet.
            return u64::MAX;
        }
        // Ciphertext in the kernel's queue is never less than the plaintext it carries, so
        // this never counts a line as arrived too early.
        kernel_send_queue(&self.tcp)
    }

    fn tcp(&mut self) -> &mut TcpStream {
        &mut self.tcp
    }
}
