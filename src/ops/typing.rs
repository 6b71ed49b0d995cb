//! `typing {group_name}` (protocol 3): "I am typing" to the others in the group's room. Never
//! stored. The sender must be in that room (`enter_group` first). The server relays at most
//! one per user per group per `TYPING_EVERY` (2 s) and drops the rest silently; others'
//! protocol-3 connections in the room, on every instance, receive `typing {group_name,
//! username}` and expire the indicator themselves (after 6 s, documented). The reply is
//! `typing {group_name}` whether it was relayed or dropped.

use std::time::Duration;

use serde_json::json;

use super::fields::{name_field, optional_name};
use super::{Context, Data, Event, Plan};
use crate::protocol::reply::encode_line;
use crate::protocol::{ErrorCode, Failure, ProtocolError};
use crate::session::{Effect, LiveEffect};

/// At most one `typing` relayed per user per group this often.
pub const TYPING_EVERY: Duration = Duration::from_secs(2);

/// The live feature that relays typing (`live/typing.rs`).
pub const FEATURE: &str = "typing";

/// Who is typing in which group's room: what the request hands the live feature, and what
/// the feature relays to the other instances (`{"username", "group_name"}`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TypingIn {
    pub username: String,
    pub group_name: String,
}

pub struct Typing {
    group_name: String,
    /// A `username` that is given must be the logged-in user (`forbidden` otherwise).
    named: Option<String>,
}

impl Event for Typing {
    const NAME: &'static str = "typing";
    const NAMES_USER: bool = false;

    fn parse(data: &Data) -> Result<Self, ProtocolError> {
        Ok(Typing {
            group_name: name_field(data, "group_name")?,
            named: optional_name(data, "username")?,
        })
    }

    fn acting_user(&self) -> Option<&str> {
        self.named.as_deref()
    }

    fn plan(self, context: &Context<'_>) -> Result<Plan, Failure> {
        let Some(username) = context.session.username.clone() else {
            let text = "Log in with find_user first.";
            return Err(ProtocolError::new(ErrorCode::NotLoggedIn, text).into());
        };
        if context.session.room_name() != Some(self.group_name.as_str()) {
            let text = "Enter the group's room (enter_group) before typing in it.";
            return Err(ProtocolError::new(ErrorCode::NotInRoom, text).into());
        }
        let line = encode_line(
            "typing",
            &json!({"group_name": self.group_name}),
            context.id,
        );
        Ok(Plan::ReplyAnd(
            line,
            Effect::Live(LiveEffect::new(
                FEATURE,
                TypingIn {
                    username,
                    group_name: self.group_name,
                },
            )),
        ))
    }
}
