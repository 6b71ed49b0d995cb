//! `delete_message {group_name, seq}`: the author, an admin or the owner deletes a message.
//! Its text is erased from the store, not hidden; a tombstone keeps the seq (`deleted: true`,
//! no `text`) so history stays gapless. The reply and the room's broadcast are
//! `message_deleted` with the tombstone. Deleting a tombstone again answers the same and
//! broadcasts nothing (safe to retry).

use serde_json::value::RawValue;

use super::fields::{optional_name, MessageRef};
use super::{acting, store, Completed, Context, Data, Event, Plan, Route, StoreCall};
use crate::protocol::{Failure, ProtocolError};
use crate::store::manage::{self, Rewritten};
use crate::store::{Store, StoreError};

#[derive(Debug)]
pub struct DeleteMessage {
    message: MessageRef,
    username: String,
}

impl Event for DeleteMessage {
    const NAME: &'static str = "delete_message";
    const NAMES_USER: bool = false;

    fn parse(data: &Data) -> Result<Self, ProtocolError> {
        Ok(DeleteMessage {
            message: MessageRef::parse(data)?,
            // A `username` that is given must be the logged-in user (`forbidden` otherwise).
            username: optional_name(data, "username")?.unwrap_or_default(),
        })
    }

    fn acting_user(&self) -> Option<&str> {
        Some(self.username.as_str()).filter(|name| !name.is_empty())
    }

    fn plan(mut self, context: &Context<'_>) -> Result<Plan, Failure> {
        self.username = acting(context)?;
        Ok(store(self))
    }
}

impl StoreCall for DeleteMessage {
    type Output = Rewritten;

    fn route(&self) -> Route<'_> {
        Route::with_messages(&self.message.group_name)
    }

    fn run(&self, store: &mut dyn Store) -> Result<Rewritten, StoreError> {
        let MessageRef { group_name, seq } = &self.message;
        manage::delete(store, &self.username, group_name, *seq)
    }

    fn answer(self, deleted: Rewritten, id: Option<&RawValue>) -> Completed {
        super::message_changed("message_deleted", deleted, id)
    }
}
