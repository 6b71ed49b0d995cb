//! Why a server could not start (each a one-line reason naming the setting to look at; the
//! binary exits with code 2). Defined with the server, which binds and builds; `start` adds
//! the steps before it (the store's lock, opening stores) and re-exports it.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

use crate::store::StoreError;

/// Why the server could not start. Every variant names the setting to look at.
#[derive(Debug)]
pub enum StartError {
    /// The chat port could not be bound (`PORT`, `BIND`).
    Listen { addr: SocketAddr, source: io::Error },
    /// The metrics port could not be bound (`METRICS_PORT`).
    Metrics { addr: SocketAddr, source: io::Error },
    /// The store could not be opened (`DATA_DIR`, `MONGODB_URI`).
    Store(StoreError),
    /// A worker, signal or event-loop resource could not be created (a system limit).
    Workers(io::Error),
    /// The peer relay could not start (`REDIS_URL`).
    Peer(io::Error),
    /// The TLS certificate or key could not be loaded (`TLS_CERT`, `TLS_KEY`).
    Tls(String),
    /// Another server holds the embedded store in this directory (`DATA_DIR`).
    StoreInUse(PathBuf),
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartError::Listen { addr, source } => {
                write!(f, "cannot listen on {addr} (PORT/BIND): {source}")
            }
            StartError::Metrics { addr, source } => {
                write!(f, "cannot serve metrics on {addr} (METRICS_PORT): {source}")
            }
            StartError::Store(error) => write!(f, "cannot open the store: {error}"),
            StartError::Workers(error) => {
                write!(
                    f,
                    "cannot start the server's threads or event loop: {error}"
                )
            }
            StartError::Peer(error) => write!(f, "cannot start the peer relay: {error}"),
            StartError::Tls(reason) => write!(f, "cannot start TLS: {reason}"),
            StartError::StoreInUse(dir) => write!(
                f,
                "another server is using the store in {} (DATA_DIR): stop it, or give this one a DATA_DIR of its own",
                dir.display()
            ),
        }
    }
}

impl std::error::Error for StartError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StartError::Listen { source, .. } | StartError::Metrics { source, .. } => Some(source),
            StartError::Store(error) => Some(error),
            StartError::Workers(error) | StartError::Peer(error) => Some(error),
            StartError::Tls(_) | StartError::StoreInUse(_) => None,
        }
    }
}
