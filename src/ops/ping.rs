//! `ping`: answered at once with `pong {time}`; allowed before login (a keepalive).

use serde_json::json;

use super::{Context, Data, Event, Plan};
use crate::model::now_timestamp;
use crate::protocol::reply::encode_line;
use crate::protocol::{Failure, ProtocolError};

pub struct Ping;

impl Event for Ping {
    const NAME: &'static str = "ping";
    const BEFORE_LOGIN: bool = true;
    const NAMES_USER: bool = false;

    fn parse(_: &Data) -> Result<Self, ProtocolError> {
        Ok(Ping)
    }

    fn plan(self, context: &Context<'_>) -> Result<Plan, Failure> {
        let data = json!({ "time": now_timestamp() });
        Ok(Plan::Reply(encode_line("pong", &data, context.id)))
    }
}
