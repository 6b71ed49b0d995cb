//! Entry point: parses arguments and configuration, opens the store, starts the event loop, and
//! turns SIGTERM/SIGINT into a graceful shutdown.

mod config;
mod connection;
mod fd_limit;
mod framing;
mod limits;
mod logging;
mod metrics;
mod model;
mod notify;
mod peer;
mod protocol;
mod read_marker;
mod rooms;
mod sequencer;
mod server;
mod session;
mod store;
mod workers;

use std::process::ExitCode;
use std::sync::atomic::Ordering;

use config::Config;
use server::Server;

fn main() -> ExitCode {
    match std::env::args().nth(1).as_deref() {
        None => {}
        Some("--help" | "-h") => {
            print!("{}", config::help_text());
            return ExitCode::SUCCESS;
        }
        Some("--version" | "-V") => {
            println!("noomnim {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Some(other) => {
            eprintln!(
                "noomnim: unknown argument {other:?}; configuration is by environment (see --help)"
            );
            return ExitCode::from(2);
        }
    }
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("noomnim: {error}");
            return ExitCode::from(2);
        }
    };
    logging::init(config.log_level);
    match run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(reason) => {
            log::error!("{reason}");
            ExitCode::FAILURE
        }
    }
}

fn run(config: Config) -> Result<(), String> {
    fd_limit::fit_and_log(config.max_connections);
    let stores = (0..config.workers)
        .map(|_| store::open(&config))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("cannot open the store: {e}"))?;
    let server = Server::start(config.clone(), stores)
        .map_err(|e| format!("cannot listen on {}: {e}", config.listen_addr()))?;
    let addr = server.local_addr().map_err(|e| e.to_string())?;
    install_signal_handlers(&server)?;
    // One line carries every bound address, so whoever waits for readiness (tests, operators'
    // scripts) has all of them as soon as it sees "listening on".
    let metrics = server
        .metrics_addr()
        .map(|metrics| format!("; metrics on http://{metrics}/metrics"))
        .unwrap_or_default();
    log::info!("listening on {addr} ({}){metrics}", describe_store(&config));
    notify::notify("READY=1");
    server.run().map_err(|e| format!("event loop failed: {e}"))
}

fn install_signal_handlers(server: &Server) -> Result<(), String> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let (stop, waker) = server.stop_handle();
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(signal) = signals.forever().next() {
                log::info!("received signal {signal}");
                stop.store(true, Ordering::SeqCst);
                let _ = waker.wake();
            }
        })
        .map(|_| ())
        .map_err(|e| format!("cannot start the signal thread: {e}"))
}

fn describe_store(config: &Config) -> String {
    match &config.store {
        config::StoreKind::Embedded { data_dir, .. } => {
            format!("embedded store in {}", data_dir.display())
        }
        config::StoreKind::Mongo { database, .. } => format!("MongoDB database {database}"),
        #[cfg(feature = "bench-noop")]
        config::StoreKind::Noop => "no-op store (benchmark build)".to_string(),
    }
}
