//! Issue 37 items 1-4: direct conversations, blocking, mentions and notification levels, as
//! people use them: on one instance with each store, and across two peers (the two users of a
//! direct conversation on different instances, a mention of a user on the other instance).

mod common;

use common::{
    ask, next_of, nothing_pending, ug, unique, v3, Backend, Client, LocalService, Server, Storage,
};
use serde_json::{json, Value};

fn send(client: &mut Client, group: &str, text: &str, mentions: Value) -> Value {
    ask(
        client,
        "send_message",
        json!({"group_name": group, "text": text, "mentions": mentions}),
    )
}

/// The user's `my_groups` row of a conversation, if listed.
fn row(client: &mut Client, group: &str) -> Option<Value> {
    let page = ask(client, "my_groups", json!({}));
    let groups = page["data"]["groups"].as_array().expect("groups").clone();
    groups.into_iter().find(|g| g["group_name"] == group)
}

fn count_messages(client: &mut Client, group: &str) -> usize {
    let page = ask(
        client,
        "fetch_messages",
        json!({"group_name": group, "limit": 100}),
    );
    page["data"]["messages"].as_array().map_or(0, Vec::len)
}

/// A direct conversation between users on `a` and `b`: the same conversation whoever opens
/// it, shown to the other at its first message, private to the pair, hidden by leaving until
/// the next message, closed by a block.
fn talk_directly(a: &Server, b: &Server) {
    let (ann, bob, eve) = (unique("ann"), unique("bob"), unique("eve"));
    let mut ann_c = v3(a, &ann);
    let mut bob_c = v3(b, &bob);
    let mut bob_phone = v3(a, &bob);
    let mut eve_c = v3(a, &eve);

    let opened = ask(&mut ann_c, "open_direct", json!({"username": bob}));
    assert_eq!(opened["event"], "direct_opened", "{opened}");
    let dm = opened["data"]["group_name"]
        .as_str()
        .expect("name")
        .to_string();
    assert!(dm.starts_with("@dm:"), "{dm}");
    assert_eq!(opened["data"]["with"], bob.as_str());
    let again = ask(&mut ann_c, "open_direct", json!({"username": bob}));
    assert_eq!(
        again["data"]["group_name"],
        dm.as_str(),
        "opening twice is safe"
    );
    assert!(
        row(&mut bob_c, &dm).is_none(),
        "not shown before its first message"
    );

    // The first message shows it to the other user, on every instance.
    let sent = send(&mut ann_c, &dm, "hello bob", json!([]));
    assert_eq!(sent["event"], "message_sent", "{sent}");
    for device in [&mut bob_c, &mut bob_phone] {
        let shown = next_of(device, &["direct_opened"]);
        assert_eq!(
            shown["data"],
            json!({"group_name": dm, "with": ann, "seq": 1}),
            "{shown}"
        );
    }
    let listed = row(&mut bob_c, &dm).expect("listed once its first message arrived");
    assert_eq!(listed["kind"], "direct");
    assert_eq!(listed["with"], ann.as_str());
    assert_eq!(listed["unread_count"], 1);
    let mine = row(&mut ann_c, &dm).expect("the opener's");
    assert_eq!(mine["with"], bob.as_str());

    // Bob opening it finds the same conversation; both talk in it like a group.
    let bobs = ask(&mut bob_c, "open_direct", json!({"username": ann}));
    assert_eq!(bobs["data"]["group_name"], dm.as_str());
    let entered = ask(&mut bob_c, "enter_group", json!({"group_name": dm}));
    assert_eq!(entered["event"], "enter_group", "{entered}");
    let reply = send(&mut bob_c, &dm, "hi ann", json!([]));
    assert_eq!(reply["data"]["seq"], 2, "{reply}");
    assert_eq!(count_messages(&mut ann_c, &dm), 2);

    // Nobody else can find, join, enter, read or write it.
    for (event, data) in [
        ("join_group", json!({"username": eve, "group_name": dm})),
        ("enter_group", json!({"group_name": dm})),
        ("fetch_messages", json!({"group_name": dm})),
        (
            "send_message",
            json!({"group_name": dm, "text": "let me in"}),
        ),
    ] {
        let refused = ask(&mut eve_c, event, data);
        assert_eq!(refused["event"], "group_not_found", "{event}: {refused}");
    }
    let listed = ask(&mut eve_c, "list_groups", json!({}));
    assert!(
        !listed.to_string().contains("@dm:"),
        "direct conversations are not listed: {listed}"
    );
    let taken = ask(&mut eve_c, "create_group", ug(&eve, "@dm:0123"));
    assert_eq!(taken["data"]["code"], "bad_request", "{taken}");
    let myself = ask(&mut eve_c, "open_direct", json!({"username": eve}));
    assert_eq!(myself["data"]["code"], "bad_request", "{myself}");
    let nobody = ask(
        &mut eve_c,
        "open_direct",
        json!({"username": unique("ghost")}),
    );
    assert_eq!(nobody["event"], "name_not_found", "{nobody}");

    // Leaving hides it until the next message.
    let left = ask(&mut ann_c, "leave_group", ug(&ann, &dm));
    assert_eq!(left["event"], "leave_success", "{left}");
    assert!(row(&mut ann_c, &dm).is_none(), "hidden after leaving");
    send(&mut bob_c, &dm, "are you there?", json!([]));
    let back = next_of(&mut ann_c, &["direct_opened"]);
    assert_eq!(back["data"]["seq"], 3, "{back}");
    assert!(
        row(&mut ann_c, &dm).is_some(),
        "shown again by the next message"
    );

    // A block: the blocked user can neither open nor write; the words name no block.
    let blocked = ask(&mut bob_c, "block_user", json!({"username": ann}));
    assert_eq!(blocked["event"], "blocked_users", "{blocked}");
    assert_eq!(blocked["data"]["users"], json!([ann]));
    let synced = next_of(&mut bob_phone, &["blocked_users"]);
    assert_eq!(
        synced["data"]["users"],
        json!([ann]),
        "synced to the other device"
    );
    let refused = send(&mut ann_c, &dm, "please", json!([]));
    assert_eq!(refused["data"]["code"], "forbidden", "{refused}");
    assert!(!refused.to_string().contains("block"), "{refused}");
    let reopen = ask(&mut ann_c, "open_direct", json!({"username": bob}));
    assert_eq!(reopen["data"]["code"], "forbidden", "{reopen}");
    assert_eq!(count_messages(&mut bob_c, &dm), 3, "nothing stored");
    let list = ask(&mut bob_c, "list_blocked", json!({}));
    assert_eq!(list["data"]["users"], json!([ann]));
    let unblocked = ask(&mut bob_c, "unblock_user", json!({"username": ann}));
    assert_eq!(unblocked["data"]["users"], json!([]));
    let sent = send(&mut ann_c, &dm, "thanks", json!([]));
    assert_eq!(sent["event"], "message_sent", "{sent}");
}

/// Mentions: validated against the members, counted apart from unread until read, heard at
/// once outside the room, changed by edits and deletes; and notification levels.
fn get_attention(a: &Server, b: &Server) {
    let (ann, bob, cy) = (unique("ann"), unique("bob"), unique("cy"));
    let group = unique("team");
    let mut ann_c = v3(a, &ann);
    let mut bob_c = v3(b, &bob);
    let mut bob_laptop = v3(a, &bob);
    let mut cy_c = v3(a, &cy);
    let mut bob_old = b.login(&bob); // protocol 2
    ask(&mut ann_c, "create_group", ug(&ann, &group));
    ask(&mut bob_c, "join_group", ug(&bob, &group));
    ask(&mut cy_c, "join_group", ug(&cy, &group));

    let sent = send(&mut ann_c, &group, "bob, look", json!([bob]));
    assert_eq!(sent["data"]["mentions"], json!([bob]), "{sent}");
    for device in [&mut bob_c, &mut bob_laptop] {
        let heard = next_of(device, &["mentioned"]);
        assert_eq!(
            heard["data"],
            json!({"group_name": group, "seq": 1, "by": ann}),
            "{heard}"
        );
    }
    // The sidebar's notice counts it too (a trailing notice when the first went out before).
    loop {
        let activity = next_of(&mut bob_c, &["group_activity"]);
        if activity["data"]["group_name"] == group.as_str()
            && activity["data"]["mention_count"] == 1
        {
            break;
        }
    }
    let listed = row(&mut bob_c, &group).expect("member");
    assert_eq!(listed["mention_count"], 1, "{listed}");
    assert_eq!(listed["unread_count"], 1);
    assert_eq!(listed["notify"], "all");
    let old_row = row(&mut bob_old, &group).expect("member");
    assert!(
        old_row.get("mention_count").is_none(),
        "protocol 2 unchanged: {old_row}"
    );

    // Refused mentions store nothing.
    let stranger = send(&mut ann_c, &group, "who?", json!([unique("stranger")]));
    assert_eq!(stranger["data"]["code"], "not_mentionable", "{stranger}");
    let everyone = send(&mut cy_c, &group, "all of you", json!(["@room"]));
    assert_eq!(everyone["data"]["code"], "forbidden", "{everyone}");
    assert_eq!(count_messages(&mut ann_c, &group), 1, "nothing stored");

    // The owner's @room reaches every member but the sender; plain messages count no mention.
    send(&mut ann_c, &group, "meeting now", json!(["@room"]));
    let heard = next_of(&mut cy_c, &["mentioned"]);
    assert_eq!(heard["data"]["seq"], 2, "{heard}");
    send(&mut ann_c, &group, "just chatting", json!([]));
    assert_eq!(row(&mut bob_c, &group).expect("member")["mention_count"], 2);

    // An edit that drops the mention stops it counting; so does a delete.
    let edited = ask(
        &mut ann_c,
        "edit_message",
        json!({"group_name": group, "seq": 1, "text": "never mind", "mentions": []}),
    );
    assert_eq!(edited["event"], "message_edited", "{edited}");
    assert_eq!(row(&mut bob_c, &group).expect("member")["mention_count"], 1);
    let deleted = ask(
        &mut ann_c,
        "delete_message",
        json!({"group_name": group, "seq": 2}),
    );
    assert_eq!(deleted["event"], "message_deleted", "{deleted}");
    assert_eq!(row(&mut bob_c, &group).expect("member")["mention_count"], 0);
    let readd = ask(
        &mut ann_c,
        "edit_message",
        json!({"group_name": group, "seq": 1, "text": "bob, look again", "mentions": [bob]}),
    );
    assert_eq!(readd["data"]["mentions"], json!([bob]), "{readd}");
    assert_eq!(row(&mut bob_c, &group).expect("member")["mention_count"], 1);

    // Reading up to the head clears it; the other device hears the marker with the count.
    let marked = ask(
        &mut bob_c,
        "mark_read",
        json!({"group_name": group, "seq": 3}),
    );
    assert_eq!(marked["data"]["mention_count"], 0, "{marked}");
    let synced = next_of(&mut bob_laptop, &["read_marker"]);
    assert_eq!(synced["data"]["mention_count"], 0, "{synced}");

    // Notification levels: stored, listed, synced, checked.
    let set = ask(
        &mut bob_c,
        "set_notify",
        json!({"group_name": group, "level": "mentions"}),
    );
    assert_eq!(set["event"], "notify_set", "{set}");
    let synced = next_of(&mut bob_laptop, &["notify_set"]);
    assert_eq!(synced["data"]["level"], "mentions");
    assert_eq!(
        row(&mut bob_laptop, &group).expect("member")["notify"],
        "mentions"
    );
    let bad = ask(
        &mut bob_c,
        "set_notify",
        json!({"group_name": group, "level": "loud"}),
    );
    assert_eq!(bad["data"]["code"], "bad_request", "{bad}");
    let outsider = ask(
        &mut bob_c,
        "set_notify",
        json!({"group_name": unique("nowhere"), "level": "none"}),
    );
    assert_eq!(outsider["event"], "group_not_found", "{outsider}");

    // In the room, a mention arrives as the message itself, not as `mentioned`.
    ask(&mut bob_c, "enter_group", json!({"group_name": group}));
    send(&mut ann_c, &group, "in the room", json!([bob]));
    let line = next_of(&mut bob_c, &["message_sent", "mentioned"]);
    assert_eq!(line["event"], "message_sent", "{line}");
    let extra = nothing_pending(&mut bob_c);
    assert!(extra.iter().all(|l| l["event"] != "mentioned"), "{extra:?}");
}

#[test]
fn direct_conversations_on_the_embedded_store() {
    let storage = Storage::new(Backend::Embedded);
    let server = Server::start(&storage);
    talk_directly(&server, &server);
}

#[test]
fn direct_conversations_on_mongodb() {
    let storage = Storage::new(Backend::Mongo);
    let server = Server::start(&storage);
    talk_directly(&server, &server);
}

#[test]
fn mentions_and_levels_on_the_embedded_store() {
    let storage = Storage::new(Backend::Embedded);
    let server = Server::start(&storage);
    get_attention(&server, &server);
}

#[test]
fn mentions_and_levels_on_mongodb() {
    let storage = Storage::new(Backend::Mongo);
    let server = Server::start(&storage);
    get_attention(&server, &server);
}

#[test]
fn direct_conversations_and_mentions_across_peers() {
    let storage = Storage::new(Backend::Mongo);
    let redis = LocalService::redis();
    let nodes = ["attention_a", "attention_b"];
    let (a, b) = common::peer_pair(&storage, &redis.redis_url(), "shared", nodes);
    talk_directly(&a, &b);
    get_attention(&a, &b);
}
