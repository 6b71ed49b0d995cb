//! Issue 22, the newest hostile tests: replies that outgrew `MAX_REPLY_BYTES`, authentication
//! edge cases (empty secrets, pipelined guesses, failed refreshes, `sub` forms, `aud`), and
//! implicit read marks far below what reached the client. Each test failed on the main before.

mod common;

use std::process::{Command, Stdio};

use common::{pyjwt_token, ug, unique, unix_now, Backend, Server, Storage};
use serde_json::{json, Value};

backend_tests!(every_listing_reply_fits_max_reply_bytes_and_pages_the_rest);

/// The smallest `MAX_REPLY_BYTES` allowed with `MAX_LINE_BYTES=1024`.
const SMALL_REPLY: usize = 1024 + 32768;
const SECRET: &str = "hold-up-secret-0123456789-abcdefgh";

/// A name of 64 characters, 184 bytes of UTF-8: few of them fill a reply.
fn long_name(tag: &str, i: usize) -> String {
    format!("{}{tag}{i:04}", "語".repeat(60 - tag.chars().count()))
}

/// Sends every request at once and reads the replies (in request order).
fn pipelined(client: &mut common::Client, requests: &[Value]) -> Vec<Value> {
    let mut bytes = Vec::new();
    for request in requests {
        bytes.extend(serde_json::to_vec(request).expect("encode"));
        bytes.push(b'\n');
    }
    client.send_raw(&bytes);
    requests.iter().map(|_| client.recv()).collect()
}

/// Reads one reply line, checking its length on the wire.
fn fitting_reply(client: &mut common::Client, request: Value) -> Value {
    client.send(&request);
    let line = client.recv_line();
    assert!(
        line.len() <= SMALL_REPLY,
        "a {} byte reply to {request}",
        line.len()
    );
    serde_json::from_str(&line).expect("json")
}

fn every_listing_reply_fits_max_reply_bytes_and_pages_the_rest(backend: Backend) {
    let storage = Storage::new(backend);
    let server = Server::start_with(
        &storage,
        &[
            ("MAX_LINE_BYTES", "1024"),
            ("MAX_REPLY_BYTES", &SMALL_REPLY.to_string()),
            ("MAX_GROUPS_PER_USER", "0"),
        ],
    );
    let tag = unique("fit");
    let tag = &tag[tag.len() - 5..];
    let owner = long_name(&format!("o{tag}"), 0);
    let member = long_name(&format!("m{tag}"), 0);
    let mut owners = server.login(&owner);
    let mut members = server.login(&member);
    let groups: Vec<String> = (0..200).map(|i| long_name(tag, i)).collect();
    let creates: Vec<Value> = groups
        .iter()
        .map(|g| json!({"event": "create_group", "data": {"group_name": g}}))
        .collect();
    for reply in pipelined(&mut owners, &creates) {
        assert_eq!(reply["event"], "group_created", "{reply}");
    }
    let joins: Vec<Value> = groups
        .iter()
        .map(|g| json!({"event": "join_group", "data": {"group_name": g}}))
        .collect();
    for reply in pipelined(&mut members, &joins) {
        assert_eq!(reply["event"], "join_success", "{reply}");
    }

    // find_user: a bounded group_list, and a flag that says to page the rest with my_groups.
    let found = fitting_reply(
        &mut server.connect(),
        json!({"event": "find_user", "data": {"username": member}}),
    );
    let listed = found["data"]["group_list"].as_array().expect("list").len();
    assert!(listed > 0 && listed < 200, "{listed} names");
    assert_eq!(found["data"]["group_list_has_more"], true);

    // my_groups: every membership exactly once across pages, in name order.
    let mut seen: Vec<String> = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = fitting_reply(
            &mut members,
            json!({"event": "my_groups", "data": {"after": after}}),
        );
        assert_eq!(page["event"], "my_groups", "{page}");
        let rows = page["data"]["groups"].as_array().expect("groups");
        assert!(!rows.is_empty());
        seen.extend(
            rows.iter()
                .map(|g| g["group_name"].as_str().expect("name").into()),
        );
        if page["data"]["has_more"] == false {
            break;
        }
        after = Some(page["data"]["next_after"].as_str().expect("cursor").into());
        assert_eq!(after.as_deref(), seen.last().map(String::as_str));
    }
    let mut expected = groups.clone();
    expected.sort();
    let mine: Vec<String> = seen.into_iter().filter(|g| g.contains(tag)).collect();
    assert_eq!(mine, expected, "every group once, by name");

    // list_groups {limit: 100}: the page shrinks to fit, and next_after continues it.
    let page = fitting_reply(
        &mut members,
        json!({"event": "list_groups", "data": {"after": groups[0].trim_end_matches(char::is_numeric), "limit": 100}}),
    );
    let rows = page["data"]["groups"].as_array().expect("groups");
    assert!(rows.len() < 100, "{} rows", rows.len());
    assert_eq!(page["data"]["has_more"], true);
    assert_eq!(
        page["data"]["next_after"],
        rows.last().expect("a row")["group_name"]
    );
}

/// Starts the binary with `env` only and returns (exit code, stderr).
fn start_failing(env: &[(&str, &str)]) -> (Option<i32>, String) {
    let data = std::env::temp_dir().join(unique("secret-data"));
    let output = Command::new(common::BINARY)
        .env_clear()
        .env("PORT", "0")
        .env("DATA_DIR", &data)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run");
    let _ = std::fs::remove_dir_all(data);
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into(),
    )
}

#[test]
fn an_empty_or_short_secret_is_refused_at_start() {
    let file = std::env::temp_dir().join(unique("short-secret"));
    std::fs::write(&file, "short\n").expect("write");
    let path = file.display().to_string();
    for (env, name) in [
        (vec![("AUTH_SECRET", "")], "AUTH_SECRET"),
        (
            vec![("AUTH_SECRET", "31-bytes-is-one-byte-too-short")],
            "AUTH_SECRET",
        ),
        (
            vec![("AUTH_SECRET_FILE", path.as_str())],
            "AUTH_SECRET_FILE",
        ),
    ] {
        let (code, stderr) = start_failing(&env);
        assert_eq!(code, Some(2), "{env:?}: {stderr}");
        assert!(stderr.contains(name), "{env:?}: {stderr}");
        assert!(!stderr.contains("31-bytes-is"), "the secret is never shown");
    }
    let _ = std::fs::remove_file(file);
}

fn auth_server(storage: &Storage, extra: &[(&str, &str)]) -> Server {
    let mut env = vec![("AUTH_SECRET", SECRET)];
    env.extend_from_slice(extra);
    Server::start_with(storage, &env)
}

fn token(claims: Value) -> String {
    pyjwt_token(&claims, SECRET, "HS256")
}

fn find_user(username: &str, token: &str) -> Value {
    json!({"event": "find_user", "data": {"username": username, "token": token}})
}

#[test]
fn nothing_pipelined_after_the_third_failed_login_is_processed() {
    let storage = Storage::new(Backend::Embedded);
    let server = auth_server(&storage, &[]);
    let mut client = server.connect();
    let mut burst = Vec::new();
    // 100 guesses in one write: all of them reach the server's inbox before the first answer.
    for _ in 0..100 {
        burst.extend(serde_json::to_vec(&find_user("alice", "bad")).expect("encode"));
        burst.push(b'\n');
    }
    let _ = std::io::Write::write_all(&mut client.stream, &burst);
    let mut refused = 0;
    while let Some(line) = client.recv_or_closed() {
        match line["event"].as_str() {
            Some("error") => {
                assert_eq!(line["data"]["code"], "unauthorized", "{line}");
                refused += 1;
            }
            Some("closing") => assert_eq!(line["data"]["code"], "auth_failed"),
            _ => panic!("unexpected {line}"),
        }
    }
    assert_eq!(refused, 3, "three guesses answered, none after");
}

#[test]
fn a_good_login_forgives_earlier_failures_and_failed_refreshes_do_not_close() {
    let storage = Storage::new(Backend::Embedded);
    let server = auth_server(&storage, &[]);
    let mut client = server.connect();
    for _ in 0..2 {
        assert_eq!(
            client.request("find_user", json!({"username": "bob", "token": "x"}))["data"]["code"],
            "unauthorized"
        );
    }
    let good = token(json!({"sub": "bob", "exp": unix_now() + 600}));
    let login = client.request("find_user", json!({"username": "bob", "token": good}));
    assert_eq!(login["event"], "user_created", "{login}");
    let expired = token(json!({"sub": "bob", "exp": unix_now() - 600}));
    for _ in 0..5 {
        let refresh = client.request("find_user", json!({"username": "bob", "token": expired}));
        assert_eq!(refresh["data"]["code"], "unauthorized", "{refresh}");
    }
    assert!(client.try_request_ping(), "still connected and logged in");
    let groups = client.request("my_groups", json!({}));
    assert_eq!(groups["event"], "my_groups", "{groups}");
}

#[test]
fn sub_is_compared_in_nfc_and_aud_is_checked_when_configured() {
    let storage = Storage::new(Backend::Embedded);
    let open = auth_server(&storage, &[]);
    let exp = unix_now() + 600;
    let decomposed = token(json!({"sub": "jose\u{301}", "exp": exp}));
    let login = open.connect().request(
        "find_user",
        json!({"username": "jos\u{e9}", "token": decomposed}),
    );
    assert_eq!(login["event"], "user_created", "{login}");
    let with_aud = token(json!({"sub": "ann", "exp": exp, "aud": "elsewhere"}));
    let login = open
        .connect()
        .request("find_user", json!({"username": "ann", "token": with_aud}));
    assert_eq!(
        login["event"], "user_created",
        "aud is not checked unless configured: {login}"
    );

    let strict_storage = Storage::new(Backend::Embedded);
    let strict = auth_server(&strict_storage, &[("AUTH_AUDIENCE", "chat")]);
    for (claims, admitted) in [
        (json!({"sub": "cy", "exp": exp, "aud": "chat"}), true),
        (
            json!({"sub": "cy", "exp": exp, "aud": ["mail", "chat"]}),
            true,
        ),
        (json!({"sub": "cy", "exp": exp, "aud": "mail"}), false),
        (json!({"sub": "cy", "exp": exp}), false),
    ] {
        let reply = strict.connect().request(
            "find_user",
            json!({"username": "cy", "token": token(claims.clone())}),
        );
        assert_eq!(
            reply["event"] != "error",
            admitted,
            "{claims} with AUTH_AUDIENCE=chat: {reply}"
        );
    }
}

/// A reader cut off as a slow consumer still receives what was in the kernel's send queue;
/// its read marker must count that too (it was at 1 with 62 received), never more.
#[test]
fn a_slow_consumers_read_marker_counts_what_reached_it() {
    let storage = Storage::new(Backend::Embedded);
    let server = Server::start_with(&storage, &[("MAX_OUTPUT_BYTES", "100000")]);
    let group = unique("marks");
    let mut writer = server.login("writer");
    writer.request("create_group", ug("writer", &group));
    let mut reader = server.connect_small_window();
    reader.request("find_user", json!({"username": "reader"}));
    reader.request("join_group", ug("reader", &group));
    reader.request("enter_group", ug("reader", &group));
    let sends: Vec<Value> = (0..200)
        .map(|i| {
            json!({"event": "send_message", "data": {"group_name": group, "text": format!("{i:04}{}", "x".repeat(3990))}})
        })
        .collect();
    for ack in pipelined(&mut writer, &sends) {
        assert_eq!(ack["event"], "message_sent");
    }
    let mut received = Vec::new();
    let mut closing = None;
    while let Some(line) = reader.recv_or_closed() {
        match line["event"].as_str() {
            Some("message_sent") => received.push(line["data"]["seq"].as_u64().expect("seq")),
            Some("closing") => closing = Some(line["data"]["code"].clone()),
            _ => {}
        }
    }
    assert_eq!(closing, Some(json!("slow_consumer")));
    let last = *received.last().expect("some arrived");
    assert_eq!(received, (1..=last).collect::<Vec<_>>());
    // The mark is written when the server closes, just after the client read its last line.
    let mut marker = 0;
    for _ in 0..100 {
        let mine = server.login("reader").request("my_groups", json!({}));
        marker = mine["data"]["groups"][0]["last_read_seq"]
            .as_u64()
            .unwrap_or(0);
        if marker > 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(
        marker <= last && marker + 2 >= last,
        "marker {marker}, {last} received"
    );
}
