//! `hello`: the handshake. Answered at once with the server's identity, protocol version,
//! the events it knows and its running limits (built once from the configuration).

use super::{Context, Data, Event, Planned};
use crate::protocol::reply::encode_line;
use crate::protocol::{Failure, ProtocolError};

pub struct Hello;

impl Event for Hello {
    const NAME: &'static str = "hello";
    const BEFORE_LOGIN: bool = true;
    const NAMES_USER: bool = false;

    fn parse(_: &Data) -> Result<Self, ProtocolError> {
        Ok(Hello)
    }

    fn plan(self, context: &Context<'_>) -> Result<Planned, Failure> {
        let data = if context.session.tls {
            &context.rules.hello_tls
        } else {
            &context.rules.hello
        };
        Ok(Planned::Now(encode_line(
            "hello",
            data.as_ref(),
            context.id,
        )))
    }
}
