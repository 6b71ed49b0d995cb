//! Issue 23 items 4 and 6: a user's devices in sync (`read_marker`, `joined_group`,
//! `left_group` to the user's other protocol-3 connections) and `typing` in a room, on one
//! instance and across two peers; protocol-2 connections see none of it.

mod common;

use std::time::Duration;

use common::{ug, unique, Backend, Client, LocalService, Server, Storage};
use serde_json::{json, Value};

fn v3(server: &Server, username: &str) -> Client {
    let mut client = server.connect();
    let hello = client.request("hello", json!({"protocol": 3}));
    assert_eq!(hello["data"]["protocol"], 3, "{hello}");
    let login = client.request("find_user", json!({"username": username}));
    assert!(login["event"] == "user_created" || login["event"] == "user_found");
    client
}

/// The next line that is not a reply to a request (no `id`).
fn next_event(client: &mut Client) -> Value {
    loop {
        let line = client.recv();
        if line.get("id").is_none() {
            return line;
        }
    }
}

/// What arrives within a short wait, for checking that nothing does. A ping is answered
/// after anything queued before it, so lines queued earlier are seen first.
fn nothing_pending(client: &mut Client) -> Vec<Value> {
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

fn devices_follow_each_other(a: &Server, b: &Server) {
    let user = unique("dev");
    let group = unique("devg");
    let mut owner = a.login("owner");
    owner.request("create_group", ug("owner", &group));
    let mut phone = v3(a, &user);
    let mut laptop = v3(b, &user);
    let mut old = b.login(&user); // protocol 2: sees none of it
    let joined = phone.request("join_group", ug(&user, &group));
    assert_eq!(joined["event"], "join_success", "{joined}");
    let seen = next_event(&mut laptop);
    assert_eq!(seen["event"], "joined_group", "{seen}");
    assert_eq!(seen["data"]["group_name"], group.as_str());
    for i in 0..3 {
        owner.request(
            "send_message",
            common::msg("owner", &group, &format!("m{i}")),
        );
    }
    let marked = phone.request("mark_read", json!({"group_name": group, "seq": 2}));
    assert_eq!(marked["data"]["last_read_seq"], 2, "{marked}");
    let seen = next_event(&mut laptop);
    assert_eq!(seen["event"], "read_marker", "{seen}");
    assert_eq!(seen["data"]["last_read_seq"], 2);
    assert_eq!(seen["data"]["unread_count"], 1);
    assert!(nothing_pending(&mut phone).is_empty(), "not to itself");
    let left = laptop.request("leave_group", ug(&user, &group));
    assert_eq!(left["event"], "leave_success", "{left}");
    let seen = next_event(&mut phone);
    assert_eq!(seen["event"], "left_group", "{seen}");
    assert_eq!(seen["data"], json!({"group_name": group, "reason": "left"}));
    assert!(
        nothing_pending(&mut old).is_empty(),
        "protocol 2 sees nothing new"
    );
}

#[test]
fn a_users_devices_follow_each_other_on_one_instance() {
    let storage = Storage::new(Backend::Embedded);
    let server = Server::start(&storage);
    devices_follow_each_other(&server, &server);
}

/// Two linked instances. `PEER_RELAY=shared`: every channel is subscribed from the start, so
/// a `typing` sent right after entering a room is not lost to a subscription still under way
/// (typing is a hint and is never recovered from the store, unlike messages).
fn peers(storage: &Storage, redis: &LocalService) -> (Server, Server) {
    let start = |node: &str| {
        Server::start_with(
            storage,
            &[
                ("PEER", "true"),
                ("PEER_RELAY", "shared"),
                ("REDIS_URL", &redis.redis_url()),
                ("NODE_ID", node),
            ],
        )
    };
    let servers = (start("live_a"), start("live_b"));
    for server in [&servers.0, &servers.1] {
        assert!(server.logged("peer subscriber: connected"));
    }
    servers
}

#[test]
fn a_users_devices_follow_each_other_across_peers() {
    let storage = Storage::new(Backend::Mongo);
    let redis = LocalService::redis();
    let (a, b) = peers(&storage, &redis);
    devices_follow_each_other(&a, &b);
}

fn typing_reaches_the_room(a: &Server, b: &Server) {
    let group = unique("typ");
    let mut alice = v3(a, "alice");
    alice.request("create_group", ug("alice", &group));
    let mut bob = v3(b, "bob");
    bob.request("join_group", ug("bob", &group));
    let mut carol = b.login("carol"); // protocol 2
    carol.request("join_group", ug("carol", &group));
    for client in [&mut alice, &mut bob, &mut carol] {
        let entered = client.request("enter_group", json!({"group_name": group}));
        assert_eq!(entered["event"], "enter_group", "{entered}");
    }
    // Not in the room: refused with a code.
    let mut elsewhere = v3(a, "dave");
    let refused = elsewhere.request("typing", json!({"group_name": group}));
    assert_eq!(refused["data"]["code"], "not_in_room", "{refused}");
    // A flood: one relayed, the rest dropped silently (each still answered).
    for _ in 0..50 {
        let ack = alice.request("typing", json!({"group_name": group}));
        assert_eq!(ack["event"], "typing", "{ack}");
    }
    let seen = next_event(&mut bob);
    assert_eq!(
        seen,
        json!({"event": "typing", "data": {"group_name": group, "username": "alice"}})
    );
    // A message sent after the flood arrives next: the other 49 were not relayed.
    alice.request("send_message", common::msg("alice", &group, "after typing"));
    let next = next_event(&mut bob);
    assert_eq!(next["event"], "message_sent", "{next}");
    let carols = next_event(&mut carol);
    assert_eq!(
        carols["event"], "message_sent",
        "protocol 2 gets no typing: {carols}"
    );
    assert!(nothing_pending(&mut alice).is_empty(), "not to the typist");
    // Two seconds on, one more is relayed.
    std::thread::sleep(Duration::from_millis(2100));
    alice.request("typing", json!({"group_name": group}));
    assert_eq!(next_event(&mut bob)["event"], "typing");
}

#[test]
fn typing_reaches_the_room_once_per_two_seconds() {
    let storage = Storage::new(Backend::Embedded);
    let server = Server::start(&storage);
    typing_reaches_the_room(&server, &server);
}

#[test]
fn typing_reaches_the_room_across_peers() {
    let storage = Storage::new(Backend::Mongo);
    let redis = LocalService::redis();
    let (a, b) = peers(&storage, &redis);
    typing_reaches_the_room(&a, &b);
}
