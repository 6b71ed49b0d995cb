//! Protocol fuzzing against the real server: random bytes and random JSON lines never crash it,
//! never hang it, and every connection still answers `ping` afterwards.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};

use common::{Backend, Server, Storage};
use proptest::prelude::*;
use proptest::test_runner::{TestCaseError, TestRunner};
use serde_json::{json, Value};

const EVENTS: [&str; 11] = [
    "find_user",
    "create_group",
    "join_group",
    "leave_group",
    "send_message",
    "visit_group",
    "enter_group",
    "fetch_messages",
    "list_groups",
    "ping",
    "nonsense",
];
const FIELDS: [&str; 9] = [
    "username",
    "group_name",
    "text",
    "before_seq",
    "after_seq",
    "limit",
    "$ne",
    "user",
    "",
];

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|n| json!(n)),
        ".{0,80}".prop_map(Value::String),
        prop::sample::select(&FIELDS[..]).prop_map(|s| json!(s)),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((prop::sample::select(&FIELDS[..]), inner), 0..6).prop_map(
                |pairs| Value::Object(pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
            ),
        ]
    })
}

fn request_like() -> impl Strategy<Value = Value> {
    (
        prop::sample::select(&EVENTS[..]),
        any_json(),
        any_json(),
        any::<bool>(),
    )
        .prop_map(|(event, data, id, as_string)| {
            let data = if as_string {
                json!(data.to_string())
            } else {
                data
            };
            json!({"event": event, "data": data, "id": id})
        })
}

/// Sends `bytes`, then a ping; the server must still answer it on the same connection.
fn survives(server: &Server, bytes: &[u8]) -> Result<(), TestCaseError> {
    CASES.fetch_add(1, Ordering::SeqCst);
    let mut client = server.connect();
    client.send_raw(bytes);
    client.send_raw(b"\n");
    prop_assert!(
        client.try_request_ping(),
        "no pong after {} bytes",
        bytes.len()
    );
    Ok(())
}

/// Cases actually run (so a misconfigured runner cannot pass by running nothing).
static CASES: AtomicUsize = AtomicUsize::new(0);

fn runner() -> TestRunner {
    TestRunner::new(ProptestConfig {
        cases: 300,
        failure_persistence: None,
        ..ProptestConfig::default()
    })
}

#[test]
fn random_input_never_breaks_the_server() {
    let storage = Storage::new(Backend::Embedded);
    let server = Server::start_with(&storage, &[("MAX_LINE_BYTES", "4096")]);
    runner()
        .run(&prop::collection::vec(any::<u8>(), 0..6000), |bytes| {
            survives(&server, &bytes)
        })
        .unwrap_or_else(|failure| panic!("random bytes: {failure}"));
    runner()
        .run(&prop::collection::vec(request_like(), 1..8), |requests| {
            let mut bytes = Vec::new();
            for request in &requests {
                bytes.extend(serde_json::to_vec(request).expect("encode"));
                bytes.push(b'\n');
            }
            survives(&server, &bytes)
        })
        .unwrap_or_else(|failure| panic!("random requests: {failure}"));
    assert!(
        CASES.load(Ordering::SeqCst) >= 600,
        "both runs ran their cases"
    );
    let mut client = server.connect();
    assert!(client.try_request_ping(), "the server is still up");
}
