//! `leave_group {username, group_name}`: stops being a member; every connection of the user in
//! that room leaves it, on this instance and (through the relay) on the others.

use serde_json::value::RawValue;

use super::fields::UserGroup;
use super::{store, Completed, Context, Data, Event, Plan, Route, StoreCall};
use crate::model::GroupRef;
use crate::protocol::reply::encode_line;
use crate::protocol::{Failure, ProtocolError};
use crate::session::Effect;
use crate::store::{manage, Store, StoreError};

#[derive(Debug)]
pub struct LeaveGroup(UserGroup);

impl Event for LeaveGroup {
    const NAME: &'static str = "leave_group";

    fn parse(data: &Data) -> Result<Self, ProtocolError> {
        UserGroup::parse(data).map(LeaveGroup)
    }

    fn acting_user(&self) -> Option<&str> {
        Some(&self.0.username)
    }

    fn plan(self, _: &Context<'_>) -> Result<Plan, Failure> {
        Ok(store(self))
    }
}

impl StoreCall for LeaveGroup {
    type Output = GroupRef;

    /// Ordered with the group's messages and room entries (see `join_group`).
    fn route(&self) -> Route<'_> {
        Route::with_messages(&self.0.group_name)
    }

    fn run(&self, store: &mut dyn Store) -> Result<GroupRef, StoreError> {
        // An owner who leaves hands the group on (see `manage::leave`).
        manage::leave(store, &self.0.username, &self.0.group_name).map(|(group, _)| group)
    }

    fn answer(self, group: GroupRef, id: Option<&RawValue>) -> Completed {
        let UserGroup {
            username,
            group_name,
        } = self.0;
        Completed {
            line: encode_line("leave_success", &group, id),
            effect: Effect::LeftGroup {
                username,
                group_name,
            },
            shows: None,
        }
    }
}
