//! TLS (issue 14): the same protocol over rustls on `TLS_PORT`, against certificates made at
//! test time with openssl. Clients: rustls (in-process, for live connections across a reload),
//! Python's `ssl` module and `openssl s_client`, as operators and client writers would use.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::{Backend, Server, Storage};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{json, Value};

/// A CA and a server certificate for localhost/127.0.0.1 signed by it, in `dir`.
struct Certificates {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run openssl");
    assert!(output.status.success(), "openssl {args:?}: {output:?}");
}

/// Sends `request` through `openssl s_client -quiet` (verifying the server against `ca`, as
/// localhost) and returns the first line it prints.
fn s_client_line(addr: &str, ca: &Path, request: &[u8]) -> String {
    let mut s_client = Command::new("openssl")
        .args([
            "s_client",
            "-quiet",
            "-verify_return_error",
            "-connect",
            addr,
        ])
        .arg("-CAfile")
        .arg(ca)
        .args(["-servername", "localhost"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl s_client");
    let mut stdin = s_client.stdin.take().expect("stdin");
    stdin.write_all(request).expect("write");
    let mut line = String::new();
    BufReader::new(s_client.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("s_client line");
    drop(stdin);
    let _ = s_client.kill();
    let _ = s_client.wait();
    line
}

fn make_certificates(dir: &Path, name: &str) -> Certificates {
    std::fs::create_dir_all(dir).expect("dir");
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let (ca_key, ca) = (format!("{name}-ca.key"), format!("{name}-ca.pem"));
    let (key, csr, cert) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.pem"),
    );
    let subject = format!("/CN=noomnim test CA {name}");
    let mut args = vec!["req", "-x509"];
    args.extend(ec);
    args.extend([
        "-keyout", &ca_key, "-out", &ca, "-days", "2", "-subj", &subject,
    ]);
    openssl(dir, &args);
    let mut args = vec!["req"];
    args.extend(ec);
    args.extend(["-keyout", &key, "-out", &csr, "-subj", "/CN=localhost"]);
    openssl(dir, &args);
    let ext = format!("{name}.ext");
    std::fs::write(
        dir.join(&ext),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
         keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .expect("ext file");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-out",
            &cert,
            "-days",
            "2",
            "-extfile",
            &ext,
        ],
    );
    Certificates {
        ca: dir.join(ca),
        cert: dir.join(cert),
        key: dir.join(key),
    }
}

/// A line client over rustls, trusting one CA.
struct TlsClient {
    stream: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
    pending: Vec<u8>,
}

fn client_config(ca: &Path) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("ca file") {
        roots.add(cert.expect("ca cert")).expect("add ca");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

impl TlsClient {
    /// Connects and completes the handshake (Err: the handshake failed).
    fn connect(addr: SocketAddr, ca: &Path) -> std::io::Result<TlsClient> {
        let tcp = TcpStream::connect(addr)?;
        tcp.set_read_timeout(Some(common::REPLY_TIMEOUT))?;
        let name = ServerName::try_from("localhost").expect("name");
        let connection = rustls::ClientConnection::new(client_config(ca), name)
            .map_err(std::io::Error::other)?;
        let mut stream = rustls::StreamOwned::new(connection, tcp);
        while stream.conn.is_handshaking() {
            stream.conn.complete_io(&mut stream.sock)?;
        }
        Ok(TlsClient {
            stream,
            pending: Vec::new(),
        })
    }

    fn request(&mut self, event: &str, data: Value) -> Value {
        let line = json!({"event": event, "data": data, "id": event});
        self.stream
            .write_all(format!("{line}\n").as_bytes())
            .expect("write");
        loop {
            let reply = self.recv();
            if reply["id"] == event {
                return reply;
            }
        }
    }

    fn recv(&mut self) -> Value {
        loop {
            if let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=end).collect();
                return serde_json::from_slice(&line).expect("json line");
            }
            let mut buffer = [0u8; 16384];
            let n = self.stream.read(&mut buffer).expect("read");
            assert!(n > 0, "server closed the TLS connection");
            self.pending.extend_from_slice(&buffer[..n]);
        }
    }
}

fn tls_server(storage: &Storage, certs: &Certificates, extra: &[(&str, &str)]) -> Server {
    let (cert, key) = (
        certs.cert.display().to_string(),
        certs.key.display().to_string(),
    );
    let mut env = vec![
        ("TLS_CERT", cert.as_str()),
        ("TLS_KEY", key.as_str()),
        ("TLS_PORT", "0"),
    ];
    env.extend_from_slice(extra);
    Server::start_with(storage, &env)
}

#[test]
fn the_same_protocol_over_tls_with_rustls_python_and_openssl_clients() {
    let dir = std::env::temp_dir().join(common::unique("tls"));
    let certs = make_certificates(&dir, "one");
    let storage = Storage::new(Backend::Embedded);
    let server = tls_server(&storage, &certs, &[]);
    let tls_addr = server.tls_addr().expect("TLS address in the log");

    let mut alice = TlsClient::connect(tls_addr, &certs.ca).expect("handshake");
    let hello = alice.request("hello", json!({}));
    assert_eq!(hello["data"]["tls"], true, "{hello}");
    assert_eq!(
        alice.request("find_user", json!({"username": "alice"}))["event"],
        "user_created"
    );
    let group = common::unique("tlsroom");
    alice.request("create_group", json!({"group_name": group}));
    alice.request("enter_group", json!({"group_name": group}));
    // A plaintext client in the same room sees a TLS client's message, and the reverse.
    let mut plain = server.login("bob");
    assert_eq!(plain.request("hello", json!({}))["data"]["tls"], false);
    plain.request("join_group", common::ug("bob", &group));
    plain.request("enter_group", common::ug("bob", &group));
    alice.request(
        "send_message",
        json!({"group_name": group, "text": "sealed"}),
    );
    assert_eq!(plain.recv()["data"]["text"], "sealed");
    plain.request("send_message", common::msg("bob", &group, "in the clear"));
    assert_eq!(alice.recv()["data"]["text"], "in the clear");

    // Python's ssl module, verifying the certificate against the CA.
    let script = r#"
import json, socket, ssl, sys
context = ssl.create_default_context(cafile=sys.argv[3])
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10) as raw:
    with context.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(b'{"event":"hello","id":1}\n{"event":"find_user","data":{"username":"carol"},"id":2}\n')
        data = b""
        while data.count(b"\n") < 2:
            chunk = tls.recv(65536)
            if not chunk:
                break
            data += chunk
        lines = [json.loads(l) for l in data.splitlines()]
        print(tls.version(), lines[0]["data"]["tls"], lines[1]["event"])
"#;
    let output = Command::new("python3")
        .args(["-c", script, "127.0.0.1", &tls_addr.port().to_string()])
        .arg(&certs.ca)
        .output()
        .expect("python3");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "python ssl client: {output:?}");
    assert!(stdout.contains("True user_created"), "{stdout}");
    assert!(stdout.starts_with("TLSv1.3"), "{stdout}");

    // TLS 1.2 is offered too.
    let tls12 = script.replace(
        "context = ssl.create_default_context(cafile=sys.argv[3])",
        "context = ssl.create_default_context(cafile=sys.argv[3]); context.maximum_version = ssl.TLSVersion.TLSv1_2",
    ).replace("carol", "dave");
    let output = Command::new("python3")
        .args(["-c", &tls12, "127.0.0.1", &tls_addr.port().to_string()])
        .arg(&certs.ca)
        .output()
        .expect("python3");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.starts_with("TLSv1.2 True user_created"),
        "{output:?}"
    );

    // openssl s_client -quiet, as the README shows for people at a terminal.
    let line = s_client_line(
        &tls_addr.to_string(),
        &certs.ca,
        b"{\"event\":\"ping\",\"id\":\"tty\"}\n",
    );
    assert!(
        line.contains("\"pong\"") && line.contains("\"tty\""),
        "{line}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn sighup_reloads_the_certificate_without_dropping_connections() {
    let dir = std::env::temp_dir().join(common::unique("reload"));
    let first = make_certificates(&dir, "first");
    let second = make_certificates(&dir, "second");
    let live = dir.join("live");
    std::fs::create_dir_all(&live).expect("dir");
    let files = Certificates {
        ca: first.ca.clone(),
        cert: live.join("cert.pem"),
        key: live.join("key.pem"),
    };
    std::fs::copy(&first.cert, &files.cert).expect("copy");
    std::fs::copy(&first.key, &files.key).expect("copy");
    let storage = Storage::new(Backend::Embedded);
    let server = tls_server(&storage, &files, &[]);
    let addr = server.tls_addr().expect("tls");
    let mut before = TlsClient::connect(addr, &first.ca).expect("first handshake");
    before.request("find_user", json!({"username": "alice"}));

    std::fs::copy(&second.cert, &files.cert).expect("copy");
    std::fs::copy(&second.key, &files.key).expect("copy");
    common::signal(server.child.id(), "HUP");
    assert!(
        server.logged("TLS certificate reloaded"),
        "{}",
        server.log_text()
    );
    // The connection made before the reload goes on; new ones get the new certificate.
    assert_eq!(before.request("ping", json!({}))["event"], "pong");
    let mut after = TlsClient::connect(addr, &second.ca).expect("new certificate");
    assert_eq!(after.request("ping", json!({}))["event"], "pong");
    assert!(
        TlsClient::connect(addr, &first.ca).is_err(),
        "new handshakes no longer present the old certificate"
    );

    // A bad pair (key of another certificate, then garbage) is refused and the old one kept.
    std::fs::copy(&first.key, &files.key).expect("copy");
    common::signal(server.child.id(), "HUP");
    assert!(
        server.logged("new TLS certificate refused"),
        "{}",
        server.log_text()
    );
    std::fs::write(&files.cert, "not a certificate").expect("write");
    common::signal(server.child.id(), "HUP");
    let mut still = TlsClient::connect(addr, &second.ca).expect("old pair kept");
    assert_eq!(still.request("ping", json!({}))["event"], "pong");
    assert_eq!(before.request("ping", json!({}))["event"], "pong");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn wrong_protocols_and_stalled_handshakes_are_closed_without_harm() {
    let dir = std::env::temp_dir().join(common::unique("tlsbad"));
    let certs = make_certificates(&dir, "bad");
    let storage = Storage::new(Backend::Embedded);
    let server = tls_server(&storage, &certs, &[("LOGIN_TIMEOUT_MS", "1000")]);
    let tls_addr = server.tls_addr().expect("tls");
    let mut bystander = TlsClient::connect(tls_addr, &certs.ca).expect("handshake");
    bystander.request("find_user", json!({"username": "bystander"}));

    // Plain JSON to the TLS port: closed.
    let mut plain = common::Client::connect(tls_addr);
    plain.send_raw(b"{\"event\":\"hello\",\"id\":1}\n");
    assert!(
        plain.closed_within(Duration::from_secs(10)),
        "plain text on the TLS port"
    );
    // Random bytes shaped like a TLS record header, then junk.
    let mut junk = TcpStream::connect(tls_addr).expect("connect");
    junk.write_all(&[0x16, 0x03, 0x01, 0x40, 0x00])
        .expect("write");
    junk.write_all(&[0xAB; 300]).expect("write");
    // A TLS client on the plaintext port fails its handshake; the server goes on.
    assert!(TlsClient::connect(server.addr, &certs.ca).is_err());
    // A handshake never finished is closed after LOGIN_TIMEOUT_MS.
    let mut stalled = common::Client::connect(tls_addr);
    stalled.send_raw(&[0x16, 0x03, 0x01]);
    assert!(
        stalled.closed_within(Duration::from_secs(10)),
        "stalled handshake"
    );
    let mut silent = common::Client::connect(tls_addr);
    assert!(
        silent.closed_within(Duration::from_secs(10)),
        "silent client"
    );

    assert_eq!(bystander.request("ping", json!({}))["event"], "pong");
    assert!(server.connect().try_request_ping());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn plaintext_false_serves_tls_only_and_bad_pairs_stop_start_up() {
    let dir = std::env::temp_dir().join(common::unique("tlsonly"));
    let certs = make_certificates(&dir, "only");
    let storage = Storage::new(Backend::Embedded);
    let server = tls_server(&storage, &certs, &[("PLAINTEXT", "false")]);
    assert!(
        server.ready_line.contains("(TLS only)"),
        "{}",
        server.ready_line
    );
    let addr = server.tls_addr().expect("tls");
    let mut client = TlsClient::connect(addr, &certs.ca).expect("handshake");
    assert_eq!(client.request("ping", json!({}))["event"], "pong");

    // A store of its own: the running server holds `storage`'s.
    let elsewhere = Storage::new(Backend::Embedded);
    let mut env = elsewhere.env();
    env.push(("TLS_CERT".into(), certs.cert.display().to_string()));
    env.push(("TLS_KEY".into(), certs.ca.display().to_string()));
    let output = Command::new(common::BINARY)
        .env_clear()
        .envs(env)
        .env("PORT", "0")
        .env("TLS_PORT", "0")
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot start TLS") && stderr.contains("TLS_KEY"),
        "{stderr}"
    );
    let alone = Command::new(common::BINARY)
        .env_clear()
        .env("PLAINTEXT", "false")
        .output()
        .expect("run");
    assert_eq!(alone.status.code(), Some(2));
    let _ = std::fs::remove_dir_all(dir);
}

/// Peer mode with TLS and tokens on every instance: TLS clients on two instances share a room.
#[test]
fn peers_relay_between_tls_clients_with_tokens() {
    let dir = std::env::temp_dir().join(common::unique("tlspeers"));
    let certs = make_certificates(&dir, "peers");
    let storage = Storage::new(Backend::Mongo);
    let redis = common::LocalService::redis();
    let secret = "peer-secret-0123456789-0123456789";
    let start = |node: &str| {
        tls_server(
            &storage,
            &certs,
            &[
                ("PEER", "true"),
                ("REDIS_URL", &redis.redis_url()),
                ("NODE_ID", node),
                ("AUTH_SECRET", secret),
                ("PLAINTEXT", "false"),
            ],
        )
    };
    let (a, b) = (start("tls_a"), start("tls_b"));
    for server in [&a, &b] {
        assert!(server.logged("peer subscriber: connected"));
    }
    let group = common::unique("tlspeers");
    let login = |server: &Server, name: &str| {
        let mut client =
            TlsClient::connect(server.tls_addr().expect("tls"), &certs.ca).expect("handshake");
        let token = common::server_token(secret, name, 60);
        let reply = client.request("find_user", json!({"username": name, "token": token}));
        assert_eq!(reply["event"], "user_created", "{reply}");
        client
    };
    let mut alice = login(&a, "alice");
    alice.request("create_group", json!({"group_name": group}));
    alice.request("enter_group", json!({"group_name": group}));
    let mut bob = login(&b, "bob");
    bob.request("join_group", json!({"group_name": group}));
    bob.request("enter_group", json!({"group_name": group}));
    bob.request(
        "send_message",
        json!({"group_name": group, "text": "from b"}),
    );
    assert_eq!(alice.recv()["data"]["text"], "from b");
    alice.request(
        "send_message",
        json!({"group_name": group, "text": "from a"}),
    );
    assert_eq!(bob.recv()["data"]["text"], "from a");
    let _ = std::fs::remove_dir_all(dir);
}

/// Issue 26 item 1: `noomnim cli` over TLS (`--tls --ca`) with a token it mints itself from
/// `--token-secret`; a wrong secret is refused at login.
#[test]
fn noomnim_cli_speaks_tls_with_a_minted_token() {
    let dir = std::env::temp_dir().join(common::unique("cli-tls"));
    let certs = make_certificates(&dir, "cli");
    let storage = Storage::new(Backend::Embedded);
    let secret = "a-test-secret-of-at-least-32-bytes-long";
    let server = tls_server(&storage, &certs, &[("AUTH_SECRET", secret)]);
    let port = server.tls_addr().expect("tls listener").port().to_string();
    let ca = certs.ca.display().to_string();
    let cli = |extra: &[&str]| {
        Command::new(common::BINARY)
            .args([
                "cli", "--tls", "--ca", &ca, "--port", &port, "--user", "tls-user",
            ])
            .args(extra)
            .output()
            .expect("run noomnim cli")
    };
    let ping = cli(&["ping", "--count", "2"]);
    assert!(ping.status.success(), "{ping:?}");
    // Logged in (the token was accepted), then refused for the group: exit 1 with the code.
    let logged_in = cli(&["--token-secret", secret, "send", "nowhere", "hi"]);
    assert_eq!(logged_in.status.code(), Some(1), "{logged_in:?}");
    assert!(
        String::from_utf8_lossy(&logged_in.stderr).contains("group_not_found"),
        "{logged_in:?}"
    );
    let wrong = cli(&[
        "--token-secret",
        "another-secret-that-is-also-32-bytes!",
        "send",
        "g",
        "hi",
    ]);
    assert_eq!(wrong.status.code(), Some(1), "{wrong:?}");
    assert!(
        String::from_utf8_lossy(&wrong.stderr).contains("unauthorized"),
        "{wrong:?}"
    );
    let untrusted = Command::new(common::BINARY)
        .args(["cli", "--tls", "--port", &port, "--user", "u", "ping"])
        .output()
        .expect("run");
    assert_eq!(
        untrusted.status.code(),
        Some(1),
        "--tls without --ca is refused: {untrusted:?}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// Issue 35 item 4: the README's self-signed recipe made a CA certificate, which `noomnim cli
/// --tls --ca cert.pem` refused (`CaUsedAsEndEntity`). Runs the README's own line, then the cli,
/// Python's `ssl` and `openssl s_client` against a server using the pair.
#[test]
fn the_readmes_self_signed_recipe_works_with_every_client() {
    let readme = include_str!("../README.md");
    let recipe = readme
        .lines()
        .find(|line| line.starts_with("`openssl req -x509"))
        .expect("the README's recipe line")
        .trim_matches('`');
    let dir = std::env::temp_dir().join(common::unique("readme-tls"));
    std::fs::create_dir_all(&dir).expect("dir");
    let made = Command::new("sh")
        .current_dir(&dir)
        .args(["-c", recipe])
        .output()
        .expect("run the recipe");
    assert!(made.status.success(), "{made:?}");
    let certs = Certificates {
        ca: dir.join("cert.pem"),
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    };
    let storage = Storage::new(Backend::Embedded);
    let server = tls_server(&storage, &certs, &[]);
    let port = server.tls_addr().expect("tls listener").port().to_string();
    let ca = certs.ca.display().to_string();
    let cli = Command::new(common::BINARY)
        .args([
            "cli", "--tls", "--ca", &ca, "--port", &port, "--user", "readme",
        ])
        .args(["ping", "--count", "1"])
        .output()
        .expect("run noomnim cli");
    assert!(cli.status.success(), "the cli trusts the pair: {cli:?}");
    let python = Command::new("python3")
        .args([
            "-c",
            "import socket, ssl, sys\n\
             context = ssl.create_default_context(cafile=sys.argv[2])\n\
             with socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=10) as raw:\n\
             \x20   with context.wrap_socket(raw, server_hostname='localhost') as tls:\n\
             \x20       tls.sendall(b'{\"event\":\"ping\"}\\n')\n\
             \x20       print(tls.recv(4096).decode())",
            &port,
            &ca,
        ])
        .output()
        .expect("python3");
    assert!(
        String::from_utf8_lossy(&python.stdout).contains("pong"),
        "python ssl trusts the pair: {python:?}"
    );
    let line = s_client_line(
        &format!("127.0.0.1:{port}"),
        &certs.ca,
        b"{\"event\":\"ping\"}\n",
    );
    assert!(
        line.contains("pong"),
        "openssl s_client verifies the pair: {line}"
    );
    let _ = std::fs::remove_dir_all(dir);
}
