//! `hello {protocol?}`: the handshake. Answered at once with the server's identity, protocol
//! version, the protocols it speaks, the events it knows and its running limits (built once
//! from the configuration). `protocol: 3` switches the connection to protocol 3 (the opt-in
//! for its new unsolicited events, like Redis's `HELLO 3`); without it the connection stays on
//! protocol 2 and sees exactly what it always did.

use serde_json::Value;

use super::fields::{bad_request, optional_bool};
use super::{Context, Data, Event, Plan};
use crate::protocol::reply::encode_line;
use crate::protocol::{Failure, ProtocolError};
use crate::session::{Effect, Settings};

/// The protocols this server speaks, oldest first; the last is the newest.
pub const PROTOCOLS: [u8; 2] = [2, 3];

pub struct Hello {
    /// The protocol asked for (`None`: not asked, the connection's stays as it is).
    protocol: Option<u8>,
    /// `implicit_read: false` turns implicit read marks off for the connection (see
    /// `Session::implicit_read`); `None`: left as it is.
    implicit_read: Option<bool>,
    /// `presence: false`: the connection does not make its user online (`Session::presence`);
    /// only before logging in.
    presence: Option<bool>,
}

impl Event for Hello {
    const NAME: &'static str = "hello";
    const BEFORE_LOGIN: bool = true;
    const NAMES_USER: bool = false;

    fn parse(data: &Data) -> Result<Self, ProtocolError> {
        let protocol = match data.get("protocol") {
            None | Some(Value::Null) => None,
            Some(value) => Some(
                value
                    .as_u64()
                    .and_then(|v| u8::try_from(v).ok())
                    .filter(|v| PROTOCOLS.contains(v))
                    .ok_or_else(|| {
                        bad_request(format!("Field 'protocol' must be one of {PROTOCOLS:?}."))
                    })?,
            ),
        };
        Ok(Hello {
            protocol,
            implicit_read: optional_bool(data, "implicit_read")?,
            presence: optional_bool(data, "presence")?,
        })
    }

    fn plan(self, context: &Context<'_>) -> Result<Plan, Failure> {
        // Who is online was already told when the connection logged in.
        if self.presence.is_some() && context.session.username.is_some() {
            return Err(bad_request(
                "Field 'presence' is set before find_user (it decides whether logging in makes you online).".into(),
            )
            .into());
        }
        let data = if context.session.tls {
            &context.rules.hello_tls
        } else {
            &context.rules.hello
        };
        let protocol = self.protocol.unwrap_or(context.session.protocol);
        let line = if protocol == 2 && self.implicit_read.is_none() && self.presence.is_none() {
            encode_line("hello", data.as_ref(), context.id)
        } else {
            let mut data = data.as_ref().clone();
            if protocol != 2 {
                data["protocol"] = protocol.into();
            }
            // Said back only to a client that asked (protocol-2 replies stay as they were).
            if let Some(implicit_read) = self.implicit_read {
                data["implicit_read"] = implicit_read.into();
            }
            if let Some(presence) = self.presence {
                data["presence"] = presence.into();
            }
            encode_line("hello", &data, context.id)
        };
        let settings = Settings {
            protocol: self.protocol,
            implicit_read: self.implicit_read,
            presence: self.presence,
        };
        Ok(if settings == Settings::default() {
            Plan::Reply(line)
        } else {
            Plan::ReplyAnd(line, Effect::Settings(settings))
        })
    }
}
