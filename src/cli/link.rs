//! The cli's connection to a server: plain TCP or TLS (rustls, checked against `--ca` or the
//! system's usual roots given as a file), framed with the server's own `LineFramer`, requests
//! encoded with the server's own `encode_line`. One `Link` is one connection; `connect_and_login`
//! makes one and says `hello {protocol: 3}` and `find_user`.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use serde_json::value::RawValue;
use serde_json::{json, Value};

use super::Options;
use crate::framing::{Frame, LineFramer};
use crate::protocol::reply::encode_line;

/// Longest line the cli accepts from a server (a history page is at most `MAX_REPLY_BYTES`).
const MAX_LINE: usize = 16 << 20;

enum Stream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Stream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(tcp) => tcp,
            Stream::Tls(tls) => tls.get_ref(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(tcp) => tcp.read(buf),
            Stream::Tls(tls) => tls.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(tcp) => tcp.write(buf),
            Stream::Tls(tls) => tls.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(tcp) => tcp.flush(),
            Stream::Tls(tls) => tls.flush(),
        }
    }
}

/// One connection to the server.
pub struct Link {
    stream: Stream,
    framer: LineFramer,
    lines: std::collections::VecDeque<Value>,
    next_id: u64,
    /// The server said it closes this connection for a reason no reconnect can mend.
    ended_for_good: Option<String>,
}

/// What waiting for a line found.
pub enum Incoming {
    Line(Value),
    /// Nothing within the wait.
    Quiet,
}

impl Link {
    /// Connects (TLS when `--tls`), without logging in.
    pub fn connect(options: &Options) -> io::Result<Link> {
        let tcp = TcpStream::connect((options.host.as_str(), options.port))?;
        tcp.set_nodelay(true)?;
        let stream = if options.tls {
            let config = tls_config(options.ca.as_deref())?;
            let name = rustls::pki_types::ServerName::try_from(options.server_name().to_string())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            let connection =
                rustls::ClientConnection::new(Arc::new(config), name).map_err(io::Error::other)?;
            Stream::Tls(Box::new(rustls::StreamOwned::new(connection, tcp)))
        } else {
            Stream::Plain(tcp)
        };
        Ok(Link {
            stream,
            framer: LineFramer::new(MAX_LINE),
            lines: Default::default(),
            next_id: 1,
            ended_for_good: None,
        })
    }

    /// Connects, asks for protocol 3 and logs in as `--user` (with `--token` or a token minted
    /// from `--token-secret`). Returns the link and the login reply.
    pub fn connect_and_login(options: &Options) -> Result<(Link, Value), String> {
        let mut link = Link::connect(options)
            .map_err(|e| format!("cannot connect to {}:{}: {e}", options.host, options.port))?;
        let hello = link.call("hello", json!({"protocol": 3, "presence": options.present}))?;
        if hello["event"] != "hello" {
            return Err(format!("unexpected hello reply: {hello}"));
        }
        let mut login = json!({"username": options.user()?});
        if let Some(token) = options.token()? {
            login["token"] = json!(token);
        }
        let reply = link.call("find_user", login)?;
        match reply["event"].as_str() {
            Some("user_found" | "user_created") => Ok((link, reply)),
            _ => Err(format!("login refused: {}", describe_error(&reply))),
        }
    }

    /// Sends a request; returns its id.
    pub fn send(&mut self, event: &str, data: Value) -> io::Result<u64> {
        let id = self.next_id;
        self.next_id += 1;
        let raw = RawValue::from_string(id.to_string()).map_err(io::Error::other)?;
        self.stream
            .write_all(&encode_line(event, &data, Some(&raw)))?;
        self.stream.flush()?;
        Ok(id)
    }

    /// Sends a line as typed (`/raw`): it must be one JSON object.
    pub fn send_raw(&mut self, line: &str) -> io::Result<()> {
        self.stream.write_all(line.trim_end().as_bytes())?;
        self.stream.write_all(b"\n")?;
        self.stream.flush()
    }

    /// Sends a request and waits for its reply; lines before it are kept for `next`.
    pub fn call(&mut self, event: &str, data: Value) -> Result<Value, String> {
        let id = self
            .send(event, data)
            .map_err(|e| format!("send failed: {e}"))?;
        let mut skipped = Vec::new();
        let reply = loop {
            match self.next(None) {
                Ok(Incoming::Line(line)) if line["id"] == json!(id) => break line,
                Ok(Incoming::Line(line)) => skipped.push(line),
                Ok(Incoming::Quiet) => {}
                Err(e) => return Err(format!("connection lost: {e}")),
            }
        };
        // Unsolicited lines that came first stay first.
        for line in skipped.into_iter().rev() {
            self.lines.push_front(line);
        }
        Ok(reply)
    }

    /// Set once the server closed the connection for a reason that reconnecting must not
    /// undo (`closing account_erased`): what to tell the user.
    pub fn ended_for_good(&self) -> Option<&str> {
        self.ended_for_good.as_deref()
    }

    /// The next line from the server, waiting at most `wait` (`None`: until one comes). A
    /// closed connection is an `UnexpectedEof` error.
    pub fn next(&mut self, wait: Option<Duration>) -> io::Result<Incoming> {
        if let Some(line) = self.lines.pop_front() {
            return Ok(Incoming::Line(line));
        }
        self.stream.tcp().set_read_timeout(wait)?;
        let mut buffer = [0u8; 65536];
        loop {
            let read = match self.stream.read(&mut buffer) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(read) => read,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(Incoming::Quiet)
                }
                Err(e) => return Err(e),
            };
            let mut frames = Vec::new();
            self.framer.feed(&buffer[..read], &mut frames);
            for frame in frames {
                if let Frame::Line(bytes) = frame {
                    match serde_json::from_slice::<Value>(&bytes) {
                        Ok(value) => {
                            if let Some(reason) = final_closing(&value) {
                                self.ended_for_good = Some(reason);
                            }
                            self.lines.push_back(value)
                        }
                        Err(e) => log_bad_line(&bytes, &e),
                    }
                }
            }
            if let Some(line) = self.lines.pop_front() {
                return Ok(Incoming::Line(line));
            }
        }
    }
}

/// Why a `closing` line ends the account's use for good (a reconnect would log in again and,
/// for an erased account, register the name anew), or `None` for those a reconnect survives.
fn final_closing(line: &Value) -> Option<String> {
    (line["event"] == "closing" && line["data"]["code"] == "account_erased")
        .then(|| "this account was erased by an operator; not reconnecting".to_string())
}

fn log_bad_line(bytes: &[u8], error: &serde_json::Error) {
    eprintln!(
        "noomnim cli: ignoring a line that is not JSON ({error}): {}",
        String::from_utf8_lossy(bytes)
    );
}

/// A TLS client configuration trusting the certificates in `ca` (PEM).
fn tls_config(ca: Option<&std::path::Path>) -> io::Result<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let Some(ca) = ca else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "--tls needs --ca FILE: the PEM certificate(s) to trust",
        ));
    };
    let pem = std::fs::read(ca)?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        roots
            .add(cert)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// An error reply in a line: its code and text.
pub fn describe_error(reply: &Value) -> String {
    let data = &reply["data"];
    let code = data["code"]
        .as_str()
        .or(reply["event"].as_str())
        .unwrap_or("error");
    match data["Error"].as_str() {
        Some(text) => format!("{code}: {text}"),
        None => reply.to_string(),
    }
}
