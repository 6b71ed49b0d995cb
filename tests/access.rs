//! Issue 34: when access ends it ends. A resume stream in progress stops the moment its user is
//! banned or its group deleted (nothing of the backlog written after that), and a stream never
//! continues into a new group that took the old one's name. Against the real binary, on both
//! stores; no timed assertions.

mod common;

use common::{ug, unique, Backend, Client, Server, Storage};
use serde_json::{json, Value};

backend_tests!(
    owner_and_heir_leaving_at_once_leave_an_owner,
    a_ban_ends_a_resume_stream_at_once,
    a_deleted_group_ends_a_resume_stream_and_its_successor_is_not_entered,
);

/// Messages in the backlog, each about 4 KB: 1.2 MB, far more than the socket buffers hold
/// (and few enough inserts for the MongoDB test server, whose inserts cost O(stored)).
const BACKLOG: usize = 300;

/// A group of `owner` with a `BACKLOG`-message backlog and `reader` as a member.
fn backlog(server: &Server, owner: &str, reader: &str) -> (Client, String) {
    let group = unique("stream");
    let mut writer = server.login(owner);
    writer.request("create_group", ug(owner, &group));
    server
        .login(reader)
        .request("join_group", ug(reader, &group));
    let mut burst = Vec::new();
    for i in 0..BACKLOG {
        let text = format!("{i:05}{}", "b".repeat(3990));
        let line =
            json!({"event": "send_message", "data": {"group_name": group, "text": text}, "id": i});
        burst.extend(serde_json::to_vec(&line).expect("json"));
        burst.push(b'\n');
    }
    writer.send_raw(&burst);
    for _ in 0..BACKLOG {
        assert_eq!(writer.recv()["event"], "message_sent");
    }
    (writer, group)
}

/// A reader on a small window that starts a resume from seq 0 and reads only its header.
fn start_resume(server: &Server, reader: &str, group: &str) -> Client {
    let mut client = server.connect_small_window();
    client.request("find_user", json!({ "username": reader }));
    let header = client.request("enter_group", json!({"group_name": group, "since_seq": 0}));
    assert_eq!(header["data"]["head_seq"], BACKLOG, "{header}");
    client
}

/// A server, the owner of a group with a backlog, and "reader" resuming it (header read).
fn resuming(backend: Backend) -> (Storage, Server, Client, String, Client) {
    let storage = Storage::new(backend);
    let server = Server::start_with(
        &storage,
        &[("RATE_LIMIT", "0"), ("STORE_TIMEOUT_MS", "60000")],
    );
    let (owner, group) = backlog(&server, "owner", "reader");
    let reader = start_resume(&server, "reader", &group);
    (storage, server, owner, group, reader)
}

/// Reads until `end` arrives; returns the backlog messages received before it.
fn messages_until(client: &mut Client, end: &str) -> Vec<Value> {
    let mut messages = Vec::new();
    loop {
        let line = client.recv();
        if line["event"] == end {
            return messages;
        }
        assert_eq!(line["event"], "message_sent", "{line}");
        messages.push(line);
    }
}

/// Item 1: a banned user resuming 2,000 messages on a slow link still received ~390 of them
/// written after `member_banned` was answered.
fn a_ban_ends_a_resume_stream_at_once(backend: Backend) {
    let (_storage, _server, mut owner, group, mut reader) = resuming(backend);
    let banned = owner.request(
        "ban_member",
        json!({"group_name": group, "username": "reader"}),
    );
    assert_eq!(banned["event"], "member_banned", "{banned}");
    // What the kernel buffers held when the ban came is all that may still arrive: the rest
    // of the backlog is dropped, and the stream ends with the reason.
    let received = messages_until(&mut reader, "left_group");
    assert!(
        received.len() < BACKLOG / 2,
        "{} of {BACKLOG} backlog messages reached a banned reader",
        received.len()
    );
    for (index, message) in received.iter().enumerate() {
        assert_eq!(message["data"]["seq"], index + 1, "in order, no gap");
    }
    assert!(reader.try_request_ping(), "nothing after left_group");
    let fetched = reader.request(
        "fetch_messages",
        json!({"group_name": group, "after_seq": 0}),
    );
    assert_ne!(fetched["event"], "messages", "{fetched}");
}

/// Item 2: after `group_deleted`, a slow resumer whose user re-created the group was put in the
/// new group's room and received its live messages as if they continued the old one.
fn a_deleted_group_ends_a_resume_stream_and_its_successor_is_not_entered(backend: Backend) {
    let (_storage, server, mut owner, group, mut reader) = resuming(backend);
    // Deleting 300 messages takes the MongoDB test server many seconds (O(stored) writes).
    owner
        .stream
        .set_read_timeout(Some(std::time::Duration::from_secs(120)))
        .expect("timeout");
    let deleted = owner.request("delete_group", json!({ "group_name": group }));
    assert_eq!(deleted["event"], "group_deleted", "{deleted}");
    // The reader re-creates the name at once (from another connection) and it gets a message.
    let mut again = server.login("reader");
    assert_eq!(
        again.request("create_group", ug("reader", &group))["event"],
        "group_created"
    );
    let sent = again.request(
        "send_message",
        json!({"group_name": group, "text": "new group"}),
    );
    assert_eq!(sent["data"]["seq"], 1);
    let received = messages_until(&mut reader, "group_deleted");
    assert!(received.len() < BACKLOG / 2, "{} arrived", received.len());
    // Nothing of the new group reaches the old stream: the next line is the ping's answer.
    reader.send(&json!({"event": "ping", "id": "after"}));
    let next = reader.recv();
    assert_eq!(next["event"], "pong", "{next}");
}

/// Items 10-12: a dangling symlink got the copy written where it pointed, the store's own
/// `-wal` and a `file:…?mode=memory` URI "succeeded" with nothing; files were world-readable.
#[test]
fn backups_go_only_to_new_plain_files_and_everything_is_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let storage = Storage::new(Backend::Embedded);
    let server = Server::start(&storage);
    let mut alice = server.login("alice");
    alice.request("create_group", ug("alice", &unique("kept")));
    let dir = std::env::temp_dir().join(unique("targets"));
    std::fs::create_dir_all(&dir).expect("dir");
    let pointed = dir.join("pointed-at");
    let link = dir.join("dangling");
    std::os::unix::fs::symlink(&pointed, &link).expect("symlink");
    let backup = |target: &std::path::Path| {
        std::process::Command::new(common::BINARY)
            .env_clear()
            .env("DATA_DIR", &storage.data_dir)
            .arg("backup")
            .arg(target)
            .output()
            .expect("run backup")
    };
    let wal = storage.data_dir.join("noomnim.sqlite3-wal");
    for target in [
        link.clone(),
        wal,
        std::path::PathBuf::from("file:copy?mode=memory"),
        dir.join("missing-dir").join("copy"),
    ] {
        let output = backup(&target);
        assert!(!output.status.success(), "{target:?} refused: {output:?}");
        assert!(!output.stderr.is_empty(), "with a reason");
    }
    assert!(!pointed.exists(), "nothing written through the link");
    let copy = dir.join("copy.sqlite3");
    let made = backup(&copy);
    assert!(made.status.success(), "{made:?}");
    let leftovers: Vec<String> = std::fs::read_dir(&dir)
        .expect("list")
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.contains("partial"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let mode = |path: &std::path::Path| {
        std::fs::metadata(path)
            .expect("metadata")
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode(&copy), 0o600, "the backup");
    assert_eq!(mode(&storage.data_dir.join("noomnim.sqlite3")), 0o600);
    assert_eq!(mode(&storage.data_dir), 0o700);
    let _ = std::fs::remove_dir_all(dir);
}

/// Item 13: `typing`, `edit_message`, `delete_message` accepted a `username` naming someone
/// else (acting as the logged-in user) where every other event answers `forbidden`.
#[test]
fn naming_someone_else_is_forbidden_everywhere() {
    let storage = Storage::new(Backend::Embedded);
    let server = Server::start(&storage);
    let group = unique("named");
    let mut alice = server.login("alice");
    alice.request("create_group", ug("alice", &group));
    alice.request("enter_group", ug("alice", &group));
    let sent = alice.request("send_message", json!({"group_name": group, "text": "mine"}));
    let seq = sent["data"]["seq"].clone();
    let hello = alice.request("hello", json!({"protocol": 3}));
    assert_eq!(hello["data"]["protocol"], 3);
    for (event, data) in [
        (
            "typing",
            json!({"group_name": group, "username": "mallory"}),
        ),
        (
            "edit_message",
            json!({"group_name": group, "seq": seq, "text": "x", "username": "mallory"}),
        ),
        (
            "delete_message",
            json!({"group_name": group, "seq": seq, "username": "mallory"}),
        ),
    ] {
        let reply = alice.request(event, data);
        assert_eq!(reply["data"]["code"], "forbidden", "{event}: {reply}");
    }
    let own = alice.request(
        "edit_message",
        json!({"group_name": group, "seq": seq, "text": "still mine", "username": "alice"}),
    );
    assert_eq!(own["event"], "message_edited", "{own}");
}

/// Item 5: with four loops, an owner and its heir leaving at once left 33 of 60 groups without
/// an owner, and 25 of 60 owners' leaves were answered `not_a_member` though they took effect.
fn owner_and_heir_leaving_at_once_leave_an_owner(backend: Backend) {
    let storage = Storage::new(backend);
    let server = Server::start_with(&storage, &[("IO_THREADS", "4"), ("RATE_LIMIT", "0")]);
    let groups: Vec<String> = (0..20).map(|i| unique(&format!("heir{i}"))).collect();
    let mut owner = server.login("owner");
    let mut heir = server.login("heir");
    let mut third = server.login("third");
    for group in &groups {
        owner.request("create_group", ug("owner", group));
        heir.request("join_group", ug("heir", group));
        third.request("join_group", ug("third", group));
        let promoted = owner.request(
            "set_role",
            json!({"group_name": group, "username": "heir", "role": "admin"}),
        );
        assert_eq!(promoted["event"], "role_set", "{promoted}");
    }
    // Both leave every group at once, from two connections (likely on two loops).
    let leave_all = |mut client: Client, name: &'static str, groups: Vec<String>| {
        std::thread::spawn(move || {
            let mut burst = Vec::new();
            for (i, group) in groups.iter().enumerate() {
                let line = json!({"event": "leave_group", "data": {"group_name": group}, "id": i});
                burst.extend(serde_json::to_vec(&line).expect("json"));
                burst.push(b'\n');
            }
            client.send_raw(&burst);
            (0..groups.len())
                .map(|_| client.recv())
                .filter(|reply| reply["event"] != "leave_success")
                .map(|reply| format!("{name}: {reply}"))
                .collect::<Vec<_>>()
        })
    };
    let owners = leave_all(owner, "owner", groups.clone());
    let heirs = leave_all(heir, "heir", groups.clone());
    let mut refused = owners.join().expect("owner");
    refused.extend(heirs.join().expect("heir"));
    assert!(
        refused.is_empty(),
        "every leave answered as it happened: {refused:?}"
    );
    let mine = third.request("my_groups", json!({}));
    for group in &groups {
        let role = mine["data"]["groups"]
            .as_array()
            .and_then(|all| all.iter().find(|g| g["group_name"] == group.as_str()))
            .map(|g| g["role"].clone());
        assert_eq!(role, Some(json!("owner")), "{group}: {mine}");
    }
}
