//! Reply encoding: typed server events → one compact JSON line each, ended by `\n`.

use serde::Serialize;
use serde_json::json;
use serde_json::value::RawValue;

use super::errors::{ErrorCode, Failure};
use crate::model::{
    Appended, CreatedGroup, GroupHistory, GroupReadState, GroupRef, GroupsPage, Message,
    MessagePage, UserProfile,
};

/// A successful reply to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    UserCreated(UserProfile),
    UserFound(UserProfile),
    GroupCreated(CreatedGroup),
    JoinSuccess(GroupRef),
    LeaveSuccess(GroupRef),
    /// The sender's ack: the stored message, or the original of a `client_msg_id` repeat.
    MessageSent(Appended),
    UserVisited {
        username: String,
        group_name: String,
        last_read: String,
    },
    EnterGroup {
        group_name: String,
        history: GroupHistory,
    },
    Messages {
        group_name: String,
        page: MessagePage,
    },
    Groups(GroupsPage),
    Pong {
        time: String,
    },
    /// The handshake: server identity, running limits and the events it knows (built once
    /// from the configuration, see `hello_data`).
    Hello(std::rc::Rc<serde_json::Value>),
    MarkedRead(GroupReadState),
    MyGroups(Vec<GroupReadState>),
}

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
    /// `find_user` needs a token.
    pub auth: bool,
}

/// The `hello` reply's data, for a connection over TLS or not.
pub fn hello_data(info: &HelloInfo, tls: bool) -> serde_json::Value {
    json!({
        "server": "noomnim",
        "version": env!("CARGO_PKG_VERSION"),
        "protocol": 2,
        "node_id": info.node_id,
        "auth": if info.auth { "token" } else { "none" },
        "tls": tls,
        "events": super::request::event_names(),
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

/// Encodes a success reply, carrying the request `id` when there was one.
pub fn encode_reply(reply: &Reply, id: Option<&RawValue>) -> Vec<u8> {
    match reply {
        Reply::UserCreated(user) => encode_line("user_created", user, id),
        Reply::UserFound(user) => encode_line("user_found", user, id),
        Reply::GroupCreated(group) => encode_line("group_created", group, id),
        Reply::JoinSuccess(group) => encode_line("join_success", group, id),
        Reply::LeaveSuccess(group) => encode_line("leave_success", group, id),
        Reply::MessageSent(sent) if sent.duplicate => {
            #[derive(Serialize)]
            struct Repeat<'a> {
                #[serde(flatten)]
                message: &'a Message,
                duplicate: bool,
            }
            let data = Repeat {
                message: &sent.message,
                duplicate: true,
            };
            encode_line("message_sent", &data, id)
        }
        Reply::MessageSent(sent) => encode_line("message_sent", &sent.message, id),
        Reply::UserVisited {
            username,
            group_name,
            last_read,
        } => {
            let data = json!({
                "username": username,
                "group_name": group_name,
                "last_time_read_in_visiting_group": last_read,
            });
            encode_line("user_visited", &data, id)
        }
        Reply::EnterGroup {
            group_name,
            history,
        } => {
            let data = json!({
                "group_name": group_name,
                "unread": history.unread,
                "read": history.read,
                "unread_has_more": history.unread_has_more,
                "epoch": history.epoch,
            });
            encode_line("enter_group", &data, id)
        }
        Reply::Messages { group_name, page } => {
            let data = json!({
                "group_name": group_name,
                "messages": page.messages,
                "has_more": page.has_more,
                "epoch": page.epoch,
            });
            encode_line("messages", &data, id)
        }
        Reply::Groups(page) => encode_line(
            "groups",
            &json!({ "groups": page.groups, "has_more": page.has_more }),
            id,
        ),
        Reply::Pong { time } => encode_line("pong", &json!({ "time": time }), id),
        Reply::Hello(data) => encode_line("hello", data.as_ref(), id),
        Reply::MarkedRead(state) => encode_line(
            "marked_read",
            &json!({
                "group_name": state.group_name,
                "last_read_seq": state.last_read_seq,
                "unread_count": state.unread_count,
            }),
            id,
        ),
        Reply::MyGroups(groups) => encode_line("my_groups", &json!({ "groups": groups }), id),
    }
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
        Failure::Protocol(error) if error.code == ErrorCode::UnknownEvent => encode_line(
            "error",
            &json!({
                "Error": error.text,
                "code": error.code.as_str(),
                "events": super::request::event_names(),
            }),
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
    use crate::protocol::errors::{EventError, ProtocolError};

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
        };
        let line = encode_broadcast(&message);
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
        assert_eq!(line.last(), Some(&b'\n'));
    }
}
