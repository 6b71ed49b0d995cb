//! Operating the server: abuse limits, the metrics endpoint, and systemd readiness.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use common::{ug, unique, Backend, Server, Storage};
use serde_json::{json, Value};

fn code(reply: &Value) -> &str {
    reply["data"]["code"].as_str().unwrap_or_default()
}

#[test]
fn requests_over_the_rate_limit_get_rate_limited() {
    let storage = Storage::new(Backend::Embedded);
    let server = Server::start_with(&storage, &[("RATE_LIMIT", "5"), ("RATE_BURST", "5")]);
    let mut client = server.login("hasty");
    for id in 0..20 {
        client.send(&json!({"event": "list_groups", "data": {}, "id": id}));
    }
    let replies: Vec<Value> = (0..20).map(|_| client.recv()).collect();
    let limited: Vec<&Value> = replies
        .iter()
        .filter(|r| code(r) == "rate_limited")
        .collect();
    assert!(
        limited.len() >= 10,
        "most of a 20-request burst is refused: {replies:?}"
    );
    assert!(limited
        .iter()
        .all(|r| r["event"] == "error" && r.get("id").is_some()));
    assert_eq!(
        replies[0]["event"], "groups",
        "the burst allowance is served"
    );
    assert_eq!(
        client.request("ping", json!({}))["event"],
        "pong",
        "ping is never limited"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        client.request("list_groups", json!({}))["event"],
        "groups",
        "tokens refill"
    );
}

#[test]
fn connections_that_never_log_in_are_closed() {
    let storage = Storage::new(Backend::Embedded);
    let server = Server::start_with(&storage, &[("LOGIN_TIMEOUT_MS", "500")]);
    let mut idle = server.connect();
    let mut member = server.login("prompt");
    assert!(
        idle.closed_within(Duration::from_secs(5)),
        "the idle connection was closed"
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        member.request("ping", json!({}))["event"],
        "pong",
        "logged-in clients stay"
    );
}

#[test]
fn connections_per_ip_are_capped() {
    let storage = Storage::new(Backend::Embedded);
    let server = Server::start_with(&storage, &[("MAX_CONNECTIONS_PER_IP", "2")]);
    let mut first = server.connect();
    let mut second = server.connect();
    assert_eq!(first.request("ping", json!({}))["event"], "pong");
    assert_eq!(second.request("ping", json!({}))["event"], "pong");
    let mut third = server.connect();
    assert_eq!(code(&third.recv()), "unavailable");
    assert!(third.closed_within(Duration::from_secs(5)));
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut again = server.connect();
        if again.try_request_ping() {
            break;
        }
        assert!(Instant::now() < deadline, "a freed slot is usable again");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// GET `path` over plain HTTP/1.1 and return (status line, body).
fn http_get(addr: &str, path: &str) -> (String, String) {
    let mut stream = TcpStream::connect(addr).expect("connect metrics");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(stream, "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    let (head, body) = response.split_once("\r\n\r\n").expect("http response");
    (
        head.lines().next().unwrap_or_default().to_string(),
        body.to_string(),
    )
}

fn metric(body: &str, name: &str) -> f64 {
    body.lines()
        .find_map(|line| {
            line.strip_prefix(name)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("metric {name} missing in:\n{body}"))
}

#[test]
fn metrics_endpoint_serves_prometheus_text() {
    let storage = Storage::new(Backend::Embedded);
    let server = Server::start_with(&storage, &[("METRICS_PORT", "0")]);
    let addr = server.metrics_addr().expect("metrics address logged");
    let group = unique("metered");
    let mut alice = server.login("alice");
    alice.request("create_group", ug("alice", &group));
    alice.request("enter_group", ug("alice", &group));
    let mut bob = server.login("bob");
    bob.request("join_group", ug("bob", &group));
    bob.request("enter_group", ug("bob", &group));
    for i in 0..3 {
        let data = json!({"username": "alice", "group_name": group, "text": format!("m{i}")});
        assert_eq!(alice.request("send_message", data)["event"], "message_sent");
    }
    for _ in 0..3 {
        assert_eq!(bob.recv()["event"], "message_sent");
    }
    alice.send_raw(b"{not json\n");
    assert_eq!(code(&alice.recv()), "bad_json");
    let (status, body) = http_get(&addr, "/metrics");
    assert!(status.contains("200"), "{status}");
    assert_eq!(metric(&body, "noomnim_connections"), 2.0);
    assert_eq!(metric(&body, "noomnim_messages_stored_total"), 3.0);
    assert_eq!(
        metric(&body, "noomnim_messages_delivered_total"),
        6.0,
        "3 acks + 3 broadcasts"
    );
    assert_eq!(
        metric(&body, "noomnim_errors_total{code=\"bad_json\"}"),
        1.0
    );
    assert!(metric(&body, "noomnim_store_latency_seconds_count") >= 3.0);
    let (status, _) = http_get(&addr, "/other");
    assert!(status.contains("404"), "{status}");
    assert_eq!(alice.request("ping", json!({}))["event"], "pong");
}

#[test]
fn tells_systemd_when_ready_and_when_stopping() {
    let storage = Storage::new(Backend::Embedded);
    let socket_path = std::env::temp_dir().join(format!("{}.sock", unique("notify")));
    let receiver = UnixDatagram::bind(&socket_path).expect("bind notify socket");
    receiver
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let path = socket_path.display().to_string();
    let mut server = Server::start_with(&storage, &[("NOTIFY_SOCKET", &path)]);
    let mut buffer = [0u8; 256];
    let n = receiver.recv(&mut buffer).expect("READY=1 arrives");
    assert_eq!(&buffer[..n], b"READY=1");
    assert!(server.terminate().success());
    let n = receiver.recv(&mut buffer).expect("STOPPING=1 arrives");
    assert_eq!(&buffer[..n], b"STOPPING=1");
    let _ = std::fs::remove_file(&socket_path);
}

/// Started with a soft open-file limit of 64 (a shell default is often 1024, under the
/// default `MAX_CONNECTIONS`), the server raises it itself and serves every allowed client.
#[test]
fn a_low_open_file_limit_is_raised_to_fit_max_connections() {
    use std::os::unix::process::CommandExt;
    const CLIENTS: usize = 300;
    let storage = Storage::new(Backend::Embedded);
    let mut command = std::process::Command::new(common::BINARY);
    // SAFETY: only async-signal-safe libc calls run between fork and exec.
    unsafe {
        command.pre_exec(|| {
            let mut limit = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            limit.rlim_cur = 64;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut env = storage.env();
    env.push(("MAX_CONNECTIONS".into(), CLIENTS.to_string()));
    let server = Server::spawn_command(command, &env);
    assert!(
        server.logged("raised the open-file limit from 64"),
        "log: {}",
        server.log_text()
    );
    let mut clients: Vec<_> = (0..CLIENTS).map(|_| server.connect()).collect();
    for (i, client) in clients.iter_mut().enumerate() {
        let reply = client.request("ping", json!({}));
        assert_eq!(reply["event"], "pong", "client {i}: {reply}");
    }
}
