//! Request decoding: one framed line → envelope (event, data, id) → typed, validated `Request`.
//!
//! Decoding is split in two so the session check (`not_logged_in`) can run between knowing the
//! event and validating its fields, as docs/PROTOCOL.md orders the errors.

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::errors::{ErrorCode, ProtocolError};

/// Longest `text` of a message, in characters.
pub const MAX_TEXT_CHARS: usize = 4000;
/// Longest `username` / `group_name`, in characters.
pub const MAX_NAME_CHARS: usize = 64;
/// Default and largest `limit` of `fetch_messages`.
pub const DEFAULT_PAGE_LIMIT: u32 = 50;
pub const MAX_PAGE_LIMIT: u32 = 100;
/// Longest `client_msg_id`, in characters.
pub const MAX_CLIENT_MSG_ID_CHARS: usize = 64;

/// Largest `seq` / count a request may carry (seqs are signed 64-bit in both stores).
pub const MAX_COUNT: u64 = i64::MAX as u64;

/// A request `id` exactly as the client wrote it (e.g. `-0` or a 30-digit integer), so the
/// reply echoes the same JSON text rather than a float approximation of it.
pub type RequestId = Box<RawValue>;

/// A decoded line whose event is known; its fields are not validated yet. `E` is what the
/// layer above knows of an event (the request registry's row), found by the lookup it passes.
#[derive(Debug, Clone)]
pub struct Envelope<E: 'static> {
    /// The event's registry row.
    pub event: &'static E,
    pub data: Map<String, Value>,
    pub id: Option<RequestId>,
}

/// A line that could not be decoded, with the request id when one could be read.
#[derive(Debug, Clone)]
pub struct Rejected {
    pub id: Option<RequestId>,
    pub error: ProtocolError,
}

/// Decodes one line into an envelope. `find` looks an event name up: its row, or the text of
/// the `unknown_event` error (which may say what was meant).
pub fn decode_envelope<E: 'static>(
    line: &[u8],
    find: impl Fn(&str) -> Result<&'static E, String>,
) -> Result<Envelope<E>, Rejected> {
    let reject = |id, code, text: &str| Rejected {
        id,
        error: ProtocolError::new(code, text),
    };
    let value: Value = match serde_json::from_slice::<Strict>(line) {
        Ok(Strict(value)) => value,
        Err(error) if error.to_string().starts_with(DUPLICATE_KEY) => {
            return Err(reject(
                None,
                ErrorCode::BadJson,
                // serde_json would keep the last of them: the request would do something
                // other than what a reader of the line sees first.
                "Request has a key twice in one object; send each key once.",
            ));
        }
        Err(_) if std::str::from_utf8(line).is_err() => {
            return Err(reject(
                None,
                ErrorCode::BadJson,
                // The usual cause is a telnet client in its 7-bit mode (see framing.rs).
                "Request is not valid UTF-8. Typing in telnet? Its 7-bit mode drops some letters until the server has switched it to 8-bit: start it as `telnet -- HOST -PORT` (a dash before the port: it then switches at once), or use nc.",
            ));
        }
        Err(_) => {
            return Err(reject(
                None,
                ErrorCode::BadJson,
                // People at a terminal type `help`: tell them what a request looks like.
                r#"Request is not valid JSON. Send one JSON object per line, e.g. {"event":"hello"} or {"event":"find_user","data":{"username":"alice"}}."#,
            ));
        }
    };
    let Value::Object(mut object) = value else {
        return Err(reject(
            None,
            ErrorCode::BadRequest,
            "Request must be a JSON object.",
        ));
    };
    let id = match object.remove("id") {
        None | Some(Value::Null) => None,
        Some(Value::String(text)) => string_id(&text),
        Some(Value::Number(number)) => Some(number_id(line, &number)),
        Some(_) => {
            return Err(reject(
                None,
                ErrorCode::BadRequest,
                "Field 'id' must be a string or a number.",
            ))
        }
    };
    let kind = match object.get("event") {
        Some(Value::String(name)) => match find(name) {
            Ok(event) => event,
            Err(text) => return Err(reject(id, ErrorCode::UnknownEvent, &text)),
        },
        _ => {
            return Err(reject(
                id,
                ErrorCode::BadRequest,
                "Field 'event' must be a string.",
            ))
        }
    };
    match decode_data(object.remove("data")) {
        Ok(data) => Ok(Envelope {
            event: kind,
            data,
            id,
        }),
        Err(error) => Err(Rejected { id, error }),
    }
}

/// The start of the error a duplicate key raises while decoding (`Strict`).
const DUPLICATE_KEY: &str = "duplicate key";

/// A JSON value decoded like `serde_json::Value`, except that an object with the same key twice
/// is an error (serde_json keeps the last silently). Every level is checked: keys are compared
/// as decoded, so `"a"` and `"\u0061"` are the same key.
struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(StrictVisitor)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(Strict(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                return Err(serde::de::Error::custom(format!("{DUPLICATE_KEY} '{key}'")));
            }
            let Strict(value) = map.next_value()?;
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

/// A string id, re-encoded (its value is exact; only escapes may be written differently).
fn string_id(text: &str) -> Option<RequestId> {
    serde_json::to_string(text)
        .ok()
        .and_then(|json| RawValue::from_string(json).ok())
}

/// A number id as the client spelled it. `serde_json::Value` keeps numbers as f64/i64/u64,
/// which turns `-0` into `-0.0` and rounds long integers, so the text is read again as raw.
fn number_id(line: &[u8], parsed: &serde_json::Number) -> RequestId {
    #[derive(Deserialize)]
    struct IdOnly<'a> {
        #[serde(borrow)]
        id: Option<&'a RawValue>,
    }
    match serde_json::from_slice::<IdOnly<'_>>(line) {
        Ok(IdOnly { id: Some(raw) }) => raw.to_owned(),
        // A duplicated "id" key: fall back to the value serde_json kept (the last one).
        _ => RawValue::from_string(parsed.to_string())
            .unwrap_or_else(|_| RawValue::from_string("null".into()).expect("null is JSON")),
    }
}

/// `data` may be absent, an object, or (for Socket.IO clients) a string holding a JSON object.
fn decode_data(data: Option<Value>) -> Result<Map<String, Value>, ProtocolError> {
    match data {
        None | Some(Value::Null) => Ok(Map::new()),
        Some(Value::Object(map)) => Ok(map),
        Some(Value::String(text)) => match serde_json::from_str::<Strict>(&text) {
            Ok(Strict(Value::Object(map))) => Ok(map),
            Ok(_) => Err(ProtocolError::new(
                ErrorCode::BadRequest,
                "Field 'data' must hold a JSON object.",
            )),
            Err(_) => Err(ProtocolError::new(
                ErrorCode::BadJson,
                "Field 'data' holds invalid JSON.",
            )),
        },
        Some(_) => Err(ProtocolError::new(
            ErrorCode::BadRequest,
            "Field 'data' must be an object.",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A registry of three events, as the layer above would pass one.
    fn find(name: &str) -> Result<&'static &'static str, String> {
        static NAMES: [&str; 3] = ["find_user", "ping", "send_message"];
        NAMES
            .iter()
            .find(|known| **known == name)
            .ok_or_else(|| "Unknown event.".to_string())
    }

    fn code_of(line: &[u8]) -> Option<ErrorCode> {
        decode_envelope(line, find)
            .err()
            .map(|rejected| rejected.error.code)
    }

    #[test]
    fn data_may_be_a_json_string() {
        let envelope = decode_envelope(
            br#"{"event":"find_user","data":"{\"username\":\"bob\"}"}"#,
            find,
        )
        .expect("decodes");
        assert_eq!(*envelope.event, "find_user");
        assert_eq!(envelope.data.get("username"), Some(&Value::from("bob")));
    }

    #[test]
    fn rejects_bad_envelopes_with_the_right_code() {
        assert_eq!(code_of(b"{nope"), Some(ErrorCode::BadJson));
        assert_eq!(code_of(b"\xff\xfe"), Some(ErrorCode::BadJson));
        assert_eq!(code_of(b"[1,2]"), Some(ErrorCode::BadRequest));
        assert_eq!(
            code_of(br#"{"event":"dance"}"#),
            Some(ErrorCode::UnknownEvent)
        );
        assert_eq!(code_of(br#"{"event":7}"#), Some(ErrorCode::BadRequest));
        assert_eq!(
            code_of(br#"{"event":"ping","id":{"x":1}}"#),
            Some(ErrorCode::BadRequest)
        );
        assert_eq!(
            code_of(br#"{"event":"ping","data":"[1]"}"#),
            Some(ErrorCode::BadRequest)
        );
        assert_eq!(code_of(br#"{"event":"ping","id":-0}"#), None);
    }

    #[test]
    fn a_key_twice_is_refused_at_any_level() {
        for line in [
            br#"{"event":"ping","event":"delete_group","data":{}}"#.as_slice(),
            br#"{"event":"send_message","data":{"text":"a","text":"b"}}"#,
            br#"{"event":"ping","id":1,"id":2}"#,
            br#"{"event":"ping","data":"{\"x\":1,\"x\":2}"}"#,
            br#"{"event":"ping","\u0065vent":"ping"}"#,
        ] {
            assert_eq!(
                code_of(line),
                Some(ErrorCode::BadJson),
                "{}",
                String::from_utf8_lossy(line)
            );
        }
        assert_eq!(
            code_of(br#"{"event":"ping","data":{"a":{"b":1},"c":{"b":2}}}"#),
            None
        );
    }

    #[test]
    fn unknown_event_keeps_the_request_id() {
        let rejected = decode_envelope(br#"{"event":"dance","id":7}"#, find).expect_err("unknown");
        assert_eq!(rejected.id.map(|id| id.get().to_string()), Some("7".into()));
    }

    #[test]
    fn number_ids_keep_their_spelling() {
        let envelope = decode_envelope(br#"{"event":"ping","id":-0}"#, find).expect("decodes");
        assert_eq!(
            envelope.id.map(|id| id.get().to_string()),
            Some("-0".into())
        );
    }
}
