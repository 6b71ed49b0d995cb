//! Issue 38 item 1: replies and threads, as people use them — on one instance with each store,
//! and across two peers (the reply sent on one instance, the room and the thread read on the
//! other); a reply racing the deletion of the message it answers; an erased user's replies.

mod common;

use common::{ask, next_of, ug, unique, v3, Backend, Client, LocalService, Server, Storage};
use serde_json::{json, Value};

fn reply(client: &mut Client, group: &str, text: &str, to: u64) -> Value {
    ask(
        client,
        "send_message",
        json!({"group_name": group, "text": text, "reply_to": to}),
    )
}

fn seq_of(line: &Value) -> u64 {
    line["data"]["seq"].as_u64().expect("seq")
}

/// A thread's page: (seq, reply_to) of each message, and the root as returned.
fn thread(client: &mut Client, group: &str, seq: u64) -> (Vec<(u64, Option<u64>)>, Value) {
    let page = ask(
        client,
        "fetch_messages",
        json!({"group_name": group, "thread": seq, "after_seq": 0}),
    );
    assert_eq!(page["event"], "messages", "{page}");
    let messages = page["data"]["messages"]
        .as_array()
        .expect("messages")
        .clone();
    let listed = messages
        .iter()
        .map(|m| (m["seq"].as_u64().expect("seq"), m["reply_to"].as_u64()))
        .collect();
    (listed, messages.first().cloned().unwrap_or(Value::Null))
}

/// Ann on `a` starts a thread, bob on `b` (in the room) sees replies with `reply_to`, the
/// root counts them, a reply to a reply joins the root, a reply to nothing or to a deleted
/// message is refused, and deleting a reply counts again — read on either instance.
fn talk_in_threads(a: &Server, b: &Server) {
    let (ann, bob, group) = (unique("ann"), unique("bob"), unique("room"));
    let mut ann_c = v3(a, &ann);
    ask(&mut ann_c, "create_group", ug(&ann, &group));
    let mut bob_c = v3(b, &bob);
    ask(&mut bob_c, "join_group", ug(&bob, &group));
    let entered = ask(&mut bob_c, "enter_group", json!({"group_name": group}));
    assert_eq!(entered["event"], "enter_group", "{entered}");

    let root = seq_of(&ask(
        &mut ann_c,
        "send_message",
        json!({"group_name": group, "text": "who takes the release?"}),
    ));
    let aside = seq_of(&ask(
        &mut ann_c,
        "send_message",
        json!({"group_name": group, "text": "unrelated"}),
    ));
    let first = reply(&mut ann_c, &group, "I can", root);
    assert_eq!(first["event"], "message_sent", "{first}");
    assert_eq!(first["data"]["reply_to"], root);
    // The room on the other instance hears the reply with its thread.
    let heard = loop {
        let line = next_of(&mut bob_c, &["message_sent"]);
        if line["data"]["seq"] == first["data"]["seq"] {
            break line;
        }
    };
    assert_eq!(heard["data"]["reply_to"], root, "{heard}");
    // A reply to the reply joins the root's thread.
    let second = reply(&mut bob_c, &group, "thanks", seq_of(&first));
    assert_eq!(second["data"]["reply_to"], root, "{second}");
    for (client, label) in [(&mut ann_c, "ann"), (&mut bob_c, "bob")] {
        let (listed, root_line) = thread(client, &group, root);
        assert_eq!(
            listed,
            [
                (root, None),
                (seq_of(&first), Some(root)),
                (seq_of(&second), Some(root))
            ],
            "{label}: the root and its replies, not the aside ({aside})"
        );
        assert_eq!(root_line["reply_count"], 2, "{label}: {root_line}");
        assert_eq!(root_line["last_reply_seq"], seq_of(&second));
    }
    // History carries the counts too.
    let page = ask(
        &mut bob_c,
        "fetch_messages",
        json!({"group_name": group, "after_seq": root - 1, "limit": 1}),
    );
    assert_eq!(page["data"]["messages"][0]["reply_count"], 2, "{page}");

    let refused = reply(&mut ann_c, &group, "to nothing", 9_999);
    assert_eq!(refused["data"]["code"], "not_found", "{refused}");
    let deleted = ask(
        &mut bob_c,
        "delete_message",
        json!({"group_name": group, "seq": seq_of(&second)}),
    );
    assert_eq!(deleted["event"], "message_deleted", "{deleted}");
    let (_, root_line) = thread(&mut ann_c, &group, root);
    assert_eq!(root_line["reply_count"], 1, "{root_line}");
    assert_eq!(root_line["last_reply_seq"], seq_of(&first));
    let to_deleted = reply(&mut ann_c, &group, "late", seq_of(&second));
    assert_eq!(to_deleted["data"]["code"], "not_found", "{to_deleted}");
    // The count stays true for a thread of many replies.
    for i in 0..20 {
        let line = reply(&mut ann_c, &group, &format!("more {i}"), root);
        assert_eq!(line["event"], "message_sent", "{line}");
    }
    let (listed, root_line) = thread(&mut bob_c, &group, root);
    assert_eq!(
        listed.len(),
        1 + 22,
        "the deleted reply stays as a tombstone"
    );
    assert_eq!(root_line["reply_count"], 21, "{root_line}");
    let missing = ask(
        &mut bob_c,
        "fetch_messages",
        json!({"group_name": group, "thread": 9_999}),
    );
    assert_eq!(missing["data"]["code"], "not_found", "{missing}");
}

/// Replies race the deletion of the message they answer: each is stored before the delete
/// (and then counted, until deleted) or refused `not_found`; the root never counts a reply
/// that is not there.
fn replies_race_a_delete(server: &Server) {
    let (ann, bob, group) = (unique("ann"), unique("bob"), unique("race"));
    let mut ann_c = v3(server, &ann);
    ask(&mut ann_c, "create_group", ug(&ann, &group));
    let mut bob_c = v3(server, &bob);
    ask(&mut bob_c, "join_group", ug(&bob, &group));
    for round in 0..10 {
        let parent = seq_of(&ask(
            &mut ann_c,
            "send_message",
            json!({"group_name": group, "text": format!("parent {round}")}),
        ));
        // Pipelined: bob's replies and ann's delete of the parent go out together.
        for i in 0..5 {
            let data = json!({"group_name": group, "text": format!("r{i}"), "reply_to": parent});
            bob_c.send(&json!({"event": "send_message", "data": data, "id": i}));
        }
        let deleted = ask(
            &mut ann_c,
            "delete_message",
            json!({"group_name": group, "seq": parent}),
        );
        assert_eq!(deleted["event"], "message_deleted", "{deleted}");
        let mut stored = 0;
        let mut answered = 0;
        while answered < 5 {
            let line = bob_c.recv();
            if line.get("id").is_none() {
                continue;
            }
            answered += 1;
            match line["event"].as_str() {
                Some("message_sent") => stored += 1,
                _ => assert_eq!(line["data"]["code"], "not_found", "{line}"),
            }
        }
        let (listed, root_line) = thread(&mut bob_c, &group, parent);
        assert_eq!(listed.len(), 1 + stored, "round {round}");
        assert_eq!(root_line["deleted"], true);
        assert_eq!(
            root_line["reply_count"].as_u64().unwrap_or(0),
            stored as u64,
            "round {round}: {root_line}"
        );
    }
}

fn threads_on(backend: Backend) {
    let storage = Storage::new(backend);
    let server = Server::start_with(&storage, &[("RATE_LIMIT", "0")]);
    talk_in_threads(&server, &server);
    replies_race_a_delete(&server);
}

#[test]
fn threads_on_the_embedded_store() {
    threads_on(Backend::Embedded);
}

#[test]
fn threads_on_mongodb() {
    threads_on(Backend::Mongo);
}

#[test]
fn threads_across_peers() {
    let storage = Storage::new(Backend::Mongo);
    let redis = LocalService::redis();
    let nodes = ["threads_a", "threads_b"];
    let (a, b) = common::peer_pair(&storage, &redis.redis_url(), "shared", nodes);
    talk_in_threads(&a, &b);
}

/// Erasing a user leaves no reply of theirs counted, and their text nowhere in a thread.
#[test]
fn an_erased_users_replies_stop_counting() {
    let storage = Storage::new(Backend::Embedded);
    let server = Server::start(&storage);
    let (ann, bob, group) = (unique("ann"), unique("bob"), unique("erase"));
    let mut ann_c = v3(&server, &ann);
    ask(&mut ann_c, "create_group", ug(&ann, &group));
    {
        let mut bob_c = v3(&server, &bob);
        ask(&mut bob_c, "join_group", ug(&bob, &group));
    }
    let root = seq_of(&ask(
        &mut ann_c,
        "send_message",
        json!({"group_name": group, "text": "question"}),
    ));
    {
        let mut bob_c = v3(&server, &bob);
        for text in ["bob's secret answer", "and another"] {
            let line = reply(&mut bob_c, &group, text, root);
            assert_eq!(line["event"], "message_sent", "{line}");
        }
    }
    reply(&mut ann_c, &group, "ann's answer", root);
    let erased = common::erase_user(&storage, &bob);
    assert!(erased.status.success(), "{erased:?}");
    let (listed, root_line) = thread(&mut ann_c, &group, root);
    assert_eq!(listed.len(), 4, "tombstones keep their seqs");
    assert_eq!(root_line["reply_count"], 1, "{root_line}");
    let page = ask(
        &mut ann_c,
        "fetch_messages",
        json!({"group_name": group, "thread": root}),
    );
    assert!(!page.to_string().contains("secret"), "{page}");
}
