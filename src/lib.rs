//! Noomnim Chat as a library: the server, its configuration and its protocol, so tests and
//! tools can start a server in-process (`start::start` + `Server::run` on a thread) and reuse
//! the line framing. The `noomnim` binary (src/main.rs) is a thin wrapper around it.

pub mod auth;
pub mod backup;
pub mod cli;
pub mod config;
pub mod connection;
pub mod fd_limit;
pub mod framing;
pub mod in_flight;
pub mod limits;
pub mod live;
pub mod logging;
pub mod loop_wakers;
pub mod metrics;
pub mod model;
pub mod notify;
pub mod ops;
pub mod pages;
pub mod peer;
pub mod protocol;
pub mod push;
pub mod retention;
pub mod rooms;
pub mod sequencer;
pub mod server;
pub mod session;
pub mod start;
pub mod store;
pub mod tls;
pub mod transport;
pub mod workers;

pub use config::Config;
pub use server::Server;
pub use start::{start, StartError};
