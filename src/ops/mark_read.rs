//! `mark_read {username, group_name, seq}`: raises the user's read marker in the group to `seq`
//! (clamped to the group's newest message; never lowers it) and reports the read state.

use serde_json::json;
use serde_json::value::RawValue;

use super::fields::{required_count, user_and_group};
use super::{store, Completed, Context, Data, Event, Plan, Route, StoreCall};
use crate::model::{GroupReadState, ReadMark};
use crate::protocol::reply::encode_line;
use crate::protocol::{Failure, ProtocolError};
use crate::session::{Effect, ReadState};
use crate::store::{Store, StoreError};

#[derive(Debug)]
pub struct MarkRead(ReadMark, bool);

impl Event for MarkRead {
    const NAME: &'static str = "mark_read";

    fn parse(data: &Data) -> Result<Self, ProtocolError> {
        let (username, group_name) = user_and_group(data)?;
        let seq = required_count(data, "seq")?;
        Ok(MarkRead(
            ReadMark {
                username,
                group_name,
                seq,
            },
            false,
        ))
    }

    fn acting_user(&self) -> Option<&str> {
        Some(&self.0.username)
    }

    /// Protocol 3's reply also says `mention_count`.
    fn plan(mut self, context: &Context<'_>) -> Result<Plan, Failure> {
        self.1 = context.session.protocol >= 3;
        Ok(store(self))
    }
}

impl StoreCall for MarkRead {
    /// The marker before, and the read state after.
    type Output = (u64, GroupReadState);

    /// With the writer: read marks are batched into its commits.
    fn route(&self) -> Route<'_> {
        Route::with_messages(&self.0.group_name)
    }

    fn run(&self, store: &mut dyn Store) -> Result<Self::Output, StoreError> {
        let mark = &self.0;
        let before = store.read_state(&mark.username, &mark.group_name)?;
        if mark.seq <= before.last_read_seq {
            // Nothing rises: no write.
            return Ok((before.last_read_seq, before));
        }
        let clamped = ReadMark {
            seq: mark.seq.min(before.last_seq),
            ..mark.clone()
        };
        store.mark_read(std::slice::from_ref(&clamped))?;
        let after = store.read_state(&mark.username, &mark.group_name)?;
        Ok((before.last_read_seq, after))
    }

    fn answer(self, (before, state): Self::Output, id: Option<&RawValue>) -> Completed {
        let mention_count = state.attention.as_ref().map(|a| a.mention_count);
        let mut data = json!({
            "group_name": state.group_name,
            "last_read_seq": state.last_read_seq,
            "unread_count": state.unread_count,
        });
        if let (true, Some(mentions)) = (self.1, mention_count) {
            data["mention_count"] = json!(mentions);
        }
        // The user's other protocol-3 connections hear of it (devices in sync), only when
        // the marker rose: a mark at or below it changes nothing they show.
        let effect = if state.last_read_seq > before {
            Effect::ReadMarker(ReadState {
                username: self.0.username,
                group_name: state.group_name,
                last_read_seq: state.last_read_seq,
                unread_count: state.unread_count,
                mention_count,
            })
        } else {
            Effect::None
        };
        Completed {
            line: encode_line("marked_read", &data, id),
            effect,
            shows: None,
        }
    }
}
