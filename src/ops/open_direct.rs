//! `open_direct {username}`: the direct conversation of the logged-in user and `username`,
//! created on first use and the same one whoever opens it (its name is derived from the pair:
//! `model::direct`). The reply `direct_opened {group_name, group_id, with}` names it; from
//! then on it is used like a group (send, enter, resume, history, markers, typing, edit,
//! delete). The other user sees it when its first message arrives. A conversation with
//! oneself is refused (`bad_request`); so is one with a user who blocked the opener
//! (`forbidden`, the same words as any refusal: the block is not named).

use serde_json::json;
use serde_json::value::RawValue;

use super::fields::{bad_request, name_field};
use super::{acting, store, Completed, Context, Data, Event, Plan, Route, StoreCall};
use crate::model::GroupRef;
use crate::protocol::reply::encode_line;
use crate::protocol::{ErrorCode, Failure, ProtocolError};
use crate::session::Effect;
use crate::store::{Store, StoreError};

#[derive(Debug)]
pub struct OpenDirect {
    opener: String,
    other: String,
}

impl Event for OpenDirect {
    const NAME: &'static str = "open_direct";
    const NAMES_USER: bool = false;

    fn parse(data: &Data) -> Result<Self, ProtocolError> {
        Ok(OpenDirect {
            opener: String::new(),
            other: name_field(data, "username")?,
        })
    }

    fn plan(mut self, context: &Context<'_>) -> Result<Plan, Failure> {
        self.opener = acting(context)?;
        if self.opener == self.other {
            let text = "A direct conversation is with another user, not yourself.";
            return Err(bad_request(text.to_string()).into());
        }
        Ok(store(self))
    }
}

impl StoreCall for OpenDirect {
    type Output = GroupRef;

    fn route(&self) -> Route<'_> {
        Route::by(&self.opener)
    }

    fn run(&self, store: &mut dyn Store) -> Result<GroupRef, StoreError> {
        store.open_direct(&self.opener, &self.other)
    }

    fn answer(self, group: GroupRef, id: Option<&RawValue>) -> Completed {
        let data = json!({
            "group_name": group.group_name,
            "group_id": group.group_id,
            "with": self.other,
        });
        // The opener's other devices hear `joined_group`, and activity covers it from now on.
        Completed {
            line: encode_line("direct_opened", &data, id),
            effect: Effect::JoinedGroup {
                username: self.opener,
                group_name: group.group_name,
            },
            shows: None,
        }
    }

    fn failure(&self, error: StoreError) -> Failure {
        match error {
            StoreError::Blocked => ProtocolError::new(
                ErrorCode::Forbidden,
                "You cannot open a direct conversation with this user.",
            )
            .into(),
            other => super::failure_of(other),
        }
    }
}
