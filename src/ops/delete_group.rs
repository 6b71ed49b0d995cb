//! `delete_group {group_name}`: the owner deletes the group. Its memberships, messages and
//! bans are removed; everyone in its room (every instance) hears `group_deleted {group_name}`
//! and is taken out of the room. A group created later under the same name is a new group
//! with a new `epoch`, so a client resuming with the old epoch is told `epoch_changed`.

use serde_json::json;
use serde_json::value::RawValue;

use super::fields::name_field;
use super::{acting, store, Completed, Context, Data, Event, Plan, Route, StoreCall};
use crate::protocol::reply::encode_line;
use crate::protocol::{Failure, ProtocolError};
use crate::session::Effect;
use crate::store::manage;
use crate::store::{Store, StoreError};

#[derive(Debug)]
pub struct DeleteGroup {
    group_name: String,
    actor: String,
}

impl Event for DeleteGroup {
    const NAME: &'static str = "delete_group";
    const NAMES_USER: bool = false;

    fn parse(data: &Data) -> Result<Self, ProtocolError> {
        Ok(DeleteGroup {
            group_name: name_field(data, "group_name")?,
            actor: String::new(),
        })
    }

    fn plan(mut self, context: &Context<'_>) -> Result<Plan, Failure> {
        self.actor = acting(context)?;
        Ok(store(self))
    }
}

impl StoreCall for DeleteGroup {
    type Output = ();

    /// Ordered with the group's messages: every message acked before the delete's reply was
    /// stored before it, and none after it is (the group is gone).
    fn route(&self) -> Route<'_> {
        Route::with_messages(&self.group_name)
    }

    fn run(&self, store: &mut dyn Store) -> Result<(), StoreError> {
        manage::delete_group(store, &self.actor, &self.group_name)
    }

    fn answer(self, (): (), id: Option<&RawValue>) -> Completed {
        let data = json!({"group_name": self.group_name});
        Completed {
            line: encode_line("group_deleted", &data, id),
            effect: Effect::GroupDeleted {
                line: encode_line("group_deleted", &data, None),
                group_name: self.group_name,
            },
            shows: None,
        }
    }
}
