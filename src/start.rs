//! Starting the server: the steps from a parsed configuration to a bound, ready server (its
//! typed start-up errors, each a one-line reason with exit code 2, are `server::StartError`).

use std::io;
use std::net::SocketAddr;

use crate::config::{Config, StoreKind};
use crate::server::{Server, Siblings};
use crate::store::{self, StoreError};

pub use crate::server::StartError;

/// Opens one store per worker and binds the server; nothing is served until `Server::run`.
pub fn start(config: Config) -> Result<Server, StartError> {
    let lock = claim(&config)?;
    let stores = (0..config.workers)
        .map(|_| store::open(&config))
        .collect::<Result<Vec<_>, _>>()
        .map_err(StartError::Store)?;
    crate::retention::start(&config);
    let mut server = Server::start(config, stores)?;
    server.hold_store_lock(lock);
    Ok(server)
}

/// Refuses to start beside another server. The port: with several loops the listeners use
/// SO_REUSEPORT, which would let a second server of the same user bind the same port and the
/// kernel split the clients between the two; a plain bind first fails if anything listens
/// there (the loops of this process then share the port). The embedded store: its directory's
/// `server.lock` is locked (flock) for as long as the server runs, so a second server on the
/// same `DATA_DIR` is refused; `backup` and `admin` do not take it and keep working beside it.
fn claim(config: &Config) -> Result<Option<std::fs::File>, StartError> {
    if config.io_threads > 1 {
        let mut addrs = Vec::new();
        if config.plaintext && config.port != 0 {
            addrs.push(config.listen_addr());
        }
        if config.tls.is_some() && config.tls_port != 0 {
            addrs.push(SocketAddr::new(config.bind, config.tls_port));
        }
        for addr in addrs {
            std::net::TcpListener::bind(addr)
                .map_err(|source| StartError::Listen { addr, source })?;
        }
    }
    let StoreKind::Embedded { data_dir, .. } = &config.store else {
        return Ok(None);
    };
    let path = data_dir.join(STORE_LOCK_FILE);
    let failed = |error: io::Error| {
        StartError::Store(StoreError::Unavailable(format!(
            "cannot lock {}: {error}",
            path.display()
        )))
    };
    std::fs::create_dir_all(data_dir).map_err(failed)?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(failed)?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Err(StartError::StoreInUse(data_dir.clone())),
        Err(std::fs::TryLockError::Error(error)) => Err(failed(error)),
    }
}

/// The file in `DATA_DIR` a running server keeps locked (see `claim`).
pub const STORE_LOCK_FILE: &str = "server.lock";

/// `IO_THREADS` event loops listening on one port: the first, to run on the calling thread,
/// and the others, already running on threads of their own (a loop is not `Send`: each is
/// built on the thread that runs it). Each has its share of the workers; the connection limits
/// are counted for the process, across the loops. Without `PEER` they are linked by the in-process bus; with it, each is a
/// peer of its own (node id suffixed with the loop's number) on the Redis relay. The first
/// serves `/metrics`: its counters plus the others' (each reports once a second). One loop:
/// exactly `start`.
pub fn start_loops(config: Config) -> Result<Loops, StartError> {
    let loops = config.io_threads.max(1);
    if loops == 1 {
        return Ok(Loops {
            first: start(config)?,
            others: Vec::new(),
        });
    }
    let lock = claim(&config)?;
    // Set once every loop exists; the bus, the board and the presence table wake through it.
    let loop_wakers = std::sync::Arc::new(crate::loop_wakers::LoopWakers::default());
    let mut bus = crate::peer::local::LocalBus::new(loops, loop_wakers.clone());
    let board = std::sync::Arc::new(crate::metrics::MetricsBoard::new(
        loops,
        loop_wakers.clone(),
    ));
    let admission = std::sync::Arc::new(crate::limits::Admission::default());
    let presence = std::sync::Arc::new(crate::live::presence::LoopsPresence::new(
        loops,
        loop_wakers.clone(),
    ));
    let share = |index: usize, shared: &Config| {
        let mut one = shared.clone();
        one.node_id = format!("{}-{index}", config.node_id);
        one.workers = (config.workers / loops).max(1);
        if index > 0 {
            one.metrics_port = None;
        }
        one
    };
    let open = |one: &Config| {
        (0..one.workers)
            .map(|_| store::open(one))
            .collect::<Result<Vec<_>, _>>()
            .map_err(StartError::Store)
    };
    let mut shared = config.clone();
    let first_config = share(0, &shared);
    let mut siblings = |index: usize, certificates| Siblings {
        bus: if config.peer { None } else { bus.member(index) },
        board: board.clone(),
        index,
        certificates,
        admission: admission.clone(),
        presence: presence.clone(),
    };
    let first = Server::start_loop(
        first_config.clone(),
        open(&first_config)?,
        Some(siblings(0, None)),
    )?;
    crate::retention::start(&first_config);
    // Port 0 picked a port: the other loops listen on the same one.
    if let (Ok(addr), true) = (first.local_addr(), config.plaintext) {
        shared.port = addr.port();
    }
    if let Some(tls) = first.tls_addr() {
        shared.tls_port = tls.port();
    }
    let mut first = first;
    first.hold_store_lock(lock);
    let mut wakers = vec![first.waker()];
    let mut others = Vec::new();
    for index in 1..loops {
        let one = share(index, &shared);
        let these = Some(siblings(index, first.certificates()));
        let (ready, started) = crossbeam_channel::bounded(1);
        let thread = std::thread::Builder::new()
            .name(format!("loop-{index}"))
            .spawn(move || {
                let server = open(&one).and_then(|stores| Server::start_loop(one, stores, these));
                match server {
                    Ok(server) => {
                        let _ = ready.send(Ok(server.stop_handle()));
                        server.run()
                    }
                    Err(error) => {
                        let _ = ready.send(Err(error));
                        Ok(())
                    }
                }
            })
            .map_err(StartError::Workers)?;
        let stop = started
            .recv()
            .map_err(|_| StartError::Workers(io::Error::other("an event loop did not start")))??;
        wakers.push(stop.1.clone());
        others.push(LoopHandle { stop, thread });
    }
    loop_wakers.connect(wakers);
    Ok(Loops { first, others })
}

/// The event loops `start_loops` made.
pub struct Loops {
    /// To run on the calling thread.
    pub first: Server,
    /// Running already.
    pub others: Vec<LoopHandle>,
}

/// A loop running on its own thread: how to stop it, and the thread to join. (Its
/// certificates are the first loop's: a SIGHUP reload of those serves every loop.)
pub struct LoopHandle {
    pub stop: (
        std::sync::Arc<std::sync::atomic::AtomicBool>,
        std::sync::Arc<mio::Waker>,
    ),
    pub thread: std::thread::JoinHandle<io::Result<()>>,
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
