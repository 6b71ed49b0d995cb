//! Starting the server: typed start-up errors (each a one-line reason, exit code 2) and the
//! steps from a parsed configuration to a bound, ready server.

use std::fmt;
use std::io;
use std::net::SocketAddr;

use crate::config::{Config, StoreKind};
use crate::server::Server;
use crate::store::{self, StoreError};

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
        }
    }
}

impl std::error::Error for StartError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StartError::Listen { source, .. } | StartError::Metrics { source, .. } => Some(source),
            StartError::Store(error) => Some(error),
            StartError::Workers(error) | StartError::Peer(error) => Some(error),
            StartError::Tls(_) => None,
        }
    }
}

/// Opens one store per worker and binds the server; nothing is served until `Server::run`.
pub fn start(config: Config) -> Result<Server, StartError> {
    let stores = (0..config.workers)
        .map(|_| store::open(&config))
        .collect::<Result<Vec<_>, _>>()
        .map_err(StartError::Store)?;
    crate::retention::start(&config);
    Server::start(config, stores)
}

/// A one-line description of the configured store, for the readiness log line.
pub fn describe_store(config: &Config) -> String {
    match &config.store {
        StoreKind::Embedded { data_dir, .. } => {
            format!("embedded store in {}", data_dir.display())
        }
        StoreKind::Mongo { database, .. } => format!("MongoDB database {database}"),
        #[cfg(feature = "bench-noop")]
        StoreKind::Noop => "no-op store (benchmark build)".to_string(),
    }
}
