//! `create_group {username, group_name}`: creates a group with its creator as first member
//! (new names follow the same rules as new user names; `MAX_GROUPS_PER_USER` caps creations).

use serde_json::value::RawValue;

use super::fields::{bad_request, new_name_rules, user_and_group};
use super::{store, Completed, Context, Data, Event, Plan, Route, StoreCall};
use crate::model::{CreatedGroup, MemberOf};
use crate::protocol::reply::encode_line;
use crate::protocol::{Failure, ProtocolError};
use crate::store::{Store, StoreError};

#[derive(Debug)]
pub struct CreateGroup {
    username: String,
    group_name: String,
    max_per_user: usize,
}

impl Event for CreateGroup {
    const NAME: &'static str = "create_group";

    fn parse(data: &Data) -> Result<Self, ProtocolError> {
        let (username, group_name) = user_and_group(data)?;
        new_name_rules(&group_name, "group_name").map_err(bad_request)?;
        if crate::model::direct::is_direct(&group_name) {
            let text = format!(
                "Group names starting with '{}' are reserved for direct conversations (open_direct).",
                crate::model::direct::DIRECT_PREFIX
            );
            return Err(bad_request(text));
        }
        Ok(CreateGroup {
            username,
            group_name,
            max_per_user: 0,
        })
    }

    fn acting_user(&self) -> Option<&str> {
        Some(&self.username)
    }

    fn plan(self, context: &Context<'_>) -> Result<Plan, Failure> {
        Ok(store(CreateGroup {
            max_per_user: context.rules.max_groups_per_user,
            ..self
        }))
    }
}

impl StoreCall for CreateGroup {
    type Output = CreatedGroup;

    fn route(&self) -> Route<'_> {
        Route::by(&self.group_name)
    }

    fn run(&self, store: &mut dyn Store) -> Result<CreatedGroup, StoreError> {
        let creator = MemberOf {
            username: &self.username,
            group_name: &self.group_name,
        };
        store.create_group(creator, self.max_per_user)
    }

    fn answer(self, group: CreatedGroup, id: Option<&RawValue>) -> Completed {
        Completed::reply(encode_line("group_created", &group, id))
    }
}
