//! `edit_message {group_name, seq, text}`: the author replaces a message's text. The seq never
//! changes; the reply and the room's broadcast are `message_edited` with the message as now
//! stored (`edited_at` set); history and resume return the latest text. A deleted message
//! cannot be edited (`not_found`), nor someone else's (`forbidden`).

use serde_json::value::RawValue;

use super::fields::{mentions_field, optional_name, text_field, MessageRef};
use super::{acting, store, Completed, Context, Data, Event, Plan, Route, StoreCall};
use crate::protocol::{Failure, ProtocolError};
use crate::store::manage::{self, Rewritten};
use crate::store::{Store, StoreError};

#[derive(Debug)]
pub struct EditMessage {
    message: MessageRef,
    text: String,
    /// The message's new mentions (`None`: they stay as they were).
    mentions: Option<Vec<String>>,
    username: String,
}

impl Event for EditMessage {
    const NAME: &'static str = "edit_message";
    const NAMES_USER: bool = false;

    fn parse(data: &Data) -> Result<Self, ProtocolError> {
        Ok(EditMessage {
            message: MessageRef::parse(data)?,
            text: text_field(data)?,
            mentions: mentions_field(data)?,
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

impl StoreCall for EditMessage {
    type Output = Rewritten;

    /// Ordered with the group's messages: an edit never overtakes the message it changes.
    fn route(&self) -> Route<'_> {
        Route::with_messages(&self.message.group_name)
    }

    fn run(&self, store: &mut dyn Store) -> Result<Rewritten, StoreError> {
        let MessageRef { group_name, seq } = &self.message;
        let mentions = self.mentions.as_deref();
        manage::edit(
            store,
            &self.username,
            group_name,
            *seq,
            &self.text,
            mentions,
        )
    }

    fn answer(self, edited: Rewritten, id: Option<&RawValue>) -> Completed {
        super::message_changed("message_edited", edited, id)
    }
}
