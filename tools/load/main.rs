//! `noomnim-load`: a load generator for Noomnim Chat (one mio thread, non-blocking sockets).
//!
//! It opens C connections (spread over one or more server addresses), logs them in, puts them in
//! G groups (every client enters its group's room), and has S of them send for T seconds, at full
//! speed (a window of unacknowledged sends each) or at a fixed total rate. Each text carries its
//! send time, so every delivery gives an end-to-end latency. It prints messages stored/s,
//! delivered/s, latency p50/p99/max, lost and duplicated deliveries, and the servers' RSS.
//!
//! Other modes: `--idle` (connect and log in, then report server memory per connection),
//! `--history N` (store N messages in a group, then time `enter_group`), and `--irc` (the same
//! storm spoken as IRC, to measure an IRC server on the same shape).
//!
//! `--tls CAFILE` speaks TLS (rustls, trusting that CA) to the servers' TLS ports, and
//! `--token-secret S` logs in with HS256 tokens minted by the server library's own
//! `noomnim::auth` (minted before the clock starts); the login round is timed either way
//! (`logins/s`).
//!
//! Example: `cargo run --release --bin noomnim-load -- --addr 127.0.0.1:7777 --clients 1000
//! --groups 10 --senders 50 --seconds 10 --server-pid $(pgrep -x noomnim)`

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

const USAGE: &str =
    "usage: noomnim-load [--addr HOST:PORT]... [--clients C] [--groups G] [--senders S]
       [--seconds T] [--rate MSGS_PER_SEC] [--window W] [--text-bytes N] [--tag NAME]
       [--server-pid PID]... [--idle] [--history N] [--enter-samples K] [--irc] [--client-msg-id]
       [--tls CAFILE] [--token-secret SECRET] [--v3-groups K] [--mention-every N]

--v3-groups K: every client speaks protocol 3 and is a member of K groups (its own room's and
K-1 more), so it also receives group_activity notices (counted apart, not as deliveries).
--mention-every N: every Nth message of each sender mentions another member of its group
(N=10: mentions on 10% of messages).
--irc speaks IRC instead (NICK/USER/JOIN, PRIVMSG to #channels, each message followed by a
PING whose PONG stands in for the ack), to measure an IRC server on the same shape.";

struct Args {
    addrs: Vec<SocketAddr>,
    clients: usize,
    groups: usize,
    senders: usize,
    seconds: f64,
    rate: Option<f64>,
    window: usize,
    text_bytes: usize,
    tag: String,
    server_pids: Vec<u32>,
    idle: bool,
    irc: bool,
    history: Option<u64>,
    enter_samples: usize,
    /// Give every message a unique `client_msg_id` (what a retrying client does).
    keyed: bool,
    /// Speak TLS, trusting the CA in this PEM file.
    tls_ca: Option<String>,
    /// Log in with tokens signed with this secret.
    token_secret: Option<String>,
    /// Protocol 3, each client a member of this many groups (0: protocol 2, one group).
    v3_groups: usize,
    /// Every this many messages of a sender mention a member of its group (0: none).
    mention_every: u64,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        addrs: Vec::new(),
        clients: 100,
        groups: 10,
        senders: 10,
        seconds: 10.0,
        rate: None,
        window: 8,
        text_bytes: 0,
        tag: format!("run{}", std::process::id()),
        server_pids: Vec::new(),
        idle: false,
        irc: false,
        history: None,
        enter_samples: 20,
        keyed: false,
        tls_ca: None,
        token_secret: None,
        v3_groups: 0,
        mention_every: 0,
    };
    let mut words = std::env::args().skip(1);
    while let Some(flag) = words.next() {
        let mut value = || words.next().ok_or(format!("{flag} needs a value\n{USAGE}"));
        let number = |text: String| {
            text.parse::<f64>()
                .map_err(|_| format!("{flag}: not a number: {text}"))
        };
        match flag.as_str() {
            "--addr" => args
                .addrs
                .push(value()?.parse().map_err(|e| format!("--addr: {e}"))?),
            "--clients" => args.clients = number(value()?)? as usize,
            "--groups" => args.groups = number(value()?)? as usize,
            "--senders" => args.senders = number(value()?)? as usize,
            "--seconds" => args.seconds = number(value()?)?,
            "--rate" => args.rate = Some(number(value()?)?),
            "--window" => args.window = number(value()?)? as usize,
            "--text-bytes" => args.text_bytes = number(value()?)? as usize,
            "--tag" => args.tag = value()?,
            "--server-pid" => args.server_pids.push(number(value()?)? as u32),
            "--idle" => args.idle = true,
            "--irc" => args.irc = true,
            "--client-msg-id" => args.keyed = true,
            "--v3-groups" => args.v3_groups = number(value()?)? as usize,
            "--mention-every" => args.mention_every = number(value()?)? as u64,
            "--tls" => args.tls_ca = Some(value()?),
            "--token-secret" => args.token_secret = Some(value()?),
            "--history" => args.history = Some(number(value()?)? as u64),
            "--enter-samples" => args.enter_samples = number(value()?)? as usize,
            "--help" | "-h" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown flag {other}\n{USAGE}")),
        }
    }
    if args.irc && args.history.is_some() {
        return Err("--history needs the Noomnim protocol, not --irc".to_string());
    }
    if args.addrs.is_empty() {
        args.addrs.push(SocketAddr::from(([127, 0, 0, 1], 7777)));
    }
    args.groups = args.groups.clamp(1, args.clients.max(1));
    args.senders = args.senders.min(args.clients);
    args.window = args.window.max(1);
    Ok(args)
}

/// One client connection.
/// A client socket, plain or TLS.
enum Stream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Stream {
    fn socket(&mut self) -> &mut TcpStream {
        match self {
            Stream::Plain(socket) => socket,
            Stream::Tls(stream) => &mut stream.sock,
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(socket) => socket.read(buffer),
            Stream::Tls(stream) => stream.read(buffer),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(socket) => socket.write(bytes),
            Stream::Tls(stream) => stream.write(bytes),
        }
    }

    /// Pushes out TLS records still sealed in the session (plain sockets hold nothing).
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(_) => Ok(()),
            Stream::Tls(stream) => {
                while stream.conn.wants_write() {
                    stream.conn.write_tls(&mut stream.sock)?;
                }
                Ok(())
            }
        }
    }
}

fn tls_config(ca_file: &str) -> io::Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca_file)
        .map_err(|e| io::Error::other(format!("--tls {ca_file}: {e}")))?
    {
        let cert = cert.map_err(|e| io::Error::other(format!("--tls {ca_file}: {e}")))?;
        roots.add(cert).map_err(io::Error::other)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(io::Error::other)?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

struct Client {
    stream: Stream,
    inbox: Vec<u8>,
    outbox: Vec<u8>,
    written: usize,
    group: usize,
    /// Replies (lines with an `id`) still expected.
    awaiting: usize,
    /// Per sender (by index): the last message number delivered here.
    last_from: Vec<u64>,
    sent: u64,
    next_send: Option<Instant>,
}

impl Client {
    fn queue(&mut self, line: &str) {
        self.outbox.extend_from_slice(line.as_bytes());
        self.outbox.push(b'\n');
        self.awaiting += 1;
    }

    fn flush(&mut self) -> io::Result<()> {
        while self.written < self.outbox.len() {
            match self.stream.write(&self.outbox[self.written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        match self.stream.flush() {
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => return Err(e),
            _ => {}
        }
        if self.written == self.outbox.len() {
            self.outbox.clear();
            self.written = 0;
        }
        Ok(())
    }

    /// Reads once into `buffer`: `Ok(None)` when nothing is there, else how many bytes.
    fn read_once(&mut self, buffer: &mut [u8]) -> io::Result<Option<usize>> {
        loop {
            return match self.stream.read(buffer) {
                Ok(0) => Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => Ok(Some(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => Err(e),
            };
        }
    }
}

/// The protocol spoken: Noomnim's JSON lines, or IRC for a comparison run.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Dialect {
    Json,
    Irc,
}

/// IRC: the token of the PING sent after each message (its PONG is the message's "ack").
const IRC_MESSAGE_PING: &str = "m";
/// How the PONG answering that PING ends: `... PONG server :m`.
const IRC_MESSAGE_PONG_END: &[u8] = b" :m";

impl Dialect {
    /// A reply to one of our requests. JSON replies end with the request's numeric `"id":N}`
    /// (broadcasts and id-less errors with the close of `data`); IRC ones are PONGs.
    fn is_reply(self, line: &[u8]) -> bool {
        match self {
            Dialect::Json => !line.ends_with(b"}}"),
            // Numeric 001 (welcome) ends registration, the first set-up round.
            Dialect::Irc => {
                find(line, b" PONG ").is_some()
                    || line.split(|&b| b == b' ').nth(1) == Some(&b"001"[..])
            }
        }
    }

    /// An error reply: JSON data starting with "Error"; an IRC 4xx/5xx numeric.
    fn is_error(self, line: &[u8]) -> bool {
        match self {
            Dialect::Json => find(&line[..line.len().min(64)], b"\"data\":{\"Error\"").is_some(),
            Dialect::Irc => {
                let mut words = line.split(|&b| b == b' ');
                let numeric = words.nth(1).unwrap_or_default();
                numeric.len() == 3 && matches!(numeric[0], b'4' | b'5')
            }
        }
    }

    /// Whether a reply acknowledges a sent message.
    fn acks_message(self, line: &[u8]) -> bool {
        match self {
            Dialect::Json => line.starts_with(b"{\"event\":\"message_sent\""),
            Dialect::Irc => line.ends_with(IRC_MESSAGE_PONG_END),
        }
    }

    /// What stands right before a delivered message's text.
    fn text_marker(self) -> &'static [u8] {
        match self {
            Dialect::Json => b"\"text\":\"t:",
            Dialect::Irc => b" :t:",
        }
    }

    fn message_line(
        self,
        tag: &str,
        sender: usize,
        group: usize,
        text: &str,
        client_msg_id: Option<&str>,
    ) -> String {
        let key = client_msg_id.map_or(String::new(), |id| format!(r#","client_msg_id":"{id}""#));
        match self {
            Dialect::Json => format!(
                r#"{{"event":"send_message","data":{{"username":"{tag}-u{sender}","group_name":"{tag}-g{group}","text":"{text}"{key}}},"id":1}}"#
            ),
            Dialect::Irc => {
                format!("PRIVMSG #{tag}-g{group} :{text}\r\nPING :{IRC_MESSAGE_PING}\r")
            }
        }
    }
}

/// What the run measured.
#[derive(Default)]
struct Tally {
    stored: u64,
    delivered: u64,
    duplicated: u64,
    errors: u64,
    latencies_us: Vec<u32>,
    first_error: Option<String>,
    /// CPU time (user + system) the servers used over the run, drain included.
    server_cpu_seconds: Option<f64>,
    /// CPU time this generator used over the same span: its own cost per delivery must stay
    /// well under the server's, or the run measures the generator.
    load_cpu_seconds: Option<f64>,
}

struct Load {
    dialect: Dialect,
    poll: Poll,
    clients: Vec<Client>,
    started: Instant,
    tally: Tally,
    buffer: Vec<u8>,
    measuring: bool,
    keyed: bool,
    /// Every this many messages mention a member (the one who joined the group first after
    /// its creator); and how many groups there are.
    mention: Option<(u64, usize)>,
}

/// Where `key` ends in `line`. The keys are a few constants: each gets its searcher built
/// once (building one costs more than searching a line).
fn find(line: &[u8], key: &'static [u8]) -> Option<usize> {
    thread_local! {
        static FINDERS: std::cell::RefCell<Vec<memchr::memmem::Finder<'static>>> =
            const { std::cell::RefCell::new(Vec::new()) };
    }
    FINDERS.with(|finders| {
        let mut finders = finders.borrow_mut();
        let at = match finders.iter().position(|f| f.needle() == key) {
            Some(at) => at,
            None => {
                finders.push(memchr::memmem::Finder::new(key));
                finders.len() - 1
            }
        };
        finders[at].find(line).map(|at| at + key.len())
    })
}

fn number_at(line: &[u8], at: usize) -> u64 {
    line[at..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .fold(0u64, |n, b| n * 10 + u64::from(b - b'0'))
}

impl Load {
    fn connect(args: &Args) -> io::Result<Load> {
        let poll = Poll::new()?;
        let mut clients = Vec::with_capacity(args.clients);
        let tls = args.tls_ca.as_deref().map(tls_config).transpose()?;
        for i in 0..args.clients {
            let socket = TcpStream::connect(args.addrs[i % args.addrs.len()])?;
            // Small request lines must not wait for Nagle's algorithm (or delayed ACKs).
            socket.set_nodelay(true)?;
            let mut stream = match &tls {
                Some(config) => {
                    let name = rustls::pki_types::ServerName::try_from("localhost")
                        .map_err(io::Error::other)?;
                    let session = rustls::ClientConnection::new(config.clone(), name)
                        .map_err(io::Error::other)?;
                    Stream::Tls(Box::new(rustls::StreamOwned::new(session, socket)))
                }
                None => Stream::Plain(socket),
            };
            poll.registry().register(
                stream.socket(),
                Token(i),
                Interest::READABLE | Interest::WRITABLE,
            )?;
            clients.push(Client {
                stream,
                inbox: Vec::new(),
                outbox: Vec::new(),
                written: 0,
                group: i % args.groups,
                awaiting: 0,
                last_from: Vec::new(),
                sent: 0,
                next_send: None,
            });
        }
        let dialect = if args.irc {
            Dialect::Irc
        } else {
            Dialect::Json
        };
        Ok(Load {
            dialect,
            poll,
            clients,
            started: Instant::now(),
            tally: Tally::default(),
            buffer: vec![0; 65536],
            measuring: false,
            keyed: args.keyed,
            mention: (args.mention_every > 0).then_some((args.mention_every, args.groups)),
        })
    }

    /// Runs the loop for at most `limit`, until `done` holds; sends due messages via `tick`.
    fn pump(
        &mut self,
        limit: Duration,
        mut tick: impl FnMut(&mut Load),
        done: impl Fn(&Load) -> bool,
    ) -> io::Result<()> {
        let mut events = Events::with_capacity(4096);
        let deadline = Instant::now() + limit;
        while !done(self) && Instant::now() < deadline {
            tick(self);
            self.poll
                .poll(&mut events, Some(Duration::from_millis(1)))?;
            let ready: Vec<(usize, bool)> = events
                .iter()
                .map(|e| (e.token().0, e.is_readable()))
                .collect();
            for (index, readable) in ready {
                if readable {
                    self.read_lines(index)?;
                }
                self.clients[index].flush()?;
            }
        }
        Ok(())
    }

    /// Reads what is there and handles every complete line. Lines are handled where they were
    /// read, in the read buffer: only a partial line at the end of a read is copied (to the
    /// client's inbox, completed by the next read). A read shorter than the buffer emptied the
    /// socket, so it needs no second, would-block read (the next arrival raises a new edge);
    /// over TLS a short read only means the session's plaintext ran out, so read on.
    fn read_lines(&mut self, index: usize) -> io::Result<()> {
        let mut buffer = std::mem::take(&mut self.buffer);
        let outcome = loop {
            let read = match self.clients[index].read_once(&mut buffer) {
                Ok(Some(read)) => read,
                Ok(None) => break Ok(()),
                Err(error) => break Err(error),
            };
            // One clock reading per read: every line in it arrived at the same moment.
            let now_us = self.started.elapsed().as_micros() as u64;
            self.take_lines(index, &buffer[..read], now_us);
            let plain = matches!(self.clients[index].stream, Stream::Plain(_));
            if read < buffer.len() && plain {
                break Ok(());
            }
        };
        self.buffer = buffer;
        outcome
    }

    /// Handles the complete lines of a read, the first one completing the client's partial
    /// line if it had one; keeps what is left as the new partial line.
    fn take_lines(&mut self, index: usize, mut chunk: &[u8], now_us: u64) {
        let mut inbox = std::mem::take(&mut self.clients[index].inbox);
        if !inbox.is_empty() {
            match memchr::memchr(b'\n', chunk) {
                Some(end) => {
                    inbox.extend_from_slice(&chunk[..=end]);
                    noomnim::framing::split_lines(&inbox, |line| self.on_line(index, line, now_us));
                    inbox.clear();
                    chunk = &chunk[end + 1..];
                }
                None => {
                    inbox.extend_from_slice(chunk);
                    chunk = &[];
                }
            }
        }
        let used = noomnim::framing::split_lines(chunk, |line| self.on_line(index, line, now_us));
        inbox.extend_from_slice(&chunk[used..]);
        self.clients[index].inbox = inbox;
    }

    fn on_line(&mut self, index: usize, line: &[u8], now_us: u64) {
        let dialect = self.dialect;
        let is_reply = dialect.is_reply(line);
        if is_reply {
            self.clients[index].awaiting = self.clients[index].awaiting.saturating_sub(1);
        }
        if dialect.is_error(line) {
            self.tally.errors += 1;
            self.tally
                .first_error
                .get_or_insert_with(|| String::from_utf8_lossy(line).into_owned());
            return;
        }
        if is_reply {
            if dialect.acks_message(line) {
                self.tally.stored += u64::from(self.measuring);
            }
            return;
        }
        let Some(at) = find(line, dialect.text_marker()) else {
            return;
        };
        let sent_us = number_at(line, at);
        let sender_at = at + line[at..].iter().position(|&b| b == b':').unwrap_or(0) + 1;
        let sender = number_at(line, sender_at) as usize;
        let n_at = sender_at
            + line[sender_at..]
                .iter()
                .position(|&b| b == b':')
                .unwrap_or(0)
            + 1;
        let n = number_at(line, n_at);
        let last_from = &mut self.clients[index].last_from;
        if last_from.len() <= sender {
            last_from.resize(sender + 1, 0);
        }
        if n <= last_from[sender] {
            self.tally.duplicated += 1;
            return;
        }
        last_from[sender] = n;
        self.tally.delivered += 1;
        if self.tally.latencies_us.len() < 20_000_000 {
            self.tally
                .latencies_us
                .push(now_us.saturating_sub(sent_us) as u32);
        }
    }

    /// Sends one request per chosen client and waits for all replies.
    fn round(
        &mut self,
        chosen: &[usize],
        line_for: impl Fn(usize, &Client) -> String,
    ) -> io::Result<()> {
        for &index in chosen {
            let line = line_for(index, &self.clients[index]);
            self.clients[index].queue(&line);
            self.clients[index].flush()?;
        }
        self.pump(
            Duration::from_secs(120),
            |_| {},
            |load| load.clients.iter().all(|c| c.awaiting == 0),
        )?;
        if self.clients.iter().any(|c| c.awaiting > 0) {
            return Err(io::Error::other("set-up requests timed out"));
        }
        if let Some(error) = &self.tally.first_error {
            return Err(io::Error::other(format!(
                "a set-up request failed: {error}"
            )));
        }
        Ok(())
    }

    fn set_up(&mut self, args: &Args) -> io::Result<()> {
        let all: Vec<usize> = (0..self.clients.len()).collect();
        let tag = &args.tag;
        if self.dialect == Dialect::Irc {
            // Registration first, until numeric 001: some servers (InspIRCd) finish it a moment
            // after NICK/USER and answer a JOIN or PING sent with them `451 not registered`.
            self.round(&all, |i, _| format!("NICK {tag}u{i}\r\nUSER u 0 * :u\r"))?;
            // Then the channel; the PONG comes after the JOIN's replies.
            self.round(&all, |_, c| {
                format!("JOIN #{tag}-g{}\r\nPING :ready\r", c.group)
            })?;
            self.tally = Tally::default();
            return Ok(());
        }
        // Tokens are minted before the clock starts: the server's cost is what is measured.
        let tokens: Vec<String> = match &args.token_secret {
            Some(secret) => {
                let auth = noomnim::auth::Authenticator::new(
                    &noomnim::auth::Secret::new(secret.as_bytes().to_vec()),
                    None,
                );
                all.iter()
                    .map(|i| auth.mint(&format!("{tag}-u{i}"), 3600))
                    .collect::<Result<_, _>>()
                    .map_err(io::Error::other)?
            }
            None => Vec::new(),
        };
        let cpu_before = total_cpu_seconds(&args.server_pids);
        let started = Instant::now();
        self.round(&all, |i, _| match tokens.get(i) {
            Some(token) => format!(
                r#"{{"event":"find_user","data":{{"username":"{tag}-u{i}","token":"{token}"}},"id":0}}"#
            ),
            None => format!(r#"{{"event":"find_user","data":{{"username":"{tag}-u{i}"}},"id":0}}"#),
        })?;
        let elapsed = started.elapsed().as_secs_f64();
        let cpu = total_cpu_seconds(&args.server_pids).zip(cpu_before).map_or(
            String::new(),
            |(after, before)| {
                format!(
                    " server_cpu_us_per_login={:.1}",
                    (after - before) * 1e6 / all.len().max(1) as f64
                )
            },
        );
        println!(
            "logins={} logins/s={:.0}{cpu}{}{}",
            all.len(),
            all.len() as f64 / elapsed,
            if tokens.is_empty() { "" } else { " (tokens)" },
            if args.tls_ca.is_some() { " (tls)" } else { "" },
        );
        let creators: Vec<usize> = (0..args.groups).collect();
        self.round(&creators, |i, c| {
            format!(r#"{{"event":"create_group","data":{{"username":"{tag}-u{i}","group_name":"{tag}-g{}"}},"id":0}}"#, c.group)
        })?;
        let joiners: Vec<usize> = (args.groups..self.clients.len()).collect();
        self.round(&joiners, |i, c| {
            format!(r#"{{"event":"join_group","data":{{"username":"{tag}-u{i}","group_name":"{tag}-g{}"}},"id":0}}"#, c.group)
        })?;
        if args.v3_groups > 0 {
            self.round(&all, |_, _| {
                r#"{"event":"hello","data":{"protocol":3},"id":0}"#.to_string()
            })?;
            let groups = args.groups;
            for k in 1..args.v3_groups.min(groups) {
                self.round(&all, |i, c| {
                    format!(r#"{{"event":"join_group","data":{{"username":"{tag}-u{i}","group_name":"{tag}-g{}"}},"id":0}}"#, (c.group + k) % groups)
                })?;
            }
        }
        self.round(&all, |i, c| {
            format!(r#"{{"event":"enter_group","data":{{"username":"{tag}-u{i}","group_name":"{tag}-g{}"}},"id":0}}"#, c.group)
        })?;
        self.tally = Tally::default();
        Ok(())
    }

    /// Queues the next message of sender `index`.
    fn send_next(&mut self, index: usize, tag: &str, padding: &str) {
        let now_us = self.started.elapsed().as_micros();
        let client = &mut self.clients[index];
        client.sent += 1;
        let text = format!("t:{now_us}:{index}:{}:{padding}", client.sent);
        let key = self
            .keyed
            .then(|| format!("{tag}-{index}-{}-{}", client.sent, std::process::id()));
        let mut line = self
            .dialect
            .message_line(tag, index, client.group, &text, key.as_deref());
        if let Some((every, groups)) = self.mention {
            if client.sent.is_multiple_of(every) {
                let mentioned =
                    format!(r#""mentions":["{tag}-u{}"],"text""#, groups + client.group);
                line = line.replacen(r#""text""#, &mentioned, 1);
            }
        }
        client.queue(&line);
    }

    fn storm(&mut self, args: &Args) -> io::Result<f64> {
        let padding = "x".repeat(args.text_bytes);
        let per_sender = args
            .rate
            .map(|rate| Duration::from_secs_f64(args.senders as f64 / rate.max(0.001)));
        let start = Instant::now();
        // Senders are spread evenly over one interval, so a fixed total rate arrives as a
        // steady stream, not as bursts of every sender at once.
        for index in 0..args.senders {
            let phase = per_sender.map_or(Duration::ZERO, |interval| {
                interval.mul_f64(index as f64 / args.senders as f64)
            });
            self.clients[index].next_send = Some(start + phase);
        }
        let run_for = Duration::from_secs_f64(args.seconds);
        self.measuring = true;
        let cpu_before = total_cpu_seconds(&args.server_pids);
        let own_cpu_before = cpu_seconds(std::process::id());
        let tag = args.tag.clone();
        let progress = Progress::new(args.seconds);
        self.pump(
            run_for,
            |load| {
                let now = Instant::now();
                progress.show(now.duration_since(start), load.tally.delivered);
                for index in 0..args.senders {
                    match per_sender {
                        None => {
                            while load.clients[index].awaiting < args.window {
                                load.send_next(index, &tag, &padding);
                            }
                        }
                        Some(interval) => {
                            while load.clients[index].next_send.is_some_and(|at| at <= now)
                                && load.clients[index].awaiting < 10_000
                            {
                                load.send_next(index, &tag, &padding);
                                load.clients[index].next_send =
                                    load.clients[index].next_send.map(|at| at + interval);
                            }
                        }
                    }
                    let _ = load.clients[index].flush();
                }
            },
            |_| false,
        )?;
        progress.done();
        let elapsed = start.elapsed().as_secs_f64();
        let stored_in_window = self.tally.stored;
        self.measuring = false;
        // Drain: wait for outstanding acks and the broadcasts they cause.
        let expected = |load: &Load| {
            let sent: u64 = load.clients[..args.senders].iter().map(|c| c.sent).sum();
            sent * (args.clients / args.groups).saturating_sub(1) as u64
        };
        let target = expected(self);
        self.pump(
            Duration::from_secs(30),
            |_| {},
            |load| load.clients.iter().all(|c| c.awaiting == 0) && load.tally.delivered >= target,
        )?;
        self.tally.stored = stored_in_window;
        // From the first send to the last delivery of the drain: all the work of the run.
        self.tally.server_cpu_seconds = total_cpu_seconds(&args.server_pids)
            .zip(cpu_before)
            .map(|(a, b)| a - b);
        self.tally.load_cpu_seconds = cpu_seconds(std::process::id())
            .zip(own_cpu_before)
            .map(|(a, b)| a - b);
        Ok(elapsed)
    }
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// A progress line on stderr while a run lasts, redrawn once a second, only when stderr is a
/// terminal (scripts and CI logs get just the report).
struct Progress {
    on: bool,
    seconds: f64,
    shown: std::cell::Cell<Option<Instant>>,
}

impl Progress {
    fn new(seconds: f64) -> Progress {
        use std::io::IsTerminal;
        Progress {
            on: std::io::stderr().is_terminal(),
            seconds,
            shown: std::cell::Cell::new(None),
        }
    }

    fn show(&self, elapsed: Duration, delivered: u64) {
        let now = Instant::now();
        if !self.on
            || self
                .shown
                .get()
                .is_some_and(|at| now.duration_since(at) < Duration::from_secs(1))
        {
            return;
        }
        self.shown.set(Some(now));
        eprint!(
            "\r  {:.0}/{:.0} s, {delivered} delivered so far ",
            elapsed.as_secs_f64().min(self.seconds),
            self.seconds
        );
    }

    fn done(&self) {
        if self.on {
            eprint!("\r{}\r", " ".repeat(60));
        }
    }
}

/// CPU seconds (user + system) a process has used, from /proc/PID/stat.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name (which may contain spaces): utime and stime
    // are fields 14 and 15 of the whole line, 12 and 13 after ") ".
    let rest = stat.rsplit_once(") ")?.1;
    let mut fields = rest.split_whitespace().skip(11);
    let ticks: u64 = fields.next()?.parse::<u64>().ok()? + fields.next()?.parse::<u64>().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (per_second > 0).then(|| ticks as f64 / per_second as f64)
}

fn total_cpu_seconds(pids: &[u32]) -> Option<f64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|&pid| cpu_seconds(pid)).sum()
}

fn total_rss(pids: &[u32]) -> Option<u64> {
    pids.iter().map(|&pid| rss_kib(pid)).sum()
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() - 1) as f64 * p).round() as usize;
    f64::from(sorted[index]) / 1000.0
}

fn report_storm(load: &mut Load, args: &Args, elapsed: f64) {
    let senders = &load.clients[..args.senders];
    let sent: u64 = senders.iter().map(|c| c.sent).sum();
    let members_per_group = (args.clients / args.groups) as u64;
    let expected = sent * members_per_group.saturating_sub(1);
    let lost = expected.saturating_sub(load.tally.delivered);
    let latencies = &mut load.tally.latencies_us;
    latencies.sort_unstable();
    println!(
        "clients={} groups={} senders={} seconds={:.1} rate={}",
        args.clients,
        args.groups,
        args.senders,
        elapsed,
        args.rate.map_or("full".to_string(), |r| format!("{r}/s"))
    );
    println!("stored/s={:.0}", load.tally.stored as f64 / elapsed);
    println!("delivered/s={:.0}", load.tally.delivered as f64 / elapsed);
    println!(
        "latency_ms p50={:.2} p99={:.2} max={:.2}",
        percentile(latencies, 0.5),
        percentile(latencies, 0.99),
        percentile(latencies, 1.0)
    );
    println!(
        "sent={sent} delivered={} expected={expected} lost={lost} duplicated={}",
        load.tally.delivered, load.tally.duplicated
    );
    println!(
        "errors={}{}",
        load.tally.errors,
        load.tally
            .first_error
            .as_ref()
            .map_or(String::new(), |e| format!(" first: {e}"))
    );
    if let Some(rss) = total_rss(&args.server_pids) {
        println!("server_rss_kib={rss}");
    }
    if let Some(cpu) = load.tally.server_cpu_seconds {
        let per_delivery = cpu * 1e6 / load.tally.delivered.max(1) as f64;
        println!("server_cpu_s={cpu:.2} server_cpu_us_per_delivery={per_delivery:.2}");
    }
    if let Some(cpu) = load.tally.load_cpu_seconds {
        let per_delivery = cpu * 1e6 / load.tally.delivered.max(1) as f64;
        println!("load_cpu_s={cpu:.2} load_cpu_us_per_delivery={per_delivery:.2}");
    }
}

fn run_history(load: &mut Load, args: &Args, count: u64) -> io::Result<()> {
    let tag = args.tag.clone();
    let padding = "x".repeat(args.text_bytes.max(40));
    let started = Instant::now();
    while load.clients[0].sent < count {
        while load.clients[0].awaiting < 64 && load.clients[0].sent < count {
            load.send_next(0, &tag, &padding);
        }
        load.clients[0].flush()?;
        load.pump(
            Duration::from_millis(50),
            |_| {},
            |l| l.clients[0].awaiting < 32,
        )?;
    }
    load.pump(
        Duration::from_secs(60),
        |_| {},
        |l| l.clients[0].awaiting == 0,
    )?;
    println!(
        "stored {count} messages in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let reader = if load.clients.len() > args.groups {
        args.groups
    } else {
        0
    };
    let mut samples = Vec::new();
    for _ in 0..args.enter_samples {
        let group = load.clients[reader].group;
        let line = format!(
            r#"{{"event":"enter_group","data":{{"username":"{tag}-u{reader}","group_name":"{tag}-g{group}"}},"id":2}}"#
        );
        let asked = Instant::now();
        load.clients[reader].queue(&line);
        load.clients[reader].flush()?;
        load.pump(
            Duration::from_secs(60),
            |_| {},
            |l| l.clients[reader].awaiting == 0,
        )?;
        samples.push(asked.elapsed().as_micros() as u32);
    }
    let first = f64::from(samples[0]) / 1000.0;
    samples.sort_unstable();
    println!(
        "enter_group_ms first={first:.2} p50={:.2} max={:.2} (samples={})",
        percentile(&samples, 0.5),
        percentile(&samples, 1.0),
        samples.len()
    );
    Ok(())
}

fn main() {
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("{message}");
            std::process::exit(2);
        }
    };
    let before = total_rss(&args.server_pids);
    let outcome = Load::connect(&args).and_then(|mut load| {
        load.set_up(&args)?;
        if args.idle {
            std::thread::sleep(Duration::from_millis(500));
            let after = total_rss(&args.server_pids);
            println!("idle logged-in connections={}", load.clients.len());
            if let (Some(before), Some(after)) = (before, after) {
                let per = (after.saturating_sub(before) * 1024) as f64 / load.clients.len() as f64;
                println!(
                    "server_rss_kib before={before} after={after} bytes_per_connection={per:.0}"
                );
            }
            return Ok(());
        }
        if let Some(count) = args.history {
            return run_history(&mut load, &args, count);
        }
        let elapsed = load.storm(&args)?;
        report_storm(&mut load, &args, elapsed);
        Ok(())
    });
    if let Err(error) = outcome {
        eprintln!("noomnim-load: {error}");
        std::process::exit(1);
    }
}
