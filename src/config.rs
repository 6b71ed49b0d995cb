//! Server configuration: read from environment variables, validated once at start-up.
//!
//! Every knob the server has lives here, with its default and its `--help` line, so the
//! help text, the README table and the parser cannot drift apart.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use crate::auth::Secret;

/// Where messages, users and groups are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreKind {
    /// SQLite file under `DATA_DIR` (default; no external service needed).
    Embedded {
        data_dir: PathBuf,
        /// Every commit fsynced before it is acknowledged (`EMBEDDED_SYNC=full`).
        durable: bool,
        /// WAL size past which it is reset (`EMBEDDED_WAL_LIMIT_BYTES`).
        wal_limit: u64,
    },
    /// A MongoDB deployment.
    Mongo { uri: String, database: String },
    /// Benchmark builds only: no storage of message texts (the throughput ceiling).
    #[cfg(feature = "bench-noop")]
    Noop,
}

/// Retention limits (`RETENTION_MAX_AGE`, `RETENTION_MAX_MESSAGES`); zero is off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Retention {
    pub max_age: Option<std::time::Duration>,
    pub max_messages: u64,
}

impl Retention {
    pub fn is_off(&self) -> bool {
        self.max_age.is_none() && self.max_messages == 0
    }
}

/// How messages are spread over Redis channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayMode {
    /// One channel for every message (each instance receives all traffic).
    Shared,
    /// One channel per group, subscribed only while the group's room is occupied here.
    PerGroup,
}

/// The validated configuration of one server process.
#[derive(Debug, Clone)]
pub struct Config {
    pub bind: IpAddr,
    pub port: u16,
    pub peer: bool,
    pub redis_url: String,
    /// How peers spread messages over Redis channels (`PEER_RELAY`).
    pub relay_mode: RelayMode,
    pub store: StoreKind,
    pub max_line_bytes: usize,
    pub max_output_bytes: usize,
    /// Longest reply line; history replies shrink their page to fit.
    pub max_reply_bytes: usize,
    /// Groups one user may create; 0: no limit.
    pub max_groups_per_user: usize,
    /// How fast `noomnim backup` writes its copy, in MB/s; 0: as fast as the disk takes it.
    pub backup_mb_per_s: u64,
    pub max_connections: usize,
    pub workers: usize,
    /// Event loops, each owning its connections (`IO_THREADS`).
    pub io_threads: usize,
    pub log_level: log::LevelFilter,
    /// `LOG_FORMAT`: text lines (default) or one JSON object per line.
    pub log_format: crate::logging::LogFormat,
    pub store_timeout: Duration,
    /// This event loop's id among peers: `NODE_ID`, suffixed with the loop's number when the
    /// process runs several loops (each is a peer of the others).
    pub node_id: String,
    /// `NODE_ID` as configured: what `hello` reports for the whole process.
    pub instance_id: String,
    /// Port of the Prometheus `/metrics` endpoint (on `bind`); `None`: off.
    pub metrics_port: Option<u16>,
    /// Store-bound requests per second a connection may make on average; 0: unlimited.
    pub rate_limit: f64,
    /// How many store-bound requests a connection may make at once above the average.
    pub rate_burst: f64,
    /// How long a connection may stay without logging in.
    pub login_timeout: Duration,
    /// How long a connection may send nothing before it is closed; `None`: never.
    pub idle_timeout: Option<Duration>,
    /// How long broadcasts may wait to be written together (`WRITE_DELAY_MS`; None: at once).
    pub write_delay: Option<Duration>,
    /// TCP keepalive on client sockets: idle time before the first probe, between probes,
    /// and unanswered probes before the kernel gives the connection up.
    pub keepalive_idle: Duration,
    pub keepalive_interval: Duration,
    pub keepalive_probes: u32,
    /// Simultaneous connections from one IP address; 0: unlimited.
    pub max_connections_per_ip: usize,
    /// `find_user` needs a token signed with this (`AUTH_SECRET`, `AUTH_SECRET_FILE`, or the
    /// systemd credential `auth_secret`); `None`: anyone may claim any name.
    pub auth_secret: Option<Secret>,
    /// Most backlog messages a `since_seq` resume streams (`RESUME_MAX_MESSAGES`).
    pub resume_max_messages: u64,
    /// At most one `group_activity` per group per this (`ACTIVITY_INTERVAL_MS`).
    pub activity_interval: Duration,
    /// Retention (`RETENTION_MAX_AGE`, `RETENTION_MAX_MESSAGES`); off by default.
    pub retention: Retention,
    /// How often the background pruner walks the groups (`RETENTION_INTERVAL_MS`).
    pub retention_interval: Duration,
    /// `AUTH_AUDIENCE`: tokens must carry this `aud`; `None`: `aud` is not checked.
    pub auth_audience: Option<String>,
    /// The TLS certificate chain and key (PEM); `None`: no TLS listener.
    pub tls: Option<TlsFiles>,
    pub tls_port: u16,
    /// Whether the plaintext `PORT` listens (`PLAINTEXT=false` leaves only TLS).
    pub plaintext: bool,
    /// Offline push (`PUSH_WEBHOOK_URL` and the rest); `None`: off.
    pub push: Option<PushConfig>,
}

/// Where and how offline notifications are POSTed (see `push`).
#[derive(Debug, Clone)]
pub struct PushConfig {
    pub url: WebhookUrl,
    /// Signs each body (HMAC-SHA256), at least `MIN_SECRET_BYTES`.
    pub secret: Secret,
    /// Jobs carry a preview of the text (`PUSH_PREVIEW`).
    pub preview: bool,
    /// Most jobs queued; past it the oldest are dropped (`PUSH_QUEUE_MAX`).
    pub queue_max: u64,
    /// A job not delivered within this is given up (`PUSH_MAX_AGE`).
    pub max_age: Duration,
    /// The first retry's pause, doubling up to 5 minutes (`PUSH_RETRY_MS`).
    pub retry: Duration,
}

/// An `http://host[:port]/path` webhook address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookUrl {
    pub host: String,
    pub port: u16,
    pub path: String,
}

impl WebhookUrl {
    pub fn parse(text: &str) -> Option<WebhookUrl> {
        let rest = text.strip_prefix("http://")?;
        let (authority, path) = match rest.find('/') {
            Some(at) => (&rest[..at], &rest[at..]),
            None => (rest, "/"),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) if !host.ends_with(']') || authority.starts_with('[') => {
                (host, port.parse().ok()?)
            }
            _ => (authority, 80),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let usable = !host.is_empty()
            && !path.contains(char::is_whitespace)
            && !host.contains(['@', '/', ' ']);
        usable.then(|| WebhookUrl {
            host: host.to_string(),
            port,
            path: path.to_string(),
        })
    }
}

/// Where the TLS certificate chain and private key are read from (again on SIGHUP).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Why a configuration was refused (printed as one line, exit code 2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigError {
    Invalid {
        name: &'static str,
        value: String,
        expected: &'static str,
    },
    PeerNeedsMongo,
    /// A file a variable names could not be read (the contents are never shown).
    Unreadable {
        name: &'static str,
        path: String,
        reason: String,
    },
    /// Two settings that only make sense together, or that exclude each other.
    Conflict(&'static str),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Invalid {
                name,
                value,
                expected,
            } => {
                write!(f, "invalid {name}={value:?}: expected {expected}")
            }
            ConfigError::PeerNeedsMongo => write!(
                f,
                "PEER=true requires MONGODB_URI: peers must share one MongoDB database"
            ),
            ConfigError::Unreadable { name, path, reason } => {
                write!(f, "cannot read {name}={path:?}: {reason}")
            }
            ConfigError::Conflict(text) => f.write_str(text),
        }
    }
}

impl std::error::Error for ConfigError {}

/// Room a reply needs beyond an echoed id: the longest message (4000 characters, up to 6
/// bytes each when escaped) and the reply's own fields.
const MIN_REPLY_HEADROOM: usize = 32768;

/// One documented environment variable: name, default shown in `--help`, description.
pub const VARIABLES: &[(&str, &str, &str)] = &[
    (
        "PORT",
        "7777",
        "TCP port to listen on (0 picks a free port; the log says which)",
    ),
    ("BIND", "127.0.0.1", "address to listen on"),
    (
        "PEER",
        "false",
        "true: relay group messages to other instances through Redis (needs MONGODB_URI)",
    ),
    (
        "REDIS_URL",
        "redis://127.0.0.1:6379",
        "Redis used for peer relay; redis+cluster://host:port,host:port,... for a Redis Cluster (sharded pub/sub, Redis 7+)",
    ),
    (
        "PEER_RELAY",
        "per_group",
        "per_group: an instance receives only groups whose room it hosts; shared: one channel for all",
    ),
    (
        "MONGODB_URI",
        "(unset)",
        "MongoDB connection string; unset: embedded SQLite store in DATA_DIR",
    ),
    ("MONGODB_DB", "noomnim", "MongoDB database name"),
    ("DATA_DIR", "./data", "directory of the embedded store"),
    (
        "EMBEDDED_SYNC",
        "full",
        "full: fsync every commit before acking; normal: survive crashes, not power loss",
    ),
    (
        "BACKUP_MB_PER_S",
        "32",
        "noomnim backup writes its copy at most this fast, leaving the disk to the server's commits; 0: no limit",
    ),
    (
        "EMBEDDED_WAL_LIMIT_BYTES",
        "16777216",
        "the embedded store's write-ahead log is reset past this size (reused in place; emptied when writes stop)",
    ),
    (
        "MAX_LINE_BYTES",
        "65536",
        "longest accepted request line in bytes",
    ),
    (
        "MAX_OUTPUT_BYTES",
        "1048576",
        "unread broadcast bytes after which a non-reading client is dropped",
    ),
    (
        "MAX_REPLY_BYTES",
        "1048576",
        "longest reply line; history replies shrink their page (has_more) to fit",
    ),
    (
        "MAX_GROUPS_PER_USER",
        "100",
        "groups one user may create (quota_exceeded beyond); 0: no limit",
    ),
    (
        "MAX_CONNECTIONS",
        "10000",
        "simultaneous client connections",
    ),
    ("WORKERS", "4", "database worker threads"),
    (
        "IO_THREADS",
        "(CPUs)",
        "event loops, each owning its own connections (accept spread by SO_REUSEPORT); default: the CPUs this process may use (affinity and cgroup quota), at most 64; with PEER, 1 (each loop would be a Redis peer of its own)",
    ),
    (
        "STORE_TIMEOUT_MS",
        "5000",
        "how long a store call may take before the request gets `unavailable`",
    ),
    ("NODE_ID", "(random)", "this instance's id in peer mode"),
    (
        "METRICS_PORT",
        "(unset)",
        "serve Prometheus text at GET /metrics on this port (same BIND address)",
    ),
    (
        "RATE_LIMIT",
        "1000",
        "store-bound requests per second per connection (ping, hello, typing and refused requests not counted; rate_limited beyond); 0: unlimited",
    ),
    (
        "RATE_BURST",
        "2000",
        "requests one connection may make at once",
    ),
    (
        "LOGIN_TIMEOUT_MS",
        "30000",
        "connections that have not sent find_user by then are closed",
    ),
    (
        "MAX_CONNECTIONS_PER_IP",
        "0",
        "simultaneous connections from one IP address; 0: unlimited",
    ),
    (
        "IDLE_TIMEOUT_MS",
        "0",
        "connections that send nothing for this long are closed (closing idle_timeout); 0: never",
    ),
    (
        "WRITE_DELAY_MS",
        "10",
        "while busy, broadcasts wait up to this long to leave in one write with the ones after them; 0: at once",
    ),
    (
        "ACTIVITY_INTERVAL_MS",
        "1000",
        "protocol 3: at most one group_activity per group this often (and one after a burst)",
    ),
    (
        "RESUME_MAX_MESSAGES",
        "10000",
        "most backlog messages an enter_group {since_seq} resume streams (older: truncated)",
    ),
    (
        "RETENTION_MAX_AGE",
        "0",
        "messages older than this are removed in the background, e.g. 90d, 12h, 30m, 45s; 0: kept for ever",
    ),
    (
        "RETENTION_MAX_MESSAGES",
        "0",
        "each group keeps at most this many newest messages; 0: no limit",
    ),
    (
        "RETENTION_INTERVAL_MS",
        "60000",
        "how often retention walks the groups (in batches that never hold writers up)",
    ),
    (
        "KEEPALIVE_IDLE_MS",
        "60000",
        "TCP keepalive: quiet time before the kernel probes a client",
    ),
    (
        "KEEPALIVE_INTERVAL_MS",
        "10000",
        "TCP keepalive: time between probes",
    ),
    (
        "KEEPALIVE_PROBES",
        "6",
        "TCP keepalive: unanswered probes before a dead client is dropped",
    ),
    ("LOG_LEVEL", "info", "error, warn, info, debug or trace"),
    (
        "LOG_FORMAT",
        "text",
        "text, or json: one object per line (time, level, target, message)",
    ),
    (
        "AUTH_SECRET",
        "(unset)",
        "HS256 secret: find_user then needs a JWT {sub: username, exp} signed with it",
    ),
    (
        "AUTH_SECRET_FILE",
        "(unset)",
        "file holding the secret instead (trailing newline ignored); under systemd the credential auth_secret is used",
    ),
    (
        "AUTH_AUDIENCE",
        "(unset)",
        "tokens must carry this aud (a string, or an array naming it); unset: aud is not checked",
    ),
    (
        "TLS_CERT",
        "(unset)",
        "PEM certificate chain; with TLS_KEY, serve TLS on TLS_PORT (reloaded on SIGHUP)",
    ),
    ("TLS_KEY", "(unset)", "PEM private key for TLS_CERT"),
    ("TLS_PORT", "7443", "TLS port (0 picks a free port; the log says which)"),
    (
        "PLAINTEXT",
        "true",
        "false: no plaintext listener on PORT (TLS only; needs TLS_CERT and TLS_KEY)",
    ),
    (
        "PUSH_WEBHOOK_URL",
        "(unset)",
        "http://host:port/path: POST a signed JSON notice there for each direct message or mention to a user who is offline (unset: no push)",
    ),
    (
        "PUSH_WEBHOOK_SECRET",
        "(unset)",
        "HMAC-SHA256 key of the X-Noomnim-Signature header, at least 32 bytes (needed with PUSH_WEBHOOK_URL)",
    ),
    (
        "PUSH_PREVIEW",
        "true",
        "false: pushes carry no preview of the message text",
    ),
    (
        "PUSH_QUEUE_MAX",
        "100000",
        "most undelivered pushes kept; past it the oldest are dropped (noomnim_push_dropped_total)",
    ),
    (
        "PUSH_MAX_AGE",
        "24h",
        "a push not delivered within this is given up (d, h, m or s)",
    ),
    (
        "PUSH_RETRY_MS",
        "1000",
        "a failed push is retried after this, then twice as long each time, up to 5 minutes",
    ),
];

/// The `--help` text.
pub fn help_text() -> String {
    let mut out = String::from(
        "noomnim - Noomnim Chat server: newline-delimited JSON chat over TCP\n\n\
         Usage: noomnim [--help | --version]\n\
         Or:    noomnim token USERNAME [--ttl SECONDS]   (a token signed with AUTH_SECRET)\n\
         Or:    noomnim backup PATH   (a consistent copy of the embedded store in DATA_DIR)\n\
         Or:    noomnim admin erase-user NAME   (erase a user through the configured store)\n\
         Or:    noomnim cli [OPTIONS] [send|tail|history|ping ...]   (the terminal client; cli --help)\n\n\
         Configuration is read from environment variables:\n",
    );
    for (name, default, what) in VARIABLES {
        out.push_str(&format!("  {name:<24} {what} [default: {default}]\n"));
    }
    out.push_str(
        "\nProtocol: docs/PROTOCOL.md in the source tree. Try it with: nc 127.0.0.1 7777\n",
    );
    out
}

impl Config {
    /// Reads the configuration from the process environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        Config::from_map(&std::env::vars().collect())
    }

    /// Reads the configuration from a name → value map (the environment, or a test's map).
    pub fn from_map(env: &HashMap<String, String>) -> Result<Config, ConfigError> {
        // A variable's value, or its default as `VARIABLES` documents it: each default is
        // written once, there, and `--help`, the README and systemd's example show that one.
        let get = |name: &str| {
            env.get(name)
                .map(|v| v.trim())
                .filter(|v| !v.is_empty())
                .or_else(|| documented_default(name))
        };
        let peer = parse_bool(get("PEER"), "PEER")?;
        #[cfg(feature = "bench-noop")]
        if get("BENCH_STORE") == Some("noop") {
            return Config::from_map(&without_store(env)).map(|config| Config {
                store: StoreKind::Noop,
                ..config
            });
        }
        let store = store_of(&get)?;
        if peer && matches!(store, StoreKind::Embedded { .. }) {
            return Err(ConfigError::PeerNeedsMongo);
        }
        let node_id = get("NODE_ID")
            .map(str::to_string)
            .unwrap_or_else(random_node_id);
        Config {
            bind: parse_value(get("BIND"), "BIND", "an IP address")?,
            port: parse_value(get("PORT"), "PORT", "a port number 0-65535")?,
            peer,
            redis_url: redis_url_of(get("REDIS_URL"))?,
            relay_mode: match get("PEER_RELAY") {
                Some("shared") => RelayMode::Shared,
                Some("per_group") | None => RelayMode::PerGroup,
                Some(other) => return Err(invalid("PEER_RELAY", other, "per_group or shared")),
            },
            store,
            max_line_bytes: parse_positive(get("MAX_LINE_BYTES"), "MAX_LINE_BYTES")?,
            max_output_bytes: parse_positive(get("MAX_OUTPUT_BYTES"), "MAX_OUTPUT_BYTES")?,
            max_reply_bytes: parse_positive(get("MAX_REPLY_BYTES"), "MAX_REPLY_BYTES")?,
            max_groups_per_user: parse_value(
                get("MAX_GROUPS_PER_USER"),
                "MAX_GROUPS_PER_USER",
                "a whole number (0: no limit)",
            )?,
            backup_mb_per_s: parse_value(
                get("BACKUP_MB_PER_S"),
                "BACKUP_MB_PER_S",
                "a whole number of MB/s (0: no limit)",
            )?,
            max_connections: parse_positive(get("MAX_CONNECTIONS"), "MAX_CONNECTIONS")?,
            workers: parse_positive(get("WORKERS"), "WORKERS")?,
            io_threads: match get("IO_THREADS") {
                Some(text) => parse_positive(Some(text), "IO_THREADS")?,
                None => default_io_threads(peer),
            },
            log_format: match get("LOG_FORMAT").map(str::to_ascii_lowercase).as_deref() {
                Some("json") => crate::logging::LogFormat::Json,
                Some("text") | None => crate::logging::LogFormat::Text,
                Some(other) => return Err(invalid("LOG_FORMAT", other, "text or json")),
            },
            log_level: parse_value(get("LOG_LEVEL"), "LOG_LEVEL", "a log level")?,
            store_timeout: parse_millis(get("STORE_TIMEOUT_MS"), "STORE_TIMEOUT_MS")?,
            node_id: node_id.clone(),
            instance_id: node_id,
            metrics_port: match get("METRICS_PORT") {
                Some(text) => Some(parse_value(
                    Some(text),
                    "METRICS_PORT",
                    "a port number 0-65535",
                )?),
                None => None,
            },
            rate_limit: parse_rate(get("RATE_LIMIT"), "RATE_LIMIT")?,
            rate_burst: parse_rate(get("RATE_BURST"), "RATE_BURST")?.max(1.0),
            login_timeout: parse_millis(get("LOGIN_TIMEOUT_MS"), "LOGIN_TIMEOUT_MS")?,
            max_connections_per_ip: parse_value(
                get("MAX_CONNECTIONS_PER_IP"),
                "MAX_CONNECTIONS_PER_IP",
                "a whole number (0: unlimited)",
            )?,
            idle_timeout: optional_millis(
                get("IDLE_TIMEOUT_MS"),
                "IDLE_TIMEOUT_MS",
                "a whole number of milliseconds (0: never)",
                None,
            )?,
            write_delay: optional_millis(
                get("WRITE_DELAY_MS"),
                "WRITE_DELAY_MS",
                "a whole number of milliseconds, at most 1000 (0: at once)",
                Some(1000),
            )?,
            keepalive_idle: parse_millis(get("KEEPALIVE_IDLE_MS"), "KEEPALIVE_IDLE_MS")?,
            keepalive_interval: parse_millis(
                get("KEEPALIVE_INTERVAL_MS"),
                "KEEPALIVE_INTERVAL_MS",
            )?,
            keepalive_probes: parse_positive(get("KEEPALIVE_PROBES"), "KEEPALIVE_PROBES")? as u32,
            auth_secret: auth_secret(env)?,
            activity_interval: parse_millis(get("ACTIVITY_INTERVAL_MS"), "ACTIVITY_INTERVAL_MS")?,
            resume_max_messages: parse_positive(get("RESUME_MAX_MESSAGES"), "RESUME_MAX_MESSAGES")?
                as u64,
            retention: Retention {
                max_age: parse_age(get("RETENTION_MAX_AGE"))?,
                max_messages: parse_value(
                    get("RETENTION_MAX_MESSAGES"),
                    "RETENTION_MAX_MESSAGES",
                    "a whole number (0: no limit)",
                )?,
            },
            retention_interval: parse_millis(
                get("RETENTION_INTERVAL_MS"),
                "RETENTION_INTERVAL_MS",
            )?,
            auth_audience: get("AUTH_AUDIENCE").map(str::to_string),
            tls: tls_of(get("TLS_CERT"), get("TLS_KEY"))?,
            tls_port: parse_value(get("TLS_PORT"), "TLS_PORT", "a port number 0-65535")?,
            plaintext: parse_bool(get("PLAINTEXT"), "PLAINTEXT")?,
            push: push_of(&get)?,
        }
        .checked()
    }

    /// Checks the limits against each other: every reply must be able to carry an `id` as
    /// long as a request line and the longest message.
    fn checked(self) -> Result<Config, ConfigError> {
        if !self.plaintext && self.tls.is_none() {
            return Err(ConfigError::Conflict(
                "PLAINTEXT=false needs TLS_CERT and TLS_KEY (there would be nothing to listen on)",
            ));
        }
        let least = self.max_line_bytes + MIN_REPLY_HEADROOM;
        if self.max_reply_bytes < least {
            return Err(ConfigError::Invalid {
                name: "MAX_REPLY_BYTES",
                value: self.max_reply_bytes.to_string(),
                expected: "at least MAX_LINE_BYTES + 32768",
            });
        }
        Ok(self)
    }

    /// The address to listen on.
    pub fn listen_addr(&self) -> SocketAddr {
        SocketAddr::new(self.bind, self.port)
    }
}

#[cfg(feature = "bench-noop")]
fn without_store(env: &HashMap<String, String>) -> HashMap<String, String> {
    let mut env = env.clone();
    for name in ["BENCH_STORE", "MONGODB_URI", "PEER"] {
        env.remove(name);
    }
    env
}

/// The shortest secret accepted: HS256's key should be at least its 256-bit output (RFC 7518
/// section 3.2); a shorter one can be guessed offline from any token.
pub const MIN_SECRET_BYTES: usize = 32;

/// The token secret: `AUTH_SECRET`, else the file `AUTH_SECRET_FILE` names, else the systemd
/// credential `auth_secret` (`LoadCredential=`, in `$CREDENTIALS_DIRECTORY`). The secret's
/// value never appears in an error.
fn auth_secret(env: &HashMap<String, String>) -> Result<Option<Secret>, ConfigError> {
    // Set but empty is a mistake (an unexpanded variable, an empty secret store), never a way
    // to turn authentication off: that would open the server to anyone without a word.
    if let Some(secret) = env.get("AUTH_SECRET") {
        if secret.len() < MIN_SECRET_BYTES {
            return Err(ConfigError::Invalid {
                name: "AUTH_SECRET",
                value: format!("<{} bytes, redacted>", secret.len()),
                expected: "at least 32 bytes (e.g. head -c 32 /dev/urandom | base64)",
            });
        }
        return Ok(Some(Secret::new(secret.as_bytes().to_vec())));
    }
    let (name, path) = match (
        env.get("AUTH_SECRET_FILE"),
        env.get("CREDENTIALS_DIRECTORY"),
    ) {
        (Some(path), _) if !path.trim().is_empty() => {
            ("AUTH_SECRET_FILE", PathBuf::from(path.trim()))
        }
        (_, Some(dir)) if PathBuf::from(dir).join("auth_secret").exists() => (
            "CREDENTIALS_DIRECTORY",
            PathBuf::from(dir).join("auth_secret"),
        ),
        _ => return Ok(None),
    };
    let unreadable = |reason: String| ConfigError::Unreadable {
        name,
        path: path.display().to_string(),
        reason,
    };
    let mut bytes = std::fs::read(&path).map_err(|e| unreadable(e.to_string()))?;
    while bytes.last().is_some_and(|b| b.is_ascii_whitespace()) {
        bytes.pop();
    }
    if bytes.is_empty() {
        return Err(unreadable("the file is empty".into()));
    }
    if bytes.len() < MIN_SECRET_BYTES {
        return Err(unreadable(format!(
            "the secret is {} bytes; at least {MIN_SECRET_BYTES} are needed",
            bytes.len()
        )));
    }
    Ok(Some(Secret::new(bytes)))
}

/// Offline push: on when `PUSH_WEBHOOK_URL` is set, which then needs a secret of at least
/// `MIN_SECRET_BYTES` (a short one would let anyone forge notices offline).
fn push_of<'a>(get: &impl Fn(&str) -> Option<&'a str>) -> Result<Option<PushConfig>, ConfigError> {
    let Some(url) = get("PUSH_WEBHOOK_URL") else {
        return Ok(None);
    };
    let url = WebhookUrl::parse(url).ok_or_else(|| {
        invalid(
            "PUSH_WEBHOOK_URL",
            url,
            "http://host[:port]/path (for https, a local TLS-terminating proxy)",
        )
    })?;
    let secret = match get("PUSH_WEBHOOK_SECRET") {
        Some(secret) if secret.len() >= MIN_SECRET_BYTES => Secret::new(secret.as_bytes().to_vec()),
        other => return Err(ConfigError::Invalid {
            name: "PUSH_WEBHOOK_SECRET",
            value: format!("<{} bytes, redacted>", other.map_or(0, str::len)),
            expected:
                "at least 32 bytes with PUSH_WEBHOOK_URL (e.g. head -c 32 /dev/urandom | base64)",
        }),
    };
    let max_age = parse_age_of(get("PUSH_MAX_AGE"), "PUSH_MAX_AGE")?
        .ok_or_else(|| invalid("PUSH_MAX_AGE", "0", "a whole number with d, h, m or s"))?;
    Ok(Some(PushConfig {
        url,
        secret,
        preview: parse_bool(get("PUSH_PREVIEW"), "PUSH_PREVIEW")?,
        queue_max: parse_positive(get("PUSH_QUEUE_MAX"), "PUSH_QUEUE_MAX")? as u64,
        max_age,
        retry: parse_millis(get("PUSH_RETRY_MS"), "PUSH_RETRY_MS")?,
    }))
}

fn invalid(name: &'static str, value: &str, expected: &'static str) -> ConfigError {
    ConfigError::Invalid {
        name,
        value: value.to_string(),
        expected,
    }
}

/// The default `VARIABLES` documents for `name`, when it is a value (not "(unset)" and the
/// like, whose default is worked out or absent).
fn documented_default(name: &str) -> Option<&'static str> {
    VARIABLES
        .iter()
        .find(|(variable, _, _)| *variable == name)
        .map(|(_, default, _)| *default)
        .filter(|default| !default.starts_with('('))
}

/// Where messages are stored: MongoDB when `MONGODB_URI` is set, else the embedded store.
fn store_of<'a>(get: &impl Fn(&str) -> Option<&'a str>) -> Result<StoreKind, ConfigError> {
    if let Some(uri) = get("MONGODB_URI") {
        return Ok(StoreKind::Mongo {
            uri: uri.to_string(),
            // Both have documented defaults (`VARIABLES`), so `get` always has a value.
            database: get("MONGODB_DB").unwrap_or_default().to_string(),
        });
    }
    Ok(StoreKind::Embedded {
        data_dir: PathBuf::from(get("DATA_DIR").unwrap_or_default()),
        durable: match get("EMBEDDED_SYNC") {
            Some("full") | None => true,
            Some("normal") => false,
            Some(other) => return Err(invalid("EMBEDDED_SYNC", other, "full or normal")),
        },
        wal_limit: parse_positive(get("EMBEDDED_WAL_LIMIT_BYTES"), "EMBEDDED_WAL_LIMIT_BYTES")?
            as u64,
    })
}

/// `REDIS_URL`: a single server or a Redis Cluster's seeds.
fn redis_url_of(raw: Option<&str>) -> Result<String, ConfigError> {
    let url = raw.unwrap_or_default();
    let known = ["redis://", "rediss://", "redis+cluster://"];
    if !known.iter().any(|scheme| url.starts_with(scheme)) {
        return Err(invalid(
            "REDIS_URL",
            url,
            "a redis:// URL, or redis+cluster://host:port,host:port for a Redis Cluster",
        ));
    }
    Ok(url.to_string())
}

/// `TLS_CERT` and `TLS_KEY`: both or neither.
fn tls_of(cert: Option<&str>, key: Option<&str>) -> Result<Option<TlsFiles>, ConfigError> {
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(Some(TlsFiles {
            cert: PathBuf::from(cert),
            key: PathBuf::from(key),
        })),
        (None, None) => Ok(None),
        _ => Err(ConfigError::Conflict(
            "TLS_CERT and TLS_KEY must be set together",
        )),
    }
}

fn parse_value<T: std::str::FromStr>(
    raw: Option<&str>,
    name: &'static str,
    expected: &'static str,
) -> Result<T, ConfigError> {
    let text = raw.unwrap_or_default();
    text.parse().map_err(|_| invalid(name, text, expected))
}

/// A positive whole number of milliseconds.
fn parse_millis(raw: Option<&str>, name: &'static str) -> Result<Duration, ConfigError> {
    Ok(Duration::from_millis(parse_positive(raw, name)? as u64))
}

/// A whole number of milliseconds where 0 means off (`None`), at most `most`.
fn optional_millis(
    raw: Option<&str>,
    name: &'static str,
    expected: &'static str,
    most: Option<u64>,
) -> Result<Option<Duration>, ConfigError> {
    match parse_value::<u64>(raw, name, expected)? {
        0 => Ok(None),
        ms if most.is_some_and(|most| ms > most) => Err(invalid(name, &ms.to_string(), expected)),
        ms => Ok(Some(Duration::from_millis(ms))),
    }
}

/// `RETENTION_MAX_AGE`: a whole number with a unit (`d`, `h`, `m`, `s`); `0` is off.
fn parse_age(raw: Option<&str>) -> Result<Option<Duration>, ConfigError> {
    parse_age_of(raw, "RETENTION_MAX_AGE")
}

/// An age: a whole number with a unit (`d`, `h`, `m`, `s`); `0` is none.
fn parse_age_of(raw: Option<&str>, name: &'static str) -> Result<Option<Duration>, ConfigError> {
    const EXPECTED: &str = "0, or a whole number with d, h, m or s (e.g. 90d)";
    let Some(text) = raw.map(str::trim).filter(|t| !t.is_empty() && *t != "0") else {
        return Ok(None);
    };
    let split = text.len() - text.chars().last().map_or(0, char::len_utf8);
    let (number, unit) = text.split_at(split);
    let seconds: u64 = match unit {
        "d" => 86_400,
        "h" => 3_600,
        "m" => 60,
        "s" => 1,
        _ => return Err(invalid(name, text, EXPECTED)),
    };
    match number.parse::<u64>() {
        Ok(count) if count > 0 => count
            .checked_mul(seconds)
            .map(|s| Some(Duration::from_secs(s)))
            .ok_or_else(|| invalid(name, text, EXPECTED)),
        _ => Err(invalid(name, text, EXPECTED)),
    }
}

/// One event loop per CPU the process may use (`available_parallelism` reads the affinity mask
/// and the cgroup CPU quota), at most 64: past that the loops' shared parts (the bus, the
/// store's writer) bound the gain. In peer mode one: there each loop is a Redis peer of its
/// own (its connections, subscriptions and heartbeats), so an instance stays one peer unless
/// `IO_THREADS` asks for more.
fn default_io_threads(peer: bool) -> usize {
    if peer {
        return 1;
    }
    std::thread::available_parallelism()
        .map(std::num::NonZeroUsize::get)
        .unwrap_or(1)
        .clamp(1, 64)
}

fn parse_positive(raw: Option<&str>, name: &'static str) -> Result<usize, ConfigError> {
    let value: usize = parse_value(raw, name, "a positive whole number")?;
    if value == 0 {
        return Err(invalid(name, "0", "a positive whole number"));
    }
    Ok(value)
}

fn parse_rate(raw: Option<&str>, name: &'static str) -> Result<f64, ConfigError> {
    let value: f64 = parse_value(raw, name, "a number >= 0")?;
    if !value.is_finite() || value < 0.0 {
        return Err(invalid(name, &value.to_string(), "a number >= 0"));
    }
    Ok(value)
}

fn parse_bool(raw: Option<&str>, name: &'static str) -> Result<bool, ConfigError> {
    match raw.map(str::to_ascii_lowercase).as_deref() {
        None => Ok(false),
        Some("false") | Some("0") | Some("no") => Ok(false),
        Some("true") | Some("1") | Some("yes") => Ok(true),
        Some(other) => Err(invalid(name, other, "true or false")),
    }
}

fn random_node_id() -> String {
    mongodb::bson::oid::ObjectId::new().to_hex()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The defaults are written once, in `VARIABLES` (for `--help`, the README and the
    /// systemd example), and the parser reads them there: setting every variable to its
    /// documented default changes nothing, and each documented default is a valid value.
    #[test]
    fn every_documented_default_is_the_default() {
        // A fixed NODE_ID: its default is random.
        let unset = Config::from_map(&env(&[("NODE_ID", "n1")])).expect("defaults are valid");
        for (name, default, _) in VARIABLES {
            if default.starts_with('(') {
                continue; // (unset), (CPUs), (random): nothing to write down
            }
            let set = Config::from_map(&env(&[("NODE_ID", "n1"), (name, default)]))
                .unwrap_or_else(|e| panic!("{name}={default} is refused: {e}"));
            assert_eq!(
                format!("{set:?}"),
                format!("{unset:?}"),
                "{name}'s documented default {default} is not what the parser defaults to"
            );
        }
    }

    #[test]
    fn defaults_use_embedded_store() {
        let config = Config::from_map(&env(&[])).expect("defaults are valid");
        assert_eq!(config.port, 7777);
        assert_eq!(config.max_line_bytes, 65536);
        assert_eq!(
            config.store,
            StoreKind::Embedded {
                data_dir: "./data".into(),
                durable: true,
                wal_limit: 16 << 20,
            }
        );
        let mongo = Config::from_map(&env(&[("MONGODB_URI", "mongodb://m")])).expect("valid");
        assert_eq!(
            mongo.store,
            StoreKind::Mongo {
                uri: "mongodb://m".into(),
                database: "noomnim".into(),
            }
        );
    }

    #[test]
    fn peer_without_mongo_is_refused() {
        let err = Config::from_map(&env(&[("PEER", "true")])).unwrap_err();
        assert_eq!(err, ConfigError::PeerNeedsMongo);
    }

    #[test]
    fn bad_numbers_are_refused_with_the_variable_name() {
        let err = Config::from_map(&env(&[("PORT", "seventy")])).unwrap_err();
        assert!(err.to_string().contains("PORT"), "{err}");
        assert!(Config::from_map(&env(&[("MAX_CONNECTIONS", "0")])).is_err());
        assert!(Config::from_map(&env(&[("PEER", "maybe")])).is_err());
        assert!(Config::from_map(&env(&[("RATE_LIMIT", "-1")])).is_err());
        assert!(Config::from_map(&env(&[("METRICS_PORT", "http")])).is_err());
        let limits = Config::from_map(&env(&[("RATE_LIMIT", "0"), ("METRICS_PORT", "9100")]))
            .expect("valid");
        assert_eq!(limits.rate_limit, 0.0);
        assert_eq!(limits.metrics_port, Some(9100));
    }
}
