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
use super::{acting, store, Completed, Context, Data, Event, Plan, Route, StoreCall};
use crate::protocol::reply::encode_line;
use crate::protocol::{Failure, ProtocolError};
use crate::session::Effect;
use crate::store::manage;
use crate::store::{Store, StoreError, StoreResult};

/// The three actions, with their wire names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Remove,
    Ban,
    Unban,
}

impl Kind {
    const fn event(self) -> &'static str {
        match self {
            Kind::Remove => "remove_member",
            Kind::Ban => "ban_member",
            Kind::Unban => "unban_member",
        }
    }

    const fn reply(self) -> &'static str {
        match self {
            Kind::Remove => "member_removed",
            Kind::Ban => "member_banned",
            Kind::Unban => "member_unbanned",
        }
    }

    /// What the removed user's `left_group` and the room's `member_removed` say; `None`: the
    /// action takes nobody out.
    const fn reason(self) -> Option<&'static str> {
        match self {
            Kind::Remove => Some("removed"),
            Kind::Ban => Some("banned"),
            Kind::Unban => None,
        }
    }

    fn apply(
        self,
        store: &mut dyn Store,
        actor: &str,
        group: &str,
        target: &str,
    ) -> StoreResult<()> {
        match self {
            Kind::Remove => manage::remove(store, actor, group, target),
            Kind::Ban => manage::ban(store, actor, group, target).map(drop),
            Kind::Unban => manage::unban(store, actor, group, target),
        }
    }
}

/// A moderation event type: which action it is.
pub trait Action: Send + std::fmt::Debug + 'static {
    const KIND: Kind;
}

#[derive(Debug)]
pub struct Remove;
#[derive(Debug)]
pub struct Ban;
#[derive(Debug)]
pub struct Unban;

impl Action for Remove {
    const KIND: Kind = Kind::Remove;
}

impl Action for Ban {
    const KIND: Kind = Kind::Ban;
}

impl Action for Unban {
    const KIND: Kind = Kind::Unban;
}

#[derive(Debug)]
pub struct Moderate<A: Action> {
    target: UserGroup,
    actor: String,
    action: PhantomData<A>,
}

impl<A: Action> Event for Moderate<A> {
    const NAME: &'static str = A::KIND.event();
    const NAMES_USER: bool = false;

    fn parse(data: &Data) -> Result<Self, ProtocolError> {
        Ok(Moderate {
            target: UserGroup::parse(data)?,
            actor: String::new(),
            action: PhantomData,
        })
    }

    fn plan(mut self, context: &Context<'_>) -> Result<Plan, Failure> {
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
        A::KIND.apply(store, &self.actor, group_name, username)
    }

    fn answer(self, (): (), id: Option<&RawValue>) -> Completed {
        let UserGroup {
            username,
            group_name,
        } = self.target;
        let data = json!({"group_name": group_name, "username": username});
        let line = encode_line(A::KIND.reply(), &data, id);
        let effect = match A::KIND.reason() {
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
