//! Test harness: starts the real `noomnim` binary on an ephemeral port and talks to it over TCP.
//!
//! Backends: `Backend::Embedded` uses a fresh temporary `DATA_DIR`; `Backend::Mongo` uses a fresh
//! database on the server named by `NOOMNIM_TEST_MONGODB_URI` (started by `.ci/run` or
//! `tools/services.sh`). The `backend_tests!` macro runs one test body against both.
#![allow(dead_code)]

pub mod tmux;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub const BINARY: &str = env!("CARGO_BIN_EXE_noomnim");
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A name unique to this test process and call.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}_{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Embedded,
    Mongo,
}

/// Where a server keeps its data; shared by restarts of "the same" server.
#[derive(Debug, Clone)]
pub struct Storage {
    pub backend: Backend,
    pub data_dir: PathBuf,
    pub mongo_db: String,
    /// A MongoDB of the test's own instead of the shared test server.
    pub mongo_uri: Option<String>,
}

impl Storage {
    pub fn new(backend: Backend) -> Storage {
        let name = unique("noomnim_test");
        Storage {
            backend,
            data_dir: std::env::temp_dir().join(&name),
            mongo_db: name,
            mongo_uri: None,
        }
    }

    pub fn env(&self) -> Vec<(String, String)> {
        match self.backend {
            Backend::Embedded => vec![("DATA_DIR".into(), self.data_dir.display().to_string())],
            Backend::Mongo => vec![
                (
                    "MONGODB_URI".into(),
                    self.mongo_uri.clone().unwrap_or_else(mongo_uri),
                ),
                ("MONGODB_DB".into(), self.mongo_db.clone()),
            ],
        }
    }
}

impl Drop for Storage {
    /// Leaves nothing behind: the data directory, or the test's database on the shared test
    /// MongoDB (whose stand-in slows down with all the data it holds, so a suite that kept
    /// every test's messages would slow itself down test by test).
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.data_dir);
        if self.backend == Backend::Mongo && self.mongo_uri.is_none() {
            if let Ok(client) = mongodb::sync::Client::with_uri_str(mongo_uri()) {
                let _ = client.database(&self.mongo_db).drop().run();
            }
        }
    }
}

/// The test MongoDB; tests of the Mongo backend fail loudly without it.
pub fn mongo_uri() -> String {
    std::env::var("NOOMNIM_TEST_MONGODB_URI").unwrap_or_else(|_| {
        panic!("NOOMNIM_TEST_MONGODB_URI is not set: start the test services with tools/services.sh (bash .ci/run does)")
    })
}

/// The test Redis.
pub fn redis_url() -> String {
    std::env::var("NOOMNIM_TEST_REDIS_URL").unwrap_or_else(|_| {
        panic!("NOOMNIM_TEST_REDIS_URL is not set: start the test services with tools/services.sh (bash .ci/run does)")
    })
}

/// A running server process; killed when dropped.
pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    pub log: Arc<Mutex<Vec<String>>>,
    /// The start-up line that says "listening on"; it names every address the server bound.
    pub ready_line: String,
}

impl Server {
    pub fn start(storage: &Storage) -> Server {
        Server::start_with(storage, &[])
    }

    pub fn start_with(storage: &Storage, extra: &[(&str, &str)]) -> Server {
        let mut env = storage.env();
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        Server::spawn(&env)
    }

    /// Spawns the binary with exactly this environment (plus PATH) and waits for "listening on".
    pub fn spawn(env: &[(String, String)]) -> Server {
        Server::spawn_command(Command::new(BINARY), env)
    }

    /// Like `spawn`, from a prepared command for the binary (e.g. with process limits set).
    pub fn spawn_command(mut command: Command, env: &[(String, String)]) -> Server {
        command
            .env_clear()
            .env("PORT", "0")
            .env("LOG_LEVEL", "info");
        command.envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("spawn noomnim");
        let stderr = child.stderr.take().expect("stderr piped");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (found, addr_rx) = mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("listening on ") {
                    let _ = found.send(line.clone());
                }
                sink.lock().expect("log lock").push(line);
            }
        });
        let ready_line = match addr_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "server did not start; log: {:?}",
                    log.lock().expect("log lock")
                );
            }
        };
        let addr = address_after(&ready_line, "listening on ")
            .parse()
            .expect("listen address");
        Server {
            child,
            addr,
            log,
            ready_line,
        }
    }

    /// The `/metrics` address, read from the start-up line (None: METRICS_PORT not set).
    pub fn metrics_addr(&self) -> Option<String> {
        self.ready_line
            .contains("metrics on http://")
            .then(|| address_after(&self.ready_line, "metrics on http://"))
            .map(|addr| addr.trim_end_matches("/metrics").to_string())
    }

    pub fn connect(&self) -> Client {
        Client::connect(self.addr)
    }

    /// The TLS address, read from the start-up line (None: no TLS listener).
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        let addr = if self.ready_line.contains("(TLS only)") {
            address_after(&self.ready_line, "listening on ")
        } else {
            address_after(&self.ready_line, "TLS on ")
        };
        addr.parse().ok()
    }

    /// A client logged in with a token (servers with `AUTH_SECRET`).
    pub fn login_with_token(&self, username: &str, token: &str) -> Client {
        let mut client = self.connect();
        let reply = client.request("find_user", json!({ "username": username, "token": token }));
        assert!(
            reply["event"] == "user_created" || reply["event"] == "user_found",
            "login failed: {reply}"
        );
        client
    }

    /// A client whose kernel receive buffer is tiny, so that when it stops reading the server's
    /// output backs up after a few hundred kilobytes instead of many megabytes.
    pub fn connect_small_window(&self) -> Client {
        use socket2::{Domain, Socket, Type};
        let socket =
            Socket::new(Domain::for_address(self.addr), Type::STREAM, None).expect("socket");
        socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
        socket.connect(&self.addr.into()).expect("connect");
        Client::from_stream(socket.into())
    }

    /// A logged-in client.
    pub fn login(&self, username: &str) -> Client {
        let mut client = self.connect();
        let reply = client.request("find_user", json!({ "username": username }));
        assert!(
            reply["event"] == "user_created" || reply["event"] == "user_found",
            "login failed: {reply}"
        );
        client
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        signal(self.child.id(), "TERM");
        wait_for_exit(&mut self.child, Duration::from_secs(15))
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log_text(&self) -> String {
        self.log.lock().expect("log lock").join("\n")
    }

    /// True once a log line containing `needle` has been read from the server's stderr (waits
    /// up to `REPLY_TIMEOUT`: the log is read on another thread, so a line the server wrote
    /// just now may not be in `log_text` yet).
    pub fn logged(&self, needle: &str) -> bool {
        let deadline = Instant::now() + REPLY_TIMEOUT;
        loop {
            if self.log_text().contains(needle) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The whitespace-delimited word after `marker` in `line`.
fn address_after(line: &str, marker: &str) -> String {
    line.split(marker)
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_default()
        .trim_end_matches(';')
        .to_string()
}

pub fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status();
    assert!(
        status.map(|s| s.success()).unwrap_or(false),
        "kill -{name} {pid} failed"
    );
}

pub fn wait_for_exit(child: &mut Child, limit: Duration) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("process did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A line-oriented test client.
pub struct Client {
    pub stream: TcpStream,
    reader: BufReader<TcpStream>,
    next_id: u64,
    /// The start of a line whose end has not arrived yet.
    partial: String,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        Client::from_stream(TcpStream::connect(addr).expect("connect"))
    }

    pub fn from_stream(stream: TcpStream) -> Client {
        stream
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .expect("timeout");
        let reader = BufReader::new(stream.try_clone().expect("clone"));
        Client {
            stream,
            reader,
            next_id: 1,
            partial: String::new(),
        }
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write");
    }

    pub fn send(&mut self, line: &Value) {
        let mut bytes = serde_json::to_vec(line).expect("encode");
        bytes.push(b'\n');
        self.send_raw(&bytes);
    }

    /// The next line from the server exactly as sent (with its `\n`).
    pub fn recv_line(&mut self) -> String {
        let mut line = std::mem::take(&mut self.partial);
        match self.reader.read_line(&mut line) {
            Ok(0) => panic!("server closed the connection"),
            Ok(_) => line,
            Err(e) => panic!("no line from server: {e}"),
        }
    }

    /// The next line from the server, or `None` once the server has closed the connection.
    pub fn recv_or_closed(&mut self) -> Option<Value> {
        let mut line = std::mem::take(&mut self.partial);
        match self.reader.read_line(&mut line) {
            Ok(0) => None,
            Ok(_) if !line.ends_with('\n') => None,
            Ok(_) => Some(
                serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("bad server line {line:?}: {e}")),
            ),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => None,
            Err(e) => panic!("no line from server: {e}"),
        }
    }

    /// The next line from the server, parsed.
    pub fn recv(&mut self) -> Value {
        let mut line = std::mem::take(&mut self.partial);
        match self.reader.read_line(&mut line) {
            Ok(0) => panic!("server closed the connection"),
            Ok(_) => serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("bad server line {line:?}: {e}")),
            Err(e) => panic!("no line from server: {e}"),
        }
    }

    /// Like `recv`, but `None` if nothing arrives within `wait`.
    /// A line cut by the timeout is kept and completed by the next call.
    pub fn try_recv(&mut self, wait: Duration) -> Option<Value> {
        self.stream.set_read_timeout(Some(wait)).expect("timeout");
        let got = self.reader.read_line(&mut self.partial);
        self.stream
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .expect("timeout");
        if got.is_err() || !self.partial.ends_with('\n') {
            return None;
        }
        let line = std::mem::take(&mut self.partial);
        Some(serde_json::from_str(&line).expect("server line is json"))
    }

    /// Sends a request with a fresh id and returns its reply (skipping broadcasts before it).
    pub fn request(&mut self, event: &str, data: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        self.send(&json!({ "event": event, "data": data, "id": id }));
        loop {
            let line = self.recv();
            if line.get("id") == Some(&json!(id)) {
                return line;
            }
            assert!(
                line["event"] == "message_sent" && line.get("id").is_none(),
                "unexpected line {line}"
            );
        }
    }

    /// True if the server answers a ping (false if it refused or closed the connection).
    /// Replies and broadcasts before the pong are skipped.
    pub fn try_request_ping(&mut self) -> bool {
        let sent = self
            .stream
            .write_all(b"{\"event\":\"ping\",\"id\":\"probe\"}\n")
            .is_ok();
        let deadline = Instant::now() + REPLY_TIMEOUT;
        while sent && Instant::now() < deadline {
            match self.try_recv(Duration::from_millis(200)) {
                Some(reply) if reply["id"] == "probe" => return reply["event"] == "pong",
                Some(_) => continue,
                None if self.partial.is_empty() && self.peer_closed() => return false,
                None => continue,
            }
        }
        false
    }

    fn peer_closed(&mut self) -> bool {
        let _ = self.stream.set_nonblocking(true);
        let mut probe = [0u8; 1];
        let closed = matches!(self.stream.peek(&mut probe), Ok(0));
        let _ = self.stream.set_nonblocking(false);
        closed
    }

    /// Reads until the peer closes; true if it did within `wait`.
    pub fn closed_within(&mut self, wait: Duration) -> bool {
        self.stream.set_read_timeout(Some(wait)).expect("timeout");
        let mut sink = [0u8; 65536];
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            match self.reader.read(&mut sink) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
        false
    }
}

/// Shorthand for `{"username": u, "group_name": g}`.
pub fn ug(username: &str, group_name: &str) -> Value {
    json!({ "username": username, "group_name": group_name })
}

/// Shorthand for a `send_message` data object.
pub fn msg(username: &str, group_name: &str, text: &str) -> Value {
    json!({ "username": username, "group_name": group_name, "text": text })
}

/// Generates `embedded::NAME` and `mongo::NAME` tests calling `NAME(Backend)`.
#[macro_export]
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $( #[test] fn $name() { super::$name($crate::common::Backend::Embedded) } )*
        }
        mod mongo {
            $( #[test] fn $name() { super::$name($crate::common::Backend::Mongo) } )*
        }
    };
}

/// Every stored message of a group, oldest first, paged through `fetch_messages {after_seq}`.
pub fn fetch_all(client: &mut Client, username: &str, group_name: &str) -> Vec<Value> {
    let mut all: Vec<Value> = Vec::new();
    loop {
        let after = all.last().map_or(0, |m| m["seq"].as_u64().unwrap_or(0));
        let page = client.request(
            "fetch_messages",
            json!({"username": username, "group_name": group_name, "after_seq": after, "limit": 100}),
        );
        assert_eq!(page["event"], "messages", "fetch failed: {page}");
        let messages = page["data"]["messages"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let more = page["data"]["has_more"] == true;
        all.extend(messages);
        if !more {
            return all;
        }
    }
}

/// Sends `count` messages from a logged-in member, `window` at a time, and returns the acks.
pub fn send_many(
    client: &mut Client,
    username: &str,
    group_name: &str,
    count: usize,
    window: usize,
) -> Vec<Value> {
    let mut acks = Vec::with_capacity(count);
    let mut sent = 0;
    while sent < count {
        let burst = window.min(count - sent);
        for i in sent..sent + burst {
            let text = format!("{username}#{i}");
            client.send(&json!({"event": "send_message", "data": msg(username, group_name, &text), "id": i}));
        }
        while acks.len() < sent + burst {
            let line = client.recv();
            if line.get("id").is_some() {
                assert_eq!(line["event"], "message_sent", "send failed: {line}");
                acks.push(line["data"].clone());
            }
        }
        sent += burst;
    }
    acks
}

/// The resident memory of a process, in bytes (from /proc).
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map(|kb| kb * 1024)
        .expect("VmRSS in /proc status")
}

/// How many file descriptors a process has open.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("proc fd")
        .count()
}

/// A free loopback port (bound and released, so it is free for a moment).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// A private service process (redis-server, mongoeco) on a fixed loopback port, so tests can
/// stop and restart it. Killed when dropped.
pub struct LocalService {
    pub port: u16,
    program: String,
    args: Vec<String>,
    child: Option<Child>,
}

impl LocalService {
    /// Starts `program args...` and waits until it accepts connections on `port`.
    pub fn start(port: u16, program: &str, args: Vec<String>) -> LocalService {
        let mut service = LocalService {
            port,
            program: program.to_string(),
            args,
            child: None,
        };
        service.restart();
        service
    }

    /// A redis-server without persistence on a free port.
    pub fn redis() -> LocalService {
        let port = free_port();
        let args = [
            "--bind",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
        ];
        LocalService::start(
            port,
            "redis-server",
            args.iter().map(|a| a.to_string()).collect(),
        )
    }

    pub fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Starts it (again) on the same port and waits until it accepts connections.
    pub fn restart(&mut self) {
        self.stop();
        let child = Command::new(&self.program)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {} (bash .ci/run installs it): {e}",
                    self.program
                )
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "{} did not start", self.program);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for LocalService {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Asserts that messages carry exactly the seqs 1..=N, in order.
pub fn assert_seqs_are_one_to_n(stored: &[Value], total: usize) {
    let seqs: Vec<u64> = stored
        .iter()
        .map(|m| m["seq"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(
        seqs,
        (1..=total as u64).collect::<Vec<_>>(),
        "seq is exactly 1..{total}"
    );
}

/// A private mongoeco server on a fixed port and database file, so it can be restarted.
pub struct PrivateMongo {
    pub service: LocalService,
    file: std::path::PathBuf,
}

impl PrivateMongo {
    pub fn start() -> PrivateMongo {
        let port = free_port();
        let file = std::env::temp_dir().join(format!("{}.sqlite", unique("mongoeco")));
        let command = std::env::var("NOOMNIM_TEST_MONGOECO").expect(
            "NOOMNIM_TEST_MONGOECO is not set: start tools/services.sh (bash .ci/run does)",
        );
        let mut parts = command.split_whitespace().map(str::to_string);
        let program = parts.next().expect("a command");
        let mut args: Vec<String> = parts.collect();
        args.extend([
            "--port".into(),
            port.to_string(),
            "--db".into(),
            file.display().to_string(),
        ]);
        PrivateMongo {
            service: LocalService::start(port, &program, args),
            file,
        }
    }

    pub fn uri(&self) -> String {
        format!(
            "mongodb://127.0.0.1:{}/?directConnection=true",
            self.service.port
        )
    }
}

impl Drop for PrivateMongo {
    fn drop(&mut self) {
        self.service.stop();
        let _ = std::fs::remove_file(&self.file);
    }
}

/// `send_message` data with an idempotency key (`username` left out: the bound user).
pub fn keyed_msg(group_name: &str, text: &str, client_msg_id: &str) -> Value {
    json!({ "group_name": group_name, "text": text, "client_msg_id": client_msg_id })
}

/// Sends each of `keys` as a keyed message (pipelined, request id = index) and returns the
/// acks' data in order.
pub fn send_keyed(client: &mut Client, group_name: &str, keys: &[String]) -> Vec<Value> {
    for (i, key) in keys.iter().enumerate() {
        let data = keyed_msg(group_name, &format!("text of {key}"), key);
        client.send(&json!({"event": "send_message", "data": data, "id": i}));
    }
    let mut acks = vec![Value::Null; keys.len()];
    let mut answered = 0;
    while answered < keys.len() {
        let line = client.recv();
        let Some(i) = line.get("id").and_then(Value::as_u64) else {
            continue;
        };
        assert_eq!(line["event"], "message_sent", "send failed: {line}");
        acks[i as usize] = line["data"].clone();
        answered += 1;
    }
    acks
}

/// The broadcasts a client receives until (and without) the one carrying `last_key`.
pub fn broadcasts_until(client: &mut Client, last_key: &str) -> Vec<Value> {
    let mut seen = Vec::new();
    loop {
        let line = client.recv();
        if line["event"] != "message_sent" || line.get("id").is_some() {
            continue;
        }
        if line["data"]["client_msg_id"] == last_key {
            return seen;
        }
        seen.push(line["data"].clone());
    }
}

/// A token minted by the server's own `noomnim token USERNAME --ttl TTL` with this secret.
pub fn server_token(secret: &str, username: &str, ttl: u64) -> String {
    let output = Command::new(BINARY)
        .env_clear()
        .env("AUTH_SECRET", secret)
        .args(["token", username, "--ttl", &ttl.to_string()])
        .output()
        .expect("run noomnim token");
    assert!(output.status.success(), "noomnim token failed: {output:?}");
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// A JWT minted by PyJWT (an independent implementation, installed by tools/services.sh):
/// `claims` as JSON, signed with `secret` using `algorithm` ("none": unsigned).
pub fn pyjwt_token(claims: &Value, secret: &str, algorithm: &str) -> String {
    let python = std::env::var("NOOMNIM_TEST_PYTHON")
        .expect("NOOMNIM_TEST_PYTHON is not set: start tools/services.sh (bash .ci/run does)");
    let script = "import jwt, json, sys\n\
claims, secret, alg = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]\n\
print(jwt.encode(claims, None if alg == 'none' else secret, algorithm=alg))";
    let output = Command::new(python)
        .args(["-c", script, &claims.to_string(), secret, algorithm])
        .output()
        .expect("run PyJWT");
    assert!(output.status.success(), "PyJWT failed: {output:?}");
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A server started in this process through the library (`noomnim::start`), for tests that
/// need no signals, exit codes or process limits: no binary to spawn, no log to scrape.
/// Dropping it stops the event loop (gracefully, as SIGTERM would) and waits for it.
pub struct InProcess {
    pub addr: SocketAddr,
    stop: Arc<std::sync::atomic::AtomicBool>,
    waker: Arc<mio::Waker>,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl InProcess {
    pub fn start(storage: &Storage, extra: &[(&str, &str)]) -> InProcess {
        let mut env: std::collections::HashMap<String, String> =
            storage.env().into_iter().collect();
        env.insert("PORT".into(), "0".into());
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let config = noomnim::Config::from_map(&env).expect("configuration");
        // The server owns `Rc`s, so it is built on the thread that runs it; the address and
        // the stop handle come back over a channel.
        let (ready, started) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            let server = noomnim::start(config).expect("start in-process server");
            let addr = server.local_addr().expect("address");
            let (stop, waker) = server.stop_handle();
            let _ = ready.send((addr, stop, waker));
            server.run()
        });
        let (addr, stop, waker) = started
            .recv_timeout(Duration::from_secs(30))
            .expect("in-process server started");
        InProcess {
            addr,
            stop,
            waker,
            thread: Some(thread),
        }
    }

    pub fn connect(&self) -> Client {
        Client::connect(self.addr)
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = self.waker.wake();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One value from a server's `/metrics` page (the first sample named `name`).
pub fn metric(server: &Server, name: &str) -> Option<f64> {
    let addr = server.metrics_addr()?;
    let mut http = TcpStream::connect(&addr).ok()?;
    http.set_read_timeout(Some(REPLY_TIMEOUT)).ok()?;
    http.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").ok()?;
    let mut page = String::new();
    let _ = http.read_to_string(&mut page);
    page.lines()
        .find(|line| line.starts_with(name) && line[name.len()..].starts_with(' '))
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|value| value.parse().ok())
}

/// A TCP proxy in front of a Redis that can make its subscribers' connections go silent: the
/// connection stays open and every byte the client sends still reaches Redis, but nothing
/// Redis sends back reaches the client any more (the "link up, messages stopped" failure of
/// pub/sub relays). Connections opened after muting are not muted.
pub struct MutingProxy {
    port: u16,
    /// One flag per connection that has sent a SUBSCRIBE: set to mute it.
    subscribers: Arc<Mutex<Vec<Arc<AtomicBool>>>>,
}

impl MutingProxy {
    pub fn start(upstream: u16) -> MutingProxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("proxy listens");
        let port = listener.local_addr().expect("address").port();
        let subscribers: Arc<Mutex<Vec<Arc<AtomicBool>>>> = Arc::default();
        let registry = subscribers.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let muted = Arc::new(AtomicBool::new(false));
                let (client_in, server_out) = (client.try_clone(), server.try_clone());
                let (Ok(client_in), Ok(server_out)) = (client_in, server_out) else {
                    continue;
                };
                let registry = registry.clone();
                let flag = muted.clone();
                // Client → Redis: forwarded always; a SUBSCRIBE marks the connection.
                std::thread::spawn(move || {
                    pump(client_in, server_out, |bytes| {
                        if bytes
                            .windows(9)
                            .any(|w| w.eq_ignore_ascii_case(b"SUBSCRIBE"))
                        {
                            let mut known = registry.lock().unwrap_or_else(|e| e.into_inner());
                            if !known.iter().any(|f| Arc::ptr_eq(f, &flag)) {
                                known.push(flag.clone());
                            }
                        }
                        true
                    })
                });
                // Redis → client: dropped while muted.
                std::thread::spawn(move || {
                    pump(server, client, |_| !muted.load(Ordering::SeqCst));
                });
            }
        });
        MutingProxy { port, subscribers }
    }

    pub fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Silences every subscriber connection open now.
    pub fn mute_subscribers(&self) {
        let known = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        assert!(
            !known.is_empty(),
            "no subscriber has connected through the proxy"
        );
        for flag in known.iter() {
            flag.store(true, Ordering::SeqCst);
        }
    }
}

/// Copies `from` to `to` until either side closes; `pass` sees each chunk and says whether to
/// forward it.
fn pump(mut from: TcpStream, mut to: TcpStream, mut pass: impl FnMut(&[u8]) -> bool) {
    let mut buffer = [0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if pass(&buffer[..n]) && to.write_all(&buffer[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
    let _ = from.shutdown(std::net::Shutdown::Both);
}

/// Sends a request and returns its reply, passing over the unsolicited lines (activity,
/// devices, typing) that may arrive before it.
pub fn ask(client: &mut Client, event: &str, data: Value) -> Value {
    let id = json!(unique("ask"));
    client.send(&json!({"event": event, "data": data, "id": id}));
    loop {
        let line = client.recv();
        if line["id"] == id {
            return line;
        }
    }
}

/// The next line that is not a reply to a request (no `id`).
pub fn next_event(client: &mut Client) -> Value {
    loop {
        let line = client.recv();
        if line.get("id").is_none() {
            return line;
        }
    }
}

/// The next unsolicited line that is one of `events` (activity notices in between are
/// passed over).
pub fn next_of(client: &mut Client, events: &[&str]) -> Value {
    loop {
        let line = next_event(client);
        if events.iter().any(|e| line["event"] == *e) {
            return line;
        }
    }
}

/// What arrives within a short wait, for checking that nothing does. A ping is answered
/// after anything queued before it, so lines queued earlier are seen first.
pub fn nothing_pending(client: &mut Client) -> Vec<Value> {
    let id = json!("probe");
    client.send(&json!({"event": "ping", "id": id}));
    let mut extra = Vec::new();
    loop {
        let line = client.recv();
        if line["id"] == id {
            return extra;
        }
        extra.push(line);
    }
}

/// Two instances linked through the Redis at `redis_url` (`PEER_RELAY` = `relay`; `shared`
/// subscribes every channel from the start), each up and subscribed before it is returned.
pub fn peer_pair(
    storage: &Storage,
    redis_url: &str,
    relay: &str,
    nodes: [&str; 2],
) -> (Server, Server) {
    let start = |node: &str| {
        Server::start_with(
            storage,
            &[
                ("PEER", "true"),
                ("PEER_RELAY", relay),
                ("REDIS_URL", redis_url),
                ("NODE_ID", node),
                ("METRICS_PORT", "0"),
            ],
        )
    };
    let servers = (start(nodes[0]), start(nodes[1]));
    for server in [&servers.0, &servers.1] {
        assert!(server.logged("peer subscriber: connected"));
    }
    servers
}

/// A connection on protocol 3, logged in as `username`.
pub fn v3(server: &Server, username: &str) -> Client {
    let mut client = server.connect();
    let hello = ask(&mut client, "hello", json!({"protocol": 3}));
    assert_eq!(hello["data"]["protocol"], 3, "{hello}");
    let login = ask(&mut client, "find_user", json!({"username": username}));
    assert!(login["event"] == "user_created" || login["event"] == "user_found");
    client
}

/// `noomnim admin erase-user NAME` against `storage`, as an operator runs it.
pub fn erase_user(storage: &Storage, name: &str) -> std::process::Output {
    Command::new(BINARY)
        .args(["admin", "erase-user", name])
        .env_clear()
        .envs(storage.env())
        .output()
        .expect("run noomnim admin")
}
