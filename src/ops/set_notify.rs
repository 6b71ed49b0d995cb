//! `set_notify {group_name, level}`: the user's notification level in one conversation, `all`
//! (the default), `mentions` or `none`. Kept in the store (across logins), shown in
//! `my_groups` (protocol 3) and synced to the user's other protocol-3 devices (the same
//! `notify_set` line). Counts stay true at every level: the level tells clients how to show
//! them, and decides what is pushed.

use serde_json::json;
use serde_json::value::RawValue;

use super::fields::{bad_request, name_field, string_field};
use super::{acting, store, Completed, Context, Data, Event, Plan, Route, StoreCall, ToDevices};
use crate::model::{MemberOf, Notify};
use crate::protocol::reply::encode_line;
use crate::protocol::{Failure, ProtocolError};
use crate::store::{Store, StoreError};

#[derive(Debug)]
pub struct SetNotify {
    username: String,
    group_name: String,
    level: Notify,
}

impl Event for SetNotify {
    const NAME: &'static str = "set_notify";
    const NAMES_USER: bool = false;

    fn parse(data: &Data) -> Result<Self, ProtocolError> {
        let level = string_field(data, "level")?;
        let level = Notify::parse(level).ok_or_else(|| {
            bad_request("Field 'level' must be \"all\", \"mentions\" or \"none\".".to_string())
        })?;
        Ok(SetNotify {
            username: String::new(),
            group_name: name_field(data, "group_name")?,
            level,
        })
    }

    fn plan(mut self, context: &Context<'_>) -> Result<Plan, Failure> {
        self.username = acting(context)?;
        Ok(store(self))
    }
}

impl StoreCall for SetNotify {
    type Output = ();

    fn route(&self) -> Route<'_> {
        Route::by(&self.username)
    }

    fn run(&self, store: &mut dyn Store) -> Result<(), StoreError> {
        let member = MemberOf {
            username: &self.username,
            group_name: &self.group_name,
        };
        store.set_notify(member, self.level)
    }

    fn answer(self, (): (), id: Option<&RawValue>) -> Completed {
        let data = json!({"group_name": self.group_name, "level": self.level});
        Completed {
            line: encode_line("notify_set", &data, id),
            effect: ToDevices::effect(&self.username, encode_line("notify_set", &data, None)),
            shows: None,
        }
    }
}
