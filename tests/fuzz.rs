//! Protocol fuzzing against the real server: random bytes and random JSON lines never crash it,
//! never hang it, and every connection still answers `ping` afterwards.

mod common;

use std::sync::OnceLock;

use common::{Backend, Server, Storage};
use proptest::prelude::*;
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

fn server() -> &'static (Storage, Server) {
    static SERVER: OnceLock<(Storage, Server)> = OnceLock::new();
    SERVER.get_or_init(|| {
        let storage = Storage::new(Backend::Embedded);
        let server = Server::start_with(&storage, &[("MAX_LINE_BYTES", "4096")]);
        (storage, server)
    })
}

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
fn survives(bytes: &[u8]) {
    let (_, server) = server();
    let mut client = server.connect();
    client.send_raw(bytes);
    client.send_raw(b"\n");
    assert!(
        client.try_request_ping(),
        "no pong after {:?}",
        String::from_utf8_lossy(bytes)
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_break_the_server(bytes in prop::collection::vec(any::<u8>(), 0..6000)) {
        survives(&bytes);
    }

    #[test]
    fn random_requests_never_break_the_server(requests in prop::collection::vec(request_like(), 1..8)) {
        let mut bytes = Vec::new();
        for request in &requests {
            bytes.extend(serde_json::to_vec(request).expect("encode"));
            bytes.push(b'\n');
        }
        survives(&bytes);
    }
}
