//! `enter_group {username, group_name}` (protocol v2): enters the room with its history in one
//! reply: unread messages (oldest first, up to `MAX_UNREAD_ON_ENTER` and the reply budget), a
//! little already-read context, and the group's `epoch`. Re-entering the current room is
//! allowed (it re-reads the history). With `since_seq` it is a gapless resume instead
//! (`resume.rs`).

use serde_json::json;
use serde_json::value::RawValue;

use super::fields::{optional_count, optional_string, user_and_group};
use super::resume::{first_page, ResumeStart};
use super::{store, Completed, Context, Data, Event, Plan, Route, StoreCall};
use crate::model::{Entry, GroupHistory, MemberOf, ReadMark};
use crate::protocol::reply::encode_line;
use crate::protocol::{Failure, ProtocolError};
use crate::session::{Effect, Room};
use crate::store::{Store, StoreError};

#[derive(Debug)]
pub struct EnterGroup {
    username: String,
    group_name: String,
    /// The read mark leaving the current room implies (none when re-entering it).
    leaving: Option<ReadMark>,
    /// Encoded bytes the history may take in the reply.
    reply_budget: usize,
    /// Resume after this seq (`since_seq`), and the epoch the client had (`since_epoch`).
    since: Option<(u64, Option<String>)>,
    /// Protocol 3: the reply also names the members online (`online`).
    with_members: bool,
    /// Entering marks read what the reply holds (the connection's implicit read marks).
    marks_entry: bool,
}

impl Event for EnterGroup {
    const NAME: &'static str = "enter_group";

    fn parse(data: &Data) -> Result<Self, ProtocolError> {
        let (username, group_name) = user_and_group(data)?;
        let since_epoch = optional_string(data, "since_epoch")?;
        let since = match optional_count(data, "since_seq")? {
            Some(seq) => Some((seq, since_epoch)),
            None if since_epoch.is_some() => {
                return Err(super::fields::bad_request(
                    "Field 'since_epoch' needs 'since_seq'.".to_string(),
                ))
            }
            None => None,
        };
        Ok(EnterGroup {
            username,
            group_name,
            leaving: None,
            reply_budget: 0,
            since,
            with_members: false,
            marks_entry: true,
        })
    }

    fn acting_user(&self) -> Option<&str> {
        Some(&self.username)
    }

    fn plan(self, context: &Context<'_>) -> Result<Plan, Failure> {
        let leaving = context
            .session
            .leaving_mark()
            .filter(|mark| mark.group_name != self.group_name);
        if let Some((since_seq, since_epoch)) = self.since {
            let start = ResumeStart {
                since_epoch,
                with_members: context.session.protocol >= 3,
                max_messages: context.rules.resume_max_messages,
                leaving,
            };
            return Ok(first_page(
                self.username,
                self.group_name,
                since_seq,
                start,
                context.reply_budget,
            ));
        }
        Ok(store(EnterGroup {
            leaving,
            reply_budget: context.reply_budget,
            with_members: context.session.protocol >= 3,
            marks_entry: context.session.implicit_read,
            ..self
        }))
    }
}

impl StoreCall for EnterGroup {
    type Output = (GroupHistory, Option<Vec<String>>);

    /// Ordered with the group's messages: the reply fixes the `seq` after which live
    /// broadcasts start.
    fn route(&self) -> Route<'_> {
        Route::with_messages(&self.group_name)
    }

    fn run(&self, store: &mut dyn Store) -> Result<Self::Output, StoreError> {
        let entry = Entry {
            member: MemberOf {
                username: &self.username,
                group_name: &self.group_name,
            },
            leaving: self.leaving.as_ref(),
            marks_entry: self.marks_entry,
        };
        let history = store.enter_group(&entry, self.reply_budget)?;
        let members = if self.with_members {
            Some(store.group_members(&self.group_name)?)
        } else {
            None
        };
        Ok((history, members))
    }

    fn answer(self, (history, members): Self::Output, id: Option<&RawValue>) -> Completed {
        let mut data = json!({
            "group_name": self.group_name,
            "unread": history.unread,
            "read": history.read,
            "unread_has_more": history.unread_has_more,
            "epoch": history.epoch,
        });
        super::mark_history_start(&mut data, history.first_seq);
        let mut room = Room::new(self.group_name, history.head_seq, history.read_seq);
        room.marker_rose = history.read_seq > history.marker_before;
        Completed {
            line: encode_line("enter_group", &data, id),
            effect: match members {
                Some(members) => Effect::Online(Box::new(Effect::EnterRoom(room)), members),
                None => Effect::EnterRoom(room),
            },
            shows: None,
        }
    }
}
