//! The owner's and admins' moderation: `remove_member`, `ban_member` and `unban_member`, each
//! `{group_name, username}` naming the member acted on. One event type per action over one
//! shape (`Moderate<A>`): the rules are in `store::manage`.
//!
//! Removal and ban take every connection of that user out of the group's room at once, on
//! every instance, with `left_group {group_name, reason: "removed" | "banned"}` to them; the
//! room hears `member_removed {group_name, username, reason}`. A banned user's `join_group`
//! is refused (`banned`) until `unban_member`.

use std::marker::PhantomData;

use serde_json::json;
use serde_json::value::RawValue;

use super::fields::UserGroup;
use super::{acting, store, Completed, Context, Data, Event, Planned, Route, StoreCall};
use crate::protocol::reply::encode_line;
use crate::protocol::{Failure, ProtocolError};
use crate::session::Effect;
use crate::store::manage;
use crate::store::{Store, StoreError};

/// One moderation action: its wire names and its rule.
pub trait Action: Send + std::fmt::Debug + 'static {
    const EVENT: &'static str;
    const REPLY: &'static str;
    /// What the removed user's `left_group` and the room's `member_removed` say; `None`: the
    /// action takes nobody out (unban).
    const REASON: Option<&'static str>;
    fn apply(
        store: &mut dyn Store,
        actor: &str,
        group: &str,
        target: &str,
    ) -> Result<(), StoreError>;
}

#[derive(Debug)]
pub struct Remove;
#[derive(Debug)]
pub struct Ban;
#[derive(Debug)]
pub struct Unban;

impl Action for Remove {
    const EVENT: &'static str = "remove_member";
    const REPLY: &'static str = "member_removed";
    const REASON: Option<&'static str> = Some("removed");
    fn apply(
        store: &mut dyn Store,
        actor: &str,
        group: &str,
        target: &str,
    ) -> Result<(), StoreError> {
        manage::remove(store, actor, group, target)
    }
}

impl Action for Ban {
    const EVENT: &'static str = "ban_member";
    const REPLY: &'static str = "member_banned";
    const REASON: Option<&'static str> = Some("banned");
    fn apply(
        store: &mut dyn Store,
        actor: &str,
        group: &str,
        target: &str,
    ) -> Result<(), StoreError> {
        manage::ban(store, actor, group, target).map(drop)
    }
}

impl Action for Unban {
    const EVENT: &'static str = "unban_member";
    const REPLY: &'static str = "member_unbanned";
    const REASON: Option<&'static str> = None;
    fn apply(
        store: &mut dyn Store,
        actor: &str,
        group: &str,
        target: &str,
    ) -> Result<(), StoreError> {
        manage::unban(store, actor, group, target)
    }
}

#[derive(Debug)]
pub struct Moderate<A: Action> {
    target: UserGroup,
    actor: String,
    action: PhantomData<A>,
}

impl<A: Action> Event for Moderate<A> {
    const NAME: &'static str = A::EVENT;
    const NAMES_USER: bool = false;

    fn parse(data: &Data) -> Result<Self, ProtocolError> {
        Ok(Moderate {
            target: UserGroup::parse(data)?,
            actor: String::new(),
            action: PhantomData,
        })
    }

    fn plan(mut self, context: &Context<'_>) -> Result<Planned, Failure> {
        self.actor = acting(context)?;
        Ok(store(self))
    }
}

impl<A: Action> StoreCall for Moderate<A> {
    type Output = ();

    fn route(&self) -> Route<'_> {
        Route::with_messages(&self.target.group_name)
    }

    fn run(&self, store: &mut dyn Store) -> Result<(), StoreError> {
        let UserGroup {
            username,
            group_name,
        } = &self.target;
        A::apply(store, &self.actor, group_name, username)
    }

    fn answer(self, (): (), id: Option<&RawValue>) -> Completed {
        let UserGroup {
            username,
            group_name,
        } = self.target;
        let data = json!({"group_name": group_name, "username": username});
        let line = encode_line(A::REPLY, &data, id);
        let effect = match A::REASON {
            Some(reason) => Effect::Removed {
                line: encode_line(
                    "member_removed",
                    &json!({"group_name": group_name, "username": username, "reason": reason}),
                    None,
                ),
                username,
                group_name,
                reason,
            },
            None => Effect::None,
        };
        Completed {
            line,
            effect,
            shows: None,
        }
    }
}
