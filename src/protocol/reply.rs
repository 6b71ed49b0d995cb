//! Reply encoding: typed server events → one compact JSON line each, ended by `\n`.

use serde::Serialize;
use serde_json::json;
use serde_json::value::RawValue;

use super::errors::Failure;
use crate::model::Message;

/// What the server tells a client in `hello`: identity, capabilities and the running limits.
#[derive(Debug, Clone, PartialEq)]
pub struct HelloInfo {
    pub node_id: String,
    pub max_line_bytes: usize,
    pub max_output_bytes: usize,
    pub max_reply_bytes: usize,
    pub rate_limit: f64,
    pub rate_burst: f64,
    pub login_timeout_ms: u64,
    pub idle_timeout_ms: u64,
    pub keepalive_hint_ms: u64,
    /// How long a broadcast may be held to share a write (`WRITE_DELAY_MS`; 0: never).
    pub write_delay_ms: u64,
    /// `find_user` needs a token.
    pub auth: bool,
    /// The protocols the server speaks, oldest first, and its request events (the layers
    /// above know them: `ops`).
    pub protocols: &'static [u8],
    pub events: Vec<&'static str>,
}

/// The `hello` reply's data, for a connection over TLS or not.
pub fn hello_data(info: &HelloInfo, tls: bool) -> serde_json::Value {
    json!({
        "server": "noomnim",
        "version": env!("CARGO_PKG_VERSION"),
        "protocol": 2,
        "protocols": info.protocols,
        "node_id": info.node_id,
        "auth": if info.auth { "token" } else { "none" },
        "tls": tls,
        "events": info.events,
        "limits": {
            "max_line_bytes": info.max_line_bytes,
            "max_text_chars": super::request::MAX_TEXT_CHARS,
            "max_name_chars": super::request::MAX_NAME_CHARS,
            "max_output_bytes": info.max_output_bytes,
            "max_reply_bytes": info.max_reply_bytes,
            "fetch_limit_max": super::request::MAX_PAGE_LIMIT,
            "rate_limit": info.rate_limit,
            "rate_burst": info.rate_burst,
            "login_timeout_ms": info.login_timeout_ms,
            "idle_timeout_ms": info.idle_timeout_ms,
            "keepalive_hint_ms": info.keepalive_hint_ms,
            "write_delay_ms": info.write_delay_ms,
        },
    })
}

#[derive(Serialize)]
struct Line<'a, T: Serialize> {
    event: &'a str,
    data: &'a T,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a RawValue>,
}

/// Encodes one server line.
pub fn encode_line<T: Serialize>(event: &str, data: &T, id: Option<&RawValue>) -> Vec<u8> {
    let mut out = serde_json::to_vec(&Line { event, data, id }).unwrap_or_else(|error| {
        // Only a non-string map key can fail here, and no reply type has one.
        log::error!("cannot encode {event} reply: {error}");
        br#"{"event":"error","data":{"Error":"Internal encoding error.","code":"unavailable"}}"#
            .to_vec()
    });
    out.push(b'\n');
    out
}

/// Encodes an error reply.
pub fn encode_failure(failure: &Failure, id: Option<&RawValue>) -> Vec<u8> {
    match failure {
        // Seed error events keep their name and text; `code` (protocol v2) repeats the name so
        // every failure has one machine-readable field.
        Failure::Event(error) => encode_line(
            error.event(),
            &json!({ "Error": error.text(), "code": error.event() }),
            id,
        ),
        Failure::Protocol(error) => encode_line(
            "error",
            &json!({"Error": error.text, "code": error.code.as_str()}),
            id,
        ),
    }
}

/// Encodes the live `message_sent` broadcast (no `id`), once for all recipients.
pub fn encode_broadcast(message: &Message) -> Vec<u8> {
    encode_line("message_sent", message, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::errors::{ErrorCode, EventError, ProtocolError};

    #[test]
    fn seed_error_is_byte_for_byte() {
        let line = encode_failure(&Failure::Event(EventError::NameNotFound), None);
        assert_eq!(
            line,
            b"{\"event\":\"name_not_found\",\"data\":{\"Error\":\"User could not be found.\",\"code\":\"name_not_found\"}}\n"
        );
    }

    #[test]
    fn protocol_error_carries_code_and_id() {
        let failure = Failure::Protocol(ProtocolError::new(ErrorCode::Forbidden, "no"));
        let id = RawValue::from_string("\"r1\"".into()).expect("json");
        let line = encode_failure(&failure, Some(&id));
        let value: serde_json::Value = serde_json::from_slice(&line).expect("valid json");
        assert_eq!(
            value,
            json!({"event":"error","data":{"Error":"no","code":"forbidden"},"id":"r1"})
        );
    }

    #[test]
    fn lines_are_single_lines() {
        let message = Message {
            id: "0".repeat(24),
            group_name: "g".into(),
            username: "u".into(),
            text: "two\nlines".into(),
            timestamp: "t".into(),
            seq: 1,
            client_msg_id: None,
            ..Message::default()
        };
        let line = encode_broadcast(&message);
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
        assert_eq!(line.last(), Some(&b'\n'));
    }
}
