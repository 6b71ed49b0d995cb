//! `set_role {group_name, username, role}`: the owner makes a member an `admin` or a plain
//! `member` again, or hands ownership over (`role: "owner"`: the former owner becomes an
//! admin). The reply is `role_set {group_name, username, role}`; the group's room hears
//! `role_changed {group_name, username, role}` for each member whose role changed.

use serde_json::json;
use serde_json::value::RawValue;

use super::fields::{bad_request, string_field, UserGroup};
use super::{acting, store, Completed, Context, Data, Event, Plan, Route, StoreCall};
use crate::model::Role;
use crate::protocol::reply::encode_line;
use crate::protocol::{Failure, ProtocolError};
use crate::session::Effect;
use crate::store::manage::{self, RoleChange};
use crate::store::{Store, StoreError};

#[derive(Debug)]
pub struct SetRole {
    target: UserGroup,
    role: Role,
    actor: String,
}

impl Event for SetRole {
    const NAME: &'static str = "set_role";
    const NAMES_USER: bool = false;

    fn parse(data: &Data) -> Result<Self, ProtocolError> {
        let role = match string_field(data, "role")? {
            "owner" => Role::Owner,
            "admin" => Role::Admin,
            "member" => Role::Member,
            _ => {
                let text = "Field 'role' must be \"admin\", \"member\" or \"owner\".";
                return Err(bad_request(text.to_string()));
            }
        };
        Ok(SetRole {
            target: UserGroup::parse(data)?,
            role,
            actor: String::new(),
        })
    }

    fn plan(mut self, context: &Context<'_>) -> Result<Plan, Failure> {
        self.actor = acting(context)?;
        Ok(store(self))
    }
}

impl StoreCall for SetRole {
    type Output = RoleChange;

    fn route(&self) -> Route<'_> {
        Route::with_messages(&self.target.group_name)
    }

    fn run(&self, store: &mut dyn Store) -> Result<RoleChange, StoreError> {
        let UserGroup {
            username,
            group_name,
        } = &self.target;
        manage::set_role(store, &self.actor, group_name, username, self.role)
    }

    fn answer(self, change: RoleChange, id: Option<&RawValue>) -> Completed {
        let group_name = self.target.group_name;
        let about = |username: &str, role: Role| json!({"group_name": group_name, "username": username, "role": role});
        let mut room = encode_line(
            "role_changed",
            &about(&self.target.username, change.role),
            None,
        );
        if let Some(former) = &change.former_owner {
            room.extend(encode_line(
                "role_changed",
                &about(former, Role::Admin),
                None,
            ));
        }
        Completed {
            line: encode_line("role_set", &about(&self.target.username, change.role), id),
            effect: Effect::RoomLine {
                group_name: group_name.clone(),
                line: room,
            },
            shows: None,
        }
    }
}
