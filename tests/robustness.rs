//! Bad input, framing edge cases, slow readers, limits, broadcast fan-out, restarts and process
//! behaviour (config errors, signals), against the real server.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{msg, ug, unique, Backend, Client, Server, Storage, BINARY};
use serde_json::{json, Value};

backend_tests!(
    bad_lines_get_errors_and_the_connection_goes_on,
    over_long_line_is_refused_and_the_rest_discarded,
    partial_and_batched_lines_are_framed,
    client_vanishing_mid_line_harms_no_one,
    slow_reader_is_dropped_without_stalling_others,
    connection_limit_is_enforced,
    broadcast_reaches_each_room_member_once,
    data_survives_a_restart,
    sigterm_shuts_down_cleanly,
);

fn code(reply: &Value) -> String {
    assert_eq!(reply["event"], "error", "expected error: {reply}");
    reply["data"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn bad_lines_get_errors_and_the_connection_goes_on(backend: Backend) {
    let storage = Storage::new(backend);
    let server = Server::start(&storage);
    let mut client = server.login("alice");
    let cases: &[(&[u8], &str)] = &[
        (b"{\"event\": \"ping\"", "bad_json"),
        (b"\xfe\xfd\x80", "bad_json"),
        (b"{\"event\":\"find_user\",\"data\":{\"username\":\"\xc3\x28\"}}", "bad_json"),
        (b"[1, 2, 3]", "bad_request"),
        (b"42", "bad_request"),
        (b"{\"data\":{}}", "bad_request"),
        (b"{\"event\":7}", "bad_request"),
        (b"{\"event\":\"teleport\",\"data\":{}}", "unknown_event"),
        (b"{\"event\":\"find_user\",\"data\":{\"username\":{\"$ne\":null}}}", "bad_request"),
        (b"{\"event\":\"create_group\",\"data\":{\"username\":\"alice\",\"group_name\":[\"g\"]}}", "bad_request"),
        (b"{\"event\":\"create_group\",\"data\":{\"username\":\"alice\"}}", "bad_request"),
        (b"{\"event\":\"create_group\",\"data\":[1]}", "bad_request"),
        (b"{\"event\":\"ping\",\"id\":[1]}", "bad_request"),
    ];
    for (line, expected) in cases {
        let mut bytes = line.to_vec();
        bytes.push(b'\n');
        client.send_raw(&bytes);
        assert_eq!(
            code(&client.recv()),
            *expected,
            "line {:?}",
            String::from_utf8_lossy(line)
        );
    }
    let long_name = "n".repeat(65);
    let reply = client.request("create_group", ug("alice", &long_name));
    assert_eq!(code(&reply), "bad_request");
    let reply = client.request("create_group", ug("alice", "tab\there"));
    assert_eq!(code(&reply), "bad_request");
    let listed = client.request("list_groups", json!({}));
    assert_eq!(
        listed["data"]["groups"],
        json!([]),
        "no bad request stored anything"
    );
    assert_eq!(client.request("ping", json!({}))["event"], "pong");
}

fn over_long_line_is_refused_and_the_rest_discarded(backend: Backend) {
    let storage = Storage::new(backend);
    let server = Server::start_with(&storage, &[("MAX_LINE_BYTES", "1024")]);
    let mut client = server.connect();
    let huge = format!("{{\"event\":\"ping\",\"id\":\"{}\"}}\n", "x".repeat(5000));
    client.send_raw(&huge.as_bytes()[..3000]);
    std::thread::sleep(Duration::from_millis(50));
    client.send_raw(&huge.as_bytes()[3000..]);
    let reply = client.recv();
    assert_eq!(code(&reply), "line_too_long");
    assert_eq!(
        client.request("ping", json!({}))["event"],
        "pong",
        "the connection goes on"
    );
    let exact = format!(
        "{{\"event\":\"ping\",\"id\":\"{}\"}}",
        "y".repeat(1024 - 24)
    );
    assert_eq!(exact.len(), 1024);
    client.send_raw(format!("{exact}\n").as_bytes());
    assert_eq!(
        client.recv()["event"],
        "pong",
        "a line of exactly MAX_LINE_BYTES is accepted"
    );
}

fn partial_and_batched_lines_are_framed(backend: Backend) {
    let storage = Storage::new(backend);
    let server = Server::start(&storage);
    let mut client = server.connect();
    for piece in [&b"{\"event\":"[..], b"\"ping\",", b"\"id\":1}\r", b"\n"] {
        client.send_raw(piece);
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(client.recv()["id"], 1);
    client.send_raw(b"\n\r\n{\"event\":\"ping\",\"id\":2}\n{\"event\":\"ping\",\"id\":3}\n\n{\"event\":\"ping\",\"id\":4}\n");
    for id in 2..=4 {
        assert_eq!(client.recv()["id"], id);
    }
}

fn client_vanishing_mid_line_harms_no_one(backend: Backend) {
    let storage = Storage::new(backend);
    let server = Server::start(&storage);
    for _ in 0..5 {
        let mut stream = TcpStream::connect(server.addr).expect("connect");
        stream
            .write_all(b"{\"event\":\"find_user\",\"data\":{\"usern")
            .expect("write");
    }
    let mut hit_and_run = TcpStream::connect(server.addr).expect("connect");
    hit_and_run
        .write_all(b"{\"event\":\"find_user\",\"data\":{\"username\":\"ghost\"}}\n")
        .expect("write");
    drop(hit_and_run);
    let mut client = server.login("alice");
    assert_eq!(client.request("ping", json!({}))["event"], "pong");
}

fn slow_reader_is_dropped_without_stalling_others(backend: Backend) {
    let storage = Storage::new(backend);
    let server = Server::start_with(&storage, &[("MAX_OUTPUT_BYTES", "65536")]);
    let group = unique("busy");
    let mut writer = server.login("writer");
    writer.request("create_group", ug("writer", &group));
    let mut slow = server.connect_small_window();
    slow.request("find_user", json!({"username": "slow"}));
    slow.request("join_group", ug("slow", &group));
    slow.request("enter_group", ug("slow", &group));
    slow.stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut fast = server.login("fast");
    fast.request("join_group", ug("fast", &group));
    fast.request("enter_group", ug("fast", &group));
    // 400 broadcasts of 3.9 KB (1.5 MB) overflow the kernel buffers (small on both sides) and
    // then the 64 KiB output bound.
    let text = "z".repeat(3900);
    let total = 400;
    let fast_reader = std::thread::spawn(move || {
        for seq in 1..=total {
            let line = fast.recv();
            assert_eq!(
                line["data"]["seq"], seq,
                "the fast reader gets everything in order"
            );
        }
    });
    for i in 0..total {
        writer
            .send(&json!({"event": "send_message", "data": msg("writer", &group, &text), "id": i}));
        if i % 20 == 19 {
            for _ in 0..20 {
                assert_eq!(writer.recv()["event"], "message_sent");
            }
        }
    }
    // Not stalled: the fast reader got all 400 in order, none later than the client's read
    // timeout after the one before (no wall-clock bound on the whole run, which on a loaded
    // machine or the slow MongoDB test server says nothing about the server).
    fast_reader.join().expect("fast reader");
    assert!(
        slow.closed_within(Duration::from_secs(10)),
        "the slow reader was dropped"
    );
    assert!(server.logged("MAX_OUTPUT_BYTES"), "the drop was logged");
}

fn connection_limit_is_enforced(backend: Backend) {
    let storage = Storage::new(backend);
    let server = Server::start_with(&storage, &[("MAX_CONNECTIONS", "3")]);
    let mut held: Vec<Client> = (0..3).map(|_| server.connect()).collect();
    for client in &mut held {
        assert_eq!(client.request("ping", json!({}))["event"], "pong");
    }
    let mut refused = server.connect();
    let reply = refused.recv();
    assert_eq!(code(&reply), "unavailable");
    assert!(refused.closed_within(Duration::from_secs(5)));
    drop(held.pop());
    std::thread::sleep(Duration::from_millis(200));
    let mut admitted = server.connect();
    assert_eq!(
        admitted.request("ping", json!({}))["event"],
        "pong",
        "a freed slot is reused"
    );
}

fn broadcast_reaches_each_room_member_once(backend: Backend) {
    let storage = Storage::new(backend);
    let server = Server::start(&storage);
    let group = unique("room");
    let names = ["u0", "u1", "u2", "u3"];
    let mut clients: Vec<Client> = names.iter().map(|name| server.login(name)).collect();
    clients[0].request("create_group", ug("u0", &group));
    for (client, name) in clients.iter_mut().zip(names) {
        client.request("join_group", ug(name, &group));
        client.request("enter_group", ug(name, &group));
    }
    let mut outsider = server.login("outsider");
    let per_sender = 10;
    for round in 0..per_sender {
        for (client, name) in clients.iter_mut().zip(names) {
            client.send(&json!({"event": "send_message", "data": msg(name, &group, &format!("{name}-{round}")), "id": round}));
        }
    }
    let total = per_sender * names.len();
    for (client, name) in clients.iter_mut().zip(names) {
        let mut seqs = Vec::new();
        let mut acks = 0;
        while seqs.len() < total {
            let line = client.recv();
            assert_eq!(line["event"], "message_sent", "{line}");
            let from_me = line["data"]["username"] == name;
            assert_eq!(
                line.get("id").is_some(),
                from_me,
                "only the sender's own copy carries the id: {line}"
            );
            acks += usize::from(from_me);
            seqs.push(line["data"]["seq"].as_u64().expect("seq"));
        }
        assert_eq!(acks, per_sender);
        assert_eq!(
            seqs,
            (1..=total as u64).collect::<Vec<_>>(),
            "{name} got every message once, in order"
        );
        assert_eq!(
            client.try_recv(Duration::from_millis(100)),
            None,
            "and nothing more"
        );
    }
    assert_eq!(
        outsider.try_recv(Duration::from_millis(100)),
        None,
        "not in the room, nothing"
    );
}

fn data_survives_a_restart(backend: Backend) {
    let storage = Storage::new(backend);
    let group = unique("kept");
    let user_id = {
        let mut server = Server::start(&storage);
        let mut alice = server.login("alice");
        let user = alice.request("find_user", json!({"username": "alice"}));
        alice.request("create_group", ug("alice", &group));
        for i in 1..=3 {
            alice.request("send_message", msg("alice", &group, &format!("before {i}")));
        }
        assert!(server.terminate().success());
        user["data"]["_id"].clone()
    };
    let server = Server::start(&storage);
    let mut alice = server.connect();
    let found = alice.request("find_user", json!({"username": "alice"}));
    assert_eq!(found["event"], "user_found");
    assert_eq!(found["data"]["_id"], user_id);
    assert_eq!(found["data"]["group_list"], json!([group]));
    let page = alice.request("fetch_messages", ug("alice", &group));
    assert_eq!(page["data"]["messages"].as_array().map(Vec::len), Some(3));
    assert_eq!(
        alice.request("send_message", msg("alice", &group, "after"))["data"]["seq"],
        4
    );
}

fn sigterm_shuts_down_cleanly(backend: Backend) {
    let storage = Storage::new(backend);
    let mut server = Server::start(&storage);
    let mut alice = server.login("alice");
    let group = unique("bye");
    alice.request("create_group", ug("alice", &group));
    for i in 0..20 {
        alice.send(&json!({"event": "send_message", "data": msg("alice", &group, "x"), "id": i}));
    }
    let status = server.terminate();
    assert_eq!(status.code(), Some(0), "log: {}", server.log_text());
    assert!(server.logged("stopped"), "log: {}", server.log_text());
}

/// Issue 12: every start-up failure names what failed (not "cannot listen" for everything),
/// in one log line, with exit code 2.
#[test]
fn start_up_failures_name_the_setting_and_exit_2() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let busy = taken.local_addr().expect("addr").port().to_string();
    let data = std::env::temp_dir().join(common::unique("startup"));
    std::fs::create_dir_all(&data).expect("dir");
    let blocker = data.join("not-a-dir");
    std::fs::write(&blocker, "a file where the data directory should be").expect("file");
    let data_dir = data.display().to_string();
    let blocked_dir = blocker.join("sub").display().to_string();
    let cases: [(&[(&str, &str)], &str); 4] = [
        (&[("PORT", &busy), ("DATA_DIR", &data_dir)], "(PORT/BIND)"),
        (
            &[
                ("PORT", "0"),
                ("METRICS_PORT", &busy),
                ("DATA_DIR", &data_dir),
            ],
            "METRICS_PORT",
        ),
        (
            &[("PORT", "0"), ("DATA_DIR", &blocked_dir)],
            "cannot open the store",
        ),
        (
            &[
                ("PORT", "0"),
                ("DATA_DIR", &data_dir),
                ("TLS_CERT", "/nonexistent/cert.pem"),
                ("TLS_KEY", "/nonexistent/key.pem"),
            ],
            "cannot start TLS",
        ),
    ];
    for (env, expected) in cases {
        let output = Command::new(BINARY)
            .env_clear()
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{env:?}: {stderr}");
        let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("[ERROR]")).collect();
        assert_eq!(errors.len(), 1, "one error line: {stderr}");
        assert!(errors[0].contains(expected), "{env:?}: {stderr}");
    }
    drop(taken);
    let _ = std::fs::remove_dir_all(data);
}

#[test]
fn bad_configuration_exits_2_with_one_line() {
    for (name, value) in [
        ("PORT", "seventy"),
        ("PEER", "true"),
        ("MAX_LINE_BYTES", "0"),
        ("LOG_LEVEL", "loud"),
        ("WRITE_DELAY_MS", "5000"),
        ("WRITE_DELAY_MS", "soon"),
    ] {
        let output = Command::new(BINARY)
            .env_clear()
            .env(name, value)
            .stdin(Stdio::null())
            .output()
            .expect("run");
        assert_eq!(output.status.code(), Some(2), "{name}={value}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
        assert!(
            stderr.contains(name) || stderr.contains("MONGODB_URI"),
            "{stderr}"
        );
    }
}

/// systemd/noomnim.env.example shows every variable `--help` lists, each with the default
/// `--help` gives (an example value only where there is no default: `(unset)` and the like).
#[test]
fn the_systemd_example_shows_every_variable_with_its_default() {
    let output = Command::new(BINARY).arg("--help").output().expect("run");
    let help = String::from_utf8_lossy(&output.stdout);
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/noomnim.env.example"
    ))
    .expect("example");
    for line in help.lines().filter(|l| l.starts_with("  ")) {
        let name = line.split_whitespace().next().unwrap_or_default();
        let default = line
            .rsplit_once("[default: ")
            .and_then(|(_, rest)| rest.strip_suffix(']'))
            .expect("a default");
        let shown = example
            .lines()
            .find_map(|l| l.strip_prefix(&format!("#{name}=")))
            .unwrap_or_else(|| panic!("the example does not show {name}"));
        if !default.starts_with('(') {
            assert_eq!(
                shown, default,
                "{name} is shown as {shown}, its default is {default}"
            );
        }
    }
}

#[test]
fn help_lists_every_variable() {
    let output = Command::new(BINARY).arg("--help").output().expect("run");
    assert!(output.status.success());
    let text = String::from_utf8_lossy(&output.stdout);
    // Every variable --help lists is in the README's table too.
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README");
    for line in text.lines().filter(|l| l.starts_with("  ")) {
        let name = line.split_whitespace().next().unwrap_or_default();
        assert!(
            readme.contains(&format!("| `{name}` |")),
            "README lacks {name}"
        );
    }
    for name in [
        "PORT",
        "BIND",
        "PEER",
        "REDIS_URL",
        "MONGODB_URI",
        "MONGODB_DB",
        "DATA_DIR",
        "MAX_LINE_BYTES",
        "MAX_OUTPUT_BYTES",
        "MAX_REPLY_BYTES",
        "MAX_GROUPS_PER_USER",
        "EMBEDDED_WAL_LIMIT_BYTES",
        "MAX_CONNECTIONS",
        "WORKERS",
        "LOG_LEVEL",
        "AUTH_SECRET",
        "AUTH_SECRET_FILE",
        "TLS_CERT",
        "TLS_KEY",
        "TLS_PORT",
        "PLAINTEXT",
    ] {
        assert!(text.contains(name), "--help lacks {name}");
    }
}
