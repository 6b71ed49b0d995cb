//! Runs every example exchange of docs/PROTOCOL.md against a real server, so the reference
//! cannot drift from the server's behaviour. In a ```` ```exchange ```` block, `> ` lines are
//! sent and `< ` lines must come back; `"<time>"`, `"<oid>"` and `"<any>"` in an expected line
//! stand for a timestamp, an ObjectId and any value.

mod common;

use common::{Backend, Storage};
use serde_json::Value;

/// The exchanges of the document, in order: (line number, is a request, text).
fn exchanges(doc: &str) -> Vec<(usize, bool, String)> {
    let mut lines = Vec::new();
    let mut inside = false;
    for (number, line) in doc.lines().enumerate() {
        match line.trim_end() {
            "```exchange" => inside = true,
            "```" if inside => inside = false,
            text if inside => {
                if let Some(request) = text.strip_prefix("> ") {
                    lines.push((number + 1, true, request.to_string()));
                } else if let Some(reply) = text.strip_prefix("< ") {
                    lines.push((number + 1, false, reply.to_string()));
                } else {
                    panic!(
                        "line {}: an exchange line starts with '> ' or '< '",
                        number + 1
                    );
                }
            }
            _ => {}
        }
    }
    lines
}

fn is_timestamp(text: &str) -> bool {
    text.len() == 24 && text.ends_with('Z') && chrono_like(text)
}

fn chrono_like(text: &str) -> bool {
    let bytes = text.as_bytes();
    [4, 7].iter().all(|&i| bytes[i] == b'-') && bytes[10] == b'T' && bytes[19] == b'.'
}

/// Whether `actual` matches `expected`, placeholders included.
fn matches(expected: &Value, actual: &Value) -> bool {
    match (expected, actual) {
        (Value::String(p), _) if p == "<any>" => true,
        (Value::String(p), Value::String(a)) if p == "<time>" => is_timestamp(a),
        (Value::String(p), Value::String(a)) if p == "<oid>" => {
            a.len() == 24 && a.chars().all(|c| c.is_ascii_hexdigit())
        }
        (Value::Object(e), Value::Object(a)) => {
            e.len() == a.len()
                && e.iter()
                    .all(|(k, v)| a.get(k).is_some_and(|found| matches(v, found)))
        }
        (Value::Array(e), Value::Array(a)) => {
            e.len() == a.len() && e.iter().zip(a).all(|(x, y)| matches(x, y))
        }
        (Value::Number(e), Value::Number(a)) => e.as_f64() == a.as_f64(),
        _ => expected == actual,
    }
}

#[test]
fn every_example_in_protocol_md_runs_as_written() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/PROTOCOL.md"))
        .expect("docs/PROTOCOL.md");
    let lines = exchanges(&doc);
    assert!(lines.len() >= 20, "the reference has its examples");
    let storage = Storage::new(Backend::Embedded);
    // In-process, through the library: nothing here needs the binary.
    let server = common::InProcess::start(&storage, &[]);
    // The direct-conversation examples talk to `doc_bob`: a user who logged in once.
    let mut bob = server.connect();
    bob.send_raw(b"{\"event\":\"find_user\",\"data\":{\"username\":\"doc_bob\"}}\n");
    assert_eq!(bob.recv()["event"], "user_created");
    drop(bob);
    let mut client = server.connect();
    for (number, is_request, text) in lines {
        if is_request {
            client.send_raw(format!("{text}\n").as_bytes());
            continue;
        }
        let expected: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("line {number}: the example is not JSON: {e}"));
        let actual = client.recv();
        assert!(
            matches(&expected, &actual),
            "docs/PROTOCOL.md line {number}:\nexpected {expected}\n     got {actual}"
        );
    }
}
