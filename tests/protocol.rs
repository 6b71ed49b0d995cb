//! One test per event and per error row of docs/PROTOCOL.md, against the real server, on both backends.

mod common;

use common::{msg, ug, unique, Backend, Server, Storage};
use serde_json::{json, Value};

backend_tests!(
    ping_answers_pong_with_a_timestamp,
    find_user_creates_then_finds,
    create_group_and_duplicate,
    join_group_is_idempotent_and_needs_a_group,
    leave_group_errors_and_room_exit,
    send_message_acks_with_id_and_seq,
    send_message_errors,
    visit_group_reports_last_read_and_errors,
    enter_group_splits_unread_and_read,
    fetch_messages_pages_by_seq,
    list_groups_lists_members,
    session_binding_errors,
    replies_come_in_request_order,
    data_may_be_a_json_string,
);

fn is_timestamp(value: &Value) -> bool {
    let text = value.as_str().unwrap_or_default();
    chrono::DateTime::parse_from_rfc3339(text).is_ok() && text.ends_with('Z') && text.len() == 24
}

fn is_object_id(value: &Value) -> bool {
    value
        .as_str()
        .is_some_and(|id| id.len() == 24 && id.chars().all(|c| c.is_ascii_hexdigit()))
}

fn error_code(reply: &Value) -> &str {
    assert_eq!(reply["event"], "error", "expected an error event: {reply}");
    reply["data"]["code"].as_str().unwrap_or_default()
}

/// A server with user `alice` logged in, owning a fresh group.
fn alice_with_group(backend: Backend) -> (Storage, Server, common::Client, String) {
    let storage = Storage::new(backend);
    let server = Server::start(&storage);
    let mut alice = server.login("alice");
    let group = unique("g");
    assert_eq!(
        alice.request("create_group", ug("alice", &group))["event"],
        "group_created"
    );
    (storage, server, alice, group)
}

fn ping_answers_pong_with_a_timestamp(backend: Backend) {
    let storage = Storage::new(backend);
    let server = Server::start(&storage);
    let mut client = server.connect();
    let reply = client.request("ping", json!({}));
    assert_eq!(reply["event"], "pong");
    assert!(is_timestamp(&reply["data"]["time"]), "{reply}");
    client.send_raw(b"{\"event\":\"ping\"}\n");
    let reply = client.recv();
    assert_eq!(reply["event"], "pong");
    assert!(
        reply.get("id").is_none(),
        "no id when the request had none: {reply}"
    );
}

fn find_user_creates_then_finds(backend: Backend) {
    let storage = Storage::new(backend);
    let server = Server::start(&storage);
    let mut first = server.connect();
    let created = first.request("find_user", json!({"username": "bob"}));
    assert_eq!(created["event"], "user_created");
    assert_eq!(created["data"]["username"], "bob");
    assert_eq!(created["data"]["group_list"], json!([]));
    assert!(is_object_id(&created["data"]["_id"]), "{created}");
    first.request("create_group", ug("bob", "bobs"));
    let mut second = server.connect();
    let found = second.request("find_user", json!({"username": "bob"}));
    assert_eq!(found["event"], "user_found");
    assert_eq!(found["data"]["_id"], created["data"]["_id"]);
    assert_eq!(found["data"]["group_list"], json!(["bobs"]));
    assert_eq!(
        second.request("find_user", json!({"username": "bob"}))["event"],
        "user_found"
    );
    let other = second.request("find_user", json!({"username": "Bob"}));
    assert_eq!(
        error_code(&other),
        "forbidden",
        "names are case-sensitive and one per connection"
    );
}

fn create_group_and_duplicate(backend: Backend) {
    let storage = Storage::new(backend);
    let server = Server::start(&storage);
    let mut alice = server.login("alice");
    let reply = alice.request("create_group", ug("alice", "lobby"));
    assert_eq!(reply["event"], "group_created");
    assert_eq!(reply["data"]["group_name"], "lobby");
    let members = reply["data"]["user"].as_array().expect("user array");
    assert_eq!(members.len(), 1);
    assert_eq!(members[0]["name_ID"], "alice");
    assert!(is_timestamp(&members[0]["last_read"]));
    let again = alice.request("create_group", ug("alice", "lobby"));
    assert_eq!(
        again,
        json!({"event": "group_already_created", "data": {"Error": "Group has already been created.", "code": "group_already_created"}, "id": again["id"]})
    );
}

fn join_group_is_idempotent_and_needs_a_group(backend: Backend) {
    let (_storage, server, _alice, group) = alice_with_group(backend);
    let mut bob = server.login("bob");
    let joined = bob.request("join_group", ug("bob", &group));
    assert_eq!(joined["event"], "join_success");
    assert_eq!(joined["data"]["group_name"], group.as_str());
    assert!(is_object_id(&joined["data"]["group_id"]), "{joined}");
    assert_eq!(
        bob.request("join_group", ug("bob", &group)),
        json!({"event": "join_success", "data": joined["data"], "id": 2 + 1})
    );
    let missing = bob.request("join_group", ug("bob", "no-such-group"));
    assert_eq!(missing["event"], "group_not_found");
    assert_eq!(
        missing["data"]["Error"],
        "Group that user selects can not be found."
    );
}

fn leave_group_errors_and_room_exit(backend: Backend) {
    let (_storage, server, mut alice, group) = alice_with_group(backend);
    let mut bob = server.login("bob");
    bob.request("join_group", ug("bob", &group));
    assert_eq!(
        bob.request("visit_group", ug("bob", &group))["event"],
        "user_visited"
    );
    let left = bob.request("leave_group", ug("bob", &group));
    assert_eq!(left["event"], "leave_success");
    assert_eq!(left["data"]["group_name"], group.as_str());
    assert_eq!(
        bob.request("leave_group", ug("bob", &group))["event"],
        "not_a_member"
    );
    assert_eq!(
        bob.request("leave_group", ug("bob", "no-such-group"))["event"],
        "group_not_found"
    );
    alice.request("send_message", msg("alice", &group, "after bob left"));
    assert_eq!(
        bob.try_recv(std::time::Duration::from_millis(300)),
        None,
        "left the room too"
    );
}

fn send_message_acks_with_id_and_seq(backend: Backend) {
    let (_storage, _server, mut alice, group) = alice_with_group(backend);
    for seq in 1..=3 {
        alice.send(&json!({"event": "send_message", "data": msg("alice", &group, &format!("hi {seq}")), "id": format!("m{seq}")}));
        let ack = alice.recv();
        assert_eq!(ack["event"], "message_sent");
        assert_eq!(ack["id"], format!("m{seq}"));
        let data = &ack["data"];
        assert_eq!(
            (data["seq"].as_u64(), data["group_name"].as_str()),
            (Some(seq), Some(group.as_str()))
        );
        assert_eq!(
            (data["username"].as_str(), data["text"].as_str()),
            (Some("alice"), Some(format!("hi {seq}").as_str()))
        );
        assert!(
            is_object_id(&data["_id"]) && is_timestamp(&data["timestamp"]),
            "{ack}"
        );
    }
}

fn send_message_errors(backend: Backend) {
    let (_storage, server, mut alice, group) = alice_with_group(backend);
    let mut bob = server.login("bob");
    assert_eq!(
        bob.request("send_message", msg("bob", &group, "let me in"))["event"],
        "not_a_member"
    );
    assert_eq!(
        alice.request("send_message", msg("alice", "no-such-group", "x"))["event"],
        "group_not_found"
    );
    assert_eq!(
        error_code(&alice.request("send_message", msg("alice", &group, ""))),
        "bad_request"
    );
    assert_eq!(
        error_code(&alice.request("send_message", msg("alice", &group, " \n "))),
        "bad_request"
    );
    let too_long = "é".repeat(4001);
    assert_eq!(
        error_code(&alice.request("send_message", msg("alice", &group, &too_long))),
        "bad_request"
    );
    let longest = alice.request("send_message", msg("alice", &group, &"é".repeat(4000)));
    assert_eq!(
        longest["data"]["seq"], 1,
        "nothing was stored by the refused requests: {longest}"
    );
    let mistyped = alice.request(
        "send_message",
        json!({"username": "alice", "group_name": group, "text": 5}),
    );
    assert_eq!(error_code(&mistyped), "bad_request");
}

fn visit_group_reports_last_read_and_errors(backend: Backend) {
    let (_storage, server, mut alice, group) = alice_with_group(backend);
    let visited = alice.request("visit_group", ug("alice", &group));
    assert_eq!(visited["event"], "user_visited");
    assert_eq!(visited["data"]["username"], "alice");
    assert_eq!(visited["data"]["group_name"], group.as_str());
    assert!(
        is_timestamp(&visited["data"]["last_time_read_in_visiting_group"]),
        "{visited}"
    );
    let again = alice.request("visit_group", ug("alice", &group));
    assert_eq!(again["event"], "already_in_the_group");
    assert_eq!(
        again["data"]["Error"],
        "User is already in selected chatroom."
    );
    assert_eq!(
        alice.request("visit_group", ug("alice", "no-such-group"))["event"],
        "group_not_found"
    );
    let mut bob = server.login("bob");
    assert_eq!(
        bob.request("visit_group", ug("bob", &group))["event"],
        "not_a_member"
    );
}

fn enter_group_splits_unread_and_read(backend: Backend) {
    let (_storage, server, mut alice, group) = alice_with_group(backend);
    let mut bob = server.login("bob");
    bob.request("join_group", ug("bob", &group));
    bob.request("enter_group", ug("bob", &group));
    let other = unique("other");
    bob.request("create_group", ug("bob", &other));
    alice.request("send_message", msg("alice", &group, "seen"));
    assert_eq!(bob.recv()["data"]["text"], "seen", "bob is in the room");
    std::thread::sleep(std::time::Duration::from_millis(5));
    bob.request("visit_group", ug("bob", &other));
    std::thread::sleep(std::time::Duration::from_millis(5));
    for text in ["new 1", "new 2"] {
        alice.request("send_message", msg("alice", &group, text));
    }
    let entered = bob.request("enter_group", ug("bob", &group));
    assert_eq!(entered["event"], "enter_group");
    let texts = |key: &str| -> Vec<String> {
        entered["data"][key]
            .as_array()
            .expect("array")
            .iter()
            .map(|m| m["text"].as_str().unwrap_or("").to_string())
            .collect()
    };
    assert_eq!(texts("read"), vec!["seen"]);
    assert_eq!(texts("unread"), vec!["new 1", "new 2"]);
    assert_eq!(entered["data"]["unread"][1]["seq"], 3);
    let again = bob.request("enter_group", ug("bob", &group));
    assert_eq!(again["data"]["unread"], json!([]));
    assert_eq!(again["data"]["read"].as_array().map(Vec::len), Some(3));
    assert_eq!(
        bob.request("enter_group", ug("bob", "no-such-group"))["event"],
        "group_not_found"
    );
    let mut carol = server.login("carol");
    assert_eq!(
        carol.request("enter_group", ug("carol", &group))["event"],
        "not_a_member"
    );
}

fn fetch_messages_pages_by_seq(backend: Backend) {
    let (_storage, _server, mut alice, group) = alice_with_group(backend);
    for i in 1..=7 {
        alice.request("send_message", msg("alice", &group, &format!("m{i}")));
    }
    let seqs = |reply: &Value| -> Vec<u64> {
        reply["data"]["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .filter_map(|m| m["seq"].as_u64())
            .collect()
    };
    let newest = alice.request(
        "fetch_messages",
        json!({"username": "alice", "group_name": group, "limit": 3}),
    );
    assert_eq!(newest["event"], "messages");
    assert_eq!(newest["data"]["group_name"], group.as_str());
    assert_eq!(
        (seqs(&newest), newest["data"]["has_more"].clone()),
        (vec![5, 6, 7], json!(true))
    );
    let older = alice.request(
        "fetch_messages",
        json!({"username": "alice", "group_name": group, "before_seq": 5, "limit": 10}),
    );
    assert_eq!(
        (seqs(&older), older["data"]["has_more"].clone()),
        (vec![1, 2, 3, 4], json!(false))
    );
    let after = alice.request(
        "fetch_messages",
        json!({"username": "alice", "group_name": group, "after_seq": 2, "limit": 2}),
    );
    assert_eq!(
        (seqs(&after), after["data"]["has_more"].clone()),
        (vec![3, 4], json!(true))
    );
    let default = alice.request("fetch_messages", ug("alice", &group));
    assert_eq!(seqs(&default), (1..=7).collect::<Vec<_>>());
    for bad in [json!(0), json!(101), json!("5"), json!(-1), json!(2.5)] {
        let reply = alice.request(
            "fetch_messages",
            json!({"username": "alice", "group_name": group, "limit": bad}),
        );
        assert_eq!(error_code(&reply), "bad_request", "limit {bad}");
    }
    assert_eq!(
        alice.request("fetch_messages", ug("alice", "no-such-group"))["event"],
        "group_not_found"
    );
}

fn list_groups_lists_members(backend: Backend) {
    let (_storage, server, mut alice, group) = alice_with_group(backend);
    let mut bob = server.login("bob");
    bob.request("join_group", ug("bob", &group));
    let listed = alice.request("list_groups", json!({}));
    assert_eq!(listed["event"], "groups");
    let groups = listed["data"]["groups"].as_array().expect("groups");
    let row = groups
        .iter()
        .find(|g| g["group_name"] == group.as_str())
        .expect("group listed");
    assert_eq!(row["members"], json!(["alice", "bob"]));
}

fn session_binding_errors(backend: Backend) {
    let (_storage, server, mut alice, group) = alice_with_group(backend);
    let mut stranger = server.connect();
    for (event, data) in [
        ("create_group", ug("x", "y")),
        ("list_groups", json!({})),
        ("send_message", msg("x", &group, "t")),
    ] {
        assert_eq!(
            error_code(&stranger.request(event, data)),
            "not_logged_in",
            "{event}"
        );
    }
    assert_eq!(
        error_code(&alice.request("send_message", msg("bob", &group, "spoof"))),
        "forbidden"
    );
    assert_eq!(
        error_code(&alice.request("join_group", ug("bob", &group))),
        "forbidden"
    );
    let page = alice.request("fetch_messages", ug("alice", &group));
    assert_eq!(
        page["data"]["messages"],
        json!([]),
        "the forbidden send stored nothing"
    );
}

fn replies_come_in_request_order(backend: Backend) {
    let (_storage, _server, mut alice, group) = alice_with_group(backend);
    let mut batch = Vec::new();
    for i in 0..40 {
        let line = match i % 4 {
            0 => json!({"event": "ping", "id": i}),
            1 => json!({"event": "send_message", "data": msg("alice", &group, "x"), "id": i}),
            2 => json!({"event": "nonsense", "id": i}),
            _ => json!({"event": "list_groups", "id": i}),
        };
        batch.extend(serde_json::to_vec(&line).expect("encode"));
        batch.push(b'\n');
    }
    alice.send_raw(&batch);
    for i in 0..40 {
        assert_eq!(alice.recv()["id"], i);
    }
}

fn data_may_be_a_json_string(backend: Backend) {
    let storage = Storage::new(backend);
    let server = Server::start(&storage);
    let mut client = server.connect();
    client.send_raw(b"{\"event\":\"find_user\",\"data\":\"{\\\"username\\\":\\\"sio\\\"}\"}\n");
    assert_eq!(client.recv()["event"], "user_created");
    client.send_raw(b"{\"event\":\"list_groups\",\"data\":\"{not json\"}\n");
    assert_eq!(error_code(&client.recv()), "bad_json");
}
