//! Protocol v2 additions, against the real server: the `hello` handshake, one error shape
//! (`code` on every failure), `closing` before every server-initiated close, and people typing
//! at `telnet`.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::{ug, unique, Backend, Server, Storage};
use serde_json::{json, Value};

backend_tests!(
    seed_errors_carry_their_event_name_as_code,
    read_state_by_seq_with_mark_read_and_my_groups,
    a_client_msg_id_is_stored_once_across_reconnects_and_connections,
    list_groups_pages_with_member_counts,
    pipelined_requests_are_answered_in_order_and_see_each_other
);

#[test]
fn hello_reports_the_running_configuration() {
    let storage = Storage::new(Backend::Embedded);
    let server = Server::start_with(
        &storage,
        &[
            ("MAX_LINE_BYTES", "4096"),
            ("RATE_LIMIT", "7"),
            ("IDLE_TIMEOUT_MS", "90000"),
            ("WRITE_DELAY_MS", "25"),
            ("NODE_ID", "node-x"),
        ],
    );
    let mut client = server.connect();
    let hello = client.request("hello", json!({}));
    assert_eq!(hello["event"], "hello", "{hello}");
    let data = &hello["data"];
    assert_eq!(data["server"], "noomnim");
    assert_eq!(data["protocol"], 2);
    assert_eq!(data["node_id"], "node-x");
    assert_eq!(data["auth"], "none");
    assert_eq!(data["tls"], false);
    assert!(data["version"].is_string());
    let events: Vec<&str> = data["events"]
        .as_array()
        .map(|e| e.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    for event in [
        "hello",
        "find_user",
        "send_message",
        "fetch_messages",
        "ping",
    ] {
        assert!(events.contains(&event), "{event} listed: {events:?}");
    }
    let limits = &data["limits"];
    assert_eq!(limits["max_line_bytes"], 4096);
    assert_eq!(limits["rate_limit"], 7.0);
    assert_eq!(limits["idle_timeout_ms"], 90000);
    assert_eq!(limits["keepalive_hint_ms"], 45000);
    assert_eq!(limits["write_delay_ms"], 25);
    assert_eq!(limits["max_text_chars"], 4000);
    assert_eq!(limits["max_name_chars"], 64);
    assert_eq!(limits["fetch_limit_max"], 100);
    assert_eq!(limits["max_reply_bytes"], 1 << 20);
    assert_eq!(limits["login_timeout_ms"], 30000);
    assert!(limits["max_output_bytes"].is_u64() && limits["rate_burst"].is_number());
    // hello needs no login and changes nothing: the connection can still log in.
    let login = client.request("find_user", json!({"username": "after_hello"}));
    assert_eq!(login["event"], "user_created");
}

#[test]
fn unknown_events_list_the_known_ones() {
    let storage = Storage::new(Backend::Embedded);
    let server = Server::start(&storage);
    let mut client = server.connect();
    let reply = client.request("teleport", json!({}));
    assert_eq!(reply["data"]["code"], "unknown_event");
    assert!(
        reply["data"]["events"]
            .as_array()
            .is_some_and(|events| events.contains(&json!("hello"))),
        "{reply}"
    );
}

fn seed_errors_carry_their_event_name_as_code(backend: Backend) {
    let storage = Storage::new(backend);
    let server = Server::start(&storage);
    let mut alice = server.login("alice");
    let group = unique("codes");
    alice.request("create_group", ug("alice", &group));
    let cases = [
        ("create_group", ug("alice", &group), "group_already_created"),
        (
            "join_group",
            ug("alice", "no-such-group"),
            "group_not_found",
        ),
    ];
    for (event, data, expected) in cases {
        let reply = alice.request(event, data);
        assert_eq!(reply["event"], expected, "{reply}");
        assert_eq!(reply["data"]["code"], expected, "{reply}");
    }
    alice.request("visit_group", ug("alice", &group));
    let reply = alice.request("visit_group", ug("alice", &group));
    assert_eq!(reply["event"], "already_in_the_group");
    assert_eq!(
        reply["data"],
        json!({"Error": "User is already in selected chatroom.", "code": "already_in_the_group"})
    );
    let mut bob = server.login("bob");
    let reply = bob.request("enter_group", ug("bob", &group));
    assert_eq!(reply["event"], "not_a_member");
    assert_eq!(reply["data"]["code"], "not_a_member");
}

/// The `closing` line a connection gets before the server closes it, then the close.
fn closing_code(client: &mut common::Client) -> String {
    loop {
        match client.recv_or_closed() {
            Some(line) if line["event"] == "closing" => {
                let code = line["data"]["code"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                assert!(line["data"]["Error"].is_string(), "{line}");
                assert!(client.recv_or_closed().is_none(), "closed after closing");
                return code;
            }
            Some(_) => continue,
            None => panic!("closed without a closing line"),
        }
    }
}

#[test]
fn login_and_idle_timeouts_are_announced() {
    let storage = Storage::new(Backend::Embedded);
    let server = Server::start_with(
        &storage,
        &[("LOGIN_TIMEOUT_MS", "1000"), ("IDLE_TIMEOUT_MS", "2500")],
    );
    let mut anonymous = server.connect();
    assert_eq!(closing_code(&mut anonymous), "login_timeout");
    let mut idle = server.login("idler");
    assert_eq!(closing_code(&mut idle), "idle_timeout");
}

#[test]
fn shutdown_is_announced() {
    let storage = Storage::new(Backend::Embedded);
    let mut server = Server::start(&storage);
    let mut client = server.login("stayer");
    assert!(client.try_request_ping());
    assert!(server.terminate().success());
    assert_eq!(closing_code(&mut client), "shutdown");
}

#[test]
fn a_slow_consumer_is_told_why_it_is_cut_off() {
    let storage = Storage::new(Backend::Embedded);
    let server = Server::start_with(
        &storage,
        &[("MAX_OUTPUT_BYTES", "65536"), ("RATE_LIMIT", "0")],
    );
    let group = unique("slow");
    let mut alice = server.login("alice");
    alice.request("create_group", ug("alice", &group));
    let mut slow = server.connect_small_window();
    slow.request("find_user", json!({"username": "slow"}));
    slow.request("join_group", ug("slow", &group));
    slow.request("enter_group", ug("slow", &group));
    let text = "s".repeat(2000);
    let sender = std::thread::spawn(move || {
        for sent in 0..2000 {
            alice.send(&json!({"event": "send_message", "data": common::msg("alice", &group, &text), "id": sent}));
            if sent % 50 == 49 {
                for _ in 0..50 {
                    assert_eq!(alice.recv()["event"], "message_sent");
                }
            }
        }
    });
    // A reader that does not keep up (here: does not read at all until the server decided to
    // cut it off, so the test does not depend on relative speeds), then reads to the end.
    assert!(
        server.logged("over MAX_OUTPUT_BYTES unread"),
        "the slow consumer was never cut off"
    );
    let code = loop {
        match slow.recv_or_closed() {
            Some(line) if line["event"] == "closing" => {
                assert!(slow.recv_or_closed().is_none(), "closed after closing");
                break line["data"]["code"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
            }
            Some(line) => assert_eq!(line["event"], "message_sent", "{line}"),
            None => panic!("closed without a closing line"),
        }
    };
    assert_eq!(code, "slow_consumer");
    sender.join().expect("sender");
}

#[test]
fn telnet_negotiation_is_refused_and_plain_text_gets_help() {
    let storage = Storage::new(Backend::Embedded);
    let server = Server::start(&storage);
    let mut client = server.connect();
    // What a telnet client sends: IAC DO ECHO, IAC WILL NAWS, then a typed line with "é".
    client.send_raw(&[255, 253, 1, 255, 251, 31]);
    client.send_raw("{\"event\":\"find_user\",\"data\":{\"username\":\"Zoé\"}}\r\n".as_bytes());
    let mut answers = [0u8; 9];
    client
        .stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    client.stream.read_exact(&mut answers).expect("answers");
    assert_eq!(
        answers,
        [255, 253, 0, 255, 252, 1, 255, 254, 31],
        "DO BINARY (8-bit input, issue 27), WONT ECHO, DONT NAWS"
    );
    let login = client.recv();
    assert_eq!(login["event"], "user_created", "{login}");
    assert_eq!(login["data"]["username"], "Zoé");
    client.stream.write_all(b"help\r\n").expect("write");
    let reply = client.recv();
    assert_eq!(reply["data"]["code"], "bad_json");
    assert!(
        reply["data"]["Error"]
            .as_str()
            .is_some_and(|text| text.contains(r#"{"event":"hello"}"#)),
        "{reply}"
    );
}

fn read_state_by_seq_with_mark_read_and_my_groups(backend: Backend) {
    let storage = Storage::new(backend);
    let server = Server::start(&storage);
    let group = unique("marks");
    let mut alice = server.login("alice");
    alice.request("create_group", ug("alice", &group));
    let mut bob = server.login("bob");
    // `username` may be left out after find_user.
    let joined = bob.request("join_group", json!({ "group_name": group }));
    assert_eq!(joined["event"], "join_success", "{joined}");
    for i in 0..5 {
        alice.request(
            "send_message",
            common::msg("alice", &group, &format!("m{i}")),
        );
    }
    let mine = bob.request("my_groups", json!({}));
    assert_eq!(
        mine["data"]["groups"],
        json!([{"group_name": group, "group_id": joined["data"]["group_id"], "last_seq": 5, "last_read_seq": 0, "unread_count": 5, "role": "member"}]),
        "{mine}"
    );
    let marked = bob.request("mark_read", json!({"group_name": group, "seq": 3}));
    assert_eq!(
        marked["data"],
        json!({"group_name": group, "last_read_seq": 3, "unread_count": 2})
    );
    let lower = bob.request("mark_read", json!({"group_name": group, "seq": 1}));
    assert_eq!(lower["data"]["last_read_seq"], 3, "markers never go back");
    let entered = bob.request("enter_group", json!({ "group_name": group }));
    let unread: Vec<u64> = entered["data"]["unread"]
        .as_array()
        .map(|l| l.iter().filter_map(|m| m["seq"].as_u64()).collect())
        .unwrap_or_default();
    assert_eq!(unread, vec![4, 5], "enter_group splits by the marker");
    let clamped = bob.request("mark_read", json!({"group_name": group, "seq": 1000}));
    assert_eq!(clamped["data"]["last_read_seq"], 5, "clamped to the newest");
    let stranger = server
        .login("carol")
        .request("mark_read", json!({"group_name": group, "seq": 1}));
    assert_eq!(stranger["data"]["code"], "not_a_member", "{stranger}");
    let missing = bob.request("mark_read", json!({ "group_name": group }));
    assert_eq!(missing["data"]["code"], "bad_request");
}

/// Issue 13: a sender cut off before its ack resends; two connections race the same keys.
/// Each key is stored once, every repeat gets the original back with `duplicate: true`, and
/// the room sees each message once.
fn a_client_msg_id_is_stored_once_across_reconnects_and_connections(backend: Backend) {
    let storage = Storage::new(backend);
    let server = Server::start(&storage);
    let group = unique("retry");
    let mut alice = server.login("alice");
    alice.request("create_group", ug("alice", &group));
    let mut bob = server.login("bob");
    bob.request("join_group", ug("bob", &group));
    bob.request("enter_group", ug("bob", &group));

    let first = alice.request("send_message", common::keyed_msg(&group, "hello", "k-0"));
    assert_eq!(first["event"], "message_sent", "{first}");
    assert_eq!(first["data"]["client_msg_id"], "k-0");
    assert!(first["data"].get("duplicate").is_none(), "{first}");
    drop(alice);
    let mut again = server.login("alice");
    let repeat = again.request(
        "send_message",
        common::keyed_msg(&group, "hello (edited)", "k-0"),
    );
    assert_eq!(repeat["data"]["duplicate"], true, "{repeat}");
    for field in ["_id", "seq", "timestamp", "text", "group_name", "username"] {
        assert_eq!(repeat["data"][field], first["data"][field], "{field}");
    }

    // Two connections of the same user send the same 40 keys at once.
    let keys: Vec<String> = (1..=40).map(|i| format!("k-{i}")).collect();
    let mut other = server.login("alice");
    let racer = {
        let keys = keys.clone();
        let group = group.clone();
        std::thread::spawn(move || common::send_keyed(&mut other, &group, &keys))
    };
    let mine = common::send_keyed(&mut again, &group, &keys);
    let theirs = racer.join().expect("racer");
    let mut originals = 0;
    for (a, b) in mine.iter().zip(&theirs) {
        assert_eq!(a["_id"], b["_id"], "both get the same message: {a} {b}");
        assert_eq!(a["seq"], b["seq"]);
        originals += [a, b]
            .iter()
            .filter(|x| x.get("duplicate").is_none())
            .count();
    }
    assert_eq!(originals, keys.len(), "one of each pair is the original");

    again.request("send_message", common::keyed_msg(&group, "end", "end"));
    let seen = common::broadcasts_until(&mut bob, "end");
    let seqs: Vec<u64> = seen.iter().filter_map(|m| m["seq"].as_u64()).collect();
    assert_eq!(
        seqs,
        (1..=41).collect::<Vec<_>>(),
        "each message once, in order"
    );
    let stored = common::fetch_all(&mut bob, "bob", &group);
    assert_eq!(stored.len(), 42);
    assert_eq!(stored[0]["client_msg_id"], "k-0", "history keeps the key");

    for bad in [json!(""), json!("x".repeat(65)), json!(7)] {
        let reply = again.request(
            "send_message",
            json!({"group_name": group, "text": "t", "client_msg_id": bad}),
        );
        assert_eq!(reply["data"]["code"], "bad_request", "{reply}");
    }
}

/// Issue 13: `list_groups {after?, limit?}` pages by name, with `member_count` and `has_more`,
/// and `epoch` (the group's identity) on history replies.
fn list_groups_pages_with_member_counts(backend: Backend) {
    let storage = Storage::new(backend);
    let server = Server::start(&storage);
    let prefix = unique("pages");
    let mut alice = server.login("alice");
    let names: Vec<String> = (0..5).map(|i| format!("{prefix}-{i}")).collect();
    for name in &names {
        alice.request("create_group", ug("alice", name));
    }
    let mut bob = server.login("bob");
    bob.request("join_group", ug("bob", &names[1]));
    let mut listed = Vec::new();
    let mut after = json!(format!("{prefix}-"));
    loop {
        let page = bob.request("list_groups", json!({"after": after, "limit": 2}));
        assert_eq!(page["event"], "groups", "{page}");
        let groups = page["data"]["groups"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(groups.len() <= 2);
        for group in &groups {
            let name = group["group_name"].as_str().unwrap_or_default().to_string();
            if name.starts_with(&prefix) {
                listed.push(group.clone());
            }
            after = json!(name);
        }
        if page["data"]["has_more"] != true || listed.len() >= names.len() {
            break;
        }
    }
    let listed_names: Vec<&str> = listed
        .iter()
        .filter_map(|g| g["group_name"].as_str())
        .collect();
    assert_eq!(
        listed_names,
        names.iter().map(String::as_str).collect::<Vec<_>>()
    );
    assert_eq!(listed[1]["member_count"], 2);
    assert_eq!(
        listed[1]["members"],
        json!(["alice", "bob"]),
        "v1's list is kept"
    );
    let bad = bob.request("list_groups", json!({"limit": 0}));
    assert_eq!(bad["data"]["code"], "bad_request");

    let joined = bob.request("enter_group", ug("bob", &names[1]));
    let epoch = joined["data"]["epoch"].as_str().expect("epoch").to_string();
    let page = bob.request("fetch_messages", ug("bob", &names[1]));
    assert_eq!(
        page["data"]["epoch"],
        epoch.as_str(),
        "stable while the group lives"
    );
}

/// A client that writes a whole session without waiting: login, create, enter, a run of
/// messages mixed with pings, errors and reads. Every reply comes back in request order, the
/// login and the room entry hold before what follows them, reads see the messages sent before
/// them, and a watcher gets the messages once, in seq order.
fn pipelined_requests_are_answered_in_order_and_see_each_other(backend: Backend) {
    // mongoeco (CI's MongoDB stand-in) inserts slowly; the embedded run is the long one.
    let messages: u64 = if backend == Backend::Embedded {
        120
    } else {
        30
    };
    let storage = Storage::new(backend);
    let server = Server::start_with(&storage, &[("RATE_LIMIT", "0")]);
    let group = unique("pipe");
    let mut watcher = server.login("pipe_watcher");
    let mut client = server.connect();
    let mut lines: Vec<Value> = vec![
        json!({"event": "find_user", "data": {"username": "piper"}, "id": "login"}),
        json!({"event": "create_group", "data": {"group_name": group}, "id": "create"}),
        json!({"event": "enter_group", "data": {"group_name": group}, "id": "enter"}),
    ];
    for i in 1..=messages {
        lines.push(json!({"event": "send_message", "data": {"group_name": group, "text": format!("m{i}")}, "id": i}));
        match i % 10 {
            3 => lines.push(json!({"event": "ping", "id": format!("ping{i}")})),
            5 => lines.push(json!({"event": "send_message", "data": {"group_name": group, "text": " "}, "id": format!("bad{i}")})),
            7 => lines.push(json!({"event": "fetch_messages", "data": {"group_name": group, "before_seq": i + 1, "limit": 1}, "id": format!("read{i}")})),
            _ => {}
        }
    }
    let mut batch = String::new();
    for line in &lines {
        batch.push_str(&line.to_string());
        batch.push('\n');
    }
    client.send_raw(batch.as_bytes());
    let mut seq_of_message = Vec::new();
    for line in &lines {
        let reply = client.recv();
        assert_eq!(reply["id"], line["id"], "replies in request order: {reply}");
        let id = line["id"].to_string();
        match reply["event"].as_str() {
            Some("user_created") => assert_eq!(id, "\"login\""),
            Some("group_created") => assert_eq!(id, "\"create\""),
            Some("enter_group") => assert_eq!(id, "\"enter\""),
            Some("message_sent") => seq_of_message.push(reply["data"]["seq"].as_u64()),
            Some("pong") => assert!(id.starts_with("\"ping")),
            Some("error") => {
                assert!(id.starts_with("\"bad"), "{reply}");
                assert_eq!(reply["data"]["code"], "bad_request");
            }
            Some("messages") => {
                // The newest message before the read is the one sent just before it.
                let i: u64 = id
                    .trim_matches('"')
                    .trim_start_matches("read")
                    .parse()
                    .expect("i");
                assert_eq!(
                    reply["data"]["messages"][0]["seq"].as_u64(),
                    Some(i),
                    "{reply}"
                );
            }
            _ => panic!("unexpected reply {reply}"),
        }
    }
    let expected: Vec<Option<u64>> = (1..=messages).map(Some).collect();
    assert_eq!(seq_of_message, expected, "seqs follow the sending order");
    watcher.request("join_group", ug("pipe_watcher", &group));
    let stored = common::fetch_all(&mut watcher, "pipe_watcher", &group);
    common::assert_seqs_are_one_to_n(&stored, messages as usize);
    watcher.request("enter_group", ug("pipe_watcher", &group));
    // A second pipelined run, now with the watcher in the room.
    send_pipelined(&mut client, &group, "again", messages);
    for i in 1..=messages {
        let reply = client.recv();
        assert_eq!(reply["id"], json!(i));
        assert_eq!(reply["data"]["seq"].as_u64(), Some(messages + i));
    }
    for i in 1..=messages {
        let broadcast = watcher.recv();
        assert_eq!(broadcast["event"], "message_sent", "{broadcast}");
        assert_eq!(
            broadcast["data"]["seq"].as_u64(),
            Some(messages + i),
            "once, in order"
        );
    }
    assert!(
        watcher.try_recv(Duration::from_millis(200)).is_none(),
        "nothing twice"
    );
}

#[test]
/// `WRITE_DELAY_MS` at its longest: broadcasts held for a shared write still reach a client that
/// does nothing but read (from the deferred flush alone), once and in seq order; and a reply
/// never overtakes the broadcasts queued before it (it takes them along).
fn held_broadcasts_reach_quiet_clients_in_order_and_go_out_before_replies() {
    let storage = Storage::new(Backend::Embedded);
    let server = Server::start_with(&storage, &[("WRITE_DELAY_MS", "1000"), ("RATE_LIMIT", "0")]);
    let group = unique("held");
    let mut sender = server.login("held_sender");
    sender.request("create_group", ug("held_sender", &group));
    sender.request("enter_group", ug("held_sender", &group));
    let mut members = Vec::new();
    for name in ["held_quiet", "held_asker"] {
        let mut member = server.login(name);
        member.request("join_group", ug(name, &group));
        member.request("enter_group", ug(name, &group));
        members.push(member);
    }
    let messages = 30u64;
    send_pipelined(&mut sender, &group, "h", messages);
    for i in 1..=messages {
        let reply = sender.recv();
        assert_eq!(reply["id"], json!(i), "{reply}");
        assert_eq!(reply["data"]["seq"].as_u64(), Some(i), "{reply}");
    }
    // Every broadcast is queued for the members by now; the asker's pong comes after them.
    let mut asker = members.pop().expect("asker");
    asker.send(&json!({"event": "ping", "id": "after"}));
    for i in 1..=messages {
        let line = asker.recv();
        assert_eq!(line["event"], "message_sent", "{line}");
        assert_eq!(line["data"]["seq"].as_u64(), Some(i), "{line}");
    }
    let pong = asker.recv();
    assert_eq!(pong["event"], "pong", "{pong}");
    assert_eq!(pong["id"], "after");
    let mut quiet = members.pop().expect("quiet");
    for i in 1..=messages {
        let line = quiet.recv();
        assert_eq!(line["event"], "message_sent", "{line}");
        assert_eq!(
            line["data"]["seq"].as_u64(),
            Some(i),
            "once, in order: {line}"
        );
        assert_eq!(line["data"]["text"], format!("h{i}"));
    }
    assert!(
        quiet.try_recv(Duration::from_millis(1500)).is_none(),
        "nothing twice"
    );
}

/// Writes `count` messages to the group in one write, ids 1..=count, texts `{prefix}{i}`.
fn send_pipelined(client: &mut common::Client, group: &str, prefix: &str, count: u64) {
    let mut batch = String::new();
    for i in 1..=count {
        let line = json!({"event": "send_message", "data": {"group_name": group, "text": format!("{prefix}{i}")}, "id": i});
        batch.push_str(&line.to_string());
        batch.push('\n');
    }
    client.send_raw(batch.as_bytes());
}
