//! Issue 27: people typing at Debian's `telnet` in their own language. The real client runs
//! under tmux (send-keys types, capture-pane reads the screen), and what the server stored is
//! checked byte for byte. Plain `telnet HOST PORT` starts in its 7-bit mode, which mangles
//! some UTF-8 bytes; the server undoes what it can and switches the client to 8-bit input at
//! its first telnet command. `telnet -- HOST -PORT` negotiates at once, so everything passes
//! from the first line.

mod common;

use common::tmux::Tmux;
use common::{unique, Backend, Server, Storage};
use serde_json::{json, Value};

/// What people type, one message each: Latin with diacritics, Greek, Cyrillic, CJK, symbols,
/// emoji. "check ✓ mark" comes first: its 0x9C is what the 7-bit client turns into a telnet
/// command, and what makes the server switch the client to 8-bit input.
const TEXTS: [&str; 8] = [
    "check ✓ mark",
    "café zoë Ąą Ýý Üü",
    "Ωmega σίγμα Ώ",
    "Привет, как дела? хорошо, я рад",
    "Ж Ӝ њ",
    "日本語のテキスト 本",
    "© ® ± µ ¶ ✓",
    "emoji 🙂 ok 👍",
];

fn request(event: &str, data: Value) -> String {
    json!({"event": event, "data": data}).to_string()
}

/// Types `texts` as messages to a new group in a telnet started with `args`, and returns what
/// the store holds afterwards, in order.
fn typed_through_telnet(server: &Server, args: &str, texts: &[&str]) -> (Vec<String>, String) {
    let port = server.addr.port();
    let tmux = Tmux::start(&format!(
        "telnet {}",
        args.replace("PORT", &port.to_string())
    ));
    tmux.wait_for("Escape character", 1);
    let user = unique("tn");
    let group = unique("tng");
    tmux.type_line(&request("find_user", json!({"username": user})));
    tmux.wait_for("user_created", 1);
    tmux.type_line(&request("create_group", json!({"group_name": group})));
    tmux.wait_for("group_created", 1);
    for (i, text) in texts.iter().enumerate() {
        tmux.type_line(&request(
            "send_message",
            json!({"group_name": group, "text": text}),
        ));
        // One answer per line, whichever it is, before the next is typed (typed lines are
        // echoed on the screen too, so only the server's answers are counted).
        let answers = |screen: &str| {
            screen.matches("{\"event\":\"message_sent\"").count()
                + screen.matches("{\"event\":\"error\"").count()
        };
        let screen = tmux.wait_until(|screen| answers(screen) > i);
        assert!(
            answers(&screen) > i,
            "no answer to line {i} in telnet {args}:\n{screen}"
        );
    }
    let mut reader = server.login(&user);
    let stored = common::fetch_all(&mut reader, &user, &group)
        .iter()
        .map(|m| m["text"].as_str().expect("text").to_string())
        .collect();
    (stored, tmux.screen())
}

#[test]
fn plain_telnet_delivers_every_script_exactly_as_typed() {
    let storage = Storage::new(Backend::Embedded);
    let server = Server::start(&storage);
    let (stored, screen) = typed_through_telnet(&server, "127.0.0.1 PORT", &TEXTS);
    assert_eq!(stored, TEXTS, "byte for byte, in order:\n{screen}");
}

#[test]
fn telnet_8_bit_without_escape_delivers_every_script_exactly_as_typed() {
    let storage = Storage::new(Backend::Embedded);
    let server = Server::start(&storage);
    // `-8 -E`: no escape character, but with a plain port the client still starts in its
    // 7-bit mode (its comparison follows the BINARY option), so the server's switch matters.
    let (stored, screen) = typed_through_telnet(&server, "-8 -E 127.0.0.1 PORT", &TEXTS);
    assert_eq!(stored, TEXTS, "byte for byte, in order:\n{screen}");
}

#[test]
fn telnet_with_a_dashed_port_is_8_bit_from_the_first_line() {
    let storage = Storage::new(Backend::Embedded);
    let server = Server::start(&storage);
    // Letters that a 7-bit client never sends (0x85: its echo toggle; 0x9D: its escape
    // character), first: the dashed port makes it negotiate before anything is typed.
    let mut texts = vec!["Ąą хорошо Ýý"];
    texts.extend(TEXTS);
    let (stored, screen) = typed_through_telnet(&server, "-- 127.0.0.1 -PORT", &texts);
    assert_eq!(stored, texts, "byte for byte, in order:\n{screen}");
}

#[test]
fn a_line_telnet_broke_gets_an_error_that_says_how_to_start_it() {
    let storage = Storage::new(Backend::Embedded);
    let server = Server::start(&storage);
    // "ą" (C4 85) first: 0x85 is the 7-bit client's echo toggle and never leaves it.
    let (stored, screen) =
        typed_through_telnet(&server, "127.0.0.1 PORT", &["Ąą", "check ✓ mark", "Ąą"]);
    assert!(
        screen.contains("telnet -- HOST -PORT"),
        "the error says how to start telnet:\n{screen}"
    );
    assert_eq!(
        stored,
        ["check ✓ mark", "Ąą"],
        "after the switch to 8-bit the same text passes"
    );
}

/// The same byte sequences from a client that never speaks telnet (no 0xFF byte) are stored
/// exactly, or refused when they are not UTF-8, as before; nothing telnet is ever sent back.
#[test]
fn clients_that_do_not_speak_telnet_are_never_touched() {
    let storage = Storage::new(Backend::Embedded);
    let server = Server::start(&storage);
    let group = unique("raw");
    let mut client = server.login("raw");
    client.request("create_group", json!({"group_name": group}));
    for text in TEXTS {
        let ack = client.request("send_message", json!({"group_name": group, "text": text}));
        assert_eq!(ack["data"]["text"], text, "{ack}");
    }
    let mut broken = br#"{"event":"send_message","data":{"group_name":""#.to_vec();
    broken.extend(group.as_bytes());
    broken.extend(b"\",\"text\":\"\xC4 x\"}}\n");
    client.send_raw(&broken);
    let reply = client.recv_line();
    assert!(
        reply.starts_with("{\"event\":\"error\"") && reply.contains("bad_json"),
        "{reply}"
    );
    assert!(
        !reply.as_bytes().contains(&0xFF),
        "no telnet bytes to a non-telnet client"
    );
    let stored: Vec<Value> = common::fetch_all(&mut client, "raw", &group);
    let texts: Vec<&str> = stored.iter().filter_map(|m| m["text"].as_str()).collect();
    assert_eq!(texts, TEXTS);
}
