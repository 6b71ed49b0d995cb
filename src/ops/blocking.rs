//! Blocking: `block_user {username}`, `unblock_user {username}` (safe to repeat) and
//! `list_blocked {}`, each answered with `blocked_users {users}`, the whole list by name. A
//! change is synced to the user's other protocol-3 devices (the same `blocked_users` line).
//! A blocked user cannot open a direct conversation with the blocker nor send into one they
//! have; in shared groups nothing is hidden by the server (clients hide what the list names).

use std::marker::PhantomData;

use serde_json::json;
use serde_json::value::RawValue;

use super::fields::{bad_request, name_field};
use super::{acting, store, Completed, Context, Data, Event, Plan, Route, StoreCall, ToDevices};
use crate::protocol::reply::encode_line;
use crate::protocol::{Failure, ProtocolError};
use crate::session::Effect;
use crate::store::{Store, StoreError};

/// Which of the three requests.
pub trait Change: Send + std::fmt::Debug + 'static {
    const NAME: &'static str;
    /// Block (`Some(true)`), unblock, or only list (`None`: no `username`).
    const BLOCK: Option<bool>;
}

#[derive(Debug)]
pub struct Block;
#[derive(Debug)]
pub struct Unblock;
#[derive(Debug)]
pub struct List;

impl Change for Block {
    const NAME: &'static str = "block_user";
    const BLOCK: Option<bool> = Some(true);
}

impl Change for Unblock {
    const NAME: &'static str = "unblock_user";
    const BLOCK: Option<bool> = Some(false);
}

impl Change for List {
    const NAME: &'static str = "list_blocked";
    const BLOCK: Option<bool> = None;
}

#[derive(Debug)]
pub struct Blocking<C: Change> {
    username: String,
    other: String,
    change: PhantomData<C>,
}

impl<C: Change> Event for Blocking<C> {
    const NAME: &'static str = C::NAME;
    const NAMES_USER: bool = false;

    fn parse(data: &Data) -> Result<Self, ProtocolError> {
        let other = match C::BLOCK {
            Some(_) => name_field(data, "username")?,
            None => String::new(),
        };
        Ok(Blocking {
            username: String::new(),
            other,
            change: PhantomData,
        })
    }

    fn plan(mut self, context: &Context<'_>) -> Result<Plan, Failure> {
        self.username = acting(context)?;
        if C::BLOCK == Some(true) && self.username == self.other {
            return Err(bad_request("You cannot block yourself.".to_string()).into());
        }
        Ok(store(self))
    }
}

impl<C: Change> StoreCall for Blocking<C> {
    type Output = Vec<String>;

    fn route(&self) -> Route<'_> {
        Route::by(&self.username)
    }

    fn run(&self, store: &mut dyn Store) -> Result<Vec<String>, StoreError> {
        match C::BLOCK {
            Some(on) => store.set_blocked(&self.username, &self.other, on),
            None => store.blocked_users(&self.username),
        }
    }

    fn answer(self, users: Vec<String>, id: Option<&RawValue>) -> Completed {
        let data = json!({ "users": users });
        let effect = match C::BLOCK {
            Some(_) => ToDevices::effect(&self.username, encode_line("blocked_users", &data, None)),
            None => Effect::None,
        };
        Completed {
            line: encode_line("blocked_users", &data, id),
            effect,
            shows: None,
        }
    }
}
