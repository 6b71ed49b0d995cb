//! Entry point: parses arguments and configuration, opens the store, starts the event loop, and
//! turns SIGTERM/SIGINT into a graceful shutdown.

use std::process::ExitCode;
use std::sync::atomic::Ordering;

use noomnim::config::{self, Config};
use noomnim::start::describe_store;
use noomnim::start::Loops;
use noomnim::{fd_limit, logging, notify, StartError};

fn main() -> ExitCode {
    // Everything this process creates (the store, its WAL, backups, the cli's history) is
    // readable by its owner only: files 0600, directories 0700, whoever starts it.
    // SAFETY: umask only sets the process's file-creation mask; no memory is involved.
    unsafe {
        libc::umask(0o077);
    }
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
        Some("token") => return print_token(std::env::args().skip(2).collect()),
        Some("backup") => return run_backup(std::env::args().skip(2).collect()),
        Some("admin") => return run_admin(std::env::args().skip(2).collect()),
        Some("cli") => return noomnim::cli::run(std::env::args().skip(2).collect()),
        Some(other) => {
            eprintln!(
                "noomnim: unknown argument {other:?}; configuration is by environment (see --help)"
            );
            return ExitCode::from(2);
        }
    }
    let config = match configuration() {
        Ok(config) => config,
        Err(code) => return code,
    };
    logging::init(config.log_level, config.log_format);
    if config.auth_secret.is_none() && !config.bind.is_loopback() {
        log::warn!(
            "no AUTH_SECRET: anyone who can reach {} may log in as anyone",
            config.bind
        );
    }
    fd_limit::fit_and_log(config.max_connections);
    let loops = match noomnim::start::start_loops(config.clone()) {
        Ok(loops) => loops,
        Err(error) => {
            // A start-up failure is a configuration or environment problem: exit code 2,
            // like a bad variable, with the one line that says which setting to look at.
            log::error!("{error}");
            return ExitCode::from(2);
        }
    };
    if let Err(error) = install_signal_handlers(&loops) {
        log::error!("{error}");
        return ExitCode::from(2);
    }
    match run(&config, loops) {
        Ok(()) => ExitCode::SUCCESS,
        Err(reason) => {
            log::error!("{reason}");
            ExitCode::FAILURE
        }
    }
}

fn run(config: &Config, loops: Loops) -> Result<(), String> {
    let Loops { first, others } = loops;
    let addr = first.local_addr().map_err(|e| e.to_string())?;
    // One line carries every bound address, so whoever waits for readiness (tests, operators'
    // scripts) has all of them as soon as it sees "listening on".
    let metrics = first
        .metrics_addr()
        .map(|metrics| format!("; metrics on http://{metrics}/metrics"))
        .unwrap_or_default();
    let tls = match (first.tls_addr(), config.plaintext) {
        (Some(tls), true) => format!("; TLS on {tls}"),
        (Some(tls), false) => format!(" (TLS only); TLS on {tls}"),
        (None, _) => String::new(),
    };
    let count = match others.len() {
        0 => String::new(),
        more => format!(", {} event loops", more + 1),
    };
    log::info!(
        "listening on {addr} ({}{count}){tls}{metrics}",
        describe_store(config)
    );
    notify::notify("READY=1");
    let mut outcome = first.run().map_err(|e| format!("event loop failed: {e}"));
    for other in others {
        match other.thread.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => outcome = Err(format!("event loop failed: {e}")),
            Err(_) => outcome = Err("an event loop panicked".into()),
        }
    }
    noomnim::store::close_cleanly(config);
    outcome
}

/// SIGTERM/SIGINT: graceful shutdown. SIGHUP: reload the TLS certificate and key (on this
/// thread, so the event loop never reads files); a pair that does not load is refused and the
/// one in use kept.
fn install_signal_handlers(loops: &Loops) -> Result<(), StartError> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut stops = vec![loops.first.stop_handle()];
    stops.extend(loops.others.iter().map(|other| other.stop.clone()));
    // Shared by every loop: one reload serves them all.
    let certificates = loops.first.certificates();
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .map_err(StartError::Workers)?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                if signal == SIGHUP {
                    match certificates.as_ref().map(|c| c.reload()) {
                        Some(Ok(())) => log::info!("SIGHUP: TLS certificate reloaded"),
                        Some(Err(reason)) => {
                            log::error!("SIGHUP: new TLS certificate refused, keeping the old one: {reason}")
                        }
                        None => log::info!("SIGHUP: no TLS configured; nothing to reload"),
                    }
                    continue;
                }
                log::info!("received signal {signal}");
                for (stop, waker) in &stops {
                    stop.store(true, Ordering::SeqCst);
                    let _ = waker.wake();
                }
                break;
            }
        })
        .map(|_| ())
        .map_err(StartError::Workers)
}

/// `noomnim token USERNAME [--ttl SECONDS]`: prints a token for `find_user`, signed with the
/// configured secret (for trying the server with `nc`; applications mint their own).
fn print_token(args: Vec<String>) -> ExitCode {
    const USAGE: &str =
        "usage: noomnim token USERNAME [--ttl SECONDS] (with AUTH_SECRET or AUTH_SECRET_FILE set)";
    if let Some(done) = usage_if_asked(&args, USAGE) {
        return done;
    }
    let (username, ttl) = match args.as_slice() {
        [username] => (username, Some(noomnim::auth::DEFAULT_TTL_SECONDS)),
        [username, flag, ttl] if flag == "--ttl" => (username, ttl.parse().ok()),
        _ => (&String::new(), None),
    };
    let Some(ttl) = ttl.filter(|_| !username.is_empty()) else {
        eprintln!("noomnim: {USAGE}");
        return ExitCode::from(2);
    };
    let (secret, audience) = match configuration().map(|c| (c.auth_secret, c.auth_audience)) {
        Ok((Some(secret), audience)) => (secret, audience),
        Ok((None, _)) => {
            eprintln!("noomnim: no secret: set AUTH_SECRET or AUTH_SECRET_FILE");
            return ExitCode::from(2);
        }
        Err(code) => return code,
    };
    match noomnim::auth::Authenticator::new(&secret, audience.as_deref()).mint(username, ttl) {
        Ok(token) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("noomnim: {error}");
            ExitCode::FAILURE
        }
    }
}

/// `noomnim backup PATH`: a consistent copy of the embedded store (`DATA_DIR`), taken while the
/// server runs. Exit 0 with a summary line; 2 for a usage or configuration error; 1 when the
/// copy failed.
fn run_backup(args: Vec<String>) -> ExitCode {
    const USAGE: &str =
        "usage: noomnim backup PATH (with the server's DATA_DIR set; PATH: a new file)";
    if let Some(done) = usage_if_asked(&args, USAGE) {
        return done;
    }
    let [target] = args.as_slice() else {
        eprintln!("noomnim: {USAGE}");
        return ExitCode::from(2);
    };
    let config = match configuration() {
        Ok(config) => config,
        Err(code) => return code,
    };
    match noomnim::backup::backup(&config, std::path::Path::new(target)) {
        Ok(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("noomnim: {error}");
            ExitCode::FAILURE
        }
    }
}

/// `noomnim admin erase-user NAME`: erases a user through the store the configuration names
/// (works while servers run: each closes the user's connections within seconds). Exit 0 with
/// a summary; 1 when the user does not exist or the store failed; 2 for usage.
fn run_admin(args: Vec<String>) -> ExitCode {
    const USAGE: &str =
        "usage: noomnim admin erase-user NAME (with the server's store settings: DATA_DIR or MONGODB_URI)";
    if let Some(done) = usage_if_asked(&args, USAGE) {
        return done;
    }
    let [command, username] = args.as_slice() else {
        eprintln!("noomnim: {USAGE}");
        return ExitCode::from(2);
    };
    if command != "erase-user" {
        eprintln!("noomnim: unknown admin command {command:?}; known: erase-user");
        return ExitCode::from(2);
    }
    let config = match configuration() {
        Ok(config) => config,
        Err(code) => return code,
    };
    // An admin command works on a store that exists: a wrong DATA_DIR must not create one.
    if let noomnim::config::StoreKind::Embedded { data_dir, .. } = &config.store {
        let database = noomnim::store::sqlite::database_path(data_dir);
        if !database.is_file() {
            eprintln!(
                "noomnim: no embedded store at {} (DATA_DIR)",
                database.display()
            );
            return ExitCode::from(2);
        }
    }
    // Names are compared in NFC, as the server stores them.
    let username: String =
        unicode_normalization::UnicodeNormalization::nfc(username.as_str()).collect();
    let erased = noomnim::store::open(&config)
        .and_then(|mut store| noomnim::store::manage::erase(store.as_mut(), &username));
    match erased {
        Ok(erasure) => {
            println!(
                "erased user {username:?}: messages deleted, memberships of {} group(s) removed; connected clients are closed within seconds",
                erasure.groups.len()
            );
            for (group, heir) in &erasure.handed_over {
                println!("  {group}: ownership passed to {heir:?}");
            }
            for group in &erasure.deleted {
                println!("  {group}: deleted (they were its only member)");
            }
            ExitCode::SUCCESS
        }
        Err(noomnim::store::StoreError::UserNotFound) => {
            eprintln!("noomnim: no user {username:?}");
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("noomnim: {error}");
            ExitCode::FAILURE
        }
    }
}

/// When a subcommand's arguments ask for its usage (`--help`, `-h`), prints `usage` on stdout
/// and returns exit 0: it is never taken as an argument (a backup file or a user named
/// `--help`).
fn usage_if_asked(args: &[String], usage: &str) -> Option<ExitCode> {
    let asked = args.iter().any(|arg| arg == "--help" || arg == "-h");
    asked.then(|| {
        println!("{usage}");
        ExitCode::SUCCESS
    })
}

/// The configuration from the environment; a bad value is one line on stderr and exit 2 (for
/// the server and every subcommand alike).
fn configuration() -> Result<Config, ExitCode> {
    Config::from_env().map_err(|error| {
        eprintln!("noomnim: {error}");
        ExitCode::from(2)
    })
}
