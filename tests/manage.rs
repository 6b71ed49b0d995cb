//! Issue 24: messages and groups people manage, as users, moderators and an operator use them
//! over the wire: edit and delete (tombstones), roles, removal and bans, deleting a group,
//! retention and erasing a user; on both stores, across two peers, and under races (edit
//! against delete, a ban mid-send, a group deleted during a storm).

mod common;

use std::io::Read;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{
    ask, next_of, nothing_pending, ug, unique, Backend, Client, LocalService, Server, Storage,
    BINARY,
};
use serde_json::{json, Value};

backend_tests!(
    edits_and_deletes_reach_the_room_and_history,
    moderators_remove_and_ban_members,
    deleting_a_group_empties_its_room_and_renews_its_epoch,
    a_group_deleted_during_a_storm_keeps_nothing_sent_after_the_ack,
    an_erased_user_is_cut_off_and_the_name_is_free,
    an_erasure_racing_sends_leaves_nothing,
    retention_prunes_in_the_background_and_history_says_where_it_starts,
    edit_racing_delete_never_brings_text_back,
    a_ban_mid_send_is_a_clean_cut,
);

/// A server on fresh storage of `backend` (the storage outlives the server).
fn started(backend: Backend) -> (Storage, Server) {
    let storage = Storage::new(backend);
    let server = Server::start(&storage);
    (storage, server)
}

/// A protocol-3 client logged in as `username`.
fn v3(server: &Server, username: &str) -> Client {
    let mut client = server.connect();
    assert_eq!(
        ask(&mut client, "hello", json!({"protocol": 3}))["data"]["protocol"],
        3
    );
    let login = ask(&mut client, "find_user", json!({"username": username}));
    assert!(login["event"] == "user_created" || login["event"] == "user_found");
    client
}

/// A group owned by `owner`'s client with `members` joined; returns the group name.
fn group_with(owner: &mut Client, owner_name: &str, members: &mut [(&mut Client, &str)]) -> String {
    let group = unique("mg");
    let created = ask(owner, "create_group", ug(owner_name, &group));
    assert_eq!(created["event"], "group_created", "{created}");
    for (client, name) in members.iter_mut() {
        let joined = ask(client, "join_group", ug(name, &group));
        assert_eq!(joined["event"], "join_success", "{joined}");
    }
    group
}

fn enter(client: &mut Client, group: &str) -> Value {
    let entered = ask(client, "enter_group", json!({"group_name": group}));
    assert_eq!(entered["event"], "enter_group", "{entered}");
    entered
}

fn send(client: &mut Client, group: &str, text: &str) -> u64 {
    let sent = ask(
        client,
        "send_message",
        json!({"group_name": group, "text": text}),
    );
    assert_eq!(sent["event"], "message_sent", "{sent}");
    sent["data"]["seq"].as_u64().expect("seq")
}

fn code(reply: &Value) -> &str {
    reply["data"]["code"].as_str().unwrap_or("")
}

fn history(client: &mut Client, group: &str) -> Vec<Value> {
    let page = ask(
        client,
        "fetch_messages",
        json!({"group_name": group, "after_seq": 0, "limit": 100}),
    );
    assert_eq!(page["event"], "messages", "{page}");
    page["data"]["messages"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Sends `count` requests at once without waiting (ids 0..count), `line(i)` making each.
fn pipeline(client: &mut Client, count: usize, line: impl Fn(usize) -> Value) {
    let mut burst = Vec::new();
    for i in 0..count {
        burst.extend(serde_json::to_vec(&line(i)).expect("json"));
        burst.push(b'\n');
    }
    client.send_raw(&burst);
}

/// `count` pipelined sends to `group` (ids 0..count).
fn send_burst(client: &mut Client, group: &str, count: usize) {
    pipeline(
        client,
        count,
        |i| json!({"event": "send_message", "data": {"group_name": group, "text": format!("burst {i}")}, "id": i}),
    );
}

/// Reads the replies to `count` pipelined requests (skipping lines without `id`) and hands
/// each to `check`.
fn replies(client: &mut Client, count: usize, mut check: impl FnMut(&Value)) {
    let mut answered = 0;
    while answered < count {
        let line = client.recv();
        if line.get("id").is_some() {
            answered += 1;
            check(&line);
        }
    }
}

/// The replies to a burst of sends cut off by a removal: stored ones, then only `refusals`
/// (never a store after one). Returns how many were stored.
fn stored_until_cut(client: &mut Client, count: usize, refusals: &[&str]) -> usize {
    let (mut stored, mut refused) = (0, false);
    replies(client, count, |line| {
        let event = line["event"].as_str().unwrap_or("");
        if event == "message_sent" {
            assert!(!refused, "stored after a refusal: {line}");
            stored += 1;
        } else {
            let code = line["data"]["code"].as_str().unwrap_or("");
            assert!(
                refusals.contains(&event) || refusals.contains(&code),
                "unexpected reply {line}"
            );
            refused = true;
        }
    });
    stored
}

fn edits_and_deletes_reach_the_room_and_history(backend: Backend) {
    let (_storage, server) = started(backend);
    let (alice, bob) = (unique("alice"), unique("bob"));
    let mut a = server.login(&alice);
    let mut b = server.login(&bob);
    let group = group_with(&mut a, &alice, &mut [(&mut b, &bob)]);
    enter(&mut b, &group);
    let seq = send(&mut a, &group, "helo wrld");
    assert_eq!(next_of(&mut b, &["message_sent"])["data"]["seq"], seq);

    let edited = ask(
        &mut a,
        "edit_message",
        json!({"group_name": group, "seq": seq, "text": "hello world"}),
    );
    assert_eq!(edited["event"], "message_edited", "{edited}");
    assert_eq!(edited["data"]["seq"], seq);
    assert!(edited["data"]["edited_at"].is_string());
    let seen = next_of(&mut b, &["message_edited"]);
    assert_eq!(seen["data"]["text"], "hello world");
    assert_eq!(seen["data"]["seq"], seq);
    let stored = history(&mut b, &group);
    assert_eq!(stored[0]["text"], "hello world");
    assert_eq!(stored[0]["edited_at"], edited["data"]["edited_at"]);

    // Refusals, each with its code.
    let not_author = ask(
        &mut b,
        "edit_message",
        json!({"group_name": group, "seq": seq, "text": "mine now"}),
    );
    assert_eq!(code(&not_author), "forbidden", "{not_author}");
    let not_allowed = ask(
        &mut b,
        "delete_message",
        json!({"group_name": group, "seq": seq}),
    );
    assert_eq!(code(&not_allowed), "forbidden", "{not_allowed}");
    let missing = ask(
        &mut a,
        "delete_message",
        json!({"group_name": group, "seq": 999}),
    );
    assert_eq!(code(&missing), "not_found", "{missing}");
    let bad = ask(
        &mut a,
        "edit_message",
        json!({"group_name": group, "seq": seq, "text": "  "}),
    );
    assert_eq!(code(&bad), "bad_request", "{bad}");
    let stranger = server.login(&unique("stranger"));
    let mut stranger = stranger;
    let outsider = ask(
        &mut stranger,
        "delete_message",
        json!({"group_name": group, "seq": seq}),
    );
    assert_eq!(code(&outsider), "not_a_member", "{outsider}");

    // Delete: a tombstone keeps the seq, the text is gone everywhere.
    let second = send(&mut b, &group, "second");
    let deleted = ask(
        &mut a,
        "delete_message",
        json!({"group_name": group, "seq": seq}),
    );
    assert_eq!(deleted["event"], "message_deleted", "{deleted}");
    assert_eq!(deleted["data"]["deleted"], true);
    assert!(deleted["data"].get("text").is_none(), "{deleted}");
    let seen = next_of(&mut b, &["message_deleted"]);
    assert_eq!(seen["data"]["seq"], seq);
    let repeat = ask(
        &mut a,
        "delete_message",
        json!({"group_name": group, "seq": seq}),
    );
    assert_eq!(
        repeat["event"], "message_deleted",
        "a repeated delete is a success: {repeat}"
    );
    let extra = nothing_pending(&mut b);
    assert!(
        extra.is_empty(),
        "a repeated delete is not broadcast again: {extra:?}"
    );
    let no_edit = ask(
        &mut a,
        "edit_message",
        json!({"group_name": group, "seq": seq, "text": "again"}),
    );
    assert_eq!(code(&no_edit), "not_found", "{no_edit}");
    let stored = history(&mut a, &group);
    let seqs: Vec<u64> = stored.iter().filter_map(|m| m["seq"].as_u64()).collect();
    assert_eq!(seqs, vec![seq, second], "history stays gapless");
    assert_eq!(stored[0]["deleted"], true);
    assert!(stored[0].get("text").is_none());
    // A resume (protocol 3) streams the tombstone and the latest text too.
    let mut phone = v3(&server, &alice);
    let resumed = ask(
        &mut phone,
        "enter_group",
        json!({"group_name": group, "since_seq": 0}),
    );
    assert_eq!(resumed["data"]["head_seq"], second);
    let first = next_of(&mut phone, &["message_sent"]);
    assert_eq!(
        (first["data"]["seq"].as_u64(), &first["data"]["deleted"]),
        (Some(seq), &json!(true))
    );
    assert!(first["data"].get("text").is_none());
    // The room's other protocol-3 devices hear edits too; the editor's own connection only
    // gets the reply.
    let twice = ask(
        &mut b,
        "edit_message",
        json!({"group_name": group, "seq": second, "text": "2nd"}),
    );
    assert_eq!(twice["event"], "message_edited");
    assert_eq!(
        next_of(&mut phone, &["message_edited"])["data"]["text"],
        "2nd"
    );
    let echo = nothing_pending(&mut b);
    assert!(
        echo.is_empty(),
        "the editor is not sent its own edit twice: {echo:?}"
    );
}

fn moderators_remove_and_ban_members(backend: Backend) {
    let (_storage, server) = started(backend);
    let (owner, admin, member) = (unique("owner"), unique("admin"), unique("member"));
    let mut o = server.login(&owner);
    let mut a = server.login(&admin);
    let mut m = server.login(&member);
    let group = group_with(&mut o, &owner, &mut [(&mut a, &admin), (&mut m, &member)]);
    let mut m_phone = v3(&server, &member);

    let refused = ask(
        &mut a,
        "set_role",
        json!({"group_name": group, "username": member, "role": "admin"}),
    );
    assert_eq!(
        code(&refused),
        "forbidden",
        "only the owner sets roles: {refused}"
    );
    let bad = ask(
        &mut o,
        "set_role",
        json!({"group_name": group, "username": admin, "role": "god"}),
    );
    assert_eq!(code(&bad), "bad_request", "{bad}");
    let promoted = ask(
        &mut o,
        "set_role",
        json!({"group_name": group, "username": admin, "role": "admin"}),
    );
    assert_eq!(promoted["event"], "role_set", "{promoted}");
    let roles = ask(&mut a, "my_groups", json!({}));
    let mine = roles["data"]["groups"]
        .as_array()
        .and_then(|g| g.iter().find(|g| g["group_name"] == group).cloned());
    assert_eq!(mine.map(|g| g["role"].clone()), Some(json!("admin")));
    let listed = ask(&mut o, "list_groups", json!({}));
    let row = listed["data"]["groups"]
        .as_array()
        .and_then(|g| g.iter().find(|g| g["group_name"] == group).cloned());
    assert_eq!(row.map(|g| g["role"].clone()), Some(json!("owner")));

    let no = ask(
        &mut m,
        "remove_member",
        json!({"group_name": group, "username": admin}),
    );
    assert_eq!(code(&no), "forbidden", "{no}");
    let no = ask(
        &mut a,
        "remove_member",
        json!({"group_name": group, "username": owner}),
    );
    assert_eq!(code(&no), "forbidden", "nobody removes the owner: {no}");

    // Removal takes the member's connections out of the room at once, with a reason.
    enter(&mut m, &group);
    enter(&mut o, &group);
    let removed = ask(
        &mut a,
        "remove_member",
        json!({"group_name": group, "username": member}),
    );
    assert_eq!(removed["event"], "member_removed", "{removed}");
    let told = next_of(&mut m, &["left_group"]);
    assert_eq!(told["data"]["reason"], "removed", "{told}");
    let told = next_of(&mut m_phone, &["left_group"]);
    assert_eq!(told["data"]["reason"], "removed", "{told}");
    let seen = next_of(&mut o, &["member_removed"]);
    assert_eq!(seen["data"]["username"], member);
    send(&mut o, &group, "after the removal");
    let after: Vec<Value> = nothing_pending(&mut m);
    assert!(
        after.iter().all(|l| l["event"] != "message_sent"),
        "{after:?}"
    );
    let cannot_send = ask(
        &mut m,
        "send_message",
        json!({"group_name": group, "text": "hi"}),
    );
    assert_eq!(code(&cannot_send), "not_a_member");

    // A removed member may come back; a banned one may not until unbanned.
    assert_eq!(
        ask(&mut m, "join_group", ug(&member, &group))["event"],
        "join_success"
    );
    enter(&mut m, &group);
    let banned = ask(
        &mut a,
        "ban_member",
        json!({"group_name": group, "username": member}),
    );
    assert_eq!(banned["event"], "member_banned", "{banned}");
    assert_eq!(next_of(&mut m, &["left_group"])["data"]["reason"], "banned");
    let rejoin = ask(&mut m, "join_group", ug(&member, &group));
    assert_eq!(code(&rejoin), "banned", "{rejoin}");
    assert!(rejoin["data"]["Error"]
        .as_str()
        .is_some_and(|t| !t.is_empty()));
    let lifted = ask(
        &mut a,
        "unban_member",
        json!({"group_name": group, "username": member}),
    );
    assert_eq!(lifted["event"], "member_unbanned", "{lifted}");
    assert_eq!(
        ask(&mut m, "join_group", ug(&member, &group))["event"],
        "join_success"
    );

    // Ownership handed over: the former owner is an admin, the new owner can delete.
    let handed = ask(
        &mut o,
        "set_role",
        json!({"group_name": group, "username": admin, "role": "owner"}),
    );
    assert_eq!(handed["data"]["role"], "owner", "{handed}");
    let no = ask(&mut o, "delete_group", json!({"group_name": group}));
    assert_eq!(code(&no), "forbidden", "{no}");
    assert_eq!(
        ask(&mut a, "delete_group", json!({"group_name": group}))["event"],
        "group_deleted"
    );
}

fn deleting_a_group_empties_its_room_and_renews_its_epoch(backend: Backend) {
    let (_storage, server) = started(backend);
    let (owner, member) = (unique("owner"), unique("member"));
    let mut o = server.login(&owner);
    let mut m = v3(&server, &member);
    let group = group_with(&mut o, &owner, &mut [(&mut m, &member)]);
    let old_epoch = enter(&mut m, &group)["data"]["epoch"].clone();
    for i in 0..5 {
        send(&mut o, &group, &format!("old {i}"));
    }
    let no = ask(&mut m, "delete_group", json!({"group_name": group}));
    assert_eq!(code(&no), "forbidden", "{no}");
    let deleted = ask(&mut o, "delete_group", json!({"group_name": group}));
    assert_eq!(deleted["event"], "group_deleted", "{deleted}");
    assert_eq!(
        next_of(&mut m, &["group_deleted"])["data"]["group_name"],
        group
    );
    let gone = ask(
        &mut m,
        "send_message",
        json!({"group_name": group, "text": "anyone?"}),
    );
    assert_eq!(gone["event"], "group_not_found", "{gone}");
    let again = ask(&mut o, "delete_group", json!({"group_name": group}));
    assert_eq!(again["event"], "group_not_found", "{again}");

    // Same name, new group: a new epoch, and a resume from the old one is told so.
    assert_eq!(
        ask(&mut o, "create_group", ug(&owner, &group))["event"],
        "group_created"
    );
    assert_eq!(
        ask(&mut m, "join_group", ug(&member, &group))["event"],
        "join_success"
    );
    send(&mut o, &group, "new 1");
    let resumed = ask(
        &mut m,
        "enter_group",
        json!({"group_name": group, "since_seq": 5, "since_epoch": old_epoch}),
    );
    assert_eq!(resumed["data"]["epoch_changed"], true, "{resumed}");
    assert_ne!(resumed["data"]["epoch"], old_epoch);
    let first = next_of(&mut m, &["message_sent"]);
    assert_eq!(
        first["data"]["text"], "new 1",
        "the new group's stream from its start"
    );
    assert_eq!(
        history(&mut o, &group).len(),
        1,
        "nothing of the old group is left"
    );
}

fn a_group_deleted_during_a_storm_keeps_nothing_sent_after_the_ack(backend: Backend) {
    let (_storage, server) = started(backend);
    let owner = unique("owner");
    let mut o = server.login(&owner);
    let senders: Vec<String> = (0..3).map(|_| unique("storm")).collect();
    let mut clients: Vec<Client> = senders.iter().map(|name| server.login(name)).collect();
    let mut pairs: Vec<(&mut Client, &str)> = clients
        .iter_mut()
        .zip(senders.iter())
        .map(|(c, n)| (c, n.as_str()))
        .collect();
    let group = group_with(&mut o, &owner, &mut pairs);
    // Every sender pipelines 300 sends; the owner deletes the group while they land.
    for client in clients.iter_mut() {
        send_burst(client, &group, 300);
    }
    let deleted = ask(&mut o, "delete_group", json!({"group_name": group}));
    assert_eq!(deleted["event"], "group_deleted", "{deleted}");
    for client in clients.iter_mut() {
        stored_until_cut(client, 300, &["group_not_found", "not_a_member"]);
    }
    // A group made under the name afterwards holds nothing of the storm.
    assert_eq!(
        ask(&mut o, "create_group", ug(&owner, &group))["event"],
        "group_created"
    );
    assert!(
        history(&mut o, &group).is_empty(),
        "messages outlived their group"
    );
}

fn an_erased_user_is_cut_off_and_the_name_is_free(backend: Backend) {
    let storage = Storage::new(backend);
    let server = Server::start_with(&storage, &[("MAX_GROUPS_PER_USER", "2")]);
    let (gone, stays) = (unique("gone"), unique("stays"));
    let mut g = server.login(&gone);
    let mut s = server.login(&stays);
    let group = group_with(&mut s, &stays, &mut [(&mut g, &gone)]);
    // Two groups of their own (the quota): one shared, one theirs alone.
    let shared = group_with(&mut g, &gone, &mut [(&mut s, &stays)]);
    let alone = unique("alone");
    assert_eq!(
        ask(&mut g, "create_group", ug(&gone, &alone))["event"],
        "group_created"
    );
    send(&mut g, &group, "please forget me");
    send(&mut s, &group, "hello");
    let output = common::erase_user(&storage, &gone);
    assert!(output.status.success(), "{output:?}");
    let summary = String::from_utf8_lossy(&output.stdout);
    assert!(summary.contains("erased user"), "{summary}");
    assert!(
        summary.contains(&format!("{shared}: ownership passed to \"{stays}\"")),
        "{summary}"
    );
    assert!(summary.contains(&format!("{alone}: deleted")), "{summary}");
    // The running server closes the erased user's connection with a reason.
    let closing = loop {
        let line = g.recv();
        if line["event"] == "closing" {
            break line;
        }
    };
    assert_eq!(closing["data"]["code"], "account_erased", "{closing}");
    assert!(
        g.recv_or_closed().is_none(),
        "the connection is closed after the notice"
    );
    // What stays carries no name; the group they owned has its heir as owner.
    let stored = history(&mut s, &group);
    assert_eq!(stored[0]["deleted"], true);
    assert!(stored[0].get("text").is_none());
    assert_eq!(stored[0]["username"], "", "{}", stored[0]);
    assert_eq!(stored[1]["text"], "hello");
    let listed = ask(&mut s, "list_groups", json!({}));
    let shown = listed["data"]["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .find(|listed| listed["group_name"] == shared)
        .cloned()
        .unwrap_or_default();
    assert_eq!(shown["role"], "owner", "{listed}");
    // The name can be registered again, as a new user with no memberships and a fresh quota,
    // and what the old one left is not theirs to delete.
    let mut again = server.connect();
    let login = ask(&mut again, "find_user", json!({"username": gone}));
    assert_eq!(login["event"], "user_created", "{login}");
    assert_eq!(login["data"]["group_list"], json!([]));
    let created = ask(&mut again, "create_group", ug(&gone, &unique("fresh")));
    assert_eq!(created["event"], "group_created", "{created}");
    let missing = common::erase_user(&storage, &unique("nobody"));
    assert_eq!(missing.status.code(), Some(1), "{missing:?}");
    let usage = Command::new(BINARY)
        .args(["admin", "erase"])
        .env_clear()
        .output()
        .expect("run");
    assert_eq!(usage.status.code(), Some(2));
}

/// Issue 34 item 7: an erasure racing a burst of the user's sends (on MongoDB the erasure is
/// several writes) leaves nothing of theirs: every message they had stored is an anonymous
/// tombstone, and none was stored after.
fn an_erasure_racing_sends_leaves_nothing(backend: Backend) {
    let (storage, server) = started(backend);
    let (gone, stays) = (unique("racer"), unique("witness"));
    let mut g = server.login(&gone);
    let mut s = server.login(&stays);
    let group = group_with(&mut s, &stays, &mut [(&mut g, &gone)]);
    send_burst(&mut g, &group, 300);
    let output = common::erase_user(&storage, &gone);
    assert!(output.status.success(), "{output:?}");
    for message in common::fetch_all(&mut s, &stays, &group) {
        assert_eq!(message["deleted"], true, "{message}");
        assert_eq!(message["username"], "", "{message}");
        assert!(message.get("text").is_none(), "{message}");
    }
}

fn retention_prunes_in_the_background_and_history_says_where_it_starts(backend: Backend) {
    let storage = Storage::new(backend);
    let server = Server::start_with(
        &storage,
        &[
            ("RETENTION_MAX_MESSAGES", "5"),
            ("RETENTION_INTERVAL_MS", "100"),
            ("METRICS_PORT", "0"),
        ],
    );
    let user = unique("keeper");
    let mut c = v3(&server, &user);
    let group = unique("kept");
    assert_eq!(
        ask(&mut c, "create_group", ug(&user, &group))["event"],
        "group_created"
    );
    for i in 1..=20 {
        send(&mut c, &group, &format!("m{i}"));
    }
    // Pruning happens in the background: wait for it (bounded), then check what it left.
    let deadline = Instant::now() + Duration::from_secs(30);
    let stored = loop {
        let stored = history(&mut c, &group);
        if stored.len() == 5 || Instant::now() > deadline {
            break stored;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let seqs: Vec<u64> = stored.iter().filter_map(|m| m["seq"].as_u64()).collect();
    assert_eq!(seqs, vec![16, 17, 18, 19, 20]);
    let page = ask(
        &mut c,
        "fetch_messages",
        json!({"group_name": group, "after_seq": 0}),
    );
    assert_eq!(page["data"]["first_seq"], 16, "{page}");
    let entered = ask(&mut c, "enter_group", json!({"group_name": group}));
    assert_eq!(entered["data"]["first_seq"], 16, "{entered}");
    let resumed = ask(
        &mut c,
        "enter_group",
        json!({"group_name": group, "since_seq": 3}),
    );
    assert_eq!(resumed["data"]["truncated"], true, "{resumed}");
    assert_eq!(resumed["data"]["first_seq"], 16, "{resumed}");
    assert_eq!(next_of(&mut c, &["message_sent"])["data"]["seq"], 16);
    assert!(common::metric(&server, "noomnim_retention_pruned_total").is_some_and(|n| n >= 15.0));
    let refused = Command::new(BINARY)
        .env_clear()
        .env("RETENTION_MAX_AGE", "90 days")
        .output()
        .expect("run");
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("RETENTION_MAX_AGE"));
}

fn edit_racing_delete_never_brings_text_back(backend: Backend) {
    let (_storage, server) = started(backend);
    let (author, admin) = (unique("author"), unique("admin"));
    let mut w = server.login(&author);
    let mut a = server.login(&admin);
    let group = group_with(&mut w, &author, &mut [(&mut a, &admin)]);
    assert_eq!(
        ask(
            &mut w,
            "set_role",
            json!({"group_name": group, "username": admin, "role": "admin"})
        )["event"],
        "role_set"
    );
    let seqs: Vec<u64> = (0..40)
        .map(|i| send(&mut w, &group, &format!("original {i}")))
        .collect();
    // The author edits every message while the admin deletes every one, pipelined on two
    // connections at once.
    let request = |event: &str, i: usize| {
        let seq = seqs[i];
        let mut data = json!({"group_name": group, "seq": seq});
        if event == "edit_message" {
            data["text"] = json!(format!("edited {seq}"));
        }
        json!({"event": event, "data": data, "id": i})
    };
    pipeline(&mut w, seqs.len(), |i| request("edit_message", i));
    pipeline(&mut a, seqs.len(), |i| request("delete_message", i));
    replies(&mut w, seqs.len(), |line| {
        if line["event"] != "message_edited" {
            assert_eq!(code(line), "not_found", "an edit after the delete: {line}");
        }
    });
    replies(&mut a, seqs.len(), |line| {
        assert_eq!(line["event"], "message_deleted", "{line}");
    });
    for message in history(&mut a, &group) {
        assert_eq!(message["deleted"], true, "{message}");
        assert!(message.get("text").is_none(), "text came back: {message}");
    }
}

fn a_ban_mid_send_is_a_clean_cut(backend: Backend) {
    let (_storage, server) = started(backend);
    let (owner, sender) = (unique("owner"), unique("spammer"));
    let mut o = server.login(&owner);
    let mut s = server.login(&sender);
    let group = group_with(&mut o, &owner, &mut [(&mut s, &sender)]);
    send_burst(&mut s, &group, 400);
    let banned = ask(
        &mut o,
        "ban_member",
        json!({"group_name": group, "username": sender}),
    );
    assert_eq!(banned["event"], "member_banned", "{banned}");
    let stored = stored_until_cut(&mut s, 400, &["not_a_member", "banned"]);
    // A send refused in the race on MongoDB leaves its seq as a tombstone (seqs stay gapless).
    let kept = common::fetch_all(&mut o, &owner, &group)
        .iter()
        .filter(|message| message["deleted"] != true)
        .count();
    assert_eq!(kept, stored, "every acked message, and only those");
}

/// Two instances sharing the storage's MongoDB and a Redis of their own, with `extra`
/// settings; returned once both are linked (the Redis must outlive them).
fn two_peers(storage: &Storage, extra: &[(&str, &str)]) -> (LocalService, Server, Server) {
    let redis = LocalService::redis();
    let url = redis.redis_url();
    let start = |node: &str| {
        let mut env = vec![
            ("PEER", "true"),
            ("PEER_RELAY", "shared"),
            ("REDIS_URL", url.as_str()),
            ("NODE_ID", node),
        ];
        env.extend_from_slice(extra);
        Server::start_with(storage, &env)
    };
    let node = unique("node");
    let (one, two) = (start(&format!("{node}_a")), start(&format!("{node}_b")));
    for server in [&one, &two] {
        assert!(server.logged("peer subscriber: connected"));
    }
    (redis, one, two)
}

/// Across two peers: edits, deletes and bans reach the room and the user on the other
/// instance; deleting a group empties its room there too.
#[test]
fn management_reaches_every_peer() {
    let storage = Storage::new(Backend::Mongo);
    let (_redis, one, two) = two_peers(&storage, &[]);
    let (owner, member) = (unique("owner"), unique("member"));
    let mut o = one.login(&owner);
    let mut m = two.login(&member);
    let group = group_with(&mut o, &owner, &mut [(&mut m, &member)]);
    enter(&mut m, &group);
    let seq = send(&mut o, &group, "typo");
    assert_eq!(next_of(&mut m, &["message_sent"])["data"]["seq"], seq);
    ask(
        &mut o,
        "edit_message",
        json!({"group_name": group, "seq": seq, "text": "fixed"}),
    );
    assert_eq!(
        next_of(&mut m, &["message_edited"])["data"]["text"],
        "fixed"
    );
    ask(
        &mut o,
        "delete_message",
        json!({"group_name": group, "seq": seq}),
    );
    assert_eq!(next_of(&mut m, &["message_deleted"])["data"]["seq"], seq);
    let banned = ask(
        &mut o,
        "ban_member",
        json!({"group_name": group, "username": member}),
    );
    assert_eq!(banned["event"], "member_banned");
    assert_eq!(next_of(&mut m, &["left_group"])["data"]["reason"], "banned");
    send(&mut o, &group, "not for the banned");
    let after = nothing_pending(&mut m);
    assert!(
        after.iter().all(|l| l["event"] != "message_sent"),
        "{after:?}"
    );
    ask(
        &mut o,
        "unban_member",
        json!({"group_name": group, "username": member}),
    );
    assert_eq!(
        ask(&mut m, "join_group", ug(&member, &group))["event"],
        "join_success"
    );
    enter(&mut m, &group);
    assert_eq!(
        ask(&mut o, "delete_group", json!({"group_name": group}))["event"],
        "group_deleted"
    );
    assert_eq!(
        next_of(&mut m, &["group_deleted"])["data"]["group_name"],
        group
    );
    // The new group of that name numbers from 1 on both instances.
    assert_eq!(
        ask(&mut o, "create_group", ug(&owner, &group))["event"],
        "group_created"
    );
    assert_eq!(
        ask(&mut m, "join_group", ug(&member, &group))["event"],
        "join_success"
    );
    enter(&mut m, &group);
    assert_eq!(send(&mut o, &group, "fresh"), 1);
    let fresh = next_of(&mut m, &["message_sent"]);
    assert_eq!(
        (
            fresh["data"]["seq"].as_u64(),
            fresh["data"]["text"].as_str()
        ),
        (Some(1), Some("fresh"))
    );
}

/// The files of the embedded store that hold `needle`.
fn files_holding(data_dir: &std::path::Path, needle: &str) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(data_dir).expect("data dir") {
        let path = entry.expect("entry").path();
        let mut bytes = Vec::new();
        if std::fs::File::open(&path)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .is_ok()
            && bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
        {
            found.push(path);
        }
    }
    found
}

/// Deleting erases, from every file of the store, whatever the shutdown (issue 34 item 8):
/// an edited-away and a deleted text leave the WAL while the server runs on idle, and text
/// deleted just before a kill -9 is gone once the server is up again.
#[test]
fn a_deleted_text_is_gone_from_the_embedded_files() {
    let storage = Storage::new(Backend::Embedded);
    let mut server = Server::start(&storage);
    let user = unique("writer");
    let mut c = server.login(&user);
    let group = unique("erase");
    assert_eq!(
        ask(&mut c, "create_group", ug(&user, &group))["event"],
        "group_created"
    );
    let (secret, typo) = (
        format!("SECRET-{}", unique("x")),
        format!("TYPO-{}", unique("y")),
    );
    let seq = send(&mut c, &group, &secret);
    let edited = send(&mut c, &group, &typo);
    send(&mut c, &group, "kept");
    let deleted = ask(
        &mut c,
        "delete_message",
        json!({"group_name": group, "seq": seq}),
    );
    assert_eq!(deleted["event"], "message_deleted");
    let fixed = ask(
        &mut c,
        "edit_message",
        json!({"group_name": group, "seq": edited, "text": "fixed"}),
    );
    assert_eq!(fixed["event"], "message_edited");
    // The server runs on, idle: within seconds neither text is in any file.
    until_in_no_file(&storage.data_dir, &[&secret, &typo]);
    // Deleted just before a kill -9: gone once the server is up again.
    let late = format!("LATE-{}", unique("z"));
    let seq = send(&mut c, &group, &late);
    let deleted = ask(
        &mut c,
        "delete_message",
        json!({"group_name": group, "seq": seq}),
    );
    assert_eq!(deleted["event"], "message_deleted");
    server.kill();
    drop(c);
    let mut server = Server::start(&storage);
    let mut c = server.login(&user);
    assert_eq!(history(&mut c, &group).len(), 4, "nothing stored was lost");
    until_in_no_file(&storage.data_dir, &[&late]);
    drop(c);
    assert!(server.terminate().success());
}

/// Waits (30 s at most, else fails) until none of `texts` is in any file of the store.
fn until_in_no_file(data_dir: &std::path::Path, texts: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let found = texts
            .iter()
            .flat_map(|text| files_holding(data_dir, text))
            .collect::<Vec<_>>();
        if found.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "erased text still in {found:?} after 30 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Across two peers: an erasure made through the store closes the user's connection on the
/// other instance too (each polls the erasure log), and retention run by the instances
/// shows the same `first_seq` on both.
#[test]
fn erasure_and_retention_reach_every_peer() {
    let storage = Storage::new(Backend::Mongo);
    let retention = [
        ("RETENTION_MAX_MESSAGES", "3"),
        ("RETENTION_INTERVAL_MS", "200"),
    ];
    let (_redis, one, two) = two_peers(&storage, &retention);
    let (owner, gone) = (unique("owner"), unique("gone"));
    let mut o = one.login(&owner);
    let mut g = two.login(&gone);
    let group = group_with(&mut o, &owner, &mut [(&mut g, &gone)]);
    for i in 0..10 {
        send(&mut o, &group, &format!("m{i}"));
    }
    // Retention (either instance) leaves the newest 3; both instances' histories say so.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let page = ask(
            &mut g,
            "fetch_messages",
            json!({"group_name": group, "after_seq": 0}),
        );
        if page["data"]["first_seq"] == 8 || std::time::Instant::now() > deadline {
            assert_eq!(page["data"]["first_seq"], 8, "{page}");
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let page = ask(
        &mut o,
        "fetch_messages",
        json!({"group_name": group, "after_seq": 0}),
    );
    assert_eq!(page["data"]["first_seq"], 8, "{page}");
    let output = common::erase_user(&storage, &gone);
    assert!(output.status.success(), "{output:?}");
    let closing = loop {
        let line = g.recv();
        if line["event"] == "closing" {
            break line;
        }
    };
    assert_eq!(closing["data"]["code"], "account_erased", "{closing}");
}
