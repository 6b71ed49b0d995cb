//! `visit_group {username, group_name}` (protocol v1): enters the group's room and reports when
//! the user last read it (`user_visited`). Leaving the previous room marks what it delivered.

use serde_json::json;
use serde_json::value::RawValue;

use super::fields::user_and_group;
use super::{store, Completed, Context, Data, Event, Plan, Route, StoreCall};
use crate::model::{Entry, MemberOf, ReadMark, Visit};
use crate::protocol::reply::encode_line;
use crate::protocol::{EventError, Failure, ProtocolError};
use crate::session::{Effect, Room};
use crate::store::{Store, StoreError};

#[derive(Debug)]
pub struct VisitGroup {
    username: String,
    group_name: String,
    /// The read mark leaving the current room implies.
    leaving: Option<ReadMark>,
}

impl Event for VisitGroup {
    const NAME: &'static str = "visit_group";

    fn parse(data: &Data) -> Result<Self, ProtocolError> {
        let (username, group_name) = user_and_group(data)?;
        Ok(VisitGroup {
            username,
            group_name,
            leaving: None,
        })
    }

    fn acting_user(&self) -> Option<&str> {
        Some(&self.username)
    }

    fn plan(self, context: &Context<'_>) -> Result<Plan, Failure> {
        if context.session.room_name() == Some(self.group_name.as_str()) {
            return Err(EventError::AlreadyInTheGroup.into());
        }
        Ok(store(VisitGroup {
            leaving: context.session.leaving_mark(),
            ..self
        }))
    }
}

impl StoreCall for VisitGroup {
    type Output = Visit;

    /// Ordered with the group's messages: the reply fixes the `seq` after which live
    /// broadcasts start.
    fn route(&self) -> Route<'_> {
        Route::with_messages(&self.group_name)
    }

    fn run(&self, store: &mut dyn Store) -> Result<Visit, StoreError> {
        store.visit_group(&Entry {
            member: MemberOf {
                username: &self.username,
                group_name: &self.group_name,
            },
            leaving: self.leaving.as_ref(),
            marks_entry: false,
        })
    }

    fn answer(self, visit: Visit, id: Option<&RawValue>) -> Completed {
        let data = json!({
            "username": self.username,
            "group_name": self.group_name,
            "last_time_read_in_visiting_group": visit.last_read,
        });
        Completed {
            line: encode_line("user_visited", &data, id),
            effect: Effect::EnterRoom(Room::new(
                self.group_name,
                visit.head_seq,
                visit.last_read_seq,
            )),
            shows: None,
        }
    }
}
