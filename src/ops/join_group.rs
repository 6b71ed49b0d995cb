//! `join_group {username, group_name}`: becomes a member (joining twice is not an error).

use serde_json::value::RawValue;

use super::fields::UserGroup;
use super::{store, Completed, Context, Data, Event, Plan, Route, StoreCall};
use crate::model::GroupRef;
use crate::protocol::reply::encode_line;
use crate::protocol::{Failure, ProtocolError};
use crate::session::Effect;
use crate::store::{Store, StoreError};

#[derive(Debug)]
pub struct JoinGroup(UserGroup);

impl Event for JoinGroup {
    const NAME: &'static str = "join_group";

    fn parse(data: &Data) -> Result<Self, ProtocolError> {
        UserGroup::parse(data).map(JoinGroup)
    }

    fn acting_user(&self) -> Option<&str> {
        Some(&self.0.username)
    }

    fn plan(self, _: &Context<'_>) -> Result<Plan, Failure> {
        Ok(store(self))
    }
}

impl StoreCall for JoinGroup {
    type Output = GroupRef;

    /// Ordered with the group's messages and room entries, so a leave can never complete
    /// before an earlier-submitted join or enter of the same user.
    fn route(&self) -> Route<'_> {
        Route::with_messages(&self.0.group_name)
    }

    fn run(&self, store: &mut dyn Store) -> Result<GroupRef, StoreError> {
        store.join_group(&self.0.username, &self.0.group_name)
    }

    fn answer(self, group: GroupRef, id: Option<&RawValue>) -> Completed {
        // The user's other protocol-3 connections hear of it (devices in sync).
        Completed {
            line: encode_line("join_success", &group, id),
            effect: Effect::JoinedGroup {
                username: self.0.username,
                group_name: self.0.group_name,
            },
            shows: None,
        }
    }
}
