//! Issue 23 items 1 and 2: protocol 3 opt-in, and gapless resume. A client that prints every
//! `message_sent` it receives and re-enters with `since_seq` = the last seq it printed shows
//! each stored message exactly once, in order, after absences of any length, on any instance,
//! while others keep sending. No paging, holding or de-duplication on the client side: every
//! check below asserts that each line is exactly the next seq.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::{msg, ug, unique, Backend, Client, LocalService, Server, Storage};
use serde_json::{json, Value};

backend_tests!(
    a_long_absence_is_resumed_exactly_once_in_order_while_others_send,
    a_slow_reader_is_never_cut_off_for_its_own_backlog
);

#[test]
fn protocol_3_is_opt_in() {
    let storage = Storage::new(Backend::Embedded);
    let server = Server::start(&storage);
    let mut client = server.connect();
    let plain = client.request("hello", json!({}));
    assert_eq!(plain["data"]["protocol"], 2, "{plain}");
    assert_eq!(plain["data"]["protocols"], json!([2, 3]));
    let three = client.request("hello", json!({"protocol": 3}));
    assert_eq!(three["data"]["protocol"], 3, "{three}");
    let again = client.request("hello", json!({}));
    assert_eq!(again["data"]["protocol"], 3, "the connection stays on 3");
    let bad = client.request("hello", json!({"protocol": 4}));
    assert_eq!(bad["data"]["code"], "bad_request", "{bad}");
}

/// The naive client: prints (records) every `message_sent` of `group`; each must be exactly
/// the next seq. Returns when `until` has been printed or the connection closed.
fn print_until(client: &mut Client, group: &str, last: &mut u64, until: u64) -> bool {
    while *last < until {
        let Some(line) = client.recv_or_closed() else {
            return false;
        };
        if line["event"] == "message_sent" && line["data"]["group_name"] == group {
            let seq = line["data"]["seq"].as_u64().expect("seq");
            assert_eq!(seq, *last + 1, "gap or repeat: {line}");
            *last = seq;
        }
    }
    true
}

/// Enters with `since_seq` and checks the header line.
fn resume(client: &mut Client, group: &str, since: u64) -> Value {
    let header = client.request(
        "enter_group",
        json!({"group_name": group, "since_seq": since}),
    );
    assert_eq!(header["event"], "enter_group", "{header}");
    assert_eq!(header["data"]["since_seq"], since);
    header
}

fn send_many(client: &mut Client, user: &str, group: &str, count: usize) {
    let mut batch = Vec::new();
    for i in 0..count {
        batch.extend(
            serde_json::to_vec(&json!({"event": "send_message", "data": {"username": user, "group_name": group, "text": format!("{user} {i}")}}))
                .expect("encode"),
        );
        batch.push(b'\n');
    }
    client.send_raw(&batch);
    for _ in 0..count {
        assert_eq!(client.recv()["event"], "message_sent");
    }
}

fn a_long_absence_is_resumed_exactly_once_in_order_while_others_send(backend: Backend) {
    // mongoeco's inserts cost O(stored messages): a smaller absence there, still many pages.
    let absence = if backend == Backend::Embedded {
        5000
    } else {
        520
    };
    let storage = Storage::new(backend);
    let server = Server::start_with(&storage, &[("RATE_LIMIT", "0")]);
    let group = unique("resume");
    let mut owner = server.login("owner");
    owner.request("create_group", ug("owner", &group));
    let mut reader = server.login("reader");
    reader.request("join_group", ug("reader", &group));
    let mut last = 0;
    resume(&mut reader, &group, 0);
    send_many(&mut owner, "owner", &group, 10);
    assert!(print_until(&mut reader, &group, &mut last, 10));
    drop(reader);
    // The absence: many messages while the reader is gone.
    send_many(&mut owner, "owner", &group, absence);
    // Three senders keep sending while the reader comes back and streams its backlog.
    let stop = Arc::new(AtomicBool::new(false));
    let senders: Vec<_> = (0..3)
        .map(|i| {
            let (addr, group, stop) = (server.addr, group.clone(), stop.clone());
            std::thread::spawn(move || {
                let name = format!("sender{i}");
                let mut client = Client::connect(addr);
                client.request("find_user", json!({"username": name}));
                client.request("join_group", ug(&name, &group));
                let mut sent = 0;
                while !stop.load(Ordering::SeqCst) && sent < 200 {
                    let ack = client.request("send_message", msg(&name, &group, "live"));
                    assert_eq!(ack["event"], "message_sent", "{ack}");
                    sent += 1;
                }
                sent
            })
        })
        .collect();
    let mut reader = server.login("reader");
    let header = resume(&mut reader, &group, last);
    assert_eq!(header["data"]["truncated"], false);
    let head = header["data"]["head_seq"].as_u64().expect("head");
    assert!(head >= 10 + absence as u64);
    assert!(print_until(&mut reader, &group, &mut last, head));
    // Cut off mid-stream of the live part, and back again.
    drop(reader);
    let mut reader = server.login("reader");
    resume(&mut reader, &group, last);
    stop.store(true, Ordering::SeqCst);
    let sent: usize = senders.into_iter().map(|s| s.join().expect("sender")).sum();
    let total = 10 + absence as u64 + sent as u64;
    assert!(print_until(&mut reader, &group, &mut last, total));
    assert!(reader.try_request_ping());
    assert_eq!(last, total, "every stored message once, in order");
}

#[test]
fn beyond_resume_max_messages_the_stream_is_truncated_and_says_where_it_starts() {
    let storage = Storage::new(Backend::Embedded);
    let server = Server::start_with(&storage, &[("RESUME_MAX_MESSAGES", "100")]);
    let group = unique("trunc");
    let mut owner = server.login("owner");
    owner.request("create_group", ug("owner", &group));
    send_many(&mut owner, "owner", &group, 250);
    let mut reader = server.login("owner");
    let header = resume(&mut reader, &group, 3);
    assert_eq!(header["data"]["truncated"], true, "{header}");
    assert_eq!(header["data"]["first_seq"], 151);
    let mut last = 150;
    assert!(print_until(&mut reader, &group, &mut last, 250));
    // An epoch that is not the group's is reported, and the stream starts at its beginning
    // (truncated here as well).
    let header = reader.request(
        "enter_group",
        json!({"group_name": group, "since_seq": 240, "since_epoch": "000000000000000000000000"}),
    );
    assert_eq!(header["data"]["epoch_changed"], true, "{header}");
    assert_eq!(header["data"]["first_seq"], 151);
    // On protocol 3 a resume names the members online, as a plain enter_group does, so a
    // client that resumes after a reconnect refreshes its presence too (issue 35 item 5).
    let mut v3 = server.connect();
    assert_eq!(
        common::ask(&mut v3, "hello", json!({"protocol": 3}))["data"]["protocol"],
        3
    );
    common::ask(&mut v3, "find_user", json!({"username": "owner"}));
    let header = common::ask(
        &mut v3,
        "enter_group",
        json!({"group_name": group, "since_seq": 249}),
    );
    assert_eq!(header["data"]["online"], json!(["owner"]), "{header}");
    // Protocol 2's resume header stays as it was.
    assert!(reader.request(
        "enter_group",
        json!({"group_name": group, "since_seq": 250})
    )["data"]
        .get("online")
        .is_none());
}

/// Issue 35 item 5: a resume without `since_epoch` after the group was deleted and made again
/// (so `since_seq` is past the new group's head) is answered as an epoch change from the new
/// group's first message, not silently started after `since_seq`.
#[test]
fn a_resume_without_epoch_past_the_head_starts_the_new_group_over() {
    let storage = Storage::new(Backend::Embedded);
    let server = Server::start(&storage);
    let group = unique("again");
    let mut owner = server.login("owner");
    owner.request("create_group", ug("owner", &group));
    send_many(&mut owner, "owner", &group, 5);
    let deleted = owner.request("delete_group", json!({"group_name": group}));
    assert_eq!(deleted["event"], "group_deleted", "{deleted}");
    owner.request("create_group", ug("owner", &group));
    send_many(&mut owner, "owner", &group, 2);
    let mut reader = server.login("owner");
    let header = resume(&mut reader, &group, 5);
    assert_eq!(header["data"]["epoch_changed"], true, "{header}");
    assert_eq!(header["data"]["first_seq"], 1, "{header}");
    let mut last = 0;
    assert!(print_until(&mut reader, &group, &mut last, 2));
}

/// The backlog is sent as the reader reads it: a reader far slower than the stream, with a
/// tiny receive window and a small `MAX_OUTPUT_BYTES`, gets all of it and is not cut off.
fn a_slow_reader_is_never_cut_off_for_its_own_backlog(backend: Backend) {
    let count = if backend == Backend::Embedded {
        2000
    } else {
        400
    };
    let storage = Storage::new(backend);
    let server = Server::start_with(
        &storage,
        &[("MAX_OUTPUT_BYTES", "65536"), ("RATE_LIMIT", "0")],
    );
    let group = unique("slow");
    let mut owner = server.login("owner");
    owner.request("create_group", ug("owner", &group));
    let text = "x".repeat(1000);
    let mut batch = Vec::new();
    for _ in 0..count {
        batch.extend(
            serde_json::to_vec(
                &json!({"event": "send_message", "data": {"group_name": group, "text": text}}),
            )
            .expect("encode"),
        );
        batch.push(b'\n');
    }
    owner.send_raw(&batch);
    for _ in 0..count {
        assert_eq!(owner.recv()["event"], "message_sent");
    }
    let mut reader = server.connect_small_window();
    reader.request("find_user", json!({"username": "slow"}));
    reader.request("join_group", ug("slow", &group));
    resume(&mut reader, &group, 0);
    let mut last = 0;
    for _ in 0..count / 100 {
        // Pauses between reads: the server must wait for the reader, not drop it.
        std::thread::sleep(std::time::Duration::from_millis(20));
        let until = last + 100;
        assert!(
            print_until(&mut reader, &group, &mut last, until),
            "cut off at {last}"
        );
    }
    assert_eq!(last, count as u64);
    assert!(reader.try_request_ping(), "still connected");
}

/// Across instances: messages stored through one peer are resumed on the other, then live.
#[test]
fn a_resume_on_another_instance_continues_exactly() {
    let storage = Storage::new(Backend::Mongo);
    let redis = LocalService::redis();
    let start = |node: &str| {
        Server::start_with(
            &storage,
            &[
                ("PEER", "true"),
                ("REDIS_URL", &redis.redis_url()),
                ("NODE_ID", node),
            ],
        )
    };
    let (a, b) = (start("resume_a"), start("resume_b"));
    for server in [&a, &b] {
        assert!(server.logged("peer subscriber: connected"));
    }
    let group = unique("hop");
    let mut writer = a.login("writer");
    writer.request("create_group", ug("writer", &group));
    let mut reader = a.login("reader");
    reader.request("join_group", ug("reader", &group));
    let mut last = 0;
    resume(&mut reader, &group, 0);
    send_many(&mut writer, "writer", &group, 20);
    assert!(print_until(&mut reader, &group, &mut last, 20));
    drop(reader);
    send_many(&mut writer, "writer", &group, 510);
    // The reader comes back on the other instance (more than one page of backlog).
    let mut reader = b.login("reader");
    resume(&mut reader, &group, last);
    assert!(print_until(&mut reader, &group, &mut last, 530));
    send_many(&mut writer, "writer", &group, 20);
    assert!(print_until(&mut reader, &group, &mut last, 550));
    assert!(reader.try_request_ping());
}

/// A reader cut off as a slow consumer prints what reached it, comes back with `since_seq` and
/// gets the rest: still every message once, in order.
#[test]
fn a_reader_resumes_through_a_slow_consumer_cut() {
    let storage = Storage::new(Backend::Embedded);
    let server = Server::start_with(
        &storage,
        &[("MAX_OUTPUT_BYTES", "65536"), ("RATE_LIMIT", "0")],
    );
    let group = unique("cut");
    let mut owner = server.login("owner");
    owner.request("create_group", ug("owner", &group));
    let mut reader = server.connect_small_window();
    reader.request("find_user", json!({"username": "cutreader"}));
    reader.request("join_group", ug("cutreader", &group));
    resume(&mut reader, &group, 0);
    let total = 600;
    let text = "y".repeat(1000);
    let mut batch = Vec::new();
    for _ in 0..total {
        batch.extend(
            serde_json::to_vec(
                &json!({"event": "send_message", "data": {"group_name": group, "text": text}}),
            )
            .expect("encode"),
        );
        batch.push(b'\n');
    }
    owner.send_raw(&batch);
    for _ in 0..total {
        assert_eq!(owner.recv()["event"], "message_sent");
    }
    // The reader was not reading: it is cut off; it prints what reached it, to the close.
    let mut last = 0;
    let mut closing = None;
    while let Some(line) = reader.recv_or_closed() {
        match line["event"].as_str() {
            Some("message_sent") => {
                let seq = line["data"]["seq"].as_u64().expect("seq");
                assert_eq!(seq, last + 1, "{line}");
                last = seq;
            }
            Some("closing") => closing = Some(line["data"]["code"].clone()),
            _ => {}
        }
    }
    assert_eq!(closing, Some(json!("slow_consumer")));
    assert!(last < total as u64, "cut before the end ({last})");
    let mut reader = server.login("cutreader");
    resume(&mut reader, &group, last);
    assert!(print_until(&mut reader, &group, &mut last, total as u64));
    assert_eq!(last, total as u64);
}
