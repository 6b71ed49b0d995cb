//! Request decoding: one framed line → envelope (event, data, id) → typed, validated `Request`.
//!
//! Decoding is split in two so the session check (`not_logged_in`) can run between knowing the
//! event and validating its fields, as docs/PROTOCOL.md orders the errors.

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use unicode_normalization::{is_nfc, UnicodeNormalization};

use super::errors::{ErrorCode, ProtocolError};
use crate::model::{GroupsQuery, PageQuery};

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

/// The events a client may send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    FindUser,
    CreateGroup,
    JoinGroup,
    LeaveGroup,
    SendMessage,
    VisitGroup,
    EnterGroup,
    FetchMessages,
    ListGroups,
    Ping,
    Hello,
    MarkRead,
    MyGroups,
}

/// Every request event, by its wire name (what `hello` and `unknown_event` list).
pub const EVENTS: [(&str, EventKind); 13] = [
    ("hello", EventKind::Hello),
    ("find_user", EventKind::FindUser),
    ("create_group", EventKind::CreateGroup),
    ("join_group", EventKind::JoinGroup),
    ("leave_group", EventKind::LeaveGroup),
    ("send_message", EventKind::SendMessage),
    ("visit_group", EventKind::VisitGroup),
    ("enter_group", EventKind::EnterGroup),
    ("fetch_messages", EventKind::FetchMessages),
    ("list_groups", EventKind::ListGroups),
    ("ping", EventKind::Ping),
    ("mark_read", EventKind::MarkRead),
    ("my_groups", EventKind::MyGroups),
];

/// The wire names of every request event.
pub fn event_names() -> Vec<&'static str> {
    EVENTS.iter().map(|(name, _)| *name).collect()
}

impl EventKind {
    fn from_name(name: &str) -> Option<EventKind> {
        EVENTS
            .iter()
            .find(|(known, _)| *known == name)
            .map(|(_, kind)| *kind)
    }

    /// Whether the event's data names the acting user (`username`).
    pub fn names_user(self) -> bool {
        !matches!(
            self,
            EventKind::FindUser | EventKind::ListGroups | EventKind::Ping | EventKind::Hello
        )
    }

    /// Whether the event may be sent before `find_user` has bound the connection.
    pub fn allowed_before_login(self) -> bool {
        matches!(
            self,
            EventKind::FindUser | EventKind::Ping | EventKind::Hello
        )
    }
}

/// A request `id` exactly as the client wrote it (e.g. `-0` or a 30-digit integer), so the
/// reply echoes the same JSON text rather than a float approximation of it.
pub type RequestId = Box<RawValue>;

/// A decoded line whose event is known; its fields are not validated yet.
#[derive(Debug, Clone)]
pub struct Envelope {
    pub kind: EventKind,
    pub data: Map<String, Value>,
    pub id: Option<RequestId>,
}

/// A line that could not be decoded, with the request id when one could be read.
#[derive(Debug, Clone)]
pub struct Rejected {
    pub id: Option<RequestId>,
    pub error: ProtocolError,
}

/// A fully validated request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    FindUser {
        username: String,
        /// Whether the name may be used for a new user: `Err(reason)` when it breaks the
        /// rules for new names (it may still log in an existing user of that name).
        new_name: Result<(), String>,
        /// The JWT proving the name (required when the server has `AUTH_SECRET`).
        token: Option<String>,
    },
    CreateGroup {
        username: String,
        group_name: String,
    },
    JoinGroup {
        username: String,
        group_name: String,
    },
    LeaveGroup {
        username: String,
        group_name: String,
    },
    SendMessage {
        username: String,
        group_name: String,
        text: String,
        client_msg_id: Option<String>,
    },
    VisitGroup {
        username: String,
        group_name: String,
    },
    EnterGroup {
        username: String,
        group_name: String,
    },
    FetchMessages {
        username: String,
        group_name: String,
        page: PageQuery,
    },
    ListGroups(GroupsQuery),
    Ping,
    Hello,
    MarkRead {
        username: String,
        group_name: String,
        seq: u64,
    },
    MyGroups {
        username: String,
    },
}

impl Request {
    /// The `username` the request acts for, if it names one.
    pub fn username(&self) -> Option<&str> {
        match self {
            Request::FindUser { username, .. }
            | Request::CreateGroup { username, .. }
            | Request::JoinGroup { username, .. }
            | Request::LeaveGroup { username, .. }
            | Request::SendMessage { username, .. }
            | Request::VisitGroup { username, .. }
            | Request::EnterGroup { username, .. }
            | Request::FetchMessages { username, .. }
            | Request::MarkRead { username, .. }
            | Request::MyGroups { username } => Some(username),
            Request::ListGroups(_) | Request::Ping | Request::Hello => None,
        }
    }
}

/// Decodes one line into an envelope.
pub fn decode_envelope(line: &[u8]) -> Result<Envelope, Rejected> {
    let reject = |id, code, text: &str| Rejected {
        id,
        error: ProtocolError::new(code, text),
    };
    let value: Value = match serde_json::from_slice(line) {
        Ok(value) => value,
        Err(_) if std::str::from_utf8(line).is_err() => {
            return Err(reject(
                None,
                ErrorCode::BadJson,
                "Request is not valid UTF-8.",
            ))
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
        Some(Value::String(name)) => match EventKind::from_name(name) {
            Some(kind) => kind,
            None => return Err(reject(id, ErrorCode::UnknownEvent, "Unknown event.")),
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
        Ok(data) => Ok(Envelope { kind, data, id }),
        Err(error) => Err(Rejected { id, error }),
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
        Some(Value::String(text)) => match serde_json::from_str::<Value>(&text) {
            Ok(Value::Object(map)) => Ok(map),
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

impl Envelope {
    /// Validates the fields of the envelope's event.
    pub fn into_request(self) -> Result<Request, ProtocolError> {
        let data = &self.data;
        let user_and_group = || -> Result<(String, String), ProtocolError> {
            Ok((
                name_field(data, "username")?,
                name_field(data, "group_name")?,
            ))
        };
        Ok(match self.kind {
            EventKind::Ping => Request::Ping,
            EventKind::Hello => Request::Hello,
            EventKind::MyGroups => Request::MyGroups {
                username: name_field(data, "username")?,
            },
            EventKind::MarkRead => {
                let (username, group_name) = user_and_group()?;
                let seq = optional_count(data, "seq")?
                    .ok_or_else(|| bad_request("Field 'seq' is missing.".to_string()))?;
                Request::MarkRead {
                    username,
                    group_name,
                    seq,
                }
            }
            EventKind::ListGroups => Request::ListGroups(groups_query(data)?),
            EventKind::FindUser => {
                let username = name_field(data, "username")?;
                Request::FindUser {
                    new_name: new_name_rules(&username, "username"),
                    username,
                    // Anything but a string is no token: with authentication on it is refused
                    // like any other bad token, without saying why.
                    token: data
                        .get("token")
                        .and_then(Value::as_str)
                        .map(str::to_string),
                }
            }
            EventKind::CreateGroup => {
                let (username, group_name) = user_and_group()?;
                new_name_rules(&group_name, "group_name").map_err(bad_request)?;
                Request::CreateGroup {
                    username,
                    group_name,
                }
            }
            EventKind::JoinGroup => {
                let (username, group_name) = user_and_group()?;
                Request::JoinGroup {
                    username,
                    group_name,
                }
            }
            EventKind::LeaveGroup => {
                let (username, group_name) = user_and_group()?;
                Request::LeaveGroup {
                    username,
                    group_name,
                }
            }
            EventKind::VisitGroup => {
                let (username, group_name) = user_and_group()?;
                Request::VisitGroup {
                    username,
                    group_name,
                }
            }
            EventKind::EnterGroup => {
                let (username, group_name) = user_and_group()?;
                Request::EnterGroup {
                    username,
                    group_name,
                }
            }
            EventKind::SendMessage => {
                let (username, group_name) = user_and_group()?;
                Request::SendMessage {
                    username,
                    group_name,
                    text: text_field(data)?,
                    client_msg_id: client_msg_id_field(data)?,
                }
            }
            EventKind::FetchMessages => {
                let (username, group_name) = user_and_group()?;
                Request::FetchMessages {
                    username,
                    group_name,
                    page: page_fields(data)?,
                }
            }
        })
    }
}

pub(crate) fn bad_request(text: String) -> ProtocolError {
    ProtocolError::new(ErrorCode::BadRequest, &text)
}

fn string_field<'a>(data: &'a Map<String, Value>, name: &str) -> Result<&'a str, ProtocolError> {
    match data.get(name) {
        Some(Value::String(text)) => Ok(text),
        None | Some(Value::Null) => Err(bad_request(format!("Field '{name}' is missing."))),
        Some(_) => Err(bad_request(format!("Field '{name}' must be a string."))),
    }
}

/// A name as the server compares and stores it: Unicode NFC, so a composed and a decomposed
/// "é" are the same user. Checks the rules every name meets (length, no control characters).
fn name_field(data: &Map<String, Value>, name: &str) -> Result<String, ProtocolError> {
    let raw = string_field(data, name)?;
    let text: String = if is_nfc(raw) {
        raw.to_string()
    } else {
        raw.nfc().collect()
    };
    let chars = text.chars().count();
    if chars == 0 || chars > MAX_NAME_CHARS {
        return Err(bad_request(format!(
            "Field '{name}' must be 1-{MAX_NAME_CHARS} characters."
        )));
    }
    if text.chars().any(char::is_control) {
        return Err(bad_request(format!(
            "Field '{name}' must not contain control characters."
        )));
    }
    Ok(text)
}

/// The rules a *new* user or group name must also meet, so that two names a person cannot
/// tell apart are not two accounts (after Ergo's and PRECIS's nickname rules): no invisible
/// format characters (bidi overrides such as U+202E, zero-width spaces and joiners, soft
/// hyphens), no line or paragraph separators, no blank fillers, and no whitespace at either
/// end (so "bob" and "bob " are not both possible). Names created before these rules existed
/// keep working: only creation is refused.
fn new_name_rules(text: &str, name: &str) -> Result<(), String> {
    if text.chars().all(char::is_whitespace) {
        return Err(format!("Field '{name}' must not be only whitespace."));
    }
    if text.starts_with(char::is_whitespace) || text.ends_with(char::is_whitespace) {
        return Err(format!(
            "Field '{name}' must not start or end with whitespace."
        ));
    }
    if text.chars().any(is_invisible) {
        return Err(format!(
            "Field '{name}' must not contain invisible or formatting characters (such as zero-width or bidi-override characters)."
        ));
    }
    Ok(())
}

/// Characters that render as nothing or rearrange the text around them.
fn is_invisible(c: char) -> bool {
    use unicode_properties::{GeneralCategory, UnicodeGeneralCategory};
    matches!(
        c.general_category(),
        GeneralCategory::Format
            | GeneralCategory::LineSeparator
            | GeneralCategory::ParagraphSeparator
            | GeneralCategory::Control
            | GeneralCategory::Unassigned
            | GeneralCategory::PrivateUse
            | GeneralCategory::Surrogate
    ) || matches!(
        c,
        '\u{115F}' | '\u{1160}' | '\u{3164}' | '\u{FFA0}' | '\u{2800}'
    )
}

fn text_field(data: &Map<String, Value>) -> Result<String, ProtocolError> {
    let text = string_field(data, "text")?;
    if text.trim().is_empty() {
        return Err(bad_request("Field 'text' must not be empty.".to_string()));
    }
    if text.chars().count() > MAX_TEXT_CHARS {
        return Err(bad_request(format!(
            "Field 'text' must be at most {MAX_TEXT_CHARS} characters."
        )));
    }
    Ok(text.to_string())
}

/// `send_message`'s optional idempotency key: a string of 1-`MAX_CLIENT_MSG_ID_CHARS` characters.
fn client_msg_id_field(data: &Map<String, Value>) -> Result<Option<String>, ProtocolError> {
    match data.get("client_msg_id") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(id)) if (1..=MAX_CLIENT_MSG_ID_CHARS).contains(&id.chars().count()) => {
            Ok(Some(id.clone()))
        }
        Some(_) => Err(bad_request(format!(
            "Field 'client_msg_id' must be a string of 1-{MAX_CLIENT_MSG_ID_CHARS} characters."
        ))),
    }
}

/// `list_groups {after?, limit?}`: groups named after `after`, at most `limit` (default 100).
fn groups_query(data: &Map<String, Value>) -> Result<GroupsQuery, ProtocolError> {
    let after = match data.get("after") {
        None | Some(Value::Null) => None,
        Some(Value::String(after)) => Some(after.clone()),
        Some(_) => return Err(bad_request("Field 'after' must be a string.".to_string())),
    };
    Ok(GroupsQuery {
        after,
        limit: limit_field(data, MAX_PAGE_LIMIT)?,
    })
}

fn optional_count(data: &Map<String, Value>, name: &str) -> Result<Option<u64>, ProtocolError> {
    match data.get(name) {
        None | Some(Value::Null) => Ok(None),
        // Seqs are stored as signed 64-bit integers: anything above i64::MAX is refused here
        // rather than wrapped to a negative number by a cast further down.
        Some(value) => value
            .as_u64()
            .filter(|&count| count <= MAX_COUNT)
            .map(Some)
            .ok_or_else(|| {
                bad_request(format!(
                    "Field '{name}' must be a whole number 0-{MAX_COUNT}."
                ))
            }),
    }
}

/// A page size: 1-`MAX_PAGE_LIMIT`, `default` when absent.
fn limit_field(data: &Map<String, Value>, default: u32) -> Result<u32, ProtocolError> {
    match optional_count(data, "limit") {
        Ok(None) => Ok(default),
        Ok(Some(limit)) if (1..=u64::from(MAX_PAGE_LIMIT)).contains(&limit) => Ok(limit as u32),
        _ => Err(bad_request(format!(
            "Field 'limit' must be a whole number 1-{MAX_PAGE_LIMIT}."
        ))),
    }
}

fn page_fields(data: &Map<String, Value>) -> Result<PageQuery, ProtocolError> {
    Ok(PageQuery {
        before_seq: optional_count(data, "before_seq")?,
        after_seq: optional_count(data, "after_seq")?,
        limit: limit_field(data, DEFAULT_PAGE_LIMIT)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(line: &str) -> Result<Request, ProtocolError> {
        decode_envelope(line.as_bytes())
            .map_err(|r| r.error)?
            .into_request()
    }

    fn code_of(line: &[u8]) -> ErrorCode {
        match decode_envelope(line) {
            Err(rejected) => rejected.error.code,
            Ok(envelope) => {
                envelope
                    .into_request()
                    .expect_err("should be rejected")
                    .code
            }
        }
    }

    #[test]
    fn decodes_a_send_message() {
        let request = decode(
            r#"{"event":"send_message","data":{"username":"a","group_name":"g","text":"hi"}}"#,
        );
        assert_eq!(
            request,
            Ok(Request::SendMessage {
                username: "a".into(),
                group_name: "g".into(),
                text: "hi".into(),
                client_msg_id: None,
            })
        );
    }

    #[test]
    fn data_may_be_a_json_string() {
        let request = decode(r#"{"event":"find_user","data":"{\"username\":\"bob\"}"}"#);
        assert_eq!(
            request,
            Ok(Request::FindUser {
                username: "bob".into(),
                new_name: Ok(()),
                token: None,
            })
        );
    }

    #[test]
    fn rejects_bad_input_with_the_right_code() {
        assert_eq!(code_of(b"{nope"), ErrorCode::BadJson);
        assert_eq!(code_of(b"\xff\xfe"), ErrorCode::BadJson);
        assert_eq!(code_of(b"[1,2]"), ErrorCode::BadRequest);
        assert_eq!(code_of(br#"{"event":"dance"}"#), ErrorCode::UnknownEvent);
        assert_eq!(
            code_of(br#"{"event":"find_user","data":{"username":{"$ne":null}}}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code_of(br#"{"event":"find_user","data":{"username":""}}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code_of(br#"{"event":"find_user","data":{"username":"a\u0001"}}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code_of(
                br#"{"event":"fetch_messages","data":{"username":"a","group_name":"g","limit":0}}"#
            ),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code_of(br#"{"event":"ping","id":{"x":1}}"#),
            ErrorCode::BadRequest
        );
    }

    #[test]
    fn name_limits_count_characters_not_bytes() {
        let name = "é".repeat(MAX_NAME_CHARS);
        let line = format!(r#"{{"event":"find_user","data":{{"username":"{name}"}}}}"#);
        assert!(decode(&line).is_ok());
        let line = format!(r#"{{"event":"find_user","data":{{"username":"{name}é"}}}}"#);
        assert_eq!(
            decode(&line).map_err(|e| e.code),
            Err(ErrorCode::BadRequest)
        );
    }

    #[test]
    fn names_are_nfc_and_new_names_must_be_visible() {
        let decomposed = r#"{"event":"find_user","data":{"username":"Jose\u0301"}}"#;
        let Ok(Request::FindUser {
            username, new_name, ..
        }) = decode(decomposed)
        else {
            panic!("decodes");
        };
        assert_eq!(username, "Jos\u{e9}");
        assert_eq!(new_name, Ok(()));
        for bad in [
            "ev\u{202E}il",
            "a\u{200B}b",
            "bob ",
            " bob",
            "   ",
            "\u{3164}",
        ] {
            assert!(new_name_rules(bad, "username").is_err(), "{bad:?}");
        }
        assert!(new_name_rules("Zo\u{eb} 2", "username").is_ok());
        let line = r#"{"event":"create_group","data":{"username":"a","group_name":"g\u200d"}}"#;
        assert_eq!(decode(line).map_err(|e| e.code), Err(ErrorCode::BadRequest));
    }

    #[test]
    fn unknown_event_keeps_the_request_id() {
        let rejected = decode_envelope(br#"{"event":"dance","id":7}"#).expect_err("unknown");
        assert_eq!(rejected.id.map(|id| id.get().to_string()), Some("7".into()));
    }

    #[test]
    fn fetch_defaults_its_limit() {
        let request = decode(
            r#"{"event":"fetch_messages","data":{"username":"a","group_name":"g","after_seq":3}}"#,
        );
        let page = PageQuery {
            before_seq: None,
            after_seq: Some(3),
            limit: DEFAULT_PAGE_LIMIT,
        };
        assert_eq!(
            request,
            Ok(Request::FetchMessages {
                username: "a".into(),
                group_name: "g".into(),
                page
            })
        );
    }
}
