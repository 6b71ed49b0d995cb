//! `send_message {username, group_name, text, client_msg_id?, mentions?, reply_to?}`: stores a
//! message and answers the sender with it (`message_sent`); the room gets it as a broadcast
//! once stored.
//!
//! The one event whose store job is not a `StoreCall`: messages are `Work::Append`, which the
//! worker batches into one commit with its neighbours (group commit), and whose completion the
//! event loop also hands to the sequencer for broadcast. `answer` builds the sender's reply.

use serde::Serialize;
use serde_json::value::RawValue;

use super::fields::{
    client_msg_id_field, mentions_field, optional_count, text_field, user_and_group,
};
use super::{failure_of, Completed, Context, Data, Event, Plan};
use crate::model::{Appended, Message, NewMessage};
use crate::protocol::reply::encode_line;
use crate::protocol::{encode_failure, Failure, ProtocolError};
use crate::session::{Effect, LiveEffect};
use crate::store::StoreError;
use crate::workers::Work;

pub struct SendMessage(NewMessage);

impl Event for SendMessage {
    const NAME: &'static str = "send_message";

    fn parse(data: &Data) -> Result<Self, ProtocolError> {
        let (username, group_name) = user_and_group(data)?;
        Ok(SendMessage(NewMessage {
            group_name,
            username,
            text: text_field(data)?,
            client_msg_id: client_msg_id_field(data)?,
            mentions: mentions_field(data)?.unwrap_or_default(),
            reply_to: optional_count(data, "reply_to")?,
        }))
    }

    fn acting_user(&self) -> Option<&str> {
        Some(&self.0.username)
    }

    fn plan(self, _: &Context<'_>) -> Result<Plan, Failure> {
        Ok(Plan::Store {
            work: Work::Append(self.0),
            id: None,
        })
    }
}

/// The attention feature's name (`live::attention`).
pub const ATTENTION: &str = "attention";

/// Who a stored message asks the attention of: the mentioned members (`@room`: all of them),
/// and a direct conversation's other member when this message showed it to them. The
/// attention feature's effect and relay note.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct MessageAttention {
    pub group_name: String,
    pub seq: u64,
    /// The sender.
    pub by: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mentions: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revealed_to: Option<String>,
}

impl MessageAttention {
    /// What a newly stored message asks (`None`: nobody's attention in particular).
    pub fn of(sent: &Appended) -> Option<MessageAttention> {
        let message = &sent.message;
        let wanted =
            !sent.duplicate && (!message.mentions.is_empty() || sent.revealed_to.is_some());
        wanted.then(|| MessageAttention {
            group_name: message.group_name.clone(),
            seq: message.seq,
            by: message.username.clone(),
            mentions: message.mentions.clone(),
            revealed_to: sent.revealed_to.clone(),
        })
    }
}

/// The sender's reply: the stored message, or the original of a `client_msg_id` repeat
/// (marked `"duplicate": true`).
pub fn answer(result: Result<Appended, StoreError>, id: Option<&RawValue>) -> Completed {
    match result {
        Ok(sent) => {
            let message = &sent.message;
            let line = if sent.duplicate {
                #[derive(Serialize)]
                struct Repeat<'a> {
                    #[serde(flatten)]
                    message: &'a Message,
                    duplicate: bool,
                }
                let data = Repeat {
                    message,
                    duplicate: true,
                };
                encode_line("message_sent", &data, id)
            } else {
                encode_line("message_sent", message, id)
            };
            let effect = match MessageAttention::of(&sent) {
                Some(attention) => Effect::Live(LiveEffect::new(ATTENTION, attention)),
                None => Effect::None,
            };
            Completed {
                line,
                effect,
                shows: Some((message.group_name.clone(), message.seq, message.seq)),
            }
        }
        Err(error) => Completed::reply(encode_failure(&failure_of(error), id)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(data: serde_json::Value) -> Result<NewMessage, ProtocolError> {
        let serde_json::Value::Object(data) = data else {
            panic!("an object");
        };
        SendMessage::parse(&data).map(|event| event.0)
    }

    #[test]
    fn decodes_a_send_message() {
        let parsed = parse(serde_json::json!({"username":"a","group_name":"g","text":"hi"}));
        assert_eq!(
            parsed,
            Ok(NewMessage {
                username: "a".into(),
                group_name: "g".into(),
                text: "hi".into(),
                client_msg_id: None,
                mentions: Vec::new(),
                reply_to: None,
            })
        );
        let blank = parse(serde_json::json!({"username":"a","group_name":"g","text":"  "}));
        assert!(blank.is_err());
        let long_key = "k".repeat(65);
        let keyed = parse(
            serde_json::json!({"username":"a","group_name":"g","text":"x","client_msg_id":long_key}),
        );
        assert!(keyed.is_err());
    }
}
