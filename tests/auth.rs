//! Token authentication (issue 14): with `AUTH_SECRET` set, `find_user` needs an HS256 JWT
//! whose `sub` is the username. Tokens are minted by PyJWT (an independent implementation, as
//! an operator's application would) and by `noomnim token`; every bad token gets the same
//! `unauthorized` reply, creates nothing, and the third failure closes the connection.

mod common;

use std::time::Duration;

use common::{pyjwt_token, server_token, unix_now, Backend, Server, Storage};
use serde_json::{json, Value};

const SECRET: &str = "test-secret-0123456789-abcdefghij";

fn start(storage: &Storage, extra: &[(&str, &str)]) -> Server {
    let mut env = vec![("AUTH_SECRET", SECRET)];
    env.extend_from_slice(extra);
    Server::start_with(storage, &env)
}

fn claims(sub: &str, exp_from_now: i64) -> Value {
    json!({ "sub": sub, "exp": unix_now() as i64 + exp_from_now })
}

fn find_user(client: &mut common::Client, username: &str, token: Option<&str>) -> Value {
    let mut data = json!({ "username": username });
    if let Some(token) = token {
        data["token"] = json!(token);
    }
    client.request("find_user", data)
}

fn assert_unauthorized(reply: &Value, case: &str) {
    assert_eq!(
        reply["data"],
        json!({"Error": "Authentication failed.", "code": "unauthorized"}),
        "{case}: {reply}"
    );
}

#[test]
fn tokens_from_pyjwt_and_noomnim_token_log_in_and_bad_ones_do_not() {
    let storage = Storage::new(Backend::Embedded);
    let server = start(&storage, &[]);
    let hello = server.connect().request("hello", json!({}));
    assert_eq!(hello["data"]["auth"], "token", "{hello}");

    let good = pyjwt_token(&claims("alice", 600), SECRET, "HS256");
    let mut alice = server.connect();
    assert_eq!(
        find_user(&mut alice, "alice", Some(&good))["event"],
        "user_created"
    );
    let own = server_token(SECRET, "alice", 60);
    let mut again = server.connect();
    assert_eq!(
        find_user(&mut again, "alice", Some(&own))["event"],
        "user_found"
    );
    // 30 s leeway: a token that expired 10 s ago still passes; one with iat and nbf in the
    // recent past too.
    let recent = pyjwt_token(&claims("alice", -10), SECRET, "HS256");
    assert_eq!(
        find_user(&mut server.connect(), "alice", Some(&recent))["event"],
        "user_found"
    );
    let full = json!({"sub": "alice", "exp": unix_now() + 60, "iat": unix_now() - 5, "nbf": unix_now() - 5});
    let full = pyjwt_token(&full, SECRET, "HS256");
    assert_eq!(
        find_user(&mut server.connect(), "alice", Some(&full))["event"],
        "user_found"
    );

    // Tampering: a valid token for mallory with one signature character changed, and
    // mallory's header and claims under alice's valid signature.
    let mallory_token = pyjwt_token(&claims("mallory", 600), SECRET, "HS256");
    let mut bad_signature = mallory_token.clone();
    let last = bad_signature.pop().expect("signature");
    bad_signature.push(if last == 'A' { 'B' } else { 'A' });
    let (mallory_body, _) = mallory_token.rsplit_once('.').expect("jwt");
    let (_, alice_signature) = good.rsplit_once('.').expect("jwt");
    let borrowed_signature = format!("{mallory_body}.{alice_signature}");
    let no_exp = pyjwt_token(&json!({"sub": "mallory"}), SECRET, "HS256");
    let cases: Vec<(&str, Option<String>)> = vec![
        ("no token", None),
        ("empty token", Some(String::new())),
        ("garbage", Some("not.a.token".into())),
        (
            "expired",
            Some(pyjwt_token(&claims("mallory", -120), SECRET, "HS256")),
        ),
        (
            "not yet valid",
            Some(pyjwt_token(
                &json!({"sub": "mallory", "exp": unix_now() + 900, "nbf": unix_now() + 300}),
                SECRET,
                "HS256",
            )),
        ),
        (
            "issued in the future",
            Some(pyjwt_token(
                &json!({"sub": "mallory", "exp": unix_now() + 900, "iat": unix_now() + 300}),
                SECRET,
                "HS256",
            )),
        ),
        ("no exp", Some(no_exp)),
        (
            "wrong sub",
            Some(pyjwt_token(&claims("alice", 600), SECRET, "HS256")),
        ),
        (
            "wrong secret",
            Some(pyjwt_token(
                &claims("mallory", 600),
                "other-secret-0123456789",
                "HS256",
            )),
        ),
        (
            "alg none",
            Some(pyjwt_token(&claims("mallory", 600), SECRET, "none")),
        ),
        (
            "HS512",
            Some(pyjwt_token(&claims("mallory", 600), SECRET, "HS512")),
        ),
        ("bad signature", Some(bad_signature)),
        ("borrowed signature", Some(borrowed_signature)),
        ("other user's token", Some(good.clone())),
    ];
    for (case, token) in &cases {
        // A fresh connection per case: the third failure on one connection closes it.
        let mut client = server.connect();
        let reply = find_user(&mut client, "mallory", token.as_deref());
        assert_unauthorized(&reply, case);
        let after = client.request("list_groups", json!({}));
        assert_eq!(
            after["data"]["code"], "not_logged_in",
            "{case}: still not logged in"
        );
    }
    // Nothing was created: a good token for mallory makes a *new* user.
    assert_eq!(
        find_user(&mut server.connect(), "mallory", Some(&mallory_token))["event"],
        "user_created"
    );
    // The secret is never logged, even at trace level (this server logs at info; see below).
    assert!(!server.log_text().contains(SECRET));
}

#[test]
fn the_third_failure_closes_the_connection_with_auth_failed() {
    let storage = Storage::new(Backend::Embedded);
    let server = start(&storage, &[("LOG_LEVEL", "trace")]);
    let mut client = server.connect();
    let bad = pyjwt_token(&claims("eve", 600), "wrong-secret-0123456789", "HS256");
    assert_unauthorized(&find_user(&mut client, "eve", Some(&bad)), "first");
    assert_unauthorized(&find_user(&mut client, "eve", None), "second");
    client
        .send(&json!({"event": "find_user", "data": {"username": "eve", "token": bad}, "id": 99}));
    let reply = client.recv();
    assert_unauthorized(&reply, "third");
    let closing = client.recv();
    assert_eq!(closing["event"], "closing", "{closing}");
    assert_eq!(closing["data"]["code"], "auth_failed");
    assert!(client.recv_or_closed().is_none(), "closed after closing");
    // Failures are counted per connection: two, then a good token, is a login.
    let mut careful = server.connect();
    assert_unauthorized(&find_user(&mut careful, "eve", None), "first");
    assert_unauthorized(&find_user(&mut careful, "eve", Some(&bad)), "second");
    let good = server_token(SECRET, "eve", 60);
    assert_eq!(
        find_user(&mut careful, "eve", Some(&good))["event"],
        "user_created"
    );
    assert!(careful.try_request_ping());
    assert!(
        !server.log_text().contains(SECRET),
        "the secret is never logged"
    );
    assert!(
        !server.log_text().contains(&good),
        "tokens are never logged"
    );
}

#[test]
fn the_secret_stays_out_of_help_metrics_and_logs() {
    let dir = std::env::temp_dir().join(common::unique("secret-file"));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("auth_secret");
    std::fs::write(&file, format!("{SECRET}\n")).expect("write secret");
    let storage = Storage::new(Backend::Embedded);
    let path = file.display().to_string();
    let server = Server::start_with(
        &storage,
        &[
            ("AUTH_SECRET_FILE", path.as_str()),
            ("METRICS_PORT", "0"),
            ("LOG_LEVEL", "trace"),
        ],
    );
    // The file's trailing newline is not part of the secret.
    let token = pyjwt_token(&claims("carol", 600), SECRET, "HS256");
    let mut carol = server.login_with_token("carol", &token);
    assert!(carol.try_request_ping());
    let metrics_addr = server.metrics_addr().expect("metrics");
    let mut http = std::net::TcpStream::connect(&metrics_addr).expect("metrics");
    use std::io::{Read, Write};
    http.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        .expect("get");
    let mut page = String::new();
    http.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let _ = http.read_to_string(&mut page);
    assert!(
        page.contains("unauthorized") || page.contains("noomnim_"),
        "{page}"
    );
    assert!(!page.contains(SECRET));
    let help = std::process::Command::new(common::BINARY)
        .env("AUTH_SECRET", SECRET)
        .arg("--help")
        .output()
        .expect("help");
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("AUTH_SECRET") && !help.contains(SECRET));
    assert!(!server.log_text().contains(SECRET));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn without_a_secret_anyone_may_log_in_and_a_public_bind_is_warned_about() {
    let storage = Storage::new(Backend::Embedded);
    let server = Server::start_with(&storage, &[("BIND", "0.0.0.0")]);
    assert!(server.logged("no AUTH_SECRET"), "{}", server.log_text());
    let hello = server.connect().request("hello", json!({}));
    assert_eq!(hello["data"]["auth"], "none");
    let mut client = Server::connect(&server);
    assert_eq!(
        find_user(&mut client, "anyone", None)["event"],
        "user_created"
    );
}

/// Peer mode with tokens: both instances check tokens with the same secret.
#[test]
fn peers_check_tokens_with_the_shared_secret() {
    let storage = Storage::new(Backend::Mongo);
    let redis = common::LocalService::redis();
    let start = |node: &str| {
        start(
            &storage,
            &[
                ("PEER", "true"),
                ("REDIS_URL", &redis.redis_url()),
                ("NODE_ID", node),
            ],
        )
    };
    let (a, b) = (start("auth_a"), start("auth_b"));
    for server in [&a, &b] {
        assert!(server.logged("peer subscriber: connected"));
    }
    let group = common::unique("authpeers");
    let mut alice = a.login_with_token("alice", &server_token(SECRET, "alice", 60));
    alice.request("create_group", common::ug("alice", &group));
    let mut bob = b.login_with_token("bob", &pyjwt_token(&claims("bob", 60), SECRET, "HS256"));
    bob.request("join_group", common::ug("bob", &group));
    bob.request("enter_group", common::ug("bob", &group));
    alice.request(
        "send_message",
        common::msg("alice", &group, "over the relay"),
    );
    let line = bob.recv();
    assert_eq!(line["data"]["text"], "over the relay", "{line}");
    assert_unauthorized(&find_user(&mut b.connect(), "alice", None), "peer b");
}

/// Issue 26 item 3: `LOG_FORMAT=json` writes one JSON object per line (time, level, target,
/// message), and neither the secret nor a token ever appears in it.
#[test]
fn json_logs_are_one_object_per_line_without_secrets() {
    let storage = Storage::new(Backend::Embedded);
    let server = start(&storage, &[("LOG_FORMAT", "json"), ("LOG_LEVEL", "trace")]);
    let good = pyjwt_token(&claims("dora", 600), SECRET, "HS256");
    let mut dora = server.login_with_token("dora", &good);
    assert!(dora.try_request_ping());
    assert_unauthorized(
        &find_user(&mut server.connect(), "dora", Some("bad.token.here")),
        "bad",
    );
    drop(dora);
    assert!(server.logged("closed"), "{}", server.log_text());
    let log = server.log_text();
    assert!(
        !log.contains(SECRET) && !log.contains(&good),
        "no secret, no token"
    );
    let mut lines = 0;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let value: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}"));
        for key in ["time", "level", "target", "message"] {
            assert!(value[key].is_string(), "{key} in {line}");
        }
        lines += 1;
    }
    assert!(lines >= 2, "{log}");
}
